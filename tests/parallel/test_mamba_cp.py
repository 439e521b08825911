"""Context parallelism of Mamba-2 mixers (``megacore.parallel.mamba_context_parallel``).

- The state-passing math on one process: a sequence cut into pieces, each scanned from a zero state,
  the pieces' incoming states from the chunk-level recurrence, and the correction added, equals the
  step-by-step recurrence (``ssd_reference``) on the whole sequence, values and gradients (fp64).
- A hybrid stack "M*M-" built the trainer's way (``compose.build_run_model`` + ``build_optimizer``)
  under CP2 (also with full recomputation), CP2×TP2+SP, CP2×DP2 and CP4 equals the one-process model on the same global batch (fp32): the
  loss, every gradient this rank holds (its ``ParamMeta.shard`` of the one-device gradient) and the
  optimizer's grad norm, within 1e-5 relative (gradients: relative to the largest element). The
  attention layers keep the all-gather CP path in the same model.
- A CP chunk shorter than the conv's look-back is refused by the support table.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from megacore.config import ParallelConfig, RecomputeConfig, RunConfig, TrainConfig, TransformerConfig
from megacore.kernels import triton_available
from megacore.layers.mamba import ssd_chunked, ssd_reference
from megacore.parallel.mamba_context_parallel import add_incoming_state, chunk_log_decay, incoming_states
from tests.dist.harness import run_distributed
from tests.parallel.rank_batch import rank_batch

TOL = 1e-5
MODEL = dict(num_layers=4, layer_pattern="M*M-", hidden_size=32, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=48, vocab_size=64, vocab_padding_multiple=4, seq_length=16,
             mamba_head_dim=8, mamba_state_dim=8, mamba_num_groups=2, mamba_chunk_size=4,
             position_embedding="rope", activation="squared_relu")
BATCH = 2


def _inputs(b=2, s=24, h=4, p=3, g=2, n=5):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, h, p, generator=gen, dtype=torch.float64)
    dt = torch.rand(b, s, h, generator=gen, dtype=torch.float64) * 0.5 + 0.05
    A = -torch.rand(h, generator=gen, dtype=torch.float64) - 0.2
    B = torch.randn(b, s, g, n, generator=gen, dtype=torch.float64)
    C = torch.randn(b, s, g, n, generator=gen, dtype=torch.float64)
    D = torch.randn(h, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


@pytest.mark.parametrize("pieces", [2, 4, 6])
def test_state_passing_equals_the_recurrence(pieces):
    inputs = _inputs()
    x, dt, A, B, C, D = inputs
    want_y, want_final = ssd_reference(x, dt, A, B, C, D)
    want_grads = torch.autograd.grad((want_y * want_y.detach().cos()).sum() + want_final.sum(), inputs)

    splits = [t.chunk(pieces, dim=1) for t in (x, dt, B, C)]
    ys, finals, decays, lams = [], [], [], []
    for xs, dts, Bs, Cs in zip(*splits):
        y, final = ssd_chunked(xs, dts, A, Bs, Cs, 4, D=D)
        lam = chunk_log_decay(dts, A)
        ys.append(y), finals.append(final), decays.append(torch.exp(lam[:, -1])), lams.append(lam)
    finals, decays = torch.stack(finals), torch.stack(decays)
    entering = incoming_states(finals, decays)
    y = torch.cat([add_incoming_state(ys[k], splits[3][k], lams[k], entering[k]) for k in range(pieces)], dim=1)
    final = entering[-1] * decays[-1][..., None, None] + finals[-1]
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, want_final, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((y * want_y.detach().cos()).sum() + final.sum(), inputs)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def _data(seq):
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 64, (BATCH, seq), generator=g), torch.randint(0, 64, (BATCH, seq), generator=g)


def _reference(model_cfg):
    from megacore.models import GPTModel

    ref = GPTModel(TransformerConfig(**model_cfg), seed=7).train()
    ids, labels = _data(model_cfg["seq_length"])
    loss = ref(ids, labels=labels, reduction="sum") / labels.numel()
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    return loss.item(), grads, norm


def _layout(rank, world, parallel: dict, extra: dict, recompute: dict | None = None, kernels: str = "auto") -> dict:
    import megacore.parallel as P
    from megacore.compose import build_optimizer, build_run_model
    from megacore.layers.mamba import MambaMixer
    from megacore.sharding import peek_meta

    model_cfg = {**MODEL, **extra}
    cfg = RunConfig(model=TransformerConfig(**model_cfg), parallel=ParallelConfig(**parallel),
                    train=TrainConfig(seed=7, lr=1e-3, clip_grad=0.0, global_batch_size=BATCH, micro_batch_size=1),
                    recompute=RecomputeConfig(**(recompute or {})))
    cfg.validate(world_size=world)
    state = P.initialize(**cfg.parallel.mesh_sizes())
    P.model_parallel_seed(1)
    try:
        (model,) = build_run_model(cfg, state, device="cpu", dtype=torch.float32)
        mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
        assert mixers and all(m.context_parallel is not None for m in mixers)
        opt, _ = build_optimizer(cfg, [model], state)
        ids, labels = _data(model_cfg["seq_length"])
        ids, labels, kwargs = rank_batch(ids, labels, state)
        from megacore.kernels import kernel_backend

        import importlib

        scan_module = importlib.import_module("megacore.kernels.ssd_scan")  # (the package re-exports a function of that name)

        launched, triton_scan = [], scan_module.ssd_scan_triton
        scan_module.ssd_scan_triton = lambda *a, **k: launched.append(1) or triton_scan(*a, **k)
        try:
            with kernel_backend(kernels):  # "triton": each chunk's conv and scan through the Triton kernels
                share = model(ids, labels=labels, reduction="sum", **kwargs) / (BATCH * model_cfg["seq_length"])
                share.backward()
        finally:
            scan_module.ssd_scan_triton = triton_scan
        assert bool(launched) == (kernels == "triton"), (kernels, len(launched))
        info = opt.step()
        want_loss, want_grads, want_norm = _reference(model_cfg)
        counted = share.detach().double() if state.tp_rank == 0 else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(counted)
        errors = {"loss": abs(counted.item() - want_loss) / want_loss,
                  "grad_norm": abs(float(info.grad_norm) - want_norm) / want_norm}
        for name, p in model.module.named_parameters():
            want = peek_meta(p).shard(want_grads[name])
            errors[f"grad {name}"] = ((p.main_grad - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
        worst = max(errors.values())
        return {k: v for k, v in errors.items() if not v <= TOL}, worst
    finally:
        P.destroy()


def _layouts(rank, world, layouts):
    return {name: _layout(rank, world, *settings) for name, *settings in layouts}


def _check(results, layouts, world):
    assert len(results) == world
    for res in results:
        for name, *_ in layouts:
            errors, worst = res[name]
            assert errors == {}, (name, errors)
            print(f"{name}: worst relative error {worst:.2e}")


def test_mamba_cp2_matches_one_device():
    layouts = [("cp2", dict(context=2), {}),
               ("cp2_full_recompute", dict(context=2), {}, dict(granularity="full"))]
    if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":  # (tests/conftest.py sets it on CPU)
        layouts.append(("cp2_triton_kernels", dict(context=2), {}, None, "triton"))
    _check(run_distributed(_layouts, world_size=2, args=(layouts,), timeout_s=400), layouts, 2)


def test_mamba_cp_four_rank_layouts_match_one_device():
    layouts = [("cp2_tp2_sp", dict(tensor=2, context=2, sequence_parallel=True), {}),
               ("cp2_dp2", dict(context=2), {}),
               ("cp4", dict(context=4), dict(seq_length=32))]  # chunks of 4 >= the conv's look-back of 3
    _check(run_distributed(_layouts, world_size=4, args=(layouts,), timeout_s=400), layouts, 4)


def test_chunk_shorter_than_the_conv_look_back_is_refused():
    from megacore.config import ConfigError
    from megacore.config.support import check_supported

    cfg = RunConfig(model=TransformerConfig(**MODEL), parallel=ParallelConfig(context=4),
                    train=TrainConfig(global_batch_size=BATCH, micro_batch_size=1))
    with pytest.raises(ConfigError, match="mamba_conv_kernel-1=3"):  # chunks of 16 / 8 = 2 positions
        check_supported(cfg, world_size=4)
    with pytest.raises(ConfigError, match="mamba_conv_kernel-1=3"):  # RunConfig.validate runs the table
        cfg.validate(world_size=4)
