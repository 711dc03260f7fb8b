"""The replacement forwards the patch engine binds, built from :mod:`turbotune.ops`.

Each replacement reads the module's own parameters (and, for peft LoRA layers, the active
adapter) and calls one fused op. Whenever a module is in a state the fused op does not cover —
several active adapters, merged or disabled adapters, DoRA, a LoRA variant, generation without
labels — it falls back to the original forward, so a patched model always computes what the
unpatched one would.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from turbotune.ops.lora import LoRAWeights, Projection, lora_mlp, lora_projections
from turbotune.patches.families import Family
from turbotune.patches.packing import positions_are_default

# --- peft LoRA layers ---------------------------------------------------------------------


def is_lora_linear(module: torch.nn.Module) -> bool:
    """A peft LoRA ``Linear`` (on a dense or bitsandbytes 4-bit base)."""
    return (
        hasattr(module, "lora_A")
        and hasattr(module, "base_layer")
        and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)
    )


# projection_of runs for every projection on every forward (and again under activation
# checkpointing), so it reads peft's state straight from the instance dicts: nn.Module's
# __getattr__ and peft's properties cost a microsecond each, and there are a dozen.
_PLAIN_LINEAR: dict[type, bool] = {}


def _plain_linear(module: torch.nn.Module) -> bool:
    # bitsandbytes' Linear4bit subclasses nn.Linear; peft's LoRA wrappers (one of which is also
    # called "Linear4bit") do not. Decided once per class.
    cls = type(module)
    plain = _PLAIN_LINEAR.get(cls)
    if plain is None:
        # A quantized linear of another format (HQQ) that rebuilds its weight with
        # dequantize(dtype) is a frozen base like Linear4bit: quant.weights.dense_weight reads it.
        linear = isinstance(module, torch.nn.Linear) or callable(getattr(cls, "dequantize", None))
        plain = _PLAIN_LINEAR[cls] = linear and not is_lora_linear(module)
    return plain


def _weight(linear: torch.nn.Module) -> torch.Tensor:
    weight = linear._parameters.get("weight")
    return weight if weight is not None else linear.weight


def _active_adapter(module: torch.nn.Module) -> str | None:
    """The single active adapter of a peft LoRA layer that the fused op can run, or None."""
    d = module.__dict__
    merged, disabled = d.get("merged_adapters"), d.get("_disable_adapters")
    if merged is None or disabled is None:  # another peft layout: the public properties
        merged, disabled = module.merged, module.disable_adapters
    if merged or disabled:
        return None
    active = d.get("_active_adapter")
    if active is None:
        active = module.active_adapters
    adapters = module._modules["lora_A"]._modules
    if isinstance(active, str):
        return active if active in adapters else None
    present = [a for a in active if a in adapters]
    return present[0] if len(present) == 1 else None


def projection_of(module: torch.nn.Module) -> Projection | None:
    """The :class:`Projection` a module computes, or ``None`` if the fused op cannot do it."""
    # The fused ops treat the base weight as frozen: a trainable one (full fine-tuning) keeps the
    # original path, which gives it a gradient.
    mods = module._modules
    lora_a = mods.get("lora_A")
    if lora_a is None or "base_layer" not in mods:
        if not _plain_linear(module) or _weight(module).requires_grad:
            return None
        return Projection(module, None, module._parameters.get("bias"))
    base = mods["base_layer"]
    if not _plain_linear(base) or _weight(base).requires_grad:
        return None
    name = _active_adapter(module)
    if name is None:
        return None
    d = module.__dict__
    if d.get("lora_variant", {}).get(name) is not None or d.get("use_dora", {}).get(name, False):
        return None
    dropout = mods["lora_dropout"]._modules[name]
    p = dropout.p if module.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    a = lora_a._modules[name]._parameters["weight"]
    b = mods["lora_B"]._modules[name]._parameters["weight"]
    lora = LoRAWeights(a, b, float(d["scaling"][name]), p)
    return Projection(base, lora, base._parameters.get("bias"))


def lora_linear_forward(
    self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """A peft LoRA ``Linear`` as one fused op (base weight dequantized on the fly)."""
    proj = projection_of(self)
    if proj is None or args or kwargs:
        return self._turbotune_original_forward(x, *args, **kwargs)
    return lora_projections(x, (proj,))[0]


# --- gated MLP ----------------------------------------------------------------------------


def gated_mlp_forward(fam: Family, *, fuse_lora: bool) -> Callable[..., torch.Tensor]:
    """``down(act(gate(x)) * up(x))``: all three projections and the activation in one op when
    ``fuse_lora``; else only the activation is fused (for MLPs with other projection types)."""

    def forward(
        self: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        if fuse_lora:
            mods = self._modules
            projs = [projection_of(mods[n]) for n in ("gate_proj", "up_proj", "down_proj")]
            if all(p is not None for p in projs):
                return lora_mlp(x, *projs, activation=fam.activation, residual=residual)
        from turbotune.ops.swiglu import geglu, swiglu

        gate, up = self.gate_proj(x), self.up_proj(x)
        h = swiglu(gate, up) if fam.activation == "silu" else geglu(gate, up, approximate="tanh")
        out = self.down_proj(h)
        return out if residual is None else residual + out

    # The fused decoder layer (patches/layers.py) hands its residual stream to such an MLP,
    # which adds it inside the down projection's GEMM (ops/lora.lora_mlp).
    forward.takes_residual = True
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
# and replaces the forward of each patched attention *instance* with :func:`attention_forward`,
# which marks the current thread as "inside a patched attention": only then does the dispatcher
# take the fused kernel, so unpatched models in the same process keep the original function.
# Recomputation under gradient checkpointing re-enters the replaced forward, so it is fused too.
_ROPE_STATE = threading.local()


def attention_forward(fam: Family, *, rope: bool, qkv: bool) -> Callable[..., Any]:
    """The attention forward: fused rotary when ``rope``; q, k, v as ONE fused LoRA call when
    ``qkv`` (one stacked dequantization, one input-gradient matmul), the rest as transformers
    computes it. States the fused path does not cover (a projection the fused op cannot run,
    positional arguments, a KV cache at inference) take the original forward."""
    family_module = importlib.import_module(fam.module)
    qkv = qkv and fam.rope_fn is not None

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if rope:
            _ROPE_STATE.depth = getattr(_ROPE_STATE, "depth", 0) + 1
        try:
            projections = _qkv_projections(self, args, kwargs) if qkv else None
            if projections is None:
                return self._turbotune_original_forward(hidden_states, *args, **kwargs)
            return _fused_qkv_attention(
                self, fam, family_module, projections, hidden_states, kwargs
            )
        finally:
            if rope:
                _ROPE_STATE.depth -= 1

    return forward


def _qkv_projections(module: torch.nn.Module, args: tuple, kwargs: dict) -> list | None:
    if args or kwargs.get("position_embeddings") is None:
        return None
    if kwargs.get("past_key_values") is not None and not module.training:
        return None  # generation: caches other than DynamicCache want the original's arguments
    mods = module._modules
    projections = [projection_of(mods[name]) for name in ("q_proj", "k_proj", "v_proj")]
    return None if any(p is None for p in projections) else projections


def _fused_qkv_attention(
    self: torch.nn.Module,
    fam: Family,
    family_module: Any,
    projections: list,
    hidden_states: torch.Tensor,
    kwargs: dict,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' ``<Family>Attention.forward`` (5.x) with q, k, v from :func:`lora_projections`."""
    position_embeddings = kwargs.pop("position_embeddings")
    attention_mask = kwargs.pop("attention_mask", None)
    past_key_values = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = lora_projections(hidden_states, projections)
    query, key = query.view(hidden_shape), key.view(hidden_shape)
    if fam.qk_norm:
        query, key = self.q_norm(query), self.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = value.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    rope_fn = getattr(family_module, fam.rope_fn)
    if not fam.qk_norm and _rotary_with_value(rope_fn, cos):
        # The rotary backward then writes dq, dk and dv into one buffer, which the q/k/v group's
        # backward takes as its [dq | dk | dv] without a cat (ops/rope_qkv.py). qk-norms in
        # between would make fresh dq, dk anyway.
        from turbotune.ops.rope_qkv import apply_rotary_qkv

        query, key, value = apply_rotary_qkv(query, key, value, cos, sin)
    else:
        query, key = rope_fn(query, key, cos, sin)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    if fam.sliding_window is not None:
        owner = self.config if fam.sliding_window == "config" else self
        kwargs["sliding_window"] = getattr(owner, "sliding_window", None)
    attention = _attention_interface(self.config._attn_implementation, family_module)
    attn_output, attn_weights = attention(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
        **kwargs,
    )  # fmt: skip
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _rotary_with_value(rope_fn: Callable[..., Any], cos: torch.Tensor) -> bool:
    """Whether the family's rotary is :func:`rotary_dispatcher` and would take the fused kernel
    for these arguments (inside a patched attention, HF's ``[B, S, D]`` tables)."""
    from turbotune.ops import rope_qkv

    return (
        rope_qkv.ENABLED
        and getattr(rope_fn, "_turbotune_dispatcher", False)
        and getattr(_ROPE_STATE, "depth", 0) > 0
        and cos.dim() == 3
    )


