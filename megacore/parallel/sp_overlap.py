"""Sequence-parallel linears whose token all-gather / reduce-scatter run on the copy engines,
overlapped with the layer's own matmuls (``parallel.tp_comm_overlap=copy_engine``).

Why: under sequence parallelism (SP) every column-parallel linear starts with an all-gather of the
tokens and every row-parallel linear ends with a reduce-scatter, and the backward mirrors both.
NCCL runs them as SM kernels. On 2 H100s they cost 27 ms of a 129 ms TP2 step when serialized, and
they slow a matmul running beside them by ~20% (docs/parallelism-tp.md). Here the tokens move as
peer-to-peer copies between symmetric-memory buffers (NVLink, copy engines, no SMs) on a side
stream. Meanwhile the main stream multiplies the part of the data that is already local.

Notation: t = TP size, r = this rank, T = B·S tokens of a micro-batch in t chunks of T/t (chunk p is
SP rank p's shard, see ``collectives``), ``gather(x) = [x_0 | ... | x_{t-1}]`` along the tokens.

==========================================  =============================================
op                                          backward (output grad g)
==========================================  =============================================
ag_linear:  x_r [T/t, K], W [N, K]          dx_r = chunk_r(Σ_p g_p W)   (reduce-scatter)
            y = gather(x) Wᵀ  [T, N]        dW   = gᵀ gather(x)
linear_rs:  z [T, K], W [N, K]              dz   = gather(g) W          (all-gather)
            y_r = chunk_r(Σ_p z_p W_pᵀ)     dW   = gather(g)ᵀ z
==========================================  =============================================

The four GEMM+collective patterns (both forwards, both backwards) use two schedules:

- gather, then consume: rank r copies its shard into its symmetric buffer. The side stream waits
  at a barrier until every rank has done so, then pulls the peers' shards. Meanwhile the main
  stream multiplies the local shard, then each pulled shard once its copy is done.
- produce, then reduce-scatter: rank r computes the chunks the peers need straight into its
  symmetric buffer, then its own chunk (and, in the backward, the weight gradient). Meanwhile the
  side stream pulls, from every peer, the chunk that peer computed for r. The main stream adds the
  pulled chunks to its own.

After its copies the side stream passes a second barrier: every peer has finished reading this
rank's buffer. The main stream waits for it before the op returns, so the next op may overwrite
the buffer. The barriers are small kernels (one block each) on a high-priority stream, queued
before the matmul they overlap, so its persistent kernel does not starve them. Besides the matmuls,
the SMs also run the local copy into the symmetric buffer and the reduce-scatter's add (measured
cost in docs/parallelism-tp.md).

Each op is a torch custom op: opaque to inductor, and captured whole by CUDA graphs. Without
symmetric memory (CPU, gloo, or a CUDA build without it) the same ops compute the reference: the
plain collectives of ``collectives`` and the matmuls in sequence. The CPU tests check the autograd
wiring against the unfused layers. The GPU test checks the copy-engine path against the reference.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore.parallel import collectives as C
from megacore.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megacore.parallel.topology import on_destroy

_COPY_ENGINE_GROUPS: set[str] = set()
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def enable(group, workspace_bytes: int = 0) -> bool:
    """Use the copy-engine path for ``group`` (NCCL on CUDA with symmetric memory); returns whether
    it is on. Otherwise the ops run the reference collectives.

    Call on every rank of ``group`` before the first step, with ``workspace_bytes`` >= the largest
    need of one op: (micro-batch tokens) x (hidden size) x (element size) for the layers of a GPT.
    The symmetric workspace is allocated and exchanged here, outside any CUDA-graph warm-up or
    capture. Its rendezvous allocates small device arrays, and inside inductor's graph warm-up they
    would land in the graph's private pool, where nothing tracks them, and inductor refuses the
    graph.
    """
    if group is None or C.group_size(group) == 1 or dist.get_backend(group) != "nccl":
        return False
    try:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group
    except ImportError:
        return False
    with warnings.catch_warnings():  # deprecated (a no-op) on newer torch, needed on older
        warnings.simplefilter("ignore", FutureWarning)
        enable_symm_mem_for_group(group.group_name)
    _COPY_ENGINE_GROUPS.add(group.group_name)
    if workspace_bytes:
        _workspace(group.group_name, workspace_bytes)
    return True


def reset() -> None:
    """Forget every group's copy-engine state (``megacore.parallel.destroy`` calls this): a later
    group may reuse a name, and must not inherit a workspace of a destroyed one."""
    _COPY_ENGINE_GROUPS.clear()
    _WORKSPACES.clear()


on_destroy(reset)  # its symmetric workspaces belong to the groups parallel.destroy() tears down


def _copy_engine(x: torch.Tensor, group_name: str) -> bool:
    return x.is_cuda and group_name in _COPY_ENGINE_GROUPS


def _group(group_name: str):
    return dist.distributed_c10d._resolve_process_group(group_name)


def _rows(i: int, n: int) -> slice:
    return slice(i * n, (i + 1) * n)


# ------------------------------------------------------------------------------------ copy engines
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index, priority=-1)
    return _SIDE_STREAMS[index]


_WORKSPACES: dict[str, tuple[int, object]] = {}


def _workspace(group_name: str, nbytes: int):
    """The group's symmetric workspace of at least ``nbytes`` (grown, collectively, when smaller)."""
    size, handle = _WORKSPACES.get(group_name, (0, None))
    if size < nbytes:
        from torch.distributed._symmetric_memory import get_symm_mem_workspace

        handle = get_symm_mem_workspace(group_name, min_size=nbytes)
        _WORKSPACES[group_name] = (nbytes, handle)
    return handle


