"""turbotune's own LoRA layers: fsdp_qlora's ``custom_lora`` / ``custom_qlora`` train types.

Design note. :class:`LoRALinear` wraps a frozen ``nn.Linear`` or bitsandbytes ``Linear4bit`` and
adds ``(dropout(x) @ A^T @ B^T) * scaling``. It is a plain module on a plain ``PreTrainedModel``
(no ``PeftModel`` wrapper), which keeps FSDP2 wrapping and checkpoint surgery simple, yet it is
deliberately *peft-shaped*:

* Its attributes are those of peft's LoRA ``Linear`` (``base_layer``; ``lora_A``/``lora_B`` as
  ``ModuleDict`` of ``nn.Linear`` under the key ``"default"``; ``lora_dropout``, ``scaling``,
  ``active_adapters``, ``merged``, ``disable_adapters``, ``use_dora``, ``lora_variant``). So the
  parameter names are peft's (``q_proj.lora_A.default.weight``), every ``"lora_"`` name filter
  in turbotune works unchanged, and the fused ops (:func:`turbotune.patches.forwards.projection_of`)
  recognise and fuse it like a peft layer.
* The forward repeats peft's dtype handling exactly (the input is cast to the adapter dtype; a
  dense base adds the LoRA term in the promoted dtype and casts the sum back, a 4-bit base casts
  the LoRA term to the result dtype before adding, and leaves it alone under autocast), so the
  numbers equal peft's bit for bit.
* Initialisation repeats peft's RNG consumption (``nn.Linear`` construction of A then B, then
  kaiming-uniform ``a=sqrt(5)`` on A and zeros on B) and its round trip through the base
  weight's floating dtype, so the same seed gives the same adapter as ``get_peft_model``.
* Saving writes a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors`` with
  peft's key names), loadable with ``peft.PeftModel.from_pretrained``. The model's
  ``save_pretrained`` is overridden per instance so ``Trainer.save_model`` writes that format.

One adapter per layer, never merged in place: what training needs.
"""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from turbotune.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig

    from turbotune.config import AdapterConfig

__all__ = [
    "ADAPTER",
    "LoRALinear",
    "adapter_state_dict",
    "apply_custom_lora",
    "base_compute_dtype",
    "check_supported",
    "custom_lora_layers",
    "is_custom_lora_model",
    "load_custom_lora",
    "save_custom_lora",
]

