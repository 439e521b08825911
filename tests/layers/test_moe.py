"""MoE layer against a per-token fp64 loop written from the formulas (router softmax -> top-k ->
optional renormalization -> weighted sum of the chosen experts' MLPs), the load-balancing loss
against its one-hot definition, and the attached aux-loss gradient against adding the loss by hand."""

import pytest
import torch


from megacore.config import TransformerConfig
from megacore.layers.moe import MoELayer, load_balancing_loss, set_aux_loss_scale
from megacore.models import GPTModel
from tests.layers import reference as ref

H, F = 16, 12


def _config(**kw):
    base = dict(hidden_size=H, num_attention_heads=2, ffn_hidden_size=F, num_experts=6, moe_top_k=2,
                activation="swiglu")
    return TransformerConfig(**{**base, **kw}).validate()


def _layer(cfg, seed=0):
    return ref.random_moe_layer(cfg, seed)


def _per_token_reference(layer: MoELayer, x_TH: torch.Tensor, top_k: int, norm_topk: bool, activation: str):
    """out[t] = Σ_j w_tj · fc2_e(act(fc1_e(x_t))) over the top-k experts e of token t, token by token."""
    outs = []
    for t in range(x_TH.shape[0]):
        probs = torch.softmax(x_TH[t] @ layer.router.weight.T, dim=-1)
        weights, experts = probs.topk(top_k)
        if norm_topk:
            weights = weights / weights.sum()
        y = torch.zeros(H, dtype=torch.float64)
        for w, e in zip(weights, experts.tolist()):
            y = y + w * ref.mlp(x_TH[t][None], layer.experts.linear_fc1[e], layer.experts.linear_fc2[e], activation)[0]
        outs.append(y)
    return torch.stack(outs)


@pytest.mark.parametrize("top_k,norm_topk,activation", [(2, True, "swiglu"), (2, False, "gelu"), (1, True, "geglu"),
                                                         (3, False, "swiglu")])
def test_moe_layer_matches_per_token_loop(top_k, norm_topk, activation):
    cfg = _config(moe_top_k=top_k, moe_router_norm_topk=norm_topk, activation=activation)
    layer = _layer(cfg)
    x = torch.randn(2, 5, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    got = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    want = _per_token_reference(layer, x_ref.reshape(-1, H), top_k, norm_topk, activation).view(2, 5, H)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # 10 tokens x top_k over 6 experts: some experts get none, which must be fine.
    upstream = torch.randn(2, 5, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(got, [x, *layer.parameters()], upstream)
    grads_ref = torch.autograd.grad(want, [x_ref, *layer.parameters()], upstream)
    for g, w in zip(grads, grads_ref):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_load_balancing_loss_matches_one_hot_definition():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(40, 8, generator=g), dim=-1)
    experts = probs.topk(2, dim=-1).indices
    one_hot = torch.nn.functional.one_hot(experts, 8).float()       # [T, k, E]
    want = 8 * (one_hot.mean(dim=0).sum(dim=0) * probs.mean(dim=0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs, experts), want)
    # Perfectly uniform routing gives k.
    uniform = torch.full((8, 4), 0.25)
    spread = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]])
    assert load_balancing_loss(uniform, spread).item() == pytest.approx(2.0)


def test_aux_loss_gradient_equals_adding_it_to_the_loss():
    """loss.backward() with moe_aux_loss_coeff c and scale s gives the gradients of
    loss + c·s·Σ_layers aux, while the returned loss stays the LM loss."""
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=F, vocab_size=40, seq_length=8,
                num_experts=4, moe_top_k=2)
    coeff, scale = 0.3, 0.25
    ids = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(4))
    model = GPTModel(TransformerConfig(**base, moe_aux_loss_coeff=coeff), seed=5)
    set_aux_loss_scale(model, scale)
    loss = model(ids, labels=ids)
    loss.backward()

    plain = GPTModel(TransformerConfig(**base), seed=5)
    auxes = []
    for layer in plain.decoder.layers.values():
        layer.mlp.router.register_forward_hook(lambda mod, inp, out: auxes.append(out.balance_loss))
    plain_loss = plain(ids, labels=ids)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    (plain_loss + coeff * scale * sum(auxes)).backward()
    router_grads = 0
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        router_grads += "router" in name
    assert router_grads == 2
    # The aux term really moves the router gradient (the test would pass vacuously otherwise).
    zero = GPTModel(TransformerConfig(**base), seed=5)
    zero(ids, labels=ids).backward()
    assert (zero.decoder.layers["0"].mlp.router.weight.grad - model.decoder.layers["0"].mlp.router.weight.grad
            ).abs().max() > 1e-4


def test_moe_config_errors():
    from megacore.config import ConfigError

    for kw, words in [(dict(num_experts=1), "num_experts"), (dict(moe_top_k=7), "moe_top_k"),
                      (dict(moe_aux_loss_coeff=-1.0), "moe_aux_loss_coeff"),
                      (dict(moe_ffn_hidden_size=0), "moe_ffn_hidden_size")]:
        with pytest.raises(ConfigError, match=words):
            _config(**kw)
    with pytest.raises(ValueError, match="add_bias_linear"):
        MoELayer(_config(add_bias_linear=True))


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_of_moe_layers_gives_identical_gradients(granularity):
    """Full recomputation re-runs the router on the same input: same routing, same gradients (aux
    included). Selective ``mlp_act`` recomputes the routed and shared experts' activation."""
    from megacore.config import RecomputeConfig

    base = dict(num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=F, vocab_size=40, seq_length=8,
                num_experts=4, moe_top_k=2, moe_aux_loss_coeff=0.2, moe_shared_expert_hidden_size=8,
                moe_shared_expert_gate=True)
    ids = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(6))
    grads = []
    for setting in (None, granularity):
        model = GPTModel(TransformerConfig(**base), seed=5)
        model.configure_recompute(RecomputeConfig(granularity=setting, modules=["mlp_act"])
                                  if setting == "selective" else RecomputeConfig(granularity=setting))
        if setting == "selective":
            assert model.decoder.layers["0"].mlp.experts.recompute_activation
            assert model.decoder.layers["0"].mlp.shared_expert.recompute_activation
        model(ids, labels=ids).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        means = [layer.mlp.pop_aux_mean() for layer in model.decoder.layers.values()]
        assert all(m is not None and torch.isfinite(m) for m in means)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)
