"""What a run saves is usable: the adapter loads with peft and computes what the trained model
computed; ``turbotune merge`` folds it into the base with the same logits; ``turbotune generate``
runs with and without an adapter (merged model = base + adapter, token for token)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from turbotune.errors import TurbotuneError
from turbotune.train.merge import generate, merge_adapter

from .conftest import check_ok, run_clis

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "Once upon a time"
#: Merged vs unmerged fp32 logits: every product of the 5 layers rounds differently once
#: ``W + s * B @ A`` is one matrix; logits reach ~15, where one fp32 ulp is ~1.9e-6, and ~15 ulp
#: were measured. The adapter itself moves the logits by > 1e-2, a hundred times more.
MERGE_ATOL = 1e-4


def _ids(trained_lora) -> torch.Tensor:
    """Two real rows of the held-out set, cut to one length: ``(2, seq)``."""
    rows = [trained_lora.trainer.eval_dataset[i]["input_ids"] for i in range(2)]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits.float()


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, label: str) -> None:
    diff = (got - want).abs()
    where = divmod(int(diff.argmax()), diff.shape[-1])
    assert diff.max() <= atol, (
        f"{label}: max abs diff {diff.max():.2e} at (row*seq, vocab) {where}, mean {diff.mean():.2e}"
    )


@pytest.fixture(scope="module")
def adapted_logits(trained_lora, stories260k):
    """Logits of the base with the saved adapter loaded by peft, and of the bare base."""
    ids = _ids(trained_lora)
    base = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32)
    bare = _logits(base, ids)
    model = PeftModel.from_pretrained(base, str(trained_lora.output_dir))
    return ids, _logits(model, ids), bare


def test_saved_adapter_loads_with_peft(trained_lora, adapted_logits):
    ids, loaded, bare = adapted_logits
    trained = _logits(trained_lora.trainer.model, ids)
    _assert_close(loaded, trained, 1e-6, "peft-loaded adapter vs the trained model")
    moved = (trained - bare).abs().max()
    assert moved > 1e-2, f"the adapter barely changes the logits ({moved:.2e}): the test is blind"


def test_merge_function_matches_base_plus_adapter(trained_lora, adapted_logits, tmp_path):
    ids, want, _ = adapted_logits
    out = merge_adapter(trained_lora.output_dir, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    _assert_close(_logits(merged, ids), want, MERGE_ATOL, "merged vs base + adapter")
    assert AutoTokenizer.from_pretrained(out)(PROMPT)["input_ids"]
    assert not (tmp_path / ".staging").exists()


def test_merge_refuses_a_directory_without_adapter(tmp_path):
    with pytest.raises(TurbotuneError, match=r"no adapter_config\.json"):
        merge_adapter(tmp_path, tmp_path / "out")


def test_merge_and_generate_through_cli(trained_lora, adapted_logits, stories260k, tmp_path):
    ids, want, _ = adapted_logits
    out, adapter = tmp_path / "merged", str(trained_lora.output_dir)
    base_said = generate(str(stories260k), PROMPT, max_new_tokens=12, device="cpu")
    adapted_said = generate(
        str(stories260k), PROMPT, adapter=adapter, max_new_tokens=12, device="cpu"
    )
    assert base_said.strip() and adapted_said.strip(), "greedy generation produced nothing"
    merge, with_adapter, without = run_clis(
        ("merge", adapter, "--out", str(out), "--dtype", "float32"),
        ("generate", str(stories260k), PROMPT, "--adapter", adapter, "--max-new-tokens", "12"),
        ("generate", str(stories260k), PROMPT, "--max-new-tokens", "12"),
    )
    for proc in (merge, with_adapter, without):
        check_ok(proc)
    _assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(out), ids), want, MERGE_ATOL, "CLI merge"
    )
    assert with_adapter.stdout.strip() == adapted_said.strip()
    assert without.stdout.strip() == base_said.strip()
    # The merged model alone generates what the base + adapter generate.
    assert generate(str(out), PROMPT, max_new_tokens=12, device="cpu") == adapted_said
