"""Sweep the NF4 dequantizer's tile settings on the GPU (``ops/nf4.py``: elements per program,
elements per thread, bytes per load), contiguous and row-strided outputs, cold L2.

    python benchmarks/nf4_tile_sweep.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import bitsandbytes.functional as F
import torch

import turbotune.ops.nf4 as m

sys.path.insert(0, str(Path(__file__).parent))
from timing import time_ms as _time_ms

CONFIGS = (
    (4096, 32, 4),
    (8192, 32, 4),
    (8192, 64, 4),
    (16384, 64, 4),
    (2048, 16, 4),
    (4096, 32, 16),
)

for shape in ((14336, 4096), (4096, 4096), (1024, 4096)):
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    p, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref, out = F.dequantize_4bit(p, st), torch.empty_like(w)
    blk = torch.empty(shape[0], shape[1] + 16, device="cuda", dtype=torch.bfloat16)[:, 8:-8]
    mb, row = w.numel() * 2.53 / 1e6, [str(shape)]
    for cfg in CONFIGS:
        m._TILE_ELEMENTS, m._ELEMENTS_PER_THREAD, m._BYTES_PER_LOAD = cfg
        vars(st).pop("_turbotune_static", None)
        d = max(
            (m.dequantize_nf4(p, st, out=o).float() - ref.float()).abs().max().item()
            for o in (out, blk)
        )
        a = _time_ms(lambda p=p, st=st, out=out: m.dequantize_nf4(p, st, out=out), 30, cold=True)
        b = _time_ms(lambda p=p, st=st, blk=blk: m.dequantize_nf4(p, st, out=blk), 30, cold=True)
        row.append(
            f"{cfg}: {a * 1e3:.0f} us {mb / a:.0f} GB/s, rows {b * 1e3:.0f} us, diff {d:.0e}"
        )
    print("\n  ".join(row), flush=True)
