"""Every router choice against an fp64 per-token reference written from the formulas of
``megacore.layers.moe.router`` / ``balancing`` (values and the gradients of the weights and losses
wrt the router weight and the input): softmax and sigmoid scores, the expert bias, group-limited
routing, the routed scaling, the z-loss, each load-balancing loss type, the capacity drop (a hand
case and the layer's output against the reference with the dropped assignments removed), padding
to capacity, the buffer's life (fp32 under casts, zero after materialize, in the state dict) and the
step-end bias update against a hand-computed case."""

import math

import pytest
import torch


from megacore.config import TransformerConfig
from megacore.layers.moe import MoELayer, Routing, TopKRouter
from megacore.layers.moe.router import drop_over_capacity
from tests.layers import reference as ref

H, F, E = 16, 12, 8


def _config(**kw):
    base = dict(hidden_size=H, num_attention_heads=2, ffn_hidden_size=F, num_experts=E, moe_top_k=2,
                activation="swiglu")
    return TransformerConfig(**{**base, **kw}).validate()


def _router(cfg, seed=0, bias=None):
    router = TopKRouter(cfg).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g, dtype=torch.float64))
        if bias is not None:
            router.expert_bias.copy_(bias)
    return router


def _input(b=3, s=5, seed=1):
    return torch.randn(b, s, H, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 0.5


# ---------------------------------------------------------------------------- the reference
def _route_token(x_H, W, cfg, bias=None):
    """One token, from the formulas: (expert indices, weights) of its top-k, and its logits."""
    logits = W @ x_H
    s = torch.softmax(logits, -1) if cfg.moe_router_score == "softmax" else torch.sigmoid(logits)
    c = [float(v) for v in s.detach()]
    if bias is not None:
        c = [v + float(b) for v, b in zip(c, bias.double())]
    if cfg.moe_router_num_groups is not None:
        size = E // cfg.moe_router_num_groups
        group_score = [sum(sorted(c[g * size:(g + 1) * size])[-2:]) for g in range(cfg.moe_router_num_groups)]
        best = sorted(range(len(group_score)), key=lambda g: -group_score[g])[:cfg.moe_router_group_topk]
        c = [v if e // size in best else -math.inf for e, v in enumerate(c)]
    experts = sorted(range(E), key=lambda e: -c[e])[:cfg.moe_top_k]
    w = torch.stack([s[e] for e in experts])
    if cfg.moe_router_norm_topk:
        w = w / w.sum()
    return experts, w * cfg.moe_routed_scaling_factor, logits


def _reference(x_BSH, W, cfg, bias=None):
    """(experts [T][k], weights [T, k], balance loss, z-loss) by per-token loops."""
    b, s, _ = x_BSH.shape
    tokens = x_BSH.reshape(-1, H)
    routed = [_route_token(tokens[t], W, cfg, bias) for t in range(b * s)]
    experts = [r[0] for r in routed]
    weights = torch.stack([r[1] for r in routed])
    logits = torch.stack([r[2] for r in routed])

    def aux(rows):  # E · Σ_e f_e P_e over the tokens ``rows``
        p = torch.stack([torch.softmax(logits[t], -1) if cfg.moe_router_score == "softmax" else
                         torch.sigmoid(logits[t]) / torch.sigmoid(logits[t]).sum() for t in rows])
        f = [sum(experts[t].count(e) for t in rows) / len(rows) for e in range(E)]
        return E * sum(f[e] * p[:, e].mean() for e in range(E))

    if cfg.moe_aux_loss_type == "sequence":
        balance = sum(aux(range(i * s, (i + 1) * s)) for i in range(b)) / b
    else:
        balance = aux(range(b * s))
    z = sum(torch.logsumexp(logits[t], -1) ** 2 for t in range(b * s)) / (b * s)
    return experts, weights, balance, z


def _check_against_reference(cfg, bias=None, seed=0):
    router = _router(cfg, seed, bias)
    x = _input().requires_grad_(True)
    routing = router(x)
    x_ref = x.detach().clone().requires_grad_(True)
    experts, weights, balance, z = _reference(x_ref, router.weight, cfg, router.expert_bias)
    assert routing.experts_TK.tolist() == experts
    torch.testing.assert_close(routing.weights_TK, weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(routing.balance_loss, balance, rtol=1e-12, atol=1e-12)
    counts = torch.bincount(torch.tensor(experts).reshape(-1), minlength=E).double()
    torch.testing.assert_close(routing.tokens_per_expert, counts)
    assert routing.capacity is None
    got = [routing.weights_TK, routing.balance_loss]
    want = [weights, balance]
    if cfg.moe_z_loss_coeff > 0:
        torch.testing.assert_close(routing.z_loss, z, rtol=1e-12, atol=1e-12)
        got.append(routing.z_loss)
        want.append(z)
    else:
        assert routing.z_loss is None
    # Gradients wrt the router weight and the input, through each output on its own.
    g = torch.Generator().manual_seed(9)
    for a, b in zip(got, want):
        up = torch.randn(a.shape, generator=g, dtype=torch.float64)
        ga = torch.autograd.grad((a * up).sum(), [router.weight, x], retain_graph=True)
        gb = torch.autograd.grad((b * up).sum(), [router.weight, x_ref], retain_graph=True)
        for u, v in zip(ga, gb):
            assert u.abs().max() > 0
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    return routing


CASES = {
    "softmax": dict(),
    "softmax_unnormalized_scaled": dict(moe_router_norm_topk=False, moe_routed_scaling_factor=2.5),
    "sigmoid": dict(moe_router_score="sigmoid"),
    "sigmoid_bias": dict(moe_router_score="sigmoid", moe_router_bias_update_rate=1e-3),
    "sigmoid_scaled_k3": dict(moe_router_score="sigmoid", moe_routed_scaling_factor=2.5, moe_top_k=3),
    "groups": dict(moe_router_score="sigmoid", moe_router_num_groups=4, moe_router_group_topk=2,
                   moe_router_bias_update_rate=1e-3),
    "softmax_groups": dict(moe_router_num_groups=2, moe_router_group_topk=1),
    "z_loss": dict(moe_z_loss_coeff=1e-3),
    "sigmoid_z_loss_sequence": dict(moe_router_score="sigmoid", moe_z_loss_coeff=1e-3, moe_aux_loss_type="sequence"),
    "sequence": dict(moe_aux_loss_type="sequence"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_router_matches_per_token_reference(name):
    cfg = _config(**CASES[name])
    bias = None
    if cfg.moe_router_bias_update_rate > 0:  # large enough to change choices
        bias = torch.randn(E, generator=torch.Generator().manual_seed(4)) * 0.3
    _check_against_reference(cfg, bias)


def test_bias_changes_the_choice_not_the_weights():
    cfg = _config(moe_router_score="sigmoid", moe_router_bias_update_rate=1e-3, moe_router_norm_topk=False)
    x = _input()
    plain = _router(cfg)(x)
    bias = torch.zeros(E)
    bias[5] = 10.0  # every token must pick expert 5, with its own sigmoid score as weight
    routed = _router(cfg, bias=bias)(x)
    assert (routed.experts_TK == 5).any(dim=-1).all()
    logits = x.reshape(-1, H) @ _router(cfg).weight.T
    slot = (routed.experts_TK == 5).double().argmax(dim=-1)
    torch.testing.assert_close(routed.weights_TK.gather(1, slot[:, None])[:, 0], torch.sigmoid(logits[:, 5]))
    assert not torch.equal(plain.experts_TK, routed.experts_TK)


def test_group_limit_keeps_only_the_best_groups():
    """A hand case: groups {0,1} {2,3} {4,5} {6,7}; group scores = top-2 sums."""
    from megacore.layers.moe.router import limit_to_groups

    c = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.8, 0.1, 0.3, 0.3]])
    # scores 0.9, 1.0, 0.9, 0.6: the best two are {2,3} and one of the 0.9 ties
    out = limit_to_groups(c, 4, 2)
    assert out[0, 2] == 0.5 and out[0, 3] == 0.5 and torch.isinf(out[0, 6:]).all()
    assert torch.isinf(out[0, :2]).all() != torch.isinf(out[0, 4:6]).all()
    # the top-2 sum, not the max: a group with one high expert loses to a group of two good ones
    c = torch.tensor([[0.95, 0.0, 0.6, 0.6]])
    assert torch.isinf(limit_to_groups(c, 2, 1)[0, :2]).all()


def test_global_batch_loss_equals_micro_batch_loss_of_all_ranks_tokens():
    """Two 'ranks' in one process, each router handed a fake reduce_counts (its counts + the
    other's): the mean of the two losses, and the sum of their gradients / 2, equal the micro-batch
    loss of the concatenated tokens."""
    cfg_g = _config(moe_aux_loss_type="global_batch")
    cfg_m = _config()
    xs = [_input(2, 5, seed=10), _input(2, 5, seed=11)]
    counts = [_router(cfg_m)(x).tokens_per_expert for x in xs]
    losses, router = [], _router(cfg_g)
    router.train()
    for r, x in enumerate(xs):
        calls = []
        router.reduce_counts = lambda c, r=r: calls.append(c) or c + counts[1 - r]
        routing = router(x)
        assert len(calls) == 1 and torch.equal(calls[0], counts[r])
        losses.append(routing.balance_loss)
    got = (losses[0] + losses[1]) / 2
    whole = _router(cfg_m)
    want = whole(torch.cat(xs)).balance_loss
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got, router.weight)[0]
    g_want = torch.autograd.grad(want, whole.weight)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    # Without the strategy (one DP rank), or outside training, it is the micro-batch loss.
    router.reduce_counts = None
    torch.testing.assert_close(router(xs[0]).balance_loss, _router(cfg_m)(xs[0]).balance_loss)
    router.reduce_counts = lambda c: 1 / 0
    router.eval()
    with torch.no_grad():
        torch.testing.assert_close(router(xs[0]).balance_loss, _router(cfg_m)(xs[0]).balance_loss)


def test_sequence_loss_is_the_mean_of_per_sequence_losses():
    cfg_s, cfg_m = _config(moe_aux_loss_type="sequence"), _config()
    x = _input(4, 6, seed=12)
    got = _router(cfg_s)(x).balance_loss
    want = sum(_router(cfg_m)(x[b:b + 1]).balance_loss for b in range(4)) / 4
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert abs(got - _router(cfg_m)(x).balance_loss) > 1e-6  # a different loss indeed


# ---------------------------------------------------------------------------- capacity
def test_capacity_drop_hand_case():
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 1]])
    w, e = drop_over_capacity(weights, experts, capacity=2, num_experts=3)
    # expert 0: 0.6 0.7 0.9 -> drop token 0's 0.6; expert 1: 0.4 0.1 0.5 -> drop token 2's 0.1;
    # expert 2: 0.3 0.5 -> both kept
    assert e.tolist() == [[3, 1], [0, 2], [0, 3], [2, 1]]
    assert w.tolist() == [[0.0, 0.4], [0.7, 0.3], [0.9, 0.0], [0.5, 0.5]]
    # ties: the earlier token stays
    w, e = drop_over_capacity(torch.full((3, 1), 0.5), torch.zeros(3, 1, dtype=torch.long), 2, 2)
    assert e[:, 0].tolist() == [0, 0, 2] and w[:, 0].tolist() == [0.5, 0.5, 0.0]


