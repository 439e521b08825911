"""Shared pieces of the training benchmarks: model + optimizer builders and a timed step loop.

Both benchmarks run each measurement in a fresh subprocess (clean allocator, clean compile cache),
so everything here is called inside that child. FLOPs follow DESIGN.md: 6·N + 6·L·h·s per token
(``megacore.training.flops``), MFU over 989 TFLOP/s (H100 dense bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PEAK_TFLOPS = 989.0


def add_model_args(p: argparse.ArgumentParser, seq: int = 2048, mbs: int = 4) -> None:
    """The model/shape flags, defaulting to DESIGN.md's 1B Llama-style config."""
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run (no fused optimizer, compile with --compile-backend eager)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--mbs", type=int, default=mbs, help="micro batch size (sequences per step)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation; "
                                                        "tokens per step = accum x mbs x seq)")
    p.add_argument("--steps", type=int, default=8, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compilation happens here)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor on cuda, "
                                                           "eager on cpu)")
    p.add_argument("--init", default="fast", choices=["fast", "deterministic"],
                   help="megacore weights: drawn on the device (fast; speed does not depend on the values) or "
                        "megacore's layout-independent CPU init (materialize, ~10 s for 1B)")


def transformer_config(a):
    import megacore

    return megacore.TransformerConfig(
        num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads, num_query_groups=a.kv_heads,
        ffn_hidden_size=a.ffn, vocab_size=a.vocab, seq_length=a.seq, vocab_padding_multiple=128)


def flops_per_token(a) -> float:
    from megacore.training.flops import flops_per_token as f

    return f(transformer_config(a), a.seq)


def compile_backend(a) -> str:
    return a.compile_backend or ("inductor" if a.device == "cuda" else "eager")


def build_baseline(a, amp: bool, compile: bool) -> Callable:
    """Plain PyTorch: bf16 params + AdamW on bf16 states (or fp32 params + bf16 autocast), fused on CUDA."""
    import torch

    from benchmarks.baseline_llama import BaselineLlama

    torch.manual_seed(0)
    model = BaselineLlama(a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab, a.seq).to(a.device)
    if not amp:
        model = model.to(torch.bfloat16)
    if compile:
        model.compile(backend=compile_backend(a))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=a.device == "cuda")

    def step(batches):
        for ids, labels in batches:  # gradient accumulation: the mean over the step's micro-batches
            with torch.autocast(a.device, dtype=torch.bfloat16, enabled=amp):
                loss = model(ids, labels)
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def build_megacore(a, compile: bool, recompute: str | None = None, fp8: str | None = None,
                   fp8_weight_cache: bool = True) -> Callable:
    """GPTModel in bf16, DDP wrapper (fp32 main grads), MixedPrecisionOptimizer (fp32 masters, fused AdamW).

    ``recompute``: None, "full", or "selective:<module>+<module>" (core_attn, mlp_act).
    ``fp8``: None or a recipe of ``megacore.precision.fp8.apply_fp8`` ("tensorwise").
    ``fp8_weight_cache``: with fp8 and ``a.accum > 1``, quantize the weights once per step as the
    trainer does (``megacore.precision.fp8.fp8_weight_cache``), else in every micro-batch's pass.
    """
    import torch

    import megacore
    from megacore.distributed.ddp import DistributedDataParallel
    from megacore.models.gpt import GPTModel
    from megacore.models.init import materialize
    from megacore.training.optimizer import MixedPrecisionOptimizer

    cfg = transformer_config(a)
    with torch.device("meta"):
        model = GPTModel(cfg)
    if a.init == "deterministic":
        materialize(model, cfg, seed=0, device=a.device, dtype=torch.bfloat16)
    else:
        fast_init(model, cfg, a.device, torch.bfloat16)
    if recompute:
        gran, _, mods = recompute.partition(":")
        rc = megacore.RecomputeConfig(granularity=gran)
        if mods:
            rc.modules = mods.split("+")
        rc.validate()
        model.configure_recompute(rc)
    if fp8:
        from megacore.precision.fp8 import apply_fp8

        apply_fp8(model, recipe=fp8)
    if compile:
        from megacore.training.compile import compile_model

        compile_model(model, backend=compile_backend(a))
    ddp = DistributedDataParallel(model, dp_group=None)  # one process: no communication, fp32 main grads
    opt = MixedPrecisionOptimizer(ddp, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip_grad=1.0,
                                  master_weights=True)

    def weight_cache(n_micro):
        if not (fp8 and fp8_weight_cache and n_micro > 1):
            return contextlib.nullcontext()
        from megacore.precision.fp8 import fp8_weight_cache as cache

        return cache([model])

    def step(batches):
        with weight_cache(len(batches)):
            for i, (ids, labels) in enumerate(batches):  # gradient accumulation into the fp32 main grads
                with ddp.no_sync() if i < len(batches) - 1 else contextlib.nullcontext():
                    loss = ddp(ids, labels=labels, reduction="mean")
                    (loss / len(batches)).backward()
        opt.step()
        opt.zero_grad()
        return loss

    return step


