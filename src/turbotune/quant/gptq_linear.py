"""A frozen GPTQ-quantized linear layer for training adapters on top of it.

Design note. :class:`GPTQLinear` holds the four checkpoint tensors of ``quant.gptq_format``
under their checkpoint names, so a GPTQ checkpoint's state dict loads into it unchanged and its
state dict is a GPTQ checkpoint. The forward is ``ops.gptq.gptq_linear``: an autograd function
that saves only the packed storage and re-dequantizes in backward (the input gradient ``dy W``
is needed for adapters below this layer; ``W`` has no gradient). Compute follows the input's
dtype, bf16 or fp16 (or fp32): the fp16 ``scales`` are read as stored, nothing forces fp16.

The layer is itself a ``Dequantizable`` weight source (``quant.weights``): the fused LoRA ops
(``ops.lora``, through ``patches.forwards.projection_of``) and the custom LoRA adapters take it
as a frozen base like a bitsandbytes ``Linear4bit``, and ``dequantize(dtype, out=...)`` writes
straight into a block of a stacked q/k/v or gate/up buffer. ``weight`` is the packed ``qweight``
(device and ``requires_grad`` checks read it), ``shape`` the dense ``(out, in)``.

dtype casts. ``model.to(torch.bfloat16)`` casts every floating buffer; the fp16 ``scales`` are
part of the quantized format (bf16 would drop 3 bits of each scale), so ``_apply`` moves them
but keeps their dtype. The bias follows the model's dtype like any parameter.

FSDP. The storage is four plain tensors registered as buffers and the bias a frozen parameter.
FSDP2 (``fully_shard``) shards parameters only: the buffers are moved to each rank's device and
replicated, which works as is (a 4-bit 8B model's storage is ~5 GB per rank). To shard it too,
``qweight`` is what matters (``in * out * bits / 8`` bytes: ~97% of the layer at 4 bits, group
128); it would have to become a frozen ``nn.Parameter`` (FSDP2 shards dim 0, the packed input
rows, and all-gathers before the forward and again before the backward, which is what the
kernels need). ``scales`` must then stay out of ``MixedPrecisionPolicy(param_dtype=...)``
casts, for the reason above. Nothing here holds Python references to the storage between
calls, so FSDP's swapping of the tensors behind the module's attributes is safe.
``distributed.gptq.make_gptq_shardable`` does this: the four tensors become one byte-packed
frozen parameter in the gather dtype, and ``storage()`` returns views of its bytes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from turbotune.ops.gptq import gptq_dequantize, gptq_linear
from turbotune.quant.gptq_format import (
    check_gptq_shapes,
    default_g_idx,
    n_groups,
    pack_gptq,
    packed_length,
)

__all__ = ["GPTQLinear", "quantize_rtn", "register_with_peft"]

_STORAGE = ("qweight", "qzeros", "scales", "g_idx")


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of ``weight [out, in]`` per group of input columns.

    The grid of GPTQ's quantizer (asymmetric: ``[min(w, 0), max(w, 0)]`` over ``2**bits - 1``
    steps; symmetric: ``+-max|w|`` with ``z = 2**(bits - 1)``), codes computed with the
    fp16-rounded scale that is stored. Asymmetric zero points are kept ``>= 1`` so that every
    v1 reader agrees on them (see ``quant.gptq_format``). This is the baseline GPTQ improves on.

    Returns:
        ``(intweight [out, in], zeros [n_groups, out], scales [n_groups, out] fp16)``.

    Raises:
        ValueError: if ``in`` is not a multiple of ``group_size``.
    """
    out_f, in_f = weight.shape
    size = in_f if group_size == -1 else group_size
    if in_f % size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {size}")
    maxq = (1 << bits) - 1
    w = weight.detach().float().view(out_f, in_f // size, size)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)  # an all-zero group: any grid works, avoid a zero scale
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / maxq).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale).clamp(1, maxq)
    q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, maxq)
    return q.view(out_f, in_f).long(), zero.t().long().contiguous(), scale.t().half().contiguous()


