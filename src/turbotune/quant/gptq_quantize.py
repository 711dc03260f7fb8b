"""``turbotune quantize gptq``: a model directory in, a GPTQ checkpoint directory out.

Design note. The pieces are elsewhere (calibration windows: ``gptq_calibration``; the
layer-by-layer algorithm: ``gptq_model``; the file layout: ``gptq_checkpoint``); this file
only strings them together with the run's choices, so the CLI stays argument parsing only.
The model is loaded on the CPU in fp32 (or fp16/bf16 when asked) and visits the accelerator
one decoder layer at a time; the tokenizer is saved beside the checkpoint so the directory is
directly trainable (``quantization.method: gptq``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from turbotune.quant.gptq import GPTQSpec

__all__ = ["quantize_checkpoint"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize_checkpoint(
    model_path: str,
    out: str | Path,
    spec: GPTQSpec,
    *,
    calibration: str | Path,
    samples: int = 128,
    seq_len: int = 2048,
    batch_size: int = 1,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    progress: bool = True,
) -> Path:
    """Quantize the causal LM at ``model_path`` with GPTQ and write the checkpoint to ``out``.

    Args:
        model_path: model directory or hub id.
        out: output directory (created).
        spec: bits, group size, symmetry, act-order, damping.
        calibration: text file (``.txt``, ``.json``, ``.jsonl``) the windows are cut from.
        samples: number of calibration windows.
        seq_len: tokens per window.
        batch_size: windows per forward pass.
        seed: where the windows start.
        device: where each layer is quantized (default: CUDA when available).
        dtype: dtype the model is loaded in (the Hessians are fp32 whatever it is).
        gguf_file: a GGUF file inside ``model_path`` to load the weights from.
        tokenizer: tokenizer directory, when it is not ``model_path``.
        progress: show the per-layer progress bar.

    Returns:
        ``out``.
    """
    from turbotune.config import ModelConfig
    from turbotune.modeling import load_causal_lm, load_tokenizer
    from turbotune.quant.gptq_calibration import calibration_batches
    from turbotune.quant.gptq_checkpoint import save_gptq
    from turbotune.quant.gptq_model import quantize_model

    model_cfg = ModelConfig(path=model_path, gguf_file=gguf_file, tokenizer=tokenizer)
    tok = load_tokenizer(model_cfg)
    batches = calibration_batches(
        tok, calibration, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed
    )
    model = load_causal_lm(model_cfg, DTYPES[dtype], device_map={"": "cpu"}).eval()
    result = quantize_model(model, batches, spec, device=device, progress=progress)
    out = Path(out)
    save_gptq(model, result, out)
    tok.save_pretrained(str(out))
    return out
