"""Compile every Triton kernel variant for an H100 (sm_90) without a GPU: ``python tests/kernels/compile_sm90.py``.

The interpreter accepts some code the GPU compiler rejects (and vice versa); this runs the real
compiler down to a cubin (Triton ships ptxas) so CPU-only CI catches such breakage. It must run in
a process where TRITON_INTERPRET is unset, hence a script (driven by test_compile_sm90.py).
"""

import importlib
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

rmsnorm, rope, swiglu, ce = (importlib.import_module("megacore.kernels." + m)
                             for m in ("rmsnorm", "rope", "swiglu", "_ce_chunk"))
TARGET = GPUTarget("cuda", 90, 32)
I32 = "i32"


def compile_one(fn, types: dict, consts: dict, num_warps: int = 4) -> None:
    sig = {name: ("constexpr" if name in consts else types.get(name, I32)) for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, sig, consts), target=TARGET, options={"num_warps": num_warps})
    assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
    print(f"compiled {fn.__name__} {consts}")


def main(dt: str = "*bf16") -> None:
    f32 = "*fp32"
    for flag in (False, True):
        compile_one(rmsnorm._rmsnorm_fwd_kernel, dict(X=dt, R=dt, W=f32, Y=dt, H=dt, RSTD=f32, eps="fp32"),
                    dict(HAS_RESIDUAL=flag, ZERO_CENTERED=flag, BLOCK_N=2048), 8)
        compile_one(rmsnorm._rmsnorm_bwd_kernel, dict(DY=dt, DH_EXTRA=dt, H=dt, W=f32, RSTD=f32, DX=dt, DR=f32,
                                                      DW_PARTIAL=f32),
                    dict(HAS_DH_EXTRA=flag, STORE_DR=flag, ZERO_CENTERED=flag, BLOCK_N=2048), 8)
        for mode in (0, 1, 2):
            compile_one(rope._rope_kernel, dict(X=dt, COS=dt, SIN=dt, POS="*i64", Y=dt),
                        dict(HALF=32, PASS=64 if mode else 0, COS_MODE=mode, BACKWARD=flag, BLOCK_H=16,
                             BLOCK_HALF=32, BLOCK_PASS=64))
        compile_one(ce._ce_stats_kernel, dict(LOGITS=dt, LABELS="*i64", OUT=f32), dict(WITH_SUM=flag, BLOCK_V=4096), 8)
    for act in (0, 1, 2):
        compile_one(swiglu._gated_fwd_kernel, dict(X=dt, Y=dt), dict(ACT=act, BLOCK=1024))
        compile_one(swiglu._gated_bwd_kernel, dict(X=dt, DY=dt, DX=dt), dict(ACT=act, BLOCK=1024))
    compile_one(ce._ce_grad_kernel, dict(LOGITS=dt, LABELS="*i64", LSE=f32, SCALE=f32, smooth_per_class="fp32",
                                         target_weight="fp32"), dict(BLOCK_V=4096), 8)
    print("ALL COMPILED")


if __name__ == "__main__":
    main(*sys.argv[1:])
