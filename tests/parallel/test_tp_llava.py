"""LLaVA with a tensor-parallel language model, gloo, fp32: at TP2 with and without sequence
parallelism, the logits, the loss and every gradient (language-model shards gathered; the replicated
vision tower and projector as they are on each rank) equal the one-device model's within 1e-5."""

import pytest
import torch

import megacore.parallel as P
from megacore.config import TransformerConfig, VisionConfig
from megacore.models.llava import LlavaConfig, LlavaModel
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
    lm = P.build_parallel_gpt(_config().text, 3, sequence_parallel=sequence_parallel)
    model = LlavaModel(_config(), seed=3, language_model=lm)
    ids, pixels, labels = _batch()
    errors = {"logits": (model(ids, pixels) - ref(ids, pixels)).abs().max().item()}
    loss, ref_loss = model(ids, pixels, labels=labels), ref(ids, pixels, labels=labels)
    errors["loss"] = (loss - ref_loss).abs().item()
    loss.backward()
    ref_loss.backward()
    grads = P.gather_full_state_dict(model.language_model, grads=True)
    for name, p in ref.language_model.named_parameters():
        errors[f"grad language_model.{name}"] = (grads[name] - p.grad).abs().max().item()
    mine = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if not name.startswith("language_model.") and p.grad is not None:
            errors[f"grad {name}"] = (mine[name].grad - p.grad).abs().max().item()
    P.destroy()
    return {k: v for k, v in errors.items() if not v <= TOL}


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_llava_matches_single_device(sp):
    assert run_distributed(_errors, world_size=2, args=(sp,)) == [{}, {}]
