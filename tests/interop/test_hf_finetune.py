"""``model.from_hf`` and ``checkpoint.save_hf`` from the training side: the run's model is the HF
model (logits and loss equal to transformers', also at TP2, PP2 and EP2 on two gloo ranks), an
override that contradicts config.json is a ConfigError naming both values, runtime keys may be set,
the HF tokenizer is the run's, and an export carries the token ids, generation config, tokenizer
and normal file modes. The end-to-end fine-tuning example is tests/interop/test_finetune_example.py."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from tests.dist.harness import run_distributed
from tests.interop.hf_reference import build_hf, sample_ids

from megacore.config import ConfigError, RunConfig, TransformerConfig
from megacore.interop import hf
from megacore.training.hf_bridge import HFBridge


def _save(case: str, path, seed: int = 5, **extra):
    model = build_hf(case, seed=seed, **extra)
    model.save_pretrained(path)
    return model


def _run_config(hf_dir, *overrides: tuple[str, object], source: str = "mock") -> RunConfig:
    from megacore.config.loading import apply_override

    cfg = RunConfig()
    apply_override(cfg, "model.from_hf", str(hf_dir))
    apply_override(cfg, "data.source", source)
    for key, value in overrides:
        apply_override(cfg, key, value)
    return cfg


def _labels(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-shifted labels (the last position's is a 0 that the mask drops) and the loss mask."""
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    mask = torch.ones(ids.shape, dtype=torch.float32)
    mask[:, -1] = 0
    return labels, mask


@pytest.mark.parametrize("case", ["llama_gqa", "llama_bias_tied", "mixtral_moe", "gpt2_tied"])
def test_from_hf_model_at_step_0_computes_transformers_logits(tmp_path, case):
    from megacore.compose import build_model_chunks

    theirs = _save(case, tmp_path / "hf")
    cfg = _run_config(tmp_path / "hf")
    HFBridge(cfg)
    cfg.validate()
    assert cfg.model.from_hf == str(tmp_path / "hf")
    (chunk,) = build_model_chunks(cfg, device="cpu", dtype=torch.float32)
    ids = sample_ids(seed=3)
    with torch.no_grad():
        ref = theirs(input_ids=ids).logits
        ours = chunk.eval()(ids)[..., :ref.shape[-1]]
    assert (ours - ref).abs().max().item() <= 1e-4


def test_override_that_contradicts_config_json_names_key_and_both_values(tmp_path):
    _save("llama_gqa", tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"model\.hidden_size=48 contradicts model\.from_hf=.*hidden_size=64"):
        HFBridge(_run_config(tmp_path / "hf", ("model.hidden_size", 48)))
    with pytest.raises(ConfigError, match=r"model\.num_query_groups=4 .*num_query_groups=2"):
        HFBridge(_run_config(tmp_path / "hf", ("model.num_query_groups", 4)))
    # The same values spelled explicitly (or derived: kv_channels = hidden / heads) agree.
    cfg = _run_config(tmp_path / "hf", ("model.hidden_size", 64), ("model.num_query_groups", 2),
                      ("model.kv_channels", 16), ("model.ffn_hidden_size", 96))
    HFBridge(cfg)
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 2


def test_runtime_keys_may_be_set_on_top(tmp_path):
    _save("llama_gqa", tmp_path / "hf")
    cfg = _run_config(tmp_path / "hf", ("model.seq_length", 32), ("model.attention_dropout", 0.1),
                      ("model.hidden_dropout", 0.1), ("model.attention_backend", "reference"))
    HFBridge(cfg)
    m = cfg.model
    assert (m.seq_length, m.attention_dropout, m.hidden_dropout, m.attention_backend) == (32, 0.1, 0.1, "reference")
    assert (m.hidden_size, m.vocab_size) == (64, 100)
    with pytest.raises(ConfigError, match=r"model\.seq_length=512 is longer than the 128 positions"):
        HFBridge(_run_config(tmp_path / "hf", ("model.seq_length", 512)))
    _save("gpt2_tied", tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="learned position embeddings of 32 positions"):
        HFBridge(_run_config(tmp_path / "gpt2", ("model.seq_length", 16)))


