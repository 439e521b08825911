"""Per-layer ``torch.compile``.

Compiling each ``TransformerLayer`` separately (all layers share one compiled graph, since they have
the same structure) keeps compile time flat in depth and leaves the Python loop over layers — where
pipeline stages, recomputation and collectives live — in eager mode. The loss head (output matmul +
cross entropy + reduction) is compiled as a second region so the fp32 upcast of the logits fuses
into the loss.

The Triton kernels the layers call on CUDA (``megacore.kernels``) are torch custom ops: they sit in
the compiled graphs as opaque calls, without graph breaks. ``MEGACORE_KERNELS=torch`` (or
``megacore.kernels.set_kernel_backend("torch")``) compiles the plain-torch references instead and
lets inductor fuse them.
"""

from __future__ import annotations

import torch


def compile_model(model: torch.nn.Module, mode: str | None = None, fullgraph: bool = False,
                  backend: str = "inductor") -> torch.nn.Module:
    """Compile every transformer layer and the loss head of a GPTModel in place; returns the model."""
    for layer in model.decoder.layers.values():
        layer.compile(mode=mode, fullgraph=fullgraph, backend=backend)
    if getattr(model, "post_process", False):
        model.compute_loss = torch.compile(model.compute_loss, mode=mode, fullgraph=fullgraph, backend=backend)
    return model
