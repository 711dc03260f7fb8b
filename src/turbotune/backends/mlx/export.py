"""MLX LoRA adapters to the PEFT format, and in mlx-lm's own format.

PEFT format (what ``PeftModel.from_pretrained`` loads): ``adapter_config.json`` written by
``peft.LoraConfig.save_pretrained`` and ``adapter_model.safetensors`` with the keys
``base_model.model.<path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r). MLX keeps
``lora_a`` (in, r) and ``lora_b`` (r, out): the transposes. mlx-lm's ``scale`` is
``alpha / r``, so ``lora_alpha = scale * r``.

mlx-lm format (what ``mlx_lm.load(base, adapter_path=...)`` and ``mlx_lm.generate`` load):
``adapters.safetensors`` with ``<path>.lora_a`` / ``.lora_b`` and an ``adapter_config.json``
with ``fine_tune_type``, ``num_layers`` and ``lora_parameters``. :func:`convert_mlx_adapter`
turns such a directory (written by turbotune or by ``mlx_lm.lora``) into the PEFT format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from turbotune.errors import TurbotuneError

__all__ = [
    "MLX_ADAPTER_FILE",
    "PEFT_WEIGHTS_FILE",
    "convert_mlx_adapter",
    "peft_target_modules",
    "save_mlx_adapter",
    "save_peft_adapter",
]

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
MLX_ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


def peft_target_modules(adapted: list[str], candidates: list[str] | None = None) -> list[str]:
    """peft ``target_modules`` that select exactly the adapted layers.

    Short names (``q_proj``) when they select exactly ``adapted`` among ``candidates`` (every
    linear of the model); otherwise the full paths, which peft matches as whole names.
    """
    short = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    if candidates is not None:
        selected = {p for p in candidates if p.rsplit(".", 1)[-1] in short}
        if selected == set(adapted):
            return short
    return sorted(adapted)


def save_peft_adapter(
    out: str | Path,
    lora: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    r: int,
    alpha: float,
    dropout: float,
    base_model: str | None,
    target_modules: list[str],
    use_rslora: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter directory from MLX's matrices.

    Args:
        out: the directory (created).
        lora: by layer path, ``(lora_a (in, r), lora_b (r, out))`` as MLX holds them.
        r: rank.
        alpha: peft's ``lora_alpha`` (the update is scaled by ``alpha / r``, or
            ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: LoRA dropout.
        base_model: ``base_model_name_or_path`` written into the config.
        target_modules: peft's ``target_modules`` (see :func:`peft_target_modules`).
        use_rslora: rank-stabilized scaling.
    """
    from peft import LoraConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for path, (a, b) in lora.items():
        if a.shape[1] != r or b.shape[0] != r:
            raise TurbotuneError(f"{path}: LoRA shapes {a.shape} / {b.shape} are not of rank {r}")
        tensors[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(a.T, np.float32)
        tensors[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        use_rslora=use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(out))
    save_file(tensors, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def save_mlx_adapter(
    out: str | Path,
    lora: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    r: int,
    scale: float,
    dropout: float,
    num_layers: int,
    base_model: str | None,
) -> Path:
    """Write the adapter in mlx-lm's format (loads with ``mlx_lm.load(..., adapter_path=)``).

    ``keys`` holds the layer-relative names (``self_attn.q_proj``) mlx-lm wraps in each of the
    last ``num_layers`` blocks, so that mlx-lm rebuilds the same LoRA layers before loading.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    keys = set()
    for path, (a, b) in lora.items():
        tensors[f"{path}.lora_a"] = np.ascontiguousarray(a, np.float32)
        tensors[f"{path}.lora_b"] = np.ascontiguousarray(b, np.float32)
        parts = path.split(".")
        if "layers" in parts:  # path relative to its block: model.layers.3.mlp.up -> mlp.up
            keys.add(".".join(parts[parts.index("layers") + 2 :]))
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": r, "scale": scale, "dropout": dropout, "keys": sorted(keys)},
        "model": base_model,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / MLX_ADAPTER_FILE), metadata={"format": "mlx"})
    return out


def _read_mlx_adapter(src: Path) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, ...]]]:
    config_path, weights_path = src / CONFIG_FILE, src / MLX_ADAPTER_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise TurbotuneError(
            f"{src} is not an mlx-lm adapter directory (needs {CONFIG_FILE} and {MLX_ADAPTER_FILE})"
        )
    config = json.loads(config_path.read_text())
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise TurbotuneError(f"{src}: fine_tune_type '{kind}' cannot be converted (LoRA only)")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, value in load_file(str(weights_path)).items():
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise TurbotuneError(f"{src}: tensor '{name}' is not a LoRA matrix (lora_a/lora_b)")
        pairs.setdefault(path, {})[leaf] = value
    lora = {}
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"lora_a", "lora_b"} or pair["lora_a"].ndim != 2:
            raise TurbotuneError(f"{src}: {path} is not a linear LoRA pair (embedding or MoE "
                                 "LoRA cannot be converted)")  # fmt: skip
        lora[path] = (pair["lora_a"], pair["lora_b"])
    return config, lora


def convert_mlx_adapter(src: str | Path, out: str | Path, *, base_model: str | None = None) -> Path:
    """Convert an mlx-lm LoRA adapter directory into a PEFT adapter directory.

    Args:
        src: directory with mlx-lm's ``adapter_config.json`` and ``adapters.safetensors``.
        out: the PEFT adapter directory to write.
        base_model: the base checkpoint the adapter was trained on; default: the ``model``
            named in the mlx-lm config.

    Returns:
        ``out``; ``PeftModel.from_pretrained(base, out)`` then computes what MLX computed.
    """
    src = Path(src)
    config, lora = _read_mlx_adapter(src)
    params = config.get("lora_parameters") or {}
    if not lora:
        raise TurbotuneError(f"{src}: the adapter holds no LoRA matrices")
    r = int(next(iter(lora.values()))[0].shape[1])
    scale = float(params.get("scale", 20.0))  # mlx-lm's default scale
    return save_peft_adapter(
        out,
        lora,
        r=r,
        alpha=scale * r,
        dropout=float(params.get("dropout", 0.0)),
        base_model=base_model or config.get("model"),
        target_modules=peft_target_modules(list(lora)),
    )
