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


class MockImageTextDataset:
    """Synthetic image-text samples for a LLaVA model (``vision.enabled`` with ``data.source=mock``).

    Sample i is the text sample i of ``text`` (a ``MockGPTDataset``), whose first ``image_seq_length``
    positions become image tokens, plus an image [C, H, W]: noise whose channel 0 is brightened by
    the first text token after the image (``(token % 8) / 4``), so the image predicts that token and
    a model that reads the image can beat one that does not. The loss skips the image positions, except
    the last one, which predicts the first text token. Text tokens that collide with the image token id
    become 0. Deterministic in (seed, i).
    """

    def __init__(self, text: MockGPTDataset, image_token_id: int, image_seq_length: int, image_shape: tuple,
                 seed: int = 0):
        if image_seq_length >= text.seq_length:
            raise ValueError(f"an image takes {image_seq_length} tokens, which leaves no text in a sequence of "
                             f"{text.seq_length}; raise model.seq_length or use smaller images / larger patches")
        self.text, self.image_token_id, self.n = text, image_token_id, image_seq_length
        self.image_shape, self.seed = tuple(image_shape), seed

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, idx: int) -> dict:
        sample = self.text[int(idx)]
        tokens, labels = sample["tokens"], sample["labels"]
        tokens[tokens == self.image_token_id] = 0
        labels[labels == self.image_token_id] = 0
        n = self.n
        tokens[:n] = self.image_token_id
        labels[: n - 1] = self.image_token_id
        sample["loss_mask"][: n - 1] = 0.0
        image = np.random.default_rng([self.seed, int(idx)]).standard_normal(self.image_shape).astype(np.float32)
        image[0] += (int(labels[n - 1]) % 8) / 4.0
        sample["pixel_values"] = image
        return sample
