"""LoRA on a GPTQ checkpoint through the plugin: the same training as on its dequantized weights;
merge of such an adapter."""

from __future__ import annotations

import functools

import pytest
import torch
from tests.helpers import train_steps

from turbotune.errors import ConfigError
from turbotune.framework import AccelerationFramework
from turbotune.quant.gptq import GPTQSpec
from turbotune.quant.gptq_checkpoint import dequantize_gptq_model, load_gptq_model, save_gptq
from turbotune.quant.gptq_linear import GPTQLinear
from turbotune.quant.gptq_model import quantize_model

pytestmark = pytest.mark.usefixtures("single_thread", "eager_ops")

LORA = {"method": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def text_batches(path, n: int, batch: int = 4, seq: int = 48, offset: int = 0):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = (path.parents[1] / "tiny-shakespeare" / "tiny_shakespeare.txt").read_text()
    ids = torch.tensor(tok(text[offset : offset + 40_000])["input_ids"][: n * batch * seq])
    return list(ids.view(n, batch, seq))


@pytest.fixture(scope="module")
def gptq_checkpoint(stories260k, tmp_path_factory):
    """stories260K quantized by GPTQ at 4 bits (attention; the 172-wide FFN stays dense)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32)
    result = quantize_model(
        model, text_batches(stories260k, 4, offset=200_000), GPTQSpec(bits=4, group_size=32),
        progress=False,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("gptq")
    save_gptq(model, result, out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(stories260k).save_pretrained(out)
    return out


train = functools.partial(train_steps, lr=1e-2)


def lora_on_gptq(path, dtype: str, implementation: str = "peft"):
    fw = AccelerationFramework(
        {
            "quantization": {"method": "gptq", "compute_dtype": dtype},
            "adapter": {**LORA, "implementation": implementation},
        },
        banner=False,
    )
    model, peft_config = fw.load_model(str(path))
    torch.manual_seed(0)
    model, _ = fw.augment(model, None, peft_config)
    return model


def lora_on_dequantized(path, dtype: str):
    """Plain peft LoRA on the checkpoint's weights dequantized into ordinary nn.Linear layers."""
    from peft import LoraConfig, get_peft_model

    model = dequantize_gptq_model(load_gptq_model(path, dtype=DTYPES[dtype]), DTYPES[dtype])
    assert not any(isinstance(m, GPTQLinear) for m in model.modules())
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# fp32: the eager GPTQ forward multiplies by the very dequantized matrix of the reference, so
# only summation order could differ (measured: identical losses). bf16: both sides use the same
# bf16 weights; sums are rounded to bf16 in different orders (measured max rel diff 2.6e-3).
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_lora_on_gptq_matches_lora_on_dequantized_base(gptq_checkpoint, stories260k, dtype, tol):
    data = text_batches(stories260k, 8)
    ours_model = lora_on_gptq(gptq_checkpoint, dtype)
    base = ours_model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, GPTQLinear)
    trainable = {n for n, p in ours_model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj" in n for n in trainable)
    assert all("lora_" in n for n in trainable)
    ours = train(ours_model, data)
    ref = train(lora_on_dequantized(gptq_checkpoint, dtype), data)
    diffs = [abs(a - b) / abs(b) for a, b in zip(ours, ref)]
    assert max(diffs) < tol, f"max rel diff {max(diffs):.2e}: {ours} vs {ref}"
    # the adapters learn (measured 4.18 -> 4.01 in 8 steps of different text)
    assert ours[-1] < ours[0] - 0.1, f"loss did not fall: {ours[0]:.3f} -> {ours[-1]:.3f}"


def test_custom_lora_on_gptq_matches_peft(gptq_checkpoint, stories260k):
    data = text_batches(stories260k, 6)
    peft_losses = train(lora_on_gptq(gptq_checkpoint, "float32"), data)
    custom_losses = train(lora_on_gptq(gptq_checkpoint, "float32", "custom"), data)
    diffs = [abs(a - b) / abs(b) for a, b in zip(custom_losses, peft_losses)]
    assert max(diffs) < 1e-5, f"max rel diff {max(diffs):.2e}: {custom_losses} vs {peft_losses}"


def test_merge_of_an_adapter_trained_on_gptq(gptq_checkpoint, stories260k, tmp_path):
    import yaml
    from transformers import AutoModelForCausalLM

    from turbotune.train.merge import merge_adapter

    model = lora_on_gptq(gptq_checkpoint, "float32")
    train(model, text_batches(stories260k, 4))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "turbotune.yaml").write_text(
        yaml.safe_dump({"quantization": {"method": "gptq"}})
    )
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not hasattr(merged.config, "quantization_config")
    ids = text_batches(stories260k, 1, offset=90_000)[0]
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, merged(input_ids=ids).logits
    d = (got - expected).abs()
    # merging folds B A into W in fp32: only rounding of the folded sum differs
    assert torch.allclose(got, expected, atol=1e-4), (
        f"max abs diff {d.max():.3g}, mean {d.mean():.3g}"
    )


def test_plain_model_is_refused_with_the_command_to_make_one(stories260k):
    fw = AccelerationFramework({"quantization": {"method": "gptq"}, "adapter": LORA}, banner=False)
    with pytest.raises(ConfigError, match="turbotune quantize gptq"):
        fw.load_model(str(stories260k))


def test_full_finetuning_of_gptq_is_refused():
    with pytest.raises(ConfigError, match="cannot be trained in full"):
        AccelerationFramework(
            {"quantization": {"method": "gptq"}, "adapter": {"method": "full"}}, banner=False
        )
