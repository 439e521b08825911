"""Token embedding (+ learned absolute positions). Rows are ``config.padded_vocab_size``."""

from __future__ import annotations

import torch
from torch import nn

from megacore.config import TransformerConfig
from megacore.sharding import mark_init


class LanguageModelEmbedding(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        mark_init(self.word_embeddings.weight, "normal")
        self.position_embeddings = None
        if config.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(config.seq_length, config.hidden_size)
            mark_init(self.position_embeddings.weight, "normal")
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids_BS: torch.Tensor, position_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
        hidden_BSH = self.word_embeddings(input_ids_BS)
        if self.position_embeddings is not None:
            if position_ids_BS is None:
                position_ids_BS = torch.arange(input_ids_BS.shape[1], device=input_ids_BS.device)[None, :]
            # Full [B, S] ids: under sequence parallelism the positions are split over the batch's
            # tokens like the word embeddings (megacore.parallel.collectives), not broadcast.
            hidden_BSH = hidden_BSH + self.position_embeddings(position_ids_BS.expand_as(input_ids_BS))
        return self.dropout(hidden_BSH)
