"""Multi-token prediction (megacore.layers.mtp) on one device: the objective against a hand-built
computation from the model's own weights, the reported loss equal to the main loss, gradients
reaching the depths and the shared embedding/head, mtp_num_layers=0 leaving the model unchanged,
MoE depths, and generation ignoring the depths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megacore.config import TransformerConfig
from megacore.layers.mtp import MultiTokenPrediction
from megacore.models import GPTModel

B, S, V = 2, 12, 100


def _config(**kw) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=40,
                vocab_size=V, seq_length=16, rotary_base=1000.0, mtp_num_layers=2, mtp_loss_weight=0.3)
    base.update(kw)
    return TransformerConfig(**base)


def _model(**kw) -> GPTModel:
    """fp64, with random norm scales (init makes them ones) so a swapped norm would show."""
    model = GPTModel(_config(**kw), seed=0).double()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.cat([ids[:, 1:], torch.randint(0, V, (B, 1), generator=g)], dim=1)
    labels[0, 4] = -100           # a masked label: main position 4, depth-1 position 3, depth-2 position 2
    labels[1, S - 1] = -100
    loss_mask = torch.ones(B, S, dtype=torch.float64)
    loss_mask[1, 6] = 0.0         # a loss-masked target
    return ids, labels, loss_mask


def _rms(x, w, eps):
    """RMSNorm as megacore computes it: statistics in fp32, then scaled in the input dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _hand_objective(model: GPTModel, ids, labels, loss_mask):
    """(main loss, [S_k / N per depth], objective) written out in plain torch from the weights:
    depth k at position i embeds ids[i + k], predicts labels[i + k]; CE_k weighted by
    loss_mask[i + k], summed, divided by the main loss's token count N."""
    cfg = model.config
    eps = cfg.norm_epsilon
    table = model.embedding.word_embeddings.weight
    out_w = model.output_weight()
    rotary, mask = model.attention_inputs(S, B, ids.device, table.dtype)
    h = model.decoder(model.embedding(ids), rotary, mask)  # h^0: after the main final norm

    def ce(hidden_normed, targets):
        logits = (hidden_normed @ out_w.T)[..., :V]
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100,
                               reduction="none").view(targets.shape)

    weights = (labels != -100).double() * loss_mask
    n = weights.sum()
    main = (ce(h, labels) * weights).sum() / n
    terms = []
    for k, depth in enumerate(model.mtp.layers, start=1):
        ids_k = torch.zeros_like(ids)
        ids_k[:, :S - k] = ids[:, k:]
        emb = table[ids_k]
        x = torch.cat([_rms(emb, depth.enorm.weight, eps), _rms(h, depth.hnorm.weight, eps)], -1) @ depth.eh_proj.weight.T
        h = depth.layer(x, rotary, mask)
        targets = torch.full_like(labels, -100)
        targets[:, :S - k] = labels[:, k:]
        w_k = torch.zeros_like(loss_mask)
        w_k[:, :S - k] = weights[:, k:]
        terms.append((ce(_rms(h, depth.final_norm.weight, eps), targets) * w_k).sum() / n)
    objective = main + cfg.mtp_loss_weight / cfg.mtp_num_layers * sum(terms)
    return main, terms, objective


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mtp_objective_matches_hand_built(reduction):
    model = _model()
    ids, labels, loss_mask = _batch()
    main, terms, objective = _hand_objective(model, ids, labels, loss_mask)
    want = torch.autograd.grad(objective, list(model.parameters()), allow_unused=True)

    model.zero_grad()
    model.mtp.pop_losses()
    if reduction == "mean":
        loss = model(ids, labels=labels, loss_mask=loss_mask)
    else:  # what the schedules do: per-token losses, then the masked sum over the token count
        token_loss = model(ids, labels=labels, reduction="none")
        n = ((labels != -100).double() * loss_mask).sum()
        loss = (token_loss * loss_mask).sum() / n
    # The reported loss is the main LM loss, bit for bit what the model without MTP returns.
    no_mtp = GPTModel(_config(mtp_num_layers=0), seed=0).double()
    no_mtp.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    if reduction == "mean":
        assert torch.equal(loss.detach(), no_mtp(ids, labels=labels, loss_mask=loss_mask).detach())
    else:
        assert torch.equal(token_loss.detach(), no_mtp(ids, labels=labels, reduction="none").detach())
    torch.testing.assert_close(loss, main, rtol=1e-12, atol=1e-12)
    loss.backward()
    for (name, p), g in zip(model.named_parameters(), want):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12, msg=name)
    # The logged terms: S_k / N per depth, accumulated by the backward.
    torch.testing.assert_close(model.mtp.pop_losses(), torch.stack(terms).detach().float(), rtol=1e-6, atol=1e-7)
    assert model.mtp.pop_losses().abs().sum() == 0  # popped: starts over


def test_gradients_reach_depths_and_shared_embedding_and_head():
    model = _model()
    ids, labels, _ = _batch()
    model(ids, labels=labels).backward()
    with_mtp = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in with_mtp.items() if n.startswith("mtp.")), with_mtp.keys()
    # The shared table and head get the depths' gradient on top of the main loss's.
    model.zero_grad()
    main_only = model.config.mtp_loss_weight
    model.mtp.loss_weight = 0.0
    model(ids, labels=labels).backward()
    model.mtp.loss_weight = main_only
    for name in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.layers.1.mlp.linear_fc2.weight"):
        assert (with_mtp[name] - model.get_parameter(name).grad).abs().max() > 1e-8, name


