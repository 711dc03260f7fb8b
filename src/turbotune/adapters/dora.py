"""turbotune's own DoRA layer: weight-decomposed LoRA on any base ``dense_weight`` can read.

Design note (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024; peft's
``DoraLinearLayer`` and ``DoraLinearVariant``, peft 0.21). DoRA writes the adapted weight as a
trainable magnitude times a direction::

    W' = m * (W + s * B A) / ||W + s * B A||_row        m: [out], one entry per output row

so a layer computes, for input ``x`` (after dropout ``d(x)``), base output ``y0 = W x + bias``::

    k = m / ||W + s * B A||_row                      (the norm detached: paper section 4.3)
    y = y0 + (k - 1) * W d(x) + k * s * B A d(x)

:class:`DoRALinear` extends :class:`~turbotune.adapters.lora.LoRALinear` (same parameters, same
peft-shaped attributes, ``use_dora`` set) with ``lora_magnitude_vector[default].weight`` and
repeats peft's computation op for op, so its numbers are peft's:

* The norm is taken of the *dequantized* base weight plus the detached LoRA delta, in the
  dtype of the (cast) input, per output row, then detached. The base weight is read through
  :func:`turbotune.quant.weights.dense_weight` (dequantized in its own dtype first, as peft
  dequantizes, then cast), so bf16, bitsandbytes NF4 and any :class:`Dequantizable` base (GPTQ,
  HQQ) work alike.
* Without dropout (or in eval mode) ``W d(x)`` *is* the base output minus its bias: no second
  matmul. With dropout, peft recomputes ``W d(x)`` from the dequantized weight on the dropped
  input; so do we (the base output itself always sees the undropped input), through
  :class:`FrozenLinear`, which dequantizes again in backward instead of keeping the dense
  weight alive (peft's ``F.linear`` keeps it: same numbers, a dense weight per layer less).
* Scaling ``s`` multiplies the LoRA delta both in the norm and in the output (the reference
  fsdp_qlora DoRA dropped both scaling and dropout).
* The magnitude starts at the row norm of ``W + s B A`` computed as peft does at creation: with
  A and B in the base's dtype (B is zero, so it is the base's row norm in that dtype), then cast
  to the adapter dtype.
* Dtypes: a dense base adds the term in the promoted dtype and casts the sum back; a quantized
  base (4-bit, GPTQ, HQQ) casts the sum back only outside autocast (peft's bnb/hqq layers).

``B A`` is formed as ``B.weight @ A.weight`` (peft pushes an identity matrix through the two
linears, to stay clear of FSDP1 flat parameters; the product is the same, exactly, and an
``[in, in]`` identity of a 14336-wide projection is 0.8 GB). The fused LoRA ops do not cover
DoRA: :func:`turbotune.patches.forwards.projection_of` returns ``None`` for a layer with
``use_dora`` set, so patched models run this forward for these projections.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from turbotune.adapters.lora import ADAPTER, LoRALinear, base_compute_dtype
from turbotune.quant.weights import dense_weight

__all__ = [
    "DoRALinear",
    "DoRAMagnitude",
    "FrozenLinear",
    "dora_layers",
    "frozen_linear",
    "native_dtype",
]


class DoRAMagnitude(nn.Module):
    """Holds the magnitude vector as ``.weight`` (``[out_features]``), peft's parameter name."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)


