"""Compile the Mamba-2 Triton kernels for an H100/H200 (sm_90) without a GPU, at the block sizes the
1B layer shape uses: ``python tests/kernels/compile_sm90_mamba.py`` (see compile_sm90.py for why)."""

import importlib
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from compile_sm90 import compile_one  # noqa: E402

K = importlib.import_module("megacore.kernels._ssd_triton")
conv = importlib.import_module("megacore.kernels.causal_conv1d")
dec = importlib.import_module("megacore.kernels.ssd_decode")


def main(which: str = "all") -> None:
    """``which``: "all", or "bf16" (the training dtype only: half the time, for the CPU test)."""
    f32 = "*fp32"
    for dt, ieee in (("*bf16", False), ("*fp32", True))[:1 if which == "bf16" else 2]:
        for mode, (u, v) in enumerate((("x", "B"), ("dy", "C"))):
            compile_one(K._chunk_state_kernel, dict(U=dt, V=dt, CUM=f32, DT=f32, OUT=f32),
                        dict(L=128, MODE=mode, IEEE=ieee, BL=64, BP=64, BN=64))
        compile_one(K._chunk_scan_fwd_kernel, dict(X=dt, B_=dt, C_=dt, CUM=f32, DT=f32, ST=f32, Dp=f32, Y=dt),
                    dict(L=128, HAS_D=True, IEEE=ieee, BL=64, BP=64, BN=128))
        compile_one(K._chunk_scan_bwd_dx_kernel, dict(X=dt, B_=dt, C_=dt, DY=dt, CUM=f32, DT=f32, DST=f32, Dp=f32,
                                                      DX=dt, DBH=f32, DDT=f32, DLAM=f32),
                    dict(L=128, HAS_D=True, IEEE=ieee, BL=64, BP=64, BN=128), 8)
        compile_one(K._chunk_scan_bwd_dc_kernel, dict(X=dt, B_=dt, C_=dt, DY=dt, CUM=f32, DT=f32, ST=f32, DCH=f32, BOX=f32,
                                                      DLAM=f32),
                    dict(L=128, IEEE=ieee, BL=64, BP=64, BN=128), 8)
        for halo, seq in ((False, False), (True, False), (False, True)):  # (packed documents come without a halo)
            compile_one(conv._conv_fwd_kernel, dict(X=dt, W=dt, BIAS=dt, HALO=dt, SEQ="*i64", Y=dt),
                        dict(K=4, HAS_BIAS=True, HAS_HALO=halo, HAS_SEQ=seq, BT=64, BC=128))
            compile_one(conv._conv_bwd_pre_kernel, dict(X=dt, W=dt, BIAS=dt, HALO=dt, SEQ="*i64", DY=dt, DPRE=f32,
                                                         DWP=f32, DBP=f32),
                        dict(K=4, HAS_BIAS=True, HAS_HALO=halo, HAS_SEQ=seq, BT=64, BC=128))
        for seq in (False, True):
            compile_one(conv._conv_bwd_dx_kernel, dict(DPRE=f32, W=dt, SEQ="*i64", DX=dt),
                        dict(K=4, HAS_SEQ=seq, BT=64, BC=128))
        compile_one(dec._conv_step_kernel, dict(CS=dt, XBC=dt, W=dt, BIAS=dt, XA=f32),
                    dict(K=4, HAS_BIAS=True, BC=1024))
    for flag in (False, True):
        compile_one(K._state_pass_fwd_kernel, dict(ST=f32, CUM=f32, INIT=f32), dict(L=128, HAS_INIT=flag, BLOCK=1024))
        compile_one(K._state_pass_bwd_kernel, dict(ST=f32, DST=f32, CUM=f32, DFINAL=f32, DINIT=f32, TERM=f32),
                    dict(L=128, HAS_DFINAL=flag, BLOCK=1024))
    compile_one(dec._ssm_step_kernel, dict(ST=f32, XA=f32, DT=f32, A=f32, Dp="*bf16", Y=f32),
                dict(HAS_D=True, BP=64, BN=128))
    print("ALL COMPILED")


if __name__ == "__main__":
    main(*sys.argv[1:])
