"""Triton kernels vs their torch references (eager and torch.compile) on one CUDA GPU.

    python benchmarks/bench_kernels.py                 # all kernels at the default (Llama-1B-like) shapes
    python benchmarks/bench_kernels.py --kernels rmsnorm,ce --json out.json

Times are medians from ``triton.testing.do_bench`` in ms. GB/s counts the bytes a kernel must move
at least (each input read once, each output written once; small vectors such as weights, rstd and
cos/sin tables ignored), so it is comparable to the card's peak (H100 SXM ≈ 3350 GB/s). The fused
cross entropy is compute bound: its row reports TFLOP/s over 6·N·D·V (forward GEMM 2NDV, backward
4NDV) and the peak memory of forward+backward above what was allocated before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacore.kernels import (  # noqa: E402
    apply_rotary,
    apply_rotary_reference,
    fused_linear_cross_entropy,
    gated_activation,
    gated_activation_reference,
    linear_cross_entropy_reference,
    rms_norm,
    rms_norm_reference,
)

DT = torch.bfloat16


def bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def fwd_bwd(fn, inputs, grads):
    def run():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(list(outs), list(grads))
    return run


def impls(fast, ref):
    """(name, callable) for the Triton path, eager reference and compiled reference."""
    return [("triton", fast), ("torch eager", ref), ("torch.compile", torch.compile(ref, dynamic=False))]


def add_rows(rows, kernel, variants, inputs, grads, bytes_fwd, bytes_bwd):
    leaves = [t for t in inputs if t.requires_grad]
    for name, fn in variants:
        with torch.no_grad():
            ms_f = bench(lambda: fn(*inputs))
        ms_fb = bench(fwd_bwd(fn, inputs, grads), grad_to_none=leaves)
        rows.append(dict(kernel=kernel, impl=name, fwd_ms=ms_f, fwd_gbs=bytes_fwd / ms_f / 1e6,
                         fwd_bwd_ms=ms_fb, fwd_bwd_gbs=(bytes_fwd + bytes_bwd) / ms_fb / 1e6))


def bench_rmsnorm(rows, a):
    n, h = a.tokens, a.hidden
    x = torch.randn(n, h, device="cuda", dtype=DT, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.ones(h, device="cuda", dtype=DT, requires_grad=True)
    e = x.element_size() * n * h
    variants = impls(lambda x, w, r: rms_norm(x, w, 1e-5, r), lambda x, w, r: rms_norm_reference(x, w, 1e-5, r))
    # fwd: read x, r; write y, h.  bwd: read dy, dh, h; write dx (dresidual is the same tensor).
    add_rows(rows, f"rmsnorm+residual {n}x{h}", variants, [x, w, r], [torch.randn_like(x), torch.randn_like(x)],
             4 * e, 4 * e)


def bench_rope(rows, a):
    b, s, nh, d = a.batch, a.seq, a.heads, a.head_dim
    x = torch.randn(b, s, nh, d, device="cuda", dtype=DT, requires_grad=True)
    theta = torch.arange(s, device="cuda")[:, None] * 10000 ** (-torch.arange(0, d, 2, device="cuda") / d)
    emb = torch.cat([theta, theta], -1)
    cos, sin = emb.cos().to(DT), emb.sin().to(DT)
    e = x.numel() * x.element_size()
    variants = impls(lambda x: apply_rotary(x, cos, sin), lambda x: apply_rotary_reference(x, cos, sin))
    add_rows(rows, f"rope {b}x{s}x{nh}x{d}", variants, [x], [torch.randn_like(x)], 2 * e, 2 * e)


def bench_swiglu(rows, a):
    n, f = a.tokens, a.ffn
    x = torch.randn(n, 2 * f, device="cuda", dtype=DT, requires_grad=True)
    e = n * f * x.element_size()
    for act in ("silu", "gelu_tanh"):
        variants = impls(lambda x, act=act: gated_activation(x, act),
                         lambda x, act=act: gated_activation_reference(x, act))
        # fwd: read 2F, write F.  bwd: read 2F + dy F, write 2F.
        add_rows(rows, f"{act}-glu {n}x{f}x2", variants, [x], [torch.randn(n, f, device="cuda", dtype=DT)],
                 3 * e, 5 * e)


def bench_ce(rows, a):
    n, d, v = a.tokens, a.hidden, a.vocab
    h = torch.randn(n, d, device="cuda", dtype=DT, requires_grad=True)
    w = (0.02 * torch.randn(v, d, device="cuda")).to(DT).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    variants = impls(lambda h, w: fused_linear_cross_entropy(h, w, y, check_labels=False),
                     lambda h, w: linear_cross_entropy_reference(h, w, y))
    flops = 6.0 * n * d * v
    one = torch.ones((), device="cuda")
    for name, fn in variants:
        run = fwd_bwd(fn, [h, w], [one])
        run()  # compile / warm up before measuring memory
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = bench(run, grad_to_none=[h, w])
        rows.append(dict(kernel=f"linear+CE {n}x{d}x{v}", impl=name.replace("triton", "fused (chunked)"),
                         fwd_bwd_ms=ms, tflops=flops / ms / 1e9, peak_gib=peak))


BENCHES = {"rmsnorm": bench_rmsnorm, "rope": bench_rope, "swiglu": bench_swiglu, "ce": bench_ce}


def print_table(rows):
    print(f"{'kernel':34s} {'impl':16s} {'fwd ms':>8s} {'fwd GB/s':>9s} {'f+b ms':>8s} {'f+b GB/s':>9s} "
          f"{'TFLOP/s':>8s} {'peak GiB':>9s}")

    def fmt(r, key, spec):
        return format(r[key], spec) if key in r else "-"

    for r in rows:
        print(f"{r['kernel']:34s} {r['impl']:16s} {fmt(r, 'fwd_ms', '8.3f'):>8s} {fmt(r, 'fwd_gbs', '9.0f'):>9s} "
              f"{fmt(r, 'fwd_bwd_ms', '8.3f'):>8s} {fmt(r, 'fwd_bwd_gbs', '9.0f'):>9s} {fmt(r, 'tflops', '8.1f'):>8s} "
              f"{fmt(r, 'peak_gib', '9.2f'):>9s}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", default="rmsnorm,rope,swiglu,ce", help="comma list of " + ",".join(BENCHES))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (the Triton kernels only run in the interpreter on CPU)")
    import triton

    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  dtype bf16")
    rows: list[dict] = []
    for name in a.kernels.split(","):
        if name not in BENCHES:
            sys.exit(f"unknown kernel {name!r}; choose from {','.join(BENCHES)}")
        done = len(rows)
        BENCHES[name](rows, a)
        torch.cuda.empty_cache()
        for r in rows[done:]:  # as they come, so a run cut short by a timeout still shows them
            print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                               triton=triton.__version__, rows=rows), f, indent=1)
    print_table(rows)


if __name__ == "__main__":
    main()