def _start_pulls(ws, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, torch.cuda.Stream]:
    """On the side stream, after everything queued on the main stream so far: barrier (every rank's
    data is in its buffer), ``dst.copy_(src)`` for each (dst, src) with an event after each, barrier
    (every peer has read this rank's buffer). Returns the events and the side stream."""
    main = torch.cuda.current_stream()
    side = _side_stream(main.device)
    side.wait_stream(main)
    events = []
    with torch.cuda.stream(side):
        ws.barrier(channel=0)
        for dst, src in copies:
            dst.copy_(src)
            events.append(torch.cuda.Event())
            events[-1].record(side)
        ws.barrier(channel=1)
    return events, side


def _gather_then_consume(x_r: torch.Tensor, group_name: str, consume, keep_gathered: bool) -> torch.Tensor | None:
    """Run ``consume(p, x_p)`` for p = r first, then for every peer's shard as its copy lands.
    Returns gather(x) [t·T/t, ...] when ``keep_gathered``."""
    rows = x_r.shape[0]
    # t shards' worth, though one is used: the reduce-scatters of the same layer ask for that much,
    # and the workspace cannot grow while a CUDA graph is being captured.
    t = C.group_size(_group(group_name))
    ws = _workspace(group_name, t * x_r.numel() * x_r.element_size())
    r = ws.rank
    ws.get_buffer(r, x_r.shape, x_r.dtype).copy_(x_r)
    peers = [(r + i) % t for i in range(1, t)]
    if keep_gathered:
        gathered = x_r.new_empty(t * rows, *x_r.shape[1:])
        landing = {p: gathered[_rows(p, rows)] for p in peers}
    else:
        gathered = None
        landing = dict(zip(peers, x_r.new_empty(t - 1, *x_r.shape).unbind(0)))
    events, side = _start_pulls(ws, [(landing[p], ws.get_buffer(p, x_r.shape, x_r.dtype)) for p in peers])
    if gathered is not None:
        gathered[_rows(r, rows)].copy_(x_r)
    consume(r, x_r)
    main = torch.cuda.current_stream()
    for p, event in zip(peers, events):
        main.wait_event(event)
        consume(p, landing[p])
    main.wait_stream(side)
    return gathered


