"""Which run layouts hybrid stacks (``model.layer_pattern``) train in, checked before anything is built."""

from __future__ import annotations

from megacore.config import ConfigError, RunConfig


def check_hybrid_layout(cfg: RunConfig) -> None:
    """Raise a ConfigError for the combinations with hybrid layers this version cannot run."""
    pattern = cfg.model.layer_pattern
    if pattern is None:
        return
    p = cfg.parallel
    if p.context > 1:
        raise ConfigError(f"model.layer_pattern={pattern!r} (a hybrid stack) trains with data, pipeline and tensor "
                          f"parallelism, not with parallel.context={p.context} (a Mamba scan would need the state "
                          "passed between the ranks' sequence chunks); set parallel.context=1")
    if "M" not in pattern:
        return
    if cfg.precision.fp8 is not None:
        raise ConfigError("precision.fp8 has not been validated with Mamba layers ('M' in model.layer_pattern); "
                          "set precision.fp8=null")
    if cfg.data.reset_attention_mask:
        raise ConfigError("data.reset_attention_mask=true masks attention per document, but a Mamba layer's scan "
                          "carries its state across documents; set data.reset_attention_mask=false for a "
                          "model.layer_pattern with 'M'")
