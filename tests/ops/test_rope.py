"""Rotary kernel vs the eager reference and vs HF's rotary embedding + apply_rotary_pos_emb."""

from __future__ import annotations

import importlib

import pytest
import torch

from turbotune.ops import reference
from turbotune.ops.rope import apply_rotary

# The op module itself, for monkeypatching (robust to a same-named function re-export).
rope_mod = importlib.import_module("turbotune.ops.rope")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, Hq, Hk, S, D): typical GQA, prime heads/half-dim (23), tiny, half-dim one above 32.
SHAPES = [(2, 4, 2, 8, 64), (1, 5, 3, 7, 46), (1, 1, 1, 1, 2), (2, 3, 1, 4, 66)]


def _inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def _restarting_positions(batch: int, seq: int) -> torch.Tensor:
    """Padding-free style positions: each row packs sequences whose positions restart at 0."""
    rows = []
    for b in range(batch):
        cut = max(1, seq // (b + 2))
        rows.append(torch.cat([torch.arange(cut), torch.arange(seq - cut) + 3 * b]))
    return torch.stack(rows)


def _master(batch, n_q, n_k, seq, dim, *, q_layout="bhsd", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_shape = (batch, seq, n_q, dim) if q_layout == "bshd" else (batch, n_q, seq, dim)
    cos, sin = reference.rotary_cos_sin(_inv_freq(dim), _restarting_positions(batch, seq))
    return {
        "q": torch.randn(*q_shape, generator=gen).requires_grad_(),
        "k": torch.randn(batch, n_k, seq, dim, generator=gen).requires_grad_(),
        "cos": cos,
        "sin": sin,
    }


def _to_bhsd(q: torch.Tensor) -> torch.Tensor:
    return q.transpose(1, 2)


def _joined(impl, q_view=lambda q: q):
    """One output tensor (query heads then key heads) so a single grad_output drives both."""

    def fn(q, k, cos, sin):
        q_rot, k_rot = impl(q_view(q), k, cos, sin)
        return torch.cat((q_rot, k_rot), dim=1)

    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, device, parity):
    parity(_joined(apply_rotary), _joined(reference.apply_rotary), _master(*shape), dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transposed_hf_layout(dtype, device, parity):
    """q built as [B, S, H, D] then transposed, as HF attention does (non-contiguous view)."""
    parity(
        _joined(apply_rotary, _to_bhsd),
        _joined(reference.apply_rotary, _to_bhsd),
        _master(2, 4, 2, 6, 32, q_layout="bshd"),
        dtype,
        device,
    )


def test_fused_qkv_slices(device, parity):
    """q and k sliced out of one fused projection: non-dense views with a large head stride."""
    batch, seq, n_q, n_k, dim = 2, 5, 3, 1, 16
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(batch, seq, (n_q + 2 * n_k) * dim, generator=gen).requires_grad_()
    cos, sin = reference.rotary_cos_sin(_inv_freq(dim), _restarting_positions(batch, seq))

    def run(impl):
        def fn(qkv, cos, sin):
            q = qkv[..., : n_q * dim].view(batch, seq, n_q, dim).transpose(1, 2)
            k = qkv[..., n_q * dim : (n_q + n_k) * dim].view(batch, seq, n_k, dim).transpose(1, 2)
            q_rot, k_rot = impl(q, k, cos, sin)
            return torch.cat((q_rot, k_rot), dim=1)

        return fn

    master = {"qkv": qkv, "cos": cos, "sin": sin}
    parity(run(apply_rotary), run(reference.apply_rotary), master, torch.float32, device)


def test_broadcast_cos_sin(device, parity):
    """cos/sin of shape [1, S, D] shared by the whole batch."""
    master = _master(3, 2, 2, 4, 8)
    master["cos"], master["sin"] = reference.rotary_cos_sin(_inv_freq(8), torch.arange(4)[None])
    parity(_joined(apply_rotary), _joined(reference.apply_rotary), master, torch.float32, device)


def test_positions_are_per_token(device):
    """Restarting positions must give different results from plain 0..S-1 positions."""
    master = _master(2, 2, 1, 8, 16)
    q, k = master["q"].detach().to(device), master["k"].detach().to(device)
    plain = reference.rotary_cos_sin(_inv_freq(16), torch.arange(8).repeat(2, 1))
    packed = (master["cos"].to(device), master["sin"].to(device))
    q_packed, _ = apply_rotary(q, k, *packed)
    q_plain, _ = apply_rotary(q, k, *(t.to(device) for t in plain))
    assert (q_packed - q_plain).abs().max() > 1e-2
    torch.testing.assert_close(q_packed, reference.apply_rotary(q, k, *packed)[0])


ROPE_PARAMETERS = {
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_matches_hf_scaled_rope(rope_type, device):
    """Our cos/sin from HF's ``inv_freq`` + our kernel == HF's module + apply_rotary_pos_emb."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        rope_parameters=dict(ROPE_PARAMETERS[rope_type]),
    )
    rotary = LlamaRotaryEmbedding(config).to(device)
    # Positions past max_position_embeddings make the dynamic type rescale its inv_freq.
    positions = (_restarting_positions(2, 24) * 3).to(device)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 24, 32, generator=gen).to(device)
    k = torch.randn(2, 1, 24, 32, generator=gen).to(device)
    hf_cos, hf_sin = rotary(q, positions)
    want_q, want_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)

    cos, sin = reference.rotary_cos_sin(rotary.inv_freq, positions, rotary.attention_scaling)
    if rope_type == "yarn":
        assert rotary.attention_scaling != 1.0  # the scaling path is exercised
    torch.testing.assert_close(cos, hf_cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin, hf_sin, atol=1e-6, rtol=1e-6)
    got_q, got_k = apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)


def test_uses_kernel(device):
    q = torch.randn(1, 2, 3, 8, device=device, requires_grad=True)
    cos, sin = (t.to(device) for t in reference.rotary_cos_sin(_inv_freq(8), torch.arange(3)[None]))
    q_rot, _ = apply_rotary(q, q.detach(), cos, sin)
    assert q_rot.grad_fn.name() == "RotaryFunctionBackward"


def test_cpu_fallback_is_the_reference(monkeypatch):
    monkeypatch.setattr(rope_mod, "use_triton", lambda *tensors: False)
    master = _master(2, 2, 1, 5, 8)
    q, k, cos, sin = master["q"], master["k"], master["cos"], master["sin"]
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    assert "RotaryFunction" not in q_rot.grad_fn.name()
    want_q, want_k = reference.apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(q_rot, want_q, atol=0, rtol=0)
    torch.testing.assert_close(k_rot, want_k, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_real_shape(dtype, parity):
    """Llama-8B attention: 32 query heads, 8 key heads, D=128, 2 x 2048 packed tokens."""
    batch, n_q, n_k, seq, dim = 2, 32, 8, 2048, 128
    master = _master(batch, n_q, n_k, seq, dim, q_layout="bshd")
    master["cos"], master["sin"] = reference.rotary_cos_sin(
        _inv_freq(dim, 500000.0), _restarting_positions(batch, seq)
    )
    parity(
        _joined(apply_rotary, _to_bhsd),
        _joined(reference.apply_rotary, _to_bhsd),
        master,
        dtype,
        torch.device("cuda"),
    )
