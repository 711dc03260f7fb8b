"""Low-memory loading: a meta-device model whose FSDP2 shards are filled one tensor at a time.

Design note. Loading a 70B checkpoint the ordinary way needs the whole model in host memory
on every process (140 GB in bf16, times the processes of a node). Here:

1. :func:`build_meta_model` builds the model from its config with parameters on the ``meta``
   device (buffers such as RoPE frequencies stay real: they are computed, not loaded) and swaps
   the target linears for :class:`~turbotune.distributed.nf4.NF4Linear` (also on meta).
2. Adapters are attached and patches applied as usual (they are on meta too), then
   :func:`~turbotune.distributed.shard.apply_fsdp` shards the meta model.
3. :func:`materialize` allocates each process's shards (``to_empty``), then for every parameter
   reads the one tensor it needs from the checkpoint (``safetensors`` memory map: host memory
   near one tensor), moves it to the GPU, quantizes it there when it is a 4-bit target, and
   copies this process's slice into its shard. GPU memory stays near this process's share of
   the model plus one dense tensor. Every process reads the tensor it needs itself (the page
   cache serves the node once), so no process waits on another.
4. Adapters are initialized after materialization with the run's seed, in model order and
   with the RNG draws of :class:`~turbotune.adapters.lora.LoRALinear`, so a low-memory run
   starts from the very adapters of an ordinary run (and every process agrees on them).

A :class:`RandomSource` stands in for a checkpoint: it draws each tensor on the GPU from a
per-name seed, which creates a random-weight model of any size directly in 4-bit (the 70B
benchmark) through the same path.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from turbotune.distributed.nf4 import NF4Linear, quantize_4bit

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "RandomSource",
    "SafetensorsSource",
    "TensorSource",
    "build_meta_model",
    "checkpoint_key",
    "materialize",
]


class TensorSource(Protocol):
    """Where the values of a model's tensors come from, one tensor at a time."""

    def get(self, key: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The full tensor of checkpoint ``key`` (expected ``shape``) on ``device``."""
        ...


class SafetensorsSource:
    """A Hugging Face checkpoint folder (``*.safetensors``, sharded or not), read lazily.

    Args:
        path: the model folder.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.path / f for k, f in weight_map.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))
        if not self.files:
            raise FileNotFoundError(f"no safetensors weights in {self.path}")

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.files:
            raise KeyError(f"{key} is not in the checkpoint {self.path}")
        with safe_open(str(self.files[key]), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(key)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)}, model {tuple(shape)}")
        return tensor.to(device)


class RandomSource:
    """Random weights drawn on the device, the same on every process (seeded by name).

    Args:
        seed: base seed.
        std: standard deviation of matrices (vectors such as norm weights are ones).
        dtype: dtype the values are drawn in (bf16 halves the transient of a 70B matrix).
    """

    def __init__(self, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32):
        self.seed, self.std, self.dtype = seed, std, dtype

    def get(self, key: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, device=device)
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
        return torch.randn(shape, generator=gen, device=device, dtype=self.dtype).mul_(self.std)


# --- building ------------------------------------------------------------------------------------


def _is_skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith(f".{s}") or name.startswith(f"{s}.") for s in skip)


