"""Loading models and tokenizers from the hub or local directories, with errors that help.

safetensors over pickle, ``trust_remote_code`` only when the config says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from turbotune.errors import TurbotuneError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from turbotune.config import ModelConfig


def _check_path(path: str) -> None:
    """A path that cannot be a hub id ("org/name") must exist locally."""
    if Path(path).expanduser().exists():
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise TurbotuneError(
            f"model directory '{path}' does not exist; pass a local checkpoint directory or a hub id"
        )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer, with a pad token (the EOS token when the tokenizer has none)."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.path
    if source is None:
        raise TurbotuneError("model.path (or model.tokenizer) is needed to load a tokenizer")
    _check_path(source)
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise TurbotuneError(f"could not load a tokenizer from '{source}': {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the run's settings (safetensors preferred).

    Args:
        cfg: the model section.
        dtype: dtype of the non-quantized weights.
        **kwargs: passed through (``quantization_config``, ``device_map``, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.path is None:
        raise TurbotuneError(
            "model.path is empty: name a hub model id or a local checkpoint directory"
        )
    _check_path(cfg.path)
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        common["gguf_file"] = cfg.gguf_file
    try:
        config = AutoConfig.from_pretrained(cfg.path, **common)
    except (OSError, ValueError) as err:
        raise TurbotuneError(f"could not read the model config of '{cfg.path}': {err}") from None
    try:
        return AutoModelForCausalLM.from_pretrained(
            cfg.path,
            config=config,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            use_safetensors=None if cfg.gguf_file else _has_safetensors(cfg.path),
            **common,
            **kwargs,
        )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise TurbotuneError(
                f"model type '{config.model_type}' of '{cfg.path}' is not a causal language model "
                "that transformers can load with AutoModelForCausalLM"
            ) from None
        raise


def _has_safetensors(path: str) -> bool | None:
    p = Path(path)
    if not p.is_dir():
        return None  # a hub id: let transformers pick, preferring safetensors
    return any(p.glob("*.safetensors")) or None
