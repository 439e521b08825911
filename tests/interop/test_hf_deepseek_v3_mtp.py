"""DeepSeek-V3's multi-token-prediction modules through the HF interop: a checkpoint with
``num_nextn_predict_layers`` = D stores MTP module k as layer ``num_hidden_layers + k - 1`` (enorm, hnorm,
eh_proj, shared_head.norm, a decoder layer, and copies of the embedding and output head). Transformers'
``DeepseekV3ForCausalLM`` builds no MTP module, so the tests write those tensors into the saved file
themselves, and check the depth against DeepSeek's MTP computation built from transformers' modules."""

from __future__ import annotations

import json

import pytest
import torch

from tests.interop.hf_reference import CASES, VOCAB, build_hf, read_safetensors_dir, sample_ids, transformers

from megacore.config import TransformerConfig
from megacore.interop import hf
from megacore.layers.output_head import IGNORE_INDEX

N = CASES["deepseek_v3"][1]["num_hidden_layers"]  # 3; first_k_dense_replace 1: the MTP layer is MoE
H = CASES["deepseek_v3"][1]["hidden_size"]


def _mtp_tensors(tensors: dict, depth: int, gen: torch.Generator) -> dict:
    """MTP module ``depth`` (1-based) of the tiny model: own random norms / eh_proj / decoder layer (the
    shapes of the last main layer, an MoE one), and exact copies of the embedding and lm_head."""
    layer, src = f"model.layers.{N + depth - 1}.", f"model.layers.{N - 1}."
    out = {f"{layer}enorm.weight": 1 + 0.1 * torch.randn(H, generator=gen),
           f"{layer}hnorm.weight": 1 + 0.1 * torch.randn(H, generator=gen),
           f"{layer}eh_proj.weight": 0.1 * torch.randn(H, 2 * H, generator=gen),
           f"{layer}shared_head.norm.weight": 1 + 0.1 * torch.randn(H, generator=gen),
           f"{layer}embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
           f"{layer}shared_head.head.weight": tensors["lm_head.weight"].clone()}
    for name, t in tensors.items():
        if name.startswith(src):
            out[layer + name[len(src):]] = (t + 0.1 * torch.randn(t.shape, generator=gen)).to(t.dtype)
    return out


def _checkpoint(path, depths: int = 1, seed: int = 11, config_depths=None):
    """(the HF model, the file's tensors, its config.json dict) of a tiny DeepSeek-V3 with ``depths`` MTP
    modules in its safetensors file and ``num_nextn_predict_layers = config_depths`` (default ``depths``)."""
    from safetensors.torch import load_file, save_file

    ref = build_hf("deepseek_v3", seed=seed)
    ref.save_pretrained(path)
    tensors = load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for k in range(1, depths + 1):
        tensors.update(_mtp_tensors(tensors, k, gen))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = depths if config_depths is None else config_depths
    (path / "config.json").write_text(json.dumps(cfg))
    return ref, tensors, cfg


_MTP_ONLY = ("enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens.")


