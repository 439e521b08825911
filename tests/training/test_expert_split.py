"""Expert parallelism through the trainer's own build path: ``parallel.expert=2`` really splits the
experts (``Trainer.setup`` builds the mesh from the whole ``parallel`` section), each rank holding
its slice of exactly the one-process model of the same seed; the process groups are checked against
the config, and the logged layout is read from the groups."""

from __future__ import annotations

import pytest
import torch

from megacore.config import ParallelConfig
from megacore.config.loading import load_run_config
from megacore.parallel.topology import ParallelState, describe_layout, layout_mismatches
from megacore.training.contract import TrainingError
from tests.dist.harness import run_distributed
from tests.training.test_moe_training import MOE
from tests.training.test_train_cli import ROOT, _env, run_cli

NUM_EXPERTS = 4


def _config(overrides: list[str], log_dir: str):
    return load_run_config(f"{ROOT}/configs/tiny_cpu.yaml", [*MOE, *overrides, f"log.dir={log_dir}"])


def _expert_weights(trainer) -> dict[str, torch.Tensor]:
    """Every expert weight this rank holds after ``Trainer.setup``, by global parameter name."""
    from megacore.layers.moe.experts import Experts
    from megacore.pipeline.tied import unwrap

    out = {}
    for chunk in trainer.chunks:
        for mname, module in unwrap(chunk).named_modules():
            if isinstance(module, Experts):
                for pname, p in module.named_parameters(recurse=False):
                    out[f"{mname}.{pname}"] = p.detach().clone()
    return out


def _setup_on_ranks(rank, world, overrides, log_dir):
    from megacore.training.trainer import Trainer

    trainer = Trainer(_config(overrides, f"{log_dir}/rank{rank}"))
    trainer.setup()
    s = trainer.state
    # numpy, not tensors: a tensor crosses the result queue through shared memory this worker frees on exit
    experts = {n: w.numpy() for n, w in _expert_weights(trainer).items()}
    return {"sizes": (s.ep_size, s.ep_rank, s.edp_size, s.dp_size), "experts": experts}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """EP1 through the same trainer path, in this process (world 1), and the one-device model."""
    from megacore.models import GPTModel
    from megacore.training.trainer import Trainer

    cfg = _config([], str(tmp_path_factory.mktemp("ep1")))
    trainer = Trainer(cfg)
    trainer.setup()
    model = GPTModel(cfg.model, seed=cfg.train.seed)
    reference = {n: p.detach() for n, p in model.named_parameters() if n in _expert_weights(trainer)}
    return _expert_weights(trainer), reference


def test_ep2_rank_holds_its_half_of_the_experts(tmp_path, one_process):
    ep1, reference = one_process
    assert ep1 and set(ep1) == set(reference)
    for name, w in ep1.items():  # EP1 holds every expert: the one-device model's weights
        assert w.shape[0] == NUM_EXPERTS and torch.equal(w, reference[name]), name
    results = run_distributed(_setup_on_ranks, world_size=2, args=(["parallel.expert=2"], str(tmp_path)))
    half = NUM_EXPERTS // 2
    for r, got in enumerate(results):
        assert got["sizes"] == (2, r, 1, 2), got["sizes"]  # EP 2, this rank's EP rank, EDP 1, DP 2
        assert set(got["experts"]) == set(ep1)
        for name, w in got["experts"].items():
            w = torch.from_numpy(w)
            assert w.shape == (half, *ep1[name].shape[1:]), (name, w.shape)
            assert torch.equal(w, ep1[name][r * half:(r + 1) * half]), (r, name)
    held = sum(w.size for w in results[0]["experts"].values())
    assert 2 * held == sum(w.numel() for w in ep1.values())


def test_mesh_sizes_name_every_axis():
    p = ParallelConfig(tensor=2, pipeline=3, context=4, expert=5, expert_tensor=2, virtual_pipeline=2)
    assert p.mesh_sizes() == {"tensor": 2, "pipeline": 3, "context": 4, "expert": 5, "expert_tensor": 2,
                              "virtual_pipeline": 2}
    assert ParallelConfig(virtual_pipeline=1).mesh_sizes()["virtual_pipeline"] is None


