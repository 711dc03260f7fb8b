"""The MLX model of a run: load a Hugging Face checkpoint, quantize the base, add LoRA layers.

Loading goes through ``mlx_lm.utils.load_model``, which reads ``config.json`` and the
safetensors of a Hugging Face checkpoint directory into mlx-lm's model of that architecture;
its parameter paths are the transformers ones (``model.layers.0.self_attn.q_proj``) for the
Llama/Mistral/Qwen families, which is what lets the adapter be saved under peft's key names.

Quantization follows turbotune's bitsandbytes path: only the linear layers of the decoder are
quantized (``mlx.nn.quantize`` with a predicate); embeddings, norms and the modules in
``quantization.skip_modules`` (the LM head) stay in the compute dtype. A linear whose input
width is not a multiple of the group size cannot be quantized by MLX and is kept as is (listed).

LoRA layers are mlx-lm's ``LoRALinear`` (``y = W x + scale * (x A) B`` with ``A: (in, r)``,
``B: (r, out)``, ``B = 0`` at the start): the same function as peft's LoRA, whose matrices are
the transposes, ``lora_A.weight = A.T`` and ``lora_B.weight = B.T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from turbotune.errors import ConfigError, TurbotuneError

if TYPE_CHECKING:
    from turbotune.config import AdapterConfig, ModelConfig

__all__ = [
    "DTYPES",
    "LoRALinear",
    "QuantReport",
    "add_lora",
    "base_weights",
    "linear_paths",
    "load_mlx_model",
    "lora_scale",
    "quantize_base",
]

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_LINEAR = (nn.Linear, nn.QuantizedLinear)


def resolve_model_path(cfg: ModelConfig) -> Path:
    """A local checkpoint directory, or the hub snapshot of ``cfg.path`` (downloaded once)."""
    local = Path(cfg.path).expanduser()
    if local.is_dir():
        return local.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                cfg.path,
                revision=cfg.revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"],
            )
        )
    except Exception as err:
        raise TurbotuneError(f"model.path '{cfg.path}' is not a directory and could not be "
                             f"fetched from the Hugging Face hub: {err}") from None  # fmt: skip


def load_mlx_model(cfg: ModelConfig, dtype: str) -> tuple[nn.Module, Path]:
    """The mlx-lm model of a Hugging Face checkpoint, its floating weights cast to ``dtype``.

    Args:
        cfg: the ``model`` section (``path``, ``revision``, ``trust_remote_code``).
        dtype: ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        ``(model, path)``: the model and the absolute directory it was read from.
    """
    from mlx_lm.utils import load_model

    path = resolve_model_path(cfg)
    try:
        model, _ = load_model(path, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, FileNotFoundError) as err:
        raise TurbotuneError(f"MLX could not load the checkpoint at {path}: {err}") from None
    model.set_dtype(DTYPES[dtype])
    return model, path


@dataclass
class QuantReport:
    """Which linear layers were quantized, and which had to stay in the compute dtype."""

    quantized: list[str]
    kept: list[str]


def quantize_base(
    model: nn.Module, mode: str, bits: int, group_size: int, skip: list[str]
) -> QuantReport:
    """Quantize the model's linear layers in place with ``mlx.nn.quantize``.

    Args:
        model: an mlx-lm model without LoRA layers yet.
        mode: MLX quantization mode (``affine``, ``mxfp4``).
        bits: bits per weight.
        group_size: weights per scale (32, 64 or 128; ``mxfp4``: 32).
        skip: module names or path prefixes left unquantized (``lm_head``).
    """
    report = QuantReport([], [])

    def predicate(path: str, module: nn.Module) -> bool:
        if not isinstance(module, nn.Linear) or _matches(path, skip):
            return False
        if module.weight.shape[-1] % group_size:  # MLX groups run along the input dimension
            report.kept.append(path)
            return False
        report.quantized.append(path)
        return True

    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=predicate)
    if not report.quantized:
        raise ConfigError(
            f"no linear layer could be quantized in groups of {group_size} (input widths must "
            "be multiples of it); lower quantization.group_size or use quantization.method none"
        )
    return report


def _matches(path: str, names: list[str] | str) -> bool:
    """peft's rule: a target names the whole path or its last components."""
    if isinstance(names, str):
        names = [names]
    return any(path == n or path.endswith("." + n) for n in names)


def linear_paths(model: nn.Module) -> list[str]:
    """Paths of every linear layer but the LM head (peft's ``all-linear``)."""
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, _LINEAR) and path.rsplit(".", 1)[-1] != "lm_head"
    ]


def lora_scale(cfg: AdapterConfig) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (peft's scaling)."""
    return cfg.alpha / (cfg.r**0.5 if cfg.use_rslora else cfg.r)


def add_lora(model: nn.Module, cfg: AdapterConfig, compute_dtype: Any = None) -> list[str]:
    """Freeze the model and wrap its target linear layers in LoRA layers.

    Args:
        model: the (optionally quantized) mlx-lm model.
        cfg: the ``adapter`` section: ``r``, ``alpha``, ``dropout``, ``target_modules``,
            ``use_rslora``, ``weights_dtype``.
        compute_dtype: dtype of the adapter matrices when ``weights_dtype`` is ``compute``.

    Returns:
        The paths of the adapted layers, in model order.
    """
    candidates = linear_paths(model)
    if cfg.target_modules == "all-linear":
        targets = candidates
    else:
        targets = [p for p in candidates if _matches(p, cfg.target_modules)]
    if not targets:
        raise ConfigError(
            f"adapter.target_modules={cfg.target_modules!r} matches no linear layer; the model "
            f"has e.g. {sorted({p.rsplit('.', 1)[-1] for p in candidates})}"
        )
    model.freeze()
    modules = dict(model.named_modules())
    scale = lora_scale(cfg)
    wrapped = []
    for path in targets:
        layer = LoRALinear.from_base(modules[path], r=cfg.r, dropout=cfg.dropout, scale=scale)
        if cfg.weights_dtype == "compute" and compute_dtype is not None:
            layer.lora_a = layer.lora_a.astype(compute_dtype)
            layer.lora_b = layer.lora_b.astype(compute_dtype)
        wrapped.append((path, layer))
    model.update_modules(tree_unflatten(wrapped))
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def base_weights(model: nn.Module) -> dict[str, mx.array]:
    """The base model's weights under their checkpoint names, quantized layers dequantized.

    LoRA matrices are left out and a LoRA layer's base is named as the layer itself, so the
    result loads into the transformers model of the checkpoint (``load_state_dict``): this is
    the base on which a 4-bit run's adapter reproduces MLX's numbers in peft.
    """
    out: dict[str, mx.array] = {}
    quantized = {p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    for name, value in tree_flatten(model.parameters()):
        owner, _, leaf = name.rpartition(".")
        if leaf in ("lora_a", "lora_b") or (owner in quantized and leaf != "bias"):
            continue
        out[name.replace(".linear.", ".")] = value
    modules = dict(model.named_modules())
    for path in quantized:
        m = modules[path]
        weight = mx.dequantize(
            m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode
        )
        out[path.removesuffix(".linear") + ".weight"] = weight
    return out
