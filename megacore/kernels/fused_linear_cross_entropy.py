"""Linear layer + cross entropy that never materializes the full logits.

For hidden states h [N, D], output weight W [V, D] (this rank's vocab shard) and labels y [N]:

    z = h Wᵀ,   lse = log Σ_{j<K} exp z_j,   loss = lse − (1−ε)·z_y − (ε/K)·Σ_{j<K} z_j

with K = ``vocab_valid`` real tokens (columns ≥ K are vocab padding: no probability mass, no
gradient) and ε = ``label_smoothing`` (the same definition as ``F.cross_entropy``). Tokens with
``y == ignore_index`` have loss 0 and no gradient. Gradients:

    dz_j = exp(z_j − lse) − ε/K − (1−ε)·[j = y]   (j < K),   dh = dz W,   dW = dzᵀ h

Tokens are processed in chunks of C rows, so peak extra memory is O(C·V) rather than O(N·V):
each chunk's logits are computed (one GEMM), reduced to per-token statistics, turned into dz in
place and multiplied out into dh and dW before the next chunk starts. With ``reduction`` "sum"
or "mean" the upstream gradient is a scalar, so dh and dW are accumulated already in the forward
pass (dW in fp32) and only scaled in backward. With "none" the upstream gradient is per token and
unknown in forward: the forward keeps lse [N] and the backward recomputes each chunk's logits.

Vocab parallel (``tp_group`` given): W is rows [vocab_start, vocab_start + V) of the full
[K_pad, D] weight, h and y are replicated over the group. Per token, with m_r, s_r the local max
and Σexp(z − m_r) and z_y,r the target logit if y falls in shard r (else 0):

    m = max_r m_r          (all-reduce MAX)
    S = Σ_r s_r·exp(m_r − m),  z_y = Σ_r z_y,r,  Σz = Σ_r Σz_r     (one all-reduce SUM)
    lse = m + log S

which is exactly the full-vocab CE. Each rank's dz is its own columns, so dW is this rank's shard
gradient, and dh is this rank's partial sum Σ_{j in shard} dz_j W_j: the caller's
copy-to-tensor-parallel region (or sequence-parallel gather) sums it over the group in backward,
exactly as for any column-parallel linear. ``reduce_grad_hidden=True`` all-reduces it here instead.
Shards are assumed equal-sized (so K defaults to V·world_size).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore.kernels import _ce_chunk as ck
from megacore.kernels._dispatch import use_triton

_REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100, vocab_valid: Optional[int] = None,
                                   reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """Plain torch: full logits h Wᵀ, padding columns dropped, ``F.cross_entropy`` in ≥fp32 (one rank)."""
    k = weight.shape[0] if vocab_valid is None else vocab_valid
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = F.linear(hidden, weight)[..., :k].to(acc)
    loss = F.cross_entropy(logits.reshape(-1, k), labels.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    return loss.view(labels.shape) if reduction == "none" else loss


def _default_chunk(v: int) -> int:
    # ~32M logits per chunk (64 MB in bf16): big GEMMs, bounded memory.
    c = 1 << max(0, (2 ** 25 // max(v, 1)).bit_length() - 1)
    return max(64, min(4096, c))


class _Opts:
    """Everything about one call that is not a tensor."""

    def __init__(self, v_local, ignore_index, vocab_valid, tp_group, vocab_start, reduction, label_smoothing,
                 chunk, reduce_grad_hidden, triton):
        self.world = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_group = tp_group if self.world > 1 else None
        self.k = vocab_valid if vocab_valid is not None else v_local * self.world
        self.n_valid = min(v_local, max(0, self.k - vocab_start))
        self.ignore_index, self.vocab_start, self.reduction = ignore_index, vocab_start, reduction
        self.eps = float(label_smoothing)
        self.chunk, self.reduce_grad_hidden, self.triton = chunk, reduce_grad_hidden, triton


def _chunk_logits_stats(h_c, w, y_c, o: _Opts):
    """Logits [c, V] of one chunk and its global (lse, per-token loss), all-reduced over tp_group."""
    logits = h_c @ w.t()
    stats_fn = ck.chunk_stats_triton if o.triton else ck.chunk_stats_torch
    st = stats_fn(logits, y_c, o.n_valid, o.vocab_start, o.ignore_index, o.eps > 0)
    m, rest = st[0], st[1:]
    if o.tp_group is not None:
        m_global = m.clone()
        dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=o.tp_group)
        rest[0] *= torch.exp(m - m_global)  # rest is a view of this call's own stats buffer
        dist.all_reduce(rest, op=dist.ReduceOp.SUM, group=o.tp_group)
        m = m_global
    lse = m + torch.log(rest[0])
    loss = lse - (1.0 - o.eps) * rest[1]
    if o.eps > 0:
        loss = loss - (o.eps / o.k) * rest[2]
    loss = torch.where(y_c != o.ignore_index, loss, torch.zeros_like(loss))
    return logits, lse, loss


def _chunk_dlogits(logits, y_c, lse, scale, o: _Opts):
    args = (y_c, lse, scale, o.n_valid, o.vocab_start, o.ignore_index, o.eps / o.k, 1.0 - o.eps)
    if o.triton:
        return ck.chunk_grad_triton_(logits, *args)
    return ck.chunk_grad_torch(logits, *args)


_FP32_OUT_ADDMM: dict[tuple, bool] = {}


def _fp32_out_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` (half inputs, fp32 output:
    CUDA in recent torch) exists here and accumulates correctly; checked once per device and dtype."""
    key = (str(device), dtype)
    if key not in _FP32_OUT_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                gen = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(64, 96, device=device, generator=gen).to(dtype)
                b = torch.randn(96, 32, device=device, generator=gen).to(dtype)
                acc = torch.randn(64, 32, device=device, generator=gen)
                want = acc + a.float() @ b.float()
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
            except (RuntimeError, TypeError):
                ok = False
        _FP32_OUT_ADDMM[key] = ok
    return _FP32_OUT_ADDMM[key]


