"""LoRA-fused projections over frozen, possibly 4-bit, base weights, with hand-written backward.

Design note. A LoRA projection is ``y = x W^T + b + s * drop(x) A^T B^T`` with ``W`` frozen.
Autograd through ``F.linear`` on a dequantized ``W`` would keep the dense ``W`` alive until
backward, and peft's dropout keeps a ``[tokens, in]`` mask. Here the base weight is a *weight
source* (anything :func:`turbotune.quant.weights.dense_weight` accepts: a tensor, a bnb 4-bit
parameter, a module) that is dequantized in forward and again in backward, then dropped; the
dropout mask is regenerated in backward from a seed. What is saved per projection group is the
input ``x`` once (shared by q/k/v, or by gate/up) and the tiny ``[tokens, r]`` products.
The SwiGLU/GeGLU MLP saves ``x, e, u`` and recomputes ``h = act(e) * u`` in backward (the
"LoRA MLP" of Unsloth, github.com/unslothai/unsloth, written anew here).

Matmuls stay in torch (cuBLAS); the LoRA branch folds into the base output with ``addmm_``.
``A`` and ``B`` may be fp32 while ``x`` is bf16: they are cast to ``x.dtype`` for the matmuls
and their gradients are returned in their own dtype. Under ``torch.autocast`` the input is cast
to the autocast dtype first and the ops run with autocast off. Dropout is the caller's business
in eval mode: pass ``dropout=0``.

Notation for one projection with scaling ``s`` and dropout ``p`` (keep mask ``m``, ``D(z) =
z * m / (1 - p)``, the identity when ``p = 0``): ``t = s * D(x) A^T`` (``[M, r]``, saved),
``y = x W^T + b + t B^T``. Backward, with ``g = s * dy B`` (``[M, r]``)::

    dB = dy^T t        dA = g^T D(x)        dx = dy W + D(g A)        db = sum_rows(dy)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch

from turbotune.ops.swiglu import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward
from turbotune.quant.weights import dense_weight

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


class _Slot(NamedTuple):
    """One projection as the autograd functions see it (tensors unpacked from the inputs)."""

    base: Any
    A: torch.Tensor | None
    B: torch.Tensor | None
    bias: torch.Tensor | None
    scaling: float
    dropout: float
    seed: int


class _Needs(NamedTuple):
    """Which gradients one projection's backward must produce."""

    x: bool
    A: bool
    B: bool
    bias: bool


# ---- dropout masks ----


