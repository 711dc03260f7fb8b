"""Eager PyTorch definitions of every op in ``turbotune.ops``.

These are the ground truth: tests compare the Triton kernels against them (run in fp32),
benchmarks use them as the baseline, and the functional entries fall back to them on devices
where Triton does not run (CPU without ``TRITON_INTERPRET=1``, Apple silicon). They follow the
Hugging Face modelling code (``LlamaRMSNorm``, ``apply_rotary_pos_emb``, ``LlamaMLP``) so that a
patched model computes what the unpatched one did.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Casting = Literal["llama", "gemma"]
GeluApprox = Literal["tanh", "none"]


# ---- RMSNorm ----


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    casting: Casting = "llama",
) -> torch.Tensor:
    """RMSNorm ``y = x / sqrt(mean(x^2) + eps) * (offset + w)`` over the last dimension.

    Args:
        x: input ``[..., H]``.
        weight: scale ``[H]``.
        eps: added to the mean square.
        offset: 0 for Llama-style weights, 1 for Gemma-style weights stored as ``w - 1``.
        casting: ``"llama"`` rounds the normalised input to ``x.dtype`` before the weight
            multiply and returns ``promote(x.dtype, weight.dtype)`` (``LlamaRMSNorm``);
            ``"gemma"`` keeps everything in fp32 and returns ``x.dtype`` (``GemmaRMSNorm``).

    Returns:
        ``[..., H]``.
    """
    xf = x.float()
    x_normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float() + offset
    if casting == "gemma":
        return (x_normed * w).to(x.dtype)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return (w * x_normed.to(x.dtype).float()).to(out_dtype)


def add_rms_norm(
    residual: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    casting: Casting = "llama",
    multiplier: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + h`` (Granite: ``residual + h * multiplier``) and ``y = rms_norm(s)``.

    Args:
        residual, h: ``[..., H]``.
        weight, eps, offset, casting: as :func:`rms_norm`.
        multiplier: ``None`` for a plain add.

    Returns:
        ``(s, y)``, both ``[..., H]``.
    """
    s = residual + (h if multiplier is None else h * multiplier)
    return s, rms_norm(s, weight, eps, offset, casting)


def rms_norm_with_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    casting: Casting = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, rms_norm(x))``: the first norm of a pre-norm layer, whose input is the residual."""
    return x, rms_norm(x, weight, eps, offset, casting)


# ---- rotary position embedding ----


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``.

    Args:
        q: queries ``[B, Hq, S, D]``.
        k: keys ``[B, Hk, S, D]``.
        cos: ``[B, S, D]`` (or ``[1, S, D]``), one row per token position.
        sin: same shape as ``cos``.

    Returns:
        ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary_cos_sin(
    inv_freq: torch.Tensor,
    position_ids: torch.Tensor,
    attention_scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for explicit positions, as HF's rotary embedding modules build them.

    ``inv_freq`` is the module's buffer, so llama3 / linear / dynamic scaling (already folded
    into it by HF) carries over. Positions are per token: padding-free batches whose positions
    restart at 0 inside a row get the right angles.

    Args:
        inv_freq: ``[D/2]`` inverse frequencies.
        position_ids: ``[B, S]`` integer positions.
        attention_scaling: factor HF multiplies cos/sin by (YaRN, longrope; 1 otherwise).
        dtype: dtype of the returned tables.

    Returns:
        ``(cos, sin)``, each ``[B, S, D]``.
    """
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


# ---- gated MLP activations ----


