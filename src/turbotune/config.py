"""The sections of a turbotune run configuration.

One YAML file describes one run::

    model:        {path: /models/llama-3.1-8b, dtype: bfloat16}
    data:         {path: alpaca.json, format: alpaca, max_length: 1024}
    adapter:      {method: lora, r: 16, alpha: 16, target_modules: all-linear}
    quantization: {method: nf4, double_quant: true}
    train:        {max_steps: 100, learning_rate: 2.0e-4, per_device_train_batch_size: 4}
    plugins:      {fused_ops: {}, padding_free: {}}

Every section is optional. ``train`` accepts any Hugging Face ``TrainingArguments`` field on top
of its own; ``plugins`` maps a plugin name to that plugin's own section, which the plugin's
config dataclass checks (see :mod:`turbotune.plugins`). Each field's docstring is what
``turbotune arguments`` and the docs show.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from turbotune.configtools import apply_overrides, build, load_yaml, to_dict
from turbotune.distributed.config import DistributedConfig
from turbotune.errors import ConfigError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Precision = Literal[
    "auto", "fp32", "bf16", "fp16_autocast", "bf16_autocast", "bf16_buffers_autocast"
]
Schedule = Literal[
    "constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "exponential"
]
TRAIN_TYPES = (
    "full", "lora", "custom_lora", "qlora", "custom_qlora",
    "hqq_lora", "bnb_dora", "hqq_dora", "bnb_llama_pro", "hqq_llama_pro",
)  # fmt: skip


@dataclass
class ModelConfig:
    path: str | None = None
    """A Hugging Face model id or a local checkpoint directory. Empty: the built-in demo model."""
    dtype: Dtype = "auto"
    """Dtype the base weights are loaded in; ``auto`` follows ``train.precision``."""
    tokenizer: str | None = None
    """Tokenizer id or directory, when it is not next to the model."""
    gguf_file: str | None = None
    """A GGUF file inside ``path`` to load (dequantized on load; needs the ``gguf`` package)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    attn_implementation: str = "sdpa"
    """transformers attention implementation: ``sdpa``, ``eager``, ``flash_attention_2``, ..."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off by default: it executes untrusted code."""


@dataclass
class DataConfig:
    path: str | None = None
    """A local .json/.jsonl/.csv/.parquet file, a Hugging Face dataset id, or a shortcut
    (``alpaca``, ``alpaca-cleaned``, ``guanaco``, ``orca-math``, ``sql``)."""
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "text"] = "auto"
    """How rows become prompt and target; ``auto`` looks at the columns."""
    split: str = "train"
    """Split of a hub dataset to train on."""
    response_only: bool | None = None
    """Loss on the response tokens only. Default: on for instruction formats, off for text."""
    max_length: int = 1024
    """Maximum tokens per example; the prompt is cut first so that the target is never dropped."""
    eval_ratio: float = 0.0
    """Fraction of the training rows held out for evaluation (0 = none)."""
    eval_path: str | None = None
    """A separate evaluation file (instead of ``eval_ratio``)."""
    max_samples: int | None = None
    """Use only the first N rows (quick experiments)."""
    seed: int = 42
    """Seed of the train/eval split and of shuffling."""
    text_column: str | None = None
    """Column holding plain text (``text`` format); found automatically when empty."""
    add_eos: bool = True
    """Append the tokenizer's end-of-sequence token to each target."""

    def validate(self) -> None:
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ConfigError(f"'data.eval_ratio' must be in [0, 1), got {self.eval_ratio}")
        if self.max_length < 8:
            raise ConfigError(f"'data.max_length' must be at least 8, got {self.max_length}")


@dataclass
class AdapterConfig:
    method: Literal["full", "lora", "dora", "llama_pro"] = "lora"
    """``full`` trains every weight; ``lora``/``dora`` train low-rank adapters only;
    ``llama_pro`` trains only the blocks ``turbotune expand`` added (the rest is frozen)."""
    implementation: Literal["peft", "custom"] = "peft"
    """peft's LoRA layers, or turbotune's own (the reference's ``custom_lora``); same numbers."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt (``[q_proj, v_proj]``) or ``all-linear`` (every linear but the head)."""
    target_parameters: list[str] = field(default_factory=list)
    """Parameters (not modules) to adapt through peft's ``target_parameters``, e.g. the stacked
    MoE experts ``[mlp.experts.gate_up_proj, mlp.experts.down_proj]``: one LoRA pair per expert."""
    use_rslora: bool = False
    """Rank-stabilized scaling ``alpha / sqrt(r)``."""
    weights_dtype: Literal["float32", "compute"] = "float32"
    """Adapter weights in fp32 (default, stable) or in the compute dtype (less memory)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. ``[lm_head]``)."""

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"'adapter.r' must be a positive rank, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'adapter.dropout' must be in [0, 1), got {self.dropout}")


