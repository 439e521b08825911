"""Expert parallelism (EP2 and EP4 on gloo): every rank routes its own batch, tokens travel to their
experts' rank by all-to-all and back. Against the one-device model holding every expert:

- each rank's logits and loss equal the one-device model's on that rank's batch;
- gradients: dense ones summed over the ranks, and each rank's expert slices, equal the gradients
  of the one-device model for the sum of all ranks' losses (load-balancing loss included);
- the all-to-all's backward is checked by that gradient equality (fp32, 1e-5);
- both optimizers' global grad norm (dense part once, expert part summed over EP) equals the
  one-device norm.
"""

import torch
import torch.distributed as dist

from megacore.config import TransformerConfig
from megacore.parallel.expert_parallel import apply_expert_parallel
from megacore.models import GPTModel
from megacore.models.init import materialize
from megacore.sharding import peek_meta
from tests.dist.harness import run_distributed

TOL = 1e-5
CFG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64, seq_length=8,
           ffn_hidden_size=24, num_experts=4, moe_top_k=2, moe_aux_loss_coeff=0.1)


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 64, (3, 8), generator=g)
    return ids, torch.randint(0, 64, (3, 8), generator=g)


def _ep_cases(rank, world):
    cfg = TransformerConfig(**CFG)
    group = dist.new_group(list(range(world)))
    with torch.device("meta"):
        model = GPTModel(cfg)
    apply_expert_parallel(model, group, rank, world)
    materialize(model, cfg, seed=7, device="cpu", dtype=torch.float32)
    ref = GPTModel(cfg, seed=7)

    errors = {}
    ids, labels = _batch(rank)
    errors["logits"] = (model(ids) - ref(ids)).abs().max().item()
    loss = model(ids, labels=labels)
    errors["loss"] = (loss - ref(ids, labels=labels)).abs().item()
    loss.backward()
    ref_loss = sum(ref(*_batch(r)[:1], labels=_batch(r)[1]) for r in range(world))
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    local = cfg.num_experts // world
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        if peek_meta(p).expert_slice is not None:
            want = ref_params[name].grad[rank * local:(rank + 1) * local]
            errors[f"weight {name}"] = (p.detach() - ref_params[name].detach()[rank * local:(rank + 1) * local]
                                        ).abs().max().item()
        else:
            dist.all_reduce(grad, group=group)  # what data-parallel gradient reduction does
            want = ref_params[name].grad
        errors[f"grad {name}"] = (grad - want).abs().max().item()
    want_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters())).item()
    errors |= _optimizer_norm_errors(cfg, group, rank, world, want_norm)
    return {k: v for k, v in errors.items() if not v <= TOL}


def _optimizer_norm_errors(cfg, group, rank, world, want_norm):
    """The trainer's path (DDP with expert grads reduced over expert-DP, either optimizer with the EP
    group): the step's global grad norm counts every expert once, wherever it lives."""
    from megacore.distributed import DistributedDataParallel
    from megacore.optim import DistributedOptimizer
    from megacore.optim.optimizer import MixedPrecisionOptimizer

    singles = [dist.new_group([r]) for r in range(world)]  # expert-DP groups: EP spans the whole world
    errors = {}
    for kind in (MixedPrecisionOptimizer, DistributedOptimizer):
        with torch.device("meta"):
            model = GPTModel(cfg)
        apply_expert_parallel(model, group, rank, world)
        materialize(model, cfg, seed=7, device="cpu", dtype=torch.float32)
        ddp = DistributedDataParallel(model, group, expert_dp_group=singles[rank], bucket_size_mb=None,
                                      use_distributed_optimizer=kind is DistributedOptimizer)
        opt = kind(ddp, lr=0.0, expert_parallel_group=group)
        ids, labels = _batch(rank)
        ddp(ids, labels=labels).backward()
        errors[f"{kind.__name__} grad norm"] = abs(float(opt.step().grad_norm) - want_norm) / want_norm
    return errors


def test_ep2_matches_one_device():
    assert run_distributed(_ep_cases, world_size=2) == [{}, {}]


def test_ep4_matches_one_device():
    assert run_distributed(_ep_cases, world_size=4) == [{}] * 4
