"""NF4 storage that FSDP2 can shard: bitsandbytes' 4-bit format held in one plain tensor.

Design note. bitsandbytes keeps a 4-bit weight as a ``Params4bit`` whose ``quant_state`` (the
block scales, the nested scales, the code tables) lives *outside* the tensor. FSDP2 replaces
every parameter by a ``DTensor`` shard, and the quant state does not follow (it is not a
tensor attribute FSDP2 knows about), so a ``Params4bit`` cannot be sharded. Here everything a
weight needs is packed, byte for byte in bitsandbytes' storage format, into **one**
1-D ``nn.Parameter`` whose dtype is the *compute* dtype (``quant_storage`` in bitsandbytes'
words) — the idea of torchao's ``NF4Tensor`` and of fsdp_qlora's ``bnb_4bit_quant_storage``,
taken one step further:

====================  =========================================  ===================
section               contents                                   bytes
====================  =========================================  ===================
``nibbles``           element ``2j`` high nibble of byte ``j``   ``ceil(n / 2)``
``absmax``            per block of ``blocksize``: fp32, or uint8  ``blocks * (4|1)``
                      indices into ``code2`` (double quant)
``absmax2``           fp32 scale per ``blocksize2`` blocks         ``blocks2 * 4``
``code2``             the 256-entry fp32 table of ``absmax``       ``1024``
``offset``            fp32 mean added back to the nested scales   ``4``
====================  =========================================  ===================

Each section starts on a 16-byte boundary. Why one tensor: FSDP2 shards along dim 0 with
padding and gathers by bytes, so any layout survives; with several tensors the scales would
differ in dtype from the packed data, and FSDP2's mixed-precision cast (``param_dtype``)
would *convert* them. With one tensor in the policy's ``param_dtype`` that cast is a no-op,
frozen weights sit in the same FSDP group as trainable LoRA weights, and all-gathers move 4-bit
data. The layer dequantizes with the Triton kernel of :mod:`turbotune.ops.nf4` (it reads
bitsandbytes' format), and ``dequantize(dtype, out=)`` makes it a weight source of the fused
LoRA ops (:mod:`turbotune.quant.weights`).

The quantizer is our own (it needs no bitsandbytes): nearest NF4 code per element, fp32
``absmax`` per block, and for double quantization ``absmax - mean`` quantized to a *linear*
256-level table per ``blocksize2`` blocks. It runs in bounded chunks on whatever device the
weight is on. :meth:`NF4Linear.from_bnb` copies an existing bitsandbytes weight bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from turbotune.ops.reference import code_table_4bit

__all__ = ["NF4Layout", "NF4Linear", "quantize_4bit"]

_ALIGN = 16
_CHUNK = 1 << 24  # elements quantized at a time: bounds the temporaries of a 70B-sized matrix


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class NF4Layout:
    """Where each section of a packed weight lies (byte offsets into the flat storage).

    Attributes:
        shape: ``(out_features, in_features)`` of the dense weight.
        blocksize: elements per ``absmax`` block (64, as bitsandbytes).
        nested: double quantization (uint8 ``absmax`` + fp32 ``absmax2``).
        blocksize2: ``absmax`` blocks per ``absmax2`` scale (256, as bitsandbytes).
        quant_type: ``"nf4"`` or ``"fp4"``.
    """

    shape: tuple[int, int]
    blocksize: int = 64
    nested: bool = True
    blocksize2: int = 256
    quant_type: str = "nf4"

    @property
    def n(self) -> int:
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        return -(-self.n // self.blocksize)

    @property
    def blocks2(self) -> int:
        return -(-self.blocks // self.blocksize2) if self.nested else 0

    def offsets(self) -> dict[str, tuple[int, int]]:
        """``section -> (start byte, byte length)``."""
        sizes = {"nibbles": (self.n + 1) // 2, "absmax": self.blocks * (1 if self.nested else 4)}
        if self.nested:
            sizes |= {"absmax2": self.blocks2 * 4, "code2": 256 * 4, "offset": 4}
        out, at = {}, 0
        for name, size in sizes.items():
            out[name] = (at, size)
            at = _align(at + size)
        return out

    def nbytes(self) -> int:
        start, size = list(self.offsets().values())[-1]
        return _align(start + size)

    def numel(self, storage_dtype: torch.dtype) -> int:
        """Elements of a 1-D ``storage_dtype`` tensor holding the packed bytes."""
        item = torch.empty((), dtype=storage_dtype).element_size()
        return -(-self.nbytes() // item)


class _QuantState:
    """The attributes of a bitsandbytes ``QuantState`` that ``ops.nf4`` reads, as views into one
    packed buffer (``ops.nf4`` caches its launch facts on this object)."""

    def __init__(self, layout: NF4Layout, dtype: torch.dtype):
        self.shape = torch.Size(layout.shape)
        self.blocksize = layout.blocksize
        self.quant_type = layout.quant_type
        self.nested = layout.nested
        self.dtype = dtype
        self.nibbles: torch.Tensor | None = None
        self.absmax: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None
        self.state2 = _State2(layout.blocksize2) if layout.nested else None
        self.source: tuple[int, int] | None = None  # (data_ptr, version) the views were made from


class _State2:
    def __init__(self, blocksize: int):
        self.blocksize = blocksize
        self.absmax: torch.Tensor | None = None
        self.code: torch.Tensor | None = None


def _sections(buffer: torch.Tensor, layout: NF4Layout) -> dict[str, torch.Tensor]:
    """Typed views of each section of a flat packed buffer (any storage dtype)."""
    raw = buffer.view(torch.uint8) if buffer.dtype != torch.uint8 else buffer
    raw = raw.reshape(-1)
    out = {}
    for name, (start, size) in layout.offsets().items():
        part = raw[start : start + size]
        if name in ("absmax2", "code2", "offset") or (name == "absmax" and not layout.nested):
            part = part.view(torch.float32)
        out[name] = part
    return out


# --- quantization --------------------------------------------------------------------------------


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of an ascending ``code`` table, as uint8."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(values, mids).to(torch.uint8)


def _block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 ``max |w|`` of each block of ``flat`` (the last block may be short)."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    out = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    step = _CHUNK // blocksize * blocksize
    for start in range(0, n, step):
        part = flat[start : start + step].float().abs()
        pad = -part.numel() % blocksize
        if pad:
            part = torch.nn.functional.pad(part, (0, pad))
        b0 = start // blocksize
        out[b0 : b0 + part.numel() // blocksize] = part.view(-1, blocksize).amax(1)
    return out


def _pack_nibbles(
    flat: torch.Tensor, absmax: torch.Tensor, layout: NF4Layout, out: torch.Tensor
) -> None:
    """Write the 4-bit codes of ``flat`` (scaled by its block's ``absmax``) into ``out``."""
    code = code_table_4bit(layout.quant_type, flat.device)
    order = torch.argsort(code)  # FP4's table is not ascending; NF4's is
    sorted_code = code[order]
    bs, n = layout.blocksize, flat.numel()
    step = _CHUNK // (2 * bs) * (2 * bs)
    for start in range(0, n, step):
        part = flat[start : start + step].float()
        pad = -part.numel() % bs
        if pad:
            part = torch.nn.functional.pad(part, (0, pad))
        b0 = start // bs
        scale = absmax[b0 : b0 + part.numel() // bs].clamp_min(torch.finfo(torch.float32).tiny)
        scaled = (part.view(-1, bs) / scale[:, None]).reshape(-1)[: min(step, n - start)]
        idx = order.to(torch.uint8)[_nearest(scaled, sorted_code).long()]
        if idx.numel() % 2:
            idx = torch.nn.functional.pad(idx, (0, 1))
        pairs = idx.view(-1, 2)
        out[start // 2 : start // 2 + pairs.shape[0]] = (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_4bit(
    weight: torch.Tensor,
    storage_dtype: torch.dtype = torch.bfloat16,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
) -> tuple[torch.Tensor, NF4Layout]:
    """Quantize a dense ``[out, in]`` weight into one packed 1-D ``storage_dtype`` tensor.

    Runs on ``weight``'s device in chunks of ``2**24`` elements (temporaries stay below ~300 MB).

    Args:
        weight: the dense matrix, any floating dtype.
        storage_dtype: dtype of the returned tensor (the bytes are what count).
        blocksize: elements per scale.
        double_quant: quantize the scales too (bitsandbytes' ``compress_statistics``).
        quant_type: ``"nf4"`` or ``"fp4"``.

    Returns:
        ``(packed [layout.numel(storage_dtype)], layout)``.
    """
    if weight.dim() != 2:
        raise ValueError(
            f"quantize_4bit expects a [out, in] matrix, got shape {tuple(weight.shape)}"
        )
    layout = NF4Layout(tuple(weight.shape), blocksize, double_quant, 256, quant_type)
    packed = torch.zeros(layout.numel(storage_dtype), dtype=storage_dtype, device=weight.device)
    views = _sections(packed, layout)
    flat = weight.detach().reshape(-1)
    absmax = _block_absmax(flat, blocksize)
    _pack_nibbles(flat, absmax, layout, views["nibbles"])
    if not double_quant:
        views["absmax"].copy_(absmax)
        return packed, layout
    offset = absmax.mean()
    centered = absmax - offset
    scale2 = _block_absmax(centered, layout.blocksize2).clamp_min(torch.finfo(torch.float32).tiny)
    code2 = torch.linspace(-1.0, 1.0, 256, device=weight.device)
    pad = -centered.numel() % layout.blocksize2
    grouped = torch.nn.functional.pad(centered, (0, pad)).view(-1, layout.blocksize2)
    scaled = (grouped / scale2[:, None]).reshape(-1)[: centered.numel()]
    views["absmax"].copy_(_nearest(scaled, code2))
    views["absmax2"].copy_(scale2)
    views["code2"].copy_(code2)
    views["offset"].copy_(offset.reshape(1))
    return packed, layout


# --- the layer -----------------------------------------------------------------------------------


class NF4Linear(nn.Module):
    """A frozen ``y = x W^T + b`` whose ``W [out, in]`` is bitsandbytes 4-bit storage in one tensor.

    Args:
        in_features: columns of ``W``.
        out_features: rows of ``W``.
        bias: whether the layer has a (frozen) bias.
        compute_dtype: default dtype of :meth:`dequantize`.
        storage_dtype: dtype of the packed parameter (FSDP2: the policy's ``param_dtype``).
        blocksize: elements per scale.
        double_quant: nested scales.
        quant_type: ``"nf4"`` or ``"fp4"``.
        device: where the (uninitialized) storage is created; ``"meta"`` for lazy loading.
    """

    dequantize_accepts_out = True
    """``dequantize(dtype, out=...)`` writes into a caller's buffer (``quant.weights``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        storage_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.layout = NF4Layout(
            (out_features, in_features), blocksize, double_quant, 256, quant_type
        )
        numel = self.layout.numel(storage_dtype)
        self.packed = nn.Parameter(
            torch.zeros(numel, dtype=storage_dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), False)
            if bias
            else None
        )
        self._state = _QuantState(self.layout, compute_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        compute_dtype: torch.dtype | None = None,
        storage_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> NF4Linear:
        """Quantize ``linear``'s weight (on its device) into a new layer."""
        w = linear.weight.detach()
        compute = compute_dtype or (w.dtype if w.is_floating_point() else torch.bfloat16)
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            compute_dtype=compute, storage_dtype=storage_dtype or compute, device="meta", **kwargs,
        )  # fmt: skip
        layer.load_dense(w, bias=linear.bias)
        return layer

    @classmethod
    def from_bnb(cls, linear: nn.Module, storage_dtype: torch.dtype | None = None) -> NF4Linear:
        """Copy a bitsandbytes ``Linear4bit`` into a new layer, bit for bit."""
        weight, state = linear.weight, linear.weight.quant_state
        compute = getattr(linear, "compute_dtype", None) or state.dtype
        nested = bool(getattr(state, "nested", False))
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            compute_dtype=compute, storage_dtype=storage_dtype or compute,
            blocksize=state.blocksize, double_quant=nested, quant_type=state.quant_type,
            device=weight.device,
        )  # fmt: skip
        if nested and state.state2.blocksize != layer.layout.blocksize2:
            raise ValueError(f"nested blocksize {state.state2.blocksize} is not 256")
        views = _sections(layer.packed.data, layer.layout)
        with torch.no_grad():
            views["nibbles"].copy_(weight.data.reshape(-1).view(torch.uint8))
            views["absmax"].copy_(state.absmax.reshape(-1).to(views["absmax"].dtype))
            if nested:
                views["absmax2"].copy_(state.state2.absmax.float())
                views["code2"].copy_(state.state2.code.float())
                views["offset"].copy_(torch.as_tensor(state.offset, dtype=torch.float32).reshape(1))
            if linear.bias is not None:
                layer.bias.data = linear.bias.detach().to(compute).clone()
        return layer

    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantize ``weight [out, in]`` (on its device) into this layer's storage."""
        packed, layout = quantize_4bit(
            weight, self.packed.dtype, blocksize=self.layout.blocksize,
            double_quant=self.layout.nested, quant_type=self.layout.quant_type,
        )  # fmt: skip
        if layout != self.layout:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {self.layout}")
        self.packed = nn.Parameter(packed, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(self.compute_dtype).clone(), False)

    # --- views that code written for nn.Linear reads ---------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The packed storage (device and dtype, as a bitsandbytes packed weight tells)."""
        return self.packed

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the dense weight (``quant.weights.weight_shape``)."""
        return (self.out_features, self.in_features)

    def quant_state(self) -> _QuantState:
        """A bitsandbytes-like quant state viewing the *current* storage (FSDP2 swaps it)."""
        buffer = self.packed
        if hasattr(buffer, "device_mesh"):
            raise RuntimeError(
                "NF4Linear storage is sharded (a DTensor outside its FSDP module's forward); "
                "dequantize inside the forward, or gather the storage first"
            )
        key = (buffer.data_ptr(), buffer._version)
        state = self._state
        if state.source != key:
            views = _sections(buffer.detach(), self.layout)
            state.absmax = views["absmax"]
            if state.state2 is not None:
                state.state2.absmax, state.state2.code = views["absmax2"], views["code2"]
                state.offset = views["offset"]
            state.nibbles = views["nibbles"]
            state.source = key
        return state

    def dequantize(
        self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense ``[out, in]`` in ``dtype`` (default :attr:`compute_dtype`), no autograd history.

        Args:
            dtype: output dtype.
            out: optional ``[out, in]`` destination (its dtype wins).
        """
        from turbotune.ops.nf4 import dequantize_nf4

        state = self.quant_state()
        with torch.no_grad():
            return dequantize_nf4(state.nibbles, state, dtype or self.compute_dtype, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., out]``; dequantized in forward and again in backward."""
        from turbotune.quant.hqq_linear import hqq_linear

        return hqq_linear(x, self, self.bias)

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {lay.quant_type} blocksize={lay.blocksize} "
            f"nested={lay.nested} storage={self.packed.dtype}"
        )
