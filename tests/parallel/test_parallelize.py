"""parallelize(GPTModel): TP in {2, 4}, with and without sequence parallelism, MHA/GQA/MQA (also more
TP ranks than KV groups): logits, loss and every gathered parameter and gradient equal the one-device
model (fp32, 1e-5)."""

import pytest
import torch
from torch import nn

import megacore.parallel as P
from megacore.compose import build_parallel_gpt
from megacore.config import ConfigError, TransformerConfig
from megacore.models import GPTModel
from tests.dist.harness import run_distributed

TOL = 1e-5
BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=50, seq_length=8,
            vocab_padding_multiple=4, ffn_hidden_size=24)  # vocab 50 -> padded 52: not a multiple of 8

CASES_TP2 = [
    ("mha", dict(), False),
    ("mha_sp", dict(), True),
    ("gqa_tied_qknorm_sp", dict(num_query_groups=2, tie_embeddings=True, qk_norm=True), True),
    ("mqa_biases_layernorm_learned_sp", dict(num_query_groups=1, add_qkv_bias=True, add_bias_linear=True,
                                            normalization="LayerNorm", position_embedding="learned",
                                            activation="gelu"), True),
    ("mqa_biases_layernorm_learned", dict(num_query_groups=1, add_qkv_bias=True, add_bias_linear=True,
                                         normalization="LayerNorm", position_embedding="learned",
                                         activation="gelu"), False),
]
CASES_TP4 = [
    ("gqa_kv2_replicated_sp", dict(num_query_groups=2, qk_norm=True, add_qkv_bias=True), True),
    ("mha_tied_learned_layernorm", dict(tie_embeddings=True, position_embedding="learned",
                                       normalization="LayerNorm", add_bias_linear=True), False),
]


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, BASE["vocab_size"], (2, 8), generator=g)
    labels = torch.randint(0, BASE["vocab_size"], (2, 8), generator=g)
    labels[0, :3] = -100
    return ids, labels


def _compare(model, ref, failures, tag, ids, labels):
    def check(what, got, want):
        if got is None or want is None or got.shape != want.shape:
            failures.append(f"{tag} {what}: missing or shape mismatch")
            return
        err = (got - want).abs().max().item()
        if err > TOL:
            failures.append(f"{tag} {what}: max error {err:.3g}")

    check("logits", model(ids), ref(ids))
    loss, ref_loss = model(ids, labels=labels), ref(ids, labels=labels)
    check("loss", loss, ref_loss)
    check("token losses", model(ids, labels=labels, reduction="none"), ref(ids, labels=labels, reduction="none"))
    loss.backward()
    ref_loss.backward()
    weights = P.gather_full_state_dict(model)
    grads = P.gather_full_state_dict(model, grads=True)
    ref_params = dict(ref.named_parameters())
    if set(weights) != set(ref_params):
        failures.append(f"{tag}: parameter names differ: {sorted(set(weights) ^ set(ref_params))}")
    for name, p in ref_params.items():
        check(f"weight {name}", weights.get(name), p.detach())
        check(f"grad {name}", grads.get(name), p.grad)
    return grads


