"""A Hugging Face directory as the starting point of a training run (``model.from_hf``).

- ``resolve_model(model_cfg, hf_dir)``: the run's ``TransformerConfig`` is the one config.json maps
  to (through the family adapter, as ``load_pretrained`` builds it). A ``model.*`` key the user set
  must agree with it, except the runtime keys of ``RUNTIME_FIELDS``, which change how the run
  trains but not what the weights compute. A key counts as set when the config loader recorded
  it (``explicit``: the dotted keys of the YAML and the overrides), else when it differs from the
  TransformerConfig default.
- ``load_weights(chunk, hf_dir)``: fill one model chunk of any parallel layout from the HF weights:
  each local parameter gets the slice of its full tensor that its ``ParamMeta`` describes (TP rows,
  expert slice, pipeline stage by global layer names), exactly as ``materialize`` fills a random
  init. Every rank reads only the tensors its parameters need, one at a time.
- ``export_config(config, hf_config)``: the config an export writes: the runtime keys go back to
  the source's values (a run on shorter sequences still exports the model's
  ``max_position_embeddings``; dropout set for fine-tuning is not written as the model's).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from megacore.config import ConfigError, TransformerConfig
from megacore.interop.hf import adapter_of, read_hf_config, read_source
from megacore.interop.hf_io import CheckpointReader
from megacore.interop.hf_transfer import check_floating, check_tensor_names, checkpoint_prefix
from megacore.sharding import peek_meta

PathLike = Union[str, Path]

# model.* keys a run may set on top of model.from_hf: how it trains (dropout, kernels, sequence
# length, balancing losses, capacity), not what the weights compute. Everything else must agree
# with config.json.
RUNTIME_FIELDS = frozenset({
    "seq_length",             # <= config.json's max positions (rotary models only: a learned table is sized by it)
    "vocab_padding_multiple", "attention_dropout", "hidden_dropout", "attention_backend",
    "moe_experts_backend", "mamba_chunk_size", "scaled_output_init",
    "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_aux_loss_type", "moe_router_bias_update_rate",
    "moe_capacity_factor", "moe_pad_to_capacity", "mtp_loss_weight",
})
# Runtime keys an export writes back as the source had them (the padding never reaches the files).
_RESTORED_ON_EXPORT = RUNTIME_FIELDS - {"vocab_padding_multiple"}
# Keys whose unset value (None) means a value derived from other keys: compared by that value.
_EFFECTIVE = {"num_query_groups": "num_kv_heads", "kv_channels": "head_dim", "ffn_hidden_size": "ffn_size",
              "mamba_num_heads": "mamba_heads"}


def _agrees(name: str, user: Any, source: TransformerConfig) -> bool:
    if user == getattr(source, name):
        return True
    prop = _EFFECTIVE.get(name)
    return prop is not None and user is not None and getattr(dataclasses.replace(source, **{name: user}), prop) \
        == getattr(source, prop)


def resolve_model(model_cfg: TransformerConfig, hf_dir: PathLike,
                  explicit: Optional[set] = None) -> TransformerConfig:
    """The run's model config for ``model.from_hf=hf_dir`` (see the module doc); ConfigError naming
    the key and both values for an override that contradicts config.json. ``explicit``: the dotted
    keys the user set (``model.seq_length``, ...), when known."""
    hf_dir = Path(hf_dir)
    source = read_source(hf_dir)[1]
    defaults = TransformerConfig()
    kept: dict[str, Any] = {}
    for f in dataclasses.fields(TransformerConfig):
        name = f.name
        user = getattr(model_cfg, name)
        unset = (f"model.{name}" not in explicit) if explicit is not None else user == getattr(defaults, name)
        if name == "from_hf" or unset or _agrees(name, user, source):
            continue
        if name not in RUNTIME_FIELDS:
            raise ConfigError(
                f"model.{name}={user!r} contradicts model.from_hf={str(hf_dir)!r}, whose config.json gives "
                f"{name}={getattr(source, name)!r}; the model comes from the Hugging Face directory: drop "
                f"model.{name} (only runtime keys such as seq_length, dropout or attention_backend may be set on "
                "top of it; docs/finetune-hf.md lists them)")
        kept[name] = user
    if "seq_length" in kept:
        _check_seq_length(kept["seq_length"], source, hf_dir)
    return dataclasses.replace(source, from_hf=str(hf_dir), **kept).validate()


def _check_seq_length(seq: int, source: TransformerConfig, hf_dir: Path) -> None:
    if source.position_embedding == "learned":
        raise ConfigError(f"model.seq_length={seq} but model.from_hf={str(hf_dir)!r} has learned position embeddings "
                          f"of {source.seq_length} positions, whose table size is the sequence length; drop "
                          "model.seq_length (shorter documents are packed into full sequences)")
    if seq > source.seq_length:
        raise ConfigError(f"model.seq_length={seq} is longer than the {source.seq_length} positions config.json of "
                          f"model.from_hf={str(hf_dir)!r} allows (max_position_embeddings); use at most "
                          f"model.seq_length={source.seq_length}")


def export_config(config: TransformerConfig, hf_config: dict) -> TransformerConfig:
    """``config`` with its runtime keys (``RUNTIME_FIELDS``, except the vocab padding) as the source
    ``hf_config`` maps them, for an export; ``config`` itself when the family cannot map it."""
    from megacore.interop.hf import config_from_hf

    try:
        source = config_from_hf(hf_config)
    except ConfigError:
        return config
    return dataclasses.replace(config, **{k: getattr(source, k) for k in _RESTORED_ON_EXPORT})


def _local_tensors(chunk: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(global name, local tensor) of every parameter and persistent buffer of ``chunk``, each once."""
    out, seen = [], set()
    persistent = {f"{prefix}.{n}" if prefix else n
                  for prefix, module in chunk.named_modules() for n in module._buffers
                  if n not in module._non_persistent_buffers_set}
    items = list(chunk.named_parameters(remove_duplicate=False)) + \
        [(n, b) for n, b in chunk.named_buffers() if n in persistent]
    for name, t in items:
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((peek_meta(t).global_name or name, t))
    return out


