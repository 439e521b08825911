"""Causal attention forward+backward on one CUDA GPU: each SDPA backend at the 1B shapes.

    python benchmarks/bench_attention.py [--batch 4 --seq 2048 --heads 16 --kv-heads 16 4 --dim 128]

For SDPA's default choice and every backend (flash, cuDNN, memory-efficient) and every KV-head count it prints the median
fwd+bwd time (``triton.testing.do_bench``), TFLOP/s over the causal attention FLOPs (forward
2 matmuls x 2·B·H·S²·D / 2 for the causal half, backward 2.5x the forward) and the largest output
and gradient difference from the first backend's result (SDPA's default choice) (fp32 of both), so a faster backend that
computes something else is visible. A backend that refuses the inputs prints why.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def run(backend, q, k, v, dout):
    for t in (q, k, v):
        t.grad = None
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(dout)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, nargs="+", default=[16, 4])
    p.add_argument("--dim", type=int, default=128)
    a = p.parse_args()
    from triton.testing import do_bench

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}")
    print(f"{'kv heads':>8} {'backend':>10} {'ms':>8} {'TFLOP/s':>8} {'max |dout|':>11} {'max |dgrad|':>11}")
    flops = 3.5 * 2 * 2 * a.batch * a.heads * a.seq * a.seq * a.dim / 2
    for kvh in a.kv_heads:
        gen = torch.Generator(device="cuda").manual_seed(0)

        def rnd(h):
            return torch.randn(a.batch, h, a.seq, a.dim, device="cuda", dtype=torch.bfloat16, generator=gen)

        q, k, v = (rnd(h).requires_grad_() for h in (a.heads, kvh, kvh))
        dout = rnd(a.heads)
        ref = None
        for name, backend in BACKENDS.items():
            try:
                out = run(backend, q, k, v, dout)
            except RuntimeError as e:
                print(f"{kvh:>8} {name:>10}  refused: {str(e).splitlines()[0][:90]}")
                continue
            grads = [t.grad.float() for t in (q, k, v)]
            if ref is None:
                ref = (out.detach().float(), grads)
            d_out = (out.detach().float() - ref[0]).abs().max().item()
            d_grad = max((g - r).abs().max().item() for g, r in zip(grads, ref[1]))
            ms = do_bench(lambda: run(backend, q, k, v, dout), warmup=25, rep=200, return_mode="median")
            print(f"{kvh:>8} {name:>10} {ms:8.3f} {flops / ms / 1e9:8.1f} {d_out:11.2e} {d_grad:11.2e}", flush=True)


if __name__ == "__main__":
    main()
