"""Offloaded gradient checkpointing (``distributed/offload.py``): the same losses and LoRA
gradients as plain checkpointing and as no checkpointing, dropout included; host buffers reused
across steps; the prefetch chain; the ``train.activation_offload`` wiring of ``run_training`` and
the bench.

CPU tests run the same code with plain copies; the CUDA path (side streams, pinned pool, peak
memory) is in ``test_activation_offload_gpu.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from turbotune.distributed.activations import checkpoint_layers, decoder_layers
from turbotune.distributed.offload import ActivationOffloader, HostBufferPool, offloaded_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = 3


def _lora_llama(dropout: float, seed: int = 0) -> nn.Module:
    """A 3-layer Llama with peft LoRA on every projection (attention dropout too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=dropout, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():  # B = 0 at init would hide gradients of A
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return model.train()


def _variant(model: nn.Module, how: str, offloader: ActivationOffloader | None = None):
    if how == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif how == "offload":
        assert checkpoint_layers(model, offload=True, offloader=offloader) == LAYERS
    return model


def _run(model: nn.Module, steps: int = 3, seed: int = 11):
    """Losses and every LoRA gradient of a few AdamW steps (same dropout draws per step)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    losses, grads = [], []
    for step in range(steps):
        ids = torch.randint(0, 128, (2, 24), generator=g)
        torch.manual_seed(seed + step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


def _assert_same(got, want, what: str, atol: float) -> None:
    g_losses, g_grads = got
    w_losses, w_grads = want
    assert g_losses == pytest.approx(w_losses, abs=atol, rel=0), f"{what}: {g_losses} vs {w_losses}"
    for step, (g, w) in enumerate(zip(g_grads, w_grads, strict=True)):
        assert g.keys() == w.keys() and len(g) == 2 * 7 * LAYERS
        for name in w:
            d = (g[name] - w[name]).abs()
            assert d.max() <= atol * (1 + w[name].abs().max()), (
                f"{what} step {step} {name}: max abs diff {d.max():.3g}, mean {d.mean():.3g}"
            )


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offloaded_checkpointing_trains_like_plain_and_none(dropout):
    ref = _lora_llama(dropout)
    runs = {how: _run(_variant(copy.deepcopy(ref), how)) for how in ("none", "hf", "offload")}
    # Dropout masks repeat in the recomputation, or the losses of step 2 on would differ.
    assert len(set(runs["none"][0])) == 3
    _assert_same(runs["hf"], runs["none"], "hf checkpointing vs none", atol=1e-6)
    _assert_same(runs["offload"], runs["none"], "offloaded vs none", atol=1e-6)
    _assert_same(runs["offload"], runs["hf"], "offloaded vs hf checkpointing", atol=1e-6)


def test_offloading_only_the_first_layers_trains_the_same():
    """``offload_layers=1``: layer 0 keeps its input on the host, the rest are plainly
    checkpointed on the device; the run equals the unwrapped one."""
    ref = _lora_llama(0.0)
    model = copy.deepcopy(ref)
    assert checkpoint_layers(model, offload=True, offload_layers=1) == LAYERS
    kinds = [layer.__dict__["_turbotune_block_wrapped"] for layer in decoder_layers(model)]
    assert kinds == [(True, True)] + [(True, False)] * (LAYERS - 1)
    _assert_same(_run(model), _run(copy.deepcopy(ref)), "partly offloaded vs none", atol=1e-6)


def test_offload_layers_needs_offload_and_a_count():
    from turbotune.config import load_config
    from turbotune.errors import ConfigError

    on = {"gradient_checkpointing": True, "activation_offload": True}
    assert (
        load_config(
            {"train": {**on, "activation_offload_layers": 3}}
        ).train.activation_offload_layers
        == 3
    )
    for bad in ({**on, "activation_offload_layers": -1}, {"activation_offload_layers": 2}):
        with pytest.raises(ConfigError, match="activation_offload_layers"):
            load_config({"train": bad})


def test_dropout_changes_the_gradients():
    """The dropout case above is not vacuous: another seed gives other gradients."""
    ref = _lora_llama(0.2)
    # Wrapped after the copy: a copied instance forward would still call the original layers.
    _, a = _run(_variant(copy.deepcopy(ref), "offload"), steps=1, seed=1)
    _, b = _run(_variant(copy.deepcopy(ref), "offload"), steps=1, seed=2)
    name = next(n for n in a[0] if "lora_A" in n)
    assert (a[0][name] - b[0][name]).abs().max() > 1e-4


def test_pool_reuses_buffers_and_prefetches_every_layer_but_the_last():
    offloader = ActivationOffloader()
    model = _variant(_lora_llama(0.0), "offload", offloader)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        pool = offloader.pool
        assert pool.allocations == LAYERS, f"step {step}: {pool.allocations} buffers allocated"
        assert pool.idle == LAYERS, f"step {step}: {pool.idle} of {LAYERS} buffers returned"
        assert pool.allocated_bytes == LAYERS * 2 * 24 * 64 * 4
        # Per step: the last layer's input is still on the device, the others are prefetched.
        assert offloader.prefetches == (LAYERS - 1) * (step + 1)
        assert offloader.waited_copies == 0


def test_a_graph_dropped_without_backward_returns_its_buffers():
    offloader = ActivationOffloader()
    model = _variant(_lora_llama(0.0), "offload", offloader)
    ids = torch.randint(0, 128, (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    assert offloader.pool.idle == 0
    del loss
    assert offloader.pool.idle == LAYERS and offloader.pool.allocations == LAYERS


def test_pool_best_fit_and_stale_buffers():
    pool = HostBufferPool()
    small = pool.acquire(100, pinned=False)
    big = pool.acquire(400, pinned=False)
    pool.release(small)
    pool.release(big)
    assert pool.acquire(50, pinned=False) is small  # the smallest that fits
    pool.release(small)
    assert pool.acquire(300, pinned=False) is big
    pool.release(big)
    grown = pool.acquire(1000, pinned=False)  # nothing fits: the smaller idle ones are dropped
    assert grown.capacity == 1000 and pool.idle == 0
    assert pool.allocations == 3 and pool.allocated_bytes == 1000


class _Block(nn.Module):
    """A block with dropout that returns a tuple, as older transformers layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, scale: float = 1.0):
        return (self.drop(torch.tanh(self.lin(x))) * scale, None)  # bf16 under autocast


