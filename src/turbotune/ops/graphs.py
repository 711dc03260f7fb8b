"""CUDA graphs of the decoder layers: one replay per layer instead of hundreds of launches.

Design note. Measured on an H100 (Llama-3.1-8B shape, NF4 + LoRA, fused ops, 4 x 1024): the
host needs ~230 ms to issue one training step (Python, Triton's launcher, cuBLAS calls) and
the GPU ~235 ms to run it, so the step (~280 ms) is bound by the host as much as by the GPU.
A CUDA graph per layer forward and per layer backward replays the same kernels for a few
microseconds of host time, and the step becomes GPU-bound.

How (``torch.cuda.make_graphed_callables``'s scheme, specialised for a stack of layers):

* The layers of a model are captured together, the first time a training forward sees a
  shape again (the first call of a shape runs eagerly: it compiles and autotunes the Triton
  kernels, which must not happen inside a capture). All graphs share one memory pool and are
  captured in the order they replay: forward 0..N-1, then backward N-1..0, so the pool's
  memory is reused as it is in an eager step.
* Buffers are chained, not copied: layer ``i+1`` is captured reading layer ``i``'s output
  buffer, and layer ``i-1``'s backward reads the input gradient that layer ``i``'s backward
  wrote (two ping-pong buffers). Per step only the first layer's input and the shared
  per-step tensors (rotary ``cos``/``sin``, masks, positions) are copied in.
* Each layer is one autograd ``Function`` (``_Replay``): forward replays the layer's forward
  graph, backward its backward graph, and returns the input gradient and *copies* of the
  parameter gradients (a buffer of the graph handed to autograd would become ``param.grad``
  and be overwritten by the next replay, which breaks gradient accumulation).

When (anything else runs the layer eagerly, with the same result):

* training with grad enabled, CUDA tensors, no activation checkpointing on the layer;
* no randomness: no ``nn.Dropout`` with ``p > 0`` and no attention dropout in the layer (a
  LoRA dropout mask is seeded on the host, a graph would replay one mask forever);
* keyword arguments that are tensors, tuples of tensors or plain constants (no KV cache, no
  per-batch Python values such as padding-free ``max_length``), and at most ``max_shapes``
  distinct shapes (a padding-free or variable-length run keeps finding new shapes: eager);
* one forward per backward: a second forward of a captured shape before the first one's
  backward ran (two forward passes in one loss) runs eagerly, so saved buffers stay intact.

A capture that fails (an operation that cannot be captured) logs why and turns graphs off for
the model; training goes on eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from turbotune.ops import graph_gradients, spare_columns
from turbotune.ops.graph_gradients import offer as _offer
from turbotune.ops.graph_gradients import rows as _rows
from turbotune.ops.graph_gradients import same_view as _same_view
from turbotune.ops.graph_inputs import describe as _describe
from turbotune.ops.graph_inputs import flatten_kwargs as _flatten_kwargs
from turbotune.ops.graph_inputs import rebuild_kwargs as _rebuild_kwargs

__all__ = ["LayerGraphs", "graphable_layers"]

log = logging.getLogger(__name__)


def graphable_layers(layers: Sequence[nn.Module]) -> str | None:
    """Why these layers cannot be graphed (``None`` when they can)."""
    for layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, nn.Dropout) and module.p > 0:
                return f"{name or type(layer).__name__} has dropout p={module.p}"
            p = getattr(module, "attention_dropout", 0.0)
            if isinstance(p, float) and p > 0:
                return f"{name} has attention dropout {p}"
    return None


@contextlib.contextmanager
def _swapped(
    layer: nn.Module, params: Sequence[nn.Parameter], aliases: Sequence[nn.Parameter]
) -> Iterator[None]:
    """Put ``aliases`` in place of ``params`` in ``layer``'s modules for the duration."""
    replace = {id(p): a for p, a in zip(params, aliases)}
    swapped = []
    for module in layer.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in replace:
                swapped.append((module, name, p))
    for module, name, p in swapped:
        module._parameters[name] = replace[id(p)]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