def _layer(cfg, seed=0):
    return ref.random_moe_layer(cfg, seed)


def _layer_reference(layer, x_BSH, cfg):
    """Per-token reference of the layer output with the capacity applied by hand: per expert, its
    assignments sorted by weight (descending, earlier token first), the first C kept."""
    x_TH = x_BSH.reshape(-1, H)
    routed = [_route_token(x_TH[t], layer.router.weight, cfg) for t in range(x_TH.shape[0])]
    capacity = math.ceil(cfg.moe_capacity_factor * len(routed) * cfg.moe_top_k / E)
    kept = set()
    for e in range(E):
        mine = [(t, j) for t, (experts, _, _) in enumerate(routed) for j, x in enumerate(experts) if x == e]
        mine.sort(key=lambda tj: (-routed[tj[0]][1][tj[1]].item(), tj[0]))
        kept.update(mine[:capacity])
    outs = []
    for t, (experts, w, _) in enumerate(routed):
        y = torch.zeros(H, dtype=torch.float64)
        for j, e in enumerate(experts):
            if (t, j) in kept:
                y = y + w[j] * ref.mlp(x_TH[t][None], layer.experts.linear_fc1[e], layer.experts.linear_fc2[e],
                                       cfg.activation)[0]
        outs.append(y)
    return torch.stack(outs).view(x_BSH.shape), len(routed) * cfg.moe_top_k - len(kept)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_capacity_layer_matches_reference_without_dropped_assignments(score):
    cfg = _config(moe_capacity_factor=0.6, moe_router_score=score, moe_experts_backend="reference")
    layer = _layer(cfg)
    x = _input(2, 8, seed=13).requires_grad_(True)
    got = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    want, dropped = _layer_reference(layer, x_ref, cfg)
    assert dropped > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    up = torch.randn(got.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = [layer.router.weight, layer.experts.linear_fc1, layer.experts.linear_fc2]
    for a, b in zip(torch.autograd.grad(got, [x, *params], up), torch.autograd.grad(want, [x_ref, *params], up)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("auto", torch.float32)])
