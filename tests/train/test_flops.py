"""FLOP counts checked against PyTorch's own FlopCounterMode on real tiny models (dense, MoE,
LoRA, checkpointing), the reference 8B workload against the GPU notes, and the peak table."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from turbotune.train.flops import (
    attention_flops_per_token,
    count_lora_params,
    forward_flops_per_token,
    linear_params,
    peak_flops,
    train_flops_per_token,
)

BATCH, SEQ = 2, 12
# head_dim 8 != hidden / heads (6) and 2 KV heads: the count must read head_dim and GQA.
TINY = dict(
    vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, intermediate_size=40, attn_implementation="eager",
)  # fmt: skip
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mixtral": (
        MixtralConfig,
        MixtralForCausalLM,
        dict(num_local_experts=4, num_experts_per_tok=2),
    ),
    # layer 1 dense (mlp_only_layers), a gated shared expert on the others
    "qwen2_moe": (
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=20,
            mlp_only_layers=[1],
        ),
    ),
    # only every second layer routed (decoder_sparse_step=2)
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2),
    ),
}


def _counted_flops(model: torch.nn.Module, vocab: int, backward: bool = True) -> float:
    """FLOPs per token of one step, counted by PyTorch op by op."""
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, SEQ))
    with FlopCounterMode(display=False) as counter:
        loss = model(input_ids=ids, labels=ids).loss
        if backward:
            loss.backward()
    return counter.get_total_flops() / (BATCH * SEQ)


def _tiny(name: str):
    config_cls, model_cls, extra = MODELS[name]
    config = config_cls(**TINY, **extra)
    if "num_experts_per_tok" in extra:
        # The per-expert loop runs plain matmuls that FlopCounterMode sees (grouped_mm it does not).
        config._experts_implementation = "eager"
    torch.manual_seed(0)
    return config, model_cls(config)


def _check(got: float, want: float, what: str) -> None:
    assert got == pytest.approx(want, rel=1e-9), f"{what}: {got} vs {want} (diff {got - want:+})"


@pytest.mark.parametrize("name", list(MODELS))
def test_full_training_matches_flop_counter(name: str) -> None:
    # The eager attention multiplies the full (masked) score matrix: compare non-causal counts.
    config, model = _tiny(name)
    fwd = _counted_flops(model, config.vocab_size, backward=False)
    _check(fwd, forward_flops_per_token(config, SEQ, causal=False), f"{name} forward")
    step = _counted_flops(model, config.vocab_size)
    _check(step, train_flops_per_token(config, SEQ, causal=False), f"{name} forward+backward")


def test_lora_matches_flop_counter() -> None:
    from peft import LoraConfig, get_peft_model

    config, model = _tiny("llama")
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    lora = count_lora_params(model)
    assert lora == 3 * 4 * (2 * (24 + 32) + 2 * (24 + 16) + 3 * (24 + 40))
    got = _counted_flops(model, config.vocab_size)
    # Autograd skips the input gradient of layer 0's q, k, v (their input, the frozen embedding,
    # needs none): their base weights and LoRA A matrices, which the formula counts.
    skipped = 2 * (24 * 32 + 2 * 24 * 16) + 2 * 3 * (4 * 24)
    want = train_flops_per_token(config, SEQ, trainable="lora", lora_params=lora, causal=False)
    _check(got, want - skipped, "LoRA forward+backward")


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointing_matches_flop_counter(lora: bool) -> None:
    from peft import LoraConfig, get_peft_model

    config, model = _tiny("llama")
    # Reentrant checkpointing recomputes each layer's whole forward. (The non-reentrant kind
    # stops as soon as the saved tensors are back, skipping each layer's last product.)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    n_lora = count_lora_params(model)
    got = _counted_flops(model, config.vocab_size)
    trainable = "lora" if lora else "full"
    want = train_flops_per_token(
        config, SEQ, trainable=trainable, lora_params=n_lora, checkpointing=True, causal=False
    )
    # Reentrant checkpointing makes the embedding output require grad, so no input gradient
    # is skipped here.
    _check(got, want, f"{trainable} with checkpointing")
    plain = train_flops_per_token(
        config, SEQ, trainable=trainable, lora_params=n_lora, causal=False
    )
    assert want > plain


def test_reference_workload_is_about_31_gflop_per_token() -> None:
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    in_linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n = linear_params(config)
    assert n == in_linears, f"N {n} vs {in_linears} parameters in the model's Linear layers"
    assert abs(n - 7.5e9) / 7.5e9 < 0.01, "the GPU notes say 7.5e9 linear parameters"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    lora = count_lora_params(model)
    assert lora == 41_943_040
    flops = train_flops_per_token(config, 1024, trainable="lora", lora_params=lora)
    assert 30.5e9 < flops < 31.5e9, f"{flops / 1e9:.2f} GFLOP/token, the GPU notes say about 31"
    # causal: 32 layers * 2 * 1024 keys * 4096 = 0.27 GFLOP forward
    assert attention_flops_per_token(config, 1024) == 32 * 2 * 1024 * 4096
    assert attention_flops_per_token(config, 1024, causal=False) == 2 * 32 * 2 * 1024 * 4096
    tokens_per_s_at_floor = 790e12 / flops
    assert 24_000 < tokens_per_s_at_floor < 26_000  # "about 25,000 tokens/s at 790 TFLOP/s"


def test_count_lora_params_ignores_frozen_and_vectors() -> None:
    model = torch.nn.Module()
    model.lora_A = torch.nn.Parameter(torch.zeros(4, 10))
    model.lora_magnitude_vector = torch.nn.Parameter(torch.zeros(10))  # DoRA: elementwise
    model.base = torch.nn.Parameter(torch.zeros(10, 10), requires_grad=False)
    model.lora_frozen = torch.nn.Parameter(torch.zeros(4, 10), requires_grad=False)
    assert count_lora_params(model) == 40


def test_bad_trainable_raises() -> None:
    config, _ = _tiny("llama")
    with pytest.raises(ValueError, match="trainable"):
        train_flops_per_token(config, SEQ, trainable="qlora")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "spec", "measured"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12, 790e12),
        ("NVIDIA H200", 989e12, 790e12),
        ("NVIDIA H100 PCIe", 756e12, 756e12),  # never measured: the data sheet
        ("NVIDIA A100-SXM4-80GB", 312e12, 312e12),
        ("NVIDIA L40S", 362e12, 362e12),
        ("NVIDIA L4", 121e12, 121e12),
        ("NVIDIA A10G", 70e12, 70e12),
    ],
)
def test_peak_flops_table(name: str, spec: float, measured: float) -> None:
    assert peak_flops(name) == spec
    assert peak_flops(name, measured=True) == measured


def test_peak_flops_unknown_is_none() -> None:
    assert peak_flops("cpu") is None
    assert peak_flops(torch.device("cpu"), measured=True) is None
    assert peak_flops("Some Future Accelerator") is None
    if not torch.cuda.is_available():
        assert peak_flops() is None
        assert peak_flops("cuda:0") is None


@pytest.mark.gpu
def test_peak_flops_of_this_gpu() -> None:
    name = torch.cuda.get_device_name(0)
    assert peak_flops(0) == peak_flops(name)
    if "H100" in name or "H200" in name:
        assert peak_flops("cuda", measured=True) == 790e12