def test_layout_mismatches_name_the_axis():
    state = ParallelState(initialized=True, world_size=4, sizes={"dp": 4, "ep": 1})
    assert layout_mismatches(state, {"tensor": 1, "expert": 1}) == []
    assert layout_mismatches(state, ParallelConfig(expert=2).mesh_sizes()) == ["expert=2 but the ep group has 1 ranks"]
    with pytest.raises(ValueError, match="unknown layout axes"):
        layout_mismatches(state, {"experts": 2})


def test_describe_layout_reads_the_groups():
    state = ParallelState(initialized=True, world_size=4, sizes={"tp": 1, "pp": 1, "dp": 4, "ep": 2, "edp": 2})
    assert describe_layout(state) == ("world 4 = tensor 1 x pipeline 1 x data 4; experts split over 2 ranks "
                                      "(expert 2 x expert-tensor 1 x expert-data 2 per stage)")
    assert describe_layout(ParallelState()) == "world 1 = tensor 1 x pipeline 1 x data 1"


def test_trainer_refuses_groups_that_differ_from_the_config(tmp_path, monkeypatch):
    """Groups built with an axis dropped or changed stop the run before a model is built."""
    from megacore import parallel
    from megacore.training.trainer import Trainer

    wrong = ParallelState(initialized=True, world_size=1, sizes={"ep": 2})
    monkeypatch.setattr(parallel, "get_state", lambda: wrong)
    trainer = Trainer(_config([], str(tmp_path)))
    with pytest.raises(TrainingError, match=r"parallel.expert=1 but the ep group has 2 ranks"):
        trainer._init_parallel()


def test_ep2_run_logs_the_split_it_runs(tmp_path):
    out = run_cli(["train", "configs/tiny_cpu.yaml", *MOE, "parallel.expert=2", "train.iters=1",
                   f"log.dir={tmp_path / 'log'}", "--nproc", "2"], _env(str(tmp_path / "cache")))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert ("layout: world 2 = tensor 1 x pipeline 1 x data 2; experts split over 2 ranks (expert 2 x "
            "expert-tensor 1 x expert-data 1 per stage)") in out.stdout, out.stdout



@pytest.fixture(scope="module")
def ep1_run(tmp_path_factory):
    """The single-process curve (12 steps), saving a checkpoint at step 6: (log dir, checkpoint dir)."""
    from tests.training.test_train_cli import train_tiny

    tmp = tmp_path_factory.mktemp("ep1_run")
    ckpt = str(tmp / "ckpt")
    return train_tiny(tmp, "ep1", [*MOE, f"checkpoint.dir={ckpt}", "checkpoint.interval=6"]), ckpt


def _assert_same_curve(got_log, want_log, first_step=1):
    from tests.training.test_train_cli import read_metrics

    want = [r for r in read_metrics(want_log) if "loss" in r][first_step - 1:]
    got = [r for r in read_metrics(got_log) if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(first_step, 13))
    for key in ("loss", "grad_norm", "moe_aux_loss"):
        worst = max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(got, want))
        assert worst < 1e-4, (key, worst, got, want)


def test_ep2_with_expert_data_parallel_reproduces_the_curve(tmp_path, ep1_run):
    """World 4 = EP2 x EDP2: expert gradients are averaged over the two ranks that hold the same
    experts (not over all four), and the grad norm counts each expert once."""
    from tests.training.test_train_cli import train_tiny

    log = train_tiny(tmp_path, "ep2_edp2", [*MOE, "parallel.expert=2", "parallel.distributed_optimizer=true",
                                            "checkpoint.dir=null"], nproc=4)
    _assert_same_curve(log, ep1_run[0])


@pytest.mark.parametrize("optimizer", [[], ["parallel.distributed_optimizer=true"]])
def test_one_process_checkpoint_resumes_with_split_experts(tmp_path, ep1_run, optimizer):
    """A single-process MoE checkpoint (step 6) resumes at EP2: each rank loads its slice of the
    stacked expert weights and of their Adam moments, and steps 7..12 follow the uninterrupted run."""
    from tests.training.test_train_cli import train_tiny

    whole, ckpt = ep1_run
    resumed = train_tiny(tmp_path, "ep2", [*MOE, f"checkpoint.load={ckpt}/iter_0000006", "parallel.expert=2",
                                           "checkpoint.dir=null", *optimizer], nproc=2)
    _assert_same_curve(resumed, whole, first_step=7)
