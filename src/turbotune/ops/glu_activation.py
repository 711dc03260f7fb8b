"""The gated activations' shared pieces: ``act(g)`` and ``act'(g)`` for the Triton kernels.

Design note. Every kernel that evaluates a gated activation (``swiglu.py``'s forward and
backward, ``glu_backward_h.py``, ``glu_lora_forward.py``, ``glu_lora_backward.py``) calls
:func:`_act_and_grad` with the same activation ids, so all of them compute ``h`` and its
derivatives with the same fp32 formulas and round ``h`` identically. The launch helpers
(``[N, I]`` row views, the grid, the shape check) are shared by the launchers the same way.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from turbotune.ops._triton import tl, triton

Activation = Literal["silu", "gelu_tanh", "gelu"]
_ACTIVATION_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
_MAX_BLOCK = 1024
# Kernel constants must be constexpr for Triton to read them as globals.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act_and_grad(g, ACTIVATION: tl.constexpr):
    """``(act(g), act'(g))`` in fp32 for silu (0), tanh-approximated gelu (1), erf gelu (2).

    silu: ``a = g s``, ``a' = s (1 + g (1 - s))`` with ``s = sigmoid(g)``.
    gelu_tanh: ``a = g (1 + t) / 2`` with ``t = tanh(k (g + 0.044715 g^3))``, ``k = sqrt(2/pi)``;
    ``a' = (1 + t) / 2 + g (1 - t^2) k (1 + 3 * 0.044715 g^2) / 2``.
    gelu: ``a = g Phi(g)``, ``a' = Phi(g) + g exp(-g^2 / 2) / sqrt(2 pi)``.
    """
    if ACTIVATION == 0:
        s = tl.sigmoid(g)
        act = g * s
        dact = s * (1.0 + g * (1.0 - s))
    elif ACTIVATION == 1:
        inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        # tanh is +-1 to fp32 precision beyond |20|; clamping keeps exp() below overflow.
        inner = tl.minimum(tl.maximum(inner, -20.0), 20.0)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh, which tl lacks on older releases
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * 0.044715 * g * g
        )
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * _INV_SQRT_2))
        act = g * cdf
        dact = cdf + g * tl.exp(-0.5 * g * g) * _INV_SQRT_2PI
    return act, dact


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., I] -> [N, I]`` without a copy when possible; the kernels need unit column stride."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int]:
    block = min(_MAX_BLOCK, triton.next_power_of_2(n_cols))
    return (n_rows, triton.cdiv(n_cols, block)), block


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")


class _BackwardRows(NamedTuple):
    """A backward launch's ``[N, I]`` operands (see :func:`_backward_rows`)."""

    g: torch.Tensor
    u: torch.Tensor
    dh: torch.Tensor
    dg: torch.Tensor
    du: torch.Tensor
    inplace: bool


def _backward_rows(
    grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, inplace: bool
) -> _BackwardRows:
    """Shape check, ``[N, I]`` rows of the inputs, and the ``dg``/``du`` outputs: ``g``/``u``
    themselves when ``inplace`` and the rows are the caller's storage, else new tensors."""
    _check(gate, up)
    g, u, dh = _as_rows(gate), _as_rows(up), _as_rows(grad_h)
    # In place only when the row views really are the caller's storage (no copy was made).
    inplace = inplace and g.data_ptr() == gate.data_ptr() and u.data_ptr() == up.data_ptr()
    dg = g if inplace else torch.empty(g.shape, dtype=gate.dtype, device=g.device)
    du = u if inplace else torch.empty(u.shape, dtype=up.dtype, device=u.device)
    return _BackwardRows(g, u, dh, dg, du, inplace)


def _gelu_activation(approximate: str) -> Activation:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return "gelu_tanh" if approximate == "tanh" else "gelu"
