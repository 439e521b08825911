"""Interop with other ecosystems. ``megacore.interop.hf``: Hugging Face import/export of language
models; ``megacore.interop.hf_llava``: of LLaVA (vision + language) models.

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
