"""Whole tiny MoE models patched with every kernel vs unpatched: loss (with the router's
auxiliary loss), aux loss, router logits and every parameter gradient; then 20 training steps."""

from __future__ import annotations

import importlib

import pytest
import torch
from tests.moe.tiny import FAMILIES, MORE_FAMILIES, tiny_model

from turbotune.patches import FAMILIES as PATCH_FAMILIES
from turbotune.patches import apply_patches
from turbotune.patches.engine import KINDS


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the aux loss must exclude it
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _step(model, batch) -> tuple[torch.Tensor, torch.Tensor, list, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # PhiMoE samples its experts while training: the same draws each step
    out = model(**batch, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    aux = getattr(out, "aux_loss", None)  # families without an aux loss: None, or no field
    logits = getattr(out, "router_logits", None) or ()  # (transformers 5.17 records none there)
    aux = None if aux is None else aux.detach()
    return out.loss.detach(), aux, [r.detach() for r in logits], grads


def _has_aux_loss(model) -> bool:
    """Whether the family balances its experts with an auxiliary loss (DeepSeek-V3-style
    routers use a score-correction bias instead: router logits, no aux loss)."""
    row = PATCH_FAMILIES[model.config.model_type]
    return hasattr(importlib.import_module(row.module), "load_balancing_loss_func")


def _close_aux(got, want, has_aux: bool) -> None:
    if not has_aux:
        assert got is None and want is None, (got, want)
        return
    _close("aux_loss", got, want, 1e-6)
    assert want > 0


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    diff = (got.float() - want.float()).abs()
    assert diff.max() <= atol, f"{name}: max abs diff {diff.max():.3e} mean {diff.mean():.3e}"


@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(MORE_FAMILIES))
def test_patched_model_matches(family: str) -> None:
    torch.set_num_threads(1)
    model = tiny_model(family)
    batch = _batch(model.config.vocab_size)
    loss, aux, logits, grads = _step(model, batch)
    patches = apply_patches(model, KINDS)
    assert patches.counts["moe"] == 2 and patches.counts["cross_entropy"] == 1
    p_loss, p_aux, p_logits, p_grads = _step(model, batch)
    _close("loss", p_loss, loss, 1e-5)
    _close_aux(p_aux, aux, _has_aux_loss(model))
    assert len(p_logits) == len(logits) == (2 if logits or _has_aux_loss(model) else 0)
    for i, (a, b) in enumerate(zip(p_logits, logits, strict=True)):
        _close(f"router_logits[{i}]", a, b, 1e-5)
    assert p_grads.keys() == grads.keys()
    for name, g in grads.items():
        _close(f"grad {name}", p_grads[name], g, 5e-5)


@pytest.mark.parametrize(("family", "backend"), [("mixtral", "grouped_mm"), ("qwen3_moe", "loop")])
def test_training_parity_20_steps(family: str, backend: str, monkeypatch) -> None:
    """AdamW on the same batches: patched and unpatched losses stay together for 20 steps.

    The MoE kind alone, with the eager SwiGLU (no interpreter): 20 interpreted steps take minutes;
    the Triton expert kernels and the fused activation have their own block-level parity tests.
    """
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.set_num_threads(1)
    losses = {}
    for patched in (False, True):
        model = tiny_model(family)
        if patched:
            apply_patches(model, ["moe"], moe_backend=backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[patched] = []
        for step in range(20):
            out = model(**_batch(model.config.vocab_size, seed=step % 2), output_router_logits=True)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[patched].append(out.loss.item())
    ref, got = torch.tensor(losses[False]), torch.tensor(losses[True])
    assert ref[-4:].mean() < ref[:4].mean() - 0.3, f"did not learn: {ref.tolist()}"
    _close("losses", got, ref, 1e-3)


def _with_attention_lora(model):
    """peft LoRA (r=4, non-zero B) on the attention projections of a tiny MoE model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return peft_model


_ATTENTION_ROWS = sorted(
    f
    for f in sorted(FAMILIES) + sorted(MORE_FAMILIES)
    if PATCH_FAMILIES[tiny_model(f).config.model_type].attentions
)


@pytest.mark.parametrize("family", _ATTENTION_ROWS)
def test_attention_lora_patched_matches(family: str, monkeypatch) -> None:
    """Rows that patch attention: with LoRA on q/k/v/o, the patched attention runs q, k, v as
    one fused LoRA op and re-implements the family's attention forward around it (rotary,
    scaling, sliding window): every attention output, the loss, the aux loss and every LoRA
    gradient equal the unpatched model's. Eager ops (the kernels have their own tests): what is
    checked is the attention forward. Measured: outputs within 6e-8, gradients within 6e-9; a
    1% error in q moves the attention outputs by 1e-5 to 3e-5."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.set_num_threads(1)
    model = _with_attention_lora(tiny_model(family))
    row = PATCH_FAMILIES[model.config.model_type]
    attentions = [m for m in model.modules() if type(m).__name__ in row.attentions]
    outputs: list[torch.Tensor] = []
    for m in attentions:
        m.register_forward_hook(lambda mod, args, out: outputs.append(out[0].detach()))
    batch = _batch(model.config.vocab_size)
    loss, aux, _, grads = _step(model, batch)
    want, outputs[:] = list(outputs), []
    patches = apply_patches(model, KINDS)
    assert attentions and patches.counts.get("lora_qkv") == len(attentions), patches.counts
    assert patches.counts["moe"] == model.config.num_hidden_layers
    p_loss, p_aux, _, p_grads = _step(model, batch)
    assert len(outputs) == len(want)
    for i, (got, ref) in enumerate(zip(outputs, want, strict=True)):
        _close(f"attention output {i}", got, ref, 1e-6)
    _close("loss", p_loss, loss, 1e-6)
    _close_aux(p_aux, aux, _has_aux_loss(model))
    assert p_grads.keys() == grads.keys() and any("lora_A" in n for n in grads)
    for name, g in grads.items():
        _close(f"grad {name}", p_grads[name], g, 1e-6)


def test_olmoe_clip_qkv_keeps_its_qk_norms() -> None:
    """OLMoE's ``clip_qkv`` clamps the q/k norm outputs in place, which a fused norm's output (a
    view made inside an autograd Function) does not allow: those norms stay unpatched, the rest
    is patched, and the model trains as the unpatched one."""
    torch.set_num_threads(1)
    model = tiny_model("olmoe")
    model.config.clip_qkv = 0.5  # read by the attention at each forward
    batch = _batch(model.config.vocab_size)
    loss, aux, _, grads = _step(model, batch)
    patches = apply_patches(model, KINDS)
    attention = model.model.layers[0].self_attn
    assert "forward" not in attention.q_norm.__dict__, "q_norm was patched despite clip_qkv"
    assert patches.counts["moe"] == 2 and patches.counts.get("add_norm", 0) == 2
    p_loss, p_aux, _, p_grads = _step(model, batch)
    _close("loss", p_loss, loss, 1e-5)
    _close_aux(p_aux, aux, True)
    for name, g in grads.items():
        _close(f"grad {name}", p_grads[name], g, 5e-5)