def test_tied_embeddings_share_the_table():
    model = _model(tie_embeddings=True)
    ids, labels, loss_mask = _batch()
    assert model.output_layer is None and model.mtp.embedding is None
    table = model.embedding.word_embeddings.weight
    _, _, objective = _hand_objective(model, ids, labels, loss_mask)
    want = torch.autograd.grad(objective, [table])[0]
    model.zero_grad()
    model(ids, labels=labels, loss_mask=loss_mask).backward()
    torch.testing.assert_close(table.grad, want, rtol=1e-9, atol=1e-12)


def test_zero_depths_leave_the_model_unchanged():
    a = GPTModel(_config(mtp_num_layers=0), seed=5)
    b = GPTModel(_config(mtp_num_layers=0, mtp_loss_weight=0.7), seed=5)
    plain = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=40,
                 vocab_size=V, seq_length=16, rotary_base=1000.0)
    c = GPTModel(TransformerConfig(**plain), seed=5)
    assert a.mtp is None
    sa, sc = a.state_dict(), c.state_dict()
    assert list(sa) == list(sc) and all(torch.equal(sa[k], sc[k]) for k in sa)
    assert list(b.state_dict()) == list(sc)
    # With depths, the main model's parameters are the same (names and values): init is by name.
    d = GPTModel(_config(mtp_num_layers=1), seed=5)
    sd = d.state_dict()
    assert all(torch.equal(sd[k], sc[k]) for k in sc)
    assert sorted(set(sd) - set(sc)) == sorted(k for k in sd if k.startswith("mtp.layers.0."))
    assert d.mtp.layers[0].layer.layer_number == 2  # global numbering after the decoder's layers


def test_moe_depth_follows_is_moe_layer_and_trains():
    cfg = dict(num_experts=4, moe_top_k=2, moe_first_k_dense=1, moe_aux_loss_coeff=0.01, mtp_num_layers=1)
    model = GPTModel(_config(**cfg), seed=0)
    from megacore.layers.moe import MoELayer

    assert isinstance(model.mtp.layers[0].layer.mlp, MoELayer)  # layer 2 >= moe_first_k_dense
    ids, labels, _ = _batch()
    model(ids, labels=labels).backward()
    assert model.mtp.layers[0].layer.mlp.router.weight.grad.abs().sum() > 0


def test_generation_ignores_the_depths():
    from megacore.inference.sampling import generate

    model = _model(mtp_num_layers=1).float()
    plain = GPTModel(_config(mtp_num_layers=0), seed=0)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, max_new_tokens=6)
    ref = generate(plain, prompt, max_new_tokens=6)
    assert torch.equal(out, ref)
    with torch.no_grad():
        assert torch.equal(model(prompt), plain(prompt))


def test_config_validation_and_embedding_copy():
    with pytest.raises(Exception, match="mtp_num_layers"):
        _config(mtp_num_layers=-1).validate()
    assert MultiTokenPrediction(_config(mtp_num_layers=1)).embedding is None
    # A last pipeline stage without the embedding holds a copy of the table under the embedding's name,
    # initialized like it; with tied embeddings that copy is the output weight.
    full = GPTModel(_config(mtp_num_layers=1, tie_embeddings=True), seed=2)
    last = GPTModel(_config(mtp_num_layers=1, tie_embeddings=True), seed=2, pre_process=False, layer_numbers=[1])
    assert last.output_layer is None and last.output_weight() is last.mtp.embedding.weight
    assert torch.equal(last.mtp.embedding.weight, full.embedding.word_embeddings.weight)


@pytest.mark.parametrize("moe", [False, True])
def test_flops_count_the_mtp_depths(moe):
    """N of the FLOPs formula equals the matmul parameters a token meets, MTP depths included (their
    eh_proj, layer and the shared output head, counted once per depth), checked against torch's FLOP
    count of a forward and backward (its plain attention computes every pair: twice the causal term)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megacore.config import TransformerConfig
    from megacore.models import GPTModel
    from megacore.training.flops import flops_per_token, matmul_params

    # top_k = E: every expert sees every token; the reference experts run F.linear, which the counter knows
    extra = dict(num_experts=4, moe_top_k=4, moe_first_k_dense=1, moe_experts_backend="reference") if moe else {}
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, vocab_size=64,
                            vocab_padding_multiple=64, seq_length=8, mtp_num_layers=2, attention_backend="reference",
                            **extra).validate()
    model = GPTModel(cfg, seed=0)
    n = sum(p.numel() for name, p in model.named_parameters()
            if p.dim() >= 2 and "word_embeddings" not in name and "mtp.embedding" not in name)
    head = cfg.hidden_size * cfg.vocab_size
    assert matmul_params(cfg) == n + cfg.mtp_num_layers * head  # the head's weight, used once more per depth
    ids = torch.randint(0, 64, (2, cfg.seq_length))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).backward()
    attention = 6.0 * cfg.hidden_size * cfg.seq_length
    layers = cfg.num_layers + cfg.mtp_num_layers
    assert flops_per_token(cfg) == 6.0 * matmul_params(cfg) + layers * attention
    assert counter.get_total_flops() == (6.0 * matmul_params(cfg) + 2 * layers * attention) * ids.numel()
