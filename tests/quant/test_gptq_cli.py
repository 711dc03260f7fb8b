"""``turbotune quantize gptq``: a real model and real text in, a loadable GPTQ checkpoint out."""

from __future__ import annotations

import json

import pytest
import torch

from turbotune.cli import main
from turbotune.quant.gptq_checkpoint import load_gptq_model
from turbotune.quant.gptq_linear import GPTQLinear

pytestmark = pytest.mark.usefixtures("single_thread", "eager_ops")


def test_quantize_gptq_writes_a_checkpoint_that_loads(stories260k, shared_data, tmp_path, capsys):
    out = tmp_path / "gptq"
    code = main(
        [
            "quantize", "gptq", str(stories260k), "--out", str(out),
            "--calibration", str(shared_data / "alpaca" / "alpaca_tiny.json"),
            "--bits", "8", "--group-size", "32", "--desc-act", "--asym",
            "--samples", "4", "--seq-len", "64", "--batch-size", "2",
        ]
    )  # fmt: skip
    assert code == 0 and "checkpoint written" in capsys.readouterr().out
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (quant["bits"], quant["group_size"], quant["desc_act"], quant["sym"]) == (
        8, 32, True, False,
    )  # fmt: skip
    assert (out / "quantize_config.json").is_file() and (out / "tokenizer.json").is_file()
    model = load_gptq_model(out, dtype=torch.float32)
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 35  # 5 layers x 7
    ids = torch.tensor([[1, 403, 407, 261, 378, 426, 281, 334]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def test_bad_group_size_is_a_clean_error(stories260k, shared_data, tmp_path, capsys):
    code = main(
        [
            "quantize", "gptq", str(stories260k), "--out", str(tmp_path / "x"),
            "--calibration", str(shared_data / "alpaca" / "alpaca_tiny.json"),
            "--group-size", "0",
        ]
    )  # fmt: skip
    assert code == 2 and "group_size" in capsys.readouterr().err
