"""Random-weight models built in place on the device, quantized one linear at a time.

Design note. The model is first built on the meta device (``accelerate.init_empty_weights``
with real buffers, so RoPE tables are computed as usual), then each parameter is created
directly on the target device with random values. A linear layer that the run quantizes gets
its bf16 weight drawn, packed into a ``bitsandbytes.nn.Linear4bit`` right away, and the bf16
copy dropped: the dense model never exists whole, which is what lets a 70B model load on one
80 GB GPU. Baselines and turbotune configurations go through this same function, so both
train on identical weights: every tensor is drawn from a generator seeded by ``seed`` and the
tensor's name, independent of build order and of which layers are quantized.

An :class:`HQQSpec` quantizes the same way with turbotune's HQQ (``quant/hqq.py``) into
``HQQLinear`` layers, each solved on the device as it is drawn.
A :class:`GPTQBenchSpec` packs each drawn weight into a ``GPTQLinear`` (the standard GPTQ
layout) by round-to-nearest on the device: throughput does not depend on the codes, and GPTQ
proper needs calibration activations a random model does not have.

Only ``nn.Linear`` modules are quantized (not ``lm_head`` or the names in ``skip_modules``);
the 3-D expert tensors of transformers 5 MoE blocks stay in the compute dtype, as they do when
transformers loads such a model with bitsandbytes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from turbotune.config import QuantizationConfig

from turbotune.quant.bnb import DTYPES as _DTYPES


@dataclass(frozen=True)
class QuantSpec:
    """How linear layers are packed to 4 bits (the fields of ``bnb.nn.Linear4bit``)."""

    quant_type: str = "nf4"
    """``nf4`` or ``fp4``."""
    double_quant: bool = True
    """Quantize the per-block absmax scales too (``compress_statistics``)."""
    compute_dtype: torch.dtype = torch.bfloat16
    """Dtype of the dequantized weight in the matrix product."""
    quant_storage: torch.dtype = torch.uint8
    """Storage dtype of the packed weight."""
    skip_modules: tuple[str, ...] = ("lm_head",)
    """Module names (last component or dotted suffix) left unquantized."""

    @classmethod
    def from_config(cls, q: QuantizationConfig) -> QuantSpec:
        """The spec of a turbotune ``quantization`` section (method nf4 or fp4)."""
        skip = tuple(dict.fromkeys([*q.skip_modules, "lm_head"]))
        return cls(
            q.method, q.double_quant, _DTYPES[q.compute_dtype], _DTYPES[q.quant_storage], skip
        )

    def quantizes(self, module_name: str) -> bool:
        """Whether the ``nn.Linear`` called ``module_name`` is packed."""
        return not any(module_name == s or module_name.endswith("." + s) for s in self.skip_modules)


@dataclass(frozen=True)
class HQQSpec:
    """How linear layers are quantized with turbotune's HQQ (the fields of ``HQQLinear``)."""

    bits: int = 4
    """Bits per weight (1..8)."""
    group_size: int = 64
    """Weights per group along ``in_features``."""
    compute_dtype: torch.dtype = torch.bfloat16
    """Dtype of the dequantized weight in the matrix product."""
    storage_dtype: torch.dtype = torch.uint8
    """Dtype the packed codes are viewed as."""
    skip_modules: tuple[str, ...] = ("lm_head",)
    """Module names (last component or dotted suffix) left unquantized."""

    @classmethod
    def from_config(cls, q: QuantizationConfig) -> HQQSpec:
        """The spec of a turbotune ``quantization`` section (method hqq)."""
        skip = tuple(dict.fromkeys([*q.skip_modules, "lm_head"]))
        return cls(q.bits, q.group_size, _DTYPES[q.compute_dtype], _DTYPES[q.quant_storage], skip)

    def quantizes(self, module_name: str) -> bool:
        """Whether the ``nn.Linear`` called ``module_name`` is quantized."""
        return not any(module_name == s or module_name.endswith("." + s) for s in self.skip_modules)


@dataclass(frozen=True)
class GPTQBenchSpec:
    """How linear layers are packed into ``GPTQLinear`` (GPTQ checkpoint layout)."""

    bits: int = 4
    """Bits per weight (2, 3, 4, 8)."""
    group_size: int = 128
    """Input columns per group; -1: one group per row."""
    desc_act: bool = False
    """Act-order layout: ``g_idx`` randomly permuted (scales gathered per input row)."""
    compute_dtype: torch.dtype = torch.bfloat16
    """Dtype of the bias and of the non-quantized modules."""
    skip_modules: tuple[str, ...] = ("lm_head",)
    """Module names (last component or dotted suffix) left unquantized."""

    @classmethod
    def from_config(cls, q: QuantizationConfig, desc_act: bool = False) -> GPTQBenchSpec:
        """The spec of a turbotune ``quantization`` section (method gptq)."""
        skip = tuple(dict.fromkeys([*q.skip_modules, "lm_head"]))
        return cls(q.bits, q.group_size, desc_act, _DTYPES[q.compute_dtype], skip)

    def quantizes(self, module_name: str) -> bool:
        """Whether the ``nn.Linear`` called ``module_name`` is quantized."""
        return not any(module_name == s or module_name.endswith("." + s) for s in self.skip_modules)


