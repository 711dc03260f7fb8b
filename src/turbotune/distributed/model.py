"""The model of an FSDP run: how it is loaded, and what turns it into a sharded one.

``turbotune train`` calls :func:`load_for_fsdp` instead of the framework's loader when the
``distributed`` section is enabled, and the ``fsdp`` plugin calls :func:`shard_model` after the
adapters and patches. Between the two the model may be on the meta device (low-memory
loading): nothing but :func:`shard_model` may read its values.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from turbotune.errors import ConfigError

if TYPE_CHECKING:
    from turbotune.config import Config
    from turbotune.distributed.config import DistributedConfig
    from turbotune.distributed.loading import TensorSource
    from turbotune.framework import AccelerationFramework
    from turbotune.precision import PrecisionPlan

__all__ = [
    "check_run",
    "convert_bnb_linears",
    "load_for_fsdp",
    "materialize_tied",
    "owns_precision",
    "shard_model",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_run(cfg: Config) -> None:
    """Refuse combinations an FSDP run does not support, before anything is loaded."""
    d, q, a = cfg.distributed, cfg.quantization, cfg.adapter
    if cfg.train.gradient_checkpointing:
        raise ConfigError(
            "with distributed.enabled, use distributed.activation_checkpointing (per block, "
            "FSDP-aware) instead of train.gradient_checkpointing"
        )
    if q.method in ("nf4", "fp4") and a.implementation != "custom":
        raise ConfigError(
            "4-bit FSDP runs keep the base in turbotune's shardable NF4 storage, which "
            "turbotune's own LoRA layers adapt: set adapter.implementation=custom "
            "(train_type custom_qlora)"
        )
    if q.method not in ("none", "nf4", "fp4", "gptq"):
        raise ConfigError(f"quantization.method {q.method} is not supported with FSDP yet")
    if q.method == "gptq" and d.low_memory_loading:
        raise ConfigError(
            "a GPTQ checkpoint loads through the GPTQ plugin (its layers are sharded when FSDP2 "
            "is applied, distributed/gptq.py): set distributed.low_memory_loading=false"
        )
    adapters = cfg.model.path and a.method != "full"
    if d.low_memory_loading and adapters and (a.implementation, a.method) != ("custom", "lora"):
        raise ConfigError(
            "distributed.low_memory_loading initializes adapters after loading, which "
            "turbotune's own LoRA layers support: set adapter.implementation=custom and "
            "adapter.method=lora, or distributed.low_memory_loading=false"
        )


def owns_precision(model: nn.Module) -> bool:
    """Whether the FSDP loader already gave every tensor its dtype (skip ``apply_precision``)."""
    return "_turbotune_source" in model.__dict__


def _storage_dtype(cfg: Config, plan: PrecisionPlan) -> torch.dtype:
    from turbotune.distributed.shard import storage_dtype_for

    return storage_dtype_for(plan, _DTYPES[cfg.quantization.compute_dtype])


def load_for_fsdp(
    cfg: Config, fw: AccelerationFramework, plan: PrecisionPlan, path: str, dtype: torch.dtype
) -> tuple[nn.Module, Any]:
    """The model of an FSDP run and its peft config.

    Low-memory loading: a meta-device model (4-bit targets as ``NF4Linear``) whose values a
    :class:`~turbotune.distributed.loading.SafetensorsSource` gives later. Otherwise the usual
    loader (bitsandbytes for 4-bit, whose layers are converted to ``NF4Linear`` bit for bit).
    """
    from transformers import AutoConfig

    from turbotune.distributed.env import init_distributed
    from turbotune.distributed.loading import SafetensorsSource, build_meta_model

    check_run(cfg)
    init_distributed(cfg.backend)
    q = cfg.quantization
    quantized = q.method in ("nf4", "fp4")
    if cfg.distributed.low_memory_loading and Path(path).is_dir():
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        model = build_meta_model(
            config, dtype, quantize=quantized, compute_dtype=_DTYPES[q.compute_dtype],
            storage_dtype=_storage_dtype(cfg, plan), double_quant=q.double_quant,
            quant_type=q.method if quantized else "nf4", skip_modules=q.skip_modules,
            attn_implementation=cfg.model.attn_implementation,
        )  # fmt: skip
        model.config.name_or_path = path
        set_source(model, SafetensorsSource(path))
        return model, fw.peft_config()
    model, peft_config = fw.load_model(path, dtype=dtype)
    if quantized:
        convert_bnb_linears(model, _storage_dtype(cfg, plan))
    return model, peft_config


def set_source(model: nn.Module, source: TensorSource) -> None:
    """Record where a meta-device model's values come from (read by :func:`shard_model`)."""
    model.__dict__["_turbotune_source"] = source


def convert_bnb_linears(model: nn.Module, storage_dtype: torch.dtype) -> int:
    """Swap every bitsandbytes ``Linear4bit`` for an equal ``NF4Linear``; returns the count."""
    from turbotune.distributed.nf4 import NF4Linear

    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state"):
            parent, _, child = name.rpartition(".")
            layer = NF4Linear.from_bnb(module, storage_dtype)
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            swapped += 1
    return swapped


