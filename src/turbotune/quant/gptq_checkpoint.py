"""GPTQ checkpoints in the standard layout: written from a quantization, read into GPTQLinear.

Design note. The checkpoint is what AutoGPTQ / GPTQModel / optimum write (``checkpoint_format:
gptq``, the v1 layout of :mod:`turbotune.quant.gptq_format`): safetensors shards in which each
quantized linear ``name`` is stored as ``name.qweight/.qzeros/.scales/.g_idx`` (plus
``name.bias``), everything else as dense fp16 tensors; ``config.json`` carries a
``quantization_config`` (``quant_method: gptq``, bits, group_size, desc_act, sym, ...) and
``quantize_config.json`` repeats it for older readers.

Loading needs neither optimum nor gptqmodel: the model is built from its config with
parameters on the meta device (buffers such as rotary frequencies are real, computed as usual),
every module whose ``.qweight`` is in the files becomes a
:class:`turbotune.quant.gptq_linear.GPTQLinear`, and the dense tensors are assigned as they
are read. Which linears are quantized is read from the files, not guessed from the config, so
checkpoints that keep some linears dense load too. ``quantization_config`` is removed from the
live config (transformers would otherwise look for a GPTQ backend when saving or moving the
model) and kept as ``model.gptq_config``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from turbotune.errors import TurbotuneError
from turbotune.quant.gptq_format import default_g_idx, pack_gptq

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from turbotune.quant.gptq_model import QuantizationResult

__all__ = [
    "dequantize_gptq_model",
    "gptq_quantization_config",
    "load_gptq_model",
    "read_gptq_config",
    "save_gptq",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def gptq_quantization_config(result: QuantizationResult) -> dict[str, Any]:
    """The ``quantization_config`` dict of a quantization (the fields optimum/GPTQModel read)."""
    spec = result.spec
    config: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": spec.desc_act,
        "sym": spec.sym,
        "damp_percent": spec.percdamp,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "model_file_base_name": "model",
    }
    if result.skipped:  # readers that build layers from the config must know what is dense
        blocks = sorted({n.split(".", 3)[-1] for n in result.weights if n.count(".") >= 3})
        config["modules_in_block_to_quantize"] = [blocks]
    return config


def _checkpoint_tensors(
    model: nn.Module, result: QuantizationResult, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every tensor to save: packed quantized linears, the rest dense in ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, q in result.weights.items():
        packed = pack_gptq(q.codes, q.zeros, q.scales, q.g_idx, q.bits)
        for suffix, tensor in zip(QUANT_SUFFIXES, packed):
            tensors[f"{name}.{suffix}"] = tensor.contiguous()
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in result.weights and key.endswith(".weight"):
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:  # a tied weight (lm_head = embeddings): saved once, as transformers does
            continue
        seen.add(ptr)
        tensors[key] = (value.to(dtype) if value.is_floating_point() else value).contiguous().cpu()
    return tensors


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_gptq(
    model: PreTrainedModel,
    result: QuantizationResult,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write ``model`` quantized by :func:`turbotune.quant.gptq_model.quantize_model` as a GPTQ
    checkpoint (safetensors shards, ``config.json`` with ``quantization_config``,
    ``quantize_config.json``, the generation config when the model has one).

    Args:
        model: the model after ``quantize_model`` (its dense tensors are saved in ``dtype``).
        result: what ``quantize_model`` returned.
        out_dir: the folder (created).
        dtype: dtype of the dense tensors (fp16, as the ecosystem expects).
        max_shard_bytes: the size at which a new shard starts.

    Returns:
        The folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(_checkpoint_tensors(model, result, dtype), out, max_shard_bytes)
    quant = gptq_quantization_config(result)
    config = copy.deepcopy(model.config)
    config.quantization_config = quant
    config.dtype = dtype
    config.save_pretrained(str(out))
    (out / "quantize_config.json").write_text(json.dumps(quant, indent=2) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(out))
    return out


# --- loading ------------------------------------------------------------------------------------


def read_gptq_config(path: str | Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a GPTQ checkpoint folder, or None when it is not one."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    quant = json.loads(config_file.read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "gptq":
        return None
    return quant


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise TurbotuneError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (safetensors only)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors


def _check_format(path: Path, quant: dict[str, Any]) -> int:
    fmt = quant.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise TurbotuneError(
            f"{path}: GPTQ checkpoint_format '{fmt}' is not supported (only 'gptq', the v1 layout)"
        )
    bits = int(quant.get("bits", 4))
    if bits not in (2, 3, 4, 8):
        raise TurbotuneError(f"{path}: GPTQ bits {bits} not supported (2, 3, 4 or 8)")
    return bits


def load_gptq_model(
    path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """A causal LM from a GPTQ checkpoint, its quantized linears as ``GPTQLinear``.

    Args:
        path: checkpoint folder (``config.json`` with a GPTQ ``quantization_config``,
            safetensors weights).
        dtype: compute dtype: dense tensors are cast to it, GPTQLinear dequantizes to it.
        device: where the model is placed.

    Raises:
        TurbotuneError: the folder is not a GPTQ checkpoint of a supported format.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    quant = read_gptq_config(path)
    if quant is None:
        raise TurbotuneError(f"{path}: config.json has no GPTQ quantization_config")
    bits = _check_format(path, quant)
    config = AutoConfig.from_pretrained(str(path))
    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors(path)
    quantized = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    group_size = int(quant.get("group_size", 128))
    for name in quantized:
        _swap_linear(model, name, tensors, (bits, group_size), dtype, device)
    _assign_dense(model, tensors, dtype, device)
    model.gptq_config = quant
    model.eval()
    return model


