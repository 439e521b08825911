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
    "deepseek_v3_tiny_cpu.yaml": (1, 1),
    "deepseek_v2_lite_16b.yaml": (8, 8),
    "finetune_hf_cpu.yaml": (1, 1),
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


def test_deepseek_configs_match_their_shapes():
    from megacore.config.support import check_supported as _check_supported

    tiny = load_run_config(str(CONFIGS / "deepseek_v3_tiny_cpu.yaml")).validate(1)
    m = tiny.model
    assert m.multi_latent_attention and m.q_lora_rank is not None and m.moe_first_k_dense >= 1
    assert m.moe_shared_expert_hidden_size and m.moe_router_score == "sigmoid" and m.moe_router_num_groups
    assert m.moe_router_bias_update_rate > 0 and m.moe_aux_loss_type == "sequence" and m.moe_aux_loss_coeff > 0
    assert m.mtp_num_layers == 0 and tiny.device == "cpu"

    cfg = load_run_config(str(CONFIGS / "deepseek_v2_lite_16b.yaml")).validate(8)
    m, p = cfg.model, cfg.parallel
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim,
            m.qk_rope_head_dim, m.v_head_dim) == (27, 2048, 16, None, 512, 128, 64, 128)
    assert (m.num_experts, m.moe_top_k, m.moe_ffn_hidden_size, m.moe_shared_expert_hidden_size,
            m.moe_first_k_dense, m.ffn_hidden_size, m.vocab_size) == (64, 6, 1408, 2 * 1408, 1, 10944, 102400)
    assert (p.tensor, p.pipeline, p.context, p.expert, p.data_parallel_size(8)) == (1, 1, 1, 8, 8)
    assert p.distributed_optimizer
    _check_supported(cfg, 8)
    # it is the shape the HF family exports (DeepseekV3ForCausalLM, q_lora_rank null)
    from megacore.interop import hf

    out = hf.config_to_hf(m, "deepseek_v3")
    assert (out["n_routed_experts"], out["n_shared_experts"], out["q_lora_rank"]) == (64, 2, None)


def test_gpu_configs_also_validate_with_a_cpu_override():
    for name in ("llama_1b_gpu.yaml", "llama_8b_8gpu.yaml"):
        world = RUNNABLE[name][0]
        load_run_config(str(CONFIGS / name), ["device=cpu", "compile=false"]).validate(world)


def test_deepseek_v3_tiny_cpu_trains(tmp_path):
    """The CPU config runs as written (a few steps, synthetic tokens instead of the corpus): finite
    losses, the expert-load metrics, and the aux-loss-free bias moves and stays fp32."""
    import json
    import math

    import torch

    from megacore.training.trainer import Trainer

    cfg = load_run_config(str(CONFIGS / "deepseek_v3_tiny_cpu.yaml"),
                          ["data.source=mock", "model.vocab_size=512", "train.iters=3", "train.warmup_iters=0",
                           "train.eval_interval=0", "log.interval=1", f"log.dir={tmp_path}"])
    trainer = Trainer(cfg)
    trainer.run()
    with open(tmp_path / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records), records
    assert all("moe_load_max" in r for r in records)
    biases = [layer.router.expert_bias for layer in trainer.moe_layers]
    assert len(biases) == 3 and all(b.dtype == torch.float32 for b in biases)
    assert all(b.abs().max() > 0 for b in biases)
