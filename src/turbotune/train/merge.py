"""``turbotune merge`` and ``turbotune generate``: use what a run produced.

Merging folds ``B @ A * scaling`` into the base weights and saves a plain Hugging Face model
directory. When the adapter was trained on a quantized base (its ``turbotune.yaml`` says so),
the base is loaded quantized the same way and dequantized first: the adapter learned to correct
*those* weights, not the original ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from turbotune.errors import TurbotuneError
from turbotune.train.checkpoint import atomic_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _adapter_base(adapter_dir: Path, base: str | None) -> str:
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise TurbotuneError(
            f"'{adapter_dir}' is not an adapter directory (no adapter_config.json)"
        )
    base = base or json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise TurbotuneError(
            f"the adapter in '{adapter_dir}' does not name its base model: pass --base"
        )
    return base


def _run_quantization(adapter_dir: Path) -> dict[str, Any]:
    saved = adapter_dir / "turbotune.yaml"
    if not saved.is_file():
        return {}
    return (yaml.safe_load(saved.read_text()) or {}).get("quantization") or {}


def load_base_for_merge(base: str, dtype: torch.dtype, quantization: dict[str, Any]):
    """The base model as training saw it: quantized then dequantized when it was quantized."""
    from turbotune.config import ModelConfig
    from turbotune.modeling import load_causal_lm

    method = quantization.get("method", "none")
    if method == "none":
        return load_causal_lm(ModelConfig(path=base), dtype)
    if method in ("nf4", "fp4"):
        from turbotune.quant.bnb import bnb_config

        model = load_causal_lm(
            ModelConfig(path=base), dtype, quantization_config=bnb_config(quantization)
        )
        return model.dequantize().to(dtype)
    raise TurbotuneError(f"merging adapters trained on a '{method}' base is not supported yet")


def merge_adapter(
    adapter: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "bfloat16"
) -> Path:
    """Merge a PEFT LoRA adapter into its base and save the result (weights as safetensors)."""
    from peft import PeftModel

    adapter_dir = Path(adapter)
    base_path = _adapter_base(adapter_dir, base)
    model = load_base_for_merge(base_path, DTYPES[dtype], _run_quantization(adapter_dir))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out = Path(out)
    with atomic_directory(out) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer_files = list(adapter_dir.glob("tokenizer*")) + list(
            adapter_dir.glob("special_tokens_map.json")
        )
        if tokenizer_files:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(tmp))
    return out


@torch.no_grad()
def generate(
    model_path: str, prompt: str, *, adapter: str | None = None, max_new_tokens: int = 64
) -> str:
    """Greedy completion of ``prompt`` by a model, with an optional adapter on top."""
    from transformers import AutoTokenizer

    from turbotune.config import ModelConfig
    from turbotune.modeling import load_causal_lm

    model = load_causal_lm(ModelConfig(path=model_path), torch.float32)
    tok_source = (
        adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_path
    )
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
