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
    """The base model as training saw it: quantized then dequantized when it was quantized.

    Args:
        base: model id or directory.
        dtype: dtype of the returned weights.
        quantization: the ``quantization`` section the adapter was trained with (empty: none).
    """
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
    if method == "gptq":
        from turbotune.quant.gptq_checkpoint import dequantize_gptq_model, load_gptq_model

        return dequantize_gptq_model(load_gptq_model(base, dtype=dtype), dtype)
    if method == "hqq":
        return _hqq_round_trip(base, dtype, quantization)
    raise TurbotuneError(f"merging adapters trained on a '{method}' base is not supported yet")


def _hqq_round_trip(base: str, dtype: torch.dtype, quantization: dict[str, Any]):
    """The dense base with every weight HQQ training quantized replaced by its round trip."""
    from turbotune.adapters.llama_pro import new_block_modules
    from turbotune.config import ModelConfig
    from turbotune.modeling import load_causal_lm
    from turbotune.quant.bnb import DTYPES
    from turbotune.quant.hqq_linear import round_trip_linears

    compute = DTYPES[quantization.get("compute_dtype", "bfloat16")]
    model = load_causal_lm(ModelConfig(path=base), compute)
    skip = [*quantization.get("skip_modules", ["lm_head"]), "lm_head", *new_block_modules(base)]
    round_trip_linears(
        model,
        bits=int(quantization.get("bits", 4)),
        group_size=int(quantization.get("group_size", 64)),
        skip_modules=list(dict.fromkeys(skip)),
    )
    return model.to(dtype)


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
    model_path: str,
    prompt: str,
    *,
    adapter: str | None = None,
    max_new_tokens: int = 64,
    device: str | None = None,
) -> str:
    """Greedy completion of ``prompt`` by a model, with an optional adapter on top.

    Args:
        model_path: model id or directory (the adapter's base when ``adapter`` is given).
        prompt: the text to complete.
        adapter: a PEFT adapter directory; its base is loaded as its training run saw it
            (quantized then dequantized when the run quantized it).
        max_new_tokens: tokens to generate at most.
        device: ``cuda``, ``mps`` or ``cpu``; default: the best available (bf16 weights on an
            accelerator that supports them, else fp32).
    """
    from transformers import AutoTokenizer

    device, dtype = _generation_device(device)
    quantization = _run_quantization(Path(adapter)) if adapter else {}
    model = load_base_for_merge(model_path, dtype, quantization)
    has_tokenizer = adapter and (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else model_path)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(device).eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _generation_device(device: str | None) -> tuple[str, torch.dtype]:
    from turbotune.backends import choose_backend
    from turbotune.precision import bf16_supported

    if device is None:
        backend, _ = choose_backend("auto")
        device = backend if backend in ("cuda", "mps") else "cpu"
    return device, torch.bfloat16 if bf16_supported(device) else torch.float32
