"""The tiny models, data and training loop of the FSDP tests (one copy, shared by the in-process
tests and the two-process worker, which imports it as a sibling module).

:class:`TinyLM` is a causal LM of plain torch + turbotune layers (no transformers, no peft):
the two-process worker builds it in ~2 s instead of ~15 s of imports, and it has what FSDP2
sees in a QLoRA Llama: frozen embeddings/head/norms at the root, a list of blocks whose frozen
linears are NF4 storage with trainable LoRA A and B.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from turbotune.config import AdapterConfig
from turbotune.precision import PrecisionPlan

FP32 = PrecisionPlan("fp32", torch.float32, None, False)
BF16 = PrecisionPlan("bf16_autocast", torch.float32, torch.bfloat16, False)
"""bf16 gathers and compute, fp32 weights, optimizer and gradient reduction (a worker variant
with ``"precision": "bf16"`` trains under it)."""
DEVICE_ENV = "TURBOTUNE_TEST_DEVICE"
"""Where workers train: ``cpu`` (default: gloo) or ``cuda`` (``cuda:LOCAL_RANK``, NCCL)."""


def tiny_llama(seed: int = 0, layers: int = 2):
    """A random Llama: vocab 96, hidden 64, ``layers`` blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


class Output(NamedTuple):
    """What :class:`TinyLM` returns: a pytree (FSDP2 finds the tensors it must hook for
    backward in a model's output by pytree traversal, as in transformers' ``ModelOutput``)."""

    loss: torch.Tensor
    logits: torch.Tensor


class TinyBlock(nn.Module):
    """``x + down(silu(gate(n)) * up(n))`` with ``n = rmsnorm(x)``: NF4 linears with LoRA."""

    def __init__(self, hidden: int, inner: int, rank: int):
        super().__init__()
        from turbotune.adapters.lora import LoRALinear
        from turbotune.distributed.nf4 import NF4Linear

        def linear(i: int, o: int) -> nn.Module:
            layer = NF4Linear.from_linear(nn.Linear(i, o, bias=False), compute_dtype=torch.float32)
            return LoRALinear(layer, rank, 2 * rank)

        self.norm = nn.RMSNorm(hidden)
        self.gate, self.up, self.down = (
            linear(hidden, inner),
            linear(hidden, inner),
            linear(inner, hidden),
        )
        for lora in (self.gate, self.up, self.down):  # B = 0 would hide gradient bugs of A
            nn.init.normal_(lora.lora_B["default"].weight, std=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(n)) * self.up(n))


class TinyLM(nn.Module):
    """Embedding, ``layers`` :class:`TinyBlock`, norm, dense head; ``forward(input_ids, labels)``
    returns ``.loss``, the next-token cross entropy (mean over tokens), like a transformers LM.
    Only the LoRA weights train."""

    def __init__(self, seed: int = 0, layers: int = 2, vocab: int = 96, hidden: int = 64):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(TinyBlock(hidden, 2 * hidden, 4) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Output:
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        logits = self.head(self.norm(x))
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return Output(loss, logits)


def quantize(model: nn.Module) -> nn.Module:
    """Every linear but the head as shardable NF4 storage (fp32 storage and compute)."""
    from turbotune.distributed.nf4 import NF4Linear

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    NF4Linear.from_linear(module, compute_dtype=torch.float32))  # fmt: skip
    return model


def with_lora(model: nn.Module, seed: int = 1) -> nn.Module:
    """turbotune's LoRA (r 4, alpha 8) on every linear."""
    from turbotune.adapters.lora import apply_custom_lora

    torch.manual_seed(seed)
    return apply_custom_lora(model, AdapterConfig(r=4, alpha=8, implementation="custom"))


