"""Sorting token slots by expert: the plan every grouped expert product follows.

Design note. A token routed to ``k`` experts owns ``k`` *slots* (slot ``t * k + j`` is its j-th
choice). Sorting the ``T * k`` slots by expert id (stably, so ties keep token order and results
are deterministic) makes each expert's rows one contiguous run; ``ends`` (the cumulative counts,
int32) is the ``offs`` argument of ``torch._grouped_mm`` and the row bounds of the Triton kernels.
Nothing here syncs with the device: counts come from ``scatter_add``, not ``bincount``. Only the
per-expert ``mm`` loop needs the counts on the host: :meth:`ExpertPlan.on_host` reads them once
(one sync) into ``sizes``, which every product of the layer, forward and backward, then reuses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


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
        sizes: ``counts`` on the host (a tuple of ints), or None until :meth:`on_host` read them.
    """

    order: torch.Tensor
    counts: torch.Tensor
    ends: torch.Tensor
    top_k: int
    row_of_slot: torch.Tensor
    sizes: tuple[int, ...] | None = None

    def on_host(self) -> ExpertPlan:
        """This plan with ``sizes`` filled (one device sync, none when already filled)."""
        if self.sizes is not None:
            return self
        return self._replace(sizes=tuple(self.counts.tolist()))

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_slots(self) -> int:
        return self.order.shape[0]


def plan_experts(top_k_index: torch.Tensor, num_experts: int) -> ExpertPlan:
    """Sort the slots of ``top_k_index`` (``[T, k]`` expert ids) by expert."""
    flat = top_k_index.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, dim=0).to(torch.int32)
    row_of_slot = torch.empty_like(order)
    row_of_slot[order] = torch.arange(order.shape[0], device=order.device)
    return ExpertPlan(order, counts, ends, top_k_index.shape[-1], row_of_slot)
