"""Spare columns behind a normalized activation, so a folded LoRA group needs no copy of it.

Design note. With adapters folded into the base matmul (``ops/lora_fold.py``) a group of
projections multiplies ``[x | T]`` (``T = x A^T``, the adapters' rank columns) instead of ``x``.
Building ``[x | T]`` costs a full copy of ``x``: at Llama-8B shape and 4096 tokens 32 MB read
and written twice per layer (q/k/v and gate/up), 44 us each as a strided copy, ~3 ms of a
260 ms step and twice that under checkpointing. The activation those groups read is the output
of an RMSNorm, and the norm can simply allocate its output with spare columns to the right:
``[N, H + spare]`` and return the ``[N, H]`` view. The group then writes ``T`` into the spare
columns and uses the whole row block as ``[x | T]``.

The handoff is explicit and one-shot: the norm *offers* its buffer (keyed by the data pointer
of the view it returns) and the first folded group that receives that very view *claims* it.
A second consumer of the same norm output (models whose attention and MLP share one norm) finds
nothing to claim and copies as before, so no two groups ever write the same spare columns.
Producers allocate through :func:`rows_with_room`, consumers build their wide buffer
through :func:`widened`; :func:`offer` and :func:`claim` are the two halves underneath.

A producer can also be told *where* to write. CUDA graphs of a layer stack (``ops/graphs.py``)
hand each layer's input gradient to the previous layer's backward graph through a fixed buffer;
inside :func:`gradient_into` the add-norm backward that computes that gradient allocates it
with :func:`gradient_rows`, which returns the graphs' buffer, instead of a fresh one that the
graph would then copy (a strided 32 MB copy per layer at Llama-8B shape, and the spare columns
lost with it).

How many columns to offer is learned: a group that finds too few (or none) asks for more, and
later norms allocate them (rounded up to 16, at most ``MAX_SPARE``). The first step therefore
copies; every later step, including CUDA-graph captures and checkpoint recomputations, does not.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch

__all__ = [
    "MAX_SPARE",
    "claim",
    "gradient_into",
    "gradient_rows",
    "has_room",
    "offer",
    "offer_room",
    "reset",
    "rows_with_room",
    "wanted",
    "widened",
]

# Off: norms allocate no spare columns and folded groups always copy (A/B and tests).
ENABLED = True
MAX_SPARE = 256
# Offers not claimed stay only until newer ones push them out: a handful of norms per layer.
_KEEP = 16
_offers: OrderedDict[int, tuple[int, int]] = OrderedDict()  # data_ptr -> (row stride, spare)
_wanted = 0
_destinations: dict[int, torch.Tensor] = {}  # data_ptr of a tensor -> where its gradient goes
claims = 0  # successful claims so far (tests, logs)


def wanted() -> int:
    """Spare columns a norm should allocate now (0 until a folded group has asked)."""
    return _wanted if ENABLED else 0


def reset() -> None:
    """Forget the learned width and every pending offer (tests)."""
    global _wanted, claims
    _wanted = claims = 0
    _offers.clear()


def offer(rows: torch.Tensor, spare: int) -> None:
    """Register ``rows`` (``[N, H]``, a column view of an ``[N, H + spare]`` buffer)."""
    if spare <= 0 or rows.numel() == 0:
        return
    _offers[rows.data_ptr()] = (rows.stride(0), spare)
    _offers.move_to_end(rows.data_ptr())
    while len(_offers) > _KEEP:
        _offers.popitem(last=False)


def rows_with_room(
    n_rows: int, n_cols: int, dtype: torch.dtype, device: torch.device, room: bool = True
) -> torch.Tensor:
    """A new ``[n_rows, n_cols]`` output with :func:`wanted` spare columns behind it, offered
    (the producers' side: norms, the add-norm backward). ``room=False``: a plain tensor."""
    spare = wanted() if room else 0
    rows = torch.empty((n_rows, n_cols + spare), dtype=dtype, device=device)[:, :n_cols]
    offer(rows, spare)
    return rows


@contextlib.contextmanager
def gradient_into(x: torch.Tensor, rows: torch.Tensor) -> Iterator[None]:
    """While active, a producer of the gradient of ``x`` that allocates it through
    :func:`gradient_rows` writes it into ``rows`` (``[N, H]``, unit column stride; any spare
    columns behind it are offered as usual). Keyed by ``x``'s data pointer: a view of ``x``
    (``x.view(-1, H)``) matches too."""
    key = x.data_ptr()
    _destinations[key] = rows
    try:
        yield
    finally:
        _destinations.pop(key, None)


def gradient_rows(
    x: torch.Tensor, n_rows: int, n_cols: int, dtype: torch.dtype, room: bool = True
) -> torch.Tensor:
    """The ``[n_rows, n_cols]`` buffer for the gradient of ``x``: the one registered by
    :func:`gradient_into` when it fits (shape, dtype, device, unit column stride), else a new
    one from :func:`rows_with_room`."""
    rows = _destinations.get(x.data_ptr()) if _destinations else None
    if (
        rows is not None
        and rows.shape == (n_rows, n_cols)
        and rows.dtype == dtype
        and rows.device == x.device
        and rows.stride(1) == 1
    ):
        if room:
            offer_room(rows)
        return rows
    return rows_with_room(n_rows, n_cols, dtype, x.device, room=room)


def offer_room(rows: torch.Tensor) -> None:
    """Offer whatever spare columns stand behind ``rows`` (``[N, H]`` with row stride ``> H``;
    none: nothing is offered)."""
    if rows.stride(0) > rows.shape[1]:
        offer(rows, rows.stride(0) - rows.shape[1])


def has_room(x: torch.Tensor, columns: int) -> bool:
    """Whether :func:`claim` would hand out ``columns`` spare columns behind ``x`` now. Claims
    nothing and learns nothing: a consumer that can do without decides with it."""
    return ENABLED and _fits(x, _offers.get(x.data_ptr()) if _claimable(x) else None, columns)


def _claimable(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.stride(1) == 1


def _fits(x: torch.Tensor, entry: tuple[int, int] | None, columns: int) -> bool:
    """An offer ``(row stride, spare)`` covers ``columns`` behind ``x``'s rows."""
    return entry is not None and entry[0] == x.stride(0) and entry[1] >= columns


def widened(x: torch.Tensor, columns: int) -> torch.Tensor:
    """``[x | room]`` (``[N, H + columns]``) for a consumer that writes the last ``columns``:
    the claimed spare columns behind ``x``, else a new buffer holding a copy of ``x``."""
    wide = claim(x, columns)
    if wide is None:
        wide = torch.empty((x.shape[0], x.shape[1] + columns), dtype=x.dtype, device=x.device)
        wide.narrow(1, 0, x.shape[1]).copy_(x)
    return wide


def claim(x: torch.Tensor, columns: int) -> torch.Tensor | None:
    """``[x | spare]`` as one ``[N, H + columns]`` view, if ``x`` was offered with enough room.

    Args:
        x: ``[N, H]`` the group's input (unit column stride).
        columns: spare columns the caller will write (already padded).

    Returns:
        the widened view (the caller owns its last ``columns`` columns from now on), or None
        (the caller copies; the next norms will offer ``columns``).
    """
    global _wanted, claims
    if not ENABLED:
        return None
    entry = _offers.pop(x.data_ptr(), None) if _claimable(x) else None
    if _fits(x, entry, columns):
        claims += 1
        return x.as_strided((x.shape[0], x.shape[1] + columns), (x.stride(0), 1))
    if columns <= MAX_SPARE:
        _wanted = max(_wanted, -(-columns // 16) * 16)
    return None