def test_function_input_gradient_tuple_output_and_autocast():
    block = _Block().train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad = torch.randn(3, 5, 16)
    results = []
    for offload in (False, True):
        block.zero_grad()
        x.grad = None
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if offload:
                out = offloaded_checkpoint(lambda h: block(h, scale=2.0), x, ActivationOffloader())
            else:
                out = block(x, scale=2.0)
        assert out[1] is None and out[0].dtype == torch.bfloat16
        torch.manual_seed(123)  # the recomputation must not take its masks from here
        out[0].backward(grad)
        results.append((out[0].detach(), x.grad.clone(), block.lin.weight.grad.clone()))
    for name, a, b in zip(("output", "input grad", "weight grad"), *results, strict=True):
        d = (a.float() - b.float()).abs()
        assert d.max() == 0, f"{name}: max abs diff {d.max():.3g}, mean {d.mean():.3g}"


def test_second_backward_is_refused():
    block = _Block()
    x = torch.randn(2, 16, requires_grad=True)
    out = offloaded_checkpoint(block, x, ActivationOffloader())[0]
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated twice"):
        out.sum().backward()


def test_checkpoint_layers_refuses_transformers_checkpointing_and_finds_the_layers():
    model = _lora_llama(0.0)
    assert len(decoder_layers(model)) == LAYERS
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="transformers' gradient checkpointing is on"):
        checkpoint_layers(model, offload=True)
    with pytest.raises(ValueError, match="no transformers GradientCheckpointingLayer"):
        checkpoint_layers(nn.Sequential(nn.Linear(2, 2)), offload=True)


# --- wiring: config, run_training, the bench ----------------------------------------------------


def test_offload_without_checkpointing_is_a_config_error():
    from turbotune.config import load_config
    from turbotune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing"):
        load_config({"train": {"activation_offload": True}})


