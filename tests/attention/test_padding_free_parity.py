"""A padding-free batch gives the loss AND every gradient of the same sequences padded.

Same tokens, same targets, same mean: the padded batch runs transformers' SDPA with a padding
mask (the reference), the packed row runs ``turbotune_varlen`` attention. Unpatched models, and
models with every fused-ops patch on (Triton kernels through the interpreter on CPU), LoRA
(peft) so that the fused q/k/v, MLP and LoRA paths are the ones exercised.
"""

from __future__ import annotations

import copy

import pytest
import torch

from turbotune.attention import IMPLEMENTATION, use_varlen_attention
from turbotune.data import PaddedCollator
from turbotune.data.padding_free import PaddingFreeCollator

TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip

LENGTHS = (7, 13, 3, 10)


def tiny_llama(dtype=torch.float32, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **dict(TINY, **extra))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def examples(lengths=LENGTHS, vocab=96, seed=3):
    """Rows with a prompt part (label -100) and a response part, like tokenized SFT data."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        prompt = n // 3
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "length": n})
    return rows


def with_lora(model, seed=1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():  # B starts at zero in peft: give the LoRA terms a value
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft_model


def loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(ref, got, atol=2e-5, rtol=1e-4):
    (loss_ref, grads_ref), (loss_got, grads_got) = ref, got
    assert torch.allclose(loss_got, loss_ref, atol=atol, rtol=rtol), (
        f"loss padded {loss_ref.item():.8f} vs padding-free {loss_got.item():.8f}"
    )
    assert grads_ref.keys() == grads_got.keys()
    for name, g_ref in grads_ref.items():
        diff = (grads_got[name] - g_ref).abs()
        assert torch.allclose(grads_got[name], g_ref, atol=atol, rtol=rtol), (
            f"grad {name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}"
        )


def test_collated_batches_hold_the_same_targets():
    rows = examples()
    padded = PaddedCollator(0, pad_to_multiple_of=8)(rows)
    packed = PaddingFreeCollator()(rows)
    n_padded = int((padded["labels"][:, 1:] != -100).sum())
    n_packed = int((packed["labels"][:, 1:] != -100).sum())
    assert n_packed == n_padded


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unpatched_full_model_loss_and_every_gradient(checkpointing):
    torch.set_num_threads(1)
    rows = examples()
    padded_model = tiny_llama()
    packed_model = copy.deepcopy(padded_model)
    assert use_varlen_attention(packed_model) == IMPLEMENTATION
    if checkpointing:
        for m in (padded_model, packed_model):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = loss_and_grads(padded_model, PaddedCollator(0, pad_to_multiple_of=8)(rows))
    got = loss_and_grads(packed_model, PaddingFreeCollator()(rows))
    assert_same(ref, got)


def test_boundaries_from_position_ids_alone():
    """Without the cu_seq_lens kwargs the attention derives the boundaries from position_ids."""
    torch.set_num_threads(1)
    rows = examples()
    padded_model = tiny_llama()
    packed_model = copy.deepcopy(padded_model)
    use_varlen_attention(packed_model)
    ref = loss_and_grads(padded_model, PaddedCollator(0)(rows))
    got = loss_and_grads(packed_model, PaddingFreeCollator(return_varlen_kwargs=False)(rows))
    assert_same(ref, got)


def test_accumulated_micro_batches_equal_one_batch():
    """Gradient accumulation: two packed micro-batches, each loss summed over its targets and
    divided by the targets of both (the Trainer's ``num_items_in_batch``), give the gradient of
    the padded batch holding all the rows."""
    torch.set_num_threads(1)
    rows = examples()
    padded_model = tiny_llama()
    packed_model = copy.deepcopy(padded_model)
    use_varlen_attention(packed_model)
    ref = loss_and_grads(padded_model, PaddedCollator(0)(rows))
    micro = [PaddingFreeCollator()(rows[:2]), PaddingFreeCollator()(rows[2:])]
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    packed_model.train()
    packed_model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for batch in micro:
        loss = packed_model(**batch, num_items_in_batch=torch.tensor(n_items)).loss
        loss.backward()
        total = total + loss.detach()
    grads = {n: p.grad.detach() for n, p in packed_model.named_parameters() if p.requires_grad}
    assert_same(ref, (total, grads))


def test_packed_row_without_varlen_attention_differs():
    """The control: plain causal SDPA over the packed row lets tokens see the previous
    sequences, so the loss changes — the parity above is not an accident."""
    torch.set_num_threads(1)
    rows = examples()
    model = tiny_llama()
    batch = PaddingFreeCollator()(rows)
    batch.pop("position_ids")  # sdpa would detect packing from restarting positions
    leaky = loss_and_grads(model, batch)[0]
    ref = loss_and_grads(model, PaddedCollator(0)(rows))[0]
    assert abs(leaky.item() - ref.item()) > 1e-3


def test_fused_ops_lora_padding_free_equals_unpatched_padded():
    from turbotune.patches import KINDS, apply_patches

    torch.set_num_threads(1)
    rows = examples()
    padded_model = with_lora(tiny_llama(num_hidden_layers=1))  # the interpreter is slow
    packed_model = copy.deepcopy(padded_model)
    use_varlen_attention(packed_model)
    patches = apply_patches(packed_model, KINDS)
    try:
        assert patches.counts.get("rope") and patches.counts.get("lora_qkv"), patches.counts
        ref = loss_and_grads(padded_model, PaddedCollator(0)(rows))
        got = loss_and_grads(packed_model, PaddingFreeCollator()(rows))
    finally:
        patches.undo()
    assert_same(ref, got, atol=5e-5, rtol=5e-4)


def test_padded_batches_still_work_after_switching():
    """Evaluation with padded batches (and generation) takes the SDPA path with its mask."""
    torch.set_num_threads(1)
    rows = examples()
    sdpa_model = tiny_llama()
    varlen_model = copy.deepcopy(sdpa_model)
    use_varlen_attention(varlen_model)
    batch = PaddedCollator(0)(rows)
    ref = loss_and_grads(sdpa_model, batch)
    got = loss_and_grads(varlen_model, batch)
    assert_same(ref, got, atol=1e-6, rtol=1e-6)
    prompt = torch.tensor([[5, 6, 7, 8]])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(varlen_model.generate(prompt, **kw), sdpa_model.generate(prompt, **kw))