def _produce_then_reduce_scatter(shape: tuple[int, int], like: torch.Tensor, group_name: str, produce,
                                 own_work=None):
    """Σ_p of chunk r of every rank's partial result, where ``produce(p, out)`` writes chunk p of this
    rank's partial [rows, n] into ``out`` (or returns it when ``out`` is None). ``own_work()`` runs
    on the main stream while the chunks travel. Returns (the sum, own_work's result or None)."""
    rows, n = shape
    ws = _workspace(group_name, C.group_size(_group(group_name)) * rows * n * like.element_size())
    t, r = ws.world_size, ws.rank
    peers = [(r + i) % t for i in range(1, t)]

    def slot(owner: int, p: int) -> torch.Tensor:  # owner's partial chunk for rank p
        return ws.get_buffer(owner, (rows, n), like.dtype, storage_offset=p * rows * n)

    for p in peers:
        produce(p, slot(r, p))
    received = like.new_empty(t - 1, rows, n)
    events, side = _start_pulls(ws, [(received[i], slot(p, r)) for i, p in enumerate(peers)])
    out = produce(r, None)
    extra = own_work() if own_work is not None else None
    main = torch.cuda.current_stream()
    for i, event in enumerate(events):
        main.wait_event(event)
        out.add_(received[i])
    main.wait_stream(side)
    return out, extra


# -------------------------------------------------------------------------------- the four patterns
def _ag_linear_impl(x, weight, group_name):
    if not _copy_engine(x, group_name):
        gathered = C.all_gather(x, 0, _group(group_name))
        return gathered @ weight.t(), gathered
    rows = x.shape[0]
    t = C.group_size(_group(group_name))
    y = x.new_empty(t * rows, weight.shape[0])

    def consume(p, x_p):
        torch.mm(x_p, weight.t(), out=y[_rows(p, rows)])

    gathered = _gather_then_consume(x, group_name, consume, keep_gathered=True)
    return y, gathered


def _ag_linear_backward_impl(grad, gathered, weight, group_name):
    """(dx_r, dW) = (chunk_r(Σ_p g_p W), gᵀ gather(x))."""
    if not _copy_engine(grad, group_name):
        return C.reduce_scatter(grad @ weight, 0, _group(group_name)), grad.t() @ gathered
    rows = grad.shape[0] // C.group_size(_group(group_name))

    def produce(p, out):
        g_p = grad[_rows(p, rows)]
        return torch.mm(g_p, weight) if out is None else torch.mm(g_p, weight, out=out)

    return _produce_then_reduce_scatter((rows, weight.shape[1]), grad, group_name, produce,
                                        own_work=lambda: torch.mm(grad.t(), gathered))


def _linear_rs_impl(z, weight, group_name):
    if not _copy_engine(z, group_name):
        return C.reduce_scatter(z @ weight.t(), 0, _group(group_name))
    rows = z.shape[0] // C.group_size(_group(group_name))

    def produce(p, out):
        z_p = z[_rows(p, rows)]
        return torch.mm(z_p, weight.t()) if out is None else torch.mm(z_p, weight.t(), out=out)

    return _produce_then_reduce_scatter((rows, weight.shape[0]), z, group_name, produce)[0]


def _linear_rs_backward_impl(grad_r, z, weight, group_name):
    """(dz, dW) = (gather(g) W, gather(g)ᵀ z)."""
    if not _copy_engine(grad_r, group_name):
        g = C.all_gather(grad_r, 0, _group(group_name))
        return g @ weight, g.t() @ z
    rows = grad_r.shape[0]
    t = C.group_size(_group(group_name))
    dz = grad_r.new_empty(t * rows, weight.shape[1])
    dw = []

    def consume(p, g_p):  # dW accumulates one chunk of tokens at a time
        z_p = z[_rows(p, rows)]
        torch.mm(g_p, weight, out=dz[_rows(p, rows)])
        if dw:
            dw[0].addmm_(g_p.t(), z_p)
        else:
            dw.append(torch.mm(g_p.t(), z_p))

    _gather_then_consume(grad_r, group_name, consume, keep_gathered=False)
    return dz, dw[0]


