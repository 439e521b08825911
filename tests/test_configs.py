"""Every run config shipped in configs/ loads and validates at the world size it is written for.

Validation never touches CUDA (``device: cuda`` is only checked by name), so the GPU configs are
validated here on CPU exactly as ``megacore train`` validates them.
"""

from pathlib import Path

import pytest

from megacore.config import ConfigError, RunConfig, load_run_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# config file -> (world size it is written for, expected data-parallel size)
RUNNABLE = {
    "tiny_cpu.yaml": (1, 1),
    "llama_1b_gpu.yaml": (1, 1),
    "llama_8b_8gpu.yaml": (8, 2),
    "mixtral_moe.yaml": (8, 8),
    "llava_tiny_cpu.yaml": (1, 1),
}


def test_every_config_is_covered():
    on_disk = {p.name for p in CONFIGS.glob("*.yaml")}
    assert on_disk == set(RUNNABLE), "add new configs to tests/test_configs.py"


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_config_validates_at_its_world_size(name):
    world, dp = RUNNABLE[name]
    cfg = load_run_config(str(CONFIGS / name))
    assert isinstance(cfg, RunConfig)
    cfg.validate(world)
    assert cfg.parallel.data_parallel_size(world) == dp
    t = cfg.train
    assert t.global_batch_size % (t.micro_batch_size * dp) == 0


def test_llama_1b_matches_design():
    m = load_run_config(str(CONFIGS / "llama_1b_gpu.yaml")).validate(1)
    got = (m.model.num_layers, m.model.hidden_size, m.model.num_attention_heads, m.model.ffn_hidden_size,
           m.model.vocab_size, m.model.seq_length, m.train.micro_batch_size, m.precision.dtype, m.device)
    assert got == (16, 2048, 16, 5632, 32000, 2048, 4, "bf16", "cuda")
    assert m.data.source == "mock"


def test_llama_8b_layout():
    cfg = load_run_config(str(CONFIGS / "llama_8b_8gpu.yaml")).validate(8)
    m, p = cfg.model, cfg.parallel
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
            m.vocab_size, m.seq_length) == (32, 4096, 32, 8, 14336, 128256, 8192)
    assert p.tensor * p.pipeline * p.context * p.data_parallel_size(8) == 8
    assert p.tensor > 1 and p.pipeline > 1 and p.data_parallel_size(8) > 1
    assert p.sequence_parallel and p.distributed_optimizer
    assert cfg.precision.dtype == "bf16" and cfg.recompute.granularity == "selective"
    # The same file must not validate at a world size its layout cannot divide.
    with pytest.raises(ConfigError, match="world size 6"):
        load_run_config(str(CONFIGS / "llama_8b_8gpu.yaml")).validate(6)


def test_moe_config_passes_the_trainer_checks():
    from megacore.config.support import check_supported as _check_supported

    cfg = load_run_config(str(CONFIGS / "mixtral_moe.yaml")).validate(8)
    assert (cfg.model.num_experts, cfg.model.moe_top_k, cfg.parallel.expert) == (8, 2, 8)
    _check_supported(cfg)  # what megacore train checks first


def test_gpu_configs_also_validate_with_a_cpu_override():
    for name in ("llama_1b_gpu.yaml", "llama_8b_8gpu.yaml"):
        world = RUNNABLE[name][0]
        load_run_config(str(CONFIGS / name), ["device=cpu", "compile=false"]).validate(world)
