"""``VisionConfig``: the ``vision:`` section of a run config, the image side of a LLaVA model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megacore.config.errors import check_finite
from megacore.config.errors import fail as _fail
from megacore.config.fields import doc
from megacore.config.model import ACTIVATIONS, TransformerConfig


@dataclass
class VisionConfig:
    """The image side of a LLaVA model (``megacore.models.llava``): a CLIP-style vision transformer,
    which of its hidden states feeds the projector, and the token that marks image positions in the
    text. Off unless ``enabled``; ``model`` is then the language model."""

    enabled: bool = doc(False, "Train a LLaVA model: this vision tower + projector in front of the model.* "
                               "language model.")
    image_size: int = doc(336, "Input image side in pixels (square; a multiple of patch_size).")
    patch_size: int = doc(14, "Side in pixels of the square patches each image is cut into.")
    num_channels: int = doc(3, "Image channels (3: RGB).")
    hidden_size: int = doc(1024, "Width of the vision transformer.")
    intermediate_size: int = doc(4096, "Hidden size of the vision transformer's MLP.")
    num_layers: int = doc(24, "Vision transformer layers.")
    num_attention_heads: int = doc(16, "Attention heads of the vision transformer (dividing hidden_size).")
    norm_epsilon: float = doc(1e-5, "Epsilon of the vision transformer's LayerNorms.")
    activation: str = doc("quick_gelu", "Vision MLP activation (non-gated): quick_gelu, gelu or gelu_tanh.")
    image_token_id: Optional[int] = doc(None, "A text token id reserved for image positions (required when "
                                              "enabled).")
    feature_layer: int = doc(-2, "Hidden state that feeds the projector: k = after k layers (0 = embeddings); "
                                 "negative counts from the end (-2: LLaVA-1.5).")
    feature_select: str = doc("default", "default drops the class token, full keeps it.")
    projector_activation: str = doc("gelu", "Activation between the projector's two linears: gelu or gelu_tanh.")
    freeze_tower: bool = doc(True, "Do not train the vision tower (LLaVA trains the projector and the language "
                                   "model only).")

    def validate(self) -> "VisionConfig":
        def fail(name, problem, fix):
            _fail(f"vision.{name}", getattr(self, name), problem, fix)

        check_finite("vision", self)
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_layers",
                     "num_attention_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be a positive integer", f"set vision.{name}")
        if self.image_size % self.patch_size != 0:
            fail("image_size", f"is not a multiple of vision.patch_size={self.patch_size}",
                 "use an image size the patches tile exactly")
        if self.hidden_size % self.num_attention_heads != 0:
            fail("hidden_size", f"is not divisible by vision.num_attention_heads={self.num_attention_heads}",
                 "choose a head count that divides the hidden size")
        if self.activation not in ACTIVATIONS or self.activation in ("swiglu", "geglu"):
            fail("activation", "is not a non-gated activation", "use quick_gelu, gelu or gelu_tanh")
        n = self.num_layers
        if not -(n + 1) <= self.feature_layer <= n:
            fail("feature_layer", f"is not a hidden state of a {n}-layer tower (0 = embeddings .. {n}, or -1 .. "
                 f"-{n + 1})", "use e.g. -2, LLaVA-1.5's choice")
        if self.feature_select not in ("default", "full"):
            fail("feature_select", "is not known", "use 'default' or 'full'")
        if self.projector_activation not in ("gelu", "gelu_tanh"):
            fail("projector_activation", "is not known", "use 'gelu' or 'gelu_tanh'")
        return self

    def check_text(self, text: TransformerConfig) -> None:
        """What the language model must offer a LLaVA model: the image token in its vocabulary, and
        no learned positions (image embeddings replace token embeddings before the decoder)."""
        if self.image_token_id is None or not 0 <= self.image_token_id < text.vocab_size:
            _fail("vision.image_token_id", self.image_token_id, f"must be a token id of the text vocabulary (size "
                  f"{text.vocab_size})", "reserve one id for image positions and set vision.image_token_id")
        if text.position_embedding == "learned":
            _fail("model.position_embedding", "learned", "does not fit a LLaVA model (image embeddings replace "
                  "token embeddings before the decoder)", "use rope or none")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_used(self) -> int:
        """Tower layers that run: hidden state k is the output of k layers (0 = the embeddings)."""
        k = self.feature_layer
        return k if k >= 0 else self.num_layers + 1 + k

    @property
    def image_seq_length(self) -> int:
        """Image tokens a prompt holds per image: one per patch (+ the class token with "full")."""
        return self.num_patches + (1 if self.feature_select == "full" else 0)