def _attention_interface(implementation: str | None, family_module: Any) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = family_module.eager_attention_forward
    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if get_interface is not None:
        return get_interface(implementation, eager)
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


def rotary_dispatcher(original: Callable[..., Any]) -> Callable[..., Any]:
    """The module-level replacement: fused inside patched attention modules, else ``original``.

    Positions arrive in ``cos``/``sin``, which the model computed from ``position_ids``, so the
    per-sequence positions of padding-free batches are honoured.
    """

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1, *args, **kwargs):
        if (
            getattr(_ROPE_STATE, "depth", 0) == 0
            or unsqueeze_dim != 1
            or args
            or kwargs
            or cos.dim() != 3
        ):
            return original(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)
        from turbotune.ops.rope import apply_rotary

        return apply_rotary(q, k, cos, sin)

    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb._turbotune_dispatcher = True
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
        if fam.experts:  # MoE: record router logits when transformers would (auxiliary loss)
            wanted = kwargs.get("output_router_logits")
            kwargs["output_router_logits"] = (
                getattr(self.config, "output_router_logits", False) if wanted is None else wanted
            )
        # No positions, mask or cache given: the model's positions are a plain arange, so
        # transformers' packed-sequence probe (a host sync per step) is skipped (patches/packing.py).
        default = position_ids is None and attention_mask is None and past_key_values is None
        with positions_are_default(default):
            outputs = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                **kwargs,
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
        if fam.experts and kwargs["output_router_logits"]:
            from turbotune.moe.patch import moe_lm_output

            return moe_lm_output(self, fam.module, outputs, loss, attention_mask)
        return CausalLMOutputWithPast(
            loss=loss, logits=None, past_key_values=outputs.past_key_values
        )

    return forward
