"""The GPTQ variant of :class:`tiny.TinyLM` (shared by the GPTQ FSDP test and its worker, which
imports it as a sibling module): every block linear is a ``GPTQLinear`` (4 bits, group 32,
round-to-nearest codes of a random ``nn.Linear``) under turbotune's LoRA (r 4, alpha 8)."""

from __future__ import annotations

import torch
from tiny import TinyLM
from torch import nn

from turbotune.adapters.lora import ADAPTER, LoRALinear
from turbotune.quant.gptq_linear import GPTQLinear


def gptq_tiny_lm(seed: int = 0, layers: int = 2) -> TinyLM:
    """:class:`tiny.TinyLM` whose block linears are GPTQ bases with LoRA (only LoRA trains)."""
    model = TinyLM(seed=seed, layers=layers)
    torch.manual_seed(seed + 10)
    for block in model.layers:
        for name in ("gate", "up", "down"):
            old = getattr(block, name).base_layer
            i, o = old.shape[1], old.shape[0]
            base = GPTQLinear.from_linear(nn.Linear(i, o, bias=False), bits=4, group_size=32)
            lora = LoRALinear(base, 4, 8)
            nn.init.normal_(lora.lora_B[ADAPTER].weight, std=0.05)  # B = 0 hides A's gradient
            setattr(block, name, lora)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def gptq_layers(model: nn.Module) -> list[GPTQLinear]:
    return [m for m in model.modules() if isinstance(m, GPTQLinear)]


def assert_half_of_the_bytes(record: dict) -> None:
    """Each of two ranks held about half of every GPTQ layer's packed bytes (a worker record)."""
    rows = record["bytes"]
    assert len(rows) == 6, rows  # 2 blocks x (gate, up, down)
    for total, *local in rows:
        assert len(local) == 2 and sum(local) >= total, (total, local)
        # dim-0 shards with padding: ceil(elements / 2) elements each (at most 4-byte elements)
        assert max(local) <= total // 2 + 4, (total, local)
    assert sum(n.endswith(".packed") for n in record["sharded"]) == 6