ADAPTER = "default"
"""The adapter name, peft's default: it appears in parameter names and is dropped on save."""

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update, computed as peft computes it.

    Args:
        base: the frozen layer, ``nn.Linear`` or bitsandbytes ``Linear4bit`` (``[out, in]``).
        r: rank.
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the LoRA input.
        use_rslora: rank-stabilised scaling.
        dtype: dtype of A and B; ``None`` keeps fp32.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.base_layer = base
        self.rank = r
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_dropout = nn.ModuleDict(
            {ADAPTER: nn.Dropout(dropout) if dropout > 0 else nn.Identity()}
        )
        # Built on the CPU in fp32 then moved, as peft does, so the RNG stream is consumed alike.
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(self.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(r, self.out_features, bias=False)})
        self.scaling = {ADAPTER: alpha / math.sqrt(r) if use_rslora else alpha / r}
        self.use_dora = {ADAPTER: False}
        self.lora_variant: dict[str, Any] = {}
        # State under peft's names, so code that reads peft's instance dicts reads ours alike.
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = ADAPTER
        self._quantized_base = _is_quantized(base)
        self.reset_lora_parameters()
        self._move_to_base(dtype)

    # --- peft-compatible views ----------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter]

    @property
    def merged(self) -> bool:
        """``False``: these layers are never merged in place (peft's name, for peft-shaped readers)."""
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        """``True`` makes the layer compute the base alone."""
        return self._disable_adapters

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        self._disable_adapters = bool(value)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (transformers code reads ``proj.weight.dtype``/``.device``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # --- init ----------------------------------------------------------------------------------

    def reset_lora_parameters(self) -> None:
        """A like ``nn.Linear`` (kaiming-uniform, ``a=sqrt(5)``), B zero: the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[ADAPTER].weight)

    def _move_to_base(self, dtype: torch.dtype | None) -> None:
        # peft moves adapters to the base's dtype (a 4-bit base's compute dtype) when floating,
        # before upcasting them to fp32: the same round trip gives the same initial numbers.
        base_dtype = base_compute_dtype(self.base_layer)
        device = _base_device(self.base_layer)
        for table in (self.lora_A, self.lora_B):
            table[ADAPTER].to(device=device, dtype=base_dtype)
            table[ADAPTER].to(dtype=dtype or torch.float32)

    # --- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + B(A(dropout(x))) * scaling``; ``x``: ``[..., in]`` -> ``[..., out]``."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        lora_a, lora_b = self.lora_A[ADAPTER], self.lora_B[ADAPTER]
        dropout, scaling = self.lora_dropout[ADAPTER], self.scaling[ADAPTER]
        if self._quantized_base:
            # peft's bnb layer: under autocast nothing is cast (autocast decides the matmul
            # dtype); otherwise the term is cast to the result dtype *before* the addition.
            if torch.is_autocast_enabled():
                return result + lora_b(lora_a(dropout(x))) * scaling
            update = lora_b(lora_a(dropout(x.to(lora_a.weight.dtype)))) * scaling
            return result + update.to(result.dtype)
        # peft's dense layer: add in the promoted dtype, then cast the sum back.
        out_dtype = result.dtype
        update = lora_b(lora_a(dropout(x.to(lora_a.weight.dtype)))) * scaling
        return (result + update).to(out_dtype)

    def extra_repr(self) -> str:
        return f"r={self.rank}, scaling={self.scaling[ADAPTER]:g}, quantized_base={self._quantized_base}"


def _is_4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def _is_dequantizable_module(module: nn.Module) -> bool:
    """A quantized linear of another format (GPTQ, HQQ): a module with ``dequantize(dtype)`` and
    ``in_features``/``out_features`` (a transformers model has ``dequantize`` too)."""
    return (
        not isinstance(module, nn.Linear)
        and callable(getattr(module, "dequantize", None))
        and isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    )


def _is_quantized(module: nn.Module) -> bool:
    # peft's 4-bit, GPTQ and HQQ LoRA layers share one dtype rule (see LoRALinear.forward).
    return _is_4bit(module) or _is_dequantizable_module(module)


def _base_tensor(base: nn.Module) -> torch.Tensor | None:
    """The tensor that tells a base's device: ``weight``, else GPTQ's ``qweight``, else any."""
    for name in ("weight", "qweight", "W_q"):
        tensor = getattr(base, name, None)
        if isinstance(tensor, torch.Tensor):
            return tensor
    tensor = next(iter(base.parameters()), None)
    return tensor if tensor is not None else next(iter(base.buffers()), None)


def _base_device(base: nn.Module) -> torch.device | None:
    tensor = _base_tensor(base)
    return tensor.device if tensor is not None else None


def base_compute_dtype(base: nn.Module) -> torch.dtype | None:
    """The floating dtype peft moves new adapters to: a 4-bit (or GPTQ/HQQ) base's
    ``compute_dtype``, else its weight's dtype; ``None`` when neither is floating."""
    dtype = getattr(base, "compute_dtype", None)
    if not isinstance(dtype, torch.dtype):
        tensor = _base_tensor(base)
        dtype = tensor.dtype if tensor is not None else None
    return dtype if dtype is not None and dtype.is_floating_point else None


# --- targets -------------------------------------------------------------------------------------


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return out if out is not None else getattr(model, "lm_head", None)


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Names of the modules to adapt, with peft's matching rules.

    ``all-linear``: every ``nn.Linear`` (``Linear4bit`` included) and every quantized linear
    with ``dequantize(dtype)`` (GPTQ, HQQ) but the output layer. A list:
    a module matches when its name equals an entry or ends with ``.<entry>``. Another string: a
    regular expression the whole name must match.
    """
    head = _output_layer(model)
    names = []
    for name, module in model.named_modules():
        linear = isinstance(module, nn.Linear) or _is_dequantizable_module(module)
        if targets == "all-linear":
            hit = linear and module is not head
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith(f".{t}") for t in targets)
        if hit:
            if not linear:
                raise ConfigError(
                    f"adapter target '{name}' is a {type(module).__name__}; the custom LoRA "
                    "implementation adapts nn.Linear, bitsandbytes Linear4bit and quantized "
                    "linears with dequantize(dtype) (GPTQ, HQQ) only"
                )
            names.append(name)
    if not names:
        raise ConfigError(f"adapter.target_modules {targets!r} matches no module of the model")
    return names


# --- application ---------------------------------------------------------------------------------


def check_supported(cfg: AdapterConfig) -> None:
    """Raise :class:`ConfigError` for adapter options the custom layers do not implement."""
    if cfg.method not in ("lora", "dora"):
        raise ConfigError(
            f"adapter.implementation 'custom' supports methods lora and dora, not '{cfg.method}'"
        )
    if cfg.modules_to_save:
        raise ConfigError("adapter.modules_to_save needs adapter.implementation=peft")
    if cfg.target_parameters:
        raise ConfigError("adapter.target_parameters needs adapter.implementation=peft")


def apply_custom_lora(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Replace the target linears of ``model`` with :class:`LoRALinear` (``method: dora``:
    :class:`~turbotune.adapters.dora.DoRALinear`), in place.

    Everything but the adapters is frozen. The model stays what it was (a ``PreTrainedModel``),
    with a ``save_pretrained`` that writes a PEFT adapter.

    Args:
        model: a transformers causal LM (dense or 4-bit base).
        cfg: the adapter section (``method: lora``).

    Returns:
        The same model object.
    """
    from turbotune.adapters.peft_lora import compute_dtype_of, lora_config

    check_supported(cfg)
    if is_custom_lora_model(model):
        raise ConfigError("the model already carries custom LoRA layers")
    dtype = compute_dtype_of(model) if cfg.weights_dtype == "compute" else None
    names = resolve_targets(model, cfg.target_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    layer_cls = LoRALinear
    if cfg.method == "dora":
        from turbotune.adapters.dora import DoRALinear

        layer_cls = DoRALinear
    for name in names:  # model order, as peft: the same seed gives the same adapters
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        layer = layer_cls(
            getattr(holder, child),
            cfg.r,
            cfg.alpha,
            cfg.dropout,
            use_rslora=cfg.use_rslora,
            dtype=dtype,
        )
        setattr(holder, child, layer)
    config = lora_config(cfg)
    if cfg.target_modules == "all-linear":  # saved resolved, as peft saves it
        config.target_modules = sorted({n.rsplit(".", 1)[-1] for n in names})
    model.__dict__["_turbotune_lora_config"] = config
    # The Trainer refuses a quantized model unless it sees adapters; this is transformers' own
    # marker for adapters injected into a PreTrainedModel.
    model._hf_peft_config_loaded = True
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    return model


def _save_pretrained(
    self: nn.Module,
    save_directory: str,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    **_: Any,
) -> None:
    """``save_pretrained`` of a custom-LoRA model: the PEFT adapter only (what Trainer calls)."""
    weights = adapter_state_dict(self, state_dict)
    if is_main_process:
        base = getattr(getattr(self, "config", None), "name_or_path", None)
        _write_adapter(self, Path(save_directory), weights, base)


def is_custom_lora_model(model: nn.Module) -> bool:
    return "_turbotune_lora_config" in model.__dict__


def custom_lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's :class:`LoRALinear` layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# --- saving and loading --------------------------------------------------------------------------


MAGNITUDE = "lora_magnitude_vector"
"""DoRA's magnitude: ``<layer>.lora_magnitude_vector.default.weight`` live, saved without
the adapter name *and* the ``.weight`` (peft's saved key)."""


def _peft_key(name: str) -> str:
    # model.layers.0.q_proj.lora_A.default.weight -> base_model.model.model.layers.0.q_proj.lora_A.weight
    # ...q_proj.lora_magnitude_vector.default.weight -> ...q_proj.lora_magnitude_vector
    name = name.replace(f".{MAGNITUDE}.{ADAPTER}.weight", f".{MAGNITUDE}")
    return "base_model.model." + name.replace(f".{ADAPTER}.", ".")


def _adapter_parts(layer: nn.Module) -> tuple[str, ...]:
    return ("lora_A", "lora_B", MAGNITUDE) if MAGNITUDE in layer._modules else ("lora_A", "lora_B")


def adapter_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's saved key names, on the CPU.

    Args:
        model: a model prepared by :func:`apply_custom_lora`.
        state_dict: a full state dict of ``model`` to take them from (what the Trainer passes
            under FSDP); ``None`` reads the parameters (sharded ones are gathered: collective).
    """
    names = [
        f"{name}.{part}.{ADAPTER}.weight"
        for name, layer in custom_lora_layers(model).items()
        for part in _adapter_parts(layer)
    ]
    if state_dict is None:
        state_dict = dict(model.named_parameters())
    out = {}
    for name in names:
        tensor = state_dict[name].detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor
            tensor = tensor.full_tensor()
        out[_peft_key(name)] = tensor.to("cpu").contiguous()
    return out


def _write_adapter(
    model: nn.Module, out: Path, weights: dict[str, torch.Tensor], base: str | None
) -> None:
    from safetensors.torch import save_file

    config: LoraConfig = model.__dict__["_turbotune_lora_config"]
    out.mkdir(parents=True, exist_ok=True)
    saved = config.inference_mode, config.base_model_name_or_path
    try:  # peft saves adapters for inference; the live config keeps training
        config.inference_mode, config.base_model_name_or_path = True, base
        config.save_pretrained(str(out))
    finally:
        config.inference_mode, config.base_model_name_or_path = saved
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def save_custom_lora(
    model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``model``'s adapter in PEFT format; returns the folder.

    Args:
        model: a model prepared by :func:`apply_custom_lora`.
        out_dir: the folder (created if needed).
        base_model_name_or_path: recorded in ``adapter_config.json``; defaults to the model's
            ``config.name_or_path``.
    """
    if not is_custom_lora_model(model):
        raise ValueError("the model carries no custom LoRA layers (see apply_custom_lora)")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None)
    out = Path(out_dir)
    _write_adapter(model, out, adapter_state_dict(model), base_model_name_or_path)
    return out


def load_custom_lora(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copy a saved PEFT LoRA adapter into ``model``'s custom layers (resuming a checkpoint).

    Every adapter weight of the model must be in the file and vice versa, with the same shapes.
    Under FSDP2 every rank calls it and keeps its own shard.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    saved = json.loads((adapter_dir / CONFIG_FILE).read_text())
    ours = model.__dict__["_turbotune_lora_config"]
    if saved.get("r") != ours.r:
        raise ValueError(
            f"{adapter_dir}: rank {saved.get('r')} does not match the model's {ours.r}"
        )
    if bool(saved.get("use_dora", False)) != bool(ours.use_dora):
        raise ValueError(
            f"{adapter_dir}: use_dora={saved.get('use_dora')} does not match the model's {ours.use_dora}"
        )
    weights = load_file(str(adapter_dir / WEIGHTS_FILE))
    params = {
        _peft_key(n): p for n, p in model.named_parameters() if f".{ADAPTER}." in n and "lora_" in n
    }
    missing, extra = params.keys() - weights.keys(), weights.keys() - params.keys()
    if missing or extra:
        raise ValueError(
            f"{adapter_dir}: adapter keys differ; missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
        )
    with torch.no_grad():
        for key, param in params.items():
            value = weights[key]
            if hasattr(param, "device_mesh"):  # FSDP2 DTensor: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(
                    value.to(param.device), param.device_mesh, param.placements
                )
            param.copy_(value)
