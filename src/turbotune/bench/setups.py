"""What each scenario trains: the built-in baselines, and turbotune configurations.

Both paths start from the same random model (:func:`turbotune.bench.build.build_random_model`)
and hand back a :class:`Prepared` model to the same timed loop.

Baselines are what a user would run without turbotune (plain transformers + peft, the way the
Hugging Face Trainer drives them):

* ``hf-full``: full fine-tuning, every weight trained, in the run's precision (bf16);
* ``hf-lora``: peft LoRA on a dense base;
* ``hf-qlora``: bitsandbytes NF4 (double quant, bf16 compute) + peft LoRA, *without*
  ``prepare_model_for_kbit_training`` (the GPU notes' reference baseline);
* ``hf-qlora-kbit``: the same *with* ``prepare_model_for_kbit_training`` (norms, embeddings and
  head upcast to fp32);
* ``hf-qdora``: ``hf-qlora`` with peft's DoRA (``use_dora=True``), the ``bnb_dora`` baseline.

A turbotune scenario goes through :class:`~turbotune.framework.AccelerationFramework` exactly as
``turbotune train`` does after loading: the loader plugin's post-load step, the precision plan,
``TrainingArguments``, then ``augment`` (adapters, then patches). Loading itself is the bench's:
weights are random, and a 4-bit ``quantization`` section is packed by the same code as the
baseline's, so the two differ only in what the plugins do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from turbotune.bench.build import GPTQBenchSpec, HQQSpec, QuantSpec, build_random_model
from turbotune.errors import TurbotuneError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from turbotune.framework import AccelerationFramework

#: The built-in baselines (name -> one line).
BASELINES: dict[str, str] = {
    "hf-full": "full fine-tuning, plain transformers",
    "hf-lora": "peft LoRA on a dense base",
    "hf-qlora": "transformers + bitsandbytes NF4 (double quant) + peft, no kbit preparation",
    "hf-qlora-kbit": "hf-qlora with peft's prepare_model_for_kbit_training (fp32 upcasts)",
    "hf-qdora": "hf-qlora with peft's DoRA (use_dora=True): the bnb_dora baseline",
}

#: The LoRA settings every scenario shares unless it says otherwise.
DEFAULT_LORA: dict[str, Any] = {
    "r": 16,
    "alpha": 16.0,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class Prepared:
    """A model ready for the timed loop, and how to run it."""

    model: torch.nn.Module
    autocast: torch.dtype | None
    """Autocast dtype of the forward pass (``None``: none)."""
    trainable: str
    """``full`` or ``lora`` (for the FLOP count)."""
    precision: str
    """The precision mode that was resolved (``bf16``, ``fp32``, ...)."""


@dataclass(frozen=True)
class PointSettings:
    """The settings of one point that a setup needs."""

    gradient_checkpointing: bool
    precision: str
    learning_rate: float
    lora: dict[str, Any]
    attn_implementation: str
    seed: int
    batch_size: int
    output_dir: str


def _backend(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _enable_checkpointing(model: torch.nn.Module, kwargs: dict[str, Any] | None) -> None:
    with warnings.catch_warnings():  # transformers >= 5.2x renames it; the old name works in both
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# --- baselines ------------------------------------------------------------------------------


def prepare_baseline(
    name: str, config: PretrainedConfig, s: PointSettings, device: torch.device
) -> Prepared:
    """Build the model of baseline ``name`` (see the module docstring)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from turbotune.precision import resolve_precision

    if name not in BASELINES:
        raise TurbotuneError(f"unknown baseline '{name}'; built-in: {', '.join(BASELINES)}")
    plan = resolve_precision(s.precision, _backend(device), adapters=name != "hf-full")
    quant = QuantSpec() if name.startswith(("hf-qlora", "hf-qdora")) else None
    dtype = torch.bfloat16 if quant is not None else plan.weight_dtype
    model = build_random_model(
        config, device=device, dtype=dtype, quant=quant, seed=s.seed,
        attn_implementation=s.attn_implementation,
    )  # fmt: skip
    ckpt_kwargs = {"use_reentrant": False}  # transformers 5's own default
    if name == "hf-full":
        model.requires_grad_(True)
        trainable = "full"
    else:
        if name == "hf-qlora-kbit":
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=s.gradient_checkpointing,
                gradient_checkpointing_kwargs=ckpt_kwargs,
            )
        lora = LoraConfig(
            r=s.lora["r"], lora_alpha=s.lora["alpha"], lora_dropout=s.lora["dropout"],
            target_modules=s.lora["target_modules"], bias="none", task_type="CAUSAL_LM",
            use_dora=name == "hf-qdora",
        )  # fmt: skip
        torch.manual_seed(s.seed)  # adapters start from the same draw in every scenario
        model = get_peft_model(model, lora)
        trainable = "lora"
    if s.gradient_checkpointing:
        _enable_checkpointing(model, ckpt_kwargs)
    return Prepared(model, plan.autocast, trainable, plan.mode)