def test_pad_to_capacity_equals_the_unpadded_capacity_path(backend, dtype):
    outs = []
    for pad in (False, True):
        cfg = _config(moe_capacity_factor=0.6, moe_pad_to_capacity=pad, moe_experts_backend=backend)
        layer = _layer(cfg).to(dtype)
        x = _input(2, 8, seed=14).to(dtype).requires_grad_(True)
        routing = layer.router(x)
        assert routing.capacity == (math.ceil(0.6 * 16 * 2 / E) if pad else None)
        y = layer(x)
        y.backward(torch.ones_like(y))
        outs.append([y.detach(), x.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- the bias buffer
def test_expert_bias_is_a_persistent_fp32_buffer_zeroed_by_materialize():
    from megacore.models import GPTModel
    from megacore.models.init import materialize

    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=F, vocab_size=32,
                            seq_length=8, num_experts=4, moe_router_bias_update_rate=1e-3).validate()
    with torch.device("meta"):
        model = GPTModel(cfg)
    materialize(model, cfg, seed=0, device="cpu", dtype=torch.bfloat16)
    router = model.decoder.layers["0"].mlp.router
    assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, torch.zeros(4))
    assert router.weight.dtype == torch.bfloat16
    router.expert_bias.add_(1e-4)  # a step bf16 would round away next to 1
    router.expert_bias.add_(1.0)
    model.to(torch.bfloat16).to(torch.float64)
    assert router.expert_bias.dtype == torch.float32 and router.expert_bias[0].item() == pytest.approx(1.0001, 1e-7)
    assert "decoder.layers.0.mlp.router.expert_bias" in model.state_dict()
    # without aux-loss-free balancing there is no buffer (checkpoints keep their keys)
    plain = TopKRouter(_config())
    assert plain.expert_bias is None and "expert_bias" not in plain.state_dict()


