"""LoRA with MoE: peft LoRA on attention and, through ``target_parameters``, on the stacked
experts (one rank-r pair per expert). Patched (LoRA as grouped rank-r products) vs unpatched
(peft's merged stacks in transformers' experts): loss and every LoRA gradient."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tests.moe.tiny import tiny_model

from turbotune.moe import patch as patch_module
from turbotune.moe.experts import moe_experts
from turbotune.patches import apply_patches


def _lora_model(family: str):
    model = tiny_model(family)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # B != 0: real gradients
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )  # fmt: skip
    return get_peft_model(model, config)


def _grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, output_router_logits=True)
    out.loss.backward()
    return out.loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize(
    ("family", "backend"),
    [("mixtral", "grouped_mm"), ("qwen3_moe", "loop"), ("mixtral", "mm_loop")],
)
def test_lora_on_experts_matches(family: str, backend: str, monkeypatch) -> None:
    # Eager SwiGLU for speed; the Triton kernels' LoRA products: test_kernels.py.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    batch = {"input_ids": ids, "labels": ids}
    model = _lora_model(family)
    loss, grads = _grads(model, batch)
    assert any("experts" in n and "lora_A" in n for n in grads), sorted(grads)
    patches = apply_patches(model, ["moe"], moe_backend=backend)
    assert patches.counts["moe"] == 2
    calls = []

    def recording(*args, **kwargs):
        calls.append((kwargs["gate_up_lora"] is not None, kwargs["down_lora"] is not None))
        return moe_experts(*args, **kwargs)

    monkeypatch.setattr(patch_module, "moe_experts", recording)
    p_loss, p_grads = _grads(model, batch)
    # peft's factor proxy was read: the LoRA ran as grouped rank-r products, no merged stack.
    assert calls == [(True, True)] * 2, calls
    assert abs(p_loss - loss) <= 1e-5, f"loss {p_loss} vs {loss}"
    for name, g in grads.items():
        d = (p_grads[name] - g).abs()
        assert d.max() <= 5e-5, f"{name}: max abs diff {d.max():.3e} mean {d.mean():.3e}"
        assert g.abs().max() > 0, f"{name} got no gradient"


def test_rerouted_expert_lora_skips_peft_parametrization(monkeypatch) -> None:
    """``reroute_expert_lora``: the patched experts read peft's factors directly (no
    parametrization registered per forward) with the same loss and gradients; once the patch is
    undone the wrappers run peft's own forward again (the adapter still applies)."""
    import torch.nn.utils.parametrize as parametrize

    from turbotune.moe.peft_experts import reroute_expert_lora

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.set_num_threads(1)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    model = _lora_model("qwen3_moe")
    unpatched_loss, _ = _grads(model, batch)
    patches = apply_patches(model, ["moe"], moe_backend="loop")
    loss, grads = _grads(model, batch)
    assert reroute_expert_lora(model) == 2
    registered = []
    real = parametrize.register_parametrization
    monkeypatch.setattr(parametrize, "register_parametrization",
                        lambda *a, **k: registered.append(a[1]) or real(*a, **k))  # fmt: skip
    r_loss, r_grads = _grads(model, batch)
    assert registered == [], registered
    assert abs(r_loss - loss) <= 1e-6, f"loss {r_loss} vs {loss}"
    for name, g in grads.items():
        d = (r_grads[name] - g).abs()
        assert d.max() <= 1e-6, f"{name}: max abs diff {d.max():.3e} mean {d.mean():.3e}"
    patches.undo()
    undone_loss, _ = _grads(model, batch)
    assert registered, "peft's own forward did not run after the patch was undone"
    assert abs(undone_loss - unpatched_loss) <= 1e-6, f"{undone_loss} vs {unpatched_loss}"
