"""Incremental detokenization and stop strings for streamed generation.

    stream = TextStream(tokenizer, prompt_ids, stop=["\\n\\n"], skip_ids={eos})
    delta, stopped = stream.push(token_id)      # text to send now; True when a stop string appeared
    tail = stream.finish()                       # the held-back rest, when generation ends otherwise

Decoding token by token is not decoding the sequence: a byte-level BPE token can carry half of a
UTF-8 character, and word-level or sentencepiece decoders put spaces *between* tokens. So the new
text is the difference between decoding a short window of tokens with and without the new ones
(the window starts a few tokens back, in the prompt for the first token), and text ending in an
incomplete character (U+FFFD) is held back until the next token completes it.

A stop string ends the text before its first occurrence (the stop string itself is not returned,
as OpenAI's API does). Text that could still be the start of a stop string is held back until it
is clear that it is not, so nothing after a stop is ever sent.
"""

from __future__ import annotations

from typing import Iterable, Sequence

_WINDOW = 6  # tokens of context kept before the newest ones (spacing and merges depend on them)


class TextStream:
    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop: Iterable[str] = (), skip_ids=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip = set(skip_ids)
        self.ids = list(prompt_ids[-_WINDOW:])
        self.prefix = 0                  # window start in self.ids
        self.read = len(self.ids)        # tokens already turned into text
        self.text = ""                   # the generated text so far (complete characters)
        self.sent = 0                    # characters of self.text already returned

    def push(self, token: int) -> tuple[str, bool]:
        """Add one generated token; (text to send now, whether a stop string ended the text)."""
        if token not in self.skip:
            self.ids.append(int(token))
            before = self.tokenizer.decode(self.ids[self.prefix:self.read])
            after = self.tokenizer.decode(self.ids[self.prefix:])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self.prefix = max(self.prefix, len(self.ids) - _WINDOW)
                self.read = len(self.ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                delta, self.sent = self.text[self.sent:end], end
                self.text = self.text[:end]
                return delta, True
        safe = len(self.text)
        for s in self.stop:  # hold back a suffix that may grow into a stop string
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        safe = max(safe, self.sent)
        delta, self.sent = self.text[self.sent:safe], safe
        return delta, False

    def finish(self) -> str:
        """Everything not yet returned (generation ended without a stop string)."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
