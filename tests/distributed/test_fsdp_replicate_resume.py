"""Resume under ``distributed: {frozen: replicate}`` (the frozen base whole on every process,
outside FSDP2; FSDP2 shards the adapters and their optimizer state in one group), through
``turbotune train`` on two processes (gloo, CPU), as ``configs/fsdp-qlora-replicated.yaml``.

One ``torchrun`` runs two configs in turn (imports paid once): 4 steps saving a checkpoint at
step 2, then a run resumed from that checkpoint. The resumed steps 3-4 (losses, gradient norms)
and its final adapter must equal the uninterrupted run's exactly: the same processes do the
same fp32 operations in the same order, so any difference is state the checkpoint lost (LoRA
weights, AdamW moments and step, scheduler, data position, RNG). The checkpoint must hold the
adapters and their optimizer state only: the replicated base is rebuilt from the model path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.distributed.test_fsdp_multiprocess import (
    _assert_same_steps,
    _config,
    _finish,
    _sharded,
    _start,
)

pytestmark = pytest.mark.slow


def _sharded_keys(checkpoint: Path) -> list[str]:
    """The names of every tensor DCP wrote under ``checkpoint/sharded``."""
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata)


def test_replicated_base_resumes_like_uninterrupted(stories260k, alpaca_tiny, tmp_path):
    from safetensors.torch import load_file

    base = _config(
        stories260k, alpaca_tiny, tmp_path / "full",
        adapter={"implementation": "custom"},
        quantization={"method": "nf4", "double_quant": True, "compute_dtype": "float32"},
        train={"save_steps": 2},
        plugins={"fused_ops": {}},
    )  # fmt: skip
    full = _sharded(base, frozen="replicate", groups="model")
    resumed = _sharded(base, frozen="replicate", groups="model")
    ckpt = tmp_path / "full" / "checkpoint-2"
    resumed["train"].update(output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(ckpt))
    proc, out = _start(tmp_path, "replicate", [full, resumed], nproc=2)
    uninterrupted, again = _finish(proc, out)

    assert uninterrupted["world"] == again["world"] == 2
    assert again["patches"].get("lora", 0) > 0  # the fused (patched) model resumed
    # The resumed run started at step 2: it wrote no checkpoint-2 (its log history of steps
    # 1-2 is the checkpoint's, restored by the Trainer), so steps 3-4 ran from restored state.
    assert not (tmp_path / "resumed" / "checkpoint-2").exists()
    assert (tmp_path / "resumed" / "checkpoint-4" / "sharded" / ".metadata").is_file()
    _assert_same_steps(again, uninterrupted, rel=0.0, steps=["1", "2", "3", "4"])
    final = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "resumed" / "final" / "adapter_model.safetensors"))
    assert got.keys() == final.keys()
    worst = max((got[k] - final[k]).abs().max().item() for k in final)
    assert worst == 0.0, f"final adapters: max abs diff {worst:.3g}"
    moved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert max((moved[k] - final[k]).abs().max().item() for k in final) > 1e-4  # 3-4 trained

    keys = _sharded_keys(ckpt)
    assert any(k.startswith("optim.state.") for k in keys), keys  # AdamW moments were saved
    frozen = [k for k in keys if "lora_" not in k and not k.startswith("optim.param_groups")]
    assert not frozen, f"the checkpoint holds frozen tensors: {frozen[:5]}"
