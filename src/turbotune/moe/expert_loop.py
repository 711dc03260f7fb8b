"""Expert products as one cuBLAS ``mm`` per expert over slices of the sorted rows.

Design note. When a layer has few experts and each gets many rows (Mixtral-8x7B at 8192 tokens:
8 experts, ~2048 of the 16384 sorted rows each), every expert product is a large dense GEMM
(``[2048, 4096] x [4096, 28672]`` for gate/up) that cuBLAS runs close to peak, in the three
layouts of ``nn.Linear`` (forward ``A W^T``, input gradient ``G W``, weight gradient ``G^T A``),
the ones cuBLAS is tuned best for. Expert ``e`` owns the contiguous sorted rows
``[start_e, end_e)``, so its operands are slices of one buffer (no per-expert gather) and its
output is written with ``out=`` into its slice of one preallocated buffer (nothing concatenated);
a weight gradient goes straight into its expert's ``[N, K]`` slice of one ``[E, N, K]`` tensor, and
only experts without rows are zero-filled.

The loop needs the row counts on the host: one ``.tolist()`` per layer
(:meth:`~turbotune.moe.plan.ExpertPlan.on_host`), reused by every product of the layer and by
its backward (a plan without ``sizes`` reads them itself, one sync per call: the ``loop``
reference backend). Nothing here can be captured in a CUDA graph (the sizes are data).

Where it loses: many experts with few rows each (Qwen3-30B-A3B at 8192 tokens: 128 experts of
~512 rows, 768 ``mm`` calls per layer forward+backward, each a few microseconds of GPU work behind
~20-40 us of host work): one ``torch._grouped_mm`` launch per product is faster there.

Two switches, off until measured on the GPU (``benchmarks/moe_layer.py``, impls
``tt-mm_loop:s1`` and ``tt-mm_loop:g4096``), target the last partial wave of tiles of each
expert's GEMM: an output of ``[2048, 4096]`` is ~2 waves of 128x256 tiles on 132 SMs, and 2100
rows make it 3. :data:`SIDE_STREAMS` alternates consecutive experts' products over the current
stream and side streams, so one GEMM's tail overlaps the next one's start (the side streams wait
for the current stream before the loop and the current stream for them after it, so every later
use of a tensor and every reuse of its memory is ordered after the products).
:data:`GROUPED_MAX_COLUMNS` runs the narrow products as one ``torch._grouped_mm`` instead: a
single launch over every expert's tiles has a single tail.
"""

from __future__ import annotations

import torch

from turbotune.moe.plan import ExpertPlan

SIDE_STREAMS = 0
"""Side CUDA streams the products of consecutive experts alternate over (0: one stream)."""

GROUPED_MAX_COLUMNS = 0
"""Products of ``mm_loop`` with at most this many output columns run as one
``torch._grouped_mm`` instead (0: none). Narrow outputs (``[2048, 4096]`` per expert: the down
projection, the gate/up input gradient) are the ones whose last wave of tiles idles most; one
grouped launch over every expert's tiles has a single tail. Off until measured."""

_STREAMS: dict[tuple[torch.device, int], torch.cuda.Stream] = {}


def expert_bounds(plan: ExpertPlan) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every expert with rows, from ``plan.sizes`` (one device sync
    when the plan has no host sizes)."""
    sizes = plan.sizes if plan.sizes is not None else plan.counts.tolist()
    bounds, start = [], 0
    for expert, rows in enumerate(sizes):
        if rows:
            bounds.append((expert, start, start + rows))
        start += rows
    return bounds


def _stream_of(device: torch.device, i: int, side: int) -> torch.cuda.Stream | None:
    """The stream of the ``i``-th product: None (the current stream) or side stream ``i % ...``."""
    lane = i % (side + 1)
    if lane == 0:
        return None
    key = (device, lane)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


class _Lanes:
    """Context that forks the side streams from the current stream and joins them back."""

    def __init__(self, device: torch.device, count: int) -> None:
        self.side = SIDE_STREAMS if device.type == "cuda" and count > 1 else 0
        self.device = device

    def __enter__(self) -> _Lanes:
        if self.side:
            main = torch.cuda.current_stream(self.device)
            for lane in range(1, self.side + 1):
                _stream_of(self.device, lane, self.side).wait_stream(main)
        return self

    def run(self, i: int, fn, *args, **kwargs) -> None:
        stream = _stream_of(self.device, i, self.side) if self.side else None
        if stream is None:
            fn(*args, **kwargs)
            return
        with torch.cuda.stream(stream):
            fn(*args, **kwargs)

    def __exit__(self, *exc) -> None:
        if self.side:
            main = torch.cuda.current_stream(self.device)
            for lane in range(1, self.side + 1):
                main.wait_stream(_stream_of(self.device, lane, self.side))


def mm_rows(a: torch.Tensor, w_t: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """``out[s] = a[s] @ w_t[e(s)]`` over the sorted rows, one ``mm`` per expert.

    Args:
        a: ``[S, K]`` sorted rows.
        w_t: ``[E, K, N]`` (any strides; the forward passes ``W.transpose(1, 2)``, the input
            gradient ``W`` itself).
        plan: the sort plan (``sizes`` read once when missing).

    Returns:
        ``[S, N]`` tensor of ``a.dtype``.
    """
    out = a.new_empty(a.shape[0], w_t.shape[2])
    bounds = expert_bounds(plan)
    with _Lanes(a.device, len(bounds)) as lanes:
        for i, (e, start, end) in enumerate(bounds):
            lanes.run(i, torch.mm, a[start:end], w_t[e], out=out[start:end])
    return out


def prefers_grouped(a: torch.Tensor, w_t: torch.Tensor) -> bool:
    """Whether ``mm_loop`` runs ``a [S, K] x w_t [E, K, N]`` as one ``torch._grouped_mm``
    (:data:`GROUPED_MAX_COLUMNS`; CUDA bf16 with 16-byte strides, as CUTLASS wants them)."""
    return (
        0 < w_t.shape[2] <= GROUPED_MAX_COLUMNS
        and a.is_cuda
        and a.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and a.shape[1] % 8 == 0
        and w_t.shape[2] % 8 == 0
    )


def mm_wgrad(g: torch.Tensor, a: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """``dW[e] = g_e^T a_e``, one ``mm`` per expert into its slice of the result.

    Args:
        g: ``[S, N]`` sorted output gradient.
        a: ``[S, K]`` sorted input rows.
        plan: the sort plan.

    Returns:
        ``[E, N, K]`` tensor of ``a.dtype`` (zero for experts without rows).
    """
    dw = a.new_empty(plan.num_experts, g.shape[1], a.shape[1])
    bounds = expert_bounds(plan)
    if len(bounds) < plan.num_experts:
        filled = {e for e, _, _ in bounds}
        for e in range(plan.num_experts):
            if e not in filled:
                dw[e].zero_()
    with _Lanes(a.device, len(bounds)) as lanes:
        for i, (e, start, end) in enumerate(bounds):
            lanes.run(i, torch.mm, g[start:end].t(), a[start:end], out=dw[e])
    return dw
