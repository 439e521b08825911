"""LLaVA with a tensor-parallel language model, gloo, fp32: at TP2 with and without sequence
parallelism, the logits, the loss and every gradient (language-model shards gathered; the replicated
vision tower and projector as they are on each rank) equal the one-device model's within 1e-5."""

import pytest
import torch

import megacore.parallel as P
from megacore.compose import build_parallel_gpt
from megacore.config import TransformerConfig, VisionConfig
from megacore.models.llava import LlavaConfig, LlavaModel
from tests.dist.equivalence import errors_against_reference
from tests.dist.harness import run_distributed

TOL = 1e-5
TEXT = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
            vocab_size=60, seq_length=16, vocab_padding_multiple=4)
VISION = dict(enabled=True, image_size=16, patch_size=8, hidden_size=24, intermediate_size=40, num_layers=2,
              num_attention_heads=4, image_token_id=58, freeze_tower=False)


def _config():
    return LlavaConfig(TransformerConfig(**TEXT), VisionConfig(**VISION))


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 58, (2, 16), generator=g)
    ids[0, 1:5] = 58   # image 0: 4 patches, 4 image tokens
    # image 1 straddles the SP ranks' token chunks (rank 0 holds sample 0, rank 1 sample 1): its first
    # two embeddings go to rank 0's tokens 14-15, the last two to rank 1's tokens 0-1
    ids[0, 14:16] = 58
    ids[1, 0:2] = 58
    labels = torch.randint(0, 58, (2, 16), generator=g)
    return ids, torch.randn(2, 3, 16, 16, generator=g), labels


def _errors(rank, world, sequence_parallel):
    P.initialize(tensor=world)
    P.model_parallel_seed(1)
    ref = LlavaModel(_config(), seed=3)
    lm = build_parallel_gpt(_config().text, 3, sequence_parallel=sequence_parallel)
    model = P.parallelize_llava(LlavaModel(_config(), seed=3, language_model=lm), sequence_parallel=sequence_parallel)
    ids, pixels, labels = _batch()
    def grads_of(m):  # the language model's TP shards gathered; the replicated tower's as they are
        grads = {f"language_model.{n}": g for n, g in P.gather_full_state_dict(m.language_model, grads=True).items()}
        grads.update((n, p.grad) for n, p in m.named_parameters() if not n.startswith("language_model."))
        return grads

    errors = errors_against_reference(model, ref, (ids, pixels), labels, grads_of, TOL)
    P.destroy()
    return errors


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_llava_matches_single_device(sp):
    assert run_distributed(_errors, world_size=2, args=(sp,)) == [{}, {}]