def test_expert_bias_kept_without_its_update():
    """moe_router_expert_bias: the buffer exists (fp32, zero, in the state dict) with no update rate,
    and the choice uses it; a rate > 0 implies it (has_expert_bias)."""
    from megacore.config import ConfigError

    kept = _config(moe_router_score="sigmoid", moe_router_expert_bias=True)
    assert kept.has_expert_bias and kept.moe_router_bias_update_rate == 0
    router = TopKRouter(kept)
    assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, torch.zeros(E))
    assert "expert_bias" in router.state_dict()
    assert _config(moe_router_bias_update_rate=1e-3).has_expert_bias and not _config().has_expert_bias
    bias = torch.zeros(E, dtype=torch.float64)
    bias[E - 1] = 10.0  # every token's choice includes the last expert
    routing = _router(kept, bias=bias)(_input())
    assert (routing.experts_TK == E - 1).any(dim=-1).all()
    with pytest.raises(ConfigError, match="moe_router_expert_bias"):
        _config(moe_router_expert_bias="yes")


def _moe_cfg(**kw):
    return TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=F, vocab_size=32,
                             seq_length=8, num_experts=4, **kw).validate()


def _fake_routing(counts, z=None):
    counts = torch.tensor(counts, dtype=torch.float32)
    return Routing(None, None, None, None if z is None else torch.tensor(z), counts)


