"""Training a Llama-Pro expanded model: only the blocks ``turbotune expand`` added learn.

Design note. The expanded checkpoint records its new block indices in ``config.json``
(``turbotune.llama_pro.new_layers``, see :mod:`turbotune.expand`). :func:`apply_llama_pro`
freezes every parameter and unfreezes the floating parameters of those blocks. The old blocks
may be quantized (``bnb_llama_pro``): the loader must then keep the new blocks in the compute
dtype (:func:`new_block_modules` gives the names for bitsandbytes' skip list), and a new block
that arrives quantized is an error, because it could not train.

Saving writes a *full* checkpoint that loads with ``from_pretrained``: the expanded checkpoint
the model was loaded from, copied shard by shard, with the new blocks' tensors replaced by the
trained ones (cast to the stored dtype). The old blocks are frozen, so their stored values are
already the trained model's; and a 4-bit base would otherwise save 4-bit old blocks.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from turbotune.adapters.lora import _is_quantized
from turbotune.errors import ConfigError
from turbotune.expand import new_layers_of

__all__ = [
    "apply_llama_pro",
    "is_llama_pro_model",
    "llama_pro_state_dict",
    "load_llama_pro",
    "new_block_modules",
    "save_llama_pro",
]


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the decoder blocks (``model.layers`` in transformers)."""
    from turbotune.blocks import decoder_layer_list

    found = decoder_layer_list(model)
    if found is None:
        raise ConfigError("adapter.method llama_pro: the model has no list of decoder layers")
    return found


def new_block_modules(config: Any) -> list[str]:
    """Module names of the new blocks of an expanded checkpoint (``model.layers.5``, ...), for a
    quantizer's skip list; ``config``: a transformers config, a ``config.json`` dict, or a
    checkpoint directory. ``[]`` for a model that was not expanded."""
    if isinstance(config, (str, Path)):
        path = Path(config) / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
    return [f"model.layers.{i}" for i in new_layers_of(config)]


def _is_quantized_param(param: torch.Tensor) -> bool:
    return not param.is_floating_point() or hasattr(param, "quant_state")


def _quantized_parts(block: nn.Module) -> list[str]:
    """Names of the quantized layers (bnb 4-bit, GPTQ, HQQ) or weights inside ``block``."""
    parts = [n for n, m in block.named_modules() if _is_quantized(m)]
    return parts + [n for n, p in block.named_parameters() if _is_quantized_param(p)]


def apply_llama_pro(model: nn.Module) -> nn.Module:
    """Freeze ``model`` except its new blocks, in place; the model saves as a full checkpoint.

    Args:
        model: a transformers causal LM loaded from a ``turbotune expand`` checkpoint.

    Returns:
        The same model.

    Raises:
        ConfigError: the model records no new blocks, or a new block holds quantized weights.
    """
    new = new_layers_of(model.config)
    if not new:
        raise ConfigError(
            "adapter.method llama_pro needs a checkpoint made by `turbotune expand` "
            f"(config.json has no '{'turbotune.llama_pro.new_layers'}')"
        )
    name, layers = _decoder_layers(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for i in new:
        quantized = _quantized_parts(layers[i])
        if quantized:
            raise ConfigError(
                f"new block {name}.{i} holds quantized weights ({quantized[0]}); keep new blocks "
                "out of quantization (the bnb loader skips them for expanded checkpoints; see "
                "turbotune.adapters.llama_pro.new_block_modules)"
            )
        for param in layers[i].parameters():
            param.requires_grad_(True)
    model.__dict__["_turbotune_llama_pro"] = {"layers": name, "new": new}
    if getattr(model, "is_quantized", False):
        # The Trainer refuses a quantized model without adapters; the new blocks are ours.
        model._hf_peft_config_loaded = True
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    return model


def is_llama_pro_model(model: nn.Module) -> bool:
    return "_turbotune_llama_pro" in model.__dict__


def llama_pro_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The new blocks' parameters by checkpoint key, on the CPU (FSDP2 shards gathered)."""
    prefixes = _new_prefixes(model)
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    out = {}
    for key, tensor in source.items():
        if key.startswith(prefixes):
            tensor = tensor.detach()
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            out[key] = tensor.to("cpu")
    return out


def save_llama_pro(
    model: nn.Module, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the trained expanded model: the source checkpoint with the new blocks replaced."""
    from safetensors.torch import load_file, save_file

    src = Path(model.config.name_or_path)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"llama_pro save: the source checkpoint {src} is not a directory")
    trained = llama_pro_state_dict(model, state_dict)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for path in sorted(src.iterdir()):
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
            for key in tensors.keys() & trained.keys():
                tensors[key] = trained[key].to(tensors[key].dtype).contiguous()
                written.add(key)
            save_file(tensors, str(out / path.name), metadata={"format": "pt"})
        elif path.is_file():
            shutil.copy2(path, out / path.name)
    missing = trained.keys() - written
    if missing:
        raise RuntimeError(f"llama_pro save: {sorted(missing)[:3]} not in the source checkpoint")
    return out


def load_llama_pro(model: nn.Module, checkpoint_dir: str | Path) -> None:
    """Copy the new blocks' tensors of a saved checkpoint into ``model`` (resuming).

    Only the new blocks are read, so this works when the old blocks are 4-bit in the model and
    dense in the file (where ``load_state_dict`` of the whole file cannot). FSDP2: every rank
    calls it and keeps its shard.
    """
    from safetensors import safe_open

    params = llama_pro_params(model)
    found = set()
    for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f, torch.no_grad():
            for key in params.keys() & set(f.keys()):
                param, value = params[key], f.get_tensor(key)
                if hasattr(param, "device_mesh"):  # FSDP2 DTensor: keep this rank's shard
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(
                        value.to(param.device), param.device_mesh, param.placements
                    )
                param.copy_(value.to(param.dtype))
                found.add(key)
    missing = params.keys() - found
    if missing:
        raise ValueError(f"{checkpoint_dir}: no saved value for {sorted(missing)[:3]}")


def llama_pro_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The new blocks' parameters by checkpoint key."""
    prefixes = _new_prefixes(model)
    return {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}


def _new_prefixes(model: nn.Module) -> tuple[str, ...]:
    record = model.__dict__["_turbotune_llama_pro"]
    return tuple(f"{record['layers']}.{i}." for i in record["new"])


def _save_pretrained(
    self: nn.Module,
    save_directory: str,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    **_: Any,
) -> None:
    """``save_pretrained`` of a Llama-Pro model (what ``Trainer.save_model`` calls)."""
    trained = llama_pro_state_dict(self, state_dict)  # collective under FSDP: every rank
    if is_main_process:
        save_llama_pro(self, save_directory, trained)
