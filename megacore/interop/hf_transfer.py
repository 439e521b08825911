"""Moving tensors between a HF checkpoint and a megacore model through a family's rules
(``megacore.interop.hf_weights.Rule``): the name and shape checks, the copy in, the HF-named
tensors out, and the allocation of a model without spending a random init. Family-free: what the
names are comes from the rules an adapter builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from megacore.config import TransformerConfig
from megacore.interop.hf_io import CheckpointReader
from megacore.interop.hf_weights import Rule
from megacore.layers.rotary import RotaryEmbedding
from megacore.models.gpt import GPTModel


def _to_empty_keep_attrs(model: nn.Module, device: torch.device) -> None:
    """``to_empty`` makes new Parameter objects; keep the ``_megacore_*`` init/shard attributes."""
    saved = {n: {k: v for k, v in vars(p).items() if k.startswith("_megacore")}
             for n, p in model.named_parameters(remove_duplicate=False)}
    model.to_empty(device=device)
    for n, p in model.named_parameters(remove_duplicate=False):
        for k, v in saved.get(n, {}).items():
            setattr(p, k, v)


def build_empty(config: TransformerConfig, dtype: torch.dtype, device: torch.device) -> GPTModel:
    """A GPTModel with uninitialized storage on ``device``: built on meta, then allocated once."""
    with torch.device("meta"):
        model = GPTModel(config)
    if model.rotary is not None:
        # Built under the meta device its frequency table would be meta too: rebuild it on CPU.
        model.rotary = RotaryEmbedding(config)
    model.to(dtype)  # free on meta
    _to_empty_keep_attrs(model, device)
    for module in model.modules():  # allocated, not initialized: zero the buffers (MoE accumulators, expert bias)
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return model


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What rules may name: every parameter, and the persistent buffers a checkpoint carries (the MoE
    routers' ``expert_bias``)."""
    persistent = {f"{prefix}.{n}" if prefix else n
                  for prefix, module in model.named_modules() for n in module._buffers
                  if n not in module._non_persistent_buffers_set}
    buffers = {n: b for n, b in model.named_buffers() if n in persistent}
    return {**buffers, **dict(model.named_parameters())}


def checkpoint_prefix(default: str, names: list[str]) -> str:
    """``default`` when the checkpoint's names use it, else ``""`` (saved from the bare base model)."""
    return default if any(n.startswith(default) for n in names) else ""


def check_tensor_names(reader: CheckpointReader, rules: list[Rule], hf_dir: Path, what: str,
                       ignorable: Callable[[str], bool]) -> None:
    """ValueError naming the checkpoint tensors ``rules`` need but ``reader`` lacks, or that it holds
    but no rule uses (except those ``ignorable(name)`` accepts). ``what`` names the family."""
    wanted = {n for r in rules for n in r.hf}
    missing = sorted(n for n in wanted if n not in reader)
    if missing:
        raise ValueError(f"{hf_dir} lacks {len(missing)} tensor(s) the {what} config needs, e.g. {missing[:8]}; "
                         "the weights do not match config.json (or the download is incomplete)")
    extra = sorted(n for n in reader.keys() if n not in wanted and not ignorable(n))
    if extra:
        raise ValueError(f"{hf_dir} holds {len(extra)} tensor(s) the {what} mapping does not use, e.g. "
                         f"{extra[:8]}; config.json does not describe these weights (wrong num_hidden_layers, "
                         "bias or tie_word_embeddings setting?)")


_HF_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16, "half": torch.float16, "float64": torch.float64}


def check_floating(reader: CheckpointReader, names: list[str], hf_dir: Path) -> None:
    """ValueError naming the first tensor of ``names`` that is not floating point: an integer or bool
    tensor where a weight belongs is a quantized (int8/int4, GPTQ/AWQ) or damaged checkpoint, and a
    silent cast would load garbage."""
    for name in names:
        dtype = reader.dtype(name)
        if dtype is None or not dtype.is_floating_point:
            raise ValueError(f"tensor {name!r} in {reader.file_of(name)} holds {dtype or 'non-float'} values, but "
                             "megacore loads floating-point weights only; a quantized checkpoint (int8/int4, GPTQ, "
                             f"AWQ) must be dequantized to bf16/fp16/fp32 first ({hf_dir})")


def default_dtype(hf_config: dict, reader: CheckpointReader, names: list[str], hf_dir: Path) -> torch.dtype:
    """The parameter dtype of a load that names none, by the rule of transformers' ``dtype="auto"``:
    the floating dtype ``config.json`` records (``dtype``, or the older ``torch_dtype``), else the
    one floating dtype of the weights ``names``. Weights of several floating dtypes and no dtype in
    config.json: ValueError asking for an explicit dtype (the first tensor does not decide)."""
    for key in ("dtype", "torch_dtype"):
        recorded = _HF_DTYPES.get(str(hf_config.get(key)))
        if recorded is not None:
            return recorded
    found = sorted({str(reader.dtype(n)) for n in names})
    if len(found) == 1:
        return reader.dtype(names[0])
    raise ValueError(f"the weights in {hf_dir} mix {found} and config.json records no dtype; pass dtype= "
                     "(or --dtype) to choose the parameter dtype")


def _expected_hf_shapes(rule: Rule, our_shape: torch.Size) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of ``rule`` for a parameter of ``our_shape`` (computed on meta)."""
    return [tuple(t.shape) for t in rule.to_hf(torch.empty(our_shape, device="meta"))]


@torch.no_grad()
def copy_weights(model: nn.Module, rules: list[Rule], reader: CheckpointReader, hf_dir: Path, what: str) -> None:
    """Fill every parameter of ``model`` (and each persistent buffer a rule names) from the checkpoint
    through ``rules``, each HF tensor's shape checked against the one the parameter implies before it
    is read. A buffer keeps its own dtype (the fp32 expert bias of a bf16 model)."""
    params = dict(model.named_parameters())
    uncovered = sorted(set(params) - {r.ours for r in rules})
    if uncovered:
        raise RuntimeError(f"internal error: the {what} mapping leaves megacore parameters unset: {uncovered}")
    check_floating(reader, [n for r in rules for n in r.hf], hf_dir)
    targets = weight_tensors(model)
    for rule in rules:
        param = targets[rule.ours]
        for name, shape in zip(rule.hf, _expected_hf_shapes(rule, param.shape)):
            if reader.shape(name) != shape:
                raise ValueError(f"tensor {name!r} in {hf_dir} has shape {reader.shape(name)}, but config.json "
                                 f"implies {shape} (for megacore {rule.ours}); the weights do not match the config")
        param.copy_(rule.to_ours([reader.get(n) for n in rule.hf]))


def rules_to_hf(params: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """The HF-named tensors of ``params`` through ``rules``."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.ours not in params:
            raise ValueError(f"model has no parameter {rule.ours}; was it built with a custom layer spec that "
                             "renames submodules? HF export needs the default names")
        for name, t in zip(rule.hf, rule.to_hf(params[rule.ours].detach())):
            out[name] = t
    return out
