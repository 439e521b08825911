"""Deterministic synthetic GPT samples for benchmarks and tests (no files, no tokenizer).

Sample i depends only on (seed, i): its window of S+1 tokens is a run of "documents", each an
arithmetic progression ``start + stride·k`` modulo ``vocab_size - 1`` (random start, stride in
[1, 8], length in [S/4, 2S]) followed by the eod id ``vocab_size - 1``. The text is learnable (the
loss falls quickly) yet every sample differs, and samples come back in the same dict format as
``GPTDataset`` (see ``megacore.data.gpt_dataset.make_sample``).
"""

from __future__ import annotations

import numpy as np

from megacore.data.gpt_dataset import make_sample


class MockGPTDataset:
    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int = 0,
                 eod_mask_loss: bool = False, reset_position_ids: bool = False, reset_attention_mask: bool = False):
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} must be >= 2 (one id is the eod token)")
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be >= 1")
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed
        self.eod = vocab_size - 1
        self.flags = dict(eod_mask_loss=eod_mask_loss, reset_position_ids=reset_position_ids,
                          reset_attention_mask=reset_attention_mask)

    def __len__(self) -> int:
        return self.num_samples

    def window(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range: the mock dataset has {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, idx])
        need = self.seq_length + 1
        modulus = self.vocab_size - 1
        pieces, have = [], 0
        while have < need:
            length = int(rng.integers(max(1, self.seq_length // 4), 2 * self.seq_length + 1))
            start, stride = int(rng.integers(0, max(modulus, 1))), int(rng.integers(1, 9))
            doc = (start + stride * np.arange(length, dtype=np.int64)) % max(modulus, 1)
            pieces += [doc, np.array([self.eod], dtype=np.int64)]
            have += length + 1
        return np.concatenate(pieces)[:need]

    def __getitem__(self, idx: int) -> dict:
        return make_sample(self.window(int(idx)), self.eod, **self.flags)
