"""Models: ``GPTModel`` (dense GPT / Llama family, MoE and hybrid stacks); ``LlavaModel`` (vision
transformer + projector + GPTModel), in ``megacore.models.llava``."""

from megacore.models.gpt import GPTModel  # noqa: F401