def test_bias_update_and_load_metrics_hand_case():
    from megacore.training.moe import end_moe_step

    rate = 0.01
    cfg = _moe_cfg(moe_router_bias_update_rate=rate, moe_z_loss_coeff=1e-3)
    layers = [MoELayer(cfg), MoELayer(cfg)]
    for i, layer in enumerate(layers):
        layer.step_row = i
    # layer 0: two micro-batches, load [5, 1, 3, 3] (mean 3): the bias moves by rate·[-1, +1, 0, 0]
    layers[0].router.record_step(_fake_routing([2, 1, 3, 2], z=1.0))
    layers[0].router.record_step(_fake_routing([3, 0, 0, 1], z=3.0))
    # layer 1: load [0, 4, 2, 2] (mean 2)
    layers[1].router.record_step(_fake_routing([0, 4, 2, 2], z=5.0))
    metrics = end_moe_step(layers, cfg)
    assert layers[0].router.expert_bias.tolist() == pytest.approx([-rate, rate, 0.0, 0.0])
    assert layers[1].router.expert_bias.tolist() == pytest.approx([rate, -rate, 0.0, 0.0])
    # metrics over the layers' mean load per forward: [2.5, .5, 1.5, 1.5] + [0, 4, 2, 2] = [2.5, 4.5, 3.5, 3.5]
    total = torch.tensor([2.5, 4.5, 3.5, 3.5], dtype=torch.float64)
    want = {"moe_load_max": 4.5 / 3.5, "moe_load_min": 2.5 / 3.5,
            "moe_load_cv": total.std(correction=0).item() / 3.5, "moe_z_loss": (2.0 + 5.0) / 2}
    assert {k: v.item() for k, v in metrics.items()} == pytest.approx(want)
    # the step's counts were consumed; a skipped step (an unread device flag) leaves the bias
    before = [layer.router.expert_bias.clone() for layer in layers]
    layers[0].router.record_step(_fake_routing([9, 0, 0, 0]))
    end_moe_step(layers, cfg, skipped=torch.tensor(1.0))
    assert all(torch.equal(layer.router.expert_bias, b) for layer, b in zip(layers, before))
    end_moe_step(layers, cfg, skipped=True)
    assert all(torch.equal(layer.router.expert_bias, b) for layer, b in zip(layers, before))
    # no z-loss key without the z-loss; None for a dense model
    plain = _moe_cfg(moe_router_bias_update_rate=rate)
    assert set(end_moe_step([], plain)) == {"moe_load_max", "moe_load_min", "moe_load_cv"}
    assert end_moe_step([], TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=2,
                                              ffn_hidden_size=F, vocab_size=32, seq_length=8)) is None


def test_moe_layer_records_training_forwards_only():
    cfg = _config(moe_router_bias_update_rate=1e-3)
    layer = _layer(cfg).train()
    x = _input()
    layer(x)
    with torch.no_grad():
        layer(x)  # no grad: not a training forward
    layer.eval()
    layer(x)
    load, z = layer.router.pop_step()
    assert load.sum().item() == x.shape[0] * x.shape[1] * 2 and z is None
    load, z = layer.router.pop_step()  # nothing since: zero load
    assert load.abs().sum().item() == 0 and z is None
