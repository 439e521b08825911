"""The engine's block allocator, with optional prefix caching.

    pool = BlockPool(num_blocks=257, block_size=16, prefix_caching=True)
    shared = pool.match(prompt, limit=(len(prompt) - 1) // 16)   # cached leading blocks, now held
    blocks = shared + [pool.take() for _ in range(more)]
    ...                                                           # prefill the positions after them
    pool.register(prompt, blocks)                                 # its full blocks become reusable
    pool.release(blocks)

Block 0 is scratch and never handed out. A block is *held* (refcount > 0) by the sequences whose
table lists it. Without prefix caching a released block goes back to the free list.

**Prefix caching.** A full block whose contents are the keys/values of a token prefix is registered
under a digest of that whole prefix (a SHA-256 chain over the block's tokens and its parent's
digest, so equal digests mean equal prefixes, not just equal blocks). ``match`` walks a new
prompt's blocks from the first and takes every registered one (refcount + 1) until the first miss:
that request prefills only the positions after them. A registered block whose last holder releases
it is kept, unreferenced, in LRU order; ``take`` uses the free list first, then evicts the least
recently used unreferenced block (its digest is forgotten). Shared blocks are never written again:
a sequence only writes positions after its matched prefix, and ``match`` leaves at least the
prompt's last token to compute (its logits give the first new token).

Only what attention layers keep per position is shareable; a Mamba layer's state is per sequence,
so the engine does not use prefix caching for hybrid Mamba models.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.free = list(range(num_blocks - 1, 0, -1))   # block 0: scratch
        self.refs: dict = {}                              # held block -> refcount
        self.digest_of: dict = {}                         # registered block -> digest
        self.by_digest: dict = {}                         # digest -> registered block
        self.idle: "OrderedDict[int, None]" = OrderedDict()  # registered, unreferenced, oldest first
        self.hits = 0                                     # stats: blocks handed out by match, and evicted
        self.evictions = 0

    def available(self) -> int:
        return len(self.free) + len(self.idle)

    def unheld(self) -> list:
        return self.free + list(self.idle)

    def take(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.idle:
            b, _ = self.idle.popitem(last=False)
            del self.by_digest[self.digest_of.pop(b)]
            self.evictions += 1
        else:
            raise RuntimeError("no free block (the engine checks available() first)")
        self.refs[b] = 1
        return b

    def release(self, blocks: Sequence[int]) -> None:
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] > 0:
                continue
            del self.refs[b]
            if b in self.digest_of:
                self.idle[b] = None
            else:
                self.free.append(b)

    def _digests(self, tokens: Sequence[int], n: int):
        bs, parent = self.block_size, b""
        for i in range(n):
            h = hashlib.sha256(parent)
            h.update(",".join(map(str, tokens[i * bs:(i + 1) * bs])).encode())
            parent = h.digest()
            yield parent

    def match(self, tokens: Sequence[int], limit: int) -> list:
        """The registered blocks of ``tokens``' first ``limit`` full blocks, up to the first miss, now held."""
        if not self.prefix_caching or limit <= 0:
            return []
        found = []
        for d in self._digests(tokens, limit):
            b: Optional[int] = self.by_digest.get(d)
            if b is None:
                break
            self.idle.pop(b, None)
            self.refs[b] = self.refs.get(b, 0) + 1
            found.append(b)
        self.hits += len(found)
        return found

    def register(self, tokens: Sequence[int], blocks: Sequence[int]) -> None:
        """Make the full blocks of ``tokens`` (whose keys/values ``blocks`` now hold) matchable."""
        if not self.prefix_caching:
            return
        for b, d in zip(blocks, self._digests(tokens, len(tokens) // self.block_size)):
            if d not in self.by_digest and b not in self.digest_of:
                self.by_digest[d], self.digest_of[b] = b, d