def build_meta_model(
    config: PretrainedConfig,
    dtype: torch.dtype,
    *,
    quantize: bool = False,
    compute_dtype: torch.dtype = torch.bfloat16,
    storage_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    quant_type: str = "nf4",
    skip_modules: list[str] | None = None,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A causal LM with every parameter on the meta device (buffers real), ready to shard.

    Args:
        config: the model's ``transformers`` config.
        dtype: dtype of the dense parameters.
        quantize: swap every linear but the skipped ones (and the LM head) for ``NF4Linear``.
        compute_dtype: 4-bit layers' compute dtype.
        storage_dtype: 4-bit storage dtype (FSDP2's gather dtype, see ``shard.storage_dtype_for``).
        double_quant: nested scales.
        quant_type: ``"nf4"`` or ``"fp4"``.
        skip_modules: module names kept dense (``lm_head`` always is).
        attn_implementation: transformers attention implementation.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config._attn_implementation = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config leaves a tied head as its own (meta) parameter
    model.requires_grad_(False)
    if quantize:
        skip = [*(skip_modules or []), "lm_head"]
        head = model.get_output_embeddings()
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and module is not head and not _is_skipped(name, skip):
                parent, _, child = name.rpartition(".")
                layer = NF4Linear(
                    module.in_features, module.out_features, module.bias is not None,
                    compute_dtype=compute_dtype, storage_dtype=storage_dtype,
                    double_quant=double_quant, quant_type=quant_type, device="meta",
                )  # fmt: skip
                setattr(model.get_submodule(parent) if parent else model, child, layer)
    model.__dict__["_turbotune_meta"] = True
    return model


def checkpoint_key(name: str) -> str:
    """The checkpoint key of a parameter of the (adapter-wrapped) model.

    ``base_model.model.model.layers.0.mlp.up_proj.base_layer.packed`` ->
    ``model.layers.0.mlp.up_proj.weight``.
    """
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    name = name.replace(".base_layer.", ".")
    if name.endswith(".packed"):
        name = name[: -len(".packed")] + ".weight"
    return name


# --- materializing -------------------------------------------------------------------------------


def _local_chunk(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This process's slice of ``full`` for a (possibly DTensor) parameter."""
    if not hasattr(param, "device_mesh"):
        return full
    mesh = param.device_mesh
    for dim, placement in enumerate(param.placements):
        if placement.is_shard():
            chunks = torch.chunk(full, mesh.size(dim), dim=placement.dim)
            coord = mesh.get_local_rank(dim)
            if coord < len(chunks):
                full = chunks[coord]
            else:
                full = full.new_empty((0, *full.shape[1:]))
    return full


def _write(param: torch.Tensor, full: torch.Tensor) -> None:
    local = param.to_local() if hasattr(param, "to_local") else param
    chunk = _local_chunk(full, param)
    if local.shape != chunk.shape:
        raise RuntimeError(f"shard shape {tuple(local.shape)} != slice shape {tuple(chunk.shape)}")
    with torch.no_grad():
        local.copy_(chunk)


def _snapshot(model: nn.Module) -> tuple[set[str], dict[str, torch.Tensor]]:
    """Names of the meta parameters, and copies of every real parameter/buffer (to restore)."""
    meta, keep = set(), {}
    for name, p in model.named_parameters():
        if p.is_meta:
            meta.add(name)
        else:
            local = p.to_local() if hasattr(p, "to_local") else p
            keep[name] = local.detach().clone()
    for name, b in model.named_buffers():
        keep[name] = b.detach().clone()
    return meta, keep


def _restore(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, value in keep.items():
            t = tensors[name]
            local = t.to_local() if hasattr(t, "to_local") else t
            local.copy_(value)


def _load_param(
    name: str, param: torch.Tensor, owner: nn.Module, source: TensorSource, device: torch.device
) -> None:
    key = checkpoint_key(name)
    if isinstance(owner, NF4Linear) and name.endswith(".packed"):
        lay = owner.layout
        dense = source.get(key, lay.shape, device)
        packed, layout = quantize_4bit(
            dense, param.dtype, blocksize=lay.blocksize, double_quant=lay.nested,
            quant_type=lay.quant_type,
        )  # fmt: skip
        del dense
        if layout != lay:
            raise RuntimeError(f"{name}: quantized layout {layout} != {lay}")
        _write(param, packed)
        return
    full = source.get(key, tuple(param.shape), device).to(param.dtype)
    _write(param, full)


def _init_adapters(model: nn.Module, seed: int) -> int:
    """Initialize meta-created custom LoRA adapters as an ordinary run would; returns a count."""
    from turbotune.adapters.lora import ADAPTER, LoRALinear

    torch.manual_seed(seed)
    count = 0
    for module in model.modules():
        if not isinstance(module, LoRALinear):
            continue
        probe = _Probe(module.in_features, module.out_features, module.base_layer)
        a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
        fresh = LoRALinear(probe, module.rank, 1.0, 0.0, dtype=a.dtype)
        _write(a, fresh.lora_A[ADAPTER].weight.detach().to(a.device))
        _write(b, fresh.lora_B[ADAPTER].weight.detach().to(b.device))
        count += 1
    return count


class _Probe(nn.Module):
    """A stand-in base layer on the CPU: LoRALinear draws its adapters exactly as for ``base``."""

    def __init__(self, in_features: int, out_features: int, base: nn.Module):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = getattr(base, "compute_dtype", None)
        weight = getattr(base, "weight", None)
        dtype = self.compute_dtype or (weight.dtype if weight is not None else torch.float32)
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)
        if isinstance(base, NF4Linear):
            self.dequantize = base.dequantize  # a quantized base: LoRALinear's dtype rule

    def forward(self, x):  # pragma: no cover - never called
        raise NotImplementedError


def materialize(
    model: nn.Module, source: TensorSource, device: torch.device, *, seed: int = 42
) -> dict[str, Any]:
    """Allocate the (sharded) meta parameters on ``device`` and fill them from ``source``.

    Args:
        model: a model built by :func:`build_meta_model` (adapters attached), usually sharded.
        source: the checkpoint (:class:`SafetensorsSource`) or :class:`RandomSource`.
        device: where the shards live (the CPU with FSDP2 CPU offload).
        seed: the run's seed, for the adapters created on meta.

    Returns:
        ``{"tensors": loaded count, "adapters": initialized count, "seconds": wall time}``.
    """
    import time

    start = time.perf_counter()
    meta, keep = _snapshot(model)
    model.to_empty(device=device)
    _restore(model, keep)
    owners = dict(model.named_modules())
    work = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
    )
    loaded = 0
    adapters = {n for n in meta if "lora_" in n}
    for name, param in model.named_parameters():
        if name not in meta or name in adapters:
            continue
        owner = owners[name.rpartition(".")[0]]
        _load_param(name, param, owner, source, work)
        loaded += 1
    count = _init_adapters(model, seed) if adapters else 0
    model.__dict__.pop("_turbotune_meta", None)
    return {"tensors": loaded, "adapters": count, "seconds": time.perf_counter() - start}


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of this process's parameter shards."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
