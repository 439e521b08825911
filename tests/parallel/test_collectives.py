"""Differentiable collectives: forward and backward against the single-process math of the
docstring table, on TP groups of 2 and 4, through both the gloo fallback and the flat-tensor path."""

import torch

import megacore.parallel as P
from megacore.parallel import collectives as C
from tests.dist.harness import run_distributed

B, S, H = 2, 8, 12


def _run(fn, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (y * grad_out).sum().backward()
    return y.detach(), x.grad


def _cases(t):
    """name -> (fn(x, group), input shape, output shape, expected(xs, gs, r) -> (y, dx))."""
    cat = torch.cat

    def chunk(x, dim, r):
        return x.chunk(t, dim=dim)[r]

    # Sequence-parallel shards split the batch's flattened tokens (B*S, batch-major).
    def tok(x):
        return x.reshape(-1, x.shape[-1])

    def sp_chunk(x, r):
        return chunk(tok(x), 0, r).view(x.shape[0], x.shape[1] // t, x.shape[2])

    def sp_cat(xs):
        return cat([tok(x) for x in xs], 0).view(xs[0].shape[0], xs[0].shape[1] * t, xs[0].shape[2])

    a2a_shape = (B, S // t, 4, 3)
    return {
        "copy_to_tp": (C.copy_to_tp, (B, S, H), (B, S, H),
                       lambda xs, gs, r: (xs[r], sum(gs))),
        "reduce_from_tp": (C.reduce_from_tp, (B, S, H), (B, S, H),
                           lambda xs, gs, r: (sum(xs), gs[r])),
        "scatter_to_tp_last_dim": (C.scatter_to_tp_last_dim, (B, S, H), (B, S, H // t),
                                   lambda xs, gs, r: (chunk(xs[r], -1, r), cat(gs, -1))),
        "gather_from_tp_last_dim": (C.gather_from_tp_last_dim, (B, S, H // t), (B, S, H),
                                    lambda xs, gs, r: (cat(xs, -1), chunk(gs[r], -1, r))),
        "scatter_to_sp": (C.scatter_to_sp, (B, S, H), (B, S // t, H),
                          lambda xs, gs, r: (sp_chunk(xs[r], r), sp_cat(gs))),
        "gather_from_sp": (C.gather_from_sp, (B, S // t, H), (B, S, H),
                           lambda xs, gs, r: (sp_cat(xs), sp_chunk(sum(gs), r))),
        "gather_from_sp_replicated_grad": (lambda x, g: C.gather_from_sp(x, g, grad_is_partial=False),
                                           (B, S // t, H), (B, S, H),
                                           lambda xs, gs, r: (sp_cat(xs), sp_chunk(gs[r], r))),
        "reduce_scatter_to_sp": (C.reduce_scatter_to_sp, (B, S, H), (B, S // t, H),
                                 lambda xs, gs, r: (sp_chunk(sum(xs), r), sp_cat(gs))),
        "all_to_all": (lambda x, g: C.all_to_all(x, g, scatter_dim=2, gather_dim=1), a2a_shape,
                       (B, S, 4 // t, 3),
                       lambda xs, gs, r: (cat([chunk(xs[j], 2, r) for j in range(t)], 1),
                                          cat([chunk(gs[k], 1, r) for k in range(t)], 2))),
    }


def _check_all(rank, world):
    failures = []
    for tensor in (world, 2):
        state = P.initialize(tensor=tensor)
        t, r, group = state.tp_size, state.tp_rank, state.tp_group
        for flat in (False, True):
            C.FORCE_FLAT_COLLECTIVES = flat
            for i, (name, (fn, in_shape, out_shape, expected)) in enumerate(_cases(t).items()):
                # Seed by TP group so the two groups of tensor=2 use different data.
                seed = 1000 * i + 17 * state.group_ranks["tp"][0] + tensor
                gen = torch.Generator().manual_seed(seed)
                xs = [torch.randn(in_shape, generator=gen, dtype=torch.float64) for _ in range(t)]
                gs = [torch.randn(out_shape, generator=gen, dtype=torch.float64) for _ in range(t)]
                y, dx = _run(lambda x: fn(x, group), xs[r], gs[r])
                y_ref, dx_ref = expected(xs, gs, r)
                for what, got, want in (("forward", y, y_ref), ("backward", dx, dx_ref)):
                    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-12, atol=1e-12):
                        failures.append(f"tensor={tensor} flat={flat} {name} {what}: shape {tuple(got.shape)} "
                                        f"vs {tuple(want.shape)}")
        C.FORCE_FLAT_COLLECTIVES = False
        P.destroy()
    # Uneven split: a clear error naming the size and the fix.
    P.initialize(tensor=world)
    try:
        C.scatter_to_sp(torch.zeros(1, world + 1, 2), P.get_state().tp_group)
        failures.append("uneven scatter did not raise")
    except ValueError as e:
        if "not divisible by the group size" not in str(e):
            failures.append(f"unclear error: {e}")
    P.destroy()
    return failures


def test_collectives_match_single_process_math():
    results = run_distributed(_check_all, world_size=4)
    assert results == [[]] * 4, results


def test_collectives_are_identity_without_a_group():
    x = torch.randn(B, S, H, requires_grad=True)
    for name, (fn, *_rest) in _cases(1).items():
        y = fn(x, None)
        assert y is x, name
