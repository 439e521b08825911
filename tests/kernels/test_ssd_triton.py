"""Mamba-2 Triton kernels (SSD scan, causal conv1d + SiLU, decode step) against the fp64 recurrence
written from the formulas and against the torch reference (tiny shapes: the CPU interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import megacore
from megacore.kernels import kernel_backend
from megacore.kernels.causal_conv1d import causal_conv1d_silu, causal_conv1d_silu_reference
from megacore.kernels.ssd_decode import mamba_decode_step, mamba_decode_step_reference
from megacore.kernels.ssd_scan import ssd_scan, ssd_scan_triton
from megacore.layers.mamba import MambaMixer, MambaState, ssd_chunked
from tests.kernels.helpers import DEVICE, assert_close, needs_triton

pytestmark = needs_triton


def recurrence_fp64(x, dt, A, B, C, D=None, initial_state=None):
    """S_t = e^{dt_t A} S_{t-1} + dt_t x_t ⊗ B_t, y_t = S_t C_t + D x_t, one position at a time in fp64."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, s, h, p = x.shape
    rep = h // B.shape[2]
    state = x.new_zeros(b, h, p, B.shape[3]) if initial_state is None else initial_state.double()
    ys = []
    for t in range(s):
        Bt, Ct = B[:, t].repeat_interleave(rep, 1), C[:, t].repeat_interleave(rep, 1)
        state = state * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append((state * Ct[:, :, None]).sum(-1) + (0 if D is None else D.double()[:, None] * x[:, t]))
    return torch.stack(ys, 1), state


def _inputs(b, s, h, p, g, n, seed, with_d=True, with_init=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, s, h, generator=gen) - 1)
    A = -torch.rand(h, generator=gen) * 2 - 0.1
    B = torch.randn(b, s, g, n, generator=gen)
    C = torch.randn(b, s, g, n, generator=gen)
    D = torch.randn(h, generator=gen) if with_d else None
    init = torch.randn(b, h, p, n, generator=gen) if with_init else None
    return [x, dt, A, B, C, D, init]


def _fwd_bwd(fn, inputs, dtype, seed=5):
    """x, B, C in ``dtype``; dt, A, D and the initial state in fp32 (fp64 for an fp64 run), as the layer has them."""
    aux = torch.float64 if dtype == torch.float64 else torch.float32
    dtypes = [dtype, aux, aux, dtype, dtype, aux, aux]
    leaves = [None if t is None else t.detach().clone().to(DEVICE, d).requires_grad_() for t, d in zip(inputs, dtypes)]
    y, final = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    gf = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ((y.double() * gy).sum() + (final.double() * gf).sum()).backward()
    return [y, final] + [None if t is None else t.grad for t in leaves]


NAMES = "y final dx ddt dA dB dC dD dinit".split()


@pytest.mark.parametrize("b,s,h,p,g,n,chunk,with_d,with_init", [
    (2, 37, 4, 8, 2, 16, 16, True, True),    # several chunks, the last one partial
    (1, 13, 3, 5, 1, 6, 8, False, True),      # odd sizes under the 16-wide blocks, no D
    (2, 9, 2, 4, 2, 8, 32, True, False),      # chunk longer than the sequence, no initial state
    (1, 50, 4, 4, 4, 4, 24, True, True),      # a chunk that is no power of two (blocks of 32 cover 24)
])
def test_scan_matches_fp64_recurrence_and_reference(b, s, h, p, g, n, chunk, with_d, with_init):
    inputs = _inputs(b, s, h, p, g, n, seed=s, with_d=with_d, with_init=with_init)

    def triton_fn(x, dt, A, B, C, D, init):
        return ssd_scan_triton(x, dt, A, B, C, chunk, D=D, initial_state=init)

    def reference_fn(x, dt, A, B, C, D, init):
        return ssd_chunked(x, dt, A, B, C, chunk, D=D, initial_state=init)

    got = _fwd_bwd(triton_fn, inputs, torch.float32)
    ref = _fwd_bwd(reference_fn, inputs, torch.float32)
    exact = _fwd_bwd(recurrence_fp64, inputs, torch.float64)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, a, r, e in zip(NAMES, got, ref, exact):
        if e is None:
            assert a is None, name
            continue
        assert_close(a, e, 2e-4, f"{name} vs fp64 recurrence")
        assert_close(a, r, 2e-4, f"{name} vs torch reference")


