"""Two processes (gloo, CPU) under torchrun, through ``turbotune train`` itself: FSDP2 losses equal
the single-process losses step for step, and a sharded checkpoint resumes on 2 and on 1 process.

Each torchrun run costs ~20-40 s on 2 shared cores (mostly importing torch and transformers in
every process), so these are ``slow``; several configs share one torchrun (the worker runs them
in turn), and the single-process references run in this process while torchrun works.

Tolerance: the sharded runs do the same fp32 operations as the single-process ones, except that
the reduction over the global batch is split between two processes (reduce-scatter of each
half's gradient), which reorders fp32 sums: measured differences are ~1e-7 on losses, ~1e-6 on
gradient norms; the test allows 1e-5 relative. With the fused Triton kernels the reference is
unfused, so the kernels' own fp32 rounding adds up to ~3e-6; the allowance is 1e-4 there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _config(model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    """A short LoRA run on the real stories260K Llama, fp32 on the CPU, global batch 4."""
    cfg = {
        "model": {"path": str(model)},
        "data": {"path": str(data), "max_length": 64, "max_samples": 32},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "train": {
            "precision": "fp32", "max_steps": 4, "per_device_train_batch_size": 4,
            "learning_rate": 3e-3, "logging_steps": 1, "output_dir": str(out),
            "report_to": [], "lr_scheduler": "constant", "save_total_limit": None,
        },
        "backend": "cpu",
    }  # fmt: skip
    for section, keys in extra.items():
        cfg.setdefault(section, {}).update(keys)
    return cfg


def _sharded(cfg: dict[str, Any], **distributed: Any) -> dict[str, Any]:
    """The same run on 2 processes: half the per-process batch, FSDP on."""
    cfg = json.loads(json.dumps(cfg))
    cfg["train"]["per_device_train_batch_size"] //= 2
    cfg["distributed"] = {"enabled": True, **distributed}
    return cfg


def _env() -> dict[str, str]:
    # Kernels take their eager fallbacks: interpreted Triton costs minutes per step here, and the
    # kernels are checked against their references elsewhere. What runs sharded is the patched
    # model (its replaced forwards and autograd functions), which is what FSDP could break.
    keys = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    return {**os.environ, **keys, "TRITON_INTERPRET": "0"}


def _start(tmp: Path, name: str, configs: list[dict[str, Any]], nproc: int) -> tuple[Any, Path]:
    """Start the worker on ``configs`` (torchrun when ``nproc > 1``); returns (process, output)."""
    paths = []
    for i, cfg in enumerate(configs):
        path = tmp / f"{name}-{i}.json"
        path.write_text(json.dumps(cfg))
        paths.append(str(path))
    out = tmp / f"{name}-out.json"
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.Popen(
        [*launcher, str(WORKER), str(out), *paths], env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return proc, out


def _finish(proc: Any, out: Path, timeout: float = 1500) -> list[dict[str, Any]]:
    log, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{log[-4000:]}"
    return json.loads(out.read_text())


def _reference(cfg: dict[str, Any]) -> dict[str, Any]:
    from turbotune.train.run import run_training

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_training(cfg)
    finally:
        torch.set_num_threads(before)
    logs = result.trainer.state.log_history
    return {
        "losses": {str(int(h["step"])): h["loss"] for h in logs if "loss" in h},
        "grad_norms": {str(int(h["step"])): h["grad_norm"] for h in logs if "grad_norm" in h},
    }


def _assert_same_steps(got: dict, ref: dict, rel: float, steps: list[str] | None = None) -> None:
    steps = steps or sorted(ref["losses"], key=int)
    for key in ("losses", "grad_norms"):
        a = [got[key][s] for s in steps]
        b = [ref[key][s] for s in steps]
        diff = max(abs(x - y) for x, y in zip(a, b))
        assert a == pytest.approx(b, rel=rel), f"{key} differ by up to {diff:.3g}: {a} vs {b}"


def test_two_processes_equal_one(stories260k, alpaca_tiny, tmp_path):
    """peft LoRA on the fp32 base (full_shard, no_shard), and LoRA on the 4-bit base loaded
    tensor by tensor into NF4 storage (with the fused kernels, per-block checkpointing and
    offload, hybrid_shard; and with the base replicated outside FSDP2 in one FSDP2 group), and
    peft LoRA with padding-free batches, against one process
    (bitsandbytes 4-bit for the 4-bit runs)."""
    lora = _config(stories260k, alpaca_tiny, tmp_path / "lora")
    qlora = _config(
        stories260k, alpaca_tiny, tmp_path / "qlora",
        adapter={"implementation": "custom"},
        quantization={"method": "nf4", "double_quant": False, "compute_dtype": "float32"},
    )  # fmt: skip
    fused = json.loads(json.dumps(qlora))
    fused["plugins"] = {"fused_ops": {}}
    packed = json.loads(json.dumps(lora))
    packed["plugins"] = {"padding_free": {}}
    runs = [
        _sharded(lora, low_memory_loading=False),
        _sharded(lora, low_memory_loading=False, strategy="no_shard"),
        _sharded(qlora),
        _sharded(
            fused, strategy="hybrid_shard", activation_checkpointing=True, activation_offload=True
        ),
        _sharded(packed, low_memory_loading=False),
        _sharded(fused, frozen="replicate", groups="model"),  # the 4-bit base outside FSDP2
    ]
    for i, cfg in enumerate(runs):
        cfg["train"]["output_dir"] += f"-fsdp{i}"
    proc, out = _start(tmp_path, "parity", runs, nproc=2)
    try:
        ref_lora, ref_qlora, ref_packed = _reference(lora), _reference(qlora), _reference(packed)
    finally:
        got = _finish(proc, out)
    assert [g["world"] for g in got] == [2] * 6 and {g["trainer"] for g in got} == {"FsdpTrainer"}
    _assert_same_steps(got[0], ref_lora, rel=1e-5)
    _assert_same_steps(got[1], ref_lora, rel=1e-5)
    # Our quantizer packs exactly as bitsandbytes without nested scales (test_nf4_storage.py).
    assert got[2]["load_stats"]["tensors"] == 47 and got[2]["load_stats"]["adapters"] == 35
    _assert_same_steps(got[2], ref_qlora, rel=1e-5)
    assert got[3]["patches"].get("lora", 0) > 0 and got[3]["wrapped_blocks"] == 5
    _assert_same_steps(got[3], ref_qlora, rel=1e-4)
    _assert_same_steps(got[4], ref_packed, rel=1e-5)  # padding-free batches
    assert got[5]["patches"].get("lora", 0) > 0 and got[5]["load_stats"]["tensors"] == 47
    _assert_same_steps(got[5], ref_qlora, rel=1e-4)
    saved = tmp_path / "qlora-fsdp2" / "final" / "adapter_model.safetensors"
    assert saved.is_file() and (saved.parent / "adapter_config.json").is_file()


def test_sharded_checkpoint_resumes_on_two_and_on_one_process(stories260k, alpaca_tiny, tmp_path):
    """Save at step 2 of 4 on two processes; resume on two and on one: steps 3-4 and the final
    adapter equal the uninterrupted run's."""
    from safetensors.torch import load_file

    base = _config(
        stories260k, alpaca_tiny, tmp_path / "full",
        adapter={"implementation": "custom"},
        quantization={"method": "nf4", "double_quant": True, "compute_dtype": "float32"},
        train={"save_steps": 2},
    )  # fmt: skip
    full = _sharded(base)
    proc, out = _start(tmp_path, "full", [full], nproc=2)
    (uninterrupted,) = _finish(proc, out)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "sharded" / ".metadata").is_file()
    assert not any("base_layer" in k for k in load_file(str(ckpt / "adapter_model.safetensors")))

    two = _sharded(base)
    two["train"].update(output_dir=str(tmp_path / "two"), resume_from_checkpoint=str(ckpt))
    one = json.loads(json.dumps(two))
    one["train"].update(output_dir=str(tmp_path / "one"), per_device_train_batch_size=4)
    procs = [_start(tmp_path, "two", [two], nproc=2), _start(tmp_path, "one", [one], nproc=1)]
    (on_two,), (on_one,) = (_finish(p, o) for p, o in procs)
    assert on_one["world"] == 1 and on_two["world"] == 2
    _assert_same_steps(on_two, uninterrupted, rel=1e-6, steps=["3", "4"])
    _assert_same_steps(on_one, uninterrupted, rel=1e-5, steps=["3", "4"])
    final = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    for run, atol in (("two", 0.0), ("one", 1e-6)):
        got = load_file(str(tmp_path / run / "final" / "adapter_model.safetensors"))
        worst = max((got[k] - final[k]).abs().max().item() for k in final)
        assert got.keys() == final.keys() and worst <= atol, f"{run}: max abs diff {worst:.3g}"
    moved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert max((moved[k] - final[k]).abs().max().item() for k in final) > 1e-4  # steps 3-4 trained