def _as_main_layer(path, tensors: dict, cfg: dict):
    """A checkpoint without MTP modules whose main layer N-1 is MTP module 1's decoder layer."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    out = {n: t for n, t in tensors.items() if not n.startswith("model.layers.") or int(n.split(".")[2]) < N}
    for name, t in tensors.items():
        rest = name[len(f"model.layers.{N}."):]
        if name.startswith(f"model.layers.{N}.") and not rest.startswith(_MTP_ONLY):
            out[f"model.layers.{N - 1}.{rest}"] = t
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _main_logits_match(ours, ref) -> None:
    ids = sample_ids(seed=2)
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("depths", [1, 2])
def test_mtp_modules_import_and_export_bit_for_bit(tmp_path, depths):
    ref, tensors, cfg = _checkpoint(tmp_path / "hf", depths)
    ours = hf.load_pretrained(tmp_path / "hf")
    c = ours.config
    assert c.num_layers == N and c.mtp_num_layers == depths
    assert c.mtp_loss_weight == TransformerConfig.mtp_loss_weight  # no HF key: megacore's default
    _main_logits_match(ours, ref)
    for j in range(depths):
        depth, hf_layer = ours.mtp.layers[j], f"model.layers.{N + j}."
        assert c.is_moe_layer(N + j) and type(depth.layer.mlp).__name__ == "MoELayer"
        for mine, theirs in [("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                             ("final_norm", "shared_head.norm")]:
            assert torch.equal(getattr(depth, mine).weight, tensors[f"{hf_layer}{theirs}.weight"]), mine
        assert torch.equal(depth.layer.mlp.router.expert_bias, tensors[f"{hf_layer}mlp.gate.e_score_correction_bias"])
    # the depth's decoder layer holds what loading its tensors as main layer N-1 gives (same transforms)
    swapped = _as_main_layer(tmp_path / "swapped", tensors, cfg)
    as_main = hf.load_pretrained(swapped).decoder.layers[str(N - 1)].state_dict()
    depth_layer = ours.mtp.layers[0].layer.state_dict()
    assert set(depth_layer) == set(as_main)
    for name, t in as_main.items():
        assert torch.equal(depth_layer[name], t), name

    hf.save_pretrained(ours, tmp_path / "out")
    exported = read_safetensors_dir(tmp_path / "out")
    assert sorted(exported) == sorted(tensors)
    for name, t in tensors.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == cfg


def _causal_additive(seq: int) -> torch.Tensor:
    return torch.full((seq, seq), float("-inf")).triu(1)[None, None]


@torch.no_grad()
def test_the_depth_computes_deepseeks_mtp(tmp_path):
    """Depth 1's per-token loss equals DeepSeek's MTP module built from transformers' parts with the
    file's tensors: logits = head(shared_head.norm(Layer(eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h_i)])))),
    h the main model's last hidden state (after its final norm), predicting t_{i+2}. This pins the
    concat order (embedding first) and which norm is applied where."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    ref, tensors, cfg = _checkpoint(tmp_path / "hf", 1, seed=12)
    ours = hf.load_pretrained(tmp_path / "hf")
    # transformers' own decoder layer with the module's tensors (loaded as main layer N-1: both MoE)
    holder = transformers.AutoModelForCausalLM.from_pretrained(_as_main_layer(tmp_path / "swapped", tensors, cfg),
                                                               attn_implementation="eager").eval()
    layer = holder.model.layers[N - 1]
    prefix = f"model.layers.{N}."
    norms = {}
    for name in ("enorm", "hnorm", "shared_head.norm"):
        norms[name] = DeepseekV3RMSNorm(H, eps=ref.config.rms_norm_eps)
        norms[name].weight.copy_(tensors[f"{prefix}{name}.weight"])

    ids = sample_ids(seed=3)
    batch, seq = ids.shape
    h = ref.model(input_ids=ids).last_hidden_state
    nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # t_{i+1}
    x = torch.cat([norms["enorm"](ref.model.embed_tokens(nxt)), norms["hnorm"](h)], dim=-1)
    x = x @ tensors[f"{prefix}eh_proj.weight"].t()
    positions = torch.arange(seq)[None].expand(batch, -1)
    out = layer(x, attention_mask=_causal_additive(seq), position_ids=positions,
                position_embeddings=ref.model.rotary_emb(x, positions))
    out = out[0] if isinstance(out, tuple) else out
    logits = norms["shared_head.norm"](out) @ tensors[f"{prefix}shared_head.head.weight"].t()
    want = torch.nn.functional.cross_entropy(logits[:, :-2].reshape(-1, VOCAB), ids[:, 2:].reshape(-1),
                                             reduction="none").view(batch, seq - 2)

    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    rotary, mask = ours.attention_inputs(seq, batch, ids.device, torch.float32)
    hidden = ours.decoder(ours.embedding(ids), rotary, mask)
    got = ours.mtp.depth_losses(ours, hidden, ids, labels, ours.word_embeddings(), rotary, mask)
    # entry [0, :, j] is depth 1's loss of position j - 1 (placed at its target's position)
    assert (got[0, :, 1:seq - 1] - want).abs().max() <= 1e-4


def test_a_differing_copy_of_a_shared_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    for name in (f"model.layers.{N}.embed_tokens.weight", f"model.layers.{N}.shared_head.head.weight"):
        _, tensors, _ = _checkpoint(tmp_path / "hf", 1)
        tensors[name] = tensors[name].clone()
        tensors[name][5, 3] += 1e-3
        save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"tensor '{name}' differs from"):
            hf.load_pretrained(tmp_path / "hf")
        # ... which the override that skips the MTP modules does not read
        assert hf.load_pretrained(tmp_path / "hf", mtp_num_layers=0).config.mtp_num_layers == 0