# The interpreter multiplies bf16 matrices wrongly (Triton 3.6: garbage from tl.dot), so on CPU the
# half-precision path is checked in fp16; bf16 runs on a GPU (and tests/gpu/test_mamba_gpu.py).
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def test_scan_over_packed_documents_matches_the_reference_and_the_recurrence():
    """``seq_idx``: documents starting inside chunks, at a chunk edge (16) and at position 1; the kernel
    (a decay exponent lowered at each start) equals the reference that drops cross-document terms
    and the fp64 recurrence with resets, outputs, final state and every gradient."""
    b, s, chunk = 2, 37, 16
    seq_idx = torch.tensor([[0] * 5 + [1] * 11 + [2] * 21, [3] + [4] * 20 + [5] * 16]).to(DEVICE)
    inputs = _inputs(b, s, 4, 8, 2, 16, seed=7, with_d=True, with_init=True)

    def triton_fn(x, dt, A, B, C, D, init):
        return ssd_scan_triton(x, dt, A, B, C, chunk, D=D, initial_state=init, seq_idx=seq_idx)

    def reference_fn(x, dt, A, B, C, D, init):
        return ssd_chunked(x, dt, A, B, C, chunk, D=D, initial_state=init, seq_idx=seq_idx)

    def exact_fn(x, dt, A, B, C, D, init):
        from megacore.kernels.ssd_scan import ssd_reference

        return ssd_reference(x, dt, A, B, C, D, initial_state=init, seq_idx=seq_idx)

    got = _fwd_bwd(triton_fn, inputs, torch.float32)
    ref = _fwd_bwd(reference_fn, inputs, torch.float32)
    exact = _fwd_bwd(exact_fn, inputs, torch.float64)
    for name, a, r, e in zip(NAMES, got, ref, exact):
        assert_close(a, e, 2e-4, f"{name} vs fp64 recurrence with resets")
        assert_close(a, r, 2e-4, f"{name} vs torch reference")


def test_conv_over_packed_documents_matches_the_reference():
    """The Triton conv with ``seq_idx`` (documents starting mid-tile, at position 1, one per row)
    against ``causal_conv1d_silu_documents``: output, dx, dweight, dbias."""
    from megacore.kernels.causal_conv1d import causal_conv1d_silu_documents

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 70, 32, generator=gen)
    w, bias = torch.randn(32, 4, generator=gen), torch.randn(32, generator=gen)
    seq_idx = torch.tensor([[0] * 5 + [1] * 61 + [2] * 4, [7] + [8] * 69])
    gy = torch.randn(2, 70, 32, generator=gen)
    results = []
    for triton_path in (True, False):
        xi, wi, bi = (t.clone().to(DEVICE).requires_grad_() for t in (x, w, bias))
        if triton_path:
            y = causal_conv1d_silu(xi, wi, bi, force_triton=True, seq_idx=seq_idx.to(DEVICE))
        else:
            y = causal_conv1d_silu_documents(xi, wi, bi, seq_idx.to(DEVICE))
        (y * gy.to(DEVICE)).sum().backward()
        results.append((y, xi.grad, wi.grad, bi.grad))
    for name, a, r in zip(("y", "dx", "dw", "dbias"), *results):
        assert_close(a, r, 2e-5, f"{name} (documents)")


