"""Activation recomputation: peak memory and tokens/s of a megacore training step per recompute mode.

DESIGN.md's 1B config (L=16, h=2048, 16 heads, ffn 5632, vocab 32000; bf16 params, fp32 main grads,
fp32 master weights, fused AdamW) at seq 2048 (micro batch 4) and seq 8192 (micro batch 1), for
recompute none / selective core_attn / selective core_attn+mlp_act / full. Each run is its own
subprocess; a run that does not fit reports OOM.

    python benchmarks/bench_recompute_memory.py --out recompute.json
    python benchmarks/bench_recompute_memory.py --shapes 2048x4 --modes none,full --compile
    python benchmarks/bench_recompute_memory.py --device cpu --layers 2 --hidden 128 --heads 4 --kv-heads 4 \\
        --ffn 256 --vocab 1000 --shapes 64x2,128x1 --steps 1 --warmup 1          # CPU smoke run

``static GB`` is what is allocated between steps (weights, main grads, optimizer state); ``peak GB``
the most allocated during the measured steps, so peak − static is the activations' high-water mark
(plus the loss head's and optimizer's temporaries).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import run_child  # noqa: E402
from train_common import add_model_args, build_megacore, environment, fmt, is_oom, timed_steps  # noqa: E402

MODES = {"none": None, "sel_attn": "selective:core_attn", "sel_attn_mlp": "selective:core_attn+mlp_act",
         "full": "full"}


def child_main(a) -> int:
    import torch

    seq, mbs = (int(x) for x in a.shape.split("x"))
    a.seq, a.mbs = seq, mbs
    r = {"mode": a.one, "seq": seq, "mbs": mbs, "compile": a.compile}
    try:
        if a.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        step = build_megacore(a, compile=a.compile, recompute=MODES[a.one])
        r.update(timed_steps(a, step))
        r.update(environment(a))
    except Exception as e:
        if not is_oom(e):
            raise
        r["error"] = "OOM"
    print("RESULT " + json.dumps(r), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(steps=3, warmup=2)
    p.add_argument("--shapes", default="2048x4,8192x1", help="comma list of SEQxMICRO_BATCH")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of: {', '.join(MODES)}")
    p.add_argument("--compile", action="store_true", help="per-layer torch.compile (slower to start)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    p.add_argument("--out", default=None, help="write all results here as one JSON document")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return child_main(a)
    modes = [m for m in a.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        p.error(f"unknown modes in {modes}; choose from {', '.join(MODES)}")
    rows = []
    for shape in a.shapes.split(","):
        for mode in modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", mode, "--shape", shape] + sys.argv[1:]
            out, err, rc = run_child(cmd, dict(os.environ), a.timeout)
            line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if rc != 0 or not line:
                oom = "out of memory" in err.lower()
                print(f"{mode} {shape}: {'OOM' if oom else 'FAILED'} (rc {rc})\n{err[-2000:]}", flush=True)
                seq, mbs = shape.split("x")
                rows.append({"mode": mode, "seq": int(seq), "mbs": int(mbs),
                             "error": "OOM" if oom else ("timeout" if rc == "timeout" else "failed")})
                write_out(a, rows)
                continue
            r = json.loads(line[-1][len("RESULT "):])
            rows.append(r)
            print(json.dumps(r), flush=True)
            write_out(a, rows)
    print(f"\n{'mode':<14}{'seq x mbs':>11}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}{'static GB':>10}")
    for r in rows:
        shape = f"{r['seq']}x{r['mbs']}"
        if "error" in r:
            print(f"{r['mode']:<14}{shape:>11}{r['error']:>11}")
            continue
        print(f"{r['mode']:<14}{shape:>11}{fmt(r['tokens_per_s'], ',.0f', 11)}{fmt(r['model_tflops'], '.1f', 9)}"
              f"{fmt(100 * r['mfu'], '.1f', 6)}%{fmt(r['peak_mem_gb'], '.1f', 9)}{fmt(r['static_mem_gb'], '.1f', 10)}")
    return 0


def write_out(a, rows) -> None:
    """Rewritten after every run, so a stage killed by a timeout keeps what it measured."""
    if a.out:
        config = {k: getattr(a, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "steps",
                                             "warmup", "device", "compile", "init")}
        with open(a.out, "w") as f:
            json.dump({"config": config, "results": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
