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

import warnings

import torch


def compile_model(model: torch.nn.Module, mode: str | None = None, fullgraph: bool = False,
                  backend: str = "inductor") -> torch.nn.Module:
    """Compile every transformer layer (the multi-token-prediction depths' too) and the loss head of a
    GPTModel in place; returns the model.
    A LlavaModel: its language model, and its vision tower's layers."""
    if hasattr(model, "language_model"):
        compile_model(model.language_model, mode, fullgraph, backend)
        for layer in model.vision_tower.encoder.layers.values():
            layer.compile(mode=mode, fullgraph=fullgraph, backend=backend)
        return model
    for layer in model.decoder.layers.values():
        layer.compile(mode=mode, fullgraph=fullgraph, backend=backend)
    for depth in (model.mtp.layers if getattr(model, "mtp", None) is not None else ()):
        depth.layer.compile(mode=mode, fullgraph=fullgraph, backend=backend)  # multi-token prediction
    if getattr(model, "post_process", False):
        model.compute_loss = torch.compile(model.compute_loss, mode=mode, fullgraph=fullgraph, backend=backend)
    return model


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def release_cuda_graphs(cfg, device: torch.device) -> None:
    """Free the CUDA graphs that ``compile_mode`` captured, before the process groups are destroyed.

    A captured graph that contains NCCL kernels keeps its communicator in use, and destroying the
    process group then waits forever (pytorch/pytorch#115388; measured here: TP2+SP with
    ``compile_mode=reduce-overhead`` finished every step, then hung in ``destroy_process_group``).
    Dropping inductor's CUDA-graph trees (``torch.compiler.reset``) after the GPU is idle releases
    them; nothing is compiled after this point, so the reset costs nothing.
    """
    if device.type != "cuda" or not cfg.compile or cfg.compile_mode not in CUDA_GRAPH_MODES:
        return
    import gc

    torch.cuda.synchronize(device)
    torch.compiler.reset()
    gc.collect()


def enable_tp_comm_overlap(tp_group, mode: str = "symm_mem") -> str:
    """Let inductor overlap sequence-parallel communication with compute in the compiled graphs.
    Call before the first compiled step; returns what was switched on (for the log).

    Under compile every collective is a functional op followed by its ``wait_tensor``, traced right
    after it; without a reordering pass each wait sits at its issue point, so nothing overlaps.

    - ``"schedule"``: inductor's overlap scheduler (``aten_distributed_optimizations``) estimates
      collective and compute times and moves each collective's start earlier and its wait later,
      as far as the data dependencies (and a memory cap) allow. With ``parallel.tp_batch_chunks``
      the graph holds independent chains of sequences whose compute can cover each other's
      collectives; without it, the backward's reduce-scatters can hide behind the weight-gradient
      matmuls. Falls back to ``"reorder"`` on a torch without that scheduler.
    - ``"reorder"``: the older scheduler-IR passes (sink waits, raise collectives, preserving peak
      memory).
    - ``"symm_mem"``: the micro-pipeline pass rewrites "all-gather -> matmul" and "matmul ->
      reduce-scatter" into fused ops that split the matmul into per-rank chunks and move each
      chunk through symmetric memory (NVLink peer copies, no multicast) while the neighbouring
      chunk is multiplied.
    """
    import os

    import torch._inductor.config as inductor_config

    margin = int(os.environ.get("MEGACORE_TP_SM_MARGIN", "0"))
    if margin and hasattr(torch._C, "_set_sm_carveout_experimental"):
        # Keep SMs free of cuBLAS's persistent GEMM kernels so an overlapping NCCL kernel can start
        # at once instead of spinning until the GEMM drains (experimental knob, measured only).
        torch._C._set_sm_carveout_experimental(margin)
    if mode == "schedule":
        options = getattr(inductor_config, "aten_distributed_optimizations", None)
        if options is not None and hasattr(options, "enable_overlap_scheduling"):
            options.enable_overlap_scheduling = True
            if os.environ.get("MEGACORE_TP_LOW_CONTENTION") and hasattr(options, "enable_low_contention_collectives"):
                options.enable_low_contention_collectives = True  # copy-engine collectives (experiment)
            if hasattr(options, "compute_estimator"):
                # Every rank must order its collectives identically: a deterministic cost model,
                # not per-rank kernel timings, decides the schedule.
                options.compute_estimator = "analytical"
            return "inductor overlap scheduling"
        mode = "reorder"
    if mode == "reorder":
        inductor_config.reorder_for_compute_comm_overlap = True
        inductor_config.reorder_for_compute_comm_overlap_passes = [
            "reorder_communication_preserving_peak_memory", "sink_waits_iterative",
            "reorder_communication_preserving_peak_memory"]
        return "inductor comm/compute reorder passes"
    if mode == "symm_mem":
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        with warnings.catch_warnings():  # deprecated (a no-op) on newer torch, needed on older
            warnings.simplefilter("ignore", FutureWarning)
            enable_symm_mem_for_group(tp_group.group_name)
        inductor_config._micro_pipeline_tp = True
        return "inductor micro-pipelined async TP (symmetric memory)"
    raise ValueError(f"tp_comm_overlap mode {mode!r} is not known; use schedule, reorder or symm_mem")