@dataclass
class QuantizationConfig:
    method: Literal["none", "nf4", "fp4", "gptq", "hqq"] = "none"
    """Quantization of the frozen base weights."""
    double_quant: bool = True
    """bitsandbytes: also quantize the per-block scales (about 0.4 bit/parameter saved)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype in which quantized weights are dequantized and multiplied."""
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """Storage dtype of packed 4-bit weights; use the compute dtype so FSDP can shard them."""
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    """Modules kept unquantized (the LM head always is)."""
    upcast_fp32: bool = False
    """Cast norms, embeddings and the head to fp32 like peft's
    ``prepare_model_for_kbit_training``. Off: it costs ~25% throughput and ~47% memory."""
    bits: int = 4
    """Bits per weight (GPTQ, HQQ)."""
    group_size: int = 64
    """Weights per quantization group (GPTQ, HQQ, MLX: 32, 64 or 128)."""


@functools.cache
def training_argument_types() -> dict[str, Any]:
    """Every ``transformers.TrainingArguments`` field with its annotation (pass-through keys)."""
    from transformers import TrainingArguments

    try:
        hints = typing.get_type_hints(TrainingArguments)
    except Exception:  # a library annotation we cannot resolve: accept any value
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


@dataclass
class TrainConfig:
    __passthrough__ = ("hf_args", training_argument_types)

    output_dir: str = "outputs/run"
    """Where checkpoints, the adapter or model, and the metrics log are written."""
    precision: Precision = "auto"
    """``bf16`` (pure bf16), ``fp32``, ``fp16_autocast``/``bf16_autocast`` (fp32 weights,
    low-precision compute), ``bf16_buffers_autocast`` (bf16 weights, fp32 buffers, autocast).
    ``auto``: bf16 where the accelerator supports it, else fp32."""
    max_steps: int = -1
    """Optimizer steps to run; -1 trains for ``num_train_epochs``."""
    num_train_epochs: float = 1.0
    """Epochs, when ``max_steps`` is -1."""
    per_device_train_batch_size: int = 4
    """Micro-batch size per device."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the loss is normalized by the step's target tokens."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: Schedule = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int | None = None
    """Warmup length in optimizer steps."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of all steps."""
    warmup_epochs: float | None = None
    """Warmup in epochs. With no warmup given, a decaying schedule warms up for 10% of steps."""
    lr_power: float = 1.0
    """Power of the ``polynomial`` schedule."""
    lr_num_cycles: float = 1.0
    """Cycles of ``cosine_with_restarts`` (hard restarts)."""
    lr_gamma: float = 0.95
    """Decay per optimizer step of the ``exponential`` schedule (after warmup)."""
    min_lr_ratio: float = 0.0
    """Floor of the decaying schedules, as a fraction of the peak."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    reentrant_checkpointing: bool = False
    """Use the reentrant checkpoint variant (needed by some quantized backends)."""
    activation_offload: bool = False
    """With ``gradient_checkpointing``: keep each decoder layer's checkpointed input in pinned
    host memory instead of on the GPU (copied on side streams, prefetched one layer ahead in
    backward; ``turbotune.distributed.offload``). Saves ``layers x batch x seq x hidden`` bytes."""
    activation_offload_layers: int | None = None
    """With ``activation_offload``: offload only the first N decoder layers' inputs (the rest
    stay on the GPU, still checkpointed): trades the copies' cost against memory. Empty: all."""
    optimizer: str | None = None
    """Any ``TrainingArguments.optim`` value, e.g. ``paged_adamw_8bit`` (bitsandbytes);
    empty: the Trainer's default (fused AdamW on CUDA)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    seed: int = 42
    """Seed of initialization, dropout and data order."""
    logging_steps: int = 10
    """Log loss, learning rate, grad norm, tokens/s, MFU and memory every N optimizer steps."""
    save_steps: int = 0
    """Write a checkpoint every N optimizer steps (0 = only at the end)."""
    save_total_limit: int | None = 2
    """Checkpoints to keep."""
    eval_steps: int = 0
    """Evaluate every N steps (0 = at the end, when there is an eval set)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint directory, or ``latest`` for the newest one in ``output_dir``."""
    report_to: list[str] = field(default_factory=lambda: ["stdout"])
    """Where metrics go: ``stdout``, ``tensorboard``, ``wandb``."""
    hf_args: dict[str, Any] = field(default_factory=dict)
    """Any other ``TrainingArguments`` field, given directly in this section."""

    def validate(self) -> None:
        given = [
            w for w in (self.warmup_steps, self.warmup_ratio, self.warmup_epochs) if w is not None
        ]
        if len(given) > 1:
            raise ConfigError(
                "give at most one of 'train.warmup_steps', 'train.warmup_ratio', 'train.warmup_epochs'"
            )
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("'train.gradient_accumulation_steps' must be at least 1")
        if self.per_device_train_batch_size < 1:
            raise ConfigError("'train.per_device_train_batch_size' must be at least 1")
        if self.activation_offload_layers is not None and (
            self.activation_offload_layers < 0 or not self.activation_offload
        ):
            raise ConfigError(
                "'train.activation_offload_layers' is how many layers 'train.activation_offload' "
                "offloads: a number >= 0, with 'train.activation_offload: true'"
            )
        if self.activation_offload and not self.gradient_checkpointing:
            raise ConfigError(
                "'train.activation_offload' offloads the checkpointed layer inputs: "
                "set 'train.gradient_checkpointing: true' too"
            )


@dataclass
class Config:
    """A whole run: every section, checked."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training (and evaluation) data."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """What is trained: the full model or adapters."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """How the frozen base weights are stored."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-process sharding with FSDP2 (``distributed.enabled: true``; see ``turbotune.distributed``)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The Trainer: steps, optimizer, schedule, precision, checkpoints, logging."""
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Active plugins by name, each with its own section (checked by the plugin)."""
    train_type: str | None = None
    """A name from fsdp_qlora (``qlora``, ``custom_lora``, ``bnb_dora``, ...) that sets
    ``adapter`` and ``quantization`` for you."""
    backend: Literal["auto", "cuda", "cpu", "mps", "mlx"] = "auto"
    """Compute backend (also ``turbotune train --backend NAME``). ``auto``: CUDA, else MPS, else
    CPU, with the reason printed; MLX (a separate engine: LoRA/4-bit LoRA, no plugins) only by
    name. See docs/backends.md."""
    source: str = field(default="<defaults>", init=False, repr=False, compare=False)
    """Where this config was read from (set by the loader)."""

    def validate(self) -> None:
        if self.train_type is not None and self.train_type not in TRAIN_TYPES:
            raise ConfigError(
                f"'train_type' is {self.train_type!r}; valid: {', '.join(TRAIN_TYPES)}"
            )
        for name, section in self.plugins.items():
            if section is not None and not isinstance(section, dict):
                raise ConfigError(f"'plugins.{name}' must be a mapping (use {{}} for defaults)")

    def to_dict(self) -> dict[str, Any]:
        out = to_dict(self)
        out.pop("source", None)
        return out


_TRAIN_TYPE_MAP: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (adapter keys, quantization keys)
    "full": ({"method": "full"}, {"method": "none"}),
    "lora": ({"method": "lora", "implementation": "peft"}, {"method": "none"}),
    "custom_lora": ({"method": "lora", "implementation": "custom"}, {"method": "none"}),
    "qlora": ({"method": "lora", "implementation": "peft"}, {"method": "nf4"}),
    "custom_qlora": ({"method": "lora", "implementation": "custom"}, {"method": "nf4"}),
    "hqq_lora": ({"method": "lora", "implementation": "custom"}, {"method": "hqq"}),
    "bnb_dora": ({"method": "dora"}, {"method": "nf4"}),
    "hqq_dora": ({"method": "dora", "implementation": "custom"}, {"method": "hqq"}),
    "bnb_llama_pro": ({"method": "llama_pro"}, {"method": "nf4"}),
    "hqq_llama_pro": ({"method": "llama_pro", "implementation": "custom"}, {"method": "hqq"}),
}


def _apply_train_type(data: dict[str, Any], source: str) -> dict[str, Any]:
    name = data.get("train_type")
    if name is None:
        return data
    if name not in _TRAIN_TYPE_MAP:
        if name in TRAIN_TYPES:
            raise ConfigError(
                f"{source}: train_type '{name}' arrives with Llama-Pro support (turbotune expand); not available yet"
            )
        raise ConfigError(f"{source}: 'train_type' is {name!r}; valid: {', '.join(TRAIN_TYPES)}")
    adapter, quant = _TRAIN_TYPE_MAP[name]
    for section, keys in (("adapter", adapter), ("quantization", quant)):
        current = dict(data.get(section) or {})
        for key, value in keys.items():
            if key in current and current[key] != value:
                raise ConfigError(
                    f"{source}: train_type '{name}' sets {section}.{key}={value!r}, "
                    f"but the config says {current[key]!r}; remove one of them"
                )
            current[key] = value
        data[section] = current
    return data


def load_config(
    source: str | os.PathLike | dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Build a :class:`Config` from a YAML path, a dict, or nothing (defaults), plus overrides.

    Args:
        source: a YAML file path, a mapping of sections, or ``None``.
        overrides: dotted ``section.key=value`` strings, applied after the file.
    """
    if source is None:
        data, where = {}, "<defaults>"
    elif isinstance(source, dict):
        data, where = source, "<dict>"
    else:
        where = str(source)
        data = load_yaml(Path(source))
    if overrides:
        data = apply_overrides(data, overrides)
        where = f"{where} (with command-line overrides)"
    data = _apply_train_type(dict(data), where)
    cfg = build(Config, data, where="", source=where)
    cfg.source = where
    return cfg
