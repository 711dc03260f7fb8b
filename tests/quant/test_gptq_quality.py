"""GPTQ vs round-to-nearest on the real SmolLM2-135M (loaded from its GGUF file): held-out
perplexity on Wikipedia text, calibration and evaluation text disjoint.

The same measurement as ``benchmarks/gptq_quality.py`` (numbers in benchmarks/results); several
minutes on 2 CPU cores, hence ``slow``. The light CI twin is
``test_gptq_checkpoint.py::test_gptq_model_has_lower_held_out_loss_than_rtn``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from turbotune.quant.gptq import GPTQSpec
from turbotune.quant.gptq_calibration import perplexity, token_stream, windows
from turbotune.quant.gptq_model import quantize_model, rtn_quantize_model

pytest.importorskip("gguf")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _batches(items: list[torch.Tensor], size: int = 4) -> list[torch.Tensor]:
    return [torch.stack(items[i : i + size]) for i in range(0, len(items), size)]


@pytest.mark.slow
@pytest.mark.parametrize("desc_act", [False, True], ids=["plain", "act-order"])
def test_gptq_4bit_g128_beats_rtn_on_smollm2(shared_data, desc_act):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = shared_data / "smollm2-135m-instruct"
    if not (root / GGUF).is_file():
        pytest.skip(f"{root / GGUF} is missing")
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "hf-tokenizer-config"))
    text = (shared_data / "llamafactory-demo" / "wiki_demo.txt").read_text(encoding="utf-8")
    stream = token_stream(tokenizer, [t for t in text.splitlines() if t.strip()])
    cut = int(len(stream) * 0.7)  # calibrate on the first 70%, score on the rest
    calib = _batches(windows(stream[:cut], 16, 256, seed=0))
    held_out = _batches(windows(stream[cut:], 16, 256, seed=None))
    spec = GPTQSpec(bits=4, group_size=128, desc_act=desc_act)

    rtn = copy.deepcopy(model.eval())
    rtn_quantize_model(rtn, spec)
    rtn_ppl = perplexity(rtn, held_out)
    del rtn
    quantize_model(model, calib, spec, device="cpu", progress=False)
    gptq_ppl = perplexity(model, held_out)
    assert gptq_ppl < rtn_ppl, {"gptq": gptq_ppl, "rtn": rtn_ppl}
