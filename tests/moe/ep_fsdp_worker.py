"""One rank of the expert-parallel + FSDP2 test (``torch.multiprocessing`` with gloo, or one
process of ``torchrun`` on GPUs with NCCL through :func:`main`).

Each rank trains the same tiny Qwen3-MoE (8 experts, top-3) with its experts sharded by expert
parallelism (4 per rank, all-to-all) and everything else under FSDP2, on its slice of a global
batch. In the same process a one-process reference trains the unsharded model on every rank's
slice (the per-rank losses averaged, as data parallelism averages gradients). Checked per step:
this rank's loss, and every trainable gradient (LoRA on attention, routers, expert shards)
against the reference's. Then a model trained the same way without peft is written back to the
Hugging Face layout (experts gathered on rank 0) and loaded with transformers.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

if __name__ == "__main__":  # torchrun runs this file: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.moe.tiny import tiny_model

from turbotune.distributed.config import DistributedConfig
from turbotune.distributed.optim import (
    clip_grad_norm_mixed,
    param_groups_by_kind,
    sharded_plain_params,
)
from turbotune.moe.expert_parallel import expert_parameters, shard_experts
from turbotune.precision import PrecisionPlan

FP32 = PrecisionPlan("fp32", torch.float32, None, False)
STEPS, ROWS, SEQ = 3, 2, 9
MAX_NORM = 1e-3  # below every step's gradient norm: clipping scales every gradient


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    diff = (got.detach().float().cpu() - want.detach().float().cpu()).abs()
    assert diff.max() <= atol, f"{name}: max abs diff {diff.max():.3e} mean {diff.mean():.3e}"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _adamw(model: torch.nn.Module, split: bool) -> torch.optim.AdamW:
    """AdamW with foreach forced on (the CUDA default; CPU would otherwise step per tensor, which
    hides a param group mixing DTensors and plain tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups_by_kind(params) if split else params
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=True)


def _clip_and_compare(model, ref, norm: torch.Tensor, rank: int, world: int, step: int,
                      atol: float) -> None:  # fmt: skip
    """``norm`` (the sharded model's, already clipped) equals the reference's global norm, and
    the clipped gradients equal the reference's clipped ones."""
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    want = torch.nn.utils.clip_grad_norm_(ref_params, MAX_NORM, foreach=True)
    assert want > MAX_NORM, f"norm {want:.3e} is below {MAX_NORM}: clipping proves nothing"
    _close(f"step {step} grad norm", norm, want, atol)
    _check_grads(model, ref, rank, world, step, atol * MAX_NORM / want.item())


def _trainable_model(peft: bool, device: torch.device) -> torch.nn.Module:
    """LoRA on attention (peft) or not; routers and experts trainable in both."""
    model = tiny_model("qwen3_moe")
    if peft:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            init_lora_weights=False)  # fmt: skip
        model = get_peft_model(model, config)
    else:
        model.requires_grad_(False)
    for name, p in model.named_parameters():
        if ".mlp.gate." in name or ".mlp.experts." in name:
            p.requires_grad_(True)
    return model.to(device)


def _shard(model: torch.nn.Module, device: torch.device, backend: str) -> None:
    from turbotune.distributed.env import WorldInfo, build_mesh
    from turbotune.distributed.shard import apply_fsdp

    shard_experts(model, backend=backend, average_grads=True)
    ignored = expert_parameters(model)
    assert len(ignored) == 4, len(ignored)  # 2 layers x (gate_up, down)
    mesh = build_mesh("full_shard", WorldInfo.from_env(), device)
    apply_fsdp(model, DistributedConfig(enabled=True), FP32, mesh, ignored_params=ignored)
    for name, p in model.named_parameters():  # the experts stay plain local tensors
        assert hasattr(p, "device_mesh") != (p in ignored), name


def _batches(world: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (world * ROWS, SEQ), generator=gen).to(device)
            for _ in range(STEPS)]  # fmt: skip


def _reference_step(ref, ids: torch.Tensor, world: int) -> list[float]:
    """Every rank's loss on the unsharded model; gradients of the mean of those losses."""
    losses = []
    for r in range(world):
        part = ids[r * ROWS : (r + 1) * ROWS]
        loss = ref(input_ids=part, labels=part).loss
        (loss / world).backward()
        losses.append(loss.item())
    return losses


