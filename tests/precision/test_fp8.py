"""FP8 linear (tensorwise dynamic scaling): kernel vs plain-torch emulation, fallback, model conversion,
tensor parallelism, compile, and the configuration errors.

On CPU ``torch._scaled_mm`` runs the fp8 GEMMs (torch >= 2.13); where it does not exist the CPU
kernel checks skip. The ``gpu`` tests run the same on CUDA (bf16, H100-class GPUs).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import megacore
from megacore.config import ConfigError, PrecisionConfig, RunConfig
from megacore.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megacore.models.gpt import GPTModel
from megacore.precision.fp8 import (E4M3, E5M2, Float8Linear, Fp8Matmul, apply_fp8, fp8_device_problem, fp8_linear,
                                    fp8_linear_reference, fp8_supported, fp8_weight_cache, quantize_dequantize,
                                    quantize_weight)
from megacore.sharding import peek_meta
from tests.dist.harness import run_distributed

needs_cpu_fp8 = pytest.mark.skipif(not fp8_supported("cpu"), reason="this torch has no CPU torch._scaled_mm")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run(fn, x, w, b, g):
    """Output and (dx, dW, db) of ``fn`` on fresh leaf copies."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, (None if b is None else b.grad)


def _operands(dtype, m_shape=(2, 16), k=64, n=48, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    b = torch.randn(n, generator=gen)
    g = torch.randn(*m_shape, n, generator=gen)
    return [t.to(device, dtype) for t in (x, w, b, g)]


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------ numerics
def test_quantize_dequantize_is_on_the_fp8_grid():
    t = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3
    amax = t.abs().max()
    for dtype, mantissa in ((E4M3, 3), (E5M2, 2)):
        d = quantize_dequantize(t, dtype)
        assert d.dtype == torch.float32
        assert d.abs().max() == pytest.approx(amax.item(), rel=1e-6)  # amax maps to FP8_MAX exactly
        torch.testing.assert_close(quantize_dequantize(d, dtype), d, rtol=1e-6, atol=0)  # on the grid already
        big = t.abs() > amax / 16  # well inside the normal range: relative rounding error <= 2^-(m+1)
        rel_err = ((d - t).abs() / t.abs())[big].max().item()
        assert rel_err <= 2.0 ** -(mantissa + 1) * (1 + 1e-5), (dtype, rel_err)
    zero = quantize_dequantize(torch.zeros(16, 16), E4M3)  # amax clamped to EPS: no nan
    assert torch.equal(zero, torch.zeros(16, 16))


@needs_cpu_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_and_is_close_to_high_precision(dtype):
    x, w, b, g = _operands(dtype)
    with _OpCounter() as ops:
        got = _run(fp8_linear, x, w, b, g)
    assert ops.counts.get("_scaled_mm") == 3, ops.counts  # forward, dgrad, wgrad: all fp8
    ref = _run(fp8_linear_reference, x, w, b, g)
    exact = _run(F.linear, x.float(), w.float(), b.float(), g.float())
    tight = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the output
    for what, a, r, e in zip(("y", "dx", "dW", "db"), got, ref, exact):
        assert a.dtype == dtype and a.shape == r.shape, what
        assert _rel(a, r) <= tight, f"{what}: kernel vs reference {_rel(a, r):.3g}"
        # fp8 vs fp32: e4m3 (3 mantissa bits) forward, e5m2 (2 bits) gradients -> a few percent
        assert _rel(a, e) <= (0.05 if what == "y" else 0.10), f"{what}: fp8 vs fp32 {_rel(a, e):.3g}"
    assert _rel(got[0], exact[0]) > 1e-3  # it really did quantize


@needs_cpu_fp8
def test_only_requested_gradients_are_computed():
    x, w, _, g = _operands(torch.float32)
    w.requires_grad_()
    with _OpCounter() as ops:
        fp8_linear(x, w).backward(g)  # x needs no grad: no dgrad GEMM
    assert ops.counts.get("_scaled_mm") == 2 and w.grad is not None


@pytest.mark.parametrize("shape", [((2, 5), 64, 48), ((2, 16), 40, 48), ((2, 16), 64, 20), ((0, 16), 64, 48)])
def test_fallback_for_unaligned_shapes_is_plain_linear(shape):
    m_shape, k, n = shape
    x, w, b, g = _operands(torch.float32, m_shape, k, n)
    with _OpCounter() as ops:
        got = _run(fp8_linear, x, w, b, g)
    assert "_scaled_mm" not in ops.counts
    want = _run(F.linear, x, w, b, g)
    for a, r in zip(got, want):
        assert torch.equal(a, r)


# ------------------------------------------------------------------------------------------- model
def _config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                vocab_size=100, seq_length=8, vocab_padding_multiple=64)
    base.update(kw)
    return megacore.TransformerConfig(**base)