def _model_cases(rank, world, cases):
    failures = []
    ids, labels = _batch()
    P.initialize(tensor=world)
    P.model_parallel_seed(1)
    for tag, extra, sp in cases:
        cfg = TransformerConfig(**BASE, **extra)
        ref = GPTModel(cfg, seed=3)
        model = build_parallel_gpt(cfg, 3, sequence_parallel=sp)
        _compare(model, ref, failures, f"tp={world} {tag} sp={sp}", ids, labels)

    # A materialized model is sharded from its own values (e.g. after loading full weights).
    cfg = TransformerConfig(**BASE, num_query_groups=1, tie_embeddings=True)
    ref = GPTModel(cfg, seed=4)
    model = P.parallelize(GPTModel(cfg, seed=4), sequence_parallel=True)
    _compare(model, ref, failures, f"tp={world} materialized-then-parallelized", ids, labels)
    try:
        P.parallelize(model)
        failures.append("parallelizing twice was accepted")
    except ConfigError as e:
        if "already" not in str(e):
            failures.append(f"unclear double-parallelize error: {e}")

    # Deferred gradient sums: without finalize_grads_tp the SP norm gradients are partial (the trap);
    # with it they match.
    cfg = TransformerConfig(**BASE, num_query_groups=1)
    ref = GPTModel(cfg, seed=3)
    model = build_parallel_gpt(cfg, 3, sequence_parallel=True, grad_sync="finalize")
    model(ids, labels=labels).backward()
    ref(ids, labels=labels).backward()
    norm = "decoder.layers.0.input_norm.weight"
    kv_rows = "decoder.layers.0.self_attention.linear_qkv.weight"
    partial = P.gather_full_state_dict(model, grads=True)
    if (partial[norm] - ref.get_parameter(norm).grad).abs().max() < 1e-4:
        failures.append("finalize mode: norm grads already summed before finalize_grads_tp")
    if world > 1 and (partial[kv_rows] - ref.get_parameter(kv_rows).grad).abs().max() < 1e-4:
        failures.append("finalize mode: replicated kv grads already summed before finalize_grads_tp")
    P.finalize_grads_tp(model)
    summed = P.gather_full_state_dict(model, grads=True)
    for name, p in ref.named_parameters():
        if (summed[name] - p.grad).abs().max() > TOL:
            failures.append(f"finalize mode: {name} grad differs after finalize_grads_tp")

    # Clear errors: an undeclared linear, and TP dropout without RNG streams.
    with torch.device("meta"):
        odd = GPTModel(TransformerConfig(**BASE))
    odd.extra_head = nn.Linear(4, 4)
    try:
        P.parallelize(odd)
        failures.append("undeclared nn.Linear was accepted")
    except ConfigError as e:
        if "extra_head" not in str(e):
            failures.append(f"unclear coverage error: {e}")
    P.get_rng_tracker().reset()
    try:
        with torch.device("meta"):
            drop = GPTModel(TransformerConfig(**BASE, attention_dropout=0.1))
        P.parallelize(drop)
        failures.append("attention dropout without model_parallel_seed was accepted")
    except ConfigError as e:
        if "model_parallel_seed" not in str(e):
            failures.append(f"unclear rng error: {e}")
    replay = _recompute_replay_errors(ids) if world == 2 else None
    P.destroy()
    return {"failures": failures, "replay": replay}


def _recompute_replay_errors(ids):
    """Max grad difference between no recompute and selective / full recompute of a TP+SP model with
    attention and hidden dropout, from the same RNG states (0.0 when dropout replays exactly)."""
    from megacore.config import RecomputeConfig

    cfg = TransformerConfig(**BASE, attention_dropout=0.3, hidden_dropout=0.2)
    P.model_parallel_seed(1)
    grads = []
    for granularity in (None, "selective", "full"):
        model = build_parallel_gpt(cfg, 3, sequence_parallel=True)
        model.configure_recompute(RecomputeConfig(granularity=granularity))
        P.model_parallel_seed(1)
        model(ids, labels=ids).backward()
        grads.append(P.gather_full_state_dict(model, grads=True))
    return [max((g[n] - grads[0][n]).abs().max().item() for n in g) for g in grads[1:]]


@pytest.fixture(scope="module")
def tp2_world():
    return run_distributed(_model_cases, world_size=2, args=(CASES_TP2,))


def test_tp2_matches_single_device(tp2_world):
    assert [r["failures"] for r in tp2_world] == [[], []], tp2_world


def test_tp4_matches_single_device():
    results = run_distributed(_model_cases, world_size=4, args=(CASES_TP4,))
    assert [r["failures"] for r in results] == [[]] * 4, results


def test_recompute_replays_tp_dropout_in_model(tp2_world):
    errors = tp2_world[0]["replay"]
    assert errors == [0.0, 0.0]


@pytest.mark.parametrize("extra,tensor,sp,words", [
    (dict(num_attention_heads=6, hidden_size=36), 4, False, ["num_attention_heads=6", "tensor=4"]),
    (dict(num_attention_heads=8, num_query_groups=4, vocab_padding_multiple=8), 8, False, None),
    (dict(num_attention_heads=12, num_query_groups=3, hidden_size=48), 2, False, ["num_query_groups=3", "neither"]),
    (dict(ffn_hidden_size=30), 4, False, ["ffn_hidden_size=30", "tensor=4"]),
    (dict(vocab_padding_multiple=6), 4, False, ["vocab_padding_multiple=6", "tensor=4"]),
    (dict(), 1, True, ["sequence_parallel", "tensor > 1"]),
    (dict(num_experts=4, moe_shared_expert_hidden_size=30), 4, False, ["moe_shared_expert_hidden_size=30", "tensor=4"]),
])
def test_check_tp_config(extra, tensor, sp, words):
    cfg = TransformerConfig(**{**BASE, **extra})
    if words is None:
        P.check_tp_config(cfg, tensor, sp)  # kv groups replicated over tensor=8: allowed
        return
    with pytest.raises(ConfigError) as err:
        P.check_tp_config(cfg, tensor, sp)
    for w in words:
        assert w in str(err.value)


def test_parallelize_without_tp_is_a_no_op():
    cfg = TransformerConfig(**BASE)
    model = GPTModel(cfg, seed=3)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    assert P.parallelize(model) is model
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert type(model.decoder.layers["0"].self_attention.linear_qkv) is nn.Linear
