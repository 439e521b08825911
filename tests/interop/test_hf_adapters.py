"""The family adapters and their registry: every module in megacore/interop/families/ is found,
activation names agree with transformers' ACT2FN in both directions, a new family is one new
file, and megacore/interop has no import circles."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.interop.hf_reference import build_hf, sample_ids, transformers

from megacore.config import ConfigError
from megacore.interop import hf, registry
from megacore.interop.adapter import CausalLMAdapter
from megacore.interop.families.llama import LlamaAdapter
from megacore.layers.mlp import ACTIVATION_FNS

INTEROP = Path(hf.__file__).parent


def test_registry_holds_one_adapter_per_family_module():
    modules = sorted(p.stem for p in (INTEROP / "families").glob("*.py") if p.stem != "__init__")
    assert sorted(a.name for a in registry.adapters()) == modules
    assert set(hf.FAMILIES) == {a.name for a in registry.adapters() if isinstance(a, CausalLMAdapter)}
    for name, (model_type, arch) in hf.FAMILIES.items():
        assert hf.detect_family({"model_type": model_type}) == name
        assert hf.detect_family({"architectures": [arch]}) == name


def test_llava_config_is_redirected_to_its_loader(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConfigError, match="load_pretrained_llava"):
        hf.load_pretrained(tmp_path)


@pytest.mark.parametrize("adapter", registry.adapters(), ids=lambda a: a.name)
def test_activation_names_are_transformers_functions(adapter):
    """Every name a family writes or reads is in ACT2FN and computes megacore's function (for the
    gated MLPs: the gate's function)."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    assert adapter.activations, f"{adapter.name} declares no activation names"
    for names in adapter.activations:
        for hf_name, ours in names.reads.items():
            assert hf_name in ACT2FN, f"{adapter.name} {names.key}: {hf_name!r} is not a transformers activation"
            torch.testing.assert_close(ACT2FN[hf_name](x), ACTIVATION_FNS[ours](x), atol=1e-6, rtol=0,
                                       msg=f"{adapter.name} {names.key}: {hf_name} != megacore {ours}")
        for ours in names.table:
            assert names.reads[names.to_hf(ours)] == ours


@pytest.mark.parametrize("family,key,hf_name,ours", [
    ("llama", "hidden_act", "silu", "swiglu"), ("llama", "hidden_act", "swish", "swiglu"),
    ("llama", "hidden_act", "gelu_pytorch_tanh", "geglu"), ("llama", "hidden_act", "gelu_new", "geglu"),
    ("qwen2", "hidden_act", "swish", "swiglu"),
    ("gpt2", "activation_function", "gelu_new", "gelu_tanh"),
    ("gpt2", "activation_function", "gelu_pytorch_tanh", "gelu_tanh"), ("gpt2", "activation_function", "gelu", "gelu"),
])
def test_activation_names_import_and_export(family, key, hf_name, ours):
    base = {"model_type": family, "vocab_size": 100, "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 96, "n_embd": 64, "n_head": 4, "n_layer": 2}
    config = hf.config_from_hf({**base, key: hf_name})
    assert config.activation == ours
    written = hf.config_to_hf(config, family)[key]
    assert hf.config_from_hf({**base, key: written}).activation == ours
    assert written == {"swiglu": "silu", "geglu": "gelu_pytorch_tanh", "gelu_tanh": "gelu_new"}.get(ours, ours)


@pytest.mark.parametrize("hf_name", ["gelu_new", "gelu_pytorch_tanh"])
def test_geglu_llama_round_trip_through_transformers(tmp_path, hf_name):
    """A Llama with a GELU-tanh MLP, under either name transformers writes, loads with HF's logits;
    the export (written as gelu_pytorch_tanh) reproduces them in transformers."""
    ref = build_hf("llama_gqa", seed=13, hidden_act=hf_name)
    ref.save_pretrained(tmp_path / "hf")
    ours = hf.load_pretrained(tmp_path / "hf")
    assert ours.config.activation == "geglu"
    ids = sample_ids(seed=14)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        assert (ours(ids) - want).abs().max().item() <= 1e-4
    hf.save_pretrained(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (back(input_ids=ids).logits - want).abs().max().item() <= 1e-4


def test_a_new_family_is_one_new_file(tmp_path, monkeypatch):
    """Dropping a module that defines ADAPTER into the families package registers the family:
    a checkpoint with its model_type loads, with no other change."""
    import megacore.interop.families as families

    (tmp_path / "families").mkdir()
    (tmp_path / "families" / "toy_llama.py").write_text(
        "from megacore.interop.families.llama import LlamaAdapter\n\n\n"
        "class ToyLlamaAdapter(LlamaAdapter):\n"
        "    name, model_type, architectures = 'toy_llama', 'toy_llama', ('ToyLlamaForCausalLM',)\n\n\n"
        "ADAPTER = ToyLlamaAdapter()\n")
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path / "families")])
    monkeypatch.setattr(registry, "_found", None)
    monkeypatch.delitem(sys.modules, "megacore.interop.families.toy_llama", raising=False)
    try:
        ref = build_hf("llama_gqa", seed=15)
        ref.save_pretrained(tmp_path / "hf")
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "toy_llama"}))
        ours = hf.load_pretrained(tmp_path / "hf")
        assert ours.hf_family == "toy_llama" and isinstance(registry.causal_lm_adapter("toy_llama"), LlamaAdapter)
        ids = sample_ids(seed=16)
        with torch.no_grad():
            assert (ours(ids) - ref(input_ids=ids).logits).abs().max().item() <= 1e-4
    finally:
        sys.modules.pop("megacore.interop.families.toy_llama", None)
        registry._found = None


def _interop_imports() -> dict[str, set[str]]:
    """megacore.interop module -> the megacore.interop modules it imports (anywhere in the file)."""
    files = {".".join(("megacore", "interop", *p.relative_to(INTEROP).with_suffix("").parts)): p
             for p in INTEROP.rglob("*.py")}
    mods = {name.removesuffix(".__init__"): p for name, p in files.items()}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            edges[m] |= {n for n in names if n in mods and n != m and mods[n].name != "__init__.py"}
    return edges


def test_no_import_circles_in_interop():
    edges = _interop_imports()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(edges[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(edges[n])
        return seen

    circles = sorted(m for m in edges if m in reachable(m))
    assert not circles, f"modules on an import circle: {circles}"
    # Family modules import only the shared mapping helpers and each other, never the entry points:
    # the registry imports them, so importing it (or what imports it) back would close a circle.
    entry = {"megacore.interop.registry", "megacore.interop.hf", "megacore.interop.hf_config",
             "megacore.interop.hf_llava", "megacore.interop.hf_transfer", "megacore.interop.hf_io"}
    for m, targets in edges.items():
        if m.startswith("megacore.interop.families."):
            assert not targets & entry, f"{m} imports {sorted(targets & entry)}"