def fast_init(model, cfg, device, dtype) -> None:
    """Allocate a meta-device GPTModel on ``device`` and draw its weights there with the init kinds of
    ``megacore.models.init`` (normal / scaled_normal / ones / zeros), without its per-name CPU generators."""
    import math

    import torch

    kinds = {n: getattr(p, "_megacore_init", None) for n, p in model.named_parameters()}
    model.to_empty(device=device)
    model.to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = kinds[name] or ("normal" if p.dim() >= 2 else "ones")
            if kind == "ones":
                p.fill_(1.0)
            elif kind == "zeros":
                p.zero_()
            else:
                std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers) if kind == "scaled_normal" else cfg.init_std
                p.normal_(0.0, std)


def timed_steps(a, step: Callable) -> dict:
    """Run ``a.warmup`` then ``a.steps`` steps of ``a.accum`` micro-batches each on random tokens;
    throughput, FLOP/s and peak memory. With ``a.profile`` (a directory), the timed steps run again
    under torch.profiler afterwards: a Chrome trace and a kernel summary by category go there."""
    import torch

    cuda = a.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator(device=a.device).manual_seed(0)
    accum = getattr(a, "accum", 1)
    tokens = [torch.randint(0, a.vocab, (a.mbs, a.seq + 1), device=a.device, generator=gen) for _ in range(4)]
    micro = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    batches = [[micro[(i + j) % 4] for j in range(accum)] for i in range(4)]
    t0 = time.perf_counter()
    loss = None
    for i in range(a.warmup):
        loss = step(batches[i % 4])
    sync()
    warm_s = time.perf_counter() - t0
    static_gb = None
    if cuda:  # between steps: weights, main grads, optimizer state (activations are gone)
        static_gb = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(a.steps):
        loss = step(batches[i % 4])
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / max(a.steps, 1)
    tps = accum * a.mbs * a.seq / (ms / 1e3)
    tflops = tps * flops_per_token(a) / 1e12
    out = {"step_ms": ms, "tokens_per_s": tps, "model_tflops": tflops, "mfu": tflops / PEAK_TFLOPS, "accum": accum,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "static_mem_gb": static_gb,
           "loss": float(loss) if loss is not None else None, "warmup_s": warm_s}
    if getattr(a, "profile", None):
        out["profile"] = profile_steps(a, step, batches)
    return out


# Kernel-name patterns -> category, first match wins (lower-case substrings).
KERNEL_CATEGORIES = [
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention")),
    ("fp8 gemm", ("f8", "fp8", "e4m3", "e5m2")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "_mm_")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "norm_kernel")),
    ("nccl", ("nccl",)),
]


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other (elementwise, norms, casts, reductions)"


def profile_steps(a, step: Callable, batches, steps: int = 3) -> dict:
    """Profile ``steps`` steps; per-step GPU time by kernel category and the top kernels, printed and
    returned; the Chrome trace goes to ``a.profile``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    steps = min(steps, a.steps) or 1

    os.makedirs(a.profile, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(batches[i % 4])
        if a.device == "cuda":
            torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(a.profile, f"trace-{getattr(a, 'one', None) or 'run'}.json"))
    by_cat: dict = {}
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)
        if us <= 0 or e.key.startswith("ProfilerStep"):
            continue
        if getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
            continue
        cat = kernel_category(e.key)
        by_cat[cat] = by_cat.get(cat, 0.0) + us / 1e3 / steps
        kernels.append((us / 1e3 / steps, e.count // steps, e.key[:110]))
    kernels.sort(reverse=True)
    lines = [f"GPU ms per step by category ({getattr(a, 'one', '')}):"]
    lines += [f"  {cat:<48}{ms:9.2f}" for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    lines.append(f"  {'total kernel time':<48}{sum(by_cat.values()):9.2f}")
    lines.append("top kernels (ms per step, calls per step):")
    lines += [f"  {ms:8.2f} {n:5d}  {name}" for ms, n, name in kernels[:25]]
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(a.profile, f"kernels-{getattr(a, 'one', None) or 'run'}.txt"), "w") as f:
        f.write(text + "\n")
    return {"ms_per_step_by_category": by_cat}


def environment(a) -> dict:
    import torch

    from megacore.kernels import get_kernel_backend

    env = {"torch": torch.__version__, "kernels": get_kernel_backend(), "device": a.device}
    if a.device == "cuda":
        env["device"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def fmt(v, spec: str, width: int) -> str:
    """``v`` formatted with ``spec`` and right-aligned; "-" for None."""
    if isinstance(v, (int, float)):
        return format(v, spec).rjust(width)
    return str(v if v is not None else "-").rjust(width)
