"""The padding-free benchmark mode on CPU: real GSM8K rows, padded vs padding-free scenarios.

Both scenarios see the same rows at every step (same seed), so the real tokens per step are
equal and, since a padding-free batch computes the padded batch's loss, the per-step losses of
the two processes agree; only the padding differs.
"""

from __future__ import annotations

import pytest
import yaml

from turbotune.bench.worker import padding_free


@pytest.fixture(scope="module")
def results(tmp_path_factory, shared_data):
    """Both points run in this process (the CLI's one-process-per-point is tested elsewhere)."""
    import torch

    from turbotune.bench.scenarios import expand, load_scenarios
    from turbotune.bench.worker import run_point

    root = tmp_path_factory.mktemp("pf-bench")
    scenarios = {
        "baseline": "padded",
        "defaults": {
            "models": ["llama-tiny"], "shapes": ["4x96"], "warmup": 1, "steps": 2,
            "precision": "fp32",
            "data": str(shared_data / "gsm8k" / "train.jsonl"),
            "tokenizer": str(shared_data / "stories260K" / "hf"),
        },
        "scenarios": [
            {"name": "padded", "config": {"adapter": {"method": "lora"}}},
            {"name": "padding-free",
             "config": {"adapter": {"method": "lora"}, "plugins": {"padding_free": {}}}},
        ],
    }  # fmt: skip
    path = root / "pf.yaml"
    path.write_text(yaml.safe_dump(scenarios))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        points = expand(load_scenarios(path))
        return {p.scenario: run_point(p.spec(str(root / p.scenario))) for p in points}
    finally:
        torch.set_num_threads(before)


def test_same_tokens_and_losses_padded_and_padding_free(results):
    padded, packed = results["padded"], results["padding-free"]
    assert padded["status"] == packed["status"] == "ok"
    assert padded["tokens_per_step"] == packed["tokens_per_step"] > 0
    assert padded["seq_len_effective"] == pytest.approx(packed["seq_len_effective"])
    a, b = padded["losses"], packed["losses"]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


def test_scenarios_switch_padding_free_by_their_config():
    assert padding_free({"plugins": {"padding_free": {}}})
    assert padding_free({"plugins": {"padding_free": None, "fused_ops": {}}})
    assert not padding_free({"plugins": {"padding_free": {"enabled": False}}})
    assert not padding_free({"plugins": {"fused_ops": {}}}) and not padding_free(None)
