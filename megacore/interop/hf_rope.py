"""Rotary settings of a HF ``config.json`` <-> TransformerConfig ``rotary_*`` fields (the families
with RoPE share this: Llama, Mistral, Mixtral, Qwen2).

Both spellings transformers has used are read: 5.x writes one ``rope_parameters`` dict
(``rope_type``, ``rope_theta``, ``factor``, ...); 4.x wrote a top-level ``rope_theta`` plus an
optional ``rope_scaling`` dict (``type`` or ``rope_type``). Export writes the 5.x form (and a
top-level ``rope_theta`` for older readers), or keeps the original block verbatim when it maps to
the same fields.
"""

from __future__ import annotations

import math
from typing import Optional

from megacore.config import ConfigError, TransformerConfig

ROPE_FIELDS = ("rotary_base", "rotary_percent", "rotary_scaling", "rotary_scaling_factor",
               "rotary_original_max_positions", "rotary_low_freq_factor", "rotary_high_freq_factor",
               "rotary_beta_fast", "rotary_beta_slow", "rotary_mscale", "rotary_mscale_all_dim")


def _rope_params(hf: dict) -> dict:
    """Merge the 4.x (``rope_theta`` + ``rope_scaling``) and 5.x (``rope_parameters``) spellings."""
    params: dict = {}
    if hf.get("rope_theta") is not None:
        params["rope_theta"] = hf["rope_theta"]
    if hf.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = hf["partial_rotary_factor"]
    for key in ("rope_scaling", "rope_parameters"):
        block = hf.get(key)
        if not block:
            continue
        if any(isinstance(v, dict) for v in block.values()):
            raise ConfigError(f"{key}={block!r} holds per-layer-type rotary settings, which megacore cannot "
                              "represent (one rotary setting for all layers); use a model with a single rope setting")
        params.update(block)
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", 10000.0)
    return params


def _yarn_fields(p: dict, max_pos: Optional[int], orig: Optional[int]) -> dict:
    if p.get("truncate", True) is False:
        raise ConfigError("rope_parameters.truncate=False (YaRN without rounding of the correction range) is not "
                          "supported; megacore's YaRN always truncates")
    factor = p.get("factor")
    factor = float(factor) if factor is not None else max_pos / orig
    out = dict(rotary_scaling="yarn", rotary_scaling_factor=factor, rotary_original_max_positions=int(orig),
               rotary_beta_fast=float(p.get("beta_fast") or 32), rotary_beta_slow=float(p.get("beta_slow") or 1))
    mscale, mscale_all, attn = p.get("mscale"), p.get("mscale_all_dim"), p.get("attention_factor")
    if attn is not None:
        # Our cos/sin scale is 0.1·m·ln(factor) + 1: solve m for the requested attention factor.
        if factor <= 1:
            if abs(attn - 1.0) > 1e-12:
                raise ConfigError(f"rope_parameters.attention_factor={attn} with factor={factor} <= 1 cannot be "
                                  "represented; megacore's YaRN scale is 1 when factor <= 1")
            out.update(rotary_mscale=1.0, rotary_mscale_all_dim=0.0)
        else:
            out.update(rotary_mscale=(float(attn) - 1.0) / (0.1 * math.log(factor)), rotary_mscale_all_dim=0.0)
    elif mscale and mscale_all:
        out.update(rotary_mscale=float(mscale), rotary_mscale_all_dim=float(mscale_all))
    else:  # transformers ignores a lone mscale
        out.update(rotary_mscale=1.0, rotary_mscale_all_dim=0.0)
    return out


def rope_fields(hf: dict) -> dict:
    """TransformerConfig rotary_* fields from a HF config dict."""
    p = _rope_params(hf)
    kind = p["rope_type"]
    out: dict = {"rotary_base": float(p["rope_theta"]),
                 "rotary_percent": float(p.get("partial_rotary_factor", 1.0) or 1.0)}
    max_pos = hf.get("max_position_embeddings")
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rotary_scaling": "linear", "rotary_scaling_factor": float(p["factor"])}
    orig = p.get("original_max_position_embeddings", hf.get("original_max_position_embeddings", max_pos))
    if kind == "llama3":
        return {**out, "rotary_scaling": "llama3", "rotary_scaling_factor": float(p["factor"]),
                "rotary_original_max_positions": int(orig),
                "rotary_low_freq_factor": float(p.get("low_freq_factor", 1.0)),
                "rotary_high_freq_factor": float(p.get("high_freq_factor", 4.0))}
    if kind == "yarn":
        return {**out, **_yarn_fields(p, max_pos, orig)}
    raise ConfigError(f"rope_type={kind!r} is not supported; megacore supports rope types "
                      "'default', 'linear', 'llama3' and 'yarn'")


def rope_parameters(c: TransformerConfig) -> dict:
    """The 5.x ``rope_parameters`` dict of ``c``."""
    from megacore.layers.rotary import rotary_inv_freq

    p: dict = {"rope_type": c.rotary_scaling or "default", "rope_theta": c.rotary_base}
    if c.rotary_scaling is not None:
        p["factor"] = c.rotary_scaling_factor
    if c.rotary_scaling in ("llama3", "yarn"):
        p["original_max_position_embeddings"] = c.rotary_original_max_positions
    if c.rotary_scaling == "llama3":
        p.update(low_freq_factor=c.rotary_low_freq_factor, high_freq_factor=c.rotary_high_freq_factor)
    if c.rotary_scaling == "yarn":
        p.update(beta_fast=c.rotary_beta_fast, beta_slow=c.rotary_beta_slow,
                 attention_factor=rotary_inv_freq(c)[1])
    return p


def write_rope(c: TransformerConfig, out: dict, base: Optional[dict]) -> None:
    """Write the rotary keys of ``c`` into ``out``, unless ``base`` (the original config.json) already
    holds a rotary block that maps to the same fields: that one is kept verbatim."""
    if base is not None:
        try:
            old = rope_fields(base)
            if all(getattr(c, k) == old.get(k, getattr(TransformerConfig, k)) for k in ROPE_FIELDS):
                return
        except ConfigError:
            pass
    out.pop("rope_scaling", None)
    out.pop("partial_rotary_factor", None)
    out["rope_parameters"] = rope_parameters(c)
    out["rope_theta"] = c.rotary_base
