"""LLaVA: a vision transformer, a two-layer projector and a GPT language model.

    image -> VisionTransformer -> hidden states of layer ``vision_feature_layer`` -> drop the class
    token ("default") or keep it ("full") -> projector (linear, GELU, linear) -> one embedding per
    patch, in the language model's hidden size

    text  -> token embeddings, where every ``image_token_id`` position takes the next image
    embedding (images in batch order, patches in row-major order) -> the language model's decoder
    -> logits / loss, exactly as ``GPTModel``

A prompt holds one image token per patch embedding (``image_seq_length`` of them per image, as
Hugging Face's processor writes them); a mismatch between the image tokens and the images is an
error, never a silent truncation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import ConfigError, TransformerConfig
from megacore.models.gpt import GPTModel
from megacore.models.init import materialize
from megacore.models.vision import VisionConfig, VisionTransformer

PROJECTOR_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class LlavaConfig:
    text: TransformerConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 32000
    vision_feature_layer: int = -2          # which hidden state of the vision tower (negative: from the end)
    vision_feature_select: str = "default"  # "default" drops the class token, "full" keeps it
    projector_activation: str = "gelu"

    def validate(self) -> "LlavaConfig":
        def fail(name, value, problem, fix):
            raise ConfigError(f"llava.{name}={value!r} {problem}; {fix}")

        self.text.validate()
        self.vision.validate()
        if not 0 <= self.image_token_id < self.text.vocab_size:
            fail("image_token_id", self.image_token_id, f"is outside the text vocabulary (size {self.text.vocab_size})",
                 "use a token id the tokenizer reserves for images")
        if self.text.position_embedding == "learned":
            fail("text.position_embedding", "learned", "is not supported: image embeddings replace token embeddings "
                 "before the decoder", "use a rope or position-free language model")
        n = self.vision.num_layers
        if not -(n + 1) <= self.vision_feature_layer <= n:
            fail("vision_feature_layer", self.vision_feature_layer, f"is not a hidden state of a {n}-layer tower "
                 f"(0 = embeddings .. {n}, or -1 .. -{n + 1})", "use e.g. -2, LLaVA-1.5's choice")
        if self.vision_feature_select not in ("default", "full"):
            fail("vision_feature_select", self.vision_feature_select, "is not known", "use 'default' or 'full'")
        if self.projector_activation not in PROJECTOR_ACTIVATIONS:
            fail("projector_activation", self.projector_activation, "is not known",
                 f"use one of {list(PROJECTOR_ACTIVATIONS)}")
        return self

    @property
    def layers_used(self) -> int:
        """Vision layers run: hidden state k is the output of k layers (0 = the embeddings)."""
        k = self.vision_feature_layer
        return k if k >= 0 else self.vision.num_layers + 1 + k

    @property
    def image_seq_length(self) -> int:
        """Image tokens a prompt holds per image."""
        return self.vision.num_patches + (1 if self.vision_feature_select == "full" else 0)


class LlavaProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, activation: str):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)
        self.activation = PROJECTOR_ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig, seed: int = 0):
        super().__init__()
        self.config = config.validate()
        self.language_model = GPTModel(config.text, seed=seed)
        self.vision_tower = VisionTransformer(config.vision)
        self.projector = LlavaProjector(config.vision.hidden_size, config.text.hidden_size, config.projector_activation)
        # Deterministic from the seed, independent of the global RNG (as GPTModel's own parameters).
        materialize(self.vision_tower, config.vision.layer_config(), seed + 1)
        materialize(self.projector, config.text, seed + 2)

    def image_features(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """[N_images, C, H, W] -> [N_images, image_seq_length, text hidden]."""
        hidden = self.vision_tower(pixels_BCHW, num_layers_used=self.config.layers_used)
        if self.config.vision_feature_select == "default":
            hidden = hidden[:, 1:]
        return self.projector(hidden)

    def embed(self, input_ids: torch.Tensor, pixels_BCHW: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with every image token replaced by the next image embedding."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        embedding = self.language_model.embedding
        hidden_BSH = embedding.word_embeddings(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_tokens = int(is_image.sum())
        n_images = 0 if pixels_BCHW is None else pixels_BCHW.shape[0]
        per_image = self.config.image_seq_length
        if n_tokens != n_images * per_image:
            raise ValueError(f"the prompts hold {n_tokens} image tokens (id {self.config.image_token_id}) but "
                             f"{n_images} image(s) give {n_images * per_image} embeddings ({per_image} each); put "
                             f"{per_image} image tokens per image in the text, in image order")
        if n_images:
            features = self.image_features(pixels_BCHW).to(hidden_BSH.dtype)
            hidden_BSH = hidden_BSH.masked_scatter(is_image[..., None], features)
        return embedding.dropout(hidden_BSH)

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, reduction: str = "mean"):
        """input_ids [B, S] (with image tokens), pixel_values [N_images, C, H, W] -> logits
        [B, S, vocab_size], or the loss when ``labels`` (the next-token targets, -100 = ignore, e.g. on
        image tokens) is given. ``attention_mask`` as in ``GPTModel.forward``."""
        lm = self.language_model
        hidden_BSH = self.embed(input_ids, pixel_values)
        batch, seq = input_ids.shape
        rotary, mask = lm.attention_inputs(seq, batch, hidden_BSH.device, hidden_BSH.dtype, None, attention_mask)
        hidden_BSH = lm.decoder(hidden_BSH, rotary, mask)
        if labels is None:
            return lm.full_logits(hidden_BSH)
        return lm.compute_loss(hidden_BSH, labels, loss_mask, reduction)
