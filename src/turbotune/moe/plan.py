"""Sorting token slots by expert: the plan every grouped expert product follows.

Design note. A token routed to ``k`` experts owns ``k`` *slots* (slot ``t * k + j`` is its j-th
choice). Sorting the ``T * k`` slots by expert id (stably, so ties keep token order and results
are deterministic) makes each expert's rows one contiguous run; ``ends`` (the cumulative counts,
int32) is the ``offs`` argument of ``torch._grouped_mm`` and the row bounds of the Triton kernels.
Nothing here syncs with the device: counts come from ``scatter_add``, not ``bincount``. Only the
per-expert ``mm`` loop needs the counts on the host: :meth:`ExpertPlan.on_host` starts one
non-blocking copy of them to pinned host memory (:class:`HostCounts`), and the first read of
``sizes`` waits for that copy only, so the work queued between the two (the dequantization of a
quantized stack, the gather of the tokens into sorted rows) runs on the GPU while the host waits,
instead of the GPU idling from the end of the routing until the host has launched the first
product. Every product of the layer, forward and backward, then reuses the same sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from turbotune.moe import plan_kernel

ASYNC_COUNTS = True
"""Copy the counts without blocking and wait on first use (False: ``tolist()`` at once, the
old way, kept for ``benchmarks/moe_layer.py``'s A/B)."""


class HostCounts:
    """Rows per expert on their way to the host: one non-blocking device-to-host copy into pinned
    memory, waited for (an event, not the whole stream) on the first :meth:`get`.

    The pinned buffer and the event are let go of in :meth:`get`, not when the plan dies: the
    plan lives on in the autograd graph, and freeing a pinned block records an event on the
    current stream, which fails ("invalid argument") if that happens while a CUDA graph is
    being captured, e.g. the next step's layer graphs (``ops/graphs.py``)."""

    def __init__(self, counts: torch.Tensor) -> None:
        self._sizes: tuple[int, ...] | None = None
        self._host = self._event = None
        if not counts.is_cuda or not ASYNC_COUNTS:
            self._sizes = tuple(counts.tolist())  # nothing to overlap on CPU
            return
        self._host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        self._host.copy_(counts, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def get(self) -> tuple[int, ...]:
        """The counts as ints (waits for the copy the first time)."""
        if self._sizes is None:
            self._event.synchronize()
            self._sizes = tuple(self._host.tolist())
            self._host = self._event = None
        return self._sizes


class ExpertPlan(NamedTuple):
    """Slots sorted by expert.

    Attributes:
        order: ``[S]`` int64 slot ids (``S = T * k``) sorted by expert; the token of sorted row
            ``s`` is ``order[s] // top_k``.
        counts: ``[E]`` int64 rows per expert.
        ends: ``[E]`` int32 cumulative counts (expert ``e`` owns sorted rows
            ``ends[e] - counts[e] .. ends[e] - 1``).
        top_k: experts per token.
        row_of_slot: ``[S]`` int64 inverse of ``order``: the sorted row of slot ``s``
            (``row_of_slot[order[r]] = r``), what :func:`~turbotune.moe.combine.combine_rows`
            reads the down projection's sorted rows through.
        host: the counts on their way to the host (:meth:`on_host`), or None.
        token_rows: ``[S]`` int64 ``order // top_k`` (the token of each sorted row) when the
            plan kernel wrote it, else None (see :attr:`tokens`).
    """

    order: torch.Tensor
    counts: torch.Tensor
    ends: torch.Tensor
    top_k: int
    row_of_slot: torch.Tensor
    host: HostCounts | None = None
    token_rows: torch.Tensor | None = None

    def on_host(self) -> ExpertPlan:
        """This plan with its counts copied to the host (started here, waited for on the first
        read of :attr:`sizes`; nothing new when already started)."""
        if self.host is not None:
            return self
        return self._replace(host=HostCounts(self.counts))

    @property
    def sizes(self) -> tuple[int, ...] | None:
        """Rows per expert as host ints (the one wait for the copy), or None before
        :meth:`on_host`."""
        return None if self.host is None else self.host.get()

    @property
    def tokens(self) -> torch.Tensor:
        """``[S]`` int64 token of each sorted row (``order // top_k``)."""
        return self.order // self.top_k if self.token_rows is None else self.token_rows

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_slots(self) -> int:
        return self.order.shape[0]


def plan_experts(top_k_index: torch.Tensor, num_experts: int) -> ExpertPlan:
    """Sort the slots of ``top_k_index`` (``[T, k]`` expert ids) by expert: a Triton counting sort
    for few experts (:mod:`turbotune.moe.plan_kernel`, same result), else the eager sort."""
    flat = top_k_index.reshape(-1)
    top_k = top_k_index.shape[-1]
    if plan_kernel.fits(flat, num_experts):
        order, counts, ends, row_of_slot, tokens = plan_kernel.expert_plan_launch(
            flat.contiguous(), num_experts, top_k
        )
        return ExpertPlan(order, counts, ends, top_k, row_of_slot, token_rows=tokens)
    return plan_experts_reference(top_k_index, num_experts)


def plan_experts_reference(top_k_index: torch.Tensor, num_experts: int) -> ExpertPlan:
    """The eager :func:`plan_experts`: a stable sort, ``scatter_add`` counts, their ``cumsum``."""
    flat = top_k_index.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, dim=0).to(torch.int32)
    row_of_slot = torch.empty_like(order)
    row_of_slot[order] = torch.arange(order.shape[0], device=order.device)
    return ExpertPlan(order, counts, ends, top_k_index.shape[-1], row_of_slot)
