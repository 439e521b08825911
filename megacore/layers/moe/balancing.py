"""The router's balancing terms: the load-balancing loss (three ways of counting the load) and the
router z-loss. ``megacore.layers.moe.router`` calls them; the formulas are here.

Notation: T tokens (B sequences of S), E experts, each token sent to k of them. ``p`` [T, E] are
the per-token expert probabilities the loss pushes toward even load:

    softmax scores:  p = softmax(logits)                (the router's own probabilities)
    sigmoid scores:  p = s / Σ_e s,  s = sigmoid(logits)  (normalized per token, as DeepSeek-V3's
                                                          sequence-wise balance loss does)

**Load-balancing loss** (Switch Transformer; Mixtral trains with it)::

    aux = E · Σ_e f_e · P_e,   f_e = count_e / T,   P_e = mean_t p[t, e]

with count_e the assignments to expert e among the T·k (before any capacity drop). It equals k for
perfectly even routing and grows as tokens crowd onto few experts; its gradient reaches the router
only through P (f counts discrete choices). DeepSeek-V3 writes the same loss with f_e scaled by
E/(k·T) instead of 1/T, i.e. ``aux / k``: the factor k goes into ``moe_aux_loss_coeff``.

``model.moe_aux_loss_type`` picks the tokens f and P count over:

- ``micro_batch``: the T tokens of one forward (``load_balancing_loss``).
- ``sequence``: each of the B sequences on its own (S tokens; f and P per sequence), the B losses
  averaged (``sequence_balancing_loss``; DeepSeek-V3's complementary sequence-wise loss). A
  sequence is a row of the [B, S, H] input: the documents packed into one row count as one.
- ``global_batch``: f counts the assignments of this micro-batch on every data-parallel rank
  (``reduce_counts``, an all-reduce sum, hands them in), P stays this rank's mean::

      aux_r = E · Σ_e (count_e^G / T^G) · P_e^r,   T^G = Σ_e count_e^G / k

  The trainer averages the ranks' losses (scale 1 / (micro-batches × DP)), and with the same T on
  every rank mean_r P^r is the P of all ranks' tokens: the objective is the micro-batch loss of the
  tokens of all ranks together, whatever the data-parallel size.

**Router z-loss** (ST-MoE), on the router logits [T, E] in fp32 at least::

    z = mean_t (logsumexp_e logits[t, e])²

It keeps the logits small, where the softmax (and bf16) stays accurate.
"""

from __future__ import annotations

from typing import Callable

import torch


def aux_probs(scores_TE: torch.Tensor, score: str) -> torch.Tensor:
    """The p of the module docstring: softmax scores as they are, sigmoid scores normalized per token."""
    return scores_TE if score == "softmax" else scores_TE / scores_TE.sum(dim=-1, keepdim=True)


def expert_counts(experts_TK: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Assignments per expert [E] (a scatter-add: no host read)."""
    flat = experts_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=dtype, device=flat.device).scatter_add_(
        0, flat, torch.ones(flat.shape, dtype=dtype, device=flat.device))


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """``micro_batch``: E · Σ_e f_e · P_e over these T tokens; a scalar in the dtype of ``probs_TE``."""
    num_experts, tokens = probs_TE.shape[-1], probs_TE.shape[0]
    if tokens == 0:  # nothing routed, nothing unbalanced (and no 0/0)
        return probs_TE.sum() * 0.0
    counts = expert_counts(experts_TK, num_experts, probs_TE.dtype)
    return num_experts * (counts / tokens * probs_TE.mean(dim=0)).sum()


def sequence_balancing_loss(probs_BSE: torch.Tensor, experts_BSK: torch.Tensor) -> torch.Tensor:
    """``sequence``: mean over the B sequences of E · Σ_e f_e^b · P_e^b (f, P over the S tokens of b)."""
    batch, seq, num_experts = probs_BSE.shape
    if batch * seq == 0:
        return probs_BSE.sum() * 0.0
    counts_BE = torch.zeros(batch, num_experts, dtype=probs_BSE.dtype, device=probs_BSE.device).scatter_add_(
        1, experts_BSK.reshape(batch, -1), torch.ones(experts_BSK.reshape(batch, -1).shape, dtype=probs_BSE.dtype,
                                                      device=probs_BSE.device))
    return (num_experts * (counts_BE / seq * probs_BSE.mean(dim=1)).sum(dim=-1)).mean()


def global_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int,
                          reduce_counts: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``global_batch``: E · Σ_e (count_e^G / T^G) · P_e with the counts summed by ``reduce_counts``
    (every rank calls it, even with no tokens, so the collective always matches)."""
    num_experts = probs_TE.shape[-1]
    counts_G = reduce_counts(counts_E.detach())
    tokens_G = (counts_G.sum() / top_k).clamp_min(1)
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    return num_experts * (counts_G / tokens_G * probs_TE.mean(dim=0)).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean_t (logsumexp_e logits[t, e])² (a scalar; 0 for no tokens)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
