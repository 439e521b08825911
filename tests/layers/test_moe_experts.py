"""The routed experts' fast path against its references: the grouped GEMM (``torch._grouped_mm``)
against one ``F.linear`` per expert, the whole ``Experts`` forward against a per-assignment loop
(outputs and every gradient), dropped assignments and capacity padding against dropping by hand,
and a compiled MoE layer: one graph, no recompilation across training forwards, same numbers as
eager."""

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.layers.mlp import gated_activation_reference
from megacore.layers.moe import Experts, MoELayer
from megacore.layers.moe.grouped_gemm import grouped_linear, grouped_linear_reference, grouped_mm_available

H, F, E = 16, 24, 5

needs_grouped = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")


def _config(**kw):
    base = dict(hidden_size=H, num_attention_heads=2, ffn_hidden_size=F, num_experts=E, moe_top_k=2,
                activation="swiglu")
    return TransformerConfig(**{**base, **kw}).validate()


def _experts(backend, dtype=torch.float32, seed=0):
    experts = Experts(_config(moe_experts_backend=backend))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return experts.to(dtype)


def _routing(tokens, k=2, seed=1, empty_expert=None):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(tokens, E, generator=g)
    if empty_expert is not None:
        scores[:, empty_expert] = -1e9  # nobody picks it
    weights, experts = torch.softmax(scores, -1).topk(k, dim=-1)
    return weights, experts


def _per_assignment_reference(experts, x_TH, weights_TK, experts_TK):
    """out[t] = Σ_s w[t,s] · fc2_e(act(fc1_e(x_t))), e = experts[t,s], skipping e == E (dropped); fp64."""
    fc1, fc2 = experts.linear_fc1.double(), experts.linear_fc2.double()
    out = []
    for t in range(x_TH.shape[0]):
        y = torch.zeros(H, dtype=torch.float64)
        for w, e in zip(weights_TK[t].double(), experts_TK[t].tolist()):
            if e == E:
                continue
            up = fc1[e] @ x_TH[t].double()
            y = y + w * (fc2[e] @ gated_activation_reference(up, "swiglu"))
        out.append(y)
    return torch.stack(out)


@needs_grouped
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_equals_one_linear_per_expert(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, H, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(E, F, H, generator=g).to(dtype).requires_grad_(True)
    ends = torch.tensor([4, 4, 11, 20, 23], dtype=torch.int32)  # expert 1 has no rows
    upstream = torch.randn(23, F, generator=g).to(dtype)
    got = grouped_linear(x, w, ends)
    want = grouped_linear_reference(x.detach().double().requires_grad_(True), w.detach().double(), ends)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    gx, gw = torch.autograd.grad(got, [x, w], upstream)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    rx, rw = torch.autograd.grad(grouped_linear_reference(x64, w64, ends), [x64, w64], upstream.double())
    torch.testing.assert_close(gx.double(), rx, **tol)
    torch.testing.assert_close(gw.double(), rw, **tol)
    assert gw[1].abs().max() == 0  # an expert without rows gets a zero gradient


@pytest.mark.parametrize("backend", ["reference", pytest.param("grouped_mm", marks=needs_grouped)])
@pytest.mark.parametrize("empty_expert", [None, 3])
def test_experts_forward_and_gradients_match_per_assignment_loop(backend, empty_expert):
    experts = _experts(backend)
    tokens = 13
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weights, chosen = _routing(tokens, empty_expert=empty_expert)
    weights.requires_grad_(True)
    got = experts(x, weights, chosen)
    x64 = x.detach().double().requires_grad_(True)
    w64 = weights.detach().double().requires_grad_(True)
    want = _per_assignment_reference(experts, x64, w64, chosen)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(tokens, H, generator=torch.Generator().manual_seed(3))
    params = [experts.linear_fc1, experts.linear_fc2]
    grads = torch.autograd.grad(got, [x, weights, *params], upstream)
    fc1_64 = experts.linear_fc1.detach().double().requires_grad_(True)
    fc2_64 = experts.linear_fc2.detach().double().requires_grad_(True)
    ref_experts = _experts("reference", torch.float64)
    with torch.no_grad():
        ref_experts.linear_fc1.copy_(fc1_64)
        ref_experts.linear_fc2.copy_(fc2_64)
    want = _per_assignment_reference(ref_experts, x64, w64, chosen)
    ref_grads = torch.autograd.grad(want, [x64, w64, ref_experts.linear_fc1, ref_experts.linear_fc2],
                                    upstream.double())
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
    if empty_expert is not None:
        assert grads[2][empty_expert].abs().max() == 0


@pytest.mark.parametrize("backend", ["reference", pytest.param("grouped_mm", marks=needs_grouped)])
def test_dropped_assignments_and_capacity_padding(backend):
    """Assignments marked with expert index E are left out; padding every expert to a capacity
    (empty slots are zero rows) changes nothing."""
    experts = _experts(backend)
    tokens = 11
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(4))
    weights, chosen = _routing(tokens)
    dropped = chosen.clone()
    dropped[[0, 3, 7], [1, 0, 1]] = E
    want = _per_assignment_reference(experts, x, weights, dropped)
    torch.testing.assert_close(experts(x, weights, dropped).double(), want, rtol=1e-5, atol=1e-5)
    capacity = int(torch.bincount(dropped[dropped < E], minlength=E).max()) + 2
    torch.testing.assert_close(experts(x, weights, dropped, capacity=capacity).double(), want, rtol=1e-5, atol=1e-5)


@needs_grouped
def test_auto_backend_picks_grouped_mm_where_it_can():
    experts = _experts("auto")
    assert grouped_mm_available(torch.zeros(2, H), experts.linear_fc1)
    assert not grouped_mm_available(torch.zeros(2, H, dtype=torch.float64), experts.linear_fc1.double())
    forced = _experts("grouped_mm", torch.float64)
    with pytest.raises(RuntimeError, match="moe_experts_backend='grouped_mm' cannot run torch.float64"):
        forced(torch.zeros(3, H, dtype=torch.float64), *_routing(3))


@needs_grouped
@pytest.mark.parametrize("router", [
    dict(moe_aux_loss_coeff=0.01),
    dict(moe_router_score="sigmoid", moe_router_bias_update_rate=1e-3, moe_router_num_groups=5, moe_router_group_topk=2,
         moe_routed_scaling_factor=2.5, moe_z_loss_coeff=1e-3, moe_aux_loss_coeff=1e-4, moe_aux_loss_type="sequence",
         moe_shared_expert_hidden_size=16),
], ids=["softmax", "deepseek"])
def test_compiled_moe_layer_is_one_graph_without_recompiles(router):
    """bf16 MoE layer (with the balance loss attached and logged, the step's load recorded) under
    torch.compile(fullgraph=True): several training forwards and pops of the logged means compile
    once and match eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    cfg = _config(**router)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    layer = layer.to(torch.bfloat16).train()
    assert layer.aux_accumulator.dtype == torch.float32
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 7, H, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(5))
    counters.clear()
    for i in range(4):
        out = compiled(x)
        out.float().square().sum().backward()
        if i % 2:
            compiled_mean = layer.pop_aux_mean()
            compiled_load, _ = layer.router.pop_step()
    assert counters["stats"]["unique_graphs"] == 1
    eager = layer(x)
    eager_mean = layer.pop_aux_mean()
    eager_load, _ = layer.router.pop_step()
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    torch.testing.assert_close(compiled_mean, eager_mean)
    torch.testing.assert_close(compiled_load, eager_load)
    assert eager_load.sum().item() == x.shape[0] * x.shape[1] * cfg.moe_top_k
