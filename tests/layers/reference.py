"""Plain-torch fp64 references for the building blocks, written from the math, not from megacore.

Every function takes explicit weights (no modules) and works on fp64 tensors; the tests feed them
the same weights the megacore module holds and compare outputs. Shapes: B batch, S sequence,
H hidden, N query heads, G key/value heads, D head dim, F ffn size.
"""

from __future__ import annotations

import math

import torch

# ------------------------------------------------------------------------------------------ norms


def rmsnorm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * gamma over the last dim."""
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * gamma.double()


def layernorm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(biased var + eps) * gamma + beta over the last dim."""
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * gamma.double() + beta.double()


# ------------------------------------------------------------------------------------ activations


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


# ------------------------------------------------------------------------------------------ rotary


def rope_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/rotary_dim), i = 0 .. rotary_dim/2 - 1 (fp64)."""
    i = torch.arange(rotary_dim // 2, dtype=torch.float64)
    return base ** (-2.0 * i / rotary_dim)


def rope_complex(x_BSND: torch.Tensor, positions_BS: torch.Tensor, inv_freq: torch.Tensor,
                 scale: float = 1.0) -> torch.Tensor:
    """Rotate channel pairs (i, i + rd/2) of the first rd channels as complex numbers.

    z_i = x_i + j*x_{i+rd/2} is multiplied by scale * exp(j * position * inv_freq_i); the real part
    goes back to channel i, the imaginary part to channel i + rd/2. Channels past rd are untouched.
    ``positions_BS`` is [S] or [B, S].
    """
    x = x_BSND.double()
    half = inv_freq.numel()
    rd = 2 * half
    if positions_BS.dim() == 1:
        positions_BS = positions_BS[None, :]
    angles = positions_BS.double()[..., None] * inv_freq.double()  # [B|1, S, rd/2]
    rot = torch.polar(torch.full_like(angles, scale), angles)[:, :, None, :]  # [B|1, S, 1, rd/2]
    pairs = torch.stack([x[..., :half], x[..., half:rd]], dim=-1).contiguous()  # [..., rd/2, 2]
    z = torch.view_as_complex(pairs) * rot
    out = x.clone()
    out[..., :half] = z.real
    out[..., half:rd] = z.imag
    return out


# --------------------------------------------------------------------------------------- attention


def pack_qkv(w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, n_q: int, n_kv: int, d: int) -> torch.Tensor:
    """Stack separate q [N*D, ...], k [G*D, ...], v [G*D, ...] rows into the grouped fused layout:
    for each kv group g: the q rows of its N/G heads, then k_g, then v_g. Works for weights and biases."""
    per = n_q // n_kv
    blocks = []
    for g in range(n_kv):
        blocks.append(w_q[g * per * d:(g + 1) * per * d])
        blocks.append(w_k[g * d:(g + 1) * d])
        blocks.append(w_v[g * d:(g + 1) * d])
    return torch.cat(blocks, dim=0)


def unpack_qkv(w: torch.Tensor, n_q: int, n_kv: int, d: int):
    """Inverse of ``pack_qkv``: (w_q, w_k, w_v)."""
    per = n_q // n_kv
    rows = (per + 2) * d
    qs, ks, vs = [], [], []
    for g in range(n_kv):
        block = w[g * rows:(g + 1) * rows]
        qs.append(block[:per * d])
        ks.append(block[per * d:(per + 1) * d])
        vs.append(block[(per + 1) * d:])
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


def allowed_mask(seq: int, padding_BS: torch.Tensor | None = None, window: int | None = None,
                 batch: int = 1) -> torch.Tensor:
    """Boolean [B, S, S] (query, key): causal, keys in the last ``window`` positions, real keys only.

    A query whose every key is hidden keeps itself (so the softmax row is defined)."""
    q = torch.arange(seq)[:, None]
    k = torch.arange(seq)[None, :]
    ok = (k <= q)
    if window is not None:
        ok = ok & (q - k < window)
    ok = ok[None].expand(batch if padding_BS is None else padding_BS.shape[0], seq, seq)
    if padding_BS is not None:
        ok = ok & padding_BS.bool()[:, None, :]
    return ok | torch.eye(seq, dtype=torch.bool)[None]


def attention(q_BSND: torch.Tensor, k_BSGD: torch.Tensor, v_BSGD: torch.Tensor, allowed_BSS: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with every kv head repeated for its N/G query heads -> [B, S, N, D]."""
    q, k, v = q_BSND.double(), k_BSGD.double(), v_BSGD.double()
    n, g, d = q.shape[2], k.shape[2], q.shape[3]
    per = n // g
    k = torch.stack([k[:, :, h // per] for h in range(n)], dim=2)  # explicit repeat: head h uses kv h // per
    v = torch.stack([v[:, :, h // per] for h in range(n)], dim=2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("bqnd,bknd->bnqk", q, k) * scale
    scores = scores.masked_fill(~allowed_BSS[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bnqk,bknd->bqnd", probs, v)


def self_attention(x_BSH: torch.Tensor, w_q, w_k, w_v, w_o, n_q: int, n_kv: int, d: int,
                   allowed_BSS: torch.Tensor, b_q=None, b_k=None, b_v=None, b_o=None,
                   q_gamma=None, k_gamma=None, eps: float = 1e-5, rope=None) -> torch.Tensor:
    """Plain multi-head attention from separate q/k/v/o weights (fp64).

    Optional per-head RMSNorm of q and k (``q_gamma``/``k_gamma``), then ``rope(t_BSND)`` if given.
    """
    x = x_BSH.double()
    b, s, _ = x.shape

    def proj(w, bias, heads):
        y = x @ w.double().T
        if bias is not None:
            y = y + bias.double()
        return y.view(b, s, heads, d)

    q, k, v = proj(w_q, b_q, n_q), proj(w_k, b_k, n_kv), proj(w_v, b_v, n_kv)
    if q_gamma is not None:
        q, k = rmsnorm(q, q_gamma, eps), rmsnorm(k, k_gamma, eps)
    if rope is not None:
        q, k = rope(q), rope(k)
    out = attention(q, k, v, allowed_BSS).reshape(b, s, n_q * d) @ w_o.double().T
    return out if b_o is None else out + b_o.double()


# --------------------------------------------------------------------------------------------- mlp

# Plain activations act on fc1's whole output; gated ones act on the gate half (first F rows of
# fc1) and multiply the up half. GeGLU uses the tanh-approximate GELU (Megatron's fused geglu,
# Gemma's gelu_pytorch_tanh); plain "gelu" is the exact erf form.
PLAIN_ACTIVATIONS = {
    "gelu": gelu_erf,
    "gelu_tanh": gelu_tanh,
    "relu": lambda x: x.clamp(min=0),
    "squared_relu": lambda x: x.clamp(min=0) ** 2,
}
GATED_ACTIVATIONS = {"swiglu": silu, "geglu": gelu_tanh}


def mlp(x_BSH: torch.Tensor, w1, w2, activation: str, b1=None, b2=None) -> torch.Tensor:
    """fc2(act(fc1(x))) in fp64; gated activations split fc1's output as [gate F ; up F]."""
    h = x_BSH.double() @ w1.double().T
    if b1 is not None:
        h = h + b1.double()
    if activation in GATED_ACTIVATIONS:
        f = h.shape[-1] // 2
        a = GATED_ACTIVATIONS[activation](h[..., :f]) * h[..., f:]
    else:
        a = PLAIN_ACTIVATIONS[activation](h)
    y = a @ w2.double().T
    return y if b2 is None else y + b2.double()


def random_moe_layer(cfg, seed: int = 0):
    """An fp64 ``MoELayer`` of ``cfg`` with every parameter drawn N(0, 0.5²) from ``seed``."""
    from megacore.layers.moe import MoELayer

    layer = MoELayer(cfg).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return layer
