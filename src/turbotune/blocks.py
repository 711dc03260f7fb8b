"""Finding a model's decoder layers: one rule for sharding, checkpointing, graphs and quantizers.

Design note. FSDP wraps each decoder layer, activation offload checkpoints each, CUDA graphs
capture each, the GPTQ quantizer walks them one by one and Llama-Pro inserts new ones: all need
the same list. transformers marks its decoder layers by class (``GradientCheckpointingLayer``),
which is the reliable signal: "the longest ``ModuleList``" picks the experts of an MoE model
whose experts are a ``ModuleList`` longer than its layer stack (Qwen2-MoE's 60 experts over 24
layers in transformers 4). Fallbacks, in order, for models without that class: the
``ModuleList`` as long as ``config.num_hidden_layers``, then the longest ``ModuleList``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["checkpointing_layers", "decoder_layer_list", "decoder_layers"]


def checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers ``GradientCheckpointingLayer`` modules of ``model``, in call
    order (``[]`` when there are none or transformers lacks the class)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers before 4.52
        return []
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, GradientCheckpointingLayer):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def decoder_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(qualified name, ModuleList)`` holding the decoder layers, or None."""
    lists = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
    ]
    if not lists:
        return None
    marked = checkpointing_layers(model)
    if marked:
        first = marked[0]
        for name, m in lists:
            if any(child is first for child in m):
                return name, m
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    same = [(name, m) for name, m in lists if n is not None and len(m) == n]
    if same:
        return same[0]
    return max(lists, key=lambda item: len(item[1]))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model`` in call order (``[]`` when none can be found)."""
    marked = checkpointing_layers(model)
    if marked:
        return marked
    found = decoder_layer_list(model)
    return [] if found is None else list(found[1])