def _swap_linear(
    model: nn.Module,
    name: str,
    tensors: dict[str, torch.Tensor],
    layout: tuple[int, int],
    dtype: torch.dtype,
    device: str | torch.device,
) -> None:
    """Replace the ``nn.Linear`` ``name`` by a GPTQLinear of its checkpoint tensors (popped)."""
    from turbotune.quant.gptq_linear import GPTQLinear

    parent, _, child = name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    old = getattr(holder, child)
    if not isinstance(old, nn.Linear):
        raise TurbotuneError(f"checkpoint quantizes '{name}', which is a {type(old).__name__}")
    bits, group_size = layout
    parts = [tensors.pop(f"{name}.{s}", None) for s in QUANT_SUFFIXES]
    if parts[3] is None:  # some older checkpoints without act-order omit g_idx
        parts[3] = default_g_idx(parts[0].shape[0] * 32 // bits, group_size)
    parts = [t.to(device) for t in parts]
    bias = tensors.pop(f"{name}.bias", None)
    layer = GPTQLinear.from_tensors(
        *parts,
        bits,
        bias=None if bias is None else bias.to(device, dtype),
        group_size=group_size,
    )
    setattr(holder, child, layer)


def _assign_dense(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: str | torch.device,
) -> None:
    """Load the dense tensors (assigned, not copied: the parameters are on meta) and tie."""
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in tensors.items()
    }
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise TurbotuneError(f"checkpoint tensors the model does not have: {unexpected[:5]}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise TurbotuneError(f"checkpoint lacks tensors of the model: {still_meta[:5]}")
    model.to(device)  # computed buffers (rotary frequencies) follow the weights


@torch.no_grad()
def dequantize_gptq_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every GPTQLinear of ``model`` by an ``nn.Linear`` holding its dequantized weight
    in ``dtype``, in place (merging adapters, or a dense reference of the same weights)."""
    from turbotune.quant.gptq_linear import GPTQLinear

    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, GPTQLinear)]
    for name, layer in swaps:
        weight = layer.dequantize(dtype)
        dense = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None,
            device=weight.device, dtype=dtype,
        )  # fmt: skip
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
        dense.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    return model