def batches(n: int = 3, seed: int = 2, rows: int = 2) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``rows`` random sequences of 12 tokens (labels = inputs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (rows, 12), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def full_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole value of every trainable parameter (gathers DTensors: a collective)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu().clone()
    return out


def train(
    model: nn.Module, data, lr: float = 1e-2, reduce=None
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of a few AdamW steps and the final full trainable weights.

    ``reduce`` maps a local loss to the global one (the mean over processes).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach()
        losses.append((reduce(value) if reduce else value).item())
    return losses, full_trainable(model)


def assert_close(got: dict, ref: dict, atol: float) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        d = (got[name] - ref[name]).abs()
        assert d.max() <= atol, f"{name}: max abs diff {d.max():.3g}, mean {d.mean():.3g}"


# ---- two-process gloo worlds (``options_worker.py``, ``gptq_worker.py``) ----

STEPS, ROWS = 3, 2  # AdamW steps of a worker run; rows per rank per step


def run_two_processes(worker, variants: dict[str, dict], tmp) -> dict:
    """Start ``worker OUT.pt VARIANTS.json`` as ranks 0 and 1 of a gloo world (CPU, eager
    dequantizer) and return what rank 0 saved: one record per variant name."""
    import json
    import os
    import subprocess
    import sys

    from turbotune.distributed.env import _free_port

    (tmp / "variants.json").write_text(
        json.dumps([{"name": k, "config": v} for k, v in variants.items()])
    )
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0", DEVICE_ENV: "cpu"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(tmp / "out.pt"), str(tmp / "variants.json")],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return torch.load(tmp / "out.pt", weights_only=True)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the processes of the default group (a worker's global loss)."""
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def train_sharded(build, variant: dict, info) -> tuple[nn.Module, dict]:
    """A worker's run of one variant: ``build()`` a fresh model, move it to this rank's device
    (:data:`DEVICE_ENV`), shard it with FSDP2 under
    ``DistributedConfig(enabled=True, **variant["config"])`` (precision :data:`FP32`, or
    :data:`BF16` when ``variant["precision"] == "bf16"``) and train :data:`STEPS` AdamW steps
    on this rank's :data:`ROWS` rows of each global batch.

    Returns:
        The trained model and its record: ``losses`` (global: mean over ranks), ``weights``
        (full trainable weights) and ``sharded`` (sorted names of the sharded parameters).
    """
    from turbotune.distributed.config import DistributedConfig
    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.shard import apply_fsdp

    cfg = DistributedConfig(enabled=True, **variant["config"])
    cfg.validate()
    device = device_for(info, os.environ.get(DEVICE_ENV, "cpu"))
    model = build().to(device)
    mesh = build_mesh(cfg.strategy, info, device, cfg.shard_size)
    apply_fsdp(model, cfg, BF16 if variant.get("precision") == "bf16" else FP32, mesh)
    rows = slice(info.rank * ROWS, (info.rank + 1) * ROWS)
    local = [{k: v[rows].to(device) for k, v in b.items()} for b in batches(STEPS, rows=2 * ROWS)]
    losses, weights = train(model, local, reduce=mean_over_ranks)
    sharded = sorted(n for n, p in model.named_parameters() if hasattr(p, "device_mesh"))
    return model, {"losses": losses, "weights": weights, "sharded": sharded}


def train_one_process(build, device: str = "cpu") -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference of a two-process run: ``build()`` trained in this process on ``device`` on
    the whole global batches, one thread, eager dequantizer on the CPU (as the workers), the
    settings restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        data = [{k: v.to(device) for k, v in b.items()} for b in batches(STEPS, rows=2 * ROWS)]
        return train(build().to(device), data)
    finally:
        torch.set_num_threads(before)
        if old is None:  # a GPU machine: conftest sets nothing there
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def worker_main(run, out: str, variants_path: str) -> None:
    """A worker's body: ``run(variant, info)`` for each variant; rank 0 saves the records."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    from turbotune.distributed.env import init_distributed

    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")  # fp32 on a GPU: no TF32 (torch's default)
    info = init_distributed(os.environ.get(DEVICE_ENV, "cpu"))
    records = {v["name"]: run(v, info) for v in json.loads(Path(variants_path).read_text())}
    if info.is_main:
        torch.save(records, out)
    dist.barrier()
    dist.destroy_process_group()
