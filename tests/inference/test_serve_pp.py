"""Pipeline-parallel serving: a checkpoint saved on one device, loaded as two pipeline stages (each
with its own paged cache), rank 0 scheduling; greedy tokens equal the full forward's argmax and
seeded samples equal one device's engine (tied embeddings: the last stage's copy of the table)."""

import torch

from megacore.checkpoint import save_checkpoint
from megacore.config import TransformerConfig
from megacore.inference.engine import Engine
from megacore.inference.sampling import generate
from megacore.models import GPTModel
from tests.dist.harness import run_distributed
from tests.inference.test_serve_tp import CONFIG, PARAMS, PROMPTS, _serve, serve_rank


def _pp_worker(rank, world_size, path):
    def staged(setup, rank):
        stage = setup.runner.model
        assert (stage.pre_process, stage.post_process) == (rank == 0, rank == world_size - 1)
        assert not setup.is_leader or setup.engine.packed            # prefills packed, broadcast to the stages

    return serve_rank(rank, world_size, path, "--pp", staged)


def test_pp2_serving_equals_one_device(tmp_path):
    model = GPTModel(TransformerConfig(**{**CONFIG, "num_layers": 3, "tie_embeddings": True}), seed=9).eval()
    save_checkpoint(str(tmp_path / "ckpt"), 1, model)
    greedy = [generate(model, torch.tensor(p), sp.max_new_tokens, use_cache=False)[len(p):].tolist()
              for p, sp in zip(PROMPTS[:3], PARAMS[:3])]
    one_device = _serve(Engine(model, max_batch=2, block_size=4, decode_steps=3))
    assert one_device[:3] == greedy
    results = run_distributed(_pp_worker, world_size=2, args=(str(tmp_path / "ckpt"),))
    assert results[1] is None
    assert results[0] == one_device
