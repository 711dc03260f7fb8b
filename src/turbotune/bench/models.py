"""Benchmark models by name: real architectures' shapes, no weights.

A model spec is a table name, a local checkpoint directory, or a ``config.json`` path, with
optional config overrides after ``@``::

    llama-3.1-8b
    mixtral-8x7b@layers=4                  # fewer decoder layers (``layers`` = num_hidden_layers)
    qwen3-30b-a3b@layers=2,num_experts=16  # any config key
    /models/my-llama                       # its config.json only: weights stay random

The numbers below are copied from each model's published ``config.json`` (Hugging Face hub;
shapes cross-checked against public copies found with the project's code search). Only the
shape matters to throughput, so values such as token ids are left at their defaults. The bench
never reads a weight file: :mod:`turbotune.bench.build` initializes weights at random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from turbotune.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

#: name -> config.json keys (``model_type`` first). Sources in the comments.
MODEL_TABLE: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B config.json; the GPU notes' reference workload shape.
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": False,
    },
    # meta-llama/Llama-3.1-70B config.json.
    "llama-3.1-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": False,
    },
    # mistralai/Mistral-7B-v0.3 config.json (v0.3: 32768 vocab, no sliding window).
    "mistral-7b": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32768, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    },
    # mistralai/Mixtral-8x7B-v0.1 config.json: 8 experts, top-2.
    "mixtral-8x7b": {
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False,
    },
    # Qwen/Qwen3-30B-A3B config.json: 128 experts of 768, top-8, head_dim 128.
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": False,
    },
    # ibm-granite/granite-3.1-8b-instruct config.json (muP multipliers included).
    "granite-3.1-8b": {
        "model_type": "granite", "hidden_size": 4096, "intermediate_size": 12800,
        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 49155, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 10000000.0, "embedding_multiplier": 12.0,
        "attention_multiplier": 0.0078125, "residual_multiplier": 0.22, "logits_scaling": 16.0,
        "tie_word_embeddings": True,
    },
    # HuggingFaceTB/SmolLM2-135M-Instruct (numbers of ../shared/data/smollm2-135m-instruct/
    # hf-tokenizer-config/config.json).
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    },
    # Tiny models for CPU tests: the families above at toy sizes (llama3 RoPE kept).
    "llama-tiny": {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": False,
    },
    "mixtral-tiny": {
        "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 512,
        "max_position_embeddings": 2048, "sliding_window": None, "tie_word_embeddings": False,
    },
    "qwen3-moe-tiny": {
        "model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
        "vocab_size": 512, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
}  # fmt: skip

#: Short names accepted after ``@``.
_ALIASES = {"layers": "num_hidden_layers", "experts": "num_experts", "vocab": "vocab_size"}

#: Per-layer lists that a config derives from ``num_hidden_layers``; dropped when it changes.
_PER_LAYER_KEYS = ("layer_types", "max_window_layers")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: where the shape comes from, and the overrides."""

    source: str
    """A table name, a checkpoint directory, or a config.json path."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config keys set on top of the source (``num_hidden_layers``: 4, ...)."""

    @property
    def label(self) -> str:
        """The spec as written back (for tables and file names)."""
        if not self.overrides:
            return self.source
        inv = {v: k for k, v in _ALIASES.items()}
        extra = ",".join(f"{inv.get(k, k)}={v}" for k, v in self.overrides.items())
        return f"{self.source}@{extra}"


def parse_model_spec(spec: str) -> ModelSpec:
    """Split ``name@key=value,key=value`` into a :class:`ModelSpec` (values read as YAML).

    Raises:
        ConfigError: an override is not ``key=value``, or the source is unknown.
    """
    source, _, rest = spec.partition("@")
    source = source.strip()
    overrides: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"model spec '{spec}': expected key=value after '@', got '{item}'")
        overrides[_ALIASES.get(key.strip(), key.strip())] = _value(value)
    if source not in MODEL_TABLE and not Path(source).expanduser().exists():
        raise ConfigError(
            f"model '{source}' is neither a known name nor an existing path; known: "
            f"{', '.join(MODEL_TABLE)} (or a checkpoint directory / config.json path)"
        )
    return ModelSpec(source, overrides)


def _value(text: str) -> Any:
    """A YAML scalar; numbers YAML leaves as text (``1e4``) become floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _source_dict(source: str) -> dict[str, Any]:
    """The config.json keys of a table name, a checkpoint directory or a config.json file."""
    if source in MODEL_TABLE:
        return dict(MODEL_TABLE[source])
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"model '{source}': no config.json at {path}")
    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise ConfigError(f"model '{source}': {path} has no 'model_type'")
    return data


def model_config_dict(spec: ModelSpec | str) -> dict[str, Any]:
    """The config keys of a spec, overrides applied (no transformers import)."""
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    data = _source_dict(spec.source)
    if "num_hidden_layers" in spec.overrides:
        for key in _PER_LAYER_KEYS:
            data.pop(key, None)
    data.update(spec.overrides)
    return data


def resolve_model_config(spec: ModelSpec | str) -> PretrainedConfig:
    """The transformers config of a spec (``AutoConfig.for_model``), ready for ``from_config``."""
    from transformers import AutoConfig

    data = model_config_dict(spec)
    for key in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        data.pop(key, None)
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ConfigError(
            f"model '{spec}': transformers cannot build '{model_type}': {err}"
        ) from None
