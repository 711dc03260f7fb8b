"""An MoE model under the layer CUDA graphs (``ops/graphs.py``) on a GPU.

The eager steps before the capture take the per-expert ``mm`` loop, which copies its row counts
to pinned host memory (``moe.plan.HostCounts``); the capture that follows runs the grouped
products instead (the loop cannot be captured). The pinned buffers of those eager steps must not
be freed inside the capture: a free records an event on the capturing stream and the capture
fails ("invalid argument"), turning graphs off for the whole run (measured: 1.72x -> 1.39x
end to end on the Mixtral shape). Here: the capture succeeds, the loop really ran before it, and
the graphed run's losses equal an eager run's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers import train_steps
from tests.patches.test_fused_parity import data, tiny_model, with_lora

from turbotune.distributed.shard import decoder_blocks
from turbotune.moe import plan as moe_plan
from turbotune.ops.graphs import LayerGraphs
from turbotune.patches import KINDS, apply_patches

pytestmark = pytest.mark.gpu


def test_mixtral_layers_are_captured_after_mm_loop_steps(monkeypatch) -> None:
    # 4 experts, top-2: 2 x 1024 tokens give 1024 rows per expert, which ``auto`` runs as mm_loop.
    base = tiny_model(
        "mixtral", hidden_size=256, intermediate_size=512, num_attention_heads=8,
        vocab_size=4096, num_hidden_layers=2,
    ).cuda()  # fmt: skip
    models = []
    for _ in range(2):
        model = with_lora(copy.deepcopy(base), targets=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = model.to(torch.bfloat16)
        apply_patches(model, KINDS)
        model.config.use_cache = False
        models.append(model)
    eager, graphed = models
    batches = data(5, batch=2, seq=1024, vocab=4096, device="cuda")
    want = train_steps(eager, batches)  # the loss lives on into the next forward

    host_reads = []
    counts_init = moe_plan.HostCounts.__init__

    def counting(self, counts):
        host_reads.append(counts.shape)
        counts_init(self, counts)

    monkeypatch.setattr(moe_plan.HostCounts, "__init__", counting)
    graphs = LayerGraphs(decoder_blocks(graphed))
    got = train_steps(graphed, batches)
    assert host_reads, "the eager steps did not take the mm_loop: this test proves nothing"
    assert graphs.disabled is None, graphs.disabled
    assert graphs.captures == 1
    diffs = [abs(a - b) / abs(b) for a, b in zip(got, want)]
    assert max(diffs) <= 2e-3, f"losses {got} vs eager {want}"
