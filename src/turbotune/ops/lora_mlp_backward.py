"""The LoRA MLP's down projection and gated activation backward, without recomputing ``h``.

Design note. The fused MLP (``ops/lora.py``) saves ``[e | u]``, not the down projection's input
``h = act(e) * u``. Of the down projection's backward, only ``dA = g^T D(h)`` reads ``h``:
``dh = dy W + D(g A)``, ``g = s dy B`` and ``dB = s dy^T t`` do not. So instead of recomputing
``h`` by its own kernel (read ``e``, ``u``; write ``h``) before the down projection's backward,
the backward runs input gradient first:

1. :func:`down_input_backward`: ``dh``, ``dB``, ``g`` (kept, ``[M, r]``) and, under dropout,
   the keep mask of ``h`` (regenerated from the seed: it already serves ``D(g A)``), for each
   layout the down projection can have: weights as stored (``ops/lora_direct.py``), ``wide``
   (``[dy | g] [W; A]``, ``ops/lora_fold.py``), or the plain stacked-weight path (which takes a
   weight kept by a checkpoint recomputation, ``ops/lora_stash.py``);
2. ONE gated-activation kernel reads ``dh``, ``e``, ``u`` and writes ``de``, ``du`` over ``e``,
   ``u`` and ``D(h)`` over ``dh`` (``swiglu.swiglu_backward_with_h``; ``dh`` is dead after it);
3. ``dA = g^T D(h)``.

That is 3 reads and 3 writes of ``[M, I]`` instead of 5 reads and 3 writes: at Llama-8B's
``M = 4096``, ``I = 14336`` in bf16, 235 MB less traffic per layer and step (it grows with
``M``: twice that at 8 x 1024 tokens). Without a ``dA`` to compute (no adapter on down, or a
frozen ``A``) no ``h`` is written at all. Under dropout the kernel writes ``D(h)`` directly, so
the mask multiply is no pass of its own either.

Without dropout on down, where Triton runs (the default path), steps 2 and 3 are one kernel
instead (``ops/glu_lora_backward.py``, switch ``glu_lora_backward.ENABLED``): ``dA = g^T h`` is
summed in-kernel and ``h`` is never written (3 reads, 2 writes). That kernel also sums the gate
and up adapters' ``dB = s de^T t`` from the ``de``, ``du`` it writes (:func:`gate_up_t` finds
their saved ``t`` in the gate/up group's layout), so the group's backward skips those two
products (``glu_lora_backward.FUSED_DB``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from turbotune.ops import glu_lora_backward
from turbotune.ops.lora_direct import direct_input_backward, direct_weights
from turbotune.ops.lora_fold import wide_input_backward
from turbotune.ops.lora_group import (
    Layout,
    Needs,
    Slot,
    base_backward,
    cast,
    dropout_keep,
    scaled_db,
)
from turbotune.ops.lora_stash import holds
from turbotune.ops.swiglu import (
    geglu_backward,
    geglu_backward_with_h,
    geglu_forward,
    swiglu_backward,
    swiglu_backward_with_h,
    swiglu_forward,
)

__all__ = [
    "DownInputGrads",
    "down_and_glu_backward",
    "down_input_backward",
    "gate_up_t",
    "glu_forward",
]

Activation = Literal["silu", "gelu_tanh", "gelu"]


class DownInputGrads(NamedTuple):
    """What the down projection's backward gives before its input ``h`` exists.

    Attributes:
        dh: ``[M, I]`` input gradient, adapter term included (a new tensor: may be overwritten).
        d_b: ``dB`` in ``B``'s dtype, or None.
        g: ``s dy B`` (``[M, r]``) when ``dA`` is wanted, else None.
        keep: the dropout keep mask of ``h`` (bool ``[M, I]``) when ``dA`` is wanted under
            dropout, else None.
    """

    dh: torch.Tensor
    d_b: torch.Tensor | None
    g: torch.Tensor | None
    keep: torch.Tensor | None


def down_input_backward(
    dy: torch.Tensor,
    slot: Slot,
    layout: Layout,
    saved: Sequence[torch.Tensor],
    needs: Needs,
    h_shape: tuple[int, int],
) -> DownInputGrads:
    """``dh = dy W + D(g A)``, ``dB`` and ``g`` of a lone projection, without its input.

    Args:
        dy: ``[M, out]`` output gradient.
        slot: the projection.
        layout: its layout (``lora_direct.plan_group``).
        saved: what its forward saved (``[t, A, B]`` with an adapter, else nothing).
        needs: which adapter gradients to produce (``needs.x`` is ignored: ``dh`` always is).
        h_shape: ``(M, in)``, the shape of the input (and of its dropout mask).
    """
    if layout.wide and not holds("stacked", [slot], dy.dtype):
        dh, d_b, g = wide_input_backward(dy, slot, saved, needs.B)
        return DownInputGrads(dh, d_b, g if needs.A else None, None)
    if layout.direct:
        dh = direct_input_backward([dy], direct_weights([slot], dy.dtype))
    else:  # the stacked weight of one projection: its dense weight (or the stash's)
        dh = base_backward(dy, [slot], layout)
    if slot.A is None:
        return DownInputGrads(dh, None, None, None)
    t, a, b = saved
    d_b = scaled_db(dy, t, b, slot) if needs.B else None
    g = torch.addmm(t, dy, b, beta=0, alpha=slot.scaling)  # beta = 0: t lends its shape
    keep = None
    if slot.dropout > 0.0:  # the forward's mask: same shape, seed and device
        keep = dropout_keep(h_shape, slot.dropout, slot.seed, dy.device)
        dh.add_(torch.mm(g, a).mul_(keep), alpha=1.0 / (1.0 - slot.dropout))
    else:
        dh.addmm_(g, a)
    return DownInputGrads(dh, d_b, g if needs.A else None, keep if needs.A else None)


def down_and_glu_backward(
    dy: torch.Tensor,
    e: torch.Tensor,
    u: torch.Tensor,
    down: Slot,
    layout: Layout,
    saved: Sequence[torch.Tensor],
    needs: Needs,
    activation: Activation,
    gate_up: glu_lora_backward.GateUpT | None = None,
) -> tuple[dict[int, tuple[torch.Tensor | None, torch.Tensor | None]], tuple | None]:
    """The down projection's backward through ``h = act(e) * u``: ``de``, ``du`` over ``e``, ``u``.

    Without dropout on down, where Triton runs, steps 2 and 3 of the module note are one kernel
    (``ops/glu_lora_backward.py``: ``dA = g^T h`` summed in-kernel, ``h`` never written); given
    ``gate_up`` it also sums the gate and up adapters' ``dB``.

    Args:
        dy: ``[M, hidden]`` the MLP's output gradient.
        e: ``[M, I]`` gate output (a column view of the saved ``[e | u]``); overwritten by ``de``.
        u: ``[M, I]`` up output; overwritten by ``du``.
        down: the down projection; layout, saved: its forward's.
        needs: the down adapter's gradients wanted.
        activation: the gate's activation.
        gate_up: the gate/up adapters' saved ``t`` (:func:`gate_up_t`), or None.

    Returns:
        ``(down's grads, gate/up dB)``: ``{0: (dA, dB)}`` when ``down`` has an adapter, else
        ``{}``; and ``(dB_gate, dB_up)`` when the kernel summed them, else None (the caller's
        group backward computes them).
    """
    grads = down_input_backward(dy, down, layout, saved, needs, tuple(e.shape))
    if grads.g is None:  # no dA: h is not needed at all
        _glu_backward_inplace(grads.dh, e, u, activation)
        return ({} if down.A is None else {0: (None, grads.d_b)}), None
    if grads.keep is None and glu_lora_backward.supported(grads.dh, e, u, grads.g):
        # One pass: de, du over e, u and dA = g^T h summed in-kernel, h never written.
        if gate_up is not None and not glu_lora_backward.takes_gate_up(grads.dh, gate_up):
            gate_up = None
        out = glu_lora_backward.glu_backward_lora_da(
            grads.dh, e, u, grads.g, activation, down.A.dtype, gate_up=gate_up
        )
        d_b_gate_up = None if gate_up is None else (out.d_b_gate, out.d_b_up)
        return {0: (out.d_a, grads.d_b)}, d_b_gate_up
    h = _glu_backward_with_h(grads.dh, e, u, activation, grads.keep, down.dropout)
    return {0: (cast(torch.mm(grads.g.t(), h), down.A.dtype), grads.d_b)}, None


def gate_up_t(
    gate: Slot, up: Slot, layout: Layout, saved: Sequence[torch.Tensor], needs: Sequence[Needs]
) -> glu_lora_backward.GateUpT | None:
    """The gate and up adapters' saved ``t`` (column views), where the fused kernel may sum
    their ``dB``: both have an adapter with a trainable ``B``, no dropout (``layout.shared``),
    and :data:`glu_lora_backward.FUSED_DB` is on. Else None (their group computes ``dB``).

    Args:
        gate, up: the group's projections; layout, saved: its forward's (folded: ``[x | T]``
            and ``A_stacked``; otherwise shared: ``[T, A_stacked, B...]``).
        needs: their gradients wanted.
    """
    if not (glu_lora_backward.FUSED_DB and glu_lora_backward.ENABLED):
        return None
    if layout.adapters != (0, 1) or not layout.shared or not (needs[0].B and needs[1].B):
        return None
    if layout.fold:  # [x | T | 0]: T behind the n_in columns of x
        x_aug, a_stacked = saved[0], saved[1]
        t_all = x_aug.narrow(1, a_stacked.shape[1], layout.ranks[-1][1])
    else:
        t_all = saved[0]
    if t_all.ndim != 2 or t_all.shape[1] != layout.ranks[-1][1]:  # a saved layout unknown here
        return None
    (g0, g1), (u0, u1) = layout.ranks
    return glu_lora_backward.GateUpT(
        t_all.narrow(1, g0, g1 - g0),
        t_all.narrow(1, u0, u1 - u0),
        (gate.scaling, up.scaling),
        (gate.B.dtype, up.B.dtype),
    )


# ---- the gated activation (Triton where it runs, else eager) ----


def glu_forward(e: torch.Tensor, u: torch.Tensor, activation: Activation) -> torch.Tensor:
    """``h = act(e) * u``."""
    if activation == "silu":
        return swiglu_forward(e, u)
    return geglu_forward(e, u, _approx(activation))


def _glu_backward_inplace(
    dh: torch.Tensor, e: torch.Tensor, u: torch.Tensor, activation: Activation
) -> None:
    """``de = dh * u * act'(e)``, ``du = dh * act(e)``, written over ``e`` and ``u``.

    In place saves two ``[M, I]`` activations at the backward's peak; the saved ``e`` and ``u``
    are dead afterwards (a second backward is refused, see ``lora.LoRAMLPFunction``).
    """
    if activation == "silu":
        de, du = swiglu_backward(dh, e, u, inplace=True)
    else:
        de, du = geglu_backward(dh, e, u, _approx(activation), inplace=True)
    _settle(de, du, e, u)


def _glu_backward_with_h(
    dh: torch.Tensor,
    e: torch.Tensor,
    u: torch.Tensor,
    activation: Activation,
    keep: torch.Tensor | None,
    dropout: float,
) -> torch.Tensor:
    """As :func:`_glu_backward_inplace`, and ``D(h)`` written over ``dh`` (returned)."""
    kwargs = {"inplace": True, "out_h": dh, "keep": keep, "dropout": dropout}
    if activation == "silu":
        de, du, h = swiglu_backward_with_h(dh, e, u, **kwargs)
    else:
        de, du, h = geglu_backward_with_h(dh, e, u, _approx(activation), **kwargs)
    _settle(de, du, e, u)
    return h


def _settle(de: torch.Tensor, du: torch.Tensor, e: torch.Tensor, u: torch.Tensor) -> None:
    """Copy ``de``, ``du`` over ``e``, ``u`` where the launcher could not write in place (the
    eager fallback of ``swiglu_backward`` returns new tensors)."""
    if de.data_ptr() != e.data_ptr():
        e.copy_(de)
    if du.data_ptr() != u.data_ptr():
        u.copy_(du)


def _approx(activation: Activation) -> str:
    return "tanh" if activation == "gelu_tanh" else "none"
