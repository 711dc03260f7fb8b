"""Stream a safetensors checkpoint into a model whose linears are HQQ-quantized as they arrive.

Design note. ``from_pretrained`` on the CPU followed by :func:`~turbotune.quant.hqq_linear.
quantize_linears` holds the whole dense model in host memory (140 GB for a 70B model). Here the
model is built on the meta device and the checkpoint is read one tensor at a time: a linear's
weight goes to the device and is quantized there at once (its dense copy dropped), every other
tensor goes to the device in the compute dtype. Peak host memory is one tensor; peak device
memory is the quantized model plus one dense weight.

This path only takes checkpoints it can load exactly: a local directory of ``*.safetensors``
whose tensor names are the model's parameter names (tied weights stored once). Anything else —
renamed or converted keys (transformers' checkpoint conversions, e.g. fused MoE experts), stored
buffers, GGUF, hub ids — returns ``None`` and the caller takes the ``from_pretrained`` path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from turbotune.quant.hqq_linear import HQQLinear, quantizable_linears

__all__ = ["stream_hqq_checkpoint"]


def _checkpoint_keys(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    keys: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), file))
    return keys


def _empty_model(path: str, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    model.tie_weights()
    return model


def stream_hqq_checkpoint(
    path: str,
    *,
    compute_dtype: torch.dtype,
    device: torch.device,
    make_layer: Callable[[torch.Tensor, torch.Tensor | None], HQQLinear],
    skip_modules: tuple[str, ...],
    attn_implementation: str = "sdpa",
    progress: bool = False,
) -> nn.Module | None:
    """The causal LM of checkpoint ``path`` with its linears quantized on ``device``, or ``None``
    when the checkpoint is not one this path loads exactly (see the module docstring).

    Args:
        path: a local checkpoint directory.
        compute_dtype: dtype of every tensor that is not quantized.
        device: where the model is built.
        make_layer: ``(weight on device, bias or None) -> HQQLinear``.
        skip_modules: linears left dense (names, dotted suffixes or enclosing modules); the output
            embedding layer always is.
        attn_implementation: transformers attention implementation.
        progress: show a progress bar over the tensors.
    """
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files or not (folder / "config.json").is_file():
        return None
    keys = _checkpoint_keys(files)
    model = _empty_model(path, compute_dtype, attn_implementation)
    params = dict(model.named_parameters())  # tied weights appear once
    if set(keys) != set(params):
        return None
    quantized = set(quantizable_linears(model, skip_modules))
    _fill(model, keys, quantized, compute_dtype, device, make_layer, progress)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # cannot happen when the names matched; a loud error beats a silent meta tensor
        raise RuntimeError(f"{path}: parameters not loaded: {left[:4]}")
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buf.to(device)
    _finish(model, path)
    return model


def _fill(
    model: nn.Module,
    keys: dict[str, Path],
    quantized: set[str],
    dtype: torch.dtype,
    device: torch.device,
    make_layer: Callable[..., HQQLinear],
    progress: bool,
) -> None:
    """Read every tensor once, in file order; quantize the weights of ``quantized`` linears."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    bar = tqdm(total=len(keys), desc="HQQ loading", unit="tensor", disable=not progress)
    for file in dict.fromkeys(keys.values()):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                owner, _, leaf = key.rpartition(".")
                tensor = f.get_tensor(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                _place(model, owner, leaf, tensor.to(device), owner in quantized, make_layer)
                del tensor
                bar.update(1)
    bar.close()


def _place(
    model: nn.Module,
    owner: str,
    leaf: str,
    tensor: torch.Tensor,
    quantize: bool,
    make_layer: Callable[..., HQQLinear],
) -> None:
    module = model.get_submodule(owner)
    if quantize and leaf == "weight":
        bias = module.bias if isinstance(module, nn.Linear) else None
        bias = None if bias is None or bias.is_meta else bias.detach()
        layer = make_layer(tensor, bias)  # a bias stored after the weight is set below
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        return
    if isinstance(module, HQQLinear) and leaf == "bias":
        module.bias = nn.Parameter(tensor.to(module.compute_dtype), requires_grad=False)
        return
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _finish(model: nn.Module, path: str) -> None:
    """What ``from_pretrained`` leaves on a loaded model: eval mode, its generation config."""
    from transformers import GenerationConfig

    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config._name_or_path = path
    model.eval()
