"""Models: ``GPTModel`` (dense GPT / Llama family)."""

from megacore.models.gpt import GPTModel  # noqa: F401
