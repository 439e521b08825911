"""Full training-step throughput: megacore vs a plain-PyTorch baseline, side by side in one run.

Each variant runs in its own subprocess (clean allocator, clean compile cache) on the same GPU, one
after the other; the table at the end compares tokens/s, model TFLOP/s (DESIGN.md formula:
6·N + 6·L·h·s per token, N = matmul parameters), MFU (over 989 TFLOP/s) and peak memory.

    python benchmarks/bench_train_step.py                       # the 1B config of DESIGN.md
    python benchmarks/bench_train_step.py --variants baseline_bf16_compile,megacore_compile
    python benchmarks/bench_train_step.py --layers 2 --hidden 256 ... (smaller smoke config)

Variants:
  baseline_bf16_eager / baseline_bf16_compile   plain model, bf16 params + fused AdamW (bf16 states)
  baseline_amp_compile                          plain model, fp32 params + bf16 autocast, fused AdamW
  megacore_eager / megacore_compile             GPTModel, bf16 params, fp32 main grads + fp32 master
                                                weights + fused AdamW (MixedPrecisionOptimizer)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ALL_VARIANTS = ["baseline_bf16_eager", "baseline_bf16_compile", "baseline_amp_compile", "megacore_eager",
                "megacore_compile"]


def model_flops_per_token(a) -> float:
    hd = a.hidden // a.heads
    n = a.layers * (a.hidden * (a.heads + 2 * a.kv_heads) * hd + a.heads * hd * a.hidden + 3 * a.hidden * a.ffn)
    n += a.hidden * a.vocab
    return 6.0 * n + 6.0 * a.layers * a.hidden * a.seq


def build_baseline(a, amp: bool):
    import torch

    from benchmarks.baseline_llama import BaselineLlama

    torch.manual_seed(0)
    model = BaselineLlama(a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab, a.seq).cuda()
    if not amp:
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step(ids, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def build_megacore(a, compile_layers: bool):
    import torch

    import megacore
    from megacore.models.gpt import GPTModel
    from megacore.models.init import materialize

    cfg = megacore.TransformerConfig(
        num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads, num_query_groups=a.kv_heads,
        ffn_hidden_size=a.ffn, vocab_size=a.vocab, seq_length=a.seq, vocab_padding_multiple=128)
    with torch.device("meta"):
        model = GPTModel(cfg)
    materialize(model, cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    if a.recompute:
        model.configure_recompute(megacore.RecomputeConfig(granularity=a.recompute))
    if compile_layers:
        from megacore.training.compile import compile_model

        compile_model(model)
    from megacore.training.optimizer import build_optimizer

    opt = build_optimizer(model, megacore.TrainConfig(lr=1e-4, weight_decay=0.1),
                          megacore.PrecisionConfig(dtype="bf16"))

    def step(ids, labels):
        loss = model(ids, labels=labels, reduction="mean")
        loss.backward()
        opt.step(clip_grad=1.0)
        opt.zero_grad()
        return loss

    return model, step


def run_one(a, variant: str) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if variant.startswith("baseline"):
        model, step = build_baseline(a, amp="amp" in variant)
        if variant.endswith("compile"):
            model.compile()
    else:
        model, step = build_megacore(a, compile_layers=variant.endswith("compile"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.mbs, a.seq + 1), device="cuda", generator=gen) for _ in range(4)]
    t0 = time.time()
    for i in range(a.warmup):
        b = batches[i % 4]
        loss = step(b[:, :-1], b[:, 1:])
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(a.steps):
        b = batches[i % 4]
        loss = step(b[:, :-1], b[:, 1:])
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / a.steps
    tokens = a.mbs * a.seq
    tps = tokens / (ms / 1e3)
    tflops = tps * model_flops_per_token(a) / 1e12
    return {"variant": variant, "step_ms": ms, "tokens_per_s": tps, "model_tflops": tflops, "mfu": tflops / 989.0,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss), "warmup_s": warm_s,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(ALL_VARIANTS))
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--recompute", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="append JSON lines here")
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(a, a.one)), flush=True)
        return 0
    rows = []
    for v in a.variants.split(","):
        cmd = [sys.executable, __file__, "--one", v] + [x for x in sys.argv[1:] if not x.startswith("--variants")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{v}: FAILED\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", flush=True)
            rows.append({"variant": v, "error": proc.stderr[-500:]})
            continue
        r = json.loads(line[0][len("RESULT "):])
        r["config"] = {k: getattr(a, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq", "mbs", "recompute")}
        rows.append(r)
        print(json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(f"\n{'variant':<24}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'mem GB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<24}{'FAILED':>10}")
            continue
        print(f"{r['variant']:<24}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['model_tflops']:>10.1f}"
              f"{100 * r['mfu']:>7.1f}%{r['peak_mem_gb']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