# ------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("megacore::sp_ag_linear", mutates_args=())
def _ag_linear_op(x: torch.Tensor, weight: torch.Tensor, group_name: str, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _ag_linear_impl(x.contiguous(), weight.contiguous(), group_name)


@_ag_linear_op.register_fake
def _(x, weight, group_name, world):
    return x.new_empty(world * x.shape[0], weight.shape[0]), x.new_empty(world * x.shape[0], x.shape[1])


@torch.library.custom_op("megacore::sp_ag_linear_backward", mutates_args=())
def _ag_linear_backward_op(grad: torch.Tensor, gathered: torch.Tensor, weight: torch.Tensor, group_name: str,
                           world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _ag_linear_backward_impl(grad.contiguous(), gathered, weight.contiguous(), group_name)


@_ag_linear_backward_op.register_fake
def _(grad, gathered, weight, group_name, world):
    return grad.new_empty(grad.shape[0] // world, weight.shape[1]), weight.new_empty(weight.shape)


@torch.library.custom_op("megacore::sp_linear_rs", mutates_args=())
def _linear_rs_op(z: torch.Tensor, weight: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    return _linear_rs_impl(z.contiguous(), weight.contiguous(), group_name)


@_linear_rs_op.register_fake
def _(z, weight, group_name, world):
    return z.new_empty(z.shape[0] // world, weight.shape[0])


@torch.library.custom_op("megacore::sp_linear_rs_backward", mutates_args=())
def _linear_rs_backward_op(grad: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_name: str,
                           world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_rs_backward_impl(grad.contiguous(), z, weight.contiguous(), group_name)


@_linear_rs_backward_op.register_fake
def _(grad, z, weight, group_name, world):
    return z.new_empty(z.shape), weight.new_empty(weight.shape)


def _ag_setup(ctx, inputs, output):
    _, weight, ctx.group_name, ctx.world = inputs
    ctx.save_for_backward(output[1], weight)


def _ag_backward(ctx, grad, _grad_gathered):
    gathered, weight = ctx.saved_tensors
    dx, dw = _ag_linear_backward_op(grad, gathered, weight, ctx.group_name, ctx.world)
    return dx, dw, None, None


def _rs_setup(ctx, inputs, output):
    z, weight, ctx.group_name, ctx.world = inputs
    ctx.save_for_backward(z, weight)


def _rs_backward(ctx, grad):
    z, weight = ctx.saved_tensors
    dz, dw = _linear_rs_backward_op(grad, z, weight, ctx.group_name, ctx.world)
    return dz, dw, None, None


_ag_linear_op.register_autograd(_ag_backward, setup_context=_ag_setup)
_linear_rs_op.register_autograd(_rs_backward, setup_context=_rs_setup)


# ------------------------------------------------------------------------------------- public API
def all_gather_linear(x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """SP shard [B, S/t, K] -> gather(x) Wᵀ as [B, S, N]: ``F.linear(gather_from_sp(x), W)`` in one op."""
    t = C.group_size(group)
    tokens = C._tokens(x, 1, "all_gather_linear")
    y, _ = _ag_linear_op(tokens, weight, group.group_name, t)
    return y.view(x.shape[0], x.shape[1] * t, weight.shape[0])


def linear_reduce_scatter(z: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """[B, S, K_local] -> chunk_r(Σ_p z_p W_pᵀ) as [B, S/t, N]: ``reduce_scatter_to_sp(F.linear(z, W))``
    in one op."""
    t = C.group_size(group)
    tokens = C._tokens(z, t, "linear_reduce_scatter")
    y = _linear_rs_op(tokens, weight, group.group_name, t)
    return y.view(z.shape[0], z.shape[1] // t, weight.shape[0])


def apply(model: torch.nn.Module, group, workspace_bytes: int = 0) -> tuple[int, bool]:
    """Hand every sequence-parallel Column/RowParallelLinear of ``model`` whose GEMM is the plain one
    (not FP8) the fused op of its side: ``all_gather_linear`` or ``linear_reduce_scatter``.
    Returns (number of layers switched, whether the copy-engine path is on for ``group``);
    ``workspace_bytes`` as in ``enable``."""
    n = 0
    for m in model.modules():
        if not (isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.sequence_parallel
                and m.matmul is F.linear and not getattr(m, "gather_output", False)):
            continue
        m.fused_comm_matmul = all_gather_linear if isinstance(m, ColumnParallelLinear) else linear_reduce_scatter
        n += 1
    return n, enable(group, workspace_bytes)
