"""LLaVA: a vision transformer, a two-layer projector and a GPT language model.

    image -> VisionTransformer -> hidden states of layer ``vision.feature_layer`` -> drop the class
    token ("default") or keep it ("full") -> projector (linear, GELU, linear) -> one embedding per
    patch, in the language model's hidden size

    text  -> token embeddings, where every ``vision.image_token_id`` position takes the next image
    embedding (images in batch order, patches in row-major order) -> the language model's decoder
    -> logits / loss, exactly as ``GPTModel``

A prompt holds one image token per patch embedding (``image_seq_length`` of them per image, as
Hugging Face's processor writes them); a mismatch between the image tokens and the images is an
error, never a silent truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import TransformerConfig, VisionConfig
from megacore.models.gpt import GPTModel
from megacore.models.init import materialize
from megacore.models.vision import VisionTransformer, layer_config

PROJECTOR_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class LlavaConfig:
    """The language model's config and the vision side's (which holds the LLaVA glue: the image
    token, the feature layer, the projector's activation)."""

    text: TransformerConfig
    vision: VisionConfig

    def validate(self) -> "LlavaConfig":
        self.text.validate()
        self.vision.validate().check_text(self.text)
        return self


class LlavaProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, activation: str):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)
        self.activation = PROJECTOR_ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