def _accumulate_grads(dz, h_c, w, grad_h, grad_w, rows: slice):
    """dh[rows] = dz W (written, dtype of h);  dW += dzᵀ h (fp32 accumulator)."""
    if grad_h is not None:
        torch.mm(dz, w, out=grad_h[rows])
    if grad_w is not None:
        if grad_w.dtype == dz.dtype:
            grad_w.addmm_(dz.t(), h_c)
        elif _fp32_out_addmm_works(dz.device, dz.dtype):  # one GEMM accumulating straight into fp32
            torch.addmm(grad_w, dz.t(), h_c, out_dtype=torch.float32, out=grad_w)
        else:  # bf16/fp16 GEMM (fp32 accumulation inside), then added once into the fp32 buffer
            grad_w.add_(dz.t() @ h_c)


def _row_weights(y: torch.Tensor, token_weights: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """w_i [N] fp32: the token weight (1 by default), 0 where the label is ignored."""
    valid = (y != ignore_index).to(torch.float32)
    return valid if token_weights is None else valid * token_weights.reshape(-1).to(torch.float32)


def _forward(h2, weight, y, token_weights, o: _Opts, need_h: bool, need_w: bool):
    """The chunked forward over h2 [N, D], labels y [N].

    Returns (loss, grad_h, grad_w, lse_all): loss is per token [N] (times its weight) for "none", else
    the reduced scalar. With a "sum"/"mean" reduction and a gradient wanted, dh [N, D] (h's dtype) and
    dW (fp32) for an upstream gradient of 1 are computed here ("early"); otherwise lse_all [N] is kept
    for the backward to recompute the chunks' logits.
    """
    n = h2.shape[0]
    early = (need_h or need_w) and o.reduction != "none"
    row_w = _row_weights(y, token_weights, o.ignore_index)
    denom = row_w.sum().clamp(min=1.0) if o.reduction == "mean" else None  # stays on device: no sync
    row_scale = row_w / denom if denom is not None else row_w
    grad_h = h2.new_empty(h2.shape) if early and need_h else None
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if early and need_w else None
    loss = torch.empty(n, device=h2.device, dtype=torch.float32)
    lse_all = torch.empty(n, device=h2.device, dtype=torch.float32) if not early else None
    for i0 in range(0, n, o.chunk):
        rows = slice(i0, min(i0 + o.chunk, n))
        logits, lse, loss[rows] = _chunk_logits_stats(h2[rows], weight, y[rows], o)
        if lse_all is not None:
            lse_all[rows] = lse
        if early:
            dz = _chunk_dlogits(logits, y[rows], lse, row_scale[rows], o)
            _accumulate_grads(dz, h2[rows], weight, grad_h, grad_w, rows)
        del logits
    if token_weights is not None:
        loss = loss * row_w
    if o.reduction == "none":
        return loss, grad_h, grad_w, lse_all
    total = loss.sum()
    return (total / denom if denom is not None else total), grad_h, grad_w, lse_all


def _backward_recompute(h2, weight, y, lse_all, scale_all, o: _Opts, need_h: bool, need_w: bool, w_dtype):
    """dh, dW for per-token upstream gradients ``scale_all`` [N] (fp32, already times the token weights)."""
    grad_h = h2.new_empty(h2.shape) if need_h else None
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
    for i0 in range(0, h2.shape[0], o.chunk):
        rows = slice(i0, min(i0 + o.chunk, h2.shape[0]))
        logits = h2[rows] @ weight.t()
        dz = _chunk_dlogits(logits, y[rows], lse_all[rows], scale_all[rows], o)
        _accumulate_grads(dz, h2[rows], weight, grad_h, grad_w, rows)
        del logits, dz
    if grad_w is not None:
        grad_w = grad_w.to(w_dtype)
    return grad_h, grad_w


def _scale_early(grad_h, grad_w, grad_out, w_dtype):
    g = grad_out.to(torch.float32)
    if grad_h is not None:
        grad_h = (grad_h * g).to(grad_h.dtype)
    if grad_w is not None:
        grad_w = (grad_w * g).to(w_dtype)
    return grad_h, grad_w


class _FusedLinearCE(torch.autograd.Function):
    """The vocab-parallel path (collectives inside; eager only). One rank uses the custom ops below."""

    @staticmethod
    def forward(ctx, h2, weight, y, token_weights, o: _Opts, need_h: bool, need_w: bool):
        loss, grad_h, grad_w, lse_all = _forward(h2, weight, y, token_weights, o, need_h, need_w)
        ctx.o, ctx.early, ctx.w_dtype = o, lse_all is None, weight.dtype
        if ctx.early:
            ctx.save_for_backward(grad_h, grad_w)
        elif need_h or need_w:
            ctx.save_for_backward(h2, weight, y, lse_all, _row_weights(y, token_weights, o.ignore_index))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        o = ctx.o
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.early:
            grad_h, grad_w = _scale_early(*ctx.saved_tensors, grad_out, ctx.w_dtype)
        else:
            h2, weight, y, lse_all, row_w = ctx.saved_tensors
            scale_all = grad_out.reshape(-1).to(torch.float32) * row_w
            grad_h, grad_w = _backward_recompute(h2, weight, y, lse_all, scale_all, o, need_h, need_w, ctx.w_dtype)
        if grad_h is not None and o.reduce_grad_hidden and o.tp_group is not None:
            dist.all_reduce(grad_h, group=o.tp_group)
        return grad_h if need_h else None, grad_w if need_w else None, None, None, None, None, None


# ---------------------------------------------------------------------------- one rank: custom ops
# Opaque to torch.compile (no graph break; the chunk loop runs as is inside a compiled graph).
# Tensors that do not apply come back as empty [0] tensors (a custom op returns tensors, not None).
def _single_rank_opts(weight, ignore_index, vocab_valid, reduction, label_smoothing, chunk, triton) -> _Opts:
    return _Opts(weight.shape[0], ignore_index, vocab_valid, None, 0, reduction, label_smoothing, chunk, False, triton)


@torch.library.custom_op("megacore::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd_op(h2: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, token_weights: Optional[torch.Tensor],
                      ignore_index: int, vocab_valid: int, reduction: str, label_smoothing: float, chunk: int,
                      need_h: bool, need_w: bool, triton: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    o = _single_rank_opts(weight, ignore_index, vocab_valid, reduction, label_smoothing, chunk, triton)
    loss, grad_h, grad_w, lse_all = _forward(h2, weight, y, token_weights, o, need_h, need_w)
    def empty():
        return h2.new_empty(0, dtype=torch.float32)

    return (loss, grad_h if grad_h is not None else h2.new_empty(0), grad_w if grad_w is not None else empty(),
            lse_all if lse_all is not None else empty())


@_linear_ce_fwd_op.register_fake
def _(h2, weight, y, token_weights, ignore_index, vocab_valid, reduction, label_smoothing, chunk, need_h, need_w,
      triton):
    n = h2.shape[0]
    early = (need_h or need_w) and reduction != "none"
    f32 = dict(dtype=torch.float32)
    loss = h2.new_empty(n, **f32) if reduction == "none" else h2.new_empty((), **f32)
    grad_h = h2.new_empty(h2.shape) if early and need_h else h2.new_empty(0)
    grad_w = weight.new_empty(weight.shape, **f32) if early and need_w else h2.new_empty(0, **f32)
    lse = h2.new_empty(0, **f32) if early else h2.new_empty(n, **f32)
    return loss, grad_h, grad_w, lse


@torch.library.custom_op("megacore::linear_ce_bwd", mutates_args=())
def _linear_ce_bwd_op(h2: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, lse_all: torch.Tensor,
                      scale_all: torch.Tensor, ignore_index: int, vocab_valid: int, label_smoothing: float, chunk: int,
                      need_h: bool, need_w: bool, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    o = _single_rank_opts(weight, ignore_index, vocab_valid, "none", label_smoothing, chunk, triton)
    grad_h, grad_w = _backward_recompute(h2, weight, y, lse_all, scale_all, o, need_h, need_w, weight.dtype)
    return (grad_h if grad_h is not None else h2.new_empty(0),
            grad_w if grad_w is not None else weight.new_empty(0))


@_linear_ce_bwd_op.register_fake
def _(h2, weight, y, lse_all, scale_all, ignore_index, vocab_valid, label_smoothing, chunk, need_h, need_w, triton):
    return (h2.new_empty(h2.shape) if need_h else h2.new_empty(0),
            weight.new_empty(weight.shape) if need_w else weight.new_empty(0))


def _linear_ce_setup(ctx, inputs, output):
    h2, weight, y, token_weights, ignore_index, vocab_valid, reduction, eps, chunk, need_h, need_w, triton = inputs
    _loss, grad_h, grad_w, lse_all = output
    ctx.early = (need_h or need_w) and reduction != "none"
    ctx.need_h, ctx.need_w, ctx.w_dtype = need_h, need_w, weight.dtype
    ctx.args = (ignore_index, vocab_valid, eps, chunk, need_h, need_w, triton)
    if ctx.early:
        ctx.save_for_backward(grad_h, grad_w)
    elif need_h or need_w:
        ctx.save_for_backward(h2, weight, y, lse_all, token_weights)


def _linear_ce_autograd(ctx, grad_loss, _g_grad_h, _g_grad_w, _g_lse):
    if ctx.early:
        grad_h, grad_w = ctx.saved_tensors
        grad_h, grad_w = _scale_early(grad_h if ctx.need_h else None, grad_w if ctx.need_w else None, grad_loss,
                                      ctx.w_dtype)
    elif ctx.need_h or ctx.need_w:
        h2, weight, y, lse_all, token_weights = ctx.saved_tensors
        scale_all = grad_loss.reshape(-1).to(torch.float32) * _row_weights(y, token_weights, ctx.args[0])
        grad_h, grad_w = _linear_ce_bwd_op(h2, weight, y, lse_all, scale_all, *ctx.args)
        grad_h, grad_w = (grad_h if ctx.need_h else None), (grad_w if ctx.need_w else None)
    else:
        grad_h = grad_w = None
    return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None


_linear_ce_fwd_op.register_autograd(_linear_ce_autograd, setup_context=_linear_ce_setup)


def fused_linear_cross_entropy(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                               ignore_index: int = -100, vocab_valid: Optional[int] = None,
                               tp_group: Optional[dist.ProcessGroup] = None, vocab_start: int = 0,
                               reduction: str = "mean", label_smoothing: float = 0.0,
                               chunk_size: Optional[int] = None, reduce_grad_hidden: bool = False,
                               force_triton: bool = False, token_weights: Optional[torch.Tensor] = None,
                               check_labels: bool = True) -> torch.Tensor:
    """Cross entropy of ``hidden @ weightᵀ`` against ``labels`` without materializing all logits.

    hidden [..., D], labels [...] (global token ids or ``ignore_index``), weight [V_local, D] (the
    full [V, D] without ``tp_group``). Returns per-token loss shaped like labels ("none"), their sum,
    or their mean over non-ignored tokens ("mean"; 0, not NaN, when every token is ignored).
    ``vocab_valid``: the real vocab size K (columns ≥ K are padding). ``chunk_size``: token rows per
    chunk (default: ~32M logits per chunk). The softmax/gradient step runs in Triton on CUDA (or
    interpreter + ``force_triton``); the GEMMs are torch (cuBLAS). See the module docstring for the
    math and the vocab-parallel contract (dh is a partial sum unless ``reduce_grad_hidden``).

    ``token_weights`` (shaped like labels, e.g. a loss mask) multiply each token's loss: "sum" is
    Σ wᵢ·lossᵢ, "mean" Σ wᵢ·lossᵢ / max(Σ_{labelled} wᵢ, 1), "none" wᵢ·lossᵢ. ``check_labels=False``
    skips the label range check (a host sync; training loops that trust their data skip it).
    One rank runs as torch custom ops (``torch.compile`` keeps them in its graph); vocab-parallel
    (``tp_group`` of several ranks) runs eagerly.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fused_linear_cross_entropy: reduction={reduction!r}; use one of {_REDUCTIONS}")
    if hidden_ND.dtype != weight_VD.dtype:
        raise ValueError(f"fused_linear_cross_entropy: hidden is {hidden_ND.dtype} but weight is {weight_VD.dtype}; "
                         f"cast one so both match (e.g. weight.to(hidden.dtype))")
    if weight_VD.dim() != 2 or hidden_ND.shape[-1] != weight_VD.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden_ND.shape)} and weight "
                         f"{tuple(weight_VD.shape)} disagree; weight must be [V, hidden={hidden_ND.shape[-1]}]")
    if tuple(labels_N.shape) != tuple(hidden_ND.shape[:-1]):
        raise ValueError(f"fused_linear_cross_entropy: labels {tuple(labels_N.shape)} must match hidden's leading "
                         f"dims {tuple(hidden_ND.shape[:-1])}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fused_linear_cross_entropy: label_smoothing={label_smoothing} must be in [0, 1]")
    if tp_group is None and vocab_start != 0:
        raise ValueError(f"fused_linear_cross_entropy: vocab_start={vocab_start} needs tp_group (a vocab shard); "
                         f"pass tp_group or vocab_start=0")
    if vocab_valid is not None and tp_group is None and not 0 < vocab_valid <= weight_VD.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: vocab_valid={vocab_valid} must be in [1, {weight_VD.shape[0]}]")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size={chunk_size} must be >= 1")
    if token_weights is not None and tuple(token_weights.shape) != tuple(labels_N.shape):
        raise ValueError(f"fused_linear_cross_entropy: token_weights {tuple(token_weights.shape)} must match labels "
                         f"{tuple(labels_N.shape)}")
    v_local = weight_VD.shape[0]
    chunk = chunk_size or _default_chunk(v_local)
    triton = use_triton(hidden_ND, force_triton, "fused_linear_cross_entropy")
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    k = vocab_valid if vocab_valid is not None else v_local * world
    if check_labels:
        bad = (labels_N != ignore_index) & ((labels_N < 0) | (labels_N >= k))
        if bool(bad.any()):  # one host sync; an out-of-range label would otherwise give a silent inf/garbage loss
            raise ValueError(f"fused_linear_cross_entropy: labels must be in [0, {k}) or ignore_index={ignore_index}; "
                             f"found {labels_N[bad][:4].tolist()}")
    d = hidden_ND.shape[-1]
    h2, y = hidden_ND.reshape(-1, d), labels_N.reshape(-1)
    tw = token_weights.reshape(-1) if token_weights is not None else None
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden_ND.requires_grad, grad_on and weight_VD.requires_grad
    if world > 1:
        o = _Opts(v_local, ignore_index, vocab_valid, tp_group, vocab_start, reduction, label_smoothing, chunk,
                  reduce_grad_hidden, triton)
        loss = _FusedLinearCE.apply(h2, weight_VD, y, tw, o, need_h, need_w)
    else:
        loss = _linear_ce_fwd_op(h2, weight_VD, y, tw, ignore_index, k, reduction, float(label_smoothing), chunk,
                                 need_h, need_w, triton)[0]
    return loss.view(labels_N.shape) if reduction == "none" else loss
