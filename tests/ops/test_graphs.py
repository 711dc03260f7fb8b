"""CUDA graphs of the decoder layers (``ops/graphs.py``) compute what the eager layers compute.

On CPU: the pieces that decide whether a call may be graphed, and that the wrapped layers run
eagerly there. On a GPU: whole training runs with graphs vs without — losses of every step and
the final LoRA weights, with gradient accumulation, a bf16 base and an NF4 base.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.patches.test_fused_parity import data, tiny_model, with_lora

from turbotune.distributed.shard import decoder_blocks
from turbotune.ops.graphs import LayerGraphs, _flatten_kwargs, _rebuild_kwargs, graphable_layers
from turbotune.patches import KINDS, apply_patches


def test_kwargs_round_trip():
    cos, sin, pos = torch.zeros(1, 4, 8), torch.ones(1, 4, 8), torch.arange(4)[None]
    kwargs = dict(
        position_embeddings=(cos, sin), position_ids=pos, attention_mask=None, use_cache=False
    )
    slots, tensors, constants = _flatten_kwargs(kwargs)
    assert sorted(map(id, tensors)) == sorted(map(id, (pos, cos, sin)))
    rebuilt = _rebuild_kwargs(slots, tensors, constants)
    assert rebuilt.keys() == kwargs.keys()
    assert rebuilt["position_embeddings"][0] is cos and rebuilt["position_embeddings"][1] is sin
    assert rebuilt["position_ids"] is pos and rebuilt["use_cache"] is False
    # a KV cache object (or any other Python object) is not graphable
    assert _flatten_kwargs(dict(past_key_values=object())) is None


def test_dropout_disables_graphs():
    model = with_lora(tiny_model("llama"))
    assert graphable_layers(decoder_blocks(model)) is None
    from peft import LoraConfig, get_peft_model

    dropped = get_peft_model(
        tiny_model("llama"), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear")
    )
    assert "dropout" in graphable_layers(decoder_blocks(dropped))


def test_cpu_layers_run_eagerly(single_thread):
    model = with_lora(tiny_model("llama"))
    ref = copy.deepcopy(model)
    graphs = LayerGraphs(decoder_blocks(model))
    ids, labels = data(1)[0]
    model.train(), ref.train()
    loss = model(input_ids=ids, labels=labels).loss
    loss_ref = ref(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    assert graphs.captures == 0 and not graphs.sets
    graphs.remove()
    assert "forward" not in decoder_blocks(model)[0].__dict__


def _train(model, batches, accumulate: int = 1, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(0, len(batches), accumulate):
        total = 0.0
        for ids, labels in batches[step : step + accumulate]:
            loss = model(input_ids=ids, labels=labels).loss / accumulate
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_run(ours, ref, what: str, rtol: float = 1e-5) -> None:
    losses, state = ours
    ref_losses, ref_state = ref
    diffs = [abs(a - b) / max(abs(b), 1e-8) for a, b in zip(losses, ref_losses)]
    assert max(diffs) <= rtol, f"{what}: losses {losses} vs {ref_losses} (max rel {max(diffs):.2e})"
    worst = max((ref_state[n] - state[n]).abs().max().item() for n in ref_state)
    assert worst <= 1e-4, f"{what}: LoRA weights differ by up to {worst:.2e} after training"


def _run(model, batches, graphs: bool, accumulate: int = 1):
    model.config.use_cache = False  # as the fused_ops plugin sets it (a KV cache is not graphable)
    installed = LayerGraphs(decoder_blocks(model)) if graphs else None
    losses = _train(model, batches, accumulate)
    if installed is not None:
        assert installed.disabled is None, installed.disabled
        assert installed.captures == 1
        # The fused add-norm backward writes each layer's input gradient straight into the
        # buffer the previous layer's graph reads (spare_columns.gradient_into): no copies.
        (graph_set,) = installed.sets.values()
        assert graph_set.grad_copies == 0, graph_set.grad_copies
        installed.remove()
    return losses, _lora_state(model)


@pytest.mark.gpu
@pytest.mark.parametrize("accumulate", [1, 2])
def test_graphed_training_matches_eager_bf16(accumulate):
    base = tiny_model(
        "llama", hidden_size=256, intermediate_size=512, num_attention_heads=8, vocab_size=4096,
        num_hidden_layers=3,
    ).cuda()  # fmt: skip
    eager = with_lora(copy.deepcopy(base)).to(torch.bfloat16)
    graphed = with_lora(copy.deepcopy(base)).to(torch.bfloat16)
    apply_patches(eager, KINDS)
    apply_patches(graphed, KINDS)
    batches = data(12, batch=4, seq=128, vocab=4096, device="cuda")
    ref = _run(eager, batches, graphs=False, accumulate=accumulate)
    ours = _run(graphed, batches, graphs=True, accumulate=accumulate)
    _assert_same_run(ours, ref, f"bf16 graphs, accumulate {accumulate}")


@pytest.mark.gpu
def test_graphed_training_matches_eager_nf4_autocast(stories260k):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def load():
        q = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            stories260k, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0}
        )
        model = with_lora(model)
        apply_patches(model, KINDS)
        return model

    vocab = load().config.vocab_size
    batches = data(8, batch=4, seq=64, vocab=vocab, device="cuda")
    runs = []
    for graphs in (False, True):
        model = load()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            runs.append(_run(model, batches, graphs=graphs))
    _assert_same_run(runs[1], runs[0], "nf4 + autocast graphs")


@pytest.mark.gpu
def test_second_forward_before_backward_runs_eagerly():
    base = tiny_model("llama", hidden_size=128, intermediate_size=256, vocab_size=512).cuda()
    pristine = copy.deepcopy(base)
    model = with_lora(base).to(torch.bfloat16)
    apply_patches(model, KINDS)
    model.config.use_cache = False
    graphs = LayerGraphs(decoder_blocks(model))
    model.train()
    (ids, labels), (ids2, labels2) = data(2, batch=2, seq=32, vocab=512, device="cuda")
    for _ in range(2):  # eager, then captured
        model(input_ids=ids, labels=labels).loss.backward()
    assert graphs.captures == 1
    grads_one = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    # two forwards, then one backward of their sum: the second forward must not overwrite the
    # first one's saved activations
    loss = model(input_ids=ids, labels=labels).loss + model(input_ids=ids2, labels=labels2).loss
    loss.backward()
    ref = with_lora(pristine).to(torch.bfloat16)  # the same initial weights (no step was taken)
    apply_patches(ref, KINDS)
    ref.config.use_cache = False
    ref.train()
    ref_loss = ref(input_ids=ids, labels=labels).loss + ref(input_ids=ids2, labels=labels2).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(dict(model.named_parameters())[n].grad, p.grad)
    assert grads_one  # the single-forward step produced gradients


def test_replaced_parameters_refuse_capture(single_thread, monkeypatch):
    """Parameters swapped after install (FSDP2 gathers into new tensors) turn graphs off."""
    model = with_lora(tiny_model("llama"))
    graphs = LayerGraphs(decoder_blocks(model), warmup_calls=0)
    lora = next(m for m in decoder_blocks(model)[0].modules() if hasattr(m, "lora_A"))
    name = next(iter(lora.lora_A))
    lora.lora_A[name].weight = torch.nn.Parameter(lora.lora_A[name].weight.detach().clone())
    hidden = torch.zeros(1, 4, model.config.hidden_size)
    assert graphs._maybe_capture(("key",), hidden, [], [], ()) is None
    assert "replaced" in graphs.disabled


def test_gradient_copies_are_fresh_and_equal(monkeypatch):
    """The copies handed to autograd after a backward replay: equal values, their own memory
    (the next replay overwrites the static buffers), None kept in place, one flat buffer for
    one dtype, clones for mixed dtypes."""
    from turbotune.ops import graphs

    statics = [torch.randn(4, 3), None, torch.randn(3, 5), torch.randn(7)]
    for flat in (True, False):
        monkeypatch.setattr(graphs, "FLAT_GRAD_COPIES", flat)  # restored after the test
        copies = graphs._copies(statics)
        assert copies[1] is None
        for got, want in zip(copies, statics):
            if want is not None:
                assert got.shape == want.shape and torch.equal(got, want)
                assert got.data_ptr() != want.data_ptr()
        if flat:  # views of one buffer, in order
            base = copies[0].untyped_storage().data_ptr()
            assert all(c.untyped_storage().data_ptr() == base for c in copies if c is not None)
        before = [c.clone() for c in copies if c is not None]
        for s in statics:
            if s is not None:
                s.add_(1.0)  # the next replay
        assert all(torch.equal(a, b) for a, b in zip([c for c in copies if c is not None], before))
    mixed = graphs._copies([torch.randn(2), torch.randn(2, dtype=torch.float64)])
    assert mixed[1].dtype == torch.float64 and mixed[0].untyped_storage().data_ptr() != (
        mixed[1].untyped_storage().data_ptr()
    )