@torch.no_grad()
def load_weights(chunk: nn.Module, hf_dir: PathLike) -> None:
    """Fill every parameter (and each persistent buffer the family maps) of ``chunk``, a GPTModel or
    one pipeline stage of it, possibly TP- or EP-sharded, from the HF directory (see the module
    doc). ValueError naming the tensor for a missing or wrongly shaped one (the chunk's config is not
    the directory's: build it from ``resolve_model``)."""
    hf_dir = Path(hf_dir)
    hf_cfg = read_hf_config(hf_dir)
    adapter = adapter_of(hf_cfg)
    config = chunk.config
    with CheckpointReader(hf_dir) as reader:
        rules = adapter.weight_rules_for(hf_cfg, config, checkpoint_prefix(adapter.base_prefix, list(reader.keys())))
        check_tensor_names(reader, rules, hf_dir, adapter.name, adapter.ignorable_in(hf_cfg, config))
        by_name = {r.ours: r for r in rules}
        targets = [(name, t, by_name.get(name)) for name, t in _local_tensors(chunk)]
        unmapped = [name for name, t, rule in targets if rule is None and isinstance(t, nn.Parameter)]
        if unmapped:
            raise ValueError(f"the {adapter.name} mapping of {hf_dir} has no tensor for the parameter(s) "
                             f"{unmapped[:8]}; the model was not built from this directory's config.json")
        check_floating(reader, [n for _, _, rule in targets if rule is not None for n in rule.hf], hf_dir)
        for name, local, rule in targets:
            if rule is None:
                continue
            meta = peek_meta(local)
            full_shape = tuple(meta.global_shape or local.shape)
            expected = [tuple(t.shape) for t in rule.to_hf(torch.empty(full_shape, device="meta"))]
            for hf_name, shape in zip(rule.hf, expected):
                if reader.shape(hf_name) != shape:
                    raise ValueError(f"tensor {hf_name!r} in {hf_dir} has shape {reader.shape(hf_name)}, but the "
                                     f"model needs {shape} (for {name}); the model was not built from this "
                                     "directory's config.json")
            full = rule.to_ours([reader.get(n) for n in rule.hf])
            part = meta.shard(full) if meta.is_sharded else full
            if tuple(part.shape) != tuple(local.shape):
                raise RuntimeError(f"internal error: the shard of {name} has shape {tuple(part.shape)}, the "
                                   f"parameter {tuple(local.shape)}")
            local.copy_(part)
