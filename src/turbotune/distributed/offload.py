"""Offloaded gradient checkpointing: checkpointed block inputs live in host memory.

Design note. Gradient checkpointing keeps one tensor per decoder layer, its input hidden state
(``[batch, seq, hidden]``; 64 MiB per layer for Llama-8B at 8x1024 in bf16, 2 GiB over 32
layers). :func:`offloaded_checkpoint` keeps that tensor on the host instead, and stays off the
critical path of the step:

* forward: the input is copied device -> host on a side stream (``d2h``) that waits on an event
  of the compute stream; the compute stream never waits for the copy. ``record_stream`` keeps the
  source's memory from being reused before the copy has read it. The most recent input also
  keeps its device copy (until the next layer is offloaded), so the first layer of the backward
  (the last of the forward) needs no copy back.
* backward: layer ``i`` takes its input from a prefetch (or copies it now), and at once starts
  copying the input of the layer it back-propagates into next (``i - 1``) host -> device on a
  second side stream (``h2d``), under layer ``i``'s recomputation and backward. The compute
  stream waits on the prefetch's event before it reads the tensor. The device buffer is
  allocated on the compute stream (so the caching allocator reuses the compute stream's free
  blocks), and the copy waits for the compute stream first, as the block may still be in use by
  kernels already queued there.
* host buffers come from :class:`HostBufferPool`: pinned once, reused every step (allocating
  pinned memory per step costs far more than the copies). A buffer returns to the pool with the
  event of its last read; the next device -> host copy into it waits on that event.

On CPU tensors the same code runs with plain copies and no streams (the tests' path).

The checkpoint itself is the reentrant scheme of ``torch.utils.checkpoint``: forward under
``no_grad``, backward recomputes with grad under the saved RNG state (dropout masks repeat) and
autocast state, then back-propagates through the recomputation. Related: the "offloaded
activation checkpointing" of Unsloth and torchtune's ``OffloadActivations`` (both pinned host
copies on side streams); this one offloads only the checkpointed inputs.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ActivationOffloader", "HostBufferPool", "default_offloader", "offloaded_checkpoint"]


@dataclass
class HostBuffer:
    """A flat byte buffer on the host and the event after which it may be written again."""

    data: torch.Tensor
    """``uint8 [capacity]``, pinned when it serves CUDA tensors."""
    pinned: bool
    free_after: Any = None
    """``torch.cuda.Event`` of the last copy that reads it (``None``: free now)."""

    @property
    def capacity(self) -> int:
        return self.data.numel()

    def view(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The first bytes of the buffer as a contiguous ``dtype`` tensor of ``shape``."""
        nbytes = shape.numel() * dtype.itemsize
        return self.data[:nbytes].view(dtype).view(shape)


class HostBufferPool:
    """Host buffers reused across steps: best fit by size, allocated only on a miss.

    The batch shape may change between steps (padded batches): any idle buffer at least as large
    serves, and on a miss the idle buffers too small for the request are dropped (they are stale
    once shapes grow), so the pool holds about one step's worth of the largest shape.
    """

    def __init__(self) -> None:
        self._idle: dict[bool, list[HostBuffer]] = {True: [], False: []}
        self._lock = threading.Lock()  # the backward thread releases, the forward acquires
        self.allocations = 0
        """Buffers allocated so far (a steady-state training loop stops adding to it)."""
        self.allocated_bytes = 0
        """Bytes of the buffers the pool holds (idle and lent)."""

    def acquire(self, nbytes: int, *, pinned: bool) -> HostBuffer:
        """A buffer of at least ``nbytes`` bytes (its ``free_after`` must be waited on)."""
        with self._lock:
            idle = self._idle[pinned]
            fits = [b for b in idle if b.capacity >= nbytes]
            if fits:
                best = min(fits, key=lambda b: b.capacity)
                idle.remove(best)
                return best
            for stale in [b for b in idle if b.capacity < nbytes]:
                idle.remove(stale)
                self.allocated_bytes -= stale.capacity
            self.allocations += 1
            self.allocated_bytes += nbytes
        data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        return HostBuffer(data, pinned)

    def release(self, buffer: HostBuffer, free_after: Any = None) -> None:
        """Give ``buffer`` back; it may be written once ``free_after`` (an event) completes."""
        buffer.free_after = free_after
        with self._lock:
            self._idle[buffer.pinned].append(buffer)

    @property
    def idle(self) -> int:
        """Buffers waiting in the pool."""
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def clear(self) -> None:
        """Drop every idle buffer (lent ones come back as usual)."""
        with self._lock:
            for idle in self._idle.values():
                self.allocated_bytes -= sum(b.capacity for b in idle)
                idle.clear()


