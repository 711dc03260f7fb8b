"""4-bit QLoRA through bitsandbytes: parity with a plain transformers + bitsandbytes + peft loop."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("bitsandbytes")

from tests.helpers import train_steps

from turbotune.errors import ConfigError
from turbotune.framework import AccelerationFramework

LORA = {"method": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}


def batches(stories260k, n: int, batch: int = 4, seq: int = 48):
    """Real text: the first rows of tiny-shakespeare through the model's own tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories260k)
    text = (stories260k.parents[1] / "tiny-shakespeare" / "tiny_shakespeare.txt").read_text()[
        :40_000
    ]
    ids = torch.tensor(tok(text)["input_ids"][: n * batch * seq]).view(n, batch, seq)
    return list(ids)


train = functools.partial(train_steps, lr=1e-3)


def plain_qlora(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def turbotune_qlora(path, **quant):
    fw = AccelerationFramework(
        {"quantization": {"method": "nf4", **quant}, "adapter": LORA}, banner=False
    )
    model, peft_config = fw.load_model(str(path))
    torch.manual_seed(0)
    model, _ = fw.augment(model, None, peft_config)
    return model


def test_qlora_losses_match_plain_bnb_peft_loop(stories260k):
    data = batches(stories260k, 20)
    ref = train(plain_qlora(stories260k), data)
    ours = train(turbotune_qlora(stories260k), data)
    # Same quantized weights, same adapter init and the same bf16 kernels on both sides: the
    # runs are the same computation, so the only allowed difference is bf16 reordering noise.
    diffs = [abs(a - b) / abs(a) for a, b in zip(ours, ref)]
    assert max(diffs) < 1e-3, (
        f"max rel diff {max(diffs):.2e} at step {diffs.index(max(diffs))}: {ours} vs {ref}"
    )
    assert ours[-1] < ours[0] - 0.3, f"loss did not fall: {ours[0]:.3f} -> {ours[-1]:.3f}"


def test_no_silent_upcast_and_explicit_upcast(stories260k):
    model = turbotune_qlora(stories260k)
    base = model.get_base_model()
    assert base.model.norm.weight.dtype == torch.bfloat16
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # adapters fp32 by default
    up = turbotune_qlora(stories260k, upcast_fp32=True).get_base_model()
    assert up.model.norm.weight.dtype == torch.float32


def test_adapter_in_compute_dtype(stories260k):
    fw = AccelerationFramework(
        {"quantization": {"method": "nf4"}, "adapter": {**LORA, "weights_dtype": "compute"}},
        banner=False,
    )
    model, peft_config = fw.load_model(str(stories260k))
    model, _ = fw.augment(model, None, peft_config)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)


def test_fp4_and_skip_modules(stories260k):
    import bitsandbytes as bnb

    model = turbotune_qlora(stories260k, method="fp4", skip_modules=["down_proj"]).get_base_model()
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert layer.self_attn.q_proj.base_layer.weight.quant_state.quant_type == "fp4"
    assert not isinstance(layer.mlp.down_proj.base_layer, bnb.nn.Linear4bit)  # skipped
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)


def test_saved_adapter_loads_on_4bit_and_dense_base(stories260k, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = turbotune_qlora(stories260k)
    train(model, batches(stories260k, 3))
    model.save_pretrained(tmp_path / "adapter")
    ids = batches(stories260k, 1)[0]
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
        quant_base = AccelerationFramework(
            {"quantization": {"method": "nf4"}, "adapter": LORA}, banner=False
        ).load_model(str(stories260k))[0]
        reloaded = PeftModel.from_pretrained(quant_base, tmp_path / "adapter")
        assert torch.equal(reloaded(input_ids=ids).logits.float(), ours)
        dense = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32)
        on_dense = PeftModel.from_pretrained(dense, tmp_path / "adapter")(input_ids=ids).logits
    # On the unquantized base the adapter still applies; logits differ only by the 4-bit error.
    assert torch.corrcoef(torch.stack([on_dense.flatten(), ours.flatten()]))[0, 1] > 0.95


def test_full_finetuning_of_4bit_is_refused():
    with pytest.raises(ConfigError, match="cannot be trained in full"):
        AccelerationFramework(
            {"quantization": {"method": "nf4"}, "adapter": {"method": "full"}}, banner=False
        )
