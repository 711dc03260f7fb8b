"""The replacement forwards the patch engine binds, built from :mod:`turbotune.ops`.

Each replacement reads the module's own parameters (and, for peft LoRA layers, the active
adapter) and calls one fused op. Whenever a module is in a state the fused op does not cover —
several active adapters, merged or disabled adapters, DoRA, a LoRA variant, generation without
labels — it falls back to the original forward, so a patched model always computes what the
unpatched one would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from turbotune.ops.lora import LoRAWeights, Projection
from turbotune.patches.families import Family

# --- peft LoRA layers ---------------------------------------------------------------------


def is_lora_linear(module: torch.nn.Module) -> bool:
    """A peft LoRA ``Linear`` (on a dense or bitsandbytes 4-bit base)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and isinstance(
        getattr(module, "lora_A", None), torch.nn.ModuleDict
    )


def _plain_linear(module: torch.nn.Module) -> bool:
    # bitsandbytes' Linear4bit subclasses nn.Linear; peft's LoRA wrappers (one of which is also
    # called "Linear4bit") do not.
    return isinstance(module, torch.nn.Linear) and not is_lora_linear(module)


def projection_of(module: torch.nn.Module) -> Projection | None:
    """The :class:`Projection` a module computes, or ``None`` if the fused op cannot do it."""
    # The fused ops treat the base weight as frozen: a trainable one (full fine-tuning) keeps the
    # original path, which gives it a gradient.
    if not is_lora_linear(module):
        if not _plain_linear(module) or module.weight.requires_grad:
            return None
        return Projection(module, None, module.bias)
    base = module.base_layer
    if not _plain_linear(base) or base.weight.requires_grad or module.merged or module.disable_adapters:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if getattr(module, "lora_variant", {}).get(name) is not None or module.use_dora.get(name, False):
        return None
    dropout = module.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and module.training else 0.0
    lora = LoRAWeights(module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]), p)
    return Projection(base, lora, base.bias)


def lora_linear_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA ``Linear`` as one fused op (base weight dequantized on the fly)."""
    from turbotune.ops.lora import lora_linear

    proj = projection_of(self)
    if proj is None or args or kwargs:
        return self._turbotune_original_forward(x, *args, **kwargs)
    return lora_linear(x, proj.base, proj.lora, proj.bias)


# --- gated MLP ----------------------------------------------------------------------------


def gated_mlp_forward(fam: Family, *, fuse_lora: bool) -> Callable[..., torch.Tensor]:
    """``down(act(gate(x)) * up(x))``: all three projections and the activation in one op when
    ``fuse_lora``; else only the activation is fused (for MLPs with other projection types)."""

    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if fuse_lora:
            from turbotune.ops.lora import lora_mlp

            projs = [projection_of(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
            if all(p is not None for p in projs):
                return lora_mlp(x, *projs, activation=fam.activation)
        from turbotune.ops.swiglu import geglu, swiglu

        gate, up = self.gate_proj(x), self.up_proj(x)
        h = swiglu(gate, up) if fam.activation == "silu" else geglu(gate, up, approximate="tanh")
        return self.down_proj(h)

    return forward


# --- RMSNorm and rotary -------------------------------------------------------------------


def rms_norm_forward(fam: Family) -> Callable[..., torch.Tensor]:
    def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        from turbotune.ops.rms_norm import rms_norm

        eps = getattr(self, fam.norm_eps_attr)
        return rms_norm(hidden_states, self.weight, eps, offset=fam.norm_offset)

    return forward


# The families' attention calls a *module-level* ``apply_rotary_pos_emb``, which cannot be
# patched per model. The engine installs :func:`rotary_dispatcher` there once (reference-counted)
# and wraps the forward of each patched attention *instance* with :func:`attention_forward`,
# which marks the current thread as "inside a patched attention": only then does the dispatcher
# take the fused kernel, so unpatched models in the same process keep the original function.
# Recomputation under gradient checkpointing re-enters the wrapped forward, so it is fused too.
_ROPE_STATE = threading.local()


def attention_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    _ROPE_STATE.depth = getattr(_ROPE_STATE, "depth", 0) + 1
    try:
        return self._turbotune_original_forward(*args, **kwargs)
    finally:
        _ROPE_STATE.depth -= 1


def rotary_dispatcher(original: Callable[..., Any]) -> Callable[..., Any]:
    """The module-level replacement: fused inside patched attention modules, else ``original``.

    Positions arrive in ``cos``/``sin``, which the model computed from ``position_ids``, so the
    per-sequence positions of padding-free batches are honoured.
    """

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1, *args, **kwargs):
        if getattr(_ROPE_STATE, "depth", 0) == 0 or unsqueeze_dim != 1 or args or kwargs or cos.dim() != 3:
            return original(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)
        from turbotune.ops.rope import apply_rotary

        return apply_rotary(q, k, cos, sin)

    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


# --- causal LM head + loss ----------------------------------------------------------------


def causal_lm_forward(fam: Family) -> Callable[..., Any]:
    """The ``*ForCausalLM`` forward with the LM head fused into the cross-entropy when training
    with labels: the ``[tokens, vocab]`` logits never exist (``logits`` is ``None`` then)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):  # fmt: skip
        head = self.lm_head
        if labels is None or not torch.is_grad_enabled() or not isinstance(head, torch.nn.Linear):
            return self._turbotune_original_forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs,
            )  # fmt: skip
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from turbotune.ops.cross_entropy import linear_cross_entropy

        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )  # fmt: skip
        hidden = outputs.last_hidden_state
        if shift_labels is None:  # what HF's ForCausalLMLoss does: predict token t+1 at t
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        config = self.config
        scale = 1.0 / getattr(config, fam.logits_divisor_attr) if fam.logits_divisor_attr else 1.0
        softcap = getattr(config, fam.softcap_attr, None) if fam.softcap_attr else None
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            shift_labels.reshape(-1).to(hidden.device),
            bias=head.bias,
            num_items_in_batch=num_items,
            logit_scale=scale,
            softcap=softcap,
        )
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values)

    return forward
