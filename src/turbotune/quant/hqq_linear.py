"""``HQQLinear``: a frozen linear layer kept as HQQ storage, and the swap that builds a model of them.

Design note. The layer holds three plain tensors as frozen ``nn.Parameter``s — the packed codes
``W_q [R, row_bytes]``, ``scale`` and ``zero [R, groups]`` — all with the same leading dimension,
so FSDP2 shards them by rows like any other parameter and gathers them before each use. Nothing
is cached: :meth:`HQQLinear.dequantize` reads the parameters each call, so it sees whatever FSDP2
has gathered at that moment.

The forward runs through :class:`HQQLinearFunction`, which dequantizes for the matmul and again
in backward (``dx = dy W``) instead of saving the dense weight: the saved state of a projection
is its input only. ``dequantize(dtype)`` makes the layer a ``Dequantizable`` weight source
(``quant/weights.py``), so the fused LoRA ops of ``ops/lora.py`` read it like a bitsandbytes
4-bit weight. ``weight`` (the packed codes) and ``compute_dtype`` are what transformers and the
LoRA layers read off a base layer (device, dtype checks).

:func:`quantize_linears` swaps a model's ``nn.Linear`` modules for ``HQQLinear`` one at a time
on the target device (the dense copy of each is dropped right after), after the shape of
torchao's ``swap_linear_layers``: one function with a name filter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from turbotune.quant.hqq import HQQParams, HQQWeight, Method, quantize

__all__ = [
    "HQQLinear",
    "HQQLinearFunction",
    "count_hqq_linears",
    "hqq_linear",
    "quantizable_linears",
    "quantize_linears",
    "round_trip_linears",
]


_STORAGE = ("W_q", "scale", "zero")


class HQQLinear(nn.Module):
    """A frozen ``y = x W^T + b`` whose ``W [out, in]`` is stored HQQ-quantized.

    Args:
        weight: the quantized weight.
        bias: optional ``[out]`` bias (kept frozen, as given).
        compute_dtype: default dtype of :meth:`dequantize` (the forward uses the input's dtype).
    """

    dequantize_accepts_out = True
    """``dequantize(dtype, out=...)`` writes into a caller's buffer (``quant.weights``)."""

    def __init__(
        self,
        weight: HQQWeight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size, self.axis = weight.bits, weight.group_size, weight.axis
        self.compute_dtype = compute_dtype
        self.W_q = nn.Parameter(weight.packed, requires_grad=False)
        self.scale = nn.Parameter(weight.scale, requires_grad=False)
        self.zero = nn.Parameter(weight.zero, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 64,
        axis: int = 1,
        *,
        method: Method = "hqq",
        params: HQQParams | None = None,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        meta_dtype: torch.dtype = torch.bfloat16,
        storage_dtype: torch.dtype = torch.uint8,
    ) -> HQQLinear:
        """Quantize ``linear``'s weight (on ``device``, default its own) into a new layer.

        Args:
            linear: the dense layer (left untouched).
            bits, group_size, axis, method, params, meta_dtype, storage_dtype: see
                :func:`turbotune.quant.hqq.quantize`.
            compute_dtype: default: the linear's weight dtype when floating, else bf16.
            device: where the quantization runs and the layer lives.
        """
        w = linear.weight.detach()
        device = w.device if device is None else torch.device(device)
        if compute_dtype is None:
            compute_dtype = w.dtype if w.is_floating_point() else torch.bfloat16
        qweight = quantize(
            w.to(device), bits, group_size, axis, method=method, params=params,
            meta_dtype=meta_dtype, storage_dtype=storage_dtype,
        )  # fmt: skip
        bias = None if linear.bias is None else linear.bias.detach().to(device, compute_dtype)
        return cls(qweight, bias, compute_dtype)

    # --- views that code written for nn.Linear reads ---------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The packed codes (device and storage dtype, as bitsandbytes' packed weight tells)."""
        return self.W_q

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the dense weight (``quant.weights.weight_shape``)."""
        return (self.out_features, self.in_features)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> HQQLinear:
        """Device moves apply; dtype casts (``model.half()``, ``model.to(bf16)``) skip the
        quantized format: the packed bytes must never be converted as values, and the zero
        points of nearly flat groups do not fit fp16. The bias is cast as usual."""
        kept = {n: self._parameters[n].data for n in _STORAGE}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            param = self._parameters[name]
            if param.dtype != before.dtype:
                param.data = before.to(param.device)
        return self

    def quantized(self) -> HQQWeight:
        """The storage as an :class:`HQQWeight` over the current parameter tensors."""
        return HQQWeight(
            self.W_q, self.scale, self.zero, self.shape, self.bits, self.group_size, self.axis
        )

    def dequantize(
        self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense ``[out, in]`` in ``dtype`` (default :attr:`compute_dtype`), no autograd history.

        Args:
            dtype: output dtype.
            out: optional ``[out, in]`` destination with any strides (its dtype wins).
        """
        from turbotune.ops.hqq import dequantize_hqq

        with torch.no_grad():
            return dequantize_hqq(self.quantized(), dtype or self.compute_dtype, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., out]``; the weight is dequantized in ``x``'s dtype."""
        return hqq_linear(x, self, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
            f"axis={self.axis}"
        )


class HQQLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized in forward and again in backward (not saved).

    Backward: ``dx = dy W``, ``db = sum_rows(dy)``; the frozen ``W`` gets no gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Any, bias: torch.Tensor | None) -> torch.Tensor:
        weight = layer.dequantize(x.dtype)
        y = x @ weight.t()
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.layer = layer
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        dx = dy @ ctx.layer.dequantize(dy.dtype) if ctx.needs_input_grad[0] else None
        d_bias = None
        if ctx.needs_input_grad[2]:
            d_bias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, None, d_bias


def hqq_linear(x: torch.Tensor, layer: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + bias`` for a weight source with ``dequantize(dtype)`` (an :class:`HQQLinear`).

    Under ``torch.autocast`` the input is cast to the autocast dtype first and the matmuls run
    with autocast off (what autocast would have done to a dense ``F.linear``).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return HQQLinearFunction.apply(x, layer, bias)
    return HQQLinearFunction.apply(x, layer, bias)


# --- whole models ------------------------------------------------------------------------------


def quantizable_linears(model: nn.Module, skip_modules: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules HQQ quantizes: all but the output embedding layer and
    those :func:`_matches` ``skip_modules``."""
    skip = tuple(skip_modules)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head and not _matches(name, skip)
    ]


def _matches(name: str, skip: tuple[str, ...]) -> bool:
    """``name`` is a skip entry, ends with ``.<entry>``, or lies inside one (``model.layers.5``)."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def quantize_linears(
    model: nn.Module,
    *,
    bits: int = 4,
    group_size: int = 64,
    axis: int = 1,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
    skip_modules: tuple[str, ...] | list[str] = ("lm_head",),
    method: Method = "hqq",
    params: HQQParams | None = None,
    meta_dtype: torch.dtype = torch.bfloat16,
    storage_dtype: torch.dtype = torch.uint8,
    progress: bool = False,
) -> int:
    """Replace every ``nn.Linear`` of ``model`` (but the skipped ones) by an :class:`HQQLinear`.

    Layers are quantized one at a time on ``device``; each dense weight is released as soon as
    its layer is swapped, so peak memory is the quantized model plus one dense layer.

    Args:
        model: any module (in place). The output embedding layer is always skipped.
        bits, group_size, axis, method, params, meta_dtype, storage_dtype: see
            :func:`turbotune.quant.hqq.quantize`.
        device: where the quantized layers live (default: each linear's own device).
        compute_dtype: the layers' default dequantization dtype.
        skip_modules: names (or dotted suffixes) left dense; a module's name skips every
            linear inside it.
        progress: show a progress bar.

    Returns:
        How many layers were quantized.
    """
    names = quantizable_linears(model, skip_modules)
    bar = _progress(len(names), progress)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, child)
        layer = HQQLinear.from_linear(
            dense, bits, group_size, axis, method=method, params=params,
            compute_dtype=compute_dtype, device=device, meta_dtype=meta_dtype,
            storage_dtype=storage_dtype,
        )  # fmt: skip
        setattr(parent, child, layer)
        del dense
        bar.update(1)
    bar.close()
    return len(names)


def round_trip_linears(
    model: nn.Module,
    *,
    bits: int = 4,
    group_size: int = 64,
    axis: int = 1,
    skip_modules: tuple[str, ...] | list[str] = ("lm_head",),
    meta_dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Replace the weight of every linear :func:`quantize_linears` would quantize by its HQQ
    round trip, in place and dense: the base as HQQ training saw it (to merge an adapter into).

    Returns:
        How many weights were replaced.
    """
    names = quantizable_linears(model, skip_modules)
    for name in names:
        weight = model.get_submodule(name).weight
        q = quantize(weight.detach(), bits, group_size, axis, meta_dtype=meta_dtype)
        with torch.no_grad():
            weight.copy_(q.dequantize(weight.dtype))
    return len(names)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="HQQ quantizing", unit="layer", disable=not enabled)


def count_hqq_linears(model: nn.Module) -> int:
    return sum(isinstance(m, HQQLinear) for m in model.modules())
