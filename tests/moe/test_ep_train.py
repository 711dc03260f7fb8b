"""``turbotune train`` with ``plugins.expert_parallel`` on two processes (torchrun, gloo): a tiny
Qwen3-MoE with LoRA on attention (fp32, and QLoRA with NF4 expert shards), its experts split
between the processes and the rest under FSDP2, logs the same losses and gradient norms step for step as one process without expert
parallelism (same global batch). The router's auxiliary loss is off: it is not additive over
the global batch (fraction of assignments times mean probability), so per-process values would
differ from the one-process value by construction.

Slow (~30 s: torchrun imports torch and transformers in every process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.distributed.test_fsdp_multiprocess import (
    _assert_same_steps,
    _finish,
    _reference,
    _sharded,
    _start,
)
from tests.moe.tiny import tiny_model

pytestmark = pytest.mark.slow


def _config(model: Path, tokenizer: Path, data: Path, out: Path) -> dict:
    return {
        "model": {"path": str(model), "tokenizer": str(tokenizer)},
        "data": {"path": str(data), "max_length": 64, "max_samples": 32},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {
            "precision": "fp32", "max_steps": 3, "per_device_train_batch_size": 4,
            "learning_rate": 3e-3, "logging_steps": 1, "output_dir": str(out),
            "report_to": [], "lr_scheduler": "constant", "save_total_limit": None,
        },
        "plugins": {"fused_ops": {"moe_backend": "loop"}},
        "backend": "cpu",
    }  # fmt: skip


def _expert_parallel(cfg: dict, out: Path) -> dict:
    ep = _sharded(cfg, low_memory_loading=False)
    ep["plugins"]["expert_parallel"] = {"backend": "loop"}
    ep["train"]["output_dir"] = str(out)
    return ep


def test_expert_parallel_training_equals_one_process(
    stories260k, alpaca_tiny, tmp_path, monkeypatch
):
    """peft LoRA on the fp32 base, and QLoRA (turbotune's LoRA on NF4 attention, each rank's
    expert shards stored in NF4) against one process (bitsandbytes 4-bit attention, NF4 stacks)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the in-process reference: eager kernels
    model = tiny_model("qwen3_moe")
    model.resize_token_embeddings(512)  # the stories260K tokenizer's vocabulary
    model.config.output_router_logits = False
    model.save_pretrained(tmp_path / "moe")
    lora = _config(tmp_path / "moe", stories260k, alpaca_tiny, tmp_path / "one")
    qlora = json.loads(json.dumps(lora))
    qlora["adapter"]["implementation"] = "custom"
    qlora["quantization"] = {"method": "nf4", "double_quant": False, "compute_dtype": "float32"}
    qlora["train"]["output_dir"] = str(tmp_path / "one-q")
    runs = [_expert_parallel(lora, tmp_path / "ep"), _expert_parallel(qlora, tmp_path / "ep-q")]
    proc, out = _start(tmp_path, "ep", runs, nproc=2)
    try:
        refs = [_reference(json.loads(json.dumps(cfg))) for cfg in (lora, qlora)]
    finally:
        got = _finish(proc, out)
    assert [g["world"] for g in got] == [2, 2] and {g["trainer"] for g in got} == {"FsdpTrainer"}
    for g, ref in zip(got, refs, strict=True):
        _assert_same_steps(g, ref, rel=1e-5)
    assert (tmp_path / "ep-q" / "final" / "adapter_model.safetensors").is_file()
