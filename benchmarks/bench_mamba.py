"""Mamba-2 kernels: a scan/conv microbenchmark and hybrid-vs-attention training steps, in one run.

1. Kernels, at the hybrid 1B layer shape (hidden 2048: 64 heads x 64, 8 groups, state 128, chunk 128,
   conv over 6144 channels; micro batch 4 x seq 2048): the SSD scan forward+backward and the causal
   conv1d+SiLU forward+backward, Triton (``megacore.kernels``) against the torch reference
   (``ssd_chunked`` / ``F.conv1d``), and one generation step of the whole mixer (fused decode
   kernels against the torch path); eager, CUDA-event timed.
2. Training steps through the composition root ``megacore train`` uses (``bench_train_step.py``,
   ``build_megacore``, compiled): the hybrid 1B (16 layers, pattern ``M-M-M*-M-M-M*-M-``) with the
   kernels (``MEGACORE_KERNELS=auto``: Triton for the Mamba ops, also under torch.compile) and with the
   torch path (``=torch``), and the all-attention 1B (``configs/llama_1b_gpu.yaml``'s shape), per
   sequence length (micro batch 4 at 2048, 1 at 8192, as BENCHMARKS.md measured issue 20's numbers).

    python benchmarks/bench_mamba.py                         # one H200: kernels + seq 2048 (~2-3 min)
    python benchmarks/bench_mamba.py --seqs 2048,8192        # both lengths (longer)
    python benchmarks/bench_mamba.py --skip-train            # kernels only (seconds)
    python benchmarks/bench_mamba.py --cpu-smoke             # tiny shapes on CPU (torch path; the Triton
                                                             # kernels too under TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PATTERN = "M-M-M*-M-M-M*-M-"


def _time(fn, device, iters: int, warmup: int = 2) -> float:
    """Milliseconds per call of ``fn`` (CUDA events on a GPU, wall clock on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def kernel_bench(a) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from megacore.kernels._dispatch import interpreter_enabled, triton_available
    from megacore.kernels.causal_conv1d import causal_conv1d_silu, causal_conv1d_silu_reference
    from megacore.kernels.ssd_scan import ssd_scan_triton
    from megacore.layers.mamba import ssd_chunked

    dev = a.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16  # (the interpreter's bf16 matmul is wrong)
    b, s, h, p, g, n, L = a.kernel_shape
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(b, s, h, p, device=dev, generator=gen).to(dtype).requires_grad_()
    dt = F.softplus(torch.randn(b, s, h, device=dev, generator=gen) - 3).requires_grad_()
    A = (-torch.rand(h, device=dev, generator=gen) * 8 - 1).requires_grad_()
    B = (0.3 * torch.randn(b, s, g, n, device=dev, generator=gen)).to(dtype).requires_grad_()
    C = (0.3 * torch.randn(b, s, g, n, device=dev, generator=gen)).to(dtype).requires_grad_()
    D = torch.ones(h, device=dev, requires_grad=True)
    cd = h * p + 2 * g * n
    xc = torch.randn(b, s, cd, device=dev, generator=gen).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(cd, 1, 4, device=dev, generator=gen)).to(dtype).requires_grad_()
    bias = torch.randn(cd, device=dev, generator=gen).to(dtype).requires_grad_()
    have_triton = triton_available() and (dev == "cuda" or interpreter_enabled())

    def scan(fn):
        def run():
            y, final = fn(x, dt, A, B, C, L, D=D)
            torch.autograd.backward([y, final], [torch.ones_like(y), torch.zeros_like(final)])
        return run

    def conv(fn):
        def run():
            fn(xc, w, bias).sum().backward()
        return run

    cases = [("ssd scan fwd+bwd", "torch", scan(ssd_chunked)),
             ("conv1d+silu fwd+bwd", "torch", conv(causal_conv1d_silu_reference))]
    if have_triton:
        cases += [("ssd scan fwd+bwd", "triton", scan(ssd_scan_triton)),
                  ("conv1d+silu fwd+bwd", "triton", conv(lambda *t: causal_conv1d_silu(*t, force_triton=True)))]
    cases += decode_cases(a, have_triton, dtype)
    rows = []
    for name, impl, fn in cases:
        ms = _time(fn, dev, a.kernel_iters)
        rows.append({"kernel": name, "impl": impl, "ms": ms, "shape": f"b{b} s{s} h{h} p{p} g{g} n{n} L{L}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def decode_cases(a, have_triton: bool, dtype) -> list:
    """One generation step of a whole Mamba mixer (in_proj .. out_proj) at the layer shape, batch
    ``--decode-batch``: the fused decode kernels against the torch path."""
    import torch

    import megacore
    from megacore.kernels import kernel_backend
    from megacore.layers.mamba import MambaMixer, MambaState

    b, _, h, p, g, n, L = a.kernel_shape
    cfg = megacore.TransformerConfig(num_layers=1, hidden_size=h * p // 2, num_attention_heads=4, vocab_size=64,
                                     seq_length=64, layer_pattern="M", mamba_head_dim=p, mamba_state_dim=n,
                                     mamba_num_groups=g, mamba_chunk_size=L)
    mixer = MambaMixer(cfg).to(a.device, dtype)
    with torch.no_grad():
        for prm in mixer.parameters():
            prm.normal_(0, 0.02)
    hidden = torch.randn(a.decode_batch, 1, cfg.hidden_size, device=a.device, dtype=dtype)
    state = MambaState(mixer.conv1d.kernel_size[0])

    def step(backend):
        def run():
            with torch.no_grad(), kernel_backend(backend):
                mixer(hidden, state)
        return run

    name = f"mixer decode step (batch {a.decode_batch})"
    return [(name, "torch", step("torch"))] + ([(name, "triton", step("triton"))] if have_triton else [])


def train_bench(a) -> list[dict]:
    """bench_train_step.py once per (sequence length, model): each variant in its own process."""
    rows = []
    for seq in a.seqs:
        mbs = a.mbs if a.mbs else (4 if seq <= 2048 else 1)
        for model, variants, extra in [("hybrid", a.hybrid_variants, a.hybrid_args),
                                       ("attention", a.attention_variants, "")]:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = f.name
            cmd = [sys.executable, os.path.join(HERE, "bench_train_step.py"), "--variants", variants,
                   "--seq", str(seq), "--mbs", str(mbs), "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--out", out, "--timeout", str(a.timeout)] + a.shape_args
            if extra:
                cmd += ["--model-args", extra]
            env = dict(os.environ, MEGACORE_KERNELS="auto")
            print("$ " + " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, env=env, check=False)
            try:
                with open(out) as fh:
                    results = json.load(fh)["results"]
            except (OSError, ValueError, KeyError):
                results = [{"variant": variants, "error": "no result"}]
            finally:
                if os.path.exists(out):
                    os.unlink(out)
            for r in results:
                rows.append({"model": model, "seq": seq, "mbs": mbs, **r})
    return rows


def print_tables(kernels, train) -> None:
    if kernels:
        print(f"\n{'kernel':<32}{'impl':>8}{'ms':>10}{'vs torch':>10}   shape")
        base = {r["kernel"]: r["ms"] for r in kernels if r["impl"] == "torch"}
        for r in kernels:
            print(f"{r['kernel']:<32}{r['impl']:>8}{r['ms']:>10.3f}{base[r['kernel']] / r['ms']:>9.2f}x   {r['shape']}")
    if train:
        print(f"\n{'model':<11}{'seq':>6}{'mbs':>4}  {'variant':<32}{'ms/step':>9}{'tokens/s':>11}{'MFU':>7}"
              f"{'mem GB':>8}")
        for r in train:
            if "error" in r:
                print(f"{r['model']:<11}{r['seq']:>6}{r['mbs']:>4}  {r['variant']:<32}{r['error'][:40]}")
                continue
            print(f"{r['model']:<11}{r['seq']:>6}{r['mbs']:>4}  {r['variant']:<32}{r['step_ms']:>9.1f}"
                  f"{r['tokens_per_s']:>11,.0f}{100 * r['mfu']:>6.1f}%{r.get('peak_mem_gb') or 0:>8.1f}")
        attn = {r["seq"]: r for r in train if r["model"] == "attention" and "error" not in r}
        for r in train:
            if r["model"] == "hybrid" and "error" not in r and r["seq"] in attn:
                ref = attn[r["seq"]]
                print(f"hybrid/attention seq {r['seq']} {r['variant']}: MFU {r['mfu'] / ref['mfu']:.0%}, "
                      f"tokens/s {r['tokens_per_s'] / ref['tokens_per_s']:.0%}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="2048", help="comma list of training sequence lengths")
    p.add_argument("--mbs", type=int, default=None, help="micro batch (default: 4 at seq <= 2048, else 1)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300, help="seconds per training variant")
    p.add_argument("--hybrid-variants", default="megacore_compile,megacore_compile_torchkernels")
    p.add_argument("--attention-variants", default="megacore_compile")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--kernel-iters", type=int, default=10)
    p.add_argument("--decode-batch", type=int, default=8, help="sequences in the decode-step benchmark")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, eager (a quick check that it runs)")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    a = p.parse_args()
    a.seqs = [int(s) for s in a.seqs.split(",") if s]
    a.device = "cpu" if a.cpu_smoke else "cuda"
    a.kernel_shape = (4, 2048, 64, 64, 8, 128, 128)
    a.shape_args = []
    a.hybrid_args = f"model.layer_pattern={PATTERN}"
    if a.cpu_smoke:
        a.kernel_shape = (1, 40, 4, 16, 2, 16, 16)
        a.kernel_iters = 1
        a.seqs = [32]
        a.mbs = a.mbs or 2
        a.steps, a.warmup = 1, 1
        a.hybrid_variants = a.attention_variants = "megacore_eager"
        a.shape_args = ["--device", "cpu", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "4",
                        "--ffn", "128", "--vocab", "256"]
        a.hybrid_args = "model.layer_pattern=M*,model.mamba_num_groups=1"
    kernels = [] if a.skip_kernels else kernel_bench(a)
    train = [] if a.skip_train else train_bench(a)
    print_tables(kernels, train)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"kernels": kernels, "train": train}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