class OffloadSlot:
    """One offloaded tensor: its host copy, and whatever device copy exists."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.buffer: HostBuffer | None = None
        self.copied: Any = None
        """Event after the device -> host copy (CUDA)."""
        self.device_copy: torch.Tensor | None = None
        """The source itself, kept while this is the newest slot; or the prefetched copy."""
        self.ready: Any = None
        """Event after the prefetch's host -> device copy (CUDA; ``None``: usable now)."""
        self.prev: weakref.ref[OffloadSlot] | None = None
        """The slot offloaded just before this one: the next to be fetched in backward."""
        self.pool: HostBufferPool | None = None
        self.fetched = False

    def _return_buffer(self, free_after: Any) -> None:
        if self.buffer is not None and self.pool is not None:
            self.pool.release(self.buffer, free_after)
        self.buffer = None

    def __del__(self) -> None:
        # A graph freed without backward (evaluation under grad, an exception) still gives the
        # buffer back, and an unused prefetch is not freed under its own copy.
        with contextlib.suppress(Exception):
            self._return_buffer(self.copied)
            if self.device_copy is not None and self.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready)


class ActivationOffloader:
    """Moves tensors to the host and back on side streams; one per process is enough."""

    def __init__(self, pool: HostBufferPool | None = None) -> None:
        self.pool = pool if pool is not None else HostBufferPool()
        self._streams: dict[int, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self._newest: weakref.ref[OffloadSlot] | None = None
        self.prefetches = 0
        """Host -> device copies started ahead of use (one per layer but the last, per step)."""
        self.waited_copies = 0
        """Copies back started only when the tensor was needed (a missed prefetch)."""

    def _side_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = (torch.cuda.Stream(index), torch.cuda.Stream(index))
        return self._streams[index]

    def offload(self, t: torch.Tensor) -> OffloadSlot:
        """Start copying ``t`` to the host; the returned slot gives it back in :meth:`fetch`."""
        slot = OffloadSlot(t.shape, t.dtype, t.device)
        slot.pool = self.pool
        slot.buffer = self.pool.acquire(t.numel() * t.element_size(), pinned=t.is_cuda)
        host = slot.buffer.view(t.shape, t.dtype)
        if t.is_cuda:
            d2h, _ = self._side_streams(t.device)
            d2h.wait_stream(torch.cuda.current_stream(t.device))  # t is written by queued kernels
            if slot.buffer.free_after is not None:
                d2h.wait_event(slot.buffer.free_after)  # a previous prefetch still reads it
            with torch.cuda.stream(d2h):
                host.copy_(t, non_blocking=True)
                slot.copied = d2h.record_event()
            t.record_stream(d2h)  # its memory is not reused before the copy has read it
        else:
            host.copy_(t)
        newest = self._newest() if self._newest is not None else None
        if newest is not None and not newest.fetched:
            newest.device_copy = None  # only the newest keeps its device copy
            slot.prev = self._newest
        slot.device_copy = t
        self._newest = weakref.ref(slot)
        return slot

    def fetch(self, slot: OffloadSlot) -> torch.Tensor:
        """The slot's tensor on its device (usable on the current stream); prefetches the
        slot offloaded before it."""
        if slot.fetched:
            raise RuntimeError(_TWICE)
        if slot.device_copy is None:
            self._copy_back(slot)
            self.waited_copies += 1
        if slot.ready is not None:
            torch.cuda.current_stream(slot.device).wait_event(slot.ready)
        out, slot.device_copy, slot.fetched = slot.device_copy, None, True
        slot._return_buffer(slot.copied)  # a no-op once _copy_back gave it back
        prev = slot.prev() if slot.prev is not None else None
        if prev is not None:
            self.prefetch(prev)
        return out

    def prefetch(self, slot: OffloadSlot) -> None:
        """Start the host -> device copy of ``slot`` (no-op if it is on the device or used)."""
        if slot.fetched or slot.device_copy is not None or slot.buffer is None:
            return
        self._copy_back(slot)
        self.prefetches += 1

    def _copy_back(self, slot: OffloadSlot) -> None:
        assert slot.buffer is not None, "an offload slot lost its host buffer"
        host = slot.buffer.view(slot.shape, slot.dtype)
        if slot.device.type != "cuda":
            slot.device_copy = host.clone()
            slot._return_buffer(None)
            return
        _, h2d = self._side_streams(slot.device)
        # Allocated on the compute stream: its free blocks are reused, and the tensor belongs
        # to the stream that reads it. The copy waits for the kernels queued there so far (the
        # block may be one they still use) and for the offload's copy into the host buffer.
        dev = torch.empty(slot.shape, dtype=slot.dtype, device=slot.device)
        h2d.wait_stream(torch.cuda.current_stream(slot.device))
        h2d.wait_event(slot.copied)
        with torch.cuda.stream(h2d):
            dev.copy_(host, non_blocking=True)
            slot.ready = h2d.record_event()
        slot._return_buffer(slot.ready)
        slot.device_copy = dev


_TWICE = (
    "an offloaded checkpoint was back-propagated twice; its input is gone "
    "(retain_graph is not supported with activation offload)"
)

_DEFAULT: ActivationOffloader | None = None


def default_offloader() -> ActivationOffloader:
    """The process's shared offloader (one host pool, one pair of side streams per GPU)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = ActivationOffloader()
    return _DEFAULT


# --- the checkpoint --------------------------------------------------------------------------


@dataclass
class _ReplayState:
    """What the recomputation must see as the forward saw it: RNG and autocast."""

    device: torch.device
    cpu_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    autocast: list[tuple[str, bool, torch.dtype]]
    autocast_cache: bool

    @classmethod
    def capture(cls, device: torch.device) -> _ReplayState:
        types = ["cpu"] if device.type == "cpu" else [device.type, "cpu"]
        return cls(
            device,
            torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in types],
            torch.is_autocast_cache_enabled(),
        )

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.cuda_rng is not None else []
        with (
            torch.random.fork_rng(devices=devices, device_type="cuda"),
            contextlib.ExitStack() as stack,
        ):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(
                    torch.autocast(
                        kind, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache
                    )
                )
            yield


class _OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint of ``run(hidden)`` whose saved input lives in host memory.

    ``anchor`` is an empty tensor that requires grad, so the output requires grad even when
    ``hidden`` does not (frozen embeddings), as the reentrant scheme needs.
    """

    @staticmethod
    def forward(ctx, run, offloader: ActivationOffloader, hidden: torch.Tensor, anchor):
        ctx.run, ctx.offloader = run, offloader
        ctx.hidden_requires_grad = hidden.requires_grad
        ctx.state = _ReplayState.capture(hidden.device)
        ctx.slot = offloader.offload(hidden.detach())
        out = run(hidden)  # autograd.Function.forward runs without grad
        return out if isinstance(out, tuple) else (out,)

    @staticmethod
    def backward(ctx, *grads):
        slot, ctx.slot = ctx.slot, None
        if slot is None:
            raise RuntimeError(_TWICE)
        hidden = ctx.offloader.fetch(slot).detach().requires_grad_(ctx.hidden_requires_grad)
        with ctx.state.replay(), torch.enable_grad():
            out = ctx.run(hidden)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g)
            for o, g in zip(outs, grads, strict=False)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return None, None, hidden.grad if ctx.hidden_requires_grad else None, None


def offloaded_checkpoint(
    run: Callable[[torch.Tensor], Any],
    hidden: torch.Tensor,
    offloader: ActivationOffloader | None = None,
) -> tuple[Any, ...]:
    """``run(hidden)``, checkpointed, with ``hidden`` kept in host memory until backward.

    Args:
        run: the block as a function of its input hidden state (other inputs bound).
        hidden: ``[batch, seq, hidden]`` (any shape) input of the block.
        offloader: whose pool and streams to use (default: :func:`default_offloader`).

    Returns:
        The block's outputs as a tuple (one element when it returns a tensor).
    """
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    return _OffloadedCheckpoint.apply(run, offloader or default_offloader(), hidden, anchor)
