"""Building blocks: norms, embeddings and rotary, attention, MLP, transformer layer and block."""

from megacore.layers.attention import CoreAttention, SelfAttention  # noqa: F401
from megacore.layers.embedding import LanguageModelEmbedding  # noqa: F401
from megacore.layers.mlp import MLP  # noqa: F401
from megacore.layers.norm import LayerNorm, RMSNorm, build_norm  # noqa: F401
from megacore.layers.rotary import RotaryEmbedding  # noqa: F401
from megacore.layers.spec import LayerSpec  # noqa: F401
from megacore.layers.transformer import TransformerBlock, TransformerLayer  # noqa: F401
