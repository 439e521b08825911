"""Tensor parallelism of hybrid stacks (Mamba-2, attention and MLP layers), gloo, fp32: at TP2 and TP4,
with and without sequence parallelism, the logits, the loss and every gathered gradient equal the
one-device model's within 1e-5 (the tolerance of the other TP tests). The Mamba mixer splits by
heads and B/C groups (``MambaSplit`` in megacore.parallel.parallelize)."""

import pytest
import torch

import megacore.parallel as P
from megacore.compose import build_parallel_gpt
from megacore.config import ConfigError, TransformerConfig
from megacore.models import GPTModel
from tests.dist.equivalence import errors_against_reference
from tests.dist.harness import run_distributed

TOL = 1e-5
HYBRID = dict(num_layers=4, layer_pattern="M*M-", hidden_size=32, num_attention_heads=4, num_query_groups=2,
              ffn_hidden_size=48, vocab_size=50, seq_length=8, vocab_padding_multiple=4,
              mamba_head_dim=8, mamba_state_dim=4, mamba_num_groups=4, mamba_chunk_size=4,
              position_embedding="none", activation="squared_relu")


def _errors(rank, world, sequence_parallel):
    P.initialize(tensor=world)
    P.model_parallel_seed(1)
    cfg = TransformerConfig(**HYBRID)
    ref = GPTModel(cfg, seed=3)
    model = build_parallel_gpt(cfg, 3, sequence_parallel=sequence_parallel)
    mixer = model.decoder.layers["0"].mixer
    local = (mixer.num_heads, mixer.num_groups, tuple(mixer.conv1d.weight.shape))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (4, 8), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (4, 8), generator=g)
    errors = errors_against_reference(model, ref, (ids,), labels,
                                      lambda m: P.gather_full_state_dict(m, grads=True), TOL)
    P.destroy()
    return local, errors


@pytest.mark.parametrize("world,sp", [(2, False), (2, True), (4, True)], ids=["tp2", "tp2_sp", "tp4_sp"])
def test_tp_hybrid_matches_single_device(world, sp):
    results = run_distributed(_errors, world_size=world, args=(sp,))
    heads = 32 * 2 // 8  # expand 2 x hidden 32 / head_dim 8 = 8 Mamba heads
    conv = 2 * 32 + 2 * 4 * 4
    assert results == [((heads // world, 4 // world, (conv // world, 1, 4)), {})] * world, results


def test_indivisible_mamba_split_is_refused():
    from megacore.parallel.parallelize import check_tp_config

    with pytest.raises(ConfigError, match="mamba_num_groups=2 must both be divisible by parallel.tensor=4"):
        check_tp_config(TransformerConfig(**{**HYBRID, "mamba_num_groups": 2}), 4, True)