def native_dtype(base: nn.Module) -> torch.dtype | None:
    """The dtype a base's weight dequantizes to by itself (bnb: what it was quantized from)."""
    weight = base._parameters.get("weight")
    if weight is None:
        weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    if state is not None and getattr(weight, "bnb_quantized", True):
        return state.dtype
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    dtype = getattr(base, "compute_dtype", None) or getattr(base, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _base_dense(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``[out, in]`` base weight in ``dtype``, dequantized in its native dtype first (as peft)."""
    native = native_dtype(base) or dtype
    return dense_weight(base, native).to(dtype)


class FrozenLinear(torch.autograd.Function):
    """``x @ W^T`` for a frozen (possibly quantized) base, re-reading ``W`` in backward.

    ``F.linear(x, W)`` would save the dense ``W`` for the input gradient: under dropout peft's
    DoRA keeps one dense copy of every adapted weight alive until backward (32 GB in fp32 for
    an 8B model). Here nothing is saved; ``grad_x = grad_y @ W`` dequantizes again.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base, ctx.x_dtype = base, x.dtype
        return F.linear(x, _base_dense(base, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Under autocast the forward ran in bf16: W in the gradient's dtype, as autograd would.
        weight = _base_dense(ctx.base, grad.dtype)
        return (grad @ weight).to(ctx.x_dtype), None


def frozen_linear(x: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """``[..., in] -> [..., out]``: the base's bias-free product, nothing saved for backward."""
    if not x.requires_grad:
        return F.linear(x, _base_dense(base, x.dtype))
    return FrozenLinear.apply(x, base)


class DoRALinear(LoRALinear):
    """A frozen linear layer (dense or quantized) with a DoRA update, computed as peft does.

    Args:
        base: the frozen layer: ``nn.Linear``, bitsandbytes ``Linear4bit``, or any module whose
            weight :func:`~turbotune.quant.weights.dense_weight` can read (``[out, in]``).
        r: rank.
        alpha: the delta is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the LoRA (and DoRA direction) input.
        use_rslora: rank-stabilised scaling.
        dtype: dtype of A, B and the magnitude; ``None`` keeps fp32.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(base, r, alpha, dropout, use_rslora=use_rslora, dtype=dtype)
        self.use_dora = {ADAPTER: True}
        self.lora_magnitude_vector = nn.ModuleDict(
            {ADAPTER: DoRAMagnitude(self._initial_magnitude(dtype or torch.float32))}
        )

    @torch.no_grad()
    def _initial_magnitude(self, dtype: torch.dtype) -> torch.Tensor:
        """Row norm of ``W + s B A`` with A, B in the base's dtype (peft's order), in ``dtype``."""
        a, b = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
        init_dtype = base_compute_dtype(self.base_layer) or a.dtype
        weight = _base_dense(self.base_layer, native_dtype(self.base_layer) or init_dtype)
        delta = b.to(init_dtype) @ a.to(init_dtype)
        total = weight.to(a.device) + self.scaling[ADAPTER] * delta
        return torch.linalg.norm(total, dim=1).to(total.dtype).to(dtype)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """Set the magnitude to its creation value for the current base and A, B (for loaders
        that create layers on the meta device and fill the base weight later)."""
        magnitude = self.lora_magnitude_vector[ADAPTER].weight
        magnitude.copy_(self._initial_magnitude(magnitude.dtype))

    def weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """``||W + s B A||`` per output row in ``dtype``, detached. Returns ``[out]``."""
        a, b = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
        with torch.no_grad():
            delta = (b @ a).to(dtype)
            total = _base_dense(self.base_layer, dtype) + self.scaling[ADAPTER] * delta
            return torch.linalg.norm(total, dim=1).to(total.dtype)

    def dora_term(self, x: torch.Tensor, base_result: torch.Tensor | None) -> torch.Tensor:
        """What DoRA adds to the base output.

        Args:
            x: ``[..., in]`` LoRA input (cast to the adapter dtype, dropout applied).
            base_result: ``[..., out]`` base output for the same ``x`` (bias included), or
                ``None`` to recompute ``W x`` from the dequantized weight (under dropout).

        Returns:
            ``[..., out]`` ``(k - 1) * W x + k * s * B A x`` with ``k = m / ||W + s B A||``.
        """
        lora_a, lora_b = self.lora_A[ADAPTER], self.lora_B[ADAPTER]
        scaling = self.scaling[ADAPTER]
        magnitude = self.lora_magnitude_vector[ADAPTER].weight
        scale = (magnitude / self.weight_norm(x.dtype)).view(1, -1)
        lora_result = lora_b(lora_a(x))
        if base_result is None:
            base_result = frozen_linear(x, self.base_layer)
        elif (bias := getattr(self.base_layer, "bias", None)) is not None:
            base_result = base_result - bias
        return (scale - 1) * base_result + scale * lora_result * scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + dora_term``; ``x``: ``[..., in]`` -> ``[..., out]``."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        dropout = self.lora_dropout[ADAPTER]
        adapter_dtype = self.lora_A[ADAPTER].weight.dtype
        # peft: a quantized base casts only outside autocast; a dense base always casts x and
        # casts the sum back.
        cast = not (self._quantized_base and torch.is_autocast_enabled())
        out_dtype = result.dtype
        if cast:
            x = x.to(adapter_dtype)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result
        else:
            x, base_result = dropout(x), None
        result = result + self.dora_term(x, base_result)
        return result.to(out_dtype) if cast else result

    def extra_repr(self) -> str:
        return "dora, " + super().extra_repr()


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    """The model's :class:`DoRALinear` layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}
