"""The RMSNorm -> folded LoRA group handoff of spare columns (``ops/spare_columns.py``)."""

from __future__ import annotations

import pytest
import torch

from turbotune.ops import spare_columns


@pytest.fixture(autouse=True)
def _clean():
    spare_columns.reset()
    yield
    spare_columns.reset()
    spare_columns.ENABLED = True


def _offered(rows=6, cols=8, spare=16):
    buf = torch.randn(rows, cols + spare)
    view = buf[:, :cols]
    spare_columns.offer(view, spare)
    return buf, view


def test_claim_widens_the_offered_view_once():
    buf, view = _offered()
    wide = spare_columns.claim(view, 16)
    assert wide is not None and wide.shape == (6, 24) and wide.data_ptr() == buf.data_ptr()
    wide[:, 8:].fill_(3.0)
    assert torch.equal(buf[:, 8:], torch.full((6, 16), 3.0))
    # One-shot: a second consumer of the same activation must copy.
    assert spare_columns.claim(view, 16) is None
    assert spare_columns.claims == 1


def test_claim_refuses_what_was_not_offered_or_is_too_narrow():
    _, view = _offered(spare=16)
    assert spare_columns.claim(view, 32) is None  # too few spare columns
    assert spare_columns.wanted() == 32  # later norms will offer enough
    assert spare_columns.claim(torch.randn(6, 8), 8) is None  # never offered
    _, other = _offered(spare=16)
    assert spare_columns.claim(other.contiguous(), 8) is None  # a copy is another tensor
    assert spare_columns.claims == 0


def test_wanted_is_rounded_capped_and_switchable():
    assert spare_columns.wanted() == 0
    spare_columns.claim(torch.randn(4, 8), 40)
    assert spare_columns.wanted() == 48
    spare_columns.claim(torch.randn(4, 8), spare_columns.MAX_SPARE + 8)
    assert spare_columns.wanted() == 48  # beyond the cap: such groups keep copying
    spare_columns.ENABLED = False
    assert spare_columns.wanted() == 0


def test_rows_with_room_and_widened():
    """The producer allocates with the learned room and offers it; the consumer gets the room
    once, and a copy of ``x`` in a new buffer when there is none."""
    assert spare_columns.rows_with_room(3, 8, torch.float32, torch.device("cpu")).stride(0) == 8
    spare_columns.claim(torch.randn(3, 8), 16)  # a consumer asked for 16 columns
    rows = spare_columns.rows_with_room(3, 8, torch.float32, torch.device("cpu"))
    rows.copy_(torch.randn(3, 8))
    assert rows.stride(0) == 24
    wide = spare_columns.widened(rows, 16)
    assert wide.data_ptr() == rows.data_ptr() and wide.shape == (3, 24)
    again = spare_columns.widened(rows, 16)  # the room is taken: a copy
    assert again.data_ptr() != rows.data_ptr() and torch.equal(again[:, :8], rows)
    plain = spare_columns.rows_with_room(3, 8, torch.float32, torch.device("cpu"), room=False)
    assert plain.stride(0) == 8 and spare_columns.claim(plain, 16) is None


def test_rms_norm_offers_its_output_with_spare_columns():
    from turbotune.ops._triton import HAS_TRITON, interpreting
    from turbotune.ops.rms_norm import rms_norm

    if not (HAS_TRITON and (interpreting() or torch.cuda.is_available())):
        pytest.skip("needs Triton (interpreter on CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 5, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)
    plain = rms_norm(x, w, 1e-6)
    spare_columns.claim(torch.randn(4, 8), 16)  # a folded group asked for 16 columns
    y = rms_norm(x, w, 1e-6)
    assert y.stride(-2) == 48 and torch.equal(y, plain)
    rows = y.reshape(-1, 32)
    assert spare_columns.claim(rows, 16) is not None
    g = torch.randn_like(y)
    (gx, gw) = torch.autograd.grad(y, (x, w), g)
    (px, pw) = torch.autograd.grad(plain, (x, w), g)
    assert torch.equal(gx, px) and torch.equal(gw, pw)


def test_qlora_training_equal_with_and_without_the_handoff(tmp_path):
    """Fused NF4 QLoRA on a two-layer Llama (q/k/v and gate/up folded over dequantized
    weights): the same losses bit for bit, every folded group but the very first takes its
    norm's spare columns instead of copying the activation, and the wide down projection's
    backward takes the spare columns of its output gradient."""
    pytest.importorskip("bitsandbytes")
    from tests.helpers import train_steps
    from tests.patches.test_fused_parity import data, tiny_model
    from tests.quant.test_bnb_qlora import LORA

    from turbotune.framework import AccelerationFramework
    from turbotune.ops._triton import HAS_TRITON, interpreting

    if not (HAS_TRITON and (interpreting() or torch.cuda.is_available())):
        pytest.skip("needs Triton (interpreter on CPU)")
    torch.set_num_threads(1)
    # 2 layers, MLP 4x wide: the down projection takes the "wide" backward ([dy | g] [W; A]),
    # whose dy (layer 0's output gradient) comes from layer 1's fused add-norm backward.
    tiny = tiny_model("llama", num_hidden_layers=2, intermediate_size=256, dtype=torch.bfloat16)
    tiny.save_pretrained(tmp_path)
    rows = [ids for ids, _ in data(2, batch=2, seq=16)]
    losses, claims = {}, {}
    for enabled in (True, False):
        spare_columns.reset()
        spare_columns.ENABLED = enabled
        fw = AccelerationFramework(
            {"quantization": {"method": "nf4"}, "adapter": LORA, "plugins": {"fused_ops": {}}},
            banner=False,
        )
        model, peft_config = fw.load_model(str(tmp_path))
        torch.manual_seed(0)
        model, _ = fw.augment(model, None, peft_config)
        losses[enabled] = train_steps(model, rows, lr=1e-3)
        claims[enabled] = spare_columns.claims
    # Forward: 2 folded groups x 2 layers x 2 steps, but the very first group of the run copies
    # (it tells the norms the width); backward: layer 0's down projection, once per step, and
    # each layer's o_proj (its dy comes from the add-norm backward), once per step.
    assert claims == {True: 2 * 2 * 2 - 1 + 2 + 2 * 2, False: 0}, claims
    assert losses[True] == losses[False], losses


def test_gradient_rows_returns_the_registered_buffer_only_when_it_fits():
    """Inside ``gradient_into(x, rows)`` a producer of x's gradient gets ``rows`` (and its spare
    columns are offered); a view of x matches; any mismatch, or leaving the context, gives a
    new buffer."""
    cpu = torch.device("cpu")
    x = torch.randn(2, 3, 8)
    dest = torch.empty(6, 8 + 16)[:, :8]
    with spare_columns.gradient_into(x, dest):
        got = spare_columns.gradient_rows(x.view(-1, 8), 6, 8, torch.float32)
        assert got is dest
        assert spare_columns.claim(dest, 16) is not None  # offered with its room
        assert spare_columns.gradient_rows(x, 6, 8, torch.float64) is not dest
        assert spare_columns.gradient_rows(x, 3, 16, torch.float32) is not dest
        assert spare_columns.gradient_rows(torch.randn(6, 8), 6, 8, torch.float32) is not dest
    assert spare_columns.gradient_rows(x, 6, 8, torch.float32) is not dest
    rows = spare_columns.rows_with_room(6, 8, torch.float32, cpu)  # the usual producer path
    assert rows.shape == (6, 8)