def _check_grads(model, ref, rank: int, world: int, step: int, atol: float) -> int:
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        want = ref_params[name].grad
        if ".experts." in name:  # this rank's experts: its slice of the reference's stack
            local = p.shape[0]
            want = want[rank * local : (rank + 1) * local]
        assert p.grad is not None, f"step {step}: {name} got no gradient"
        _close(f"step {step} grad {name}", _full(p.grad), want, atol)
        assert want.abs().max() > 0, f"{name}: zero reference gradient proves nothing"
        checked += 1
    return checked


def _trainer_optimizer(model, ref, out_dir: str, device: torch.device):
    """FsdpTrainer's optimizer and clipping for ``model``; the reference grouped the same way
    (transformers' weight-decay groups) in one plain AdamW."""
    from transformers import TrainingArguments

    from turbotune.config import TrainConfig
    from turbotune.distributed.trainer import FsdpTrainer

    args = TrainingArguments(output_dir=out_dir, use_cpu=device.type == "cpu", report_to=[],
                             learning_rate=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM)  # fmt: skip
    trainer = FsdpTrainer(model=model, args=args, train_config=TrainConfig())
    opt = trainer.create_optimizer()
    sizes = [len(g["params"]) for g in opt.param_groups if g["params"]]
    assert sizes == [10, 4], sizes  # LoRA + routers (DTensors), the 4 expert shards (plain)
    for group in opt.param_groups:  # one kind per group, decay settings kept
        # (transformers 5.17 keeps its empty no-decay group: nothing to check there)
        assert len({hasattr(p, "device_mesh") for p in group["params"]}) <= 1
        assert group["weight_decay"] in (0.0, 0.1) and group["lr"] == 1e-2
        if not group.get("fused"):  # transformers' CUDA default is fused: keep it there
            group["foreach"] = True
    decay = trainer.get_decay_parameter_names(ref)
    ref_opt = torch.optim.AdamW([
        {"params": [p for n, p in ref.named_parameters() if p.requires_grad and n in decay],
         "weight_decay": 0.1},
        {"params": [p for n, p in ref.named_parameters() if p.requires_grad and n not in decay],
         "weight_decay": 0.0},
    ], lr=1e-2, foreach=True)  # fmt: skip
    return opt, ref_opt, lambda: trainer._clip_grad_norm(model)


def _step_both(model, ref, ids, rank: int, world: int, step: int, atol: float) -> None:
    """Forward and backward of this rank's rows on ``model`` and of the whole batch on ``ref``;
    this rank's loss equals the reference's loss of the same rows."""
    mine = ids[rank * ROWS : (rank + 1) * ROWS]
    loss = model(input_ids=mine, labels=mine).loss
    loss.backward()
    ref_losses = _reference_step(ref, ids, world)
    assert abs(loss.item() - ref_losses[rank]) <= atol, (step, loss.item(), ref_losses)


