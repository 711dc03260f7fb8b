"""``turbotune expand``: Llama-Pro block expansion of a Hugging Face checkpoint.

Design note (Wu et al., "LLaMA Pro: Progressive LLaMA with Block Expansion", 2024). The ``N``
decoder blocks are split into ``P`` groups as evenly as possible, and after the last block of
each group an *identity copy* of that block is inserted: the same weights, except the two
output projections (``self_attn.o_proj`` and ``mlp.down_proj``, with their biases) are zero. A
pre-norm block computes ``h + attn(norm(h))`` then ``h + mlp(norm(h))``; with both outputs zero
it is the identity, so the expanded model computes exactly what the original did. Training then
updates only the new blocks (``adapter.method: llama_pro``), which keeps the old knowledge.

The checkpoint is rewritten *shard by shard*: each output shard is built from one input shard
(a block and its copy live in the same shard when the block did), so at most one shard's tensors
are in memory. ``config.json`` gets the new ``num_hidden_layers``, every per-layer list of the
config (``layer_types``, ...) extended by the same copies, and a ``turbotune.llama_pro`` record
of which layers are new; tokenizer and generation files are copied unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbotune.errors import ConfigError

__all__ = [
    "CONFIG_KEY",
    "ExpansionPlan",
    "expand_checkpoint",
    "new_layers_of",
    "plan_expansion",
]

CONFIG_KEY = "turbotune"
"""Key of ``config.json`` under which the expansion is recorded (``{"llama_pro": {...}}``)."""

ZEROED = ("self_attn.o_proj.", "mlp.down_proj.")
"""Parameter-name prefixes, inside a block, of the output projections a new block zeroes."""

_LAYER_KEY = re.compile(r"^((?:.*\.)?layers)\.(\d+)\.(.+)$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class ExpansionPlan:
    """Where each block of the expanded model comes from.

    Attributes:
        sources: ``sources[j]`` is the original index block ``j`` copies.
        new: indices ``j`` of the inserted identity blocks (sorted).
    """

    sources: tuple[int, ...]
    new: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.sources)


def plan_expansion(
    num_layers: int, new_blocks: int | None = None, expansion_rate: float | None = None
) -> ExpansionPlan:
    """Spread ``new_blocks`` identity copies evenly over ``num_layers`` blocks.

    Args:
        num_layers: blocks of the original model (``N``).
        new_blocks: blocks to add (``P``, 1..N); or give ``expansion_rate``.
        expansion_rate: ``P / N`` (LLaMA Pro 8B from a 32-layer 7B: 0.25); rounded, at least 1.

    Returns:
        The plan; the copy of group ``k`` follows original block ``ceil((k+1) N / P) - 1``.
    """
    if (new_blocks is None) == (expansion_rate is None):
        raise ConfigError("give exactly one of new_blocks and expansion_rate")
    if new_blocks is None:
        if expansion_rate <= 0:
            raise ConfigError(f"expansion_rate must be positive, got {expansion_rate}")
        new_blocks = max(1, round(num_layers * expansion_rate))
    if not 1 <= new_blocks <= num_layers:
        raise ConfigError(f"new_blocks must be in [1, {num_layers}], got {new_blocks}")
    after = {-(-(k + 1) * num_layers // new_blocks) - 1 for k in range(new_blocks)}
    sources, new = [], []
    for i in range(num_layers):
        sources.append(i)
        if i in after:
            new.append(len(sources))
            sources.append(i)
    return ExpansionPlan(tuple(sources), tuple(new))


def new_layers_of(config: Any) -> list[int]:
    """Indices of the blocks ``turbotune expand`` added, from a transformers config or the
    ``config.json`` dict of an expanded checkpoint; ``[]`` for any other model."""
    record = (
        config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    )
    record = (record or {}).get("llama_pro") or {}
    return [int(i) for i in record.get("new_layers", [])]


# --- the checkpoint -----------------------------------------------------------------------------


def _expanded_config(config: dict[str, Any], plan: ExpansionPlan, source: str) -> dict[str, Any]:
    n = config["num_hidden_layers"]
    out = dict(config)
    for key, value in config.items():  # per-layer lists (layer_types, ...) follow the blocks
        if isinstance(value, list) and len(value) == n and key != "architectures":
            out[key] = [value[i] for i in plan.sources]
    out["num_hidden_layers"] = plan.num_layers
    _check_not_expanded(config, source)
    out[CONFIG_KEY] = {
        **(config.get(CONFIG_KEY) or {}),
        "llama_pro": {"new_layers": list(plan.new), "original_layers": n, "source": source},
    }
    return out


def _check_not_expanded(config: dict[str, Any], source: str) -> None:
    previous = new_layers_of(config)
    if previous:
        raise ConfigError(
            f"{source} is already expanded (new layers {previous}); expand the original"
        )


def _shards(model_dir: Path) -> tuple[list[str], bool]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values())), True
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"], False
    raise ConfigError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def _expand_shard(tensors: dict[str, Any], plan: ExpansionPlan) -> dict[str, Any]:
    """The tensors of one shard renamed (and copied, zeroed) for the expanded block list."""
    import torch

    targets: dict[int, list[int]] = {}
    for j, i in enumerate(plan.sources):
        targets.setdefault(i, []).append(j)
    new = set(plan.new)
    out = {}
    for key, tensor in tensors.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            out[key] = tensor
            continue
        prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
        for j in targets[index]:
            copy = tensor
            if j in new:
                copy = torch.zeros_like(tensor) if rest.startswith(ZEROED) else tensor.clone()
            out[f"{prefix}.{j}.{rest}"] = copy
    return out


def expand_checkpoint(
    model: str | Path,
    out_dir: str | Path,
    *,
    new_blocks: int | None = None,
    expansion_rate: float | None = None,
    progress: bool = True,
) -> ExpansionPlan:
    """Write a Llama-Pro expanded copy of a safetensors checkpoint to ``out_dir``.

    Args:
        model: a local checkpoint directory or a Hugging Face model id (downloaded).
        out_dir: the new checkpoint's directory (created; must not hold a checkpoint).
        new_blocks: identity blocks to insert; or ``expansion_rate`` (see :func:`plan_expansion`).
        progress: show a progress bar over the shards.

    Returns:
        The plan that was applied.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    src = _local_dir(model)
    out = Path(out_dir)
    if any((out / f).exists() for f in _WEIGHT_FILES):
        raise ConfigError(f"{out} already holds a checkpoint; choose another --out")
    config = json.loads((src / "config.json").read_text())
    _check_not_expanded(config, str(model))
    plan = plan_expansion(config["num_hidden_layers"], new_blocks, expansion_rate)
    shards, indexed = _shards(src)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in tqdm(shards, desc="expanding", unit="shard", disable=not progress):
        tensors = _expand_shard(load_file(str(src / shard)), plan)
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if indexed:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    expanded = _expanded_config(config, plan, str(model))
    (out / "config.json").write_text(json.dumps(expanded, indent=2, sort_keys=True) + "\n")
    for path in src.iterdir():  # tokenizer, generation config, ...
        if path.is_file() and path.name != "config.json" and not _is_weights(path.name):
            shutil.copy2(path, out / path.name)
    return plan


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth")) or name in _WEIGHT_FILES


def _local_dir(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            str(model), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]
        )
    )
