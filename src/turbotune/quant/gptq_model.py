"""GPTQ over a whole causal LM, one decoder layer at a time, in bounded accelerator memory.

Design note. GPTQ needs, for each linear layer, the Hessian of its *inputs as the quantized
model will produce them*. So the model is walked layer by layer (the AutoGPTQ recipe):

1. The calibration batches go through the embeddings only: a pre-hook on the first decoder layer
   records its inputs (hidden states and the keyword arguments the model passes: masks,
   positions, rotary embeddings) and stops the forward.
2. Each decoder layer in turn is moved to the device (the only one resident there), and its
   linears are quantized in *stages*: linears fed by the same tensor (q/k/v; gate/up) form one
   stage, discovered from the order in which the layer calls them. Before each stage, the layer
   runs the calibration inputs with hooks that accumulate those linears' Hessians, so later
   stages see the errors of earlier ones ("true sequential").
3. A quantized linear keeps its dense weight, replaced by the dequantized GPTQ result, so the
   layer's outputs, which become the next layer's inputs, are those of the quantized model.

Only the linears inside decoder layers are quantized (embeddings, norms and the head stay
dense, as in the standard checkpoints). A linear whose shape does not pack into int32 words at
the chosen width is left dense and reported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from turbotune.quant.gptq import (
    GPTQSpec,
    HessianAccumulator,
    QuantizedWeight,
    gptq_quantize,
    rtn_quantize,
)

__all__ = [
    "LayerInputs",
    "QuantizationResult",
    "decoder_layers",
    "quantize_model",
    "rtn_quantize_model",
]

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the capture hook: nothing after the first decoder layer needs to run."""


@dataclass
class LayerInputs:
    """What a decoder layer receives, per calibration batch.

    Attributes:
        hidden: ``[batch, seq, hidden]`` tensors, one per batch.
        kwargs: the keyword arguments the model passed with each (masks, positions...).
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class QuantizationResult:
    """What :func:`quantize_model` produced.

    Attributes:
        weights: quantized linears by module name (``model.layers.0.self_attn.q_proj``).
        skipped: linears left dense, with the reason.
        spec: the settings used.
    """

    weights: dict[str, QuantizedWeight]
    skipped: dict[str, str]
    spec: GPTQSpec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (:func:`turbotune.blocks.decoder_layer_list`)."""
    from turbotune.blocks import decoder_layer_list

    found = decoder_layer_list(model)
    if found is None:
        raise ValueError(f"{type(model).__name__}: no ModuleList of decoder layers found")
    return found[1]


def _to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device
) -> LayerInputs:
    """Run ``batches`` (``[batch, seq]`` token ids) through everything before the first decoder
    layer, on ``device``; returns that layer's inputs. The layers themselves stay where they are.
    """
    layers = decoder_layers(model)
    moved = _move_outside(model, layers, device)
    inputs = LayerInputs()

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.hidden.append(hidden)
        inputs.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_Stop):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
        for module, where in moved:
            module.to(where)
    return inputs


def _move_outside(
    model: nn.Module, layers: nn.ModuleList, device: torch.device
) -> list[tuple[nn.Module, torch.device]]:
    """Move the leaf-most modules outside ``layers`` that hold tensors to ``device``; returns
    ``(module, original device)`` to undo it."""
    inside = {id(m) for m in layers.modules()}
    moved = []
    for module in model.modules():
        if id(module) in inside or module is model:
            continue
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own:
            moved.append((module, own[0].device))
            module.to(device)
    return moved


def _run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device) -> list[torch.Tensor]:
    """The layer's outputs for every calibration batch (empty where a hook stopped it)."""
    outs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        try:
            out = layer(hidden.to(device), **_to(kwargs, device))
        except _Stop:
            continue
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def linear_stages(layer: nn.Module, inputs: LayerInputs, device: torch.device) -> list[list[str]]:
    """The layer's linears (names relative to it) grouped by shared input, in call order."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda _m, args, _o, name=name: seen.append((name, args[0])))
        for name, m in linears.items()
    ]
    try:
        _run_layer(layer, LayerInputs(inputs.hidden[:1], inputs.kwargs[:1]), device)
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    last: torch.Tensor | None = None
    done: set[str] = set()
    for name, x in seen:  # the references in `seen` keep every input alive: ids never collide
        if name in done:
            continue
        if last is None or x is not last:
            stages.append([])
            last = x
        stages[-1].append(name)
        done.add(name)
    return stages


def _accumulate(
    layer: nn.Module, names: Sequence[str], inputs: LayerInputs, device: torch.device
) -> dict[str, HessianAccumulator]:
    """Hessians of the inputs of ``names`` (one stage, in call order) over all calibration
    batches; each forward stops once the stage's last linear has run."""
    accs: dict[str, HessianAccumulator] = {}
    hooks = []

    def collect(acc: HessianAccumulator, last: bool, x: torch.Tensor) -> None:
        acc.add(x)
        if last:  # the rest of the layer is not needed for this stage
            raise _Stop

    for name in names:
        module = layer.get_submodule(name)
        accs[name] = acc = HessianAccumulator(module.in_features, device)
        last = name == names[-1]
        hooks.append(
            module.register_forward_hook(
                lambda _m, args, _o, a=acc, last=last: collect(a, last, args[0])
            )
        )
    try:
        _run_layer(layer, inputs, device)
    finally:
        for h in hooks:
            h.remove()
    return accs