def test_the_override_mtp_num_layers_0_skips_the_modules(tmp_path):
    """Inference-only import: the depths are not built, their tensors are skipped as transformers does,
    and export writes no MTP tensors and num_nextn_predict_layers=0. A layer past the counted MTP
    modules is still refused."""
    ref, tensors, cfg = _checkpoint(tmp_path / "hf", 2)
    ours = hf.load_pretrained(tmp_path / "hf", mtp_num_layers=0)
    assert ours.mtp is None and ours.config.mtp_num_layers == 0
    _main_logits_match(ours, ref)
    hf.save_pretrained(ours, tmp_path / "out")
    exported = read_safetensors_dir(tmp_path / "out")
    assert sorted(exported) == sorted(n for n in tensors if not n.startswith((f"model.layers.{N}.",
                                                                               f"model.layers.{N + 1}.")))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0

    one = hf.load_pretrained(tmp_path / "hf", mtp_num_layers=1)  # the first module only
    assert one.config.mtp_num_layers == 1
    assert torch.equal(one.mtp.layers[0].eh_proj.weight, tensors[f"model.layers.{N}.eh_proj.weight"])

    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    with pytest.raises(ValueError, match=rf"mapping does not use.*model\.layers\.{N + 1}\."):
        hf.load_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=rf"lacks .*model\.layers\.{N + 2}\."):
        hf.load_pretrained(tmp_path / "hf", mtp_num_layers=3)


def test_a_config_counting_mtp_modules_the_file_lacks_imports_without_them(tmp_path):
    """transformers' save_pretrained writes num_nextn_predict_layers=1 (its default) and no MTP tensors."""
    ref = build_hf("deepseek_v3", seed=13, num_nextn_predict_layers=1)
    ref.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    ours = hf.load_pretrained(tmp_path / "hf")
    assert ours.config.mtp_num_layers == 0 and ours.mtp is None
    _main_logits_match(ours, ref)
    hf.save_pretrained(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    # asking for the depths explicitly names what is missing
    with pytest.raises(ValueError, match=rf"lacks .*model\.layers\.{N}\.eh_proj"):
        hf.load_pretrained(tmp_path / "hf", mtp_num_layers=1)


def test_a_megacore_model_with_mtp_exports_and_reloads_the_same(tmp_path):
    """Built in megacore (its own init), exported with its depth, imported again: every parameter back."""
    from megacore.models import GPTModel

    c = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, seq_length=16,
                          num_experts=4, multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=12,
                          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, moe_ffn_hidden_size=16,
                          moe_shared_expert_hidden_size=32, moe_router_score="sigmoid", moe_router_expert_bias=True,
                          moe_first_k_dense=1, norm_epsilon=1e-6, mtp_num_layers=1, vocab_padding_multiple=1
                          ).validate()
    model = GPTModel(c, seed=4).eval()
    hf.save_pretrained(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["num_nextn_predict_layers"] == 1
    files = read_safetensors_dir(tmp_path)
    assert torch.equal(files["model.layers.2.embed_tokens.weight"], files["model.embed_tokens.weight"])
    assert torch.equal(files["model.layers.2.shared_head.head.weight"], files["lm_head.weight"])
    back = hf.load_pretrained(tmp_path, vocab_padding_multiple=1)
    assert back.config.mtp_num_layers == 1
    theirs = dict(back.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(theirs[name], p), name


def test_cli_convert_round_trip_keeps_the_mtp_module(tmp_path):
    """``megacore convert`` HF -> megacore checkpoint -> HF: the MTP tensors (copies included) come back."""
    from megacore.cli import main as cli_main

    _, tensors, cfg = _checkpoint(tmp_path / "hf", 1, seed=14)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert cli_main(["convert", "--from", "hf", "--input", str(tmp_path / "hf"), "--output", str(ckpt)]) == 0
    assert cli_main(["convert", "--from", "megacore", "--input", str(ckpt), "--output", str(back)]) == 0
    exported = read_safetensors_dir(back)
    assert sorted(exported) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(exported[name], t), name
    assert json.loads((back / "config.json").read_text()) == cfg