def dropout_seed() -> int:
    """Draw the seed of a step's LoRA dropout masks from torch's default CPU generator.

    No device sync, reproducible under ``torch.manual_seed``, and activation checkpointing
    (which restores the CPU RNG state before recomputing) draws the same seed again.
    """
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_keep(shape: Sequence[int], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The boolean keep mask ``m`` (True with probability ``1 - p``) drawn from ``seed``.

    The projection with index ``j`` in a fused call (q, k, v = 0, 1, 2; gate, up, down = 0, 1, 2)
    uses ``seed + j``, so each adapter gets its own mask, as with peft's separate dropouts. The
    mask lives only inside one forward or backward call (1 byte per element).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    keep = torch.empty(tuple(shape), device=device, dtype=torch.bool)
    return keep.bernoulli_(1.0 - p, generator=gen)


def _keep(x: torch.Tensor, slot: _Slot) -> torch.Tensor | None:
    if slot.A is None or slot.dropout == 0.0:
        return None
    return dropout_keep(x.shape, slot.dropout, slot.seed, x.device)


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """``D(x) = x * m / (1 - p)``: ``x * m`` is exact, so one rounding, like ``F.dropout``."""
    return x if keep is None else (x * keep).mul_(1.0 / (1.0 - p))


# ---- one projection, forward and backward ----


class _Cast(NamedTuple):
    """An adapter's ``A``, ``B`` in the compute dtype, cast once in forward and saved for backward
    (a cast is a kernel launch; the copies are ``r x (in + out)``, nothing next to ``x``)."""

    A: torch.Tensor
    B: torch.Tensor


def _forward_one(
    x: torch.Tensor, slot: _Slot
) -> tuple[torch.Tensor, torch.Tensor | None, _Cast | None]:
    """``y = x W^T + b + s t B^T`` with ``t = D(x) A^T``.

    Args:
        x: ``[M, in]`` in the compute dtype.
        slot: the projection.

    Returns:
        ``y [M, out]``, ``t [M, r]`` (None without adapter) and the adapter cast to ``x.dtype``.
    """
    weight = dense_weight(slot.base, x.dtype)
    if slot.bias is None:
        y = torch.mm(x, weight.t())
    else:
        y = torch.addmm(slot.bias.to(x.dtype), x, weight.t())
    del weight  # the dense copy of a quantized weight dies here, not in the autograd graph
    if slot.A is None:
        return y, None, None
    cast = _Cast(slot.A.to(x.dtype), slot.B.to(x.dtype))
    t = torch.mm(_dropped(x, _keep(x, slot), slot.dropout), cast.A.t())
    y.addmm_(t, cast.B.t(), alpha=slot.scaling)
    return y, t, cast


def _backward_one(
    dy: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor | None,
    cast: _Cast | None,
    slot: _Slot,
    dx: torch.Tensor | None,
    needs: _Needs,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of one projection; ``dx`` accumulates in place when given.

    ``dB = s dy^T t``, ``g = s dy B``, ``dA = g^T D(x)``, ``dx += dy W + D(g A)``,
    ``db = sum dy``. The scalings ride on the matmuls' ``alpha`` (``beta = 0`` ignores the
    placeholder input, which only lends its shape), so no extra elementwise kernels run.

    Args:
        dy: ``[M, out]`` gradient of the output.
        x: ``[M, in]`` the saved input.
        t: ``[M, r]`` the saved ``D(x) A^T`` (None without adapter).
        cast: the adapter in the compute dtype, saved by the forward.
        slot: the projection (its ``A``/``B``/``bias`` give the gradients' dtypes).
        dx: ``[M, in]`` running input gradient, or None to start one.
        needs: which gradients to produce.

    Returns:
        ``(dx, dA, dB, dbias)``; the parameter gradients in their parameters' dtypes.
    """
    if needs.x:
        weight = dense_weight(slot.base, dy.dtype)
        dx = torch.mm(dy, weight) if dx is None else dx.addmm_(dy, weight)
        del weight
    dbias = dy.sum(0).to(slot.bias.dtype) if needs.bias else None
    if cast is None:
        return dx, None, None, dbias
    s = slot.scaling
    dB = torch.addmm(cast.B, dy.t(), t, beta=0, alpha=s).to(slot.B.dtype) if needs.B else None
    if not (needs.x or needs.A):
        return dx, None, dB, dbias
    g = torch.addmm(t, dy, cast.B, beta=0, alpha=s)
    keep = _keep(x, slot)
    dA = torch.mm(g.t(), _dropped(x, keep, slot.dropout)).to(slot.A.dtype) if needs.A else None
    if needs.x:
        if keep is None:
            dx.addmm_(g, cast.A)
        else:
            dx.add_(torch.mm(g, cast.A).mul_(keep), alpha=1.0 / (1.0 - slot.dropout))
    return dx, dA, dB, dbias


# ---- gated activation ----


def _glu_forward(e: torch.Tensor, u: torch.Tensor, activation: Activation) -> torch.Tensor:
    """``h = act(e) * u`` (Triton where it runs, else eager)."""
    if activation == "silu":
        return swiglu_forward(e, u)
    return geglu_forward(e, u, _approx(activation))


def _glu_backward_inplace(
    dh: torch.Tensor, e: torch.Tensor, u: torch.Tensor, activation: Activation
) -> tuple[torch.Tensor, torch.Tensor]:
    """``de = dh * u * act'(e)``, ``du = dh * act(e)``, written over ``e`` and ``u``.

    In place saves two ``[M, inter]`` activations at the backward's peak; the saved ``e`` and
    ``u`` are dead afterwards (a second backward is refused, see ``LoRAMLPFunction``).
    """
    if activation == "silu":
        return swiglu_backward(dh, e, u, inplace=True)
    return geglu_backward(dh, e, u, _approx(activation), inplace=True)


def _approx(activation: Activation) -> str:
    return "tanh" if activation == "gelu_tanh" else "none"


# ---- autograd functions (no maths: they route tensors to the helpers above) ----


def _slots(meta: tuple, tensors: tuple) -> list[_Slot]:
    """Rebuild the projections from ``meta = ((base, scaling, dropout, seed), ...)`` and
    ``tensors = (A0, B0, bias0, A1, B1, bias1, ...)``."""
    return [_Slot(m[0], *tensors[3 * i : 3 * i + 3], *m[1:]) for i, m in enumerate(meta)]


def _needs(needs_input_grad: tuple, first: int, index: int) -> _Needs:
    """``needs_input_grad`` holds x at 0 and slot ``index``'s (A, B, bias) from ``first + 3i``."""
    offset = first + 3 * index
    return _Needs(needs_input_grad[0], *needs_input_grad[offset : offset + 3])


class LoRAProjectionsFunction(torch.autograd.Function):
    """``[x W_i'^T for each projection i]`` from one saved ``x`` (q/k/v, or a lone linear)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, meta: tuple, *tensors: torch.Tensor | None):
        slots = _slots(meta, tensors)
        outs, ts, casts = zip(*(_forward_one(x, slot) for slot in slots))
        ctx.meta = meta
        ctx.save_for_backward(x, *tensors, *ts, *_flat_casts(casts))
        return outs

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        x, *saved = ctx.saved_tensors
        n = len(ctx.meta)
        slots = _slots(ctx.meta, tuple(saved[: 3 * n]))
        ts, casts = saved[3 * n : 4 * n], _unflat_casts(saved[4 * n :])
        dx, grads = None, []
        with _no_autocast(x.device):
            for i, (dy, slot, t, cast) in enumerate(zip(dys, slots, ts, casts)):
                needs = _needs(ctx.needs_input_grad, 2, i)
                dx, *g = _backward_one(dy, x, t, cast, slot, dx, needs)
                grads += g
        return (dx, None, *grads)


def _flat_casts(casts: Sequence[_Cast | None]) -> list[torch.Tensor | None]:
    return [t for c in casts for t in (c if c is not None else (None, None))]


def _unflat_casts(flat: Sequence[torch.Tensor | None]) -> list[_Cast | None]:
    pairs = zip(flat[0::2], flat[1::2])
    return [_Cast(a, b) if a is not None else None for a, b in pairs]


class LoRAMLPFunction(torch.autograd.Function):
    """``y = (act(x Wg'^T) * (x Wu'^T)) Wd'^T``, saving ``x``, ``e``, ``u`` and recomputing ``h``.

    Backward: ``h = act(e) * u``; the down projection's backward gives ``dh`` (and ``dA_d``,
    ``dB_d`` from ``D(h)``); ``de = dh * u * act'(e)``, ``du = dh * act(e)``; then the gate and
    up backwards accumulate ``dx = de Wg' + du Wu'`` (each ``'`` with its LoRA term).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, meta: tuple, activation: str, *tensors: torch.Tensor | None):
        gate, up, down = _slots(meta, tensors)
        e, t_gate, c_gate = _forward_one(x, gate)
        u, t_up, c_up = _forward_one(x, up)
        y, t_down, c_down = _forward_one(_glu_forward(e, u, activation), down)
        ctx.meta, ctx.activation, ctx.backward_done = meta, activation, False
        casts = _flat_casts((c_gate, c_up, c_down))
        ctx.save_for_backward(x, e, u, t_gate, t_up, t_down, *tensors, *casts)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if ctx.backward_done:
            raise RuntimeError(
                "lora_mlp's backward overwrites its saved activations: it cannot run twice "
                "(retain_graph=True); recompute the forward instead"
            )
        ctx.backward_done = True
        x, e, u, t_gate, t_up, t_down, *rest = ctx.saved_tensors
        gate, up, down = _slots(ctx.meta, tuple(rest[:9]))
        c_gate, c_up, c_down = _unflat_casts(rest[9:])
        need = ctx.needs_input_grad
        with _no_autocast(x.device):
            h = _glu_forward(e, u, ctx.activation)
            down_needs = _Needs(True, *_needs(need, 3, 2)[1:])
            dh, *g_down = _backward_one(dy, h, t_down, c_down, down, None, down_needs)
            del h
            de, du = _glu_backward_inplace(dh, e, u, ctx.activation)
            del dh
            dx, *g_gate = _backward_one(de, x, t_gate, c_gate, gate, None, _needs(need, 3, 0))
            dx, *g_up = _backward_one(du, x, t_up, c_up, up, dx, _needs(need, 3, 1))
        return (dx, None, None, *g_gate, *g_up, *g_down)


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
) -> torch.Tensor:
    """Gated MLP ``y = (act(x Wg'^T) * x Wu'^T) Wd'^T``, each ``'`` including its LoRA term.

    ``activation`` is ``"silu"`` (SwiGLU: Llama, Mistral, Qwen) or ``"gelu_tanh"`` / ``"gelu"``
    (GeGLU: Gemma). Saves ``x``, ``e = x Wg'^T`` and ``u = x Wu'^T``; ``h`` is recomputed.

    Args:
        x: ``[..., hidden]``.
        gate: ``Projection`` or tuple ``(base, lora[, bias])`` for ``[inter, hidden]``.
        up: same, ``[inter, hidden]``.
        down: same, ``[hidden, inter]``.
        activation: the gate's activation.

    Returns:
        ``[..., hidden]``.
    """
    if activation not in ("silu", "gelu_tanh", "gelu"):
        raise ValueError(f"unknown activation {activation!r}: expected silu, gelu_tanh or gelu")
    x, meta, tensors = _prepare(x, [Projection(*gate), Projection(*up), Projection(*down)])
    x2 = x.reshape(-1, x.shape[-1])
    with _no_autocast(x.device):
        y = LoRAMLPFunction.apply(x2, meta, activation, *tensors)
    return y.view(*x.shape[:-1], y.shape[-1])