def test_mixer_over_packed_documents_with_kernels_matches_the_torch_path():
    mixer = _mixer()
    hidden = torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(2))
    seq_idx = torch.tensor([[0] * 7 + [1] * 12, [0] * 19])
    out = {}
    for backend in ("triton", "torch"):
        mixer.zero_grad()
        with kernel_backend(backend):
            y = mixer(hidden, seq_idx=seq_idx)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[backend] = (y.detach(), {k: v.grad.clone() for k, v in mixer.named_parameters()})
    assert_close(out["triton"][0], out["torch"][0], 1e-5, "mixer output")
    for name, grad in out["torch"][1].items():
        assert_close(out["triton"][1][name], grad, 1e-4, f"d{name}")
    with kernel_backend("torch"):  # the second document alone: what the packed row must give there
        alone = mixer(hidden[:1, 7:])
    assert_close(out["triton"][0][:1, 7:], alone.detach(), 1e-5, "second document vs alone")


def test_scan_half_precision_matches_reference():
    inputs = _inputs(2, 40, 4, 16, 2, 16, seed=1)

    def fn(triton):
        def run(x, dt, A, B, C, D, init):
            if triton:
                return ssd_scan(x, dt, A, B, C, 16, D=D, initial_state=init, force_triton=True)
            return ssd_chunked(x, dt, A, B, C, 16, D=D, initial_state=init)
        return run

    got = _fwd_bwd(fn(True), inputs, HALF)
    ref = _fwd_bwd(fn(False), inputs, HALF)
    assert got[0].dtype == HALF and got[2].dtype == HALF
    for name, a, r in zip(NAMES, got, ref):
        assert_close(a, r, 3e-2, f"{name} ({HALF}) vs torch reference")


def test_scan_in_two_parts_with_the_carried_state_equals_one_scan():
    """What decoding after a prefill and the context-parallel path rely on: the final state of the first
    part, fed as the initial state of the second, continues the recurrence exactly."""
    x, dt, A, B, C, D, _ = _inputs(1, 29, 2, 4, 1, 8, seed=3, with_init=False)
    whole, whole_final = ssd_scan_triton(x, dt, A, B, C, 8, D=D)
    k = 11
    first, mid = ssd_scan_triton(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], 8, D=D)
    second, final = ssd_scan_triton(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], 8, D=D, initial_state=mid)
    assert_close(torch.cat([first, second], 1), whole, 1e-5, "y")
    assert_close(final, whole_final, 1e-5, "final state")


def test_scan_op_traces_into_one_graph():
    """The custom op has a fake implementation and registered autograd: torch.compile keeps one graph
    (fullgraph=True raises on a graph break) and the compiled gradients equal the eager ones."""
    x, dt, A, B, C, D, init = _inputs(1, 12, 2, 4, 1, 8, seed=4)

    def f(x, dt, B, C):
        y, final = ssd_scan_triton(x, dt, A, B, C, 8, D=D, initial_state=init)
        return y.sum() + final.sum()

    leaves = [t.clone().requires_grad_() for t in (x, dt, B, C)]
    torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (x, dt, B, C)]
    f(*eager).backward()
    for a, e in zip(leaves, eager):
        assert_close(a.grad, e.grad, 1e-6, "compiled grad")


@pytest.mark.parametrize("s,with_initial,dtype", [(1, False, torch.float32), (70, False, torch.float32),
                                                  (3, True, torch.float32), (37, True, torch.bfloat16)])
def test_causal_conv1d_silu_matches_fp64(s, with_initial, dtype):
    gen = torch.Generator().manual_seed(s)
    b, c, k = 2, 48, 4
    x = torch.randn(b, s, c, generator=gen)
    w, bias = torch.randn(c, 1, k, generator=gen), torch.randn(c, generator=gen)
    initial = torch.randn(b, c, k - 1, generator=gen) if with_initial else None
    gy = torch.randn(b, s, c, generator=gen, dtype=torch.float64)
    results = []
    for fn, dt in [(lambda *a: causal_conv1d_silu(*a, force_triton=True), dtype),
                   (causal_conv1d_silu_reference, torch.float64)]:
        leaves = [None if t is None else t.detach().clone().to(DEVICE, dt).requires_grad_() for t in (x, w, bias, initial)]
        y = fn(*leaves)
        (y.double() * gy.to(DEVICE)).sum().backward()
        results.append([y] + [None if t is None else t.grad for t in leaves])
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for name, a, e in zip(["y", "dx", "dw", "dbias", "dinitial"], *results):
        if e is None:
            continue
        assert a.dtype == dtype, name
        assert_close(a, e, tol, name)


