"""The fused causal-LM forward skips transformers' packed-sequence probe (a host sync per step)
only when the model's positions are its own arange (``patches/packing.py``)."""

from __future__ import annotations

import pytest
import torch
from tests.patches.test_fused_parity import data, tiny_model

from turbotune.patches import apply_patches
from turbotune.patches.packing import PROBE, positions_are_default, probe_without_sync

masking_utils = pytest.importorskip(PROBE[0])
if not hasattr(masking_utils, PROBE[1]):
    pytest.skip("this transformers has no packed-sequence probe", allow_module_level=True)


def test_probe_answer_is_the_originals_for_default_positions():
    """The shortcut answers what the probe answers for an arange (and any offset)."""
    original = getattr(masking_utils, PROBE[1])
    for start in (0, 7):
        positions = torch.arange(start, start + 12).unsqueeze(0).expand(3, -1)
        assert original(positions) is None
        with positions_are_default(True):
            assert probe_without_sync(original)(positions) is None
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    assert original(packed) is not None
    assert torch.equal(probe_without_sync(original)(packed), original(packed))


def test_fused_forward_vouches_for_default_positions_only(monkeypatch):
    """The fused forward declares the positions default exactly when the caller gave no
    positions, mask or cache; the engine has the probe wrapped while patched; the loss is the
    same either way."""
    from turbotune.patches import forwards

    torch.set_num_threads(1)
    model = tiny_model("llama", num_hidden_layers=1).train()
    model.config.use_cache = False  # as in training
    flags = []
    real = forwards.positions_are_default

    def spy(known):
        flags.append(known)
        return real(known)

    monkeypatch.setattr(forwards, "positions_are_default", spy)
    patches = apply_patches(model)
    assert hasattr(getattr(masking_utils, PROBE[1]), "__wrapped__")
    ids, labels = data(1)[0]
    loss = model(input_ids=ids, labels=labels).loss
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    same = model(input_ids=ids, labels=labels, position_ids=positions).loss
    model(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))
    assert flags == [True, False, False]
    torch.testing.assert_close(same, loss, rtol=0, atol=0)
    patches.undo()