def test_run_training_offloads_instead_of_transformers_checkpointing(
    stories260k, alpaca_tiny, tmp_path
):
    from turbotune.train.run import run_training

    from .conftest import step_losses, stories_config

    runs = {}
    for name, over in {
        "off": [],
        "offload": ["train.gradient_checkpointing=true", "train.activation_offload=true"],
    }.items():
        cfg = stories_config(stories260k, alpaca_tiny, tmp_path / name, max_steps=3)
        result = run_training(cfg, over)
        modules = list(result.trainer.model.modules())
        assert not any(getattr(m, "gradient_checkpointing", False) for m in modules), name
        wrapped = sum("_turbotune_block_wrapped" in m.__dict__ for m in modules)
        assert wrapped == (0 if name == "off" else 5), f"{name}: {wrapped} layers wrapped"
        runs[name] = step_losses(result.trainer.state.log_history)
    got, want = runs["offload"], runs["off"]
    diff = max(abs(got[s] - want[s]) for s in want)
    assert got.keys() == want.keys() and diff < 1e-5, f"{got} vs {want} (max diff {diff:.2e})"


def test_bench_setup_offloads_and_the_scenario_exists(tmp_path):
    from turbotune.bench.models import resolve_model_config
    from turbotune.bench.scenarios import expand, load_scenarios
    from turbotune.bench.setups import (
        DEFAULT_LORA,
        PointSettings,
        prepare_turbotune,
        turbotune_config_dict,
    )

    from .conftest import REPO

    points = expand(
        load_scenarios(REPO / "benchmarks" / "reference-workload.yaml"),
        ["turbotune-qlora-fused-offload"],
    )
    mine = [p for p in points if p.scenario == "turbotune-qlora-fused-offload"]
    assert [(p.batch_size, p.seq_len, p.gradient_checkpointing) for p in mine] == [(8, 1024, True)]
    assert mine[0].config["train"] == {"activation_offload": True}

    s = PointSettings(
        gradient_checkpointing=True, precision="fp32", learning_rate=2e-4, lora=DEFAULT_LORA,
        attn_implementation="sdpa", seed=5, batch_size=2, output_dir=str(tmp_path),
    )  # fmt: skip
    config = resolve_model_config("llama-tiny")
    raw = turbotune_config_dict({"train": {"activation_offload": True}}, s)
    model = prepare_turbotune(raw, config, s, torch.device("cpu")).model
    modules = list(model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in modules)
    assert sum("_turbotune_block_wrapped" in m.__dict__ for m in modules) == (
        config.num_hidden_layers
    )


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bench_fused_nf4_offload_trains_like_transformers_checkpointing(
    tmp_path, eager_ops, dropout
):
    """The reference scenario's stack (NF4, fused ops, LoRA) on a tiny Llama: the offloaded
    checkpoint gives the losses of transformers' checkpointing, dropout masks included (the
    fused LoRA ops draw their dropout seed from the CPU RNG, which the recomputation replays)."""
    from turbotune.bench.data import random_batches
    from turbotune.bench.loop import MemoryMeter, timed_loop
    from turbotune.bench.models import resolve_model_config
    from turbotune.bench.setups import (
        DEFAULT_LORA,
        PointSettings,
        prepare_turbotune,
        turbotune_config_dict,
    )

    cpu = torch.device("cpu")
    config = resolve_model_config("llama-tiny")
    s = PointSettings(
        gradient_checkpointing=True, precision="bf16", learning_rate=1e-2,
        lora={**DEFAULT_LORA, "dropout": dropout}, attn_implementation="sdpa", seed=5,
        batch_size=2, output_dir=str(tmp_path),
    )  # fmt: skip
    base = {"quantization": {"method": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
            "plugins": {"fused_ops": {}}}  # fmt: skip
    losses = {}
    for name, train in {"hf": {}, "offload": {"activation_offload": True}}.items():
        raw = turbotune_config_dict({**base, "train": train}, s)
        prepared = prepare_turbotune(raw, config, s, cpu)
        wrapped = sum("_turbotune_block_wrapped" in m.__dict__ for m in prepared.model.modules())
        assert wrapped == (2 if name == "offload" else 0)
        batches = random_batches(config.vocab_size, 2, 16, 4, seed=1, device=cpu)
        torch.manual_seed(7)
        res = timed_loop(prepared.model, batches, warmup=1, steps=3, learning_rate=1e-2,
                         autocast=prepared.autocast, device=cpu, meter=MemoryMeter(cpu))  # fmt: skip
        losses[name] = res.losses
    assert len(set(losses["hf"])) == 4, losses
    assert losses["offload"] == pytest.approx(losses["hf"], abs=1e-6, rel=0), losses