def _packable(module: nn.Linear, bits: int) -> str | None:
    """Why ``module`` cannot be stored at ``bits`` (None when it can)."""
    from turbotune.quant.gptq_format import packed_length

    try:
        packed_length(module.in_features, bits)
        packed_length(module.out_features, bits)
    except ValueError as err:
        return str(err)
    return None


@torch.no_grad()
def quantize_layer(
    layer: nn.Module, inputs: LayerInputs, spec: GPTQSpec, device: torch.device, prefix: str = ""
) -> tuple[dict[str, QuantizedWeight], dict[str, str]]:
    """GPTQ on every linear of one decoder layer, stage by stage; weights replaced in place by
    their dequantized values. Returns ``(quantized, skipped)`` keyed by ``prefix + name``."""
    quantized, skipped = {}, {}
    for stage in linear_stages(layer, inputs, device):
        todo = []
        for name in stage:
            reason = _packable(layer.get_submodule(name), spec.bits)
            if reason is None:
                todo.append(name)
            else:
                skipped[prefix + name] = reason
        if not todo:
            continue
        hessians = _accumulate(layer, todo, inputs, device)
        # Linears with the same input share one Hessian (same tokens, same values).
        for name in todo:
            module = layer.get_submodule(name)
            q, deq = gptq_quantize(module.weight, hessians[name].hessian, spec)
            module.weight.copy_(deq.to(module.weight.dtype))
            quantized[prefix + name] = q
        del hessians
    return quantized, skipped


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    spec: GPTQSpec,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_layer: Callable[[int], None] | None = None,
) -> QuantizationResult:
    """Quantize every linear inside ``model``'s decoder layers with GPTQ, in place.

    Args:
        model: a Hugging Face causal LM, on the CPU (layers visit ``device`` one at a time).
        batches: calibration token ids, ``[batch, seq]`` each.
        spec: bits, group size, symmetry, act-order, damping.
        device: where each layer is quantized; default CUDA when available.
        progress: show a tqdm bar over the layers.
        on_layer: called with each layer's index once it is done (tests, logging).

    Returns:
        The codes of every quantized linear (the model's weights now hold their dequantized
        values, so ``model`` *is* the quantized model in dense form).
    """
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    was_training = model.training
    model.eval()
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    inputs = capture_layer_inputs(model, batches, device)
    result = QuantizationResult({}, {}, spec)
    for i in tqdm(range(len(layers)), desc="GPTQ", unit="layer", disable=not progress):
        layer = layers[i]
        where = next(layer.parameters()).device
        layer.to(device)
        q, skipped = quantize_layer(layer, inputs, spec, device, prefix=f"{prefix}.{i}.")
        result.weights.update(q)
        result.skipped.update(skipped)
        inputs.hidden = _run_layer(layer, inputs, device)  # the next layer's inputs
        layer.to(where)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_layer is not None:
            on_layer(i)
    _report_skipped(result)
    model.train(was_training)
    return result


def _report_skipped(result: QuantizationResult) -> None:
    if result.skipped:
        name, reason = next(iter(result.skipped.items()))
        logger.warning(
            "GPTQ left %d linear(s) dense, e.g. %s: %s", len(result.skipped), name, reason
        )


@torch.no_grad()
def rtn_quantize_model(model: nn.Module, spec: GPTQSpec) -> QuantizationResult:
    """Round-to-nearest with the same groups on the same linears as :func:`quantize_model`
    (the baseline GPTQ is judged against); weights replaced by their dequantized values."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    result = QuantizationResult({}, {}, spec)
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            full = f"{prefix}.{i}.{name}"
            reason = _packable(module, spec.bits)
            if reason is not None:
                result.skipped[full] = reason
                continue
            q, deq = rtn_quantize(module.weight, spec)
            module.weight.copy_(deq.to(module.weight.dtype))
            result.weights[full] = q
    _report_skipped(result)
    return result
