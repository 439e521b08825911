"""Tensor-parallel serving: a checkpoint saved on one device, loaded as two TP shards (resharded on
load), served with rank 0 scheduling and broadcasting each call (packed prefills too); the greedy tokens equal one device's
(the full forward's argmax) for staggered requests of mixed lengths, and seeded samples equal one
device's engine."""

import torch

from megacore.checkpoint import save_checkpoint
from megacore.config import TransformerConfig
from megacore.inference.engine import Engine, SamplingParams
from megacore.inference.sampling import generate
from megacore.models import GPTModel
from tests.dist.harness import run_distributed

CONFIG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=62, seq_length=32,
              ffn_hidden_size=48)
PROMPTS = [[5, 9, 1], [3, 3, 8, 20, 11, 7, 2], [40], [12, 17, 30, 2, 9]]
PARAMS = [SamplingParams(max_new_tokens=n) for n in (9, 5, 12)] + [SamplingParams(max_new_tokens=7, temperature=0.8,
                                                                                   top_k=20, seed=5)]


def _serve(engine):
    reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS[:2], PARAMS[:2])]
    engine.step()
    reqs += [engine.add_request(p, sp) for p, sp in zip(PROMPTS[2:], PARAMS[2:])]
    engine.run_until_done()
    return [r.token_ids for r in reqs]


def serve_rank(rank, world_size, path, flag, check=None):
    """What ``torchrun --nproc-per-node N -m megacore serve --model CKPT <flag> N`` builds on each rank
    (``serve_setup.prepare``), driven without HTTP: rank 0 returns the tokens, followers None.
    ``check(setup, rank)``: assertions on the rank's built model."""
    from megacore.inference import serve_setup
    from megacore.inference.server import build_parser

    torch.manual_seed(0)
    args = build_parser().parse_args(["--model", path, flag, str(world_size), "--device", "cpu", "--max-batch", "2",
                                      "--block-size", "4", "--num-blocks", "13", "--decode-steps", "3"])
    setup = serve_setup.prepare(args)
    if check is not None:
        check(setup, rank)
    if not setup.is_leader:
        setup.follow()
        return None
    try:
        return _serve(setup.engine)
    finally:
        setup.release()


def _tp_worker(rank, world_size, path):
    def sharded(setup, rank):
        assert setup.runner.model.output_head.whole_vocab is False  # a vocab-parallel head: really sharded
        assert not setup.is_leader or setup.engine.packed            # prefills packed, broadcast to the follower

    return serve_rank(rank, world_size, path, "--tp", sharded)


def test_tp2_serving_equals_one_device(tmp_path):
    model = GPTModel(TransformerConfig(**CONFIG), seed=7).eval()
    save_checkpoint(str(tmp_path / "ckpt"), 1, model)
    greedy = [generate(model, torch.tensor(p), sp.max_new_tokens, use_cache=False)[len(p):].tolist()
              for p, sp in zip(PROMPTS[:3], PARAMS[:3])]
    one_device = _serve(Engine(model, max_batch=2, block_size=4, decode_steps=3))
    assert one_device[:3] == greedy
    results = run_distributed(_tp_worker, world_size=2, args=(str(tmp_path / "ckpt"),))
    assert results[1] is None
    assert results[0][:3] == greedy
    assert results[0][3] == one_device[3]
