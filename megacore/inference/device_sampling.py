"""Next-token choice on the device, per row, without host synchronization (CUDA-graph capturable).

    tokens_B = sample_tokens(logits_BV, temperature_B, top_k_B, top_p_B, seed_B, position_B)

Every row carries its own parameters as device tensors: ``temperature == 0`` is greedy (``argmax``,
ties to the lowest id); otherwise the logits are divided by the temperature, top-k keeps the ``k``
largest (``top_k > 0``), top-p keeps the smallest set of most likely tokens whose probability mass
reaches ``top_p`` (the most likely always stays) -- Hugging Face's order, the same rule as
``megacore.inference.sampling.filter_logits`` -- and one token is drawn from the softmax of what is
left.

The draw is the Gumbel-max trick, ``argmax(z + g)`` with ``g = -log(-log u)``, which samples exactly
from ``softmax(z)``. The uniforms ``u`` are not taken from a stateful generator: they are a hash of
(the row's ``seed``, the ``position`` of the token being drawn, the vocabulary index). A request's
tokens therefore depend only on its own seed, prompt and parameters -- not on which other requests
share the batch, on the batch's order, on being preempted and recomputed, or on graph replays --
and a seed gives the same tokens on every device and every tensor-parallel rank. (24 random bits a
uniform: probabilities below about 6e-8 relative to the top token are never drawn.)
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (murmur3's finalizer) of int64 values in [0, 2^32). Products wrap
    modulo 2^64; the low 32 bits, all that is kept, are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def hash_uniform(seed_B: torch.Tensor, position_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), [B, vocab] float32, a pure function of (seed, position, index)."""
    idx = torch.arange(vocab, device=seed_B.device, dtype=torch.int64)
    row = _mix32((seed_B.to(torch.int64) & _MASK32) ^ _mix32((position_B.to(torch.int64) * 0x9E3779B1) & _MASK32))
    h = _mix32((row[:, None] + idx[None, :] * 0x632BE5AB) & _MASK32)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def filter_logits_rows(z_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's top-k / top-p set (``top_k == 0`` and ``top_p >= 1`` switch a filter off)."""
    vocab = z_BV.shape[-1]
    sorted_z, order = torch.sort(z_BV, dim=-1, descending=True)
    k = top_k_B.to(torch.int64).clamp(min=0)
    k = torch.where((k == 0) | (k > vocab), torch.full_like(k, vocab), k)
    kth = sorted_z.gather(1, (k - 1)[:, None])                       # the k-th largest logit
    sorted_z = sorted_z.masked_fill(sorted_z < kth, float("-inf"))   # ties with the k-th stay, as topk's rule
    probs = torch.softmax(sorted_z, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = (mass_before >= top_p_B[:, None]) & (top_p_B[:, None] < 1.0)
    drop[:, 0] = False
    sorted_z = sorted_z.masked_fill(drop, float("-inf"))
    return torch.empty_like(z_BV).scatter_(1, order, sorted_z)


def sample_tokens(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
                  top_p_B: torch.Tensor, seed_B: torch.Tensor, position_B: torch.Tensor,
                  greedy_only: bool = False) -> torch.Tensor:
    """Token ids [B] (int64). ``greedy_only``: every row has temperature 0 (skips the sampling work;
    the caller knows it from the host-side parameters)."""
    logits = logits_BV.float()
    greedy = torch.argmax(logits, dim=-1)
    if greedy_only:
        return greedy
    temp = temperature_B.float()
    z = logits / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    z = filter_logits_rows(z, top_k_B, top_p_B.float())
    u = hash_uniform(seed_B, position_B, logits.shape[-1])
    drawn = torch.argmax(z - torch.log(-torch.log(u)), dim=-1)
    return torch.where(temp > 0, drawn, greedy)
