"""MoE checkpoints reshard across expert layouts, bit for bit: a model saved with its experts split one
way loads into another split with exactly the saved values (every rank's parameters equal to its
``ParamMeta.shard`` of the saved global tensors). Two ranks, the trainer's build path
(``compose.build_model_chunks``): EP2 -> EP1 (each rank holds every expert), EP1 -> EP2, TP2 with
ETP2 (experts split by hidden units, fc1's gate/up halves aligned) -> EP2, and EP2 -> TP2 x ETP2.

The saved values are the seed's model plus a per-name offset, so a load that left any parameter at
its fresh initialization would be caught."""

from __future__ import annotations

import zlib

import torch

from megacore.config import ParallelConfig, RunConfig, TrainConfig, TransformerConfig
from tests.dist.harness import run_distributed

MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
             vocab_padding_multiple=4, seq_length=16, ffn_hidden_size=32, num_experts=4, moe_top_k=2,
             moe_ffn_hidden_size=16, moe_shared_expert_hidden_size=16, moe_shared_expert_gate=True)
LAYOUTS = {"ep1": dict(), "ep2": dict(expert=2), "tp2_etp2": dict(tensor=2, expert_tensor=2)}
CASES = [("ep2", "ep1"), ("ep1", "ep2"), ("tp2_etp2", "ep2"), ("ep2", "tp2_etp2")]


def _saved_values() -> dict[str, torch.Tensor]:
    from megacore.models import GPTModel

    ref = GPTModel(TransformerConfig(**MODEL), seed=3)
    return {n: p.detach() + (zlib.crc32(n.encode()) % 97) / 97.0 for n, p in ref.named_parameters()}


def _build(layout: str, seed: int):
    import megacore.parallel as P
    from megacore.compose import build_model_chunks

    cfg = RunConfig(model=TransformerConfig(**MODEL), parallel=ParallelConfig(**LAYOUTS[layout]),
                    train=TrainConfig(seed=seed, global_batch_size=2, micro_batch_size=1))
    cfg.validate(world_size=2)
    state = P.initialize(**cfg.parallel.mesh_sizes())
    (model,) = build_model_chunks(cfg, state, device="cpu", dtype=torch.float32)
    return model


def _cases(rank, world, directory):
    import megacore.parallel as P
    from megacore.checkpoint import load_checkpoint, save_checkpoint
    from megacore.sharding import peek_meta

    values = _saved_values()
    failures = []
    for i, (save_layout, load_layout) in enumerate(CASES):
        model = _build(save_layout, seed=3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(peek_meta(p).shard(values[name]))
        path = f"{directory}/{i}"
        save_checkpoint(path, 1, [model]).wait()
        P.destroy()
        model = _build(load_layout, seed=4)
        load_checkpoint(path, [model], load_rng=False)
        for name, p in model.named_parameters():
            if not torch.equal(p.detach(), peek_meta(p).shard(values[name])):
                failures.append(f"{save_layout} -> {load_layout}: {name}")
        P.destroy()
    return failures


def test_moe_checkpoints_reshard_across_expert_layouts(tmp_path):
    assert run_distributed(_cases, world_size=2, args=(str(tmp_path),)) == [[], []]