def build_random_model(
    config: PretrainedConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quant: QuantSpec | HQQSpec | GPTQBenchSpec | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A causal LM of ``config`` with random weights, built on ``device`` (optionally 4-bit).

    Args:
        config: the model's transformers config.
        device: where every parameter and buffer ends up.
        dtype: dtype of the floating parameters that are not quantized.
        quant: pack the linear layers to 4 bits this way (bitsandbytes), or quantize them
            with HQQ (:class:`HQQSpec`); ``None`` keeps them dense.
        seed: base seed; each tensor is drawn with ``seed + crc32(name)``.
        attn_implementation: transformers attention implementation (``sdpa``, ``eager``...).

    Returns:
        The model in train mode, ``use_cache`` off; ``is_loaded_in_4bit`` set when quantized
        (peft reads it to pick its 4-bit LoRA layers).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    # from_config ties embeddings only for real tensors; tie the meta ones so that one tensor
    # is drawn for both names.
    model.tie_weights()
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    materialize(model, device=device, dtype=dtype, quant=quant, seed=seed, std=std)
    if isinstance(quant, QuantSpec):
        model.is_loaded_in_4bit = True
    model.config.use_cache = False
    model.train()
    return model


def materialize(
    model: nn.Module,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quant: QuantSpec | HQQSpec | GPTQBenchSpec | None,
    seed: int,
    std: float,
) -> None:
    """Replace every meta parameter of ``model`` by a random one on ``device``, in place.

    Tied parameters (one tensor under two names) stay tied: the first name draws it.
    """
    made: dict[int, nn.Parameter] = {}
    for name, module in list(model.named_modules()):
        if quant is not None and type(module) is nn.Linear and quant.quantizes(name):
            make = _random_hqq_linear if isinstance(quant, HQQSpec) else _random_linear4bit
            if isinstance(quant, GPTQBenchSpec):
                make = _random_gptq_linear
            _swap_module(model, name, make(name, module, device, quant, seed, std))
            continue
        for pname, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in made:
                data = random_tensor(f"{name}.{pname}", param.shape, dtype, device, seed, std)
                made[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
            module._parameters[pname] = made[id(param)]
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[bname] = buf.to(device)


def random_tensor(
    name: str,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    std: float,
) -> torch.Tensor:
    """A deterministic random tensor for parameter ``name``.

    Matrices (and expert stacks) ~ N(0, std); 1-D ``weight`` (norm scales) = 1; biases = 0.
    """
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and "bias" not in leaf:
        return torch.ones(shape, dtype=dtype, device=device)
    if len(shape) <= 1:
        return torch.zeros(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)


def _random_linear4bit(
    name: str, dense: nn.Linear, device: torch.device, quant: QuantSpec, seed: int, std: float
) -> nn.Module:
    """A ``bnb.nn.Linear4bit`` holding a random weight, packed on ``device``."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        dense.in_features,
        dense.out_features,
        bias=dense.bias is not None,
        compute_dtype=quant.compute_dtype,
        compress_statistics=quant.double_quant,
        quant_type=quant.quant_type,
        quant_storage=quant.quant_storage,
        device="meta",
    )
    weight = random_tensor(
        f"{name}.weight", (dense.out_features, dense.in_features), quant.compute_dtype,
        device, seed, std,
    )  # fmt: skip
    # Params4bit.to packs the weight on the device; the dense copy is freed with it.
    layer.weight = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        quant_type=quant.quant_type,
        compress_statistics=quant.double_quant,
        quant_storage=quant.quant_storage,
        module=layer,
    ).to(device)
    del weight
    if dense.bias is not None:
        bias = torch.zeros(dense.out_features, dtype=quant.compute_dtype, device=device)
        layer.bias = nn.Parameter(bias, requires_grad=False)
    layer.requires_grad_(False)
    return layer


def _random_hqq_linear(
    name: str, dense: nn.Linear, device: torch.device, quant: HQQSpec, seed: int, std: float
) -> nn.Module:
    """An ``HQQLinear`` of a random weight, quantized on ``device`` (the dense copy dropped)."""
    from types import SimpleNamespace

    from turbotune.quant.hqq_linear import HQQLinear

    weight = random_tensor(
        f"{name}.weight", (dense.out_features, dense.in_features), quant.compute_dtype,
        device, seed, std,
    )  # fmt: skip
    bias = None
    if dense.bias is not None:
        bias = torch.zeros(dense.out_features, dtype=quant.compute_dtype, device=device)
    layer = HQQLinear.from_linear(
        SimpleNamespace(weight=weight, bias=bias), quant.bits, quant.group_size,
        compute_dtype=quant.compute_dtype, storage_dtype=quant.storage_dtype,
    )  # fmt: skip
    del weight
    return layer


def _random_gptq_linear(
    name: str, dense: nn.Linear, device: torch.device, quant: GPTQBenchSpec, seed: int, std: float
) -> nn.Module:
    """A ``GPTQLinear`` of a random weight, packed on ``device`` (the dense copy dropped)."""
    from turbotune.quant.gptq import GPTQSpec, rtn_quantize
    from turbotune.quant.gptq_format import pack_gptq
    from turbotune.quant.gptq_linear import GPTQLinear

    weight = random_tensor(
        f"{name}.weight", (dense.out_features, dense.in_features), quant.compute_dtype,
        device, seed, std,
    )  # fmt: skip
    q, _ = rtn_quantize(weight, GPTQSpec(bits=quant.bits, group_size=quant.group_size))
    del weight
    g_idx = q.g_idx
    if quant.desc_act:
        gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        g_idx = g_idx[torch.randperm(g_idx.numel(), generator=gen)]
    storage = pack_gptq(q.codes.to(device), q.zeros.to(device), q.scales, g_idx, quant.bits)
    bias = None
    if dense.bias is not None:
        bias = torch.zeros(dense.out_features, dtype=quant.compute_dtype, device=device)
    return GPTQLinear.from_tensors(
        *(t.to(device) for t in storage), quant.bits, bias=bias, group_size=quant.group_size
    )


def _swap_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def count_params(model: nn.Module) -> dict[str, Any]:
    """Trainable parameters, and the bytes of all parameters as stored (4-bit packed counts
    as stored)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"trainable_params": trainable, "param_bytes": stored}
