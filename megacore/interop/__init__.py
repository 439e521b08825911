"""Interop with other ecosystems. ``megacore.interop.hf``: Hugging Face import/export of language
models; ``megacore.interop.hf_llava``: of LLaVA (vision + language) models.

Layout: ``families/`` holds one adapter module per Hugging Face family (its defaults, config and
weight-name mappings, export checks, activation names); ``registry`` maps a ``config.json``'s
``model_type`` to its adapter; ``hf_config``, ``hf_transfer``, ``hf_io``, ``hf_weights``,
``hf_rope`` and ``hf_activations`` are the family-free shared parts. See docs/hf-interop.md.

Submodules load lazily (``megacore.interop.hf`` imports safetensors and the model code only when
first touched), so ``import megacore.interop`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["hf", "hf_llava"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