# --- turbotune configurations ---------------------------------------------------------------


def finish_loading(fw: AccelerationFramework, model: torch.nn.Module) -> torch.nn.Module:
    """Apply the loader plugin's post-load step to a model the bench built.

    A loader plugin may offer ``prepare_loaded(model) -> model`` (what its ``load_model`` does
    after the weights are in); the bnb loader's step is :func:`turbotune.quant.bnb.prepare_for_training`.
    """
    loader = fw.loader
    if loader is None:
        return model
    hook = getattr(loader, "prepare_loaded", None)
    if callable(hook):
        return hook(model)
    if loader.name == "bnb":
        from turbotune.quant.bnb import prepare_for_training

        return prepare_for_training(model, upcast_fp32=loader.config.upcast_fp32)
    raise TurbotuneError(
        f"loader plugin '{loader.name}' cannot prepare a random-weight model for the benchmark "
        "(it needs a prepare_loaded(model) method)"
    )


def prepare_turbotune(
    raw: dict[str, Any], config: PretrainedConfig, s: PointSettings, device: torch.device
) -> Prepared:
    """Build the model of a turbotune configuration (a config dict with the point's keys merged).

    Raises:
        TurbotuneError: the config is invalid, a plugin is unknown or cannot run here.
    """
    from turbotune.config import load_config
    from turbotune.framework import AccelerationFramework
    from turbotune.precision import apply_precision, resolve_precision
    from turbotune.train.trainer import offloads_checkpoints, training_arguments

    cfg = load_config(raw)
    backend = _backend(device)
    plan = resolve_precision(cfg.train.precision, backend, adapters=cfg.adapter.method != "full")
    fw = AccelerationFramework(cfg)
    q = cfg.quantization
    quant = QuantSpec.from_config(q) if q.method in ("nf4", "fp4") else None
    if q.method == "hqq":
        quant = HQQSpec.from_config(q)  # solved layer by layer on the device as it is drawn
    if q.method == "gptq":
        quant = GPTQBenchSpec.from_config(q)  # packed layer by layer (RTN codes, GPTQ layout)
    if quant is not None:
        dtype = quant.compute_dtype  # as the 4-bit loader: non-quantized modules in compute dtype
    elif cfg.model.dtype != "auto":
        dtype = getattr(torch, cfg.model.dtype)
    else:
        dtype = plan.weight_dtype
    model = build_random_model(
        config, device=device, dtype=dtype, quant=quant, seed=s.seed,
        attn_implementation=cfg.model.attn_implementation,
    )  # fmt: skip
    model = finish_loading(fw, model)
    for plugin in fw.plugins:
        plugin.check_model(model)
    apply_precision(model, plan)  # the order of turbotune.train.run
    args = training_arguments(cfg, plan, backend, has_eval=False)
    torch.manual_seed(s.seed)  # adapters start from the same draw in every scenario
    model, args = fw.augment(model, args, fw.peft_config())
    if offloads_checkpoints(cfg.train):  # turbotune's offloaded checkpoint, as run_training
        from turbotune.distributed.activations import checkpoint_layers

        checkpoint_layers(model, offload=True, offload_layers=cfg.train.activation_offload_layers)
    elif args.gradient_checkpointing:
        _enable_checkpointing(model, args.gradient_checkpointing_kwargs)
    trainable = "full" if cfg.adapter.method == "full" else "lora"
    return Prepared(model, plan.autocast, trainable, plan.mode)


def turbotune_config_dict(base: dict[str, Any], s: PointSettings) -> dict[str, Any]:
    """A scenario's config dict with the point's settings merged in.

    The point owns batch size, gradient checkpointing and the output dir; precision, learning
    rate, attention and the LoRA keys fill in only where the scenario's config is silent.
    """
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    train = raw.setdefault("train", {})
    train["per_device_train_batch_size"] = s.batch_size
    train["gradient_checkpointing"] = s.gradient_checkpointing
    train["output_dir"] = s.output_dir
    train.setdefault("precision", s.precision)
    train.setdefault("learning_rate", s.learning_rate)
    train.setdefault("seed", s.seed)
    raw.setdefault("model", {}).setdefault("attn_implementation", s.attn_implementation)
    raw["model"]["path"] = None
    raw.pop("data", None)
    adapter = raw.setdefault("adapter", {})
    if adapter.get("method", "lora") != "full" and raw.get("train_type") != "full":
        for key, value in s.lora.items():
            adapter.setdefault(key, value)
    return raw
