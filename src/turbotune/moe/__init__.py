"""Mixture-of-Experts: routed expert MLPs as grouped products, patches, expert parallelism."""

from turbotune.moe.experts import ExpertLoRA, moe_experts, resolve_backend
from turbotune.moe.plan import ExpertPlan, plan_experts
from turbotune.moe.routing import Routed, load_balancing_loss, route

__all__ = [
    "ExpertLoRA",
    "ExpertPlan",
    "Routed",
    "load_balancing_loss",
    "moe_experts",
    "plan_experts",
    "resolve_backend",
    "route",
]
