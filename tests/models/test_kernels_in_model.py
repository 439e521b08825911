"""The model with its Triton kernels forced on (interpreter on CPU, tiny shapes) matches the plain-torch path.

Kernels wired into the model: RMSNorm (+ fused residual add), rotary, the gated MLP activation and the
fused linear + cross-entropy loss head. Also: no graph breaks when a layer is compiled with them.
"""

import os

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

import megacore
from megacore.kernels import get_kernel_backend, kernel_backend, set_kernel_backend, triton_available
from megacore.models.gpt import GPTModel

needs_triton = pytest.mark.skipif(
    not triton_available() or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton with a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _config(**kw):
    # Tiny: the Triton interpreter runs every program of every launch in Python.
    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                vocab_size=100, seq_length=6, vocab_padding_multiple=64)
    base.update(kw)
    return megacore.TransformerConfig(**base)


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[0, :2] = -100
    mask = (torch.rand(b, cfg.seq_length, generator=g) > 0.3).float()
    return ids.to(DEVICE), labels.to(DEVICE), mask.to(DEVICE)


def _loss_and_grads(model, backend, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    with kernel_backend(backend):
        loss = model(ids, labels=labels, **kw)
        (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_close(a, b, what, tol=2e-5):
    err = (a.double() - b.double()).abs().max().item()
    scale = max(b.double().abs().max().item(), 1e-6)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} x {scale:.3g}"


@needs_triton
@pytest.mark.parametrize("variant,reductions", [
    # swiglu, RMSNorm (+ fused residual add), rope, untied output layer, 2 layers; the fused loss head's
    # early-gradient path (sum, with a loss mask as token weights) and its recompute path (none)
    (dict(num_layers=2), ("sum+mask", "none")),
    (dict(activation="geglu", tie_embeddings=True, qk_norm=True, layernorm_zero_centered_gamma=True,
          rotary_percent=0.5), ("mean",)),
])
def test_kernels_match_reference_loss_and_grads(variant, reductions):
    cfg = _config(**variant)
    model = GPTModel(cfg, seed=1).to(DEVICE)
    ids, labels, mask = _batch(cfg, b=1)
    for red in reductions:
        kw = dict(reduction=red.split("+")[0], loss_mask=mask if "mask" in red else None)
        ref_loss, ref_grads = _loss_and_grads(model, "torch", ids, labels, **kw)
        fast_loss, fast_grads = _loss_and_grads(model, "triton", ids, labels, **kw)
        _assert_close(fast_loss, ref_loss, f"loss {kw}")
        for name, g in ref_grads.items():
            _assert_close(fast_grads[name], g, f"grad {name} {kw}")


@needs_triton
def test_kernel_paths_are_taken():
    """Under backend "triton" the model's graph holds the custom ops (not silently the reference)."""
    cfg = _config()
    model = GPTModel(cfg, seed=0).to(DEVICE)
    ids, labels, _ = _batch(cfg, b=1)
    seen = set()

    class OpSpy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.namespace))
            if func.namespace == "megacore":
                seen.add(func.name().split("::")[-1].split(".")[0])
            return func(*args, **(kwargs or {}))

    with kernel_backend("triton"), OpSpy():
        model(ids, labels=labels).backward()
    for op in ("rms_norm_fwd", "rms_norm_bwd", "rotary", "gated_act_fwd", "gated_act_bwd", "linear_ce_fwd"):
        assert op in seen, f"{op} not called; saw {sorted(seen)}"


def test_backend_switch_and_validation():
    before = get_kernel_backend()
    with kernel_backend("torch"):
        assert get_kernel_backend() == "torch"
    assert get_kernel_backend() == before
    with pytest.raises(ValueError, match="not known"):
        set_kernel_backend("cuda")


# The kernels when they can run here, else the reference path (whose compile must not break either).
COMPILE_BACKEND = "triton" if (triton_available() and (torch.cuda.is_available()
                                                       or os.environ.get("TRITON_INTERPRET") == "1")) else "torch"


def test_transformer_layer_compiles_without_graph_breaks():
    """One TransformerLayer forward + backward under torch.compile(fullgraph=True) (which raises on any
    graph break; aot_eager traces the backward too), with the kernels on."""
    import torch._dynamo

    cfg = _config()
    model = GPTModel(cfg, seed=0).to(DEVICE)
    layer = model.decoder.layers["0"]
    x = torch.randn(2, cfg.seq_length, cfg.hidden_size, device=DEVICE, requires_grad=True)
    rotary = model.rotary(cfg.seq_length, x.device, x.dtype)
    with kernel_backend(COMPILE_BACKEND):
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        out = compiled(x, rotary)
        out.square().sum().backward()
        ref_out = layer(x.detach(), rotary)
    _assert_close(out.detach(), ref_out.detach(), "compiled layer output")
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch._dynamo.reset()


def test_loss_head_compiles_without_graph_breaks():
    cfg = _config()
    model = GPTModel(cfg, seed=0).to(DEVICE)
    h = torch.randn(2, cfg.seq_length, cfg.hidden_size, device=DEVICE, requires_grad=True)
    _, labels, mask = _batch(cfg)
    with kernel_backend(COMPILE_BACKEND):
        torch._dynamo.reset()
        loss = torch.compile(model.compute_loss, backend="aot_eager", fullgraph=True)(h, labels, mask, "sum")
        loss.backward()
        ref = model.compute_loss(h.detach(), labels, mask, "sum")
    _assert_close(loss.detach(), ref, "compiled loss head")
    torch._dynamo.reset()


@needs_triton
def test_fused_loss_head_steps_aside_for_a_replaced_loss():
    """parallelize() swaps in the vocab-parallel loss head: the model must then use it, not the one-rank
    fused head (which would see only its vocab shard)."""
    from megacore.layers.output_head import OutputHead

    class SumHead(OutputHead):  # a replaced loss that never fuses
        def fuses(self, hidden_BSH, weight_VH):
            return False

        def token_loss(self, hidden_BSH, weight_VH, labels_BS):
            return self.logits(hidden_BSH, weight_VH).sum(-1)

    cfg = _config()
    model = GPTModel(cfg, seed=0).to(DEVICE)
    h = torch.randn(1, cfg.seq_length, cfg.hidden_size, device=DEVICE)
    labels = torch.zeros(1, cfg.seq_length, dtype=torch.long, device=DEVICE)
    with kernel_backend("triton"):
        assert model.use_fused_loss(h)
        model.output_head = SumHead(cfg.vocab_size)
        assert not model.use_fused_loss(h)
        assert torch.equal(model.compute_token_loss(h, labels), model.output_logits(h).sum(-1))
        with kernel_backend("torch"):
            assert not model.use_fused_loss(h)