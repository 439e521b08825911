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


def enable_tp_comm_overlap(tp_group) -> None:
    """Let inductor overlap sequence-parallel communication with the matmuls next to it.

    Its micro-pipeline pass rewrites "all-gather -> matmul" and "matmul -> reduce-scatter" in the
    compiled layer graphs into fused ops that split the matmul into per-rank chunks and move each
    chunk through symmetric memory (NVLink copies) while the neighbouring chunk is multiplied, so
    the collective hides behind the GEMM. Needs CUDA, NVLink peers, and the functional collectives
    that ``megacore.parallel.collectives`` emits under compile. Call before the first compiled step.
    (Uses no NVLink multicast: only peer-to-peer copies.)
    """
    import torch._inductor.config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    enable_symm_mem_for_group(tp_group.group_name)
    inductor_config._micro_pipeline_tp = True
