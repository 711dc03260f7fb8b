"""Which parts of a config each backend can run: clear errors up front, notes for the rest.

A run calls :func:`check_backend_support` right after choosing its backend and before loading
anything, so a combination that cannot work fails in a second with a message that names the
setting, the reason and what to use instead. Settings that work but differ from CUDA (eager
ops instead of Triton kernels, an MLX 4-bit format instead of NF4) come back as notes that the
run prints.

The PyTorch engine (``cuda``, ``mps``, ``cpu``) runs every op through
:func:`turbotune.ops._triton.use_triton`, which picks the Triton kernel only for CUDA tensors
(or under ``TRITON_INTERPRET=1``); on ``cpu`` and ``mps`` the eager references of
``ops/reference.py`` run. The MLX engine (:mod:`turbotune.backends.mlx`) is separate: LoRA on
an optional 4-bit MLX base, no plugins.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import TYPE_CHECKING

from turbotune.errors import ConfigError

if TYPE_CHECKING:
    from turbotune.config import Config

__all__ = ["MLX_QUANT_MODES", "check_backend_support", "mlx_quantization"]

#: How each turbotune ``quantization.method`` maps onto MLX's quantization modes.
MLX_QUANT_MODES = {"nf4": "affine", "hqq": "affine", "fp4": "mxfp4"}

_MLX_OPTIMIZERS = (None, "adamw", "adamw_torch", "adamw_torch_fused", "adamw_hf")


def check_backend_support(cfg: Config, backend: str) -> list[str]:
    """Refuse a config the backend cannot run; the notes about what changes on it.

    Args:
        cfg: the whole run config.
        backend: the chosen backend (``cuda``, ``mps``, ``cpu`` or ``mlx``).

    Returns:
        Lines to print (may be empty).

    Raises:
        ConfigError: the first setting the backend cannot run, with what to do instead.
    """
    if backend == "mlx":
        return _check_mlx(cfg)
    notes: list[str] = []
    if cfg.quantization.method in ("nf4", "fp4"):
        notes += _check_bnb(cfg, backend)
    if "fused_ops" in cfg.plugins and backend != "cuda":
        how = (
            "the Triton interpreter runs the kernels (TRITON_INTERPRET=1: slow, for tests)"
            if backend == "cpu" and _interpreting()
            else "the eager reference ops run instead (same numbers, no speedup)"
        )
        notes.append(f"fused_ops on {backend}: no Triton kernels here; {how}")
    return notes


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _hqq_hint() -> str:
    # The HQQ plugin is optional (and newer than this check): offer it only where it exists.
    if importlib.util.find_spec("turbotune.plugins.hqq") is not None:
        return ", quantization.method=hqq (no bitsandbytes needed)"
    return ""


def _check_bnb(cfg: Config, backend: str) -> list[str]:
    """4-bit through bitsandbytes: installed, and built with support for this device."""
    method = cfg.quantization.method
    alternatives = f"use backend=mlx (4-bit MLX){_hqq_hint()}, or quantization.method=none"
    if not _bnb_installed():
        raise ConfigError(
            f"quantization.method={method} needs bitsandbytes, which is not installed: "
            f"pip install 'turbotune[bnb]'; or {alternatives}"
        )
    if backend == "cuda":
        return []
    devices = _bnb_devices()
    if backend not in devices:
        version = importlib.metadata.version("bitsandbytes")
        raise ConfigError(
            f"bitsandbytes {version} has no {method} 4-bit support on {backend} (it supports: "
            f"{', '.join(sorted(devices)) or 'cuda'}); upgrade bitsandbytes, or {alternatives}"
        )
    return [f"{method} on {backend}: bitsandbytes' PyTorch 4-bit ops (correct, slower than CUDA)"]


def _bnb_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _bnb_devices() -> set[str]:
    """Devices whose 4-bit ops the installed bitsandbytes implements (multi-backend builds)."""
    try:
        import bitsandbytes
    except Exception:  # a broken build counts as no support anywhere but CUDA
        return {"cuda"}
    return set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))


def mlx_quantization(cfg: Config) -> tuple[str, int, int] | None:
    """``(mode, bits, group_size)`` of MLX quantization for the config, ``None`` for none.

    NF4 and HQQ have no MLX kernels: both become MLX's affine group quantization at
    ``quantization.bits`` (4 for nf4) and ``quantization.group_size``; FP4 becomes ``mxfp4``
    (groups of 32, as that format fixes).
    """
    q = cfg.quantization
    if q.method == "none":
        return None
    mode = MLX_QUANT_MODES[q.method]
    if mode == "mxfp4":
        return mode, 4, 32
    bits = 4 if q.method == "nf4" else q.bits
    if q.group_size not in (32, 64, 128):
        raise ConfigError(
            f"quantization.group_size={q.group_size}: MLX quantizes in groups of 32, 64 or 128"
        )
    return mode, bits, q.group_size


def _check_mlx(cfg: Config) -> list[str]:
    """The MLX engine trains LoRA (optionally on a 4-bit base) of a local or hub checkpoint."""
    other = "use backend=cpu/mps/cuda (the PyTorch engine) for it"
    if cfg.model.path is None:
        raise ConfigError("the built-in demo runs on the PyTorch engine; with backend=mlx set "
                          "model.path to a Hugging Face checkpoint directory")  # fmt: skip
    if cfg.model.gguf_file:
        raise ConfigError(f"model.gguf_file is not supported by the MLX backend; {other}")
    if cfg.plugins:
        raise ConfigError(
            f"plugins {sorted(cfg.plugins)} patch PyTorch models and cannot run with backend=mlx "
            "(MLX has its own kernels); remove the plugins section or use another backend"
        )
    if cfg.adapter.method != "lora":
        raise ConfigError(
            f"adapter.method={cfg.adapter.method} is not supported by the MLX backend (LoRA "
            f"only); {other}"
        )
    if cfg.adapter.modules_to_save:
        raise ConfigError(f"adapter.modules_to_save is not supported by the MLX backend; {other}")
    if cfg.quantization.method == "gptq":
        raise ConfigError(
            "quantization.method=gptq: GPTQ checkpoints have no MLX kernels; use nf4 (MLX "
            f"4-bit affine) with backend=mlx, or {other}"
        )
    if cfg.train.resume_from_checkpoint:
        raise ConfigError(f"train.resume_from_checkpoint is not supported by the MLX backend; {other}")  # fmt: skip
    if cfg.train.optimizer not in _MLX_OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={cfg.train.optimizer}: the MLX backend trains with AdamW only "
            "(mlx.optimizers.AdamW); remove train.optimizer"
        )
    return _mlx_notes(cfg)


def _mlx_notes(cfg: Config) -> list[str]:
    notes = []
    quant = mlx_quantization(cfg)
    if quant is not None:
        mode, bits, group = quant
        notes.append(
            f"quantization.method={cfg.quantization.method} on MLX: {bits}-bit {mode} "
            f"quantization in groups of {group} (mlx.nn.quantize; not bitsandbytes' format)"
        )
    if cfg.train.gradient_checkpointing:
        notes.append("train.gradient_checkpointing is ignored by the MLX backend")
    if cfg.train.save_steps:
        notes.append("train.save_steps: the MLX backend saves the adapter at the end only")
    if cfg.train.hf_args:
        notes.append(
            f"train keys {sorted(cfg.train.hf_args)} are Trainer arguments: ignored by MLX"
        )
    extra = [r for r in cfg.train.report_to if r not in ("stdout", "none")]
    if extra:
        notes.append(f"train.report_to {extra}: MLX runs log to stdout and metrics.jsonl only")
    return notes