def _batch(cfg, b=2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    return ids.to(device), torch.roll(ids, -1, 1).to(device)


def test_apply_fp8_converts_linears_but_not_the_output_layer():
    cfg = _config()
    plain, fp8 = GPTModel(cfg, seed=1), GPTModel(cfg, seed=1)
    keys = list(fp8.state_dict())
    assert apply_fp8(fp8) == 4 * cfg.num_layers  # qkv, proj, fc1, fc2 per layer
    assert apply_fp8(fp8) == 0  # idempotent
    assert list(fp8.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(fp8.state_dict().values(), plain.state_dict().values()))
    assert type(fp8.output_layer) is nn.Linear and type(fp8.embedding.word_embeddings) is nn.Embedding
    layer = fp8.decoder.layers["0"]
    for lin in (layer.self_attention.linear_qkv, layer.self_attention.linear_proj, layer.mlp.linear_fc1,
                layer.mlp.linear_fc2):
        assert type(lin) is Float8Linear and isinstance(lin, nn.Linear)
    with pytest.raises(ValueError, match="not known"):
        apply_fp8(plain, recipe="rowwise")
    assert apply_fp8(GPTModel(cfg, seed=1), skip=("output_layer", "mlp")) == 2 * cfg.num_layers


@needs_cpu_fp8
def test_fp8_model_loss_and_grads_are_close_to_the_plain_model():
    cfg = _config()
    plain, fp8 = GPTModel(cfg, seed=1), GPTModel(cfg, seed=1)
    apply_fp8(fp8)
    ids, labels = _batch(cfg)
    losses = []
    for model in (plain, fp8):
        loss = model(ids, labels=labels)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= 0.03 * abs(losses[0]), losses
    for (name, p), q in zip(fp8.named_parameters(), plain.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert _rel(p.grad, q.grad) < 0.2, f"{name}: {_rel(p.grad, q.grad):.3g}"
    with _OpCounter() as ops:
        fp8(ids, labels=labels).backward()
    assert ops.counts.get("_scaled_mm") == 3 * 4 * cfg.num_layers, ops.counts


@needs_cpu_fp8
def test_fp8_layer_compiles_without_graph_breaks():
    """A converted TransformerLayer, forward + backward, under torch.compile(fullgraph=True) (raises on
    any graph break; aot_eager traces the backward too) matches eager."""
    import torch._dynamo

    cfg = _config(num_layers=1)
    model = GPTModel(cfg, seed=0)
    apply_fp8(model)
    layer = model.decoder.layers["0"]
    x = torch.randn(2, cfg.seq_length, cfg.hidden_size, requires_grad=True)
    rotary = model.rotary(cfg.seq_length, x.device, x.dtype)
    torch._dynamo.reset()
    try:
        out = torch.compile(layer, backend="aot_eager", fullgraph=True)(x, rotary)
        out.square().sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        ref = layer(x_ref, rotary)
        ref.square().sum().backward()
        assert _rel(out.detach(), ref.detach()) < 1e-5
        assert _rel(x.grad, x_ref.grad) < 1e-5
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------- weight cache
@needs_cpu_fp8
def test_cached_weight_gives_identical_output_and_gradients():
    x, w, b, g = _operands(torch.bfloat16, (2, 16), 64, 48)
    plain = _run(fp8_linear, x, w, b, g)
    cached = _run(lambda x_, w_, b_: fp8_linear(x_, w_, b_, weight_fp8=quantize_weight(w_.detach())), x, w, b, g)
    for what, a, c in zip(("y", "dx", "dW", "db"), plain, cached):
        assert torch.equal(a, c), what
    w8, w8_t, w_inv = quantize_weight(w)
    assert w8.dtype == E4M3 and torch.equal(w8_t, w8.t().contiguous()) and w8_t.is_contiguous()
    assert torch.equal(w8.float() * w_inv, quantize_dequantize(w, E4M3))


def _accumulate(model, batches, cache: bool):
    """Summed gradients of ``batches`` (one optimizer step's micro-batches), with or without the cache."""
    model.zero_grad(set_to_none=True)
    with fp8_weight_cache([model]) if cache else contextlib.nullcontext():
        for ids, labels in batches:
            model(ids, labels=labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@needs_cpu_fp8
@pytest.mark.parametrize("compiled", [False, True])
def test_weight_cache_over_micro_batches_is_bit_identical_and_never_stale(compiled):
    """Two accumulated micro-batches with the cache give exactly the uncached gradients (eager, and
    with every layer compiled: aot_eager traces forward and backward); the cache lives only inside
    the context, so after a weight update the next forward uses the new weights."""
    import torch._dynamo

    from megacore.training.compile import compile_model

    cfg = _config()
    model = GPTModel(cfg, seed=3)
    n_fp8 = apply_fp8(model)
    batches = [_batch(cfg, seed=s) for s in (0, 1)]
    torch._dynamo.reset()
    try:
        if compiled:
            compile_model(model, fullgraph=True, backend="aot_eager")
        plain = _accumulate(model, batches, cache=False)
        if compiled:  # (a dispatch-mode op counter cannot run under torch.compile)
            cached = _accumulate(model, batches, cache=True)
        else:
            with _OpCounter() as ops:
                cached = _accumulate(model, batches, cache=True)
            # 2 micro-batches x 3 GEMMs per fp8 linear, and each weight quantized once (one amax per
            # weight on entry, one per activation and per gradient in each pass) instead of twice.
            assert ops.counts.get("_scaled_mm") == 2 * 3 * n_fp8, ops.counts
            assert ops.counts.get("amax") == n_fp8 + 2 * 2 * n_fp8, ops.counts
        for name in plain:
            assert torch.equal(plain[name], cached[name]), name
        assert all(m.matmul.weight_cache is None for m in model.modules() if isinstance(m, Float8Linear))
        ids, labels = batches[0]
        with torch.no_grad():
            before = model(ids, labels=labels)
            for p in model.parameters():
                p.mul_(0.5)
            after = model(ids, labels=labels)
            with fp8_weight_cache([model]):
                inside = model(ids, labels=labels)
        assert not torch.equal(before, after)
        assert torch.equal(after, inside)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------- tensor parallel
def _tp_cases(rank, world):
    """Column- and row-parallel layers with ``fp8`` on (dense reference layer 32 -> 32, 16-aligned
    local shards): each rank's result equals the fp8 reference applied to its own shards (each rank
    scales its local operands), and stays close to the fp32 dense layer."""
    import megacore.parallel as P
    from megacore.parallel.tensor_parallel import full_tensor

    failures = []
    state = P.initialize(tensor=world)
    group = state.tp_group
    gen = torch.Generator().manual_seed(3)
    B, S, H, O = 2, 8, 32, 32
    x = torch.randn(B, S, H, generator=gen)
    upstream = torch.randn(B, S, O, generator=gen)
    ref = nn.Linear(H, O)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(O, H, generator=gen) * H ** -0.5)
        ref.bias.copy_(torch.randn(O, generator=gen))

    def check(tag, got, want, tol):
        err = _rel(got, want)
        if not err <= tol:
            failures.append(f"{tag}: rel err {err:.3g} > {tol}")

    for kind in ("column", "row"):
        cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
        layer = cls(H, O, tp_group=group)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                full = getattr(ref, name)
                p.copy_(peek_meta(p).shard(full))
        assert apply_fp8(layer) == 1 and isinstance(layer.matmul, Fp8Matmul)
        w_local = layer.weight.detach()
        if kind == "column":
            x_in, g = x, upstream.chunk(world, -1)[rank]
            want = fp8_linear_reference(x, w_local, layer.bias.detach())
            dense = ref(x).chunk(world, -1)[rank]
        else:
            x_in, g = x.chunk(world, -1)[rank], upstream
            parts = [fp8_linear_reference(xr, wr) for xr, wr in zip(x.chunk(world, -1), ref.weight.chunk(world, 1))]
            want = sum(parts) + ref.bias
            dense = ref(x)
        x_in = x_in.clone().requires_grad_(True)
        with _OpCounter() as ops:
            y = layer(x_in)
            (y * g).sum().backward()
        if ops.counts.get("_scaled_mm") != 3:
            failures.append(f"{kind}: _scaled_mm calls {ops.counts.get('_scaled_mm')}")
        check(f"{kind} forward vs fp8 reference", y.detach(), want.detach(), 1e-5)
        check(f"{kind} forward vs fp32 dense", y.detach(), dense.detach(), 0.05)
        ref.zero_grad()
        (ref(x) * upstream).sum().backward()
        check(f"{kind} weight grad vs fp32 dense", full_tensor(layer.weight, layer.weight.grad), ref.weight.grad, 0.1)
    P.destroy()
    return failures


@needs_cpu_fp8
def test_tp_layers_with_fp8_match_per_shard_reference():
    assert run_distributed(_tp_cases, world_size=2) == [[], []]


# -------------------------------------------------------------------------------------------- config
def test_config_and_trainer_errors_are_clear(monkeypatch):
    with pytest.raises(ConfigError, match=r"precision.fp8='tensorwise'.*compute capability >= 8.9.*device=cuda"):
        RunConfig(precision=PrecisionConfig(fp8="tensorwise"), device="cpu").validate()
    assert "device is cpu" in fp8_device_problem("cpu")

    import megacore.precision.fp8 as fp8_module

    monkeypatch.setattr(fp8_module.torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(fp8_module.torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100")
    msg = fp8_device_problem(torch.device("cuda", 0))
    assert "A100" in msg and "8.0" in msg and "precision.fp8=null" in msg
    monkeypatch.setattr(fp8_module.torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert fp8_device_problem(torch.device("cuda", 0)) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="device=auto resolves to CUDA here")
def test_trainer_rejects_fp8_when_auto_resolves_to_cpu():
    from megacore.training.trainer import Trainer

    cfg = RunConfig(precision=PrecisionConfig(fp8="tensorwise"), device="auto")
    with pytest.raises(ConfigError, match="precision.fp8.*device is cpu.*precision.fp8=null"):
        Trainer(cfg).setup()


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_fp8_linear_bf16_on_cuda_matches_reference():
    if not fp8_supported("cuda"):
        pytest.skip("needs compute capability >= 8.9")
    x, w, b, g = _operands(torch.bfloat16, (4, 128), 256, 384, device="cuda")
    with _OpCounter() as ops:
        got = _run(fp8_linear, x, w, b, g)
    assert ops.counts.get("_scaled_mm") == 3, ops.counts
    ref = _run(fp8_linear_reference, x, w, b, g)
    exact = _run(F.linear, x.float(), w.float(), b.float(), g.float())
    for what, a, r, e in zip(("y", "dx", "dW", "db"), got, ref, exact):
        assert a.dtype == torch.bfloat16, what
        assert _rel(a, r) <= 1e-2, f"{what}: kernel vs reference {_rel(a, r):.3g}"
        assert _rel(a, e) <= (0.05 if what == "y" else 0.10), f"{what}: fp8 vs fp32 {_rel(a, e):.3g}"


@pytest.mark.gpu
def test_fp8_model_trains_under_compile_on_cuda():
    """A tiny bf16 model with fp8 linears, every layer compiled with fullgraph=True (a graph break
    raises), inductor: a few AdamW steps run, the loss drops, and it tracks the eager fp8 model."""
    if not fp8_supported("cuda"):
        pytest.skip("needs compute capability >= 8.9")
    import torch._dynamo

    from megacore.training.compile import compile_model

    cfg = _config(hidden_size=256, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=512,
                  vocab_size=1000, seq_length=128, vocab_padding_multiple=128)
    ids, labels = _batch(cfg, b=2, device="cuda")
    losses = {}
    torch._dynamo.reset()
    try:
        for mode in ("eager", "compiled"):
            model = GPTModel(cfg, seed=0).cuda().to(torch.bfloat16)
            assert apply_fp8(model) == 4 * cfg.num_layers
            if mode == "compiled":
                compile_model(model, fullgraph=True)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            losses[mode] = []
            for _ in range(4):
                opt.zero_grad(set_to_none=True)
                loss = model(ids, labels=labels)
                loss.backward()
                opt.step()
                losses[mode].append(loss.item())
    finally:
        torch._dynamo.reset()
    for mode, ls in losses.items():
        assert all(torch.isfinite(torch.tensor(ls))), (mode, ls)
        assert ls[-1] < ls[0], (mode, ls)
    assert abs(losses["compiled"][0] - losses["eager"][0]) < 0.05 * losses["eager"][0], losses


@pytest.mark.gpu
def test_trainer_quantizes_weights_once_per_step_and_changes_no_number_on_cuda(tmp_path, monkeypatch):
    """``megacore train`` with fp8 and 4 micro-batches per step (compiled layers, bf16): the trainer
    enters the weight cache once per step, and its loss and grad-norm curve equals the run without
    the cache (bf16 tolerance: cuDNN attention's backward need not be bitwise reproducible)."""
    if not fp8_supported("cuda"):
        pytest.skip("needs compute capability >= 8.9")
    import json
    import os

    import megacore.precision.fp8 as fp8_module
    from megacore.config import load_run_config
    from megacore.training.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    overrides = ["model.num_layers=2", "model.hidden_size=256", "model.num_attention_heads=8",
                 "model.num_query_groups=4", "model.ffn_hidden_size=704", "model.seq_length=128",
                 "model.vocab_size=1024", "data.source=mock", "train.global_batch_size=8", "train.micro_batch_size=2",
                 "train.iters=6", "train.warmup_iters=2", "train.lr=1e-3", "train.eval_interval=0",
                 "precision.dtype=bf16", "precision.fp8=tensorwise", "device=cuda", "compile=true", "log.interval=1",
                 "checkpoint.dir=null", "checkpoint.interval=0"]
    entered = []
    real_cache = fp8_module.fp8_weight_cache

    def counting_cache(models):
        entered.append(1)
        return real_cache(models)

    def run(name):
        cfg = load_run_config(os.path.join(root, "configs/tiny_cpu.yaml"), [*overrides, f"log.dir={tmp_path / name}"])
        Trainer(cfg).run()
        with open(tmp_path / name / "metrics.jsonl") as f:
            return [r for r in map(json.loads, f) if "loss" in r]

    monkeypatch.setattr(fp8_module, "fp8_weight_cache", counting_cache)
    cached = run("cached")
    assert len(entered) == 6
    monkeypatch.setattr(Trainer, "_fp8_weight_cache", lambda self, n: contextlib.nullcontext())
    plain = run("plain")
    assert len(entered) == 6 and len(cached) == len(plain) == 6
    for a, b in zip(cached, plain):
        assert abs(a["loss"] - b["loss"]) <= 2e-3 * abs(b["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 2e-2 * abs(b["grad_norm"]), (a["grad_norm"], b["grad_norm"])
