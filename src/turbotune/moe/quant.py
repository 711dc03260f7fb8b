"""NF4 storage for stacked expert weights (QLoRA on MoE models).

Design note. transformers 5 stores a family's experts as 3-D ``nn.Parameter`` stacks, and its
bitsandbytes integration only swaps ``nn.Linear`` modules for ``Linear4bit``: a "4-bit" Mixtral
keeps its experts — nearly all of its weights — dense (checked in transformers 5.23,
``replace_with_bnb_linear`` / ``param_needs_quantization``). :func:`quantize_experts` quantizes
those stacks with bitsandbytes' own ``quantize_4bit`` (a 3-D tensor is quantized as its flat
row-major sequence, so blocks never straddle anything the kernels care about) and replaces each
parameter by an :class:`NF4ExpertStack`. The patched experts forward dequantizes a stack with the
Triton kernel of :mod:`turbotune.ops.nf4` for the forward product and again in backward (see
:mod:`turbotune.moe.expert_gemm`); the stacks are frozen, as QLoRA's base weights are.
A model with quantized stacks needs the ``moe`` patch: transformers' own experts forward cannot
read them.

Expert LoRA on NF4 stacks. peft's ``target_parameters`` LoRA (``ParamWrapper``) adds its delta
by parametrizing the stack *parameter* during each forward, which a quantized stack is not.
peft builds its adapters on the dense parameter (the quantization runs after the adapters), then
:func:`quantize_experts` quantizes the wrapped stacks too, records each wrapper on its experts
module and lets the outermost wrapper call the experts module directly
(:mod:`turbotune.moe.peft_experts`); the patched experts forward reads the active adapter's
factors from the wrapper and runs them as grouped rank-r products beside the NF4 base product.
Merging such an adapter into NF4 stacks is not supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from turbotune.moe.peft_experts import lora_wrappers, reroute
from turbotune.ops.nf4 import dequantize_nf4
from turbotune.patches.engine import family_of


class NF4ExpertStack(nn.Module):
    """An ``[E, N, K]`` expert stack in bitsandbytes 4-bit storage.

    Attributes:
        packed: the packed nibbles (a buffer, so it follows ``model.to(device)``).
        quant_state: bitsandbytes' ``QuantState`` (scales, code table, nested statistics).
        shape: the dense shape; ``dtype``: the dense dtype it was quantized from.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
    ) -> None:
        super().__init__()
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(
            weight.detach().contiguous(), blocksize=blocksize,
            compress_statistics=compress_statistics, quant_type=quant_type,
        )  # fmt: skip
        self.register_buffer("packed", packed)
        self.quant_state = state
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[E, N, K]`` stack in ``dtype`` (default: the original dtype)."""
        return dequantize_nf4(self.packed, self.quant_state, dtype or self.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> NF4ExpertStack:
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed.device)  # bitsandbytes moves the state in place
        return self

    def extra_repr(self) -> str:
        return f"shape={self.shape}, quant_type={self.quant_state.quant_type}"


def _bnb_settings(model: nn.Module) -> dict[str, Any]:
    """Quantization settings of the model's bitsandbytes config, when it has one."""
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    get = q.get if isinstance(q, dict) else (lambda k, d: getattr(q, k, d))
    return {
        "quant_type": get("bnb_4bit_quant_type", "nf4") or "nf4",
        "compress_statistics": bool(get("bnb_4bit_use_double_quant", True)),
    }


def quantize_experts(model: nn.Module, **settings: Any) -> int:
    """Replace every frozen expert stack of ``model`` by an :class:`NF4ExpertStack`.

    Stacks that train (full fine-tuning) stay dense. Stacks with peft ``target_parameters``
    LoRA are quantized and their adapters rerouted (see the module note).

    Args:
        model: a model of a family with ``experts`` in the patch table.
        settings: :class:`NF4ExpertStack` keywords; default: the model's bitsandbytes config.

    Returns:
        the number of stacks quantized.
    """
    _, fam = family_of(model)
    settings = {**_bnb_settings(model), **settings}
    wrappers = lora_wrappers(model)
    # Parameters kept out of FSDP2 (expert-parallel shards): a quantized stack is no parameter.
    ignored = model.__dict__.get("_turbotune_fsdp_ignored")
    done = 0
    for module in list(model.modules()):
        if type(module).__name__ not in fam.experts:
            continue
        for name in ("gate_up_proj", "down_proj"):
            param = module._parameters.get(name)
            if param is None or param.requires_grad:
                continue
            del module._parameters[name]
            setattr(module, name, NF4ExpertStack(param.data, **settings))
            if ignored is not None:
                ignored.discard(param)
            done += 1
        if id(module) in wrappers:
            reroute(module, wrappers[id(module)])
    return done
