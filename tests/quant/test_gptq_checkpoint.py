"""GPTQ over a real model, saved in the standard layout and loaded back into GPTQLinear layers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from turbotune.quant.gptq import GPTQSpec
from turbotune.quant.gptq_checkpoint import load_gptq_model, read_gptq_config, save_gptq
from turbotune.quant.gptq_format import dequantize_gptq
from turbotune.quant.gptq_linear import GPTQLinear
from turbotune.quant.gptq_model import quantize_model, rtn_quantize_model

# GPTQLinear's eager path (the kernels have their own tests; interpreting them here took ~40 s).
pytestmark = pytest.mark.usefixtures("single_thread", "eager_ops")


def load_fp32(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def story_batches(path, n: int, seq: int = 64, offset: int = 0) -> list[torch.Tensor]:
    """Real text through the model's tokenizer, as ``[2, seq]`` batches."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = (path.parents[1] / "tiny-shakespeare" / "tiny_shakespeare.txt").read_text()
    ids = torch.tensor(tok(text[offset : offset + 30_000])["input_ids"][: n * 2 * seq])
    return list(ids.view(n, 2, seq))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a - b).abs()
    return f"max abs diff {d.max():.3g}, mean {d.mean():.3g}"


@pytest.mark.parametrize(
    "spec",
    [
        GPTQSpec(bits=8, group_size=32, sym=False, desc_act=True),  # every linear packs at 8 bits
        GPTQSpec(bits=4, group_size=-1),  # FFN width 172 does not pack at 4 bits: stays dense
    ],
    ids=["8bit-asym-actorder-g32", "4bit-sym-percolumn"],
)
def test_checkpoint_round_trip_gives_the_same_logits(stories260k, tmp_path, spec):
    model = load_fp32(stories260k)
    result = quantize_model(model, story_batches(stories260k, 3), spec, progress=False)
    assert result.weights, "nothing was quantized"
    save_gptq(model, result, tmp_path, dtype=torch.float32)

    quant = read_gptq_config(tmp_path)
    assert quant == json.loads((tmp_path / "quantize_config.json").read_text())
    assert (quant["quant_method"], quant["checkpoint_format"]) == ("gptq", "gptq")
    assert (quant["bits"], quant["group_size"], quant["sym"], quant["desc_act"]) == (
        spec.bits, spec.group_size, spec.sym, spec.desc_act,
    )  # fmt: skip
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = next(iter(result.weights))
        assert {f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")} <= keys
        assert f"{name}.weight" not in keys
        assert f.get_tensor(f"{name}.scales").dtype == torch.float16
        # what is stored dequantizes to exactly the weights GPTQ left in the model
        stored = dequantize_gptq(
            *(f.get_tensor(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")),
            spec.bits,
            torch.float32,
        )
    assert torch.equal(stored, model.get_submodule(name).weight), max_diff(
        stored, model.get_submodule(name).weight
    )
    if result.skipped:
        assert "modules_in_block_to_quantize" in quant
        assert all(f"{n}.weight" in keys for n in result.skipped)

    loaded = load_gptq_model(tmp_path, dtype=torch.float32)
    swapped = {n for n, m in loaded.named_modules() if isinstance(m, GPTQLinear)}
    assert swapped == set(result.weights)
    assert not hasattr(loaded.config, "quantization_config")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    ids = story_batches(stories260k, 1, offset=40_000)[0]
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    # fp32 throughout and the same dense weights: only matmul order could differ
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), max_diff(got, expected)


def test_sharded_checkpoint_loads(stories260k, tmp_path):
    model = load_fp32(stories260k)
    spec = GPTQSpec(bits=8, group_size=64)
    result = quantize_model(model, story_batches(stories260k, 2), spec, progress=False)
    save_gptq(model, result, tmp_path, dtype=torch.float32, max_shard_bytes=200_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_gptq_model(tmp_path, dtype=torch.float32)
    ids = story_batches(stories260k, 1, offset=40_000)[0]
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), max_diff(got, expected)


def test_gptq_model_has_lower_held_out_loss_than_rtn(stories260k):
    """The light CI twin of benchmarks/gptq_quality.py: real model, real text, calibration and
    evaluation text disjoint, the same groups for both."""
    spec = GPTQSpec(bits=4, group_size=32)  # attention projections (the FFN does not pack)
    calib = story_batches(stories260k, 8)
    held_out = story_batches(stories260k, 4, offset=60_000)

    def loss(model) -> float:
        with torch.no_grad():
            return sum(model(input_ids=ids, labels=ids).loss.item() for ids in held_out)

    gptq, rtn = load_fp32(stories260k), load_fp32(stories260k)
    quantize_model(gptq, calib, spec, progress=False)
    rtn_quantize_model(rtn, spec)
    assert loss(gptq) < loss(rtn), {"gptq": loss(gptq), "rtn": loss(rtn)}


def test_not_a_gptq_checkpoint_is_refused(stories260k):
    from turbotune.errors import TurbotuneError

    assert read_gptq_config(stories260k) is None
    with pytest.raises(TurbotuneError, match="no GPTQ quantization_config"):
        load_gptq_model(stories260k)


def test_checkpoint_without_g_idx_loads_with_the_default_order(stories260k, tmp_path):
    """Older checkpoints without act-order may omit ``g_idx``: it is ``c // group_size``."""
    from safetensors.torch import load_file, save_file

    model = load_fp32(stories260k)
    spec = GPTQSpec(bits=8, group_size=32)
    result = quantize_model(model, story_batches(stories260k, 2), spec, progress=False)
    save_gptq(model, result, tmp_path, dtype=torch.float32)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    stripped = {k: v for k, v in tensors.items() if not k.endswith(".g_idx")}
    assert len(stripped) < len(tensors)
    save_file(stripped, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_gptq_model(tmp_path, dtype=torch.float32)
    ids = story_batches(stories260k, 1, offset=40_000)[0]
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), max_diff(got, expected)
