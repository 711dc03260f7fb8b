"""Cross-entropy fused with the LM head, chunked so the full ``[N, V]`` logits never exist.

For each chunk of tokens: the logits come from a PyTorch matmul; a Triton kernel then computes
every row's loss with an online logsumexp over the vocabulary in fp32 and overwrites the logits
*in place* with their gradient; two more matmuls turn that into the chunk's ``grad_hidden``
and add its share of ``grad_weight``. The gradients are therefore computed in the forward and
only scaled by ``grad_output`` in the backward (the scheme of Liger-Kernel's
``fused_linear_cross_entropy``). Peak extra memory is one chunk of logits instead of ``N x V``
logits plus their fp32 copy and softmax. When the LM head itself is trained, its gradient is
summed over chunks in fp32 (an fp32 ``[V, H]`` buffer plus one 16-bit chunk product): summing in
bf16, as Liger does, doubles the rounding error by 4 chunks.

Per row with ``z = softcap * tanh(s * l / softcap)`` (or ``z = s * l`` without soft-capping),
``p = softmax(z)`` and label ``y``: ``loss = logsumexp(z) - z_y`` and
``dloss/dl = (p - onehot(y)) * s * (1 - (z / softcap)^2) / denominator``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from turbotune.ops import reference
from turbotune.ops._triton import row_block_settings, tl, triton, use_triton

__all__ = [
    "LinearCrossEntropyFunction",
    "LinearCrossEntropyOptions",
    "auto_chunk_size",
    "linear_cross_entropy",
    "linear_cross_entropy_forward",
]

_MAX_BLOCK_V = 32768
# Smallest chunk worth its matmul: ~2^27 logits (256 MiB in bf16) or the whole batch.
_MIN_CHUNK_ELEMENTS = 1 << 27


@triton.jit
def _capped_logits(logits, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """``z = s * l`` then, if soft-capping, ``z = c * tanh(z / c)`` (fp32)."""
    z = logits * logit_scale
    if HAS_SOFTCAP:
        # tanh through the sigmoid (tl has no tanh on older Triton); clamp avoids exp overflow.
        inner = tl.minimum(tl.maximum(z / softcap, -20.0), 20.0)
        z = softcap * (2.0 * tl.sigmoid(2.0 * inner) - 1.0)
    return z


@triton.jit
def _fwd_kernel(
    logits_ptr,
    stride_lm,
    labels_ptr,
    loss_ptr,
    inv_denominator_ptr,
    n_cols,
    ignore_index,
    logit_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Loss of one row, and its logits gradient written over the logits.

    Pass 1 (online logsumexp over blocks): ``m = max z``, ``d = sum exp(z - m)``,
    ``loss = m + log d - z_y``. Pass 2: ``dl = (exp(z - lse) - [j == y]) * dz/dl / denominator``
    with ``dz/dl = s * (1 - (z / c)^2)`` (soft-capped) or ``s``. Ignored rows get loss 0 and a
    zero gradient.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_lm
    label = tl.load(labels_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    if label == ignore_index:
        for start in range(0, n_cols, BLOCK_SIZE):
            mask = start + cols < n_cols
            zeros = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
            tl.store(row_ptr + start + cols, zeros.to(logits_ptr.dtype.element_ty), mask=mask)
        tl.store(loss_ptr + row, 0.0)
        return

    m = -float("inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        mask = start + cols < n_cols
        logits = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, _capped_logits(logits, logit_scale, softcap, HAS_SOFTCAP), -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    # Masked so that an out-of-range label cannot read past the row (its loss is then garbage).
    in_range = (label >= 0) & (label < n_cols)
    label_logit = tl.load(row_ptr + label, mask=in_range, other=0.0).to(tl.float32)
    z_label = _capped_logits(label_logit, logit_scale, softcap, HAS_SOFTCAP)
    tl.store(loss_ptr + row, lse - z_label)

    inv_denominator = tl.load(inv_denominator_ptr)
    for start in range(0, n_cols, BLOCK_SIZE):
        mask = start + cols < n_cols
        logits = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        z = _capped_logits(logits, logit_scale, softcap, HAS_SOFTCAP)
        grad = tl.exp(z - lse) - tl.where(start + cols == label, 1.0, 0.0)
        if HAS_SOFTCAP:
            capped = z / softcap
            grad = grad * (logit_scale * (1.0 - capped * capped))
        else:
            grad = grad * logit_scale
        grad = grad * inv_denominator
        tl.store(row_ptr + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


class LinearCrossEntropyOptions(NamedTuple):
    """Scalar settings of :func:`linear_cross_entropy` (see there)."""

    ignore_index: int = -100
    logit_scale: float = 1.0
    softcap: float | None = None
    chunk_size: int | None = None


def auto_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: logits about the size of the hidden states, but at least ~2^27 of them.

    The ratio rule (Liger-Kernel) bounds memory by the activations already held; the floor
    keeps each matmul large enough to run the GPU near its peak.
    """
    by_ratio = triton.next_power_of_2(triton.cdiv(n_rows, triton.cdiv(vocab, hidden)))
    floor = 1 << max(0, (_MIN_CHUNK_ELEMENTS // vocab).bit_length() - 1)
    return max(1, min(n_rows, max(by_ratio, floor)))


def _loss_and_grad_inplace(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_denominator: torch.Tensor,
    loss_rows: torch.Tensor,
    options: LinearCrossEntropyOptions,
) -> None:
    """Launch the kernel on a ``[C, V]`` logits chunk (unit column stride); fills ``loss_rows``."""
    n_rows, n_cols = logits.shape
    block = min(_MAX_BLOCK_V, triton.next_power_of_2(n_cols))
    _, num_warps = row_block_settings(block)
    softcap = options.softcap
    _fwd_kernel[(n_rows,)](
        logits, logits.stride(0), labels, loss_rows, inv_denominator, n_cols,
        options.ignore_index, float(options.logit_scale),
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, BLOCK_SIZE=block, num_warps=num_warps,
    )  # fmt: skip


def _inverse_denominator(
    labels: torch.Tensor, ignore_index: int, num_items_in_batch: int | torch.Tensor | None
) -> torch.Tensor:
    """``1 / num_items_in_batch`` or ``1 / max(1, #counted labels)`` as a device tensor (no sync)."""
    if num_items_in_batch is None:
        count = (labels != ignore_index).sum().clamp_min(1)
    else:
        count = torch.as_tensor(num_items_in_batch, device=labels.device)
    return count.to(torch.float32).reciprocal().reshape(1)


class _GradBuffers(NamedTuple):
    """Gradient accumulators of one call; None where no gradient is wanted."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _allocate_grads(
    n_rows: int,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    cdtype: torch.dtype,
    multi_chunk: bool,
    needs_grad: tuple[bool, bool, bool],
) -> _GradBuffers:
    dev = hidden.device
    need_hidden, need_weight, need_bias = needs_grad
    # Only what is needed: a frozen LM head (LoRA) must not cost a [V, H] fp32 buffer (2 GiB for
    # Llama-3's vocabulary), allocated at the very moment activation memory peaks.
    grad_hidden = (
        torch.empty((n_rows, hidden.shape[1]), dtype=cdtype, device=dev) if need_hidden else None
    )
    # Summing chunk products in a 16-bit grad_weight would round every partial sum (error
    # growing with the chunk count); several chunks accumulate in fp32 instead.
    acc_dtype = torch.float32 if multi_chunk else weight.dtype
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=dev) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_bias else None
    return _GradBuffers(grad_hidden, grad_weight, grad_bias)


def _accumulate_chunk(
    grads: _GradBuffers, grad_logits: torch.Tensor, h: torch.Tensor, w: torch.Tensor, rows: slice
) -> None:
    """Add one chunk's ``dlogits`` (``[C, V]``) into the hidden/weight/bias gradients."""
    if grads.hidden is not None:
        torch.mm(grad_logits, w, out=grads.hidden[rows])
    if grads.weight is not None:
        if grads.weight.dtype == h.dtype:
            grads.weight.addmm_(grad_logits.t(), h)
        else:  # fp32 accumulator, 16-bit matmul
            grads.weight.add_(torch.mm(grad_logits.t(), h))
    if grads.bias is not None:
        grads.bias.add_(grad_logits.sum(0, dtype=torch.float32))


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    num_items_in_batch: int | torch.Tensor | None,
    options: LinearCrossEntropyOptions,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Loss and the gradients of the loss (``grad_output = 1``), chunk by chunk.

    Args:
        hidden: ``[N, H]``.
        weight: ``[V, H]``.
        labels: ``[N]`` integer targets, already shifted.
        bias: ``[V]`` or None.
        num_items_in_batch: denominator of the summed loss, or None (count of counted labels).
        options: ignore index, logit scale, softcap, chunk size.
        needs_grad: whether to compute the gradient of hidden, weight, bias.
        compute_dtype: dtype of the matmuls (default ``weight.dtype``; the autocast dtype under
            autocast).

    Returns:
        ``(loss (fp32 scalar), grad_hidden [N, H], grad_weight [V, H], grad_bias [V])``, each
        gradient None when not requested.
    """
    n_rows, n_hidden = hidden.shape
    cdtype = compute_dtype or weight.dtype
    w = weight.to(cdtype)
    b = bias.to(cdtype) if bias is not None else None
    labels = labels.contiguous()
    inv_denominator = _inverse_denominator(labels, options.ignore_index, num_items_in_batch)
    chunk = options.chunk_size or auto_chunk_size(n_rows, n_hidden, weight.shape[0])
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    grads = _allocate_grads(n_rows, hidden, weight, cdtype, n_rows > chunk, needs_grad)
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        h = hidden[rows].to(cdtype)
        logits = torch.addmm(b, h, w.t()) if b is not None else torch.mm(h, w.t())
        _loss_and_grad_inplace(logits, labels[rows], inv_denominator, loss_rows[rows], options)
        _accumulate_chunk(grads, logits, h, w, rows)  # the logits now hold their gradient
        del logits, h  # else the next chunk's logits are allocated while these still live
    loss = loss_rows.sum() * inv_denominator[0]
    dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    return loss, *(g.to(dt) if g is not None else None for g, dt in zip(grads, dtypes))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd glue: gradients come from the forward and are scaled by ``grad_output``."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
        num_items_in_batch: int | torch.Tensor | None,
        options: LinearCrossEntropyOptions,
        compute_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        with torch.autocast(hidden.device.type, enabled=False):
            loss, *grads = linear_cross_entropy_forward(
                hidden, weight, labels, bias, num_items_in_batch, options, needs, compute_dtype
            )
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.has_grad = tuple(g is not None for g in grads)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        # Out of place: with retain_graph a second backward must see the unscaled gradients.
        grads = [
            g * grad_output.to(g.dtype) if has else None
            for g, has in zip(ctx.saved_tensors, ctx.has_grad)
        ]
        return grads[0], grads[1], None, grads[2], None, None, None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype ``F.linear(hidden, weight)`` would use, autocast included."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` without materialising the logits.

    The caller shifts: for causal LM training pass ``hidden[:, :-1]`` with ``labels[:, 1:]``
    (or labels already shifted with ``ignore_index`` padding, as HF's ``shift_labels``).
    Triton when :func:`~turbotune.ops._triton.use_triton` allows, else the eager
    :func:`turbotune.ops.reference.linear_cross_entropy` (which does build the logits).

    Args:
        hidden: ``[..., H]`` final hidden states.
        weight: LM head ``[V, H]``.
        labels: ``[...]`` target ids matching ``hidden``'s leading shape; must lie in
            ``[0, V)`` or equal ``ignore_index`` (not checked on the kernel path).
        bias: optional ``[V]``.
        ignore_index: label value that counts for nothing.
        num_items_in_batch: divide the summed loss by this (token count over all gradient
            accumulation steps, as HF passes it); default: the number of counted labels here,
            at least 1, so an all-ignored batch gives loss 0 and zero gradients.
        logit_scale: multiplies the logits before the loss (Granite: ``1 / logits_scaling``).
        softcap: Gemma-2-style soft-capping ``softcap * tanh(logits / softcap)``.
        chunk_size: tokens per chunk; default :func:`auto_chunk_size`.

    Returns:
        Scalar fp32 loss, differentiable in ``hidden``, ``weight`` and ``bias``.
    """
    labels = labels.to(hidden.device)  # as HF's loss does; a no-op when already there
    if not use_triton(hidden, weight, labels):
        return reference.linear_cross_entropy(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch, logit_scale=logit_scale, softcap=softcap,
        )  # fmt: skip
    options = LinearCrossEntropyOptions(ignore_index, logit_scale, softcap, chunk_size)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    return LinearCrossEntropyFunction.apply(
        flat_hidden, weight, labels.reshape(-1), bias, num_items_in_batch, options,
        _compute_dtype(hidden, weight),
    )  # fmt: skip
