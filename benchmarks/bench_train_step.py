"""Full training-step throughput: megacore vs a plain-PyTorch baseline, side by side in one run.

Each variant runs in its own subprocess (clean allocator, clean compile cache) on the same device,
one after the other; the table at the end compares tokens/s, model TFLOP/s (DESIGN.md formula:
6·N + 6·L·h·s per token, N = matmul parameters), MFU (over 989 TFLOP/s) and peak memory.

    python benchmarks/bench_train_step.py --out train_step.json       # DESIGN.md's 1B config, all variants
    python benchmarks/bench_train_step.py --variants baseline_bf16_compile,megacore_compile
    python benchmarks/bench_train_step.py --device cpu --layers 2 --hidden 128 --heads 4 --kv-heads 4 \\
        --ffn 256 --vocab 1000 --seq 64 --mbs 2 --steps 2 --warmup 1     # CPU smoke run
    python benchmarks/bench_train_step.py --layers 8 --experts 8 --topk 2 --moe-ffn 2816 --accum 4 \\
        --variants baseline_bf16_compile,megacore_compile               # MoE, 8 experts top-2
    python benchmarks/bench_train_step.py --variants megacore_compile --model-args \\
        model.multi_latent_attention=true,model.kv_lora_rank=512         # multi-latent attention

With ``--experts`` the plain baseline's MLPs become a grouped-GEMM MoE (``baseline_moe.py``) and
megacore's become MoE layers (``model.num_experts``); FLOPs count the active parameters.
``--model-args`` sets more megacore model fields (and counts them in the FLOPs); the plain
baseline ignores it.

Variants:
  baseline_bf16_eager / _compile   plain model (benchmarks/baseline_llama.py), bf16 params, fused AdamW
  baseline_amp_compile             plain model, fp32 params + bf16 autocast, fused AdamW
  megacore_eager / _compile        GPTModel, bf16 params, DDP wrapper (fp32 main grads), fp32 master weights,
                                   fused AdamW (MixedPrecisionOptimizer), grad clipping; per-layer compile
  megacore_*_torchkernels          the same with MEGACORE_KERNELS=torch (plain-torch references, no Triton)
  megacore_compile_sel_attn        + selective recompute of core attention
  megacore_compile_sel_attn_mlp    + selective recompute of core attention and the MLP activation
  megacore_compile_full            + full recompute of every layer
  megacore_compile_fp8             + FP8 GEMMs (precision.fp8=tensorwise) in every transformer-layer linear; with
                                   --accum > 1 each weight is quantized once per step (the trainer's weight cache)
  megacore_compile_fp8_nocache     the same, quantizing the weights again in every micro-batch's pass
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_common import (ROOT, add_model_args, build_baseline, build_megacore, environment, fmt,  # noqa: E402
                          is_oom, timed_steps)

# name -> (builder kwargs, extra environment)
VARIANTS = {
    "baseline_bf16_eager": (dict(kind="baseline", amp=False, compile=False), {}),
    "baseline_bf16_compile": (dict(kind="baseline", amp=False, compile=True), {}),
    "baseline_amp_compile": (dict(kind="baseline", amp=True, compile=True), {}),
    "megacore_eager": (dict(kind="megacore", compile=False), {}),
    "megacore_compile": (dict(kind="megacore", compile=True), {}),
    "megacore_eager_torchkernels": (dict(kind="megacore", compile=False), {"MEGACORE_KERNELS": "torch"}),
    "megacore_compile_torchkernels": (dict(kind="megacore", compile=True), {"MEGACORE_KERNELS": "torch"}),
    "megacore_compile_sel_attn": (dict(kind="megacore", compile=True, recompute="selective:core_attn"), {}),
    "megacore_compile_sel_attn_mlp": (dict(kind="megacore", compile=True, recompute="selective:core_attn+mlp_act"),
                                      {}),
    "megacore_compile_full": (dict(kind="megacore", compile=True, recompute="full"), {}),
    "megacore_compile_fp8": (dict(kind="megacore", compile=True, fp8="tensorwise"), {}),
    "megacore_compile_fp8_nocache": (dict(kind="megacore", compile=True, fp8="tensorwise", fp8_weight_cache=False),
                                     {}),
}
DEFAULT = ["baseline_bf16_eager", "baseline_bf16_compile", "baseline_amp_compile", "megacore_eager",
           "megacore_compile", "megacore_compile_torchkernels", "megacore_compile_sel_attn"]


def run_one(a, variant: str) -> dict:
    import torch

    kw, _ = VARIANTS[variant]
    kw = dict(kw)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    kind = kw.pop("kind")
    step = build_baseline(a, **kw) if kind == "baseline" else build_megacore(a, **kw)
    return {"variant": variant, **timed_steps(a, step), **environment(a)}


def child_main(a) -> int:
    try:
        r = run_one(a, a.one)
    except Exception as e:  # an OOM is a result, not a crash
        if not is_oom(e):
            raise
        r = {"variant": a.one, "error": "OOM"}
    print("RESULT " + json.dumps(r), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--variants", default=",".join(DEFAULT), help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--timeout", type=float, default=600, help="seconds per variant")
    p.add_argument("--profile", default=None, help="directory: profile each variant's timed steps once more "
                                                   "(kernel time by category, top kernels, Chrome trace)")
    p.add_argument("--out", default=None, help="write all results here as one JSON document")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return child_main(a)
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    config = {k: getattr(a, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq", "mbs",
                                         "accum", "steps", "warmup", "device", "experts", "topk", "moe_ffn",
                                         "model_args", "run_args")}
    rows = []

    def write_out():  # after every variant, so a stage killed by a timeout keeps what it measured
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"config": config, "flops_formula": "6*N + 6*L*h*s per token (DESIGN.md)",
                           "peak_tflops": 989.0, "results": rows}, f, indent=1)

    for v in names:
        env = dict(os.environ, **VARIANTS[v][1])
        cmd = [sys.executable, os.path.abspath(__file__), "--one", v] + sys.argv[1:]
        out, err, rc = run_child(cmd, env, a.timeout)
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if rc != 0 or not line:
            print(f"{v}: FAILED (rc {rc})\n{out[-2000:]}\n{err[-3000:]}", flush=True)
            rows.append({"variant": v, "error": "timeout" if rc == "timeout" else f"failed: {err.strip()[-300:]}"})
        else:
            rows.append(json.loads(line[-1][len("RESULT "):]))
            print(json.dumps(rows[-1]), flush=True)
        write_out()
    print_table(rows)
    return 0


def run_child(cmd, env, timeout: float) -> tuple[str, str, object]:
    """(stdout, stderr, returncode or "timeout") of one child process."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        return proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return text(e.stdout), text(e.stderr), "timeout"


def print_table(rows) -> None:
    print(f"\n{'variant':<32}{'accum':>6}{'ms/step':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'mem GB':>8}{'warmup s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<32}{r['error'][:40]:>9}")
            continue
        print(f"{r['variant']:<32}{fmt(r.get('accum', 1), 'd', 6)}{fmt(r['step_ms'], '.1f', 9)}{fmt(r['tokens_per_s'], ',.0f', 11)}"
              f"{fmt(r['model_tflops'], '.1f', 9)}{fmt(100 * r['mfu'], '.1f', 6)}%{fmt(r['peak_mem_gb'], '.1f', 8)}"
              f"{fmt(r['warmup_s'], '.0f', 9)}")


if __name__ == "__main__":
    sys.exit(main())
