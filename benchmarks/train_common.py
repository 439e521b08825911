"""Shared pieces of the training benchmarks: the plain-PyTorch baseline, megacore through its trainer, and a timed step loop.

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
    p.add_argument("--experts", type=int, default=None, help="MoE: experts per layer (default: dense MLPs)")
    p.add_argument("--topk", type=int, default=2, help="MoE: experts per token")
    p.add_argument("--moe-ffn", type=int, default=None, help="MoE: expert width (default: --ffn)")
    p.add_argument("--model-args", default="", help="more megacore model fields, comma-separated, for megacore's "
                                                    "variants and the FLOPs count (e.g. model.moe_aux_loss_coeff=0.01,"
                                                    "model.multi_latent_attention=true)")
    p.add_argument("--run-args", default="", help="more run-config overrides for megacore's variants only, comma-"
                                                  "separated, not model fields (e.g. precision.master_weights=false)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor on cuda, "
                                                           "eager on cpu)")


def transformer_config(a):
    import megacore

    return megacore.TransformerConfig(
        num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads, num_query_groups=a.kv_heads,
        ffn_hidden_size=a.ffn, vocab_size=a.vocab, seq_length=a.seq, vocab_padding_multiple=128,
        num_experts=getattr(a, "experts", None), moe_top_k=getattr(a, "topk", 2),
        moe_ffn_hidden_size=getattr(a, "moe_ffn", None), **model_args(a))


def model_args(a) -> dict:
    """``--model-args`` as TransformerConfig fields (values parsed as YAML: 512, true, null, ...)."""
    import yaml

    out = {}
    for item in filter(None, getattr(a, "model_args", "").split(",")):
        key, _, value = item.partition("=")
        if not key.startswith("model."):
            raise SystemExit(f"--model-args: {item!r} is not a model.<field>=<value> override")
        out[key[len("model."):]] = yaml.safe_load(value)
    return out


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
    moe = (a.experts, a.topk, a.moe_ffn or a.ffn) if getattr(a, "experts", None) else None
    model = BaselineLlama(a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab, a.seq, moe).to(a.device)
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
    """megacore as ``megacore train`` runs it: a ``RunConfig`` of the same model and step shape, the
    ``Trainer`` (whose model and optimizer come from the composition root, ``megacore.compose``),
    and its own ``train_step`` on the mock data source: bf16 params, fp32 main grads and master
    weights, fused AdamW, grad clipping at 1.0. The step's random tokens come from the trainer's
    data path, so the ``batches`` argument of the returned step is unused.

    ``recompute``: None, "full", or "selective:<module>+<module>" (core_attn, mlp_act).
    ``fp8``: None or a ``precision.fp8`` recipe ("tensorwise").
    ``fp8_weight_cache``: False switches off the trainer's once-per-step weight quantization (to
    measure what it saves).
    """
    import tempfile

    from megacore.config import load_run_config
    from megacore.training.trainer import Trainer

    overrides = [f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}",
                 f"model.num_attention_heads={a.heads}", f"model.num_query_groups={a.kv_heads}",
                 f"model.ffn_hidden_size={a.ffn}", f"model.vocab_size={a.vocab}", f"model.seq_length={a.seq}",
                 "model.vocab_padding_multiple=128", "data.source=mock", f"device={a.device}",
                 f"precision.dtype={'bf16' if a.device == 'cuda' else 'fp32'}",
                 f"precision.fp8={fp8 or 'null'}", f"compile={str(compile).lower()}",
                 f"train.micro_batch_size={a.mbs}", f"train.global_batch_size={a.mbs * getattr(a, 'accum', 1)}",
                 "train.iters=1000000", "train.lr=1e-4", "train.min_lr=1e-4", "train.warmup_iters=0",
                 "train.weight_decay=0.1", "train.adam_beta1=0.9", "train.adam_beta2=0.95", "train.clip_grad=1.0",
                 "train.eval_interval=0", "checkpoint.dir=null", f"log.dir={tempfile.mkdtemp(prefix='bench-')}"]
    if getattr(a, "experts", None):
        overrides += [f"model.num_experts={a.experts}", f"model.moe_top_k={a.topk}",
                      f"model.moe_ffn_hidden_size={a.moe_ffn or a.ffn}"]
    overrides += [o for o in a.model_args.split(",") if o]
    overrides += [o for o in getattr(a, "run_args", "").split(",") if o]
    if recompute:
        granularity, _, modules = recompute.partition(":")
        overrides.append(f"recompute.granularity={granularity}")
        if modules:
            overrides.append(f"recompute.modules=[{','.join(modules.split('+'))}]")
    cfg = load_run_config(None, overrides)
    trainer = Trainer(cfg)
    trainer.setup()
    if not fp8_weight_cache:
        trainer._fp8_weight_cache = lambda num_micro: contextlib.nullcontext()
    steps = iter(range(10**9))

    class Loss:  # read only when the benchmark asks (the trainer's step leaves its numbers unread)
        def __init__(self, pending):
            self.pending = pending

        def __float__(self):
            return float(self.pending.resolve().loss)

    def step(batches):
        return Loss(trainer.train_step(next(steps)))

    return step


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
