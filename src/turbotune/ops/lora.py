"""LoRA-fused projections over frozen, possibly 4-bit, base weights, with hand-written backward.

Design note. A LoRA projection is ``y = x W^T + b + s * drop(x) A^T B^T`` with ``W`` frozen.
Autograd through ``F.linear`` on a dequantized ``W`` would keep the dense ``W`` alive until
backward, and peft's dropout keeps a ``[tokens, in]`` mask. Here the base weight is a *weight
source* (anything :func:`turbotune.quant.weights.dense_weight` accepts: a tensor, a bnb 4-bit
parameter, a module) that is dequantized in forward and again in backward, then dropped; the
dropout mask is regenerated in backward from a seed. What is saved per projection group is the
input ``x`` once (shared by q/k/v, or by gate/up) and the tiny ``[tokens, r]`` products.
The SwiGLU/GeGLU MLP saves ``x`` and ``[e | u]`` (the "LoRA MLP" of Unsloth,
github.com/unslothai/unsloth, written anew here); its backward never recomputes
``h = act(e) * u`` by a pass of its own: the pass that writes ``de``, ``du`` also sums the down
adapter's ``dA = g^T h`` (or writes ``h``, ``D(h)`` under dropout, for an ``mm``; see
``ops/lora_mlp_backward.py``).

Projections that share an input run as one group (``ops/lora_group.py``): their weights are
dequantized into one stacked buffer, the input gradient is one matmul over it, and without
dropout the adapters' down projections are one matmul too. Plain dense weights already in the
compute dtype are never copied into such a buffer: each projection uses its weight as stored
(``ops/lora_direct.py``, chosen per group and input size by ``lora_direct.plan_group``). Under
activation checkpointing the recomputed forward hands its dequantized weights to its backward
(``ops/lora_stash.py``).

Matmuls stay in torch (cuBLAS); the LoRA branch folds into the base output with ``addmm_``.
``A`` and ``B`` may be fp32 while ``x`` is bf16: they are cast to ``x.dtype`` for the matmuls
and their gradients are returned in their own dtype. Under ``torch.autocast`` the input is cast
to the autocast dtype first and the ops run with autocast off. Dropout is the caller's business
in eval mode: pass ``dropout=0``.

Notation for one projection with scaling ``s`` and dropout ``p`` (keep mask ``m``, ``D(z) =
z * m / (1 - p)``, the identity when ``p = 0``): ``t = D(x) A^T`` (``[M, r]``, saved),
``y = x W^T + b + s t B^T``. Backward, with ``g = s * dy B`` (``[M, r]``)::

    dB = s dy^T t        dA = g^T D(x)        dx = dy W + D(g A)        db = sum_rows(dy)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch

from turbotune.ops import glu_lora_forward, lora_adapter_first
from turbotune.ops.lora_direct import direct_backward, direct_forward, direct_weights, plan_group
from turbotune.ops.lora_fold import fold_backward, fold_forward, wide_backward, wide_fits
from turbotune.ops.lora_group import (
    Needs,
    Slot,
    adjacent_columns,
    base_backward,
    base_forward,
    cast,
    dropout_keep,
    lora_backward,
    lora_forward,
)
from turbotune.ops.lora_mlp_backward import down_and_glu_backward, gate_up_t, glu_forward
from turbotune.ops.lora_stash import holds

__all__ = [
    "LoRAMLPFunction",
    "LoRAProjectionsFunction",
    "LoRAWeights",
    "Projection",
    "dropout_keep",
    "dropout_seed",
    "lora_linear",
    "lora_mlp",
    "lora_projections",
    "lora_qkv",
]

Activation = Literal["silu", "gelu_tanh", "gelu"]


class LoRAWeights(NamedTuple):
    """One LoRA adapter.

    Attributes:
        A: ``[r, in_features]`` down projection (any float dtype; fp32 is common).
        B: ``[out_features, r]`` up projection.
        scaling: ``s`` (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        dropout: probability ``p`` of zeroing an element of the LoRA branch input (0 = off).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: float = 0.0


class Projection(NamedTuple):
    """A frozen linear map with an optional adapter: ``y = x W^T + bias + LoRA(x)``.

    Attributes:
        base: the weight source of ``W [out, in]`` (see ``quant.weights.dense_weight``).
        lora: the adapter, or None for a projection without one.
        bias: optional ``[out]`` bias.
    """

    base: Any
    lora: LoRAWeights | None = None
    bias: torch.Tensor | None = None


# ---- dropout masks (the masks themselves: ``lora_group.dropout_keep``) ----


def dropout_seed() -> int:
    """Draw the seed of a step's LoRA dropout masks from torch's default CPU generator.

    No device sync (a CPU tensor), reproducible under ``torch.manual_seed``, and activation
    checkpointing (which restores the CPU RNG state before recomputing) draws the same seed.
    """
    return int(torch.randint(0, 2**62, (1,)).item())


# ---- autograd functions (no maths: they route tensors to ``lora_group``) ----


def _slots(meta: tuple, tensors: tuple) -> list[Slot]:
    """Rebuild the projections from ``meta = ((base, scaling, dropout, seed), ...)`` and
    ``tensors = (A0, B0, bias0, A1, B1, bias1, ...)``."""
    return [Slot(m[0], *tensors[3 * i : 3 * i + 3], *m[1:]) for i, m in enumerate(meta)]


def _needs(needs_input_grad: tuple, first: int, index: int) -> Needs:
    """``needs_input_grad`` holds x at 0 and slot ``index``'s (A, B, bias) from ``first + 3i``."""
    offset = first + 3 * index
    return Needs(needs_input_grad[0], *needs_input_grad[offset : offset + 3])


def _grads(
    slots: Sequence[Slot], lora: dict, dys: Sequence[torch.Tensor], needs: Sequence[Needs]
) -> list[torch.Tensor | None]:
    """``(dA, dB, dbias)`` of every projection, flat, in the order of the inputs."""
    out = []
    for i, slot in enumerate(slots):
        d_a, d_b = lora.get(i, (None, None))
        d_bias = cast(dys[i].sum(0), slot.bias.dtype) if needs[i].bias else None
        out += [d_a, d_b, d_bias]
    return out


class LoRAProjectionsFunction(torch.autograd.Function):
    """``[x W_i'^T for each projection i]`` from one saved ``x`` (q/k/v, or a lone linear)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, meta: tuple, *tensors: torch.Tensor | None):
        slots = _slots(meta, tensors)
        layout, weights = plan_group(slots, x, stacked=False)
        outs, saved = _projections_forward(x, slots, layout, weights, stacked=False)
        ctx.meta, ctx.layout = meta, layout
        # Folded adapters save [x | T], which holds x: x itself is not saved then.
        ctx.save_for_backward(None if layout.fold else x, *tensors, *saved)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        x, *rest = ctx.saved_tensors
        n, layout = len(ctx.meta), ctx.layout
        slots = _slots(ctx.meta, tuple(rest[: 3 * n]))
        needs = [_needs(ctx.needs_input_grad, 2, i) for i in range(n)]
        device = dys[0].device
        with _no_autocast(device):
            # One matmul over the stacked weight; the cat costs one pass over the dys, unless
            # they already are adjacent column blocks of one buffer (the rotary backward of
            # ops/rope_qkv.py writes dq, dk, dv so). Weights used as stored take one matmul
            # each, straight from the dys.
            dy = dys[0] if n == 1 or layout.direct else adjacent_columns(dys)
            if dy is None:
                dy = torch.cat(dys, dim=1)
            dx, lora = _projections_backward(dy, dys, x, slots, layout, rest[3 * n :], needs)
        return (dx, None, *_grads(slots, lora, dys, needs))


def _projections_forward(
    x: torch.Tensor,
    slots: Sequence[Slot],
    layout,
    weights: Sequence[torch.Tensor] | None,
    stacked: bool,
) -> tuple[torch.Tensor | list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of a group and what its backward needs (adapters folded in where they can).

    ``weights``: the stored weights when ``layout.direct`` (``lora_direct.plan_group``).
    """
    if layout.direct:
        return direct_forward(x, weights, slots, layout, stacked)
    if layout.fold:
        return fold_forward(x, slots, layout, stacked)
    if lora_adapter_first.applies(slots, layout, stacked):  # o_proj: no pass for s t B^T
        return lora_adapter_first.adapter_first_forward(x, slots, layout)
    outs = base_forward(x, slots, layout, stacked)
    ys = _halves(outs) if stacked else outs
    return outs, lora_forward(x, slots, layout, ys)


def _projections_backward(
    dy: torch.Tensor,
    dys: Sequence[torch.Tensor],
    x: torch.Tensor | None,
    slots: Sequence[Slot],
    layout,
    saved: Sequence[torch.Tensor],
    needs: Sequence[Needs],
) -> tuple[torch.Tensor | None, dict]:
    """``dx`` (None when ``x`` wants none) and ``{index: (dA, dB)}`` of a group.

    Args:
        dy: ``[M, sum out_i]``; dys: its per-projection column blocks (or separate tensors).
        x: the saved input (None when the adapters were folded: it is in ``saved``).
    """
    if layout.direct:
        weights = direct_weights(slots, dys[0].dtype)
        return direct_backward(dys, weights, x, slots, layout, saved, needs)
    if layout.fold:
        return fold_backward(dy, slots, layout, saved, needs)
    # With the dense W left by a checkpoint recomputation, dx = dy W + g A needs no [W; A] copy.
    # A lone projection with in < 2 out (o_proj) takes it too when dy has spare columns for g.
    wide = layout.wide or wide_fits(layout, dy)
    if wide and needs[0].x and not holds("stacked", slots, dy.dtype):
        dx, grads = wide_backward(dy, x, slots[0], saved, needs[0])
        return dx, {0: grads}
    dx = base_backward(dy, slots, layout) if needs[0].x else None
    return dx, lora_backward(dys, x, slots, layout, saved, dx, needs)


class LoRAMLPFunction(torch.autograd.Function):
    """``y = (act(x Wg'^T) * (x Wu'^T)) Wd'^T``, saving ``x`` and ``[e | u]``, not ``h``.

    Gate and up are one group with a stacked output ``eu = [e | u]``. Backward
    (``ops/lora_mlp_backward.py``): the down projection's input gradient ``dh`` (and ``dB_d``)
    first; one kernel then writes ``de = dh * u * act'(e)``, ``du = dh * act(e)`` over ``e`` and
    ``u`` and sums ``dA_d = g^T h`` (without dropout; with it, it writes ``D(h)`` over ``dh``
    for an ``mm``) and, given gate's and up's saved ``t``, their ``dB = s de^T t``; ``eu`` is
    then ``[de | du]`` and ``dx = [de | du] [Wg; Wu]`` is one matmul (plus the LoRA terms).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, meta: tuple, activation: str, *tensors: torch.Tensor | None):
        # tensors: the 9 of gate, up, down, then optionally the residual added to the output.
        residual, tensors = (tensors[9] if len(tensors) > 9 else None), tensors[:9]
        gate, up, down = _slots(meta, tensors)
        gu_layout, gu_weights = plan_group([gate, up], x, stacked=True)
        eu, saved_gu = _projections_forward(x, [gate, up], gu_layout, gu_weights, stacked=True)
        e, u = _halves(eu)
        down_layout, down_weights = plan_group([down], e, stacked=False)  # e: h's rows, dtype
        if glu_lora_forward.applies(down, down_layout):  # h and T in one pass, then one GEMM
            y, saved_down = glu_lora_forward.down_forward(
                e, u, down, down_layout, down_weights, activation, residual
            )
        else:
            h = glu_forward(e, u, activation)
            (y,), saved_down = _projections_forward(h, [down], down_layout, down_weights, False)
            del h
            if residual is not None:
                y.add_(residual)
        ctx.has_residual = residual is not None
        ctx.meta, ctx.activation, ctx.backward_done = meta, activation, False
        ctx.layouts, ctx.n_saved_gu = (gu_layout, down_layout), len(saved_gu)
        x_saved = None if gu_layout.fold else x
        ctx.save_for_backward(x_saved, eu, *tensors, *saved_gu, *saved_down)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if ctx.backward_done:
            raise RuntimeError(
                "lora_mlp's backward overwrites its saved activations: it cannot run twice "
                "(retain_graph=True); recompute the forward instead"
            )
        ctx.backward_done = True
        x, eu, *rest = ctx.saved_tensors
        gate, up, down = _slots(ctx.meta, tuple(rest[:9]))
        saved_gu, saved_down = rest[9 : 9 + ctx.n_saved_gu], rest[9 + ctx.n_saved_gu :]
        (gu_layout, down_layout), need = ctx.layouts, ctx.needs_input_grad
        needs = [_needs(need, 3, i) for i in range(3)]
        e, u = _halves(eu)
        with _no_autocast(dy.device):
            # The kernel that writes [de | du] may also sum gate's and up's dB (from their t).
            gate_up = gate_up_t(gate, up, gu_layout, saved_gu, needs[:2])
            lora_down, d_b_gu = down_and_glu_backward(
                dy, e, u, down, down_layout, saved_down, needs[2], ctx.activation, gate_up=gate_up
            )  # eu is now [de | du]
            gu_needs = needs[:2] if d_b_gu is None else [n._replace(B=False) for n in needs[:2]]
            dx, lora_gu = _projections_backward(
                eu, [e, u], x, [gate, up], gu_layout, saved_gu, gu_needs
            )
        if d_b_gu is not None:
            lora_gu = {i: (lora_gu.get(i, (None, None))[0], d_b) for i, d_b in enumerate(d_b_gu)}
        grads = _grads([gate, up], lora_gu, [e, u], needs[:2])
        grads += _grads([down], lora_down, [dy], needs[2:])
        if ctx.has_residual:  # y = residual + mlp(x): its gradient is dy itself
            grads.append(dy if need[-1] else None)
        return (dx, None, None, *grads)


def _halves(eu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``e`` and ``u``: the column halves of the gate/up group's stacked output."""
    inter = eu.shape[1] // 2
    return eu.narrow(1, 0, inter), eu.narrow(1, inter, eu.shape[1] - inter)


# ---- functional entries ----


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off inside the fused ops; a no-op context when it is off already (building a
    ``torch.autocast`` object costs several microseconds, twice per fused call)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _prepare(
    x: torch.Tensor, projections: Sequence[Projection]
) -> tuple[torch.Tensor, tuple, list]:
    """Autocast cast of ``x``, the dropout seed, and the flat (meta, tensors) for autograd."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    any_dropout = any(p.lora is not None and p.lora.dropout > 0 for p in projections)
    seed = dropout_seed() if any_dropout else 0
    meta, tensors = [], []
    for j, proj in enumerate(projections):
        lora = proj.lora
        if lora is not None and not 0.0 <= lora.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {lora.dropout}")
        scaling, p = (lora.scaling, lora.dropout) if lora is not None else (0.0, 0.0)
        meta.append((proj.base, float(scaling), float(p), seed + j))
        tensors += [lora.A if lora else None, lora.B if lora else None, proj.bias]
    return x, tuple(meta), tensors


def lora_linear(
    x: torch.Tensor,
    base: Any,
    lora: LoRAWeights | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + bias + s * (D(x) A^T) B^T`` with ``W`` dequantized on the fly.

    Args:
        x: ``[..., in]``.
        base: weight source of ``W [out, in]`` (tensor, bnb ``Params4bit``, module, ...).
        lora: the adapter, or None.
        bias: optional ``[out]``.

    Returns:
        ``[..., out]`` in ``x``'s dtype (the autocast dtype under autocast).
    """
    return lora_projections(x, [Projection(base, lora, bias)])[0]


def lora_qkv(
    x: torch.Tensor, q: Sequence[Any], k: Sequence[Any], v: Sequence[Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three LoRA projections of one input (attention q, k, v), saving ``x`` once.

    Args:
        x: ``[..., hidden]``.
        q: ``Projection`` or tuple ``(base, lora[, bias])``; likewise ``k`` and ``v``.

    Returns:
        ``(q [..., out_q], k [..., out_k], v [..., out_v])``.
    """
    return tuple(lora_projections(x, [Projection(*q), Projection(*k), Projection(*v)]))


def lora_projections(x: torch.Tensor, projections: Sequence[Projection]) -> list[torch.Tensor]:
    """Any number of LoRA projections of one input, saving ``x`` once; see :func:`lora_qkv`."""
    x, meta, tensors = _prepare(x, projections)
    x2 = x.reshape(-1, x.shape[-1])
    with _no_autocast(x.device):
        outs = LoRAProjectionsFunction.apply(x2, meta, *tensors)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs]


def lora_mlp(
    x: torch.Tensor,
    gate: Sequence[Any],
    up: Sequence[Any],
    down: Sequence[Any],
    activation: Activation = "silu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gated MLP ``y = (act(x Wg'^T) * x Wu'^T) Wd'^T``, each ``'`` including its LoRA term.

    ``activation`` is ``"silu"`` (SwiGLU: Llama, Mistral, Qwen) or ``"gelu_tanh"`` / ``"gelu"``
    (GeGLU: Gemma). Saves ``x``, ``e = x Wg'^T`` and ``u = x Wu'^T``; ``h`` is not saved (backward
    writes it in the activation's backward pass, for the down adapter's ``dA``).

    Args:
        x: ``[..., hidden]``.
        gate: ``Projection`` or tuple ``(base, lora[, bias])`` for ``[inter, hidden]``.
        up: same, ``[inter, hidden]``.
        down: same, ``[hidden, inter]``.
        activation: the gate's activation.
        residual: optional ``[..., hidden]`` added to the output (a decoder layer's residual
            stream: ``residual + mlp(x)``, its gradient the output's). In the compute dtype it
            rides on the down projection's GEMM (``ops/glu_lora_forward.py``), else it is
            added afterwards.

    Returns:
        ``[..., hidden]``.
    """
    if activation not in ("silu", "gelu_tanh", "gelu"):
        raise ValueError(f"unknown activation {activation!r}: expected silu, gelu_tanh or gelu")
    if residual is not None:
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if residual.dtype != dtype or residual.shape[:-1] != x.shape[:-1]:
            return residual + lora_mlp(x, gate, up, down, activation)  # type promotion as before
    x, meta, tensors = _prepare(x, [Projection(*gate), Projection(*up), Projection(*down)])
    x2 = x.reshape(-1, x.shape[-1])
    if residual is not None:
        tensors.append(residual.reshape(x2.shape[0], residual.shape[-1]))
    with _no_autocast(x.device):
        y = LoRAMLPFunction.apply(x2, meta, activation, *tensors)
    return y.view(*x.shape[:-1], y.shape[-1])