class _Replay(torch.autograd.Function):
    """Layer ``i`` of a :class:`_GraphSet`: forward and backward are graph replays."""

    @staticmethod
    def forward(ctx, graphs: _GraphSet, i: int, x: torch.Tensor, *params: torch.Tensor):
        ctx.graphs, ctx.i = graphs, i
        return graphs.replay_forward(i, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *ctx.graphs.replay_backward(ctx.i, grad))


class _GraphSet:
    """The forward and backward graphs of every layer for one input shape."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        inners: Sequence[Callable[..., Any]],
        params: Sequence[tuple[nn.Parameter, ...]],
        hidden: torch.Tensor,
        slots: Sequence[tuple[str, int]],
        tensors: Sequence[torch.Tensor],
        constants: tuple,
    ) -> None:
        self.params = params
        # The captures differentiate with respect to fresh leaves that share the parameters'
        # memory: a parameter's own AccumulateGrad node may still belong to an eager graph on
        # the default stream, and reaching it from the capture stream would break the capture.
        self.aliases = [tuple(nn.Parameter(p.detach()) for p in ps) for ps in params]
        self.layers = layers
        # Static inputs: the first layer's hidden state and the per-step tensors (cos/sin...).
        self.kw_static = [t.detach().clone() for t in tensors]
        kwargs = _rebuild_kwargs(slots, self.kw_static, constants)
        first = hidden.detach().clone().requires_grad_(hidden.requires_grad)
        self.pending = False
        self._capture(inners, first, kwargs)

    def _capture(self, inners, first: torch.Tensor, kwargs: dict) -> None:
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
            # Warm-up on the stream the captures run on: lazy CUDA work (cuBLAS handles and
            # workspaces of that stream, Triton compiles) stays out of the captures.
            with torch.cuda.stream(side):
                x = first
                for i, inner in enumerate(inners):
                    with _swapped(self.layers[i], self.params[i], self.aliases[i]):
                        out = inner(x, **kwargs)
                    wrt = ([x] if x.requires_grad else []) + list(self.aliases[i])
                    if wrt and out.requires_grad:
                        torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)
                    x = out.detach().requires_grad_(out.requires_grad)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.inputs, outs, self.fwd = [], [], []
            x = first
            for i, inner in enumerate(inners):
                graph = torch.cuda.CUDAGraph()
                swap = _swapped(self.layers[i], self.params[i], self.aliases[i])
                with swap, torch.cuda.graph(graph, pool=pool, stream=side):
                    out = inner(x, **kwargs)
                self.fwd.append(graph)
                self.inputs.append(x)
                outs.append(out)
                x = out.detach().requires_grad_(out.requires_grad)
            self.outputs = [o.detach() for o in outs]
            self._capture_backward(outs, pool, side)
        torch.cuda.synchronize()

    def _capture_backward(
        self, outs: list[torch.Tensor], pool: Any, side: torch.cuda.Stream
    ) -> None:
        n = len(outs)
        self.grad_out = [None] * n
        self.grad_in: list[torch.Tensor | None] = [None] * n
        self.param_grads: list[tuple] = [()] * n
        self.bwd: list[torch.cuda.CUDAGraph | None] = [None] * n
        # Input gradients alternate between two buffers: layer i-1's backward reads what
        # layer i's wrote, and the one before that is dead by then. The buffers have spare
        # columns (ops/spare_columns.py), and the backward that computes a layer's input
        # gradient writes it there directly (spare_columns.gradient_into) instead of into a
        # buffer of its own that would be copied: the reading layer's down projection then
        # finds room for its [dy | g] behind its output gradient, as in an eager step.
        ping = [self._gradient_buffer() for _ in range(2)]
        grad_out = self._gradient_buffer()
        self.grad_copies = 0  # layers whose input gradient is still copied (tests, logs)
        for i in reversed(range(n)):
            x, out = self.inputs[i], outs[i]
            self.grad_out[i] = grad_out
            wrt = ([x] if x.requires_grad else []) + list(self.aliases[i])
            if not out.requires_grad or not wrt:
                continue
            graph = torch.cuda.CUDAGraph()
            dest = ping[i % 2]
            _offer(grad_out)
            into = (
                spare_columns.gradient_into(x, _rows(dest))
                if GRADIENTS_IN_PLACE
                else contextlib.nullcontext()
            )
            with into, torch.cuda.graph(graph, pool=pool, stream=side):
                grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
                if x.requires_grad:
                    if not _same_view(grads[0], dest):
                        dest.copy_(grads[0])
                        self.grad_copies += 1
                    grads = grads[1:]
            self.bwd[i] = graph
            self.param_grads[i] = grads
            if x.requires_grad:
                self.grad_in[i] = dest
                grad_out = dest

    def _gradient_buffer(self) -> torch.Tensor:
        """A layer-output-shaped gradient buffer with spare columns behind each row."""
        return graph_gradients.gradient_buffer(self.outputs[-1], room=GRADIENTS_IN_PLACE)

    # ---- replay ----

    def start(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy the per-step tensors (cos/sin, masks...) into their static buffers (the first
        layer's input is copied by its replay)."""
        for static, t in zip(self.kw_static, tensors):
            if static.data_ptr() != t.data_ptr():
                static.copy_(t)
        self.pending = True

    def run(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return _Replay.apply(self, i, x, *self.params[i])

    def replay_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        static = self.inputs[i]
        if static.data_ptr() != x.data_ptr():
            static.detach().copy_(x)
        self.fwd[i].replay()
        return self.outputs[i].detach()  # a new alias each call: autograd marks it as output

    def replay_backward(self, i: int, grad: torch.Tensor) -> list[torch.Tensor | None]:
        if i == 0:
            self.pending = False
        graph = self.bwd[i]
        n_params = len(self.params[i])
        if graph is None:
            return [None] * (1 + n_params)
        static = self.grad_out[i]
        if static.data_ptr() != grad.data_ptr():
            static.copy_(grad)
        graph.replay()
        grad_in = self.grad_in[i]
        return [grad_in.detach() if grad_in is not None else None, *_copies(self.param_grads[i])]


# Off: the layers' input gradients go through plain buffers and one copy per layer, as
# before session 5 (A/B: ``benchmarks/ab_point.py ... --variants grads-in-place,grads-copied``:
# 245.7 vs 248.9 ms per step on an H100, reference workload 4 x 1024).
GRADIENTS_IN_PLACE = True

# One multi-tensor copy of a layer's parameter gradients instead of one clone each (~14 per
# layer for LoRA). H100, reference workload 4 x 1024: 252.3 vs 252.9 ms per step (A/B of
# ``benchmarks/ab_point.py ... --variants flat-grads,clone-grads``, session 5).
FLAT_GRAD_COPIES = True


def _copies(grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Fresh copies of the static gradient buffers (``graph_gradients.copies`` under
    ``FLAT_GRAD_COPIES``, read at each call so the switch can be flipped at run time)."""
    return graph_gradients.copies(grads, FLAT_GRAD_COPIES)


class LayerGraphs:
    """CUDA graphs for a model's decoder layers (wraps each layer's ``forward`` in place).

    Args:
        layers: the decoder layers, in call order; each is called as
            ``layer(hidden_states, **kwargs)`` and returns the new hidden state (a tensor).
        warmup_calls: eager training forwards of a shape before it is captured.
        max_shapes: distinct shapes captured at most (each holds its own activation memory).
    """

    def __init__(
        self, layers: Sequence[nn.Module], *, warmup_calls: int = 1, max_shapes: int = 1
    ) -> None:
        self.layers = list(layers)
        self.inners = [layer.forward for layer in self.layers]
        self._instance_forward = ["forward" in layer.__dict__ for layer in self.layers]
        self.params = [tuple(p for p in m.parameters() if p.requires_grad) for m in self.layers]
        self.warmup_calls, self.max_shapes = warmup_calls, max_shapes
        self.sets: dict[tuple, _GraphSet] = {}
        self.seen: dict[tuple, int] = {}
        self.disabled: str | None = graphable_layers(self.layers)
        self.captures = 0
        self._active: _GraphSet | None = None
        self._step_tensors: list[int] = []
        for i, layer in enumerate(self.layers):
            layer.forward = self._forward_of(i)
            layer.__dict__["_turbotune_graphs"] = self
        if self.disabled:
            log.info("CUDA graphs off: %s", self.disabled)

    def remove(self) -> None:
        """Restore the eager forwards and free the graphs."""
        for layer, inner, own in zip(self.layers, self.inners, self._instance_forward):
            if own:
                layer.forward = inner
            else:
                del layer.forward
            layer.__dict__.pop("_turbotune_graphs", None)
        self.sets.clear()
        self._active = None

    def _forward_of(self, i: int) -> Callable[..., Any]:
        inner = self.inners[i]

        @functools.wraps(inner)
        def forward(hidden_states, *args, **kwargs):
            graphs = None if args else self._graphs_for(i, hidden_states, kwargs)
            if graphs is None:
                return inner(hidden_states, *args, **kwargs)
            return graphs.run(i, hidden_states)

        return forward

    def _eligible(self, i: int, hidden: torch.Tensor) -> bool:
        layer = self.layers[i]
        return (
            self.disabled is None
            and hidden.is_cuda
            and torch.is_grad_enabled()
            and layer.training
            and not getattr(layer, "gradient_checkpointing", False)
            and "_turbotune_block_wrapped" not in layer.__dict__
            and not layer._forward_pre_hooks  # FSDP2 and other hooks run Python per call
            and not layer._forward_hooks
        )

    def _graphs_for(self, i: int, hidden: torch.Tensor, kwargs: dict) -> _GraphSet | None:
        if i > 0:
            active = self._active
            if active is None or not self._eligible(i, hidden):
                return None
            flat = _flatten_kwargs(kwargs)
            if flat is None or [id(t) for t in flat[1]] != self._step_tensors:
                return None
            return active
        self._active = None
        if not self._eligible(0, hidden):
            return None
        flat = _flatten_kwargs(kwargs)
        if flat is None:
            return None
        slots, tensors, constants = flat
        key = (
            _describe(hidden),
            tuple(slots),
            tuple(_describe(t) for t in tensors),
            constants,
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
        )
        graphs = self.sets.get(key)
        if graphs is None:
            graphs = self._maybe_capture(key, hidden, slots, tensors, constants)
            if graphs is None:
                return None
        if graphs.pending:  # a second forward before the first one's backward: eager
            return None
        graphs.start(tensors)
        self._active = graphs
        self._step_tensors = [id(t) for t in tensors]
        return graphs

    def _maybe_capture(self, key, hidden, slots, tensors, constants) -> _GraphSet | None:
        seen = self.seen[key] = self.seen.get(key, 0) + 1
        if seen <= self.warmup_calls or len(self.sets) >= self.max_shapes:
            return None
        current = [tuple(p for p in m.parameters() if p.requires_grad) for m in self.layers]
        if any(
            len(a) != len(b) or any(x is not y for x, y in zip(a, b))
            for a, b in zip(current, self.params)
        ):
            # FSDP2 swaps in gathered parameters whose memory moves between steps; a graph
            # would keep reading the old addresses.
            self.disabled = "the layers' parameters were replaced since (FSDP?)"
            log.warning("CUDA graphs off: %s", self.disabled)
            return None
        # The graphs get their own memory pool: hand the eager steps' cached blocks back first.
        torch.cuda.empty_cache()
        try:
            graphs = _GraphSet(
                self.layers, self.inners, self.params, hidden, slots, tensors, constants
            )
        except Exception as err:  # an op that cannot be captured: eager from now on
            first = err
            while first.__context__ is not None:  # the error that broke the capture
                first = first.__context__
            self.disabled = f"capture failed: {type(first).__name__}: {first}"
            log.warning("CUDA graphs off, the layers run eagerly (%s)", self.disabled)
            return None
        self.sets[key] = graphs
        self.captures += 1
        log.info(
            "CUDA graphs: captured %d layers for hidden %s (%d input gradients copied)",
            len(self.layers), key[0][0], graphs.grad_copies,
        )  # fmt: skip
        return graphs
