"""GPTModel: embedding -> transformer block -> final norm -> output layer (tied or untied).

One device first: this file knows nothing about parallelism. A parallel plan (``megacore.parallel``)
swaps modules for their sharded versions: the linears and embeddings, the loss head
(``output_head``, see ``megacore.layers.output_head``) and, for context parallelism, the attention
mask and the core attention.

Labels follow the Megatron convention: ``labels[:, t]`` is the target for position t (already
shifted, i.e. the token after ``input_ids[:, t]``); ``-100`` marks positions without a target.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megacore.config import RecomputeConfig, TransformerConfig
from megacore.layers.attention import AttentionMask
from megacore.layers.embedding import LanguageModelEmbedding
from megacore.sharding import mark_init
from megacore.layers.output_head import IGNORE_INDEX, OutputHead, reduce_token_loss
from megacore.layers.rotary import RotaryEmbedding
from megacore.layers.spec import LayerSpec
from megacore.layers.transformer import TransformerBlock
from megacore.sharding import param_meta

__all__ = ["GPTModel", "IGNORE_INDEX"]


class GPTModel(nn.Module):
    """Decoder-only language model.

    ``pre_process``/``post_process`` let a pipeline stage hold only part of it: the first stage
    embeds, the last applies the final norm, output layer and loss. ``layer_numbers`` are the global
    indices of the layers this instance holds (all by default).

    On construction outside the meta device the weights are initialized deterministically from
    ``seed`` (see ``megacore.models.init``).
    """

    def __init__(self, config: TransformerConfig, layer_spec: Optional[LayerSpec] = None, seed: int = 0,
                 pre_process: bool = True, post_process: bool = True, layer_numbers=None):
        super().__init__()
        config.validate()
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.embedding = LanguageModelEmbedding(config) if pre_process else None
        self.rotary = RotaryEmbedding(config) if config.position_embedding == "rope" else None
        self.decoder = TransformerBlock(config, layer_spec, layer_numbers, has_final_norm=post_process)
        self.output_layer = None
        if post_process and not config.tie_embeddings:
            self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
            mark_init(self.output_layer.weight, "normal")
        # A tied last pipeline stage without the embedding holds its own copy of the table, kept equal
        # to the first stage's by summing their gradients (megacore.pipeline).
        if post_process and config.tie_embeddings and not pre_process and not config.mtp_num_layers:
            self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
            mark_init(self.output_layer.weight, "normal")
            param_meta(self.output_layer.weight).global_name = "embedding.word_embeddings.weight"
        # Parameter-free seams a parallel plan may swap: the loss head, and the attention mask.
        self.output_head = OutputHead(config.vocab_size)
        self.attention_mask = AttentionMask(config.sliding_window)
        # Tokens of the residual stream are split over this many ranks (sequence parallelism; the
        # TP plan sets it): a later pipeline stage's hidden states then hold S / this many tokens.
        self.sequence_parallel_size = 1
        # Multi-token prediction depths (megacore.layers.mtp) live with the output head. A last pipeline
        # stage without the embedding holds its own copy of the table for them (with tied embeddings
        # that copy is the output weight too), kept equal to the first stage's like a tied copy.
        self.mtp = None
        if post_process and config.mtp_num_layers > 0:
            from megacore.layers.mtp import MultiTokenPrediction

            self.mtp = MultiTokenPrediction(config, layer_spec, own_embedding=not pre_process)
        if not self.decoder.layers or next(self.parameters()).device.type != "meta":
            from megacore.models.init import materialize

            materialize(self, config, seed)

    # ----------------------------------------------------------------------------- pieces
    def configure_recompute(self, recompute: RecomputeConfig) -> None:
        self.decoder.configure_recompute(recompute)

    def output_weight(self) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.word_embeddings().weight

    def word_embeddings(self) -> nn.Module:
        """The token-embedding table's module: the embedding's, or the MTP block's copy on a last stage."""
        return self.embedding.word_embeddings if self.embedding is not None else self.mtp.embedding

    def output_logits(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        """Logits over the padded vocab (a vocab shard under TP)."""
        return self.output_head.logits(hidden_BSH, self.output_weight())

    def full_logits(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, vocab_size] without padding columns (gathered from the shards under TP)."""
        return self.output_head.full_logits(hidden_BSH, self.output_weight())

    def compute_token_loss(self, hidden_BSH: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """Per-token loss [B, S] (0 where the label is ignored)."""
        if self.use_fused_loss(hidden_BSH):
            return self.output_head.fused_loss(hidden_BSH, self.output_weight(), labels_BS, None, "none")
        return self.output_head.token_loss(hidden_BSH, self.output_weight(), labels_BS)

    def compute_loss(self, hidden_BSH: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS=None,
                     reduction: str = "mean") -> torch.Tensor:
        """The loss from the final hidden states: ``reduce_loss(compute_token_loss(...))``, or the fused
        head computing the same reduction directly (its gradients then come out of the forward)."""
        if reduction in ("mean", "sum", "none") and self.use_fused_loss(hidden_BSH):
            weights = loss_mask_BS.to(torch.float32) if loss_mask_BS is not None else None
            return self.output_head.fused_loss(hidden_BSH, self.output_weight(), labels_BS, weights, reduction)
        return self.reduce_loss(self.compute_token_loss(hidden_BSH, labels_BS), labels_BS, loss_mask_BS, reduction)

    def use_fused_loss(self, hidden_BSH: torch.Tensor) -> bool:
        """Whether the loss head runs its fused kernel for these hidden states (``OutputHead.fuses``)."""
        return self.output_head.fuses(hidden_BSH, self.output_weight())

    def attention_inputs(self, seq_len: int, batch: int, device, dtype, position_ids=None, attention_mask=None):
        """(rotary tables or None, the mask every attention layer uses or None for plain causal)."""
        rotary = self.rotary(seq_len, device, dtype, position_ids) if self.rotary is not None else None
        return rotary, self.attention_mask(batch, seq_len, device, position_ids, attention_mask)

    @staticmethod
    def reduce_loss(token_loss_BS, labels_BS, loss_mask_BS=None, reduction: str = "mean"):
        return reduce_token_loss(token_loss_BS, labels_BS, loss_mask_BS, reduction)

    # ----------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, reduction: str = "mean", hidden_states=None,
                kv_cache=None):
        """input_ids [B, S] -> logits [B, S, vocab_size], or the loss when ``labels`` is given.

        ``attention_mask``: [B, S] padding mask (1 = real token) or a boolean [B, 1, S, S] mask
        (True = may attend), and-ed with causality. ``hidden_states`` replaces the embedding
        output on pipeline stages after the first, or with ``kv_cache`` the embeddings of the new
        tokens (LLaVA's prefill passes its image-filled ones; a later pipeline stage the previous
        stage's output, and returns its own hidden states unless it is the last). ``kv_cache`` (a
        ``megacore.inference.KVCache``, or the engine's paged ``megacore.inference.cache.CacheBatch``):
        ``input_ids`` are the NEW tokens, at the positions ``kv_cache.positions`` gives (each row
        continuing from what it holds); returns their logits (incremental decoding), or only those
        at ``kv_cache.logits_at`` (an index or slice along the new tokens) when the cache sets it.
        """
        if kv_cache is not None:
            return self._forward_cached(input_ids, kv_cache, labels, position_ids, attention_mask, hidden_states)
        if self.pre_process:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            if input_ids.shape[1] > self.config.seq_length and self.embedding.position_embeddings is not None:
                raise ValueError(f"sequence length {input_ids.shape[1]} exceeds model.seq_length={self.config.seq_length} "
                                 "(learned positions); shorten the input or raise seq_length")
            hidden_BSH = self.embedding(input_ids, position_ids)
        else:
            hidden_BSH = hidden_states
        batch, seq = hidden_BSH.shape[0], self._full_seq_len(hidden_BSH, input_ids)
        rotary, mask = self.attention_inputs(seq, batch, hidden_BSH.device, hidden_BSH.dtype, position_ids, attention_mask)
        hidden_BSH = self.decoder(hidden_BSH, rotary, mask)
        if not self.post_process:
            return hidden_BSH
        if labels is None:
            return self.full_logits(hidden_BSH)
        if self.mtp is not None and torch.is_grad_enabled():
            return self._loss_with_mtp(hidden_BSH, input_ids, labels, loss_mask, reduction, rotary, mask)
        return self.compute_loss(hidden_BSH, labels, loss_mask, reduction)

    def _loss_with_mtp(self, hidden_BSH, input_ids, labels, loss_mask, reduction, rotary, mask):
        """The main loss (its value unchanged) carrying the multi-token-prediction loss's gradient."""
        token_loss = self.compute_token_loss(hidden_BSH, labels)
        token_loss = self.mtp.attach(self, token_loss, hidden_BSH, input_ids, labels, self.word_embeddings(),
                                     rotary, mask)
        return self.reduce_loss(token_loss, labels, loss_mask, reduction)

    @property
    def supports_kv_cache(self) -> bool:
        """True for a whole model that decodes with a cache by itself: ``forward(kv_cache=...)`` gives
        logits (not a pipeline stage -- stages decode too, chained by the caller, see
        ``megacore.inference.pipeline`` -- nor a context- or sequence-parallel model; a tensor-parallel
        one decodes with its vocab-parallel head gathering the full logits on every rank)."""
        return (self.pre_process and self.post_process and self.attention_mask.whole_sequence
                and self.sequence_parallel_size == 1)

    def _forward_cached(self, input_ids, kv_cache, labels, position_ids, attention_mask, hidden_states):
        if labels is not None or position_ids is not None or attention_mask is not None:
            raise ValueError("forward(kv_cache=...) takes only input_ids (the new tokens), and optionally their "
                             "embeddings as hidden_states: positions and the causal mask come from the cache; "
                             "labels, position_ids and attention_mask are for the uncached forward")
        if not (self.attention_mask.whole_sequence and self.sequence_parallel_size == 1):
            raise ValueError("the KV cache decodes with a model that sees whole sequences (not a context-parallel "
                             "or sequence-parallel model); rebuild the model on one device, or tensor-parallel "
                             "without sequence parallelism, for generation")
        if not self.pre_process and hidden_states is None:
            raise ValueError("a pipeline stage after the first decodes from the previous stage's hidden_states "
                             "(input_ids only give the shape [batch, new_tokens])")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, new_tokens] tensor, got {tuple(input_ids.shape)}")
        batch, new = input_ids.shape
        kv_cache.check_room(new, batch)
        start = kv_cache.length
        learned = self.embedding is not None and self.embedding.position_embeddings is not None
        if learned and start + new > self.config.seq_length:
            raise ValueError(f"position {start + new - 1} is past model.seq_length={self.config.seq_length} (learned "
                             "positions); reset the cache and re-feed the last window")
        positions = kv_cache.positions(new, batch, input_ids.device)  # [B, new]: per row, from the cache
        if hidden_states is None:
            hidden_BSH = self.embedding(input_ids, positions)
        elif hidden_states.shape[:2] != input_ids.shape:
            raise ValueError(f"hidden_states of shape {tuple(hidden_states.shape)} do not embed input_ids of shape "
                             f"{tuple(input_ids.shape)}")
        else:  # embeddings made by the caller (LLaVA's, with images in them), or the previous pipeline stage's output
            hidden_BSH = hidden_states
        rotary = self.rotary(new, input_ids.device, hidden_BSH.dtype, positions) if self.rotary is not None else None
        mask = kv_cache.attention_mask(new, input_ids.device, self.config.sliding_window)
        hidden_BSH = self.decoder(hidden_BSH, rotary, mask, kv_cache=kv_cache)
        kv_cache.advance(new)
        if not self.post_process:
            return hidden_BSH
        logits_at = getattr(kv_cache, "logits_at", None)
        return self.full_logits(hidden_BSH if logits_at is None else hidden_BSH[:, logits_at])

    def _full_seq_len(self, hidden_BSH, input_ids):
        if input_ids is not None:
            return input_ids.shape[1]
        return hidden_BSH.shape[1] * self.sequence_parallel_size