class LlavaModel(nn.Module):
    """``language_model``: a GPTModel of ``config.text`` built elsewhere, e.g. tensor-parallel
    (``megacore.compose.build_parallel_gpt``); default: a one-device GPTModel from ``seed``.

    Under tensor parallelism the vision tower and the projector are replicated on every TP rank;
    ``megacore.parallel.parallelize_llava`` applies that plan (under sequence parallelism their
    gradients are partial sums, declared for a TP sum).
    """

    def __init__(self, config: LlavaConfig, seed: int = 0, language_model: Optional[GPTModel] = None):
        super().__init__()
        self.config = config.validate()
        self.language_model = GPTModel(config.text, seed=seed) if language_model is None else language_model
        self.vision_tower = VisionTransformer(config.vision)
        self.projector = LlavaProjector(config.vision.hidden_size, config.text.hidden_size,
                                        config.vision.projector_activation)
        # Deterministic from the seed, independent of the global RNG (as GPTModel's own parameters).
        materialize(self.vision_tower, layer_config(config.vision), seed + 1)
        materialize(self.projector, config.text, seed + 2)
        # The layers after the feature layer and CLIP's pooled-output norm take no part in the
        # forward: frozen, so data parallelism and the optimizer leave them alone (they are kept for
        # checkpoint round trips).
        for layer in list(self.vision_tower.encoder.layers.values())[config.vision.layers_used:]:
            layer.requires_grad_(False)
        self.vision_tower.post_norm.requires_grad_(False)
        # Under sequence parallelism the plan hands in this rank's chunk of a flattened per-token
        # tensor (megacore.parallel.parallelize_llava); None: every token is local.
        self.local_tokens: Optional[Callable] = None

    def image_features(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """[N_images, C, H, W] -> [N_images, image_seq_length, text hidden]."""
        hidden = self.vision_tower(pixels_BCHW, num_layers_used=self.config.vision.layers_used)
        if self.config.vision.feature_select == "default":
            hidden = hidden[:, 1:]
        return self.projector(hidden)

    def embed(self, input_ids: torch.Tensor, pixels_BCHW: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with every image token replaced by the next image embedding."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        embedding = self.language_model.embedding
        hidden_BSH = embedding.word_embeddings(input_ids)
        is_image = input_ids == self.config.vision.image_token_id
        n_tokens = int(is_image.sum())
        n_images = 0 if pixels_BCHW is None else pixels_BCHW.shape[0]
        per_image = self.config.vision.image_seq_length
        if n_tokens != n_images * per_image:
            raise ValueError(f"the prompts hold {n_tokens} image tokens (id {self.config.vision.image_token_id}) but "
                             f"{n_images} image(s) give {n_images * per_image} embeddings ({per_image} each); put "
                             f"{per_image} image tokens per image in the text, in image order")
        if n_images:
            features = self.image_features(pixels_BCHW).to(hidden_BSH.dtype)
            hidden_BSH = self._insert_images(hidden_BSH, is_image, features.reshape(-1, features.shape[-1]))
        return embedding.dropout(hidden_BSH)

    def _insert_images(self, hidden_BSH: torch.Tensor, is_image_BS: torch.Tensor, features_NH: torch.Tensor):
        """``hidden_BSH`` with the i-th image token's row replaced by ``features_NH[i]`` (image tokens
        counted in flattened batch-major order). Under sequence parallelism ``hidden_BSH`` is this
        rank's chunk of those flattened tokens (``megacore.parallel.collectives``)."""
        flat = is_image_BS.reshape(-1)
        index = torch.cumsum(flat.long(), 0) - 1  # which image embedding each image token takes
        if self.local_tokens is not None:
            flat, index = self.local_tokens(flat), self.local_tokens(index)
        picked = features_NH[index.clamp(min=0)]
        out = torch.where(flat[:, None], picked, hidden_BSH.reshape(-1, hidden_BSH.shape[-1]))
        return out.view_as(hidden_BSH)

    @property
    def pre_process(self) -> bool:
        return True

    @property
    def post_process(self) -> bool:
        """False when the language model is the first stage of a pipeline (its later layers elsewhere)."""
        return self.language_model.post_process

    def configure_recompute(self, recompute) -> None:
        """Activation recomputation in the language model (the tower is small next to it)."""
        self.language_model.configure_recompute(recompute)

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, loss_mask: Optional[torch.Tensor] = None,
                reduction: str = "mean"):
        """input_ids [B, S] (with image tokens), pixel_values [N_images, C, H, W] -> logits
        [B, S, vocab_size], or the loss when ``labels`` (the next-token targets, -100 = ignore, e.g. on
        image tokens) is given. ``position_ids`` and ``attention_mask`` as in ``GPTModel.forward``."""
        lm = self.language_model
        hidden_BSH = self.embed(input_ids, pixel_values)
        batch, seq = input_ids.shape
        rotary, mask = lm.attention_inputs(seq, batch, hidden_BSH.device, hidden_BSH.dtype, position_ids,
                                           attention_mask)
        hidden_BSH = lm.decoder(hidden_BSH, rotary, mask)
        if not lm.post_process:  # the first pipeline stage: the next stage continues from here
            return hidden_BSH
        if labels is None:
            return lm.full_logits(hidden_BSH)
        return lm.compute_loss(hidden_BSH, labels, loss_mask, reduction)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor], max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                 eos_ids=()) -> torch.Tensor:
        """Continue prompts [B, S] (with their image tokens) by up to ``max_new_tokens``; returns
        [B, S + n]. The prompt and its images fill the language model's KV cache once, then one
        token per step (``megacore.inference.sampling``'s sampling rules; ``temperature`` 0 = greedy).
        The whole continuation must fit ``model.seq_length``: sliding the window would cut images."""
        from megacore.inference.kv_cache import KVCache
        from megacore.inference.sampling import Continuation, check_sampling_args, next_token

        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        lm = self.language_model
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
        total = input_ids.shape[1] + max_new_tokens
        if total > lm.config.seq_length:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceed "
                             f"model.seq_length={lm.config.seq_length}; shorten the prompt or generate fewer tokens")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        out = Continuation(input_ids, eos_ids)
        cache = KVCache.for_model(lm, input_ids.shape[0], max_length=total)
        was_training = self.training
        self.eval()
        try:
            logits_BV = lm(input_ids, kv_cache=cache, hidden_states=self.embed(input_ids, pixel_values))[:, -1]
            for step in range(max_new_tokens):
                if out.append(next_token(logits_BV, temperature, top_k, top_p, generator)):
                    break
                if step + 1 < max_new_tokens:  # text only from here: the images are in the cache
                    logits_BV = lm(out.ids[:, -1:], kv_cache=cache)[:, -1]
        finally:
            self.train(was_training)
        return out.ids


class LlavaLanguageStage(nn.Module):
    """A later pipeline stage of a LLaVA model: a GPTModel stage whose parameters are named as in
    ``LlavaModel`` (``language_model.*``), so that checkpoints reshard between layouts."""

    def __init__(self, stage: GPTModel):
        super().__init__()
        self.language_model = stage

    @property
    def config(self) -> TransformerConfig:
        return self.language_model.config

    @property
    def pre_process(self) -> bool:
        return self.language_model.pre_process

    @property
    def post_process(self) -> bool:
        return self.language_model.post_process

    def configure_recompute(self, recompute) -> None:
        self.language_model.configure_recompute(recompute)

    def forward(self, *args, **kwargs):
        return self.language_model(*args, **kwargs)