def _gelu(g: torch.Tensor, approximate: GeluApprox) -> torch.Tensor:
    return F.gelu(g, approximate=approximate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in the input dtype, as ``LlamaMLP`` does.

    Args:
        gate: ``[..., I]``.
        up: ``[..., I]``.
    """
    return F.silu(gate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: GeluApprox = "tanh") -> torch.Tensor:
    """``gelu(gate) * up`` (tanh approximation or exact erf), as Gemma's MLP does."""
    return _gelu(gate, approximate) * up


def glu_backward(
    grad_h: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``h = act(gate) * up`` in closed form, computed in fp32.

    ``dg = dh * up * act'(gate)``, ``du = dh * act(gate)``; the eager fallback of the raw
    launchers that hand-written backwards (fused LoRA MLP) call.

    Returns:
        ``(grad_gate, grad_up)`` in the dtypes of ``gate`` and ``up``.
    """
    g, u, dh = gate.float(), up.float(), grad_h.float()
    if activation == "silu":
        sig = torch.sigmoid(g)
        act, dact = g * sig, sig * (1.0 + g * (1.0 - sig))
    elif activation == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (g + 0.044715 * g**3))
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
        act = g * cdf
        dact = cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2.0 * math.pi)
    return (dh * u * dact).to(gate.dtype), (dh * act).to(up.dtype)


def glu_backward_with_h(
    grad_h: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu",
    keep: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`glu_backward` and the forward's ``h = act(gate) * up``, each rounded once from fp32.

    With a keep mask, ``h`` comes dropped out: ``D(h) = h * keep / (1 - dropout)`` (the input
    of a LoRA down projection's ``dA``). The eager fallback of ``swiglu_backward_with_h``.

    Returns:
        ``(grad_gate, grad_up, h)``; ``h`` in ``promote(gate.dtype, up.dtype)``.
    """
    grad_gate, grad_up = glu_backward(grad_h, gate, up, activation)
    g, u = gate.float(), up.float()
    if activation == "silu":
        h = swiglu(g, u)
    else:
        h = geglu(g, u, "tanh" if activation == "gelu_tanh" else "none")
    if keep is not None:
        h = h * keep * (1.0 / (1.0 - dropout))
    return grad_gate, grad_up, h.to(torch.promote_types(gate.dtype, up.dtype))


# ---- cross-entropy fused with the LM head ----


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
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against already shifted ``labels``.

    The logits are materialised (``[N, V]``): this is the definition, not a memory-saving path.
    Logits are computed in the input dtype and upcast to fp32 before scaling, soft-capping and
    the loss, as HF's ``ForCausalLMLoss`` does.

    Args:
        hidden: ``[..., H]`` final hidden states.
        weight: LM head ``[V, H]``.
        labels: ``[...]`` target ids (the caller shifts them); ``ignore_index`` rows count for
            nothing.
        bias: optional ``[V]``.
        ignore_index: label value to skip.
        num_items_in_batch: divide the summed loss by this (gradient accumulation); default
            the number of counted labels, at least 1 (an all-ignored batch gives loss 0, where
            ``F.cross_entropy`` would give nan).
        logit_scale: multiplies the logits (Granite: ``1 / logits_scaling``).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (Gemma 2).

    Returns:
        Scalar fp32 loss.
    """
    logits = F.linear(hidden, weight, bias).float().reshape(-1, weight.shape[0])
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is None:
        return total / (labels != ignore_index).sum().clamp_min(1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# ---- quantization and LoRA references ----


# The 16 values a 4-bit index stands for, in index order (bitsandbytes 0.50 ``get_4bit_type``).
# NF4: quantiles of N(0, 1) with equal probability mass, scaled to [-1, 1] (QLoRA, arXiv 2305.14314).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in bit-pattern order, divided by 12.
FP4_CODE_UNSCALED = (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3)


def code_table_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fp32 ``[16]`` value table of ``"nf4"`` or ``"fp4"`` (index = the 4-bit code)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        return torch.tensor(FP4_CODE_UNSCALED, dtype=torch.float32, device=device) / 12.0
    raise ValueError(f"unknown 4-bit quant_type {quant_type!r}: expected 'nf4' or 'fp4'")


def blockwise_absmax_reference(quant_state) -> torch.Tensor:
    """The fp32 per-block scales of a bitsandbytes 4-bit ``QuantState``.

    Plain: ``quant_state.absmax``. Double-quantized: ``code2[q[b]] * absmax2[b // blocksize2]
    + offset`` with ``q = quant_state.absmax`` (uint8) and ``code2``, ``absmax2``, ``blocksize2``
    from ``quant_state.state2`` (bitsandbytes' 8-bit blockwise format), all in fp32.
    """
    state2 = quant_state.state2 if getattr(quant_state, "nested", False) else None
    if state2 is None:
        return quant_state.absmax.float()
    q = quant_state.absmax.long()
    block2 = torch.arange(q.numel(), device=q.device) // state2.blocksize
    offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=q.device)
    return state2.code.float()[q] * state2.absmax.float()[block2] + offset


def dequantize_4bit_reference(
    packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Dequantize bitsandbytes 4-bit storage: ``w[i] = code[nibble[i]] * absmax[i // blocksize]``.

    Element ``2j`` (row-major over ``quant_state.shape``) is the high nibble of byte ``j``,
    element ``2j + 1`` the low one; the product is taken in fp32 and rounded once to ``dtype``.

    Args:
        packed: packed data, any ``quant_storage`` dtype (its bytes are what count).
        quant_state: the bitsandbytes ``QuantState`` (``shape``, ``blocksize``, ``quant_type``,
            ``absmax``; ``state2``/``offset`` when double-quantized).
        dtype: output dtype, default ``quant_state.dtype``.

    Returns:
        ``quant_state.shape`` tensor (``[out_features, in_features]`` for a Linear).
    """
    shape = tuple(quant_state.shape)
    n = math.prod(shape)
    data = packed.detach().contiguous().view(torch.uint8).reshape(-1)
    nibbles = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)[:n].long()
    code = code_table_4bit(quant_state.quant_type, data.device)
    block = torch.arange(n, device=data.device) // quant_state.blocksize
    out = code[nibbles] * blockwise_absmax_reference(quant_state)[block]
    return out.to(dtype or quant_state.dtype).reshape(shape)


# HQQ / affine group quantization (quant/hqq.py). Storage of a weight ``W [out, in]``: with
# ``axis=1`` the stored matrix is ``S = W`` (groups run along ``in``), with ``axis=0`` it is
# ``S = W^T`` (groups run along ``out``); ``S`` is ``[R, C]``. Row ``r`` of ``S`` keeps its codes
# packed in ``row_bytes`` bytes (a multiple of 4): ``per_word`` codes of ``bits`` bits per word
# of ``word_bytes`` bytes (uint8 words for 1/2/4/8 bits, little-endian int32 words otherwise),
# code ``c`` in word ``c // per_word`` at bit ``(per_word - 1 - c % per_word) * bits`` (the
# first code in the highest bits). ``scale``/``zero`` are ``[R, ceil(C / group_size)]`` and
# ``S[r, c] = (code[r, c] - zero[r, g]) * scale[r, g]`` in fp32 with ``g = c // group_size``.


def hqq_word_layout(bits: int) -> tuple[int, int]:
    """``(codes per word, bytes per word)`` of the packed HQQ storage for ``bits`` in 1..8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if 8 % bits == 0:
        return 8 // bits, 1
    return 32 // bits, 4


def unpack_codes_reference(packed: torch.Tensor, bits: int, n_cols: int) -> torch.Tensor:
    """The ``[R, n_cols]`` int32 codes of packed HQQ rows (see the layout note above).

    Args:
        packed: ``[R, row_bytes]`` in any storage dtype (its bytes are what count).
        bits: bits per code.
        n_cols: codes per row (``C``).
    """
    per_word, word_bytes = hqq_word_layout(bits)
    data = packed.detach().contiguous().view(torch.uint8)
    words = data.view(torch.int32) if word_bytes == 4 else data
    shifts = torch.arange(per_word - 1, -1, -1, device=data.device, dtype=torch.int32) * bits
    codes = (words.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :n_cols]


def dequantize_hqq_reference(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    shape: tuple[int, int],
    bits: int,
    group_size: int,
    axis: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dense ``W [out, in]`` of an HQQ storage: ``(code - zero) * scale`` in fp32, cast once.

    Args:
        packed: ``[R, row_bytes]`` packed codes (``R = out`` for ``axis=1``, ``in`` for 0).
        scale: ``[R, groups]`` step of each group; ``zero``: ``[R, groups]`` zero point (codes).
        shape: ``(out_features, in_features)``.
        bits: bits per code; ``group_size``: codes per group along a stored row.
        axis: 1 (groups along ``in``) or 0 (groups along ``out``).
        dtype: output dtype.
    """
    n_cols = shape[1] if axis == 1 else shape[0]
    codes = unpack_codes_reference(packed, bits, n_cols).float()
    group = torch.arange(n_cols, device=codes.device) // group_size
    dense = (codes - zero.float()[:, group]) * scale.float()[:, group]
    dense = dense if axis == 1 else dense.t()
    return dense.to(dtype).contiguous()


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora=None,
    bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA linear ``y = x W^T + b + s * (D(x) A^T) B^T`` by plain autograd (as peft computes it).

    Args:
        x: ``[..., in]``; its dtype is the compute dtype (``W``, ``A``, ``B``, ``b`` are cast).
        weight: dense ``W [out, in]``.
        lora: ``ops.lora.LoRAWeights`` (``A [r, in]``, ``B [out, r]``, ``scaling``, ``dropout``)
            or None.
        bias: optional ``[out]``.
        keep: dropout keep mask (0/1, shape of ``x``): ``D(x) = x * keep / (1 - dropout)``;
            None means no dropout.

    Returns:
        ``[..., out]``.
    """
    y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if lora is None:
        return y
    x_in = x if keep is None else x * keep * (1.0 / (1.0 - lora.dropout))
    lora_out = F.linear(F.linear(x_in, lora.A.to(x.dtype)), lora.B.to(x.dtype))
    return y + lora.scaling * lora_out


def lora_qkv_reference(x: torch.Tensor, q, k, v, keeps=(None, None, None)):
    """Three LoRA projections of one input; ``q``, ``k``, ``v`` are ``(weight, lora[, bias])``."""
    return tuple(lora_linear_reference(x, *p, keep=m) for p, m in zip((q, k, v), keeps))


def lora_mlp_reference(
    x: torch.Tensor,
    gate,
    up,
    down,
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu",
    keeps=(None, None, None),
) -> torch.Tensor:
    """Gated MLP with LoRA on each projection: ``(act(x Wg'^T) * x Wu'^T) Wd'^T``.

    Args:
        x: ``[..., hidden]``.
        gate: ``(weight [inter, hidden], lora[, bias])``; ``up`` likewise, ``down`` with
            ``weight [hidden, inter]``.
        activation: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` / ``"gelu"`` (GeGLU).
        keeps: dropout keep masks of the gate, up and down LoRA inputs (None: no dropout).

    Returns:
        ``[..., hidden]``.
    """
    e = lora_linear_reference(x, *gate, keep=keeps[0])
    u = lora_linear_reference(x, *up, keep=keeps[1])
    if activation == "silu":
        h = swiglu(e, u)
    else:
        h = geglu(e, u, "tanh" if activation == "gelu_tanh" else "none")
    return lora_linear_reference(h, *down, keep=keeps[2])


# ---- GPTQ (AutoGPTQ v1 "gptq" checkpoint format; packing lives in quant.gptq_format) ----


def unpack_int32_reference(packed: torch.Tensor, bits: int, dim: int, n: int) -> torch.Tensor:
    """The ``n`` integer codes that ``bits``-bit packing stored in int32 words along ``dim``.

    The words along ``dim`` form one little-endian bit stream: code ``j`` occupies stream bits
    ``[bits * j, bits * j + bits)``, i.e. word ``bits * j // 32`` from bit ``bits * j % 32``.
    For 2/4/8 bits a code never crosses a word; for 3 bits, 32 codes fill 3 words and codes 10
    and 21 cross into the next word (AutoGPTQ's 3-bit layout is exactly this stream).

    Args:
        packed: int32 tensor with ``n * bits / 32`` words along ``dim``.
        bits: 2, 3, 4 or 8.
        dim: the packed dimension.
        n: number of codes along ``dim``.

    Returns:
        int64 codes in ``[0, 2**bits)``, ``packed``'s shape with ``n`` along ``dim``.
    """
    words = packed.movedim(dim, 0).long() & 0xFFFFFFFF  # unsigned view: logical shifts
    start = torch.arange(n, device=packed.device) * bits
    index, shift = start // 32, (start % 32).view(-1, *([1] * (words.dim() - 1)))
    codes = words[index] >> shift
    spill = (start % 32) + bits > 32
    if bool(spill.any()):  # 3-bit codes that continue in the next word
        high = words[(index + 1).clamp(max=words.shape[0] - 1)] << (32 - shift)
        codes = torch.where(spill.view_as(shift), codes | high, codes)
    return (codes & ((1 << bits) - 1)).movedim(0, dim)


def dequantize_gptq_reference(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense ``W [out, in]`` of GPTQ storage: ``W[o, c] = s[g, o] * (q[c, o] - z[g, o])``, ``g =
    g_idx[c]``, where the stored zero is ``z - 1`` (AutoGPTQ v1) so ``z = (stored + 1) mod 2**bits``.

    Args:
        qweight: int32 ``[in * bits / 32, out]`` (codes packed along the input dim).
        qzeros: int32 ``[n_groups, out * bits / 32]`` (zero - 1, packed along the output dim).
        scales: ``[n_groups, out]``.
        g_idx: int ``[in]``, the group of each input column.
        bits: 2, 3, 4 or 8.
        dtype: output dtype, default ``scales.dtype``.

    Returns:
        ``[out, in]``; the arithmetic is done in fp32.
    """
    n_in, n_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    codes = unpack_int32_reference(qweight, bits, 0, n_in)
    zeros = (unpack_int32_reference(qzeros, bits, 1, n_out) + 1) & ((1 << bits) - 1)
    group = g_idx.long()
    dense = scales.float()[group] * (codes - zeros[group]).float()
    return dense.t().to(dtype or scales.dtype)


def gptq_linear_reference(
    x: torch.Tensor, storage, bits: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x W^T + b`` with ``W`` dequantized from ``storage`` = ``(qweight, qzeros, scales,
    g_idx)`` in ``x``'s dtype (the precision contract of the fast path)."""
    weight = dequantize_gptq_reference(*storage, bits=bits, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
