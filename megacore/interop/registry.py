"""The registry of Hugging Face families: HF ``model_type`` / ``architectures`` -> adapter.

Every module in ``megacore/interop/families/`` defines one ``ADAPTER``; they are found by listing
that package the first time a lookup needs them, so adding a family is adding a file (see
docs/hf-interop.md). Nothing here knows a family by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

import megacore.interop.families as _families
from megacore.config import ConfigError, TransformerConfig
from megacore.interop.adapter import CausalLMAdapter, FamilyAdapter

_found: Optional[tuple[FamilyAdapter, ...]] = None


def adapters() -> tuple[FamilyAdapter, ...]:
    """Every family's adapter, in module-name order (imported once, on first use)."""
    global _found
    if _found is None:
        found: list[FamilyAdapter] = []
        for info in sorted(pkgutil.iter_modules(_families.__path__), key=lambda m: m.name):
            module = importlib.import_module(f"{_families.__name__}.{info.name}")
            adapter = getattr(module, "ADAPTER", None)
            if not isinstance(adapter, FamilyAdapter):
                raise TypeError(f"{module.__name__} defines no ADAPTER (a FamilyAdapter); every module in "
                                "megacore/interop/families/ is one family")
            found.append(adapter)
        for key in ("name", "model_type"):
            values = [getattr(a, key) for a in found]
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise TypeError(f"two family adapters share the {key} {repeated}")
        _found = tuple(found)
    return _found


def causal_lm_adapters() -> dict[str, CausalLMAdapter]:
    """Family name -> adapter, for the families that load as a ``GPTModel``."""
    return {a.name: a for a in adapters() if isinstance(a, CausalLMAdapter)}


def supported() -> str:
    """``llama (LlamaForCausalLM), ...``: the causal-LM families, for error messages."""
    return ", ".join(f"{a.name} ({a.architecture})" for a in causal_lm_adapters().values())


def adapter_for_hf_config(hf_config: dict) -> FamilyAdapter:
    """The adapter of a ``config.json`` dict: by ``model_type``, or by ``architectures`` when the
    dict has no ``model_type``. ConfigError listing the supported families otherwise."""
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    for adapter in adapters():
        if model_type == adapter.model_type or (model_type is None and set(archs) & set(adapter.architectures)):
            return adapter
    raise ConfigError(f"unsupported Hugging Face architecture (model_type={model_type!r}, architectures={archs}); "
                      f"megacore.interop.hf supports: {supported()}")


def causal_lm_adapter(name: str) -> CausalLMAdapter:
    """The causal-LM adapter called ``name``; ConfigError listing the names otherwise."""
    table = causal_lm_adapters()
    if name not in table:
        raise ConfigError(f"family={name!r} is not supported; use one of {list(table)}")
    return table[name]


def guess_adapter(config: TransformerConfig) -> CausalLMAdapter:
    """The first causal-LM adapter, most specific first (``guess_rank``), that ``config`` reads like."""
    for adapter in sorted(causal_lm_adapters().values(), key=lambda a: a.guess_rank):
        if adapter.reads_like(config):
            return adapter
    raise ConfigError(f"no Hugging Face family reads like this model; pass family= (one of {supported()})")