def test_missing_or_unsupported_directory_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.from_hf=.*config.json does not exist"):
        HFBridge(_run_config(tmp_path / "nowhere"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="unsupported Hugging Face architecture"):
        HFBridge(_run_config(tmp_path / "bert"))


def _tokenizer(path, words: list[str]):
    """A word-level tokenizer.json of ``words`` (+ ``</s>``) at ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_the_hf_tokenizer_is_the_runs_and_another_vocabulary_is_refused(tmp_path):
    _save("llama_gqa", tmp_path / "hf")
    with pytest.raises(ConfigError, match="holds no tokenizer .* a new BPE vocabulary"):
        HFBridge(_run_config(tmp_path / "hf", source="default"))
    _tokenizer(tmp_path / "hf" / "tokenizer.json", ["a", "b", "c"])
    cfg = _run_config(tmp_path / "hf", source="default")
    HFBridge(cfg)
    assert cfg.data.tokenizer == str(tmp_path / "hf")
    _tokenizer(tmp_path / "same.json", ["a", "b", "c"])
    HFBridge(_run_config(tmp_path / "hf", ("data.tokenizer", str(tmp_path / "same.json")), source="default"))
    _tokenizer(tmp_path / "other.json", ["a", "c", "b"])
    with pytest.raises(ConfigError, match="another vocabulary than the tokenizer.json of model.from_hf"):
        HFBridge(_run_config(tmp_path / "hf", ("data.tokenizer", str(tmp_path / "other.json")), source="default"))
    with pytest.raises(ConfigError, match="data.tokenizer='bpe' trains a new vocabulary"):
        HFBridge(_run_config(tmp_path / "hf", ("data.tokenizer", "bpe"), source="default"))
    # Indexed data preprocessed with another tokenizer (the one written beside it) is refused too.
    _tokenizer(tmp_path / "docs.tokenizer.json", ["x", "y"])
    with pytest.raises(ConfigError, match=r"was tokenized with .*docs\.tokenizer\.json.*--tokenizer"):
        HFBridge(_run_config(tmp_path / "hf", ("data.paths", f"[{tmp_path / 'docs'}]"), source="indexed"))


def _modes(root) -> dict[str, int]:
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for name in os.listdir(root):
        out[name] = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
    return out


def test_export_carries_token_ids_generation_config_tokenizer_with_normal_modes(tmp_path):
    src = tmp_path / "hf"
    _save("llama_gqa", src, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    _tokenizer(src / "tokenizer.json", ["a", "b"])
    os.chmod(src / "tokenizer.json", 0o600)  # e.g. a download cache's mode: the export's is the umask's
    model = hf.load_pretrained(src)
    old = os.umask(0o022)
    try:
        hf.save_pretrained(model, tmp_path / "out", source_dir=src)
        hf.save_pretrained(model, tmp_path / "bare")
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "out")
    assert modes.pop(".") == 0o755
    assert modes == {name: 0o644 for name in ("config.json", "model.safetensors", "generation_config.json",
                                              "tokenizer.json")}, modes
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (1, 2, 3)
    assert (tmp_path / "out" / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    # Without a source directory the generation config is made from the ids, as transformers does.
    made = json.loads((tmp_path / "bare" / "generation_config.json").read_text())
    assert made == {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    assert stat.S_IMODE(os.stat(tmp_path / "bare").st_mode) == 0o755


# ----------------------------------------------------------------------------- parallel layouts
def _layouts(rank, world_size, dirs, ids):
    """model.from_hf at TP2, PP2 (llama) and EP2 (mixtral): the loss of ``ids`` through the run's
    chunks, on every rank that holds it (the last pipeline stage)."""
    from megacore import parallel
    from megacore.compose import build_model_chunks
    from megacore.config.loading import apply_override
    from megacore.pipeline.schedules import forward_backward

    labels, mask = _labels(ids)
    micro = [{"tokens": ids[i:i + 1], "labels": labels[i:i + 1], "loss_mask": mask[i:i + 1]} for i in range(len(ids))]
    out = {}
    for name, sizes, key in (("tp2", {"tensor": 2}, "llama"), ("pp2", {"pipeline": 2}, "llama"),
                             ("ep2", {"expert": 2}, "mixtral")):
        state = parallel.initialize(**sizes)
        cfg = RunConfig()
        overrides = {"model.from_hf": dirs[key], "data.source": "mock", "train.micro_batch_size": 1,
                     "train.global_batch_size": len(ids) * state.dp_size, **{f"parallel.{a}": s for a, s in sizes.items()}}
        for k, v in overrides.items():
            apply_override(cfg, k, v)
        HFBridge(cfg)
        cfg.validate(world_size)
        chunks = build_model_chunks(cfg, state, "cpu", torch.float32)
        for c in chunks:
            c.eval()
        with torch.no_grad():
            loss = forward_backward(chunks, micro, float(mask.sum()), state.pp_group, forward_only=True)
        holds_loss = state.pp_rank == state.pp_size - 1
        out[name] = float(loss) if holds_loss else None
        parallel.destroy()
    return out


def test_from_hf_at_tp2_pp2_ep2_gives_the_transformers_loss(tmp_path):
    dirs, refs = {}, {}
    ids = sample_ids(seed=4)
    labels, mask = _labels(ids)
    for key, case in (("llama", "llama_gqa"), ("mixtral", "mixtral_moe")):
        dirs[key] = str(tmp_path / key)
        model = _save(case, dirs[key])
        with torch.no_grad():
            refs[key] = model(input_ids=ids, labels=ids).loss.item()  # transformers shifts itself
    results = run_distributed(_layouts, world_size=2, args=(dirs, ids))
    for name, key in (("tp2", "llama"), ("pp2", "llama"), ("ep2", "mixtral")):
        got = [r[name] for r in results if r[name] is not None]
        assert got, name
        for value in got:
            assert abs(value - refs[key]) <= 1e-5, (name, value, refs[key])


def test_export_config_restores_the_sources_runtime_keys(tmp_path):
    from megacore.interop.hf_finetune import export_config

    _save("llama_gqa", tmp_path / "hf")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg = _run_config(tmp_path / "hf", ("model.seq_length", 32), ("model.attention_dropout", 0.2),
                      ("model.vocab_padding_multiple", 64))
    HFBridge(cfg)
    restored = export_config(cfg.model, hf_cfg)
    assert (restored.seq_length, restored.attention_dropout, restored.vocab_padding_multiple) == (128, 0.0, 64)
    assert isinstance(restored, TransformerConfig)


def test_save_hf_at_each_save_exports_after_every_checkpoint(tmp_path, monkeypatch):
    from megacore.training.trainer import Trainer

    _save("llama_gqa", tmp_path / "hf")
    steps = []
    original = HFBridge.export

    def spy(self, chunks, step, extra):
        original(self, chunks, step, extra)
        steps.append((step, (tmp_path / "out").stat().st_ino))  # each export renames a new directory in

    monkeypatch.setattr(HFBridge, "export", spy)
    cfg = _run_config(tmp_path / "hf", ("model.seq_length", 16), ("train.iters", 4), ("train.global_batch_size", 2),
                      ("train.micro_batch_size", 2), ("train.eval_interval", 0), ("checkpoint.dir", tmp_path / "ckpt"),
                      ("checkpoint.interval", 2), ("checkpoint.save_hf", tmp_path / "out"),
                      ("checkpoint.save_hf_at_each_save", True), ("log.dir", tmp_path / "log"))
    Trainer(cfg).run()
    # Once per save; the end does not write step 4 a second time.
    assert [step for step, _ in steps] == [2, 4, 4] and steps[1][1] == steps[2][1] != steps[0][1]
    exported = hf.load_pretrained(tmp_path / "out")
    with torch.no_grad():
        before = hf.load_pretrained(tmp_path / "hf")
        assert not torch.equal(exported.output_layer.weight, before.output_layer.weight)  # it trained
    with pytest.raises(ConfigError, match="save_hf_at_each_save=true but no checkpoint is saved"):
        HFBridge(_run_config(tmp_path / "hf", ("checkpoint.save_hf", tmp_path / "out"),
                             ("checkpoint.save_hf_at_each_save", True)))


def test_a_model_key_set_to_its_default_value_counts_as_set(tmp_path):
    """``model.hidden_size=128`` names the default value and is still the user's choice: the loader
    records the keys it was given, so from_hf refuses it against config.json's 64 (it used to be
    taken silently from the directory), while an unnamed key follows the directory."""
    from megacore.config.loading import load_run_config

    _save("llama_gqa", tmp_path / "hf")
    base = [f"model.from_hf={tmp_path / 'hf'}", "data.source=mock", "model.seq_length=32"]
    cfg = load_run_config(None, base)
    HFBridge(cfg)
    assert cfg.model.hidden_size == 64
    with pytest.raises(ConfigError, match=r"model\.hidden_size=128 contradicts"):
        HFBridge(load_run_config(None, [*base, "model.hidden_size=128"]))
