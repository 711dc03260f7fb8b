"""Gradient buffers of the layer graphs (``ops/graphs.py``) and the copies handed to autograd.

Design note. A captured backward reads its output gradient from, and writes its input gradient
into, static buffers that every replay reuses:

* Input gradients ping-pong between two layer-output-shaped buffers with spare columns behind
  each row (``ops/spare_columns.py``). The backward that computes a layer's input gradient
  writes it there directly, and the reading layer's down projection finds room for its
  ``[dy | g]`` behind its output gradient, as in an eager step. ``same_view`` tells whether a
  capture's input gradient landed in the buffer (else the capture copies it there).
* Parameter gradients are buffers of the graph too: autograd may keep a returned tensor as
  ``param.grad`` and the next replay overwrites the buffer, so each backward replay hands out
  fresh copies, as views of one flat buffer filled by one multi-tensor copy.

The switches that choose between these and the plain paths live in ``ops/graphs.py``
(``GRADIENTS_IN_PLACE``, ``FLAT_GRAD_COPIES``), which passes them in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turbotune.ops import spare_columns

__all__ = ["copies", "gradient_buffer", "offer", "rows", "same_view"]


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``[rows, last dim]`` view."""
    return t.view(-1, t.shape[-1])


def gradient_buffer(like: torch.Tensor, room: bool) -> torch.Tensor:
    """A ``like``-shaped gradient buffer, with spare columns behind each row when ``room``."""
    width = like.shape[-1]
    buffer = spare_columns.rows_with_room(
        like.numel() // width, width, like.dtype, like.device, room=room
    )
    return buffer.view(like.shape)


def offer(t: torch.Tensor) -> None:
    """Offer the spare columns behind a gradient buffer to the next backward capture."""
    spare_columns.offer_room(rows(t))


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same view of the same memory."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def copies(grads: Sequence[torch.Tensor | None], flat: bool) -> list[torch.Tensor | None]:
    """Fresh copies of the static gradient buffers (``None`` kept in place): views of one new
    flat buffer filled by one ``_foreach_copy_`` when ``flat`` and the gradients share dtype
    and device, else one clone each."""
    present = [g for g in grads if g is not None]
    same = present and all(
        g.dtype == present[0].dtype and g.device == present[0].device for g in present
    )
    if not (flat and same and len(present) > 1):
        return [g.clone() if g is not None else None for g in grads]
    buffer = torch.empty(sum(g.numel() for g in present), dtype=present[0].dtype,
                         device=present[0].device)  # fmt: skip
    views, offset = [], 0
    for g in present:
        views.append(buffer[offset : offset + g.numel()].view(g.shape))
        offset += g.numel()
    torch._foreach_copy_(views, present)
    it = iter(views)
    return [next(it) if g is not None else None for g in grads]