class GPTQLinear(nn.Module):
    """``y = x W^T + b`` with a frozen GPTQ-quantized ``W`` (checkpoint layout, any bits 2/3/4/8).

    Args:
        in_features: input size (a multiple of ``32 / bits``; of 32 at 3 bits).
        out_features: output size (same constraint).
        bits: 2, 3, 4 or 8.
        group_size: input columns per scale group; -1: one group.
        bias: whether the layer has a (frozen) bias.
        device: where the buffers live.
        bias_dtype: dtype of the bias.
    """

    dequantize_accepts_out = True
    """``dequantize(dtype, out=...)`` writes into a caller's buffer (``quant.weights``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        bias: bool = False,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = n_groups(in_features, group_size)
        int32 = dict(dtype=torch.int32, device=device)
        words_in, words_out = packed_length(in_features, bits), packed_length(out_features, bits)
        self.register_buffer("qweight", torch.zeros(words_in, out_features, **int32))
        self.register_buffer("qzeros", torch.zeros(groups, words_out, **int32))
        self.register_buffer(
            "scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device)
        )
        self.register_buffer("g_idx", default_g_idx(in_features, group_size, device))
        b = torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    # ---- constructors ----

    @classmethod
    def from_tensors(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None = None,
        group_size: int | None = None,
    ) -> GPTQLinear:
        """A layer around existing checkpoint tensors (shared, not copied, where possible).

        ``group_size`` defaults to the size of group 0 (-1 when there is one group).

        Raises:
            ValueError: on inconsistent shapes (``quant.gptq_format.check_gptq_shapes``).
        """
        out_f, in_f = check_gptq_shapes(qweight, qzeros, scales, g_idx, bits)
        if group_size is None:
            group_size = -1 if scales.shape[0] == 1 else int((g_idx == 0).sum())
        layer = cls(in_f, out_f, bits, group_size, bias is not None, device="meta")
        layer.qweight, layer.qzeros = qweight.contiguous(), qzeros.contiguous()
        layer.scales, layer.g_idx = scales.contiguous(), g_idx.to(torch.int32).contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = True
    ) -> GPTQLinear:
        """Round-to-nearest quantization of an ``nn.Linear`` (:func:`quantize_rtn`) into the
        GPTQ layout; the GPTQ algorithm itself writes the same tensors with better codes."""
        intweight, zeros, scales = quantize_rtn(linear.weight, bits, group_size, sym)
        g_idx = default_g_idx(linear.in_features, group_size, linear.weight.device)
        storage = pack_gptq(intweight, zeros, scales, g_idx, bits)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_tensors(*storage, bits, bias=bias, group_size=group_size)

    # ---- the weight ----

    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qweight, qzeros, scales, g_idx)`` as currently held (views of the packed bytes
        after ``distributed.gptq.make_gptq_shardable``)."""
        layout = self.__dict__.get("packed_layout")
        if layout is not None:
            return layout.views(self._parameters["packed"])
        b = self._buffers
        return b["qweight"], b["qzeros"], b["scales"], b["g_idx"]

    def __getattr__(self, name: str) -> Any:
        # Packed for FSDP2: the checkpoint names stay readable (peft reads ``qweight``).
        if name in _STORAGE and self.__dict__.get("packed_layout") is not None:
            return self.storage()[_STORAGE.index(name)]
        return super().__getattr__(name)

    @property
    def weight(self) -> torch.Tensor:
        """The packed ``qweight`` (what code reading a base layer's ``.weight`` wants: its device,
        ``requires_grad`` False). Not a dense weight: that is :meth:`dequantize`. Packed for
        FSDP2: the packed parameter (a ``DTensor`` shard between uses)."""
        if self.__dict__.get("packed_layout") is not None:
            return self._parameters["packed"]
        return self._buffers["qweight"]

    @property
    def infeatures(self) -> int:
        """AutoGPTQ's name of ``in_features`` (peft sizes its adapters by it)."""
        return self.in_features

    @property
    def outfeatures(self) -> int:
        """AutoGPTQ's name of ``out_features``."""
        return self.out_features

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the dense weight (``quant.weights.weight_shape``)."""
        return self.out_features, self.in_features

    def dequantize(
        self, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense ``[out_features, in_features]`` weight in ``dtype`` (no autograd history)."""
        return gptq_dequantize(self.storage(), self.bits, dtype, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gptq_linear(x, self.storage(), self.bits, self.bias)

    def _apply(self, fn, recurse: bool = True):
        # Move the fp16 scales with the module but keep their dtype (see the module docstring);
        # the same for packed bytes (a cast would convert them).
        scales = self._buffers.get("scales")
        packed = self._parameters.get("packed")
        packed = None if packed is None else packed.detach()  # the bytes before any cast
        super()._apply(fn, recurse)
        moved = self._buffers.get("scales")
        if moved is not None and scales is not None and moved.dtype != scales.dtype:
            self._buffers["scales"] = scales.to(moved.device)
        moved = self._parameters.get("packed")
        if moved is not None and packed is not None and moved.dtype != packed.dtype:
            self._parameters["packed"] = nn.Parameter(packed.to(moved.device), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )


def register_with_peft(lora_config: Any) -> Any:
    """Let peft put its LoRA ``Linear`` around :class:`GPTQLinear` targets of ``lora_config``.

    peft's own GPTQ dispatch only knows AutoGPTQ's and GPTQModel's classes; its generic LoRA
    ``Linear`` works on any base module (it calls ``base_layer(x)`` and reads ``in_features``,
    ``out_features``, ``qweight``/``weight`` for the device). peft's in-place merge cannot
    merge into packed integers (dequantize, merge, save instead). Uses peft's (experimental)
    ``LoraConfig._register_custom_module``.

    Returns:
        ``lora_config``, modified in place.
    """
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    lora_config._register_custom_module({GPTQLinear: PeftLoraLinear})
    return lora_config
