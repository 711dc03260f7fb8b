"""GPTQ storage that FSDP2 can shard: a layer's four checkpoint tensors in one byte-packed parameter.

Design note. :class:`~turbotune.quant.gptq_linear.GPTQLinear` keeps ``qweight``, ``qzeros``,
``scales`` and ``g_idx`` as buffers, which FSDP2 replicates on every rank (it shards parameters
only). :func:`make_gptq_shardable` moves the four tensors, byte for byte, into **one** frozen 1-D
``nn.Parameter`` named ``packed`` whose dtype is FSDP2's gather dtype (the
``MixedPrecisionPolicy.param_dtype``, or the stored dtype without one) — the same idea as the
NF4 storage of :mod:`turbotune.distributed.nf4`:

* one tensor, because the policy casts every parameter of a group to ``param_dtype``: int32
  codes and fp16 scales would be *converted*; bytes already in ``param_dtype`` are left alone;
* 1-D bytes, because FSDP2 shards dim 0 with padding and gathers by bytes, so the layout
  survives any world size: each rank holds ``1 / world`` of the bytes between uses.

===========  ==================================  =====================================
section      dtype, shape                         bytes
===========  ==================================  =====================================
``qweight``  int32 ``[in * bits / 32, out]``      ``in * out * bits / 8`` (~97% at 4 bits)
``qzeros``   int32 ``[groups, out * bits / 32]``  ``groups * out * bits / 8``
``scales``   fp16 ``[groups, out]``               ``groups * out * 2``
``g_idx``    int32 ``[in]``                       ``in * 4``
===========  ==================================  =====================================

Each section starts on a 16-byte boundary (the dtype views need aligned offsets, the Triton
kernels aligned pointers) and the total is a multiple of 16 bytes, so any gather dtype
(bf16, fp16, fp32) holds it exactly. The layer keeps a :class:`GPTQPackedLayout` and its
``storage()`` returns int32/fp16 *views* of the parameter's bytes at every call: during the
forward and backward FSDP2 has unsharded the parameter, so the views read the full bytes; no
reference to the storage is held between calls (FSDP2 swaps the tensor behind the attribute).
The autograd function saves those views for backward; FSDP2 refills the same unsharded storage
before the backward (preserving its version counter), as it does for any saved weight.

The state dict of a packed layer has ``packed`` instead of the checkpoint names (adapters are
saved alone; to save the base, call :func:`unpack_gptq` first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["GPTQPackedLayout", "make_gptq_shardable", "pack_gptq_layer", "unpack_gptq"]

FIELDS = ("qweight", "qzeros", "scales", "g_idx")
"""The storage tensors of a ``GPTQLinear``, in ``storage()`` order."""
PACKED = "packed"
"""Name of the packed parameter on the layer."""
_ALIGN = 16


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class GPTQPackedLayout:
    """Where each storage tensor lies in the packed bytes.

    Attributes:
        sections: per tensor of :data:`FIELDS`: ``(byte offset, shape, dtype)``.
        nbytes: total bytes (a multiple of 16).
    """

    sections: tuple[tuple[int, tuple[int, ...], torch.dtype], ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: tuple[torch.Tensor, ...]) -> GPTQPackedLayout:
        """The layout holding ``tensors`` one after the other, each 16-byte aligned."""
        sections, at = [], 0
        for t in tensors:
            sections.append((at, tuple(t.shape), t.dtype))
            at = _align(at + t.numel() * t.element_size())
        return cls(tuple(sections), at)

    def views(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(qweight, qzeros, scales, g_idx)`` as views of ``packed``'s bytes (a plain,
        unsharded tensor of ``nbytes`` bytes in any dtype)."""
        raw = packed.view(torch.uint8)
        out = []
        for offset, shape, dtype in self.sections:
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out.append(raw[offset : offset + size].view(dtype).view(shape))
        return tuple(out)


def _gptq_layers(model: nn.Module) -> list[nn.Module]:
    from turbotune.quant.gptq_linear import GPTQLinear

    return [m for m in model.modules() if isinstance(m, GPTQLinear)]


def is_packed(layer: nn.Module) -> bool:
    """Whether ``layer``'s storage lives in a packed parameter."""
    return layer.__dict__.get("packed_layout") is not None


def pack_gptq_layer(layer: nn.Module, gather_dtype: torch.dtype) -> None:
    """Move a ``GPTQLinear``'s four storage buffers into one frozen ``gather_dtype`` parameter.

    Already packed: only the parameter's dtype changes (same bytes, another view).

    Args:
        layer: a ``GPTQLinear`` (buffers on any real device; not sharded yet).
        gather_dtype: the parameter's dtype, FSDP2's gather dtype (any dtype of 1, 2 or 4 bytes).
    """
    if is_packed(layer):
        packed = layer._parameters[PACKED]
        if packed.dtype != gather_dtype:
            bytes_ = packed.detach().view(torch.uint8).view(gather_dtype)
            layer._parameters[PACKED] = nn.Parameter(bytes_, requires_grad=False)
        return
    tensors = tuple(layer._buffers[name].contiguous() for name in FIELDS)
    layout = GPTQPackedLayout.of(tensors)
    raw = torch.zeros(layout.nbytes, dtype=torch.uint8, device=tensors[0].device)
    for (offset, _, _), t in zip(layout.sections, tensors):
        flat = t.reshape(-1).view(torch.uint8)
        raw[offset : offset + flat.numel()].copy_(flat)
    for name in FIELDS:
        del layer._buffers[name]
    layer.register_parameter(PACKED, nn.Parameter(raw.view(gather_dtype), requires_grad=False))
    layer.__dict__["packed_layout"] = layout


def unpack_gptq(layer: nn.Module) -> None:
    """Undo :func:`pack_gptq_layer`: the four checkpoint buffers again (copies of the bytes).

    The parameter must be whole (not sharded, or gathered with ``full_tensor()`` first).
    """
    if not is_packed(layer):
        return
    tensors = layer.__dict__["packed_layout"].views(layer._parameters[PACKED].detach())
    del layer._parameters[PACKED]
    layer.__dict__["packed_layout"] = None
    for name, t in zip(FIELDS, tensors):
        layer.register_buffer(name, t.clone())


def make_gptq_shardable(model: nn.Module, gather_dtype: torch.dtype) -> int:
    """Pack every ``GPTQLinear`` of ``model`` (:func:`pack_gptq_layer`) so FSDP2 shards its storage.

    Call before ``fully_shard``, on a model whose GPTQ buffers are on a real device.

    Args:
        model: any module tree (a ``PeftModel``, a transformers model, a plain module).
        gather_dtype: FSDP2's gather dtype: ``MixedPrecisionPolicy.param_dtype`` when set,
            else any dtype (the stored dtype is gathered as is).

    Returns:
        The number of GPTQ layers packed.
    """
    layers = _gptq_layers(model)
    for layer in layers:
        pack_gptq_layer(layer, gather_dtype)
    return len(layers)
