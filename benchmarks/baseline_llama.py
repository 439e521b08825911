"""A plain-PyTorch Llama-style model: the baseline every megacore speed claim is measured against.

Written the way a careful PyTorch user would: nn.Linear projections (separate q, k, v, o and
gate, up, down), ``F.rms_norm``, rotary embeddings, SDPA with ``enable_gqa``, tied-free output head,
``F.cross_entropy`` on the full logits. No megacore code is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, seq: int, base: float = 10000.0):
        super().__init__()
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        ang = torch.outer(torch.arange(seq).float(), inv)
        self.register_buffer("cos", torch.cat([ang, ang], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([ang, ang], -1).sin(), persistent=False)

    def forward(self, x):  # x [B, H, S, D]
        s = x.shape[2]
        cos, sin = self.cos[:s].to(x.dtype), self.sin[:s].to(x.dtype)
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, h, heads, kv_heads, ffn, rotary, moe=None):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, h // heads
        self.q = nn.Linear(h, heads * self.hd, bias=False)
        self.k = nn.Linear(h, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(h, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(heads * self.hd, h, bias=False)
        self.moe = None
        if moe is not None:  # (experts, top_k, expert width): benchmarks/baseline_moe.py
            from benchmarks.baseline_moe import PlainMoE

            self.moe = PlainMoE(h, moe[2], moe[0], moe[1])
        else:
            self.gate = nn.Linear(h, ffn, bias=False)
            self.up = nn.Linear(h, ffn, bias=False)
            self.down = nn.Linear(ffn, h, bias=False)
        self.n1 = nn.RMSNorm(h, eps=1e-5)
        self.n2 = nn.RMSNorm(h, eps=1e-5)
        self.rotary = rotary

    def forward(self, x):
        b, s, _ = x.shape
        y = self.n1(x)
        q = self.rotary(self.q(y).view(b, s, self.heads, self.hd).transpose(1, 2))
        k = self.rotary(self.k(y).view(b, s, self.kv_heads, self.hd).transpose(1, 2))
        v = self.v(y).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        y = self.n2(x)
        if self.moe is not None:
            return x + self.moe(y)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class BaselineLlama(nn.Module):
    def __init__(self, layers, h, heads, kv_heads, ffn, vocab, seq, moe=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        rotary = Rotary(h // heads, seq)
        self.blocks = nn.ModuleList(Block(h, heads, kv_heads, ffn, rotary, moe) for _ in range(layers))
        self.norm = nn.RMSNorm(h, eps=1e-5)
        self.head = nn.Linear(h, vocab, bias=False)
        for p in self.parameters():
            if p.dim() >= 2 and p.numel() > 0:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, labels):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))
