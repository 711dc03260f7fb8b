"""Do the folded LoRA GEMMs pay for a contracted dimension that is not a multiple of 64?

    python benchmarks/gemm_k_tail.py

The adapters folded into the base matmuls (``ops/lora_fold.py``, ``ops/glu_lora_forward.py``)
widen K by the padded rank: 4096 + 48 (q/k/v), 4096 + 32 (gate/up), 14336 + 16 (down) at
Llama-8B shape. Hopper's tensor-core GEMMs step through K in tiles of 64 bf16 elements. This
times each product at its real K, at K rounded up to 64 (zero columns: what a padded fold
would cost) and at the bare K, with the same M and N, and prints TFLOP/s. Nothing here is a
unit test; about 20 s on an H100.
"""

from __future__ import annotations

import torch
from timing import time_ms  # this folder (scripts run from here)

# (name, M, N, K without the adapters, adapter columns)
PRODUCTS = [
    ("q (fold fwd)", 4096, 4096, 4096, 48),
    ("k/v (fold fwd)", 4096, 1024, 4096, 48),
    ("gate/up (fold fwd)", 4096, 28672, 4096, 32),
    ("down (fold fwd)", 4096, 4096, 14336, 16),
    ("down (wide bwd, dh)", 4096, 14336, 4096, 16),
    ("o (wide bwd, dx)", 4096, 4096, 4096, 16),
]


def main() -> None:
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    print(f"{'product':22s} {'K':>6s} {'ms':>8s} {'TFLOP/s':>8s}")
    for name, m, n, k, extra in PRODUCTS:
        for kk in (k, k + extra, -(-(k + extra) // 64) * 64):
            a = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, kk, device="cuda", dtype=torch.bfloat16)
            ms = time_ms(lambda a=a, b=b: torch.mm(a, b.t()), repeats=20, cold=False)
            print(f"{name:22s} {kk:6d} {ms:8.3f} {2 * m * n * kk / ms / 1e9:8.0f}")


if __name__ == "__main__":
    main()
