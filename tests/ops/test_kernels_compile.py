"""Every kernel compiles for an H100 (sm_90) on a machine without a GPU.

The interpreter runs kernels as NumPy and accepts code the compiler rejects (loop-carried type
changes, non-constexpr globals, ...). Triton can compile ahead of time for a named target with
its bundled ``ptxas``, so CPU-only CI catches those too. Runs in a subprocess because kernels
decorated under ``TRITON_INTERPRET=1`` cannot be compiled.
"""

from __future__ import annotations

import textwrap

import pytest
from tests.helpers import assert_compiles

from turbotune.ops._triton import HAS_TRITON

SCRIPT = textwrap.dedent(
    """
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    TARGET = GPUTarget("cuda", 90, 32)

    def build(module, kernel, pointers, constexprs, num_warps=4, floats=()):
        fn = getattr(importlib.import_module(f"turbotune.ops.{module}"), kernel)
        signature = {
            name: "constexpr" if name in constexprs
            else pointers.get(name, "fp32" if name in floats else "i32")
            for name in fn.arg_names
        }
        triton.compile(ASTSource(fn, signature, constexprs), target=TARGET,
                       options={"num_warps": num_warps})

    def pointers(module, kernel, dt, **special):
        fn = getattr(importlib.import_module(f"turbotune.ops.{module}"), kernel)
        return {n: special.get(n, f"*{dt}") for n in fn.arg_names if n.endswith("_ptr")}

    for dt in ("bf16", "fp32"):
        p = {n: f"*{dt}" for n in ("y_ptr", "x_ptr", "w_ptr", "dx_ptr", "dy_ptr")}
        p.update(rstd_ptr="*fp32", dw_partial_ptr="*fp32")
        for cast in (True, False):
            c = {"CAST_TO_INPUT": cast, "BLOCK_SIZE": 4096}
            build("rms_norm", "_fwd_kernel", p, c, 8, floats=("eps", "offset"))
            build("rms_norm", "_bwd_kernel", p, {**c, "COMPUTE_DW": True}, 8, floats=("offset",))
        p = pointers("rope", "_rotary_kernel", dt)
        for backward, has_v in ((False, False), (True, False), (True, True)):  # rope, rope_qkv
            c = {"BACKWARD": backward, "HAS_V": has_v, "BLOCK_QH": 32, "BLOCK_KH": 8,
                 "BLOCK_VH": 8, "BLOCK_D": 64}
            build("rope", "_rotary_kernel", p, c)
        p = {n: f"*{dt}" for n in ("h_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr", "dh_ptr")}
        for activation in (0, 1, 2):
            c = {"ACTIVATION": activation, "BLOCK_SIZE": 1024}
            build("swiglu", "_fwd_kernel", p, c)
            build("swiglu", "_bwd_kernel", p, c)
            for keep in (False, True):
                k = pointers("swiglu", "_bwd_h_kernel", dt, keep_ptr="*u8")
                build("swiglu", "_bwd_h_kernel", k, {**c, "HAS_KEEP": keep}, floats=("keep_scale",))
        p = {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "loss_ptr": "*fp32",
             "inv_denominator_ptr": "*fp32"}
        for softcap in (False, True):
            c = {"HAS_SOFTCAP": softcap, "BLOCK_SIZE": 32768}
            build("cross_entropy", "_fwd_kernel", p, c, 32, floats=("logit_scale", "softcap"))
    for mult, cast in ((False, True), (True, False)):  # ops/add_norm.py
        c = {"HAS_MULT": mult, "CAST_TO_INPUT": cast, "BLOCK_SIZE": 4096}
        p = pointers("add_norm", "_add_fwd_kernel", "bf16", rstd_ptr="*fp32")
        build("add_norm", "_add_fwd_kernel", p, c, 8, floats=("eps", "offset", "multiplier"))
        p = pointers("add_norm", "_add_bwd_kernel", "bf16", rstd_ptr="*fp32", dw_partial_ptr="*fp32")
        build("add_norm", "_add_bwd_kernel", p, {**c, "COMPUTE_DW": True}, 8,
              floats=("offset", "multiplier"))
    for b_dt in ("fp32", "bf16"):  # ops/lora_fold_tail.py
        for out_dt in ("bf16", "fp16", "fp32"):
            p = pointers("lora_fold_tail", "_adapter_block_kernel", b_dt, out_ptr=f"*{out_dt}")
            for n in (1, 3, 4):
                build("lora_fold_tail", "_adapter_block_kernel", p,
                      {"N_ADAPTERS": n, "BLOCK_M": 64, "BLOCK_N": 64},
                      floats=tuple(f"scale{k}" for k in range(4)))
    print("ok")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    assert_compiles(SCRIPT)