def _aliases(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """Parameters registered under several names (tied embeddings): ``(module, name, first
    module, first name)`` for every registration after the first."""
    first: dict[int, tuple[nn.Module, str]] = {}
    out = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in first:
                out.append((module, name, *first[id(param)]))
            else:
                first[id(param)] = (module, name)
    return out


def materialize_tied(
    model: nn.Module, source: TensorSource, device: torch.device, *, seed: int = 42
) -> dict[str, Any]:
    """:func:`~turbotune.distributed.loading.materialize`, keeping tied parameters tied.

    ``to_empty`` gives every registration of a shared parameter its own new tensor, and only
    the first name is loaded: a tied head would stay uninitialized. FSDP2 keeps the ties of the
    parameters it manages; the others (unsharded models, ``frozen: replicate``) are re-tied here.
    """
    from turbotune.distributed.loading import materialize

    aliases = [a for a in _aliases(model) if not hasattr(getattr(a[0], a[1]), "device_mesh")]
    stats = materialize(model, source, device, seed=seed)
    for module, name, owner, owner_name in aliases:
        module._parameters[name] = owner._parameters[owner_name]
    return stats


def _source_of(model: nn.Module) -> TensorSource | None:
    # The adapter wrapper (PeftModel) may stand in front of the model that recorded it.
    for m in (model, getattr(getattr(model, "base_model", None), "model", None)):
        if m is not None and "_turbotune_source" in m.__dict__:
            return m.__dict__["_turbotune_source"]
    return None


IGNORED_KEY = "_turbotune_fsdp_ignored"
"""``model.__dict__`` key of a set of parameters FSDP2 must leave alone (the expert-parallel
plugin records the expert shards there)."""


def _ignored_of(model: nn.Module) -> set[nn.Parameter]:
    ignored: set[nn.Parameter] = set()
    for m in (model, getattr(getattr(model, "base_model", None), "model", None)):
        if m is not None:
            ignored |= set(m.__dict__.get(IGNORED_KEY, ()))
    return ignored


def shard_model(
    model: nn.Module,
    config: DistributedConfig,
    plan: PrecisionPlan,
    *,
    backend: str = "auto",
    seed: int = 42,
) -> nn.Module:
    """Shard ``model`` with FSDP2 and, after low-memory loading, fill its shards.

    Args:
        model: adapters attached, patches applied; real or on the meta device. Parameters in
            its ``_turbotune_fsdp_ignored`` set (expert parallelism) stay out of FSDP2.
        config: the ``distributed`` section.
        plan: the precision plan (its autocast dtype sets the mixed-precision policy).
        backend: turbotune backend name (``cuda``/``cpu``/``auto``).
        seed: the run's seed (adapters created on the meta device are drawn with it).

    Returns:
        The same model, sharded.
    """
    from turbotune.distributed.env import build_mesh, device_for, init_distributed
    from turbotune.distributed.memory import memory_report
    from turbotune.distributed.shard import apply_fsdp

    info = init_distributed(backend)
    device = device_for(info, backend)
    mesh = build_mesh(config.strategy, info, device, config.shard_size)
    source = _source_of(model)
    if source is None:
        model.to(device if not config.cpu_offload else "cpu")
    apply_fsdp(model, config, plan, mesh, ignored_params=_ignored_of(model) or None)
    if source is not None:
        store = torch.device("cpu") if config.cpu_offload else device
        stats = materialize_tied(model, source, store, seed=seed)
        stats.update(memory_report())
        model.__dict__["_turbotune_load_stats"] = stats
        if info.is_main:
            gpu = f", GPU peak {stats['gpu_peak_gib']:.2f} GiB" if "gpu_peak_gib" in stats else ""
            print(
                f"low-memory loading: {stats['tensors']} tensors in {stats['seconds']:.1f}s; "
                f"host peak {stats['host_peak_gib']:.2f} GiB{gpu}",
                file=sys.stderr,
            )
    return model


def plan_from_args(args: Any, weight_dtype: torch.dtype = torch.float32) -> PrecisionPlan:
    """The precision plan a ``TrainingArguments`` implies (its ``bf16``/``fp16`` mean autocast)."""
    from turbotune.precision import PrecisionPlan

    autocast = torch.bfloat16 if getattr(args, "bf16", False) else None
    autocast = torch.float16 if getattr(args, "fp16", False) else autocast
    return PrecisionPlan("from-args", weight_dtype, autocast, False)


def describe(config: DistributedConfig) -> str:
    parts = [config.strategy]
    for flag in ("cpu_offload", "activation_checkpointing", "activation_offload",
                 "low_memory_loading"):  # fmt: skip
        if getattr(config, flag):
            parts.append(flag)
    return " ".join(parts)
