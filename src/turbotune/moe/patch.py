"""What the patch engine binds on MoE models: the experts forward and the MoE loss output.

Design note. Only the *experts* module of a family's sparse block is replaced; its router stays
transformers' own module, so the router logits that ``output_router_logits`` records, the routing
weights (and their gradient) and the auxiliary load-balancing loss are computed exactly as before.
The replacement takes the call transformers makes, ``experts(hidden, top_k_index,
top_k_weights)``, and runs :func:`turbotune.moe.experts.moe_experts` on the module's stacked
``gate_up_proj``/``down_proj`` — the parameters themselves, or what peft's ``target_parameters``
LoRA makes of them while it is active (the merged ``W + s * B A`` per expert), or a quantized
stack put there by :func:`turbotune.moe.quant.quantize_experts`. With peft's factor proxy (one
adapter) the LoRA runs as grouped rank-r products beside the frozen base (:func:`stack_of`).
Layouts the kernels do not cover
(biases, transposed or interleaved stacks, no gate, expert parallelism of transformers) keep the
original forward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from turbotune.moe.experts import BackendChoice, ExpertLoRA, moe_experts


def supports(module: torch.nn.Module) -> bool:
    """Whether the experts module has the layout the grouped kernels compute."""
    d = module.__dict__
    return (
        d.get("has_gate", True)
        and not d.get("has_bias", False)
        and not d.get("is_transposed", False)
        and d.get("is_concatenated", True)
        and not d.get("has_post_expert_norm", False)
        and not d.get("_is_expert_parallel", False)
        and "_turbotune_ep" not in d  # sharded by expert_parallel: its forward is underneath
        and _has_stack(module, "gate_up_proj")
        and _has_stack(module, "down_proj")
    )


def _has_stack(module: torch.nn.Module, name: str) -> bool:
    # Not hasattr: on a peft-parametrized stack that would build the merged weight.
    parametrizations = module._modules.get("parametrizations")
    return (
        name in module._parameters
        or name in module._modules
        or (parametrizations is not None and name in parametrizations)
    )


def activation_of(module: torch.nn.Module) -> str | Callable[..., Any]:
    """``"silu"`` for the SiLU activations (fused SwiGLU), else the module's own ``act_fn``."""
    act = module.act_fn
    if isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "silu"
    return act


def experts_forward(backend: BackendChoice = "auto") -> Callable[..., torch.Tensor]:
    """The replacement ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``."""

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        if args or kwargs or not supports(self):
            return self._turbotune_original_forward(
                hidden_states, top_k_index, top_k_weights, *args, **kwargs
            )
        gate_up, gate_up_lora = stack_of(self, "gate_up_proj")
        down, down_lora = stack_of(self, "down_proj")
        return moe_experts(
            hidden_states, top_k_index, top_k_weights, gate_up, down,
            activation=activation_of(self), backend=backend,
            gate_up_lora=gate_up_lora, down_lora=down_lora,
        )  # fmt: skip

    return forward


def stack_of(module: torch.nn.Module, name: str) -> tuple[Any, ExpertLoRA | None]:
    """The base stack and its per-expert LoRA factors.

    While a peft ``target_parameters`` adapter is active on the stack, peft parametrizes it as
    ``W + s * lhs @ rhs`` with a factors proxy (one adapter, not low precision): the base ``W``
    and the factors are returned, so the LoRA runs as grouped rank-r products and the merged
    stack is never built. Any other parametrization: the stack as the module exposes it.
    """
    if "_turbotune_lora" in module.__dict__:  # peft LoRA rerouted (moe.peft_experts)
        from turbotune.moe.peft_experts import peft_factors

        factors = peft_factors(module, name)
        return getattr(module, name), None if factors is None else ExpertLoRA(*factors)
    parametrizations = module._modules.get("parametrizations")
    plist = (
        parametrizations[name]
        if parametrizations is not None and name in parametrizations
        else None
    )
    if plist is not None and len(plist) == 1 and type(plist[0]).__name__ == "_LoraFactorsProxy":
        proxy = plist[0]
        return plist.original, ExpertLoRA(proxy.lhs, proxy.rhs, float(proxy.scaling))
    return getattr(module, name), None


def moe_lm_output(
    model: torch.nn.Module,
    family_module: str,
    outputs: Any,
    loss: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> Any:
    """The ``MoeCausalLMOutputWithPast`` of a patched causal-LM forward run with
    ``output_router_logits``: the family's own ``load_balancing_loss_func`` on the recorded logits,
    added to the loss with ``router_aux_loss_coef`` as transformers does. Families without one
    (DeepSeek-V3, GLM-4-MoE, dots1, HunYuan-MoE: their routers balance through a score bias,
    not a loss) return the router logits and no auxiliary loss, as their own forward does."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    balance = getattr(importlib.import_module(family_module), "load_balancing_loss_func", None)
    if balance is None:
        return MoeCausalLMOutputWithPast(
            loss=loss, logits=None, past_key_values=outputs.past_key_values,
            router_logits=getattr(outputs, "router_logits", None),  # transformers 5.17: none
        )  # fmt: skip
    aux = balance(
        outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask
    )
    loss = loss + model.router_aux_loss_coef * aux.to(loss.device)
    return MoeCausalLMOutputWithPast(
        loss=loss, aux_loss=aux, logits=None, past_key_values=outputs.past_key_values,
        router_logits=outputs.router_logits,
    )  # fmt: skip