def test_decode_steps_match_the_recurrence():
    """Three steps of the fused kernel equal the torch step and the fp64 recurrence over the same
    positions (conv inputs shifted through the state, SSM state carried)."""
    gen = torch.Generator().manual_seed(8)
    b, h, p, g, n, k = 2, 4, 8, 2, 16, 4
    cd = h * p + 2 * g * n
    w, bias, D = torch.randn(cd, 1, k, generator=gen), torch.randn(cd, generator=gen), torch.randn(h, generator=gen)
    A = -torch.rand(h, generator=gen) - 0.2
    steps = 3
    xbc = torch.randn(b, steps, cd, generator=gen)
    dt = F.softplus(torch.randn(b, steps, h, generator=gen))
    conv0, ssm0 = torch.randn(b, cd, k - 1, generator=gen), torch.randn(b, h, p, n, generator=gen)
    states = {name: (conv0.clone(), ssm0.clone()) for name in ("triton", "torch")}
    ys = {"triton": [], "torch": []}
    for t in range(steps):
        for name, fn in [("triton", lambda *a: mamba_decode_step(*a, force_triton=True)),
                         ("torch", mamba_decode_step_reference)]:
            conv, ssm = states[name]
            ys[name].append(fn(conv, ssm, xbc[:, t], dt[:, t], A, w, bias, D, h, p, g, n))
    # fp64: the conv over [initial | new inputs], then the recurrence from the initial SSM state.
    xa = causal_conv1d_silu_reference(xbc.double(), w.double(), bias.double(), conv0.double())
    x, B, C = xa.split([h * p, g * n, g * n], -1)
    y64, final64 = recurrence_fp64(x.reshape(b, steps, h, p), dt, A, B.reshape(b, steps, g, n),
                                   C.reshape(b, steps, g, n), D, ssm0)
    for name in ("triton", "torch"):
        assert_close(torch.stack(ys[name], 1), y64.reshape(b, steps, h * p), 1e-5, f"{name} y")
        assert_close(states[name][1], final64, 1e-5, f"{name} ssm state")
        assert_close(states[name][0], xbc.transpose(1, 2)[..., -(k - 1):], 0, f"{name} conv state")


def _mixer(seed=0, kernel=4):
    cfg = megacore.TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64,
                                     seq_length=32, layer_pattern="M", mamba_head_dim=8, mamba_state_dim=8,
                                     mamba_num_groups=2, mamba_chunk_size=8, mamba_conv_kernel=kernel)
    mixer = MambaMixer(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in mixer.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen) * 0.3)
        mixer.A_log.copy_(torch.rand(mixer.A_log.shape, generator=gen))
    return mixer


def test_mixer_with_kernels_matches_torch_path_and_decodes():
    """The layer under MEGACORE_KERNELS=triton: forward and every parameter gradient equal the torch
    path; prefill + one-token steps through MambaState equal the full forward."""
    mixer = _mixer()
    hidden = torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(1))
    out = {}
    for backend in ("triton", "torch"):
        mixer.zero_grad()
        with kernel_backend(backend):
            y = mixer(hidden)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[backend] = (y.detach(), {k: v.grad.clone() for k, v in mixer.named_parameters()})
    assert_close(out["triton"][0], out["torch"][0], 1e-5, "mixer output")
    for name, grad in out["torch"][1].items():
        assert_close(out["triton"][1][name], grad, 1e-4, f"d{name}")
    full = out["torch"][0]
    with torch.no_grad(), kernel_backend("triton"):
        state = MambaState(mixer.conv1d.kernel_size[0])
        got = [mixer(hidden[:, :13], state)]
        for t in range(13, 16):
            got.append(mixer(hidden[:, t:t + 1], state))
        got.append(mixer(hidden[:, 16:], state))  # a multi-token chunk after decode steps
    assert_close(torch.cat(got, 1), full, 1e-5, "cached decoding vs the full forward")