def _train_and_compare(rank, world, device, backend, peft: bool, atol: float,
                       out_dir: str | None = None):  # fmt: skip
    """Steps of the sharded model against the reference; ``out_dir``: the optimizer and the
    clipping of :class:`FsdpTrainer` (else turbotune.distributed.optim by hand)."""
    model = _trainable_model(peft, device)
    ref = copy.deepcopy(model)
    _shard(model, device, backend)
    sharded = sharded_plain_params(model)
    assert set(sharded) == expert_parameters(model) and all(g is None for g in sharded.values())
    if out_dir is None:
        opt, ref_opt = _adamw(model, split=True), _adamw(ref, split=False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        clip = lambda: clip_grad_norm_mixed(trainable, MAX_NORM, sharded=sharded)  # noqa: E731
    else:
        opt, ref_opt, clip = _trainer_optimizer(model, ref, out_dir, device)
    for step, ids in enumerate(_batches(world, device)):
        _step_both(model, ref, ids, rank, world, step, atol)
        checked = _check_grads(model, ref, rank, world, step, atol)
        kinds = {"lora_A", "lora_B", "gate", "gate_up_proj", "down_proj"} if peft else {"gate"}
        assert checked >= 2 * len(kinds), checked
        _clip_and_compare(model, ref, clip(), rank, world, step, atol)
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    return model, ref


def _check_export(rank, world, device, backend, out_dir: str, atol: float) -> None:
    from transformers import AutoModelForCausalLM

    from turbotune.moe.ep_checkpoint import save_hf_layout

    model, ref = _train_and_compare(rank, world, device, backend, peft=False, atol=atol)
    save_hf_layout(model, out_dir)
    if rank == 0:
        loaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        want = dict(ref.named_parameters())
        got = dict(loaded.named_parameters())
        assert set(got) == set(want), sorted(set(got) ^ set(want))
        for name, p in got.items():
            _close(f"saved {name}", p, want[name], atol)
        trained = [n for n in got if ".experts." in n]
        assert trained, "no expert stacks in the saved model"
    dist.barrier()


def _check_framework(rank, world, device, backend, out_dir: str, atol: float) -> None:
    """The same run configured by a config: ``plugins.expert_parallel`` + ``distributed``."""
    from peft import get_peft_model
    from transformers import TrainingArguments

    import turbotune

    fw = turbotune.AccelerationFramework({
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "distributed": {"enabled": True, "low_memory_loading": False},
        "plugins": {"expert_parallel": {"backend": backend}, "fused_ops": {"moe_backend": backend}},
    })  # fmt: skip
    names = [p.name for p in fw.plugins]
    assert names == ["adapter", "expert_parallel", "fused_ops", "fsdp"], names
    args = TrainingArguments(output_dir=out_dir, use_cpu=device.type == "cpu", report_to=[])
    peft_config = fw.peft_config()
    torch.manual_seed(1)
    model, _ = fw.augment(tiny_model("qwen3_moe"), args, peft_config)
    torch.manual_seed(1)
    ref = get_peft_model(tiny_model("qwen3_moe"), fw.peft_config()).to(device)
    experts = model.__dict__["_turbotune_fsdp_ignored"]
    assert len(experts) == 4 and all(p.shape[0] == 8 // world for p in experts)
    assert not any(hasattr(p, "device_mesh") for p in experts)
    opt, ref_opt = _adamw(model, split=True), _adamw(ref, split=False)
    for step, ids in enumerate(_batches(world, device)):
        _step_both(model, ref, ids, rank, world, step, atol)
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
        for name, p in model.named_parameters():
            if p.requires_grad:
                _close(f"framework step {step} grad {name}", _full(p.grad), ref_grads[name], atol)
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad(set_to_none=True)


PARTS = ("parity", "trainer", "export", "framework")


def check(rank: int, world: int, out_dir: str, backend: str, device: torch.device,
          parts: tuple[str, ...] = PARTS) -> None:  # fmt: skip
    atol = 2e-5 if device.type == "cpu" else 1e-4  # fp32; GPU reductions run in another order
    if "parity" in parts:
        _train_and_compare(rank, world, device, backend, peft=True, atol=atol)
    if "trainer" in parts:
        _train_and_compare(rank, world, device, backend, peft=True, atol=atol, out_dir=out_dir)
    if "export" in parts:
        _check_export(rank, world, device, backend, out_dir, atol)
    if "framework" in parts:
        _check_framework(rank, world, device, backend, out_dir, atol)


def run(rank: int, world: int, port: int, out_dir: str, backend: str, parts: tuple) -> None:
    """A gloo rank started by ``torch.multiprocessing``: the checks named in ``parts``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      TRITON_INTERPRET="0")  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        check(rank, world, out_dir, backend, torch.device("cpu"), parts)
    finally:
        dist.destroy_process_group()


def main() -> None:
    """``torchrun --nproc-per-node 2 tests/moe/ep_fsdp_worker.py OUT_DIR BACKEND`` (NCCL)."""
    from turbotune.distributed.env import device_for, init_distributed

    info = init_distributed("cuda")
    try:
        check(info.rank, info.world_size, sys.argv[1], sys.argv[2], device_for(info, "cuda"))
    finally:
        dist.destroy_process_group()
    print(f"rank {info.rank}: expert parallel + FSDP2 parity passed")


if __name__ == "__main__":
    main()
