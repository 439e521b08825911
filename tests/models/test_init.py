"""Deterministic initialization: a seed defines the whole global model, whatever is built where."""

import math

import pytest
import torch
from torch import nn

from megacore.config import TransformerConfig
from megacore.models import GPTModel
from megacore.models.init import materialize
from megacore.sharding import param_meta, peek_meta

KINDS = {"normal", "scaled_normal", "ones", "zeros"}


def _config(**kw) -> TransformerConfig:
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=192,
                vocab_size=200, seq_length=16, init_std=0.05, add_qkv_bias=True, add_bias_linear=True,
                qk_norm=True)
    base.update(kw)
    return TransformerConfig(**base)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_every_parameter_declares_its_init():
    model = GPTModel(_config(normalization="LayerNorm"), seed=0)
    for name, p in model.named_parameters():
        assert peek_meta(p).init in KINDS, name


def test_same_seed_gives_identical_models_and_different_seeds_differ():
    cfg = _config()
    a, b, c = GPTModel(cfg, seed=7), GPTModel(cfg, seed=7), GPTModel(cfg, seed=8)
    _assert_same(_state(a), _state(b))
    for (name, pa), pc in zip(a.named_parameters(), c.parameters()):
        if peek_meta(pa).init in ("normal", "scaled_normal"):
            assert not torch.equal(pa, pc), name  # every random tensor depends on the seed
        else:
            assert torch.equal(pa, pc), name


def test_init_does_not_depend_on_global_rng():
    cfg = _config()
    torch.manual_seed(1)
    a = _state(GPTModel(cfg, seed=3))
    torch.manual_seed(2)
    _assert_same(a, _state(GPTModel(cfg, seed=3)))


def test_init_values_do_not_depend_on_the_default_device():
    """Under ``with torch.device(...)`` (how users build straight onto a GPU) the values are drawn on the
    CPU from the seeded CPU generator, so they equal a plain build (meta stands in for cuda here)."""
    cfg = _config()
    want = _state(GPTModel(cfg, seed=3))
    with torch.device("meta"):
        model = materialize(GPTModel(cfg, seed=3), cfg, seed=3, device="cpu")
    _assert_same(want, _state(model))


def test_same_shaped_parameters_get_independent_values():
    """Seeds come from the parameter name: layer 0 and layer 1 must not share weights."""
    model = GPTModel(_config(), seed=0)
    w0 = model.decoder.layers["0"].mlp.linear_fc1.weight
    w1 = model.decoder.layers["1"].mlp.linear_fc1.weight
    assert not torch.equal(w0, w1)
    corr = torch.corrcoef(torch.stack([w0.flatten(), w1.flatten()]))[0, 1]
    assert abs(corr) < 0.05


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_then_materialize_equals_eager_build(tie):
    cfg = _config(tie_embeddings=tie)
    eager = GPTModel(cfg, seed=11)
    with torch.device("meta"):
        lazy = GPTModel(cfg, seed=11)
    assert all(p.is_meta for p in lazy.parameters())
    materialize(lazy, cfg, 11)
    assert not any(p.is_meta for p in lazy.parameters())
    _assert_same(_state(eager), _state(lazy))
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lazy(ids), eager(ids), rtol=0, atol=0)
    if tie:
        assert lazy.output_weight() is lazy.embedding.word_embeddings.weight


def test_materialize_to_dtype_equals_cast_of_fp32_init():
    cfg = _config()
    eager = GPTModel(cfg, seed=5)
    with torch.device("meta"):
        lazy = GPTModel(cfg, seed=5)
    materialize(lazy, cfg, 5, dtype=torch.bfloat16)
    for (name, p), q in zip(lazy.named_parameters(), eager.parameters()):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, q.to(torch.bfloat16)), name


def test_init_statistics_within_sampling_error():
    cfg = _config()
    model = GPTModel(cfg, seed=2)
    scaled = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    seen = set()
    for name, p in model.named_parameters():
        kind = peek_meta(p).init
        seen.add(kind)
        if kind == "ones":
            assert torch.equal(p, torch.ones_like(p)), name
        elif kind == "zeros":
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            sigma = cfg.init_std if kind == "normal" else scaled
            n = p.numel()
            x = p.detach().double().flatten()
            # Sample std has standard error sigma/sqrt(2n), the mean sigma/sqrt(n): allow 5 of each.
            assert abs(x.std().item() - sigma) < 5 * sigma / math.sqrt(2 * n), (name, x.std().item(), sigma)
            assert abs(x.mean().item()) < 5 * sigma / math.sqrt(n), name
    assert seen == KINDS  # the config exercises all four kinds
    # Residual-branch output projections are the scaled ones.
    layer = model.decoder.layers["0"]
    assert peek_meta(layer.self_attention.linear_proj.weight).init == "scaled_normal"
    assert peek_meta(layer.mlp.linear_fc2.weight).init == "scaled_normal"


def test_scaled_output_init_off_uses_plain_std():
    cfg = _config(scaled_output_init=False)
    w = GPTModel(cfg, seed=2).decoder.layers["0"].mlp.linear_fc2.weight.detach().double()
    assert abs(w.std().item() - cfg.init_std) < 5 * cfg.init_std / math.sqrt(2 * w.numel())


def test_pipeline_stage_holds_exactly_its_layers_of_the_full_model():
    """Names are global, so a stage built with layer_numbers=[2, 3] equals layers 2, 3 of the full model."""
    cfg = _config(tie_embeddings=True)
    full = _state(GPTModel(cfg, seed=4))
    last = GPTModel(cfg, seed=4, pre_process=False, post_process=True, layer_numbers=[2, 3])
    state = _state(last)
    assert {k.split(".")[2] for k in state if k.startswith("decoder.layers.")} == {"2", "3"}
    assert "embedding.word_embeddings.weight" not in state and "decoder.final_norm.weight" in state
    for k, v in state.items():
        if k == "output_layer.weight":
            # Tied last stage holds a copy of the embedding table, initialized from the same name.
            assert torch.equal(v, full["embedding.word_embeddings.weight"])
        else:
            assert torch.equal(v, full[k]), k


def test_shard_fn_and_global_shape_give_the_slice_of_the_full_tensor():
    """The hook parallelize uses: a local meta param declaring global shape + shard fn gets its slice."""
    cfg = _config()
    full = GPTModel(cfg, seed=9)
    with torch.device("meta"):
        model = GPTModel(cfg, seed=9)
    fc1 = model.decoder.layers["1"].mlp.linear_fc1
    global_shape = tuple(fc1.weight.shape)
    rows = global_shape[0] // 2
    local = nn.Parameter(torch.empty(rows, global_shape[1], device="meta"))
    param_meta(local).init = peek_meta(fc1.weight).init
    param_meta(local).global_shape = global_shape
    param_meta(local).shard_fn = lambda t: t[rows:]  # "rank 1 of 2" along dim 0
    fc1.weight = local
    materialize(model, cfg, 9)
    assert torch.equal(fc1.weight, full.decoder.layers["1"].mlp.linear_fc1.weight[rows:])
    # The attributes survive materialize (it re-creates parameters when leaving the meta device).
    assert peek_meta(fc1.weight).global_shape == global_shape


def test_shard_fn_shape_mismatch_is_a_clear_error():
    cfg = _config()
    with torch.device("meta"):
        model = GPTModel(cfg, seed=9)
    fc2 = model.decoder.layers["0"].mlp.linear_fc2
    param_meta(fc2.weight).shard_fn = lambda t: t[:, :3]
    with pytest.raises(RuntimeError, match="decoder.layers.0.mlp.linear_fc2.weight"):
        materialize(model, cfg, 9)
