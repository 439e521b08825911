"""``megacore convert``: Hugging Face model directory <-> megacore distributed checkpoint.

    megacore convert --from hf --input HF_DIR --output CKPT_DIR [--step 0] [--dtype bf16] [--force]
    megacore convert --from megacore --input CKPT_DIR --output HF_DIR [--family llama] [--dtype bf16]

HF -> megacore writes a model-only checkpoint (``iter_{step}``, ``latest``) that training loads at
any parallel layout (``checkpoint.load=CKPT_DIR``, optimizer state then starts fresh: load it with
``load_optimizer=False``). It refuses an ``--output`` that already holds checkpoints (``latest`` or
an ``iter_*``): repointing ``latest`` there would make the next training run resume from the
converted step and overwrite the later checkpoints; ``--force`` writes anyway. It holds the
directory's lock while writing, so it never writes into the directory of a running training job.
megacore -> HF reads any checkpoint (whatever TP/PP/DP wrote it) into one full model and exports
it with ``megacore.interop.hf.save_pretrained``. The HF family and the original ``config.json``
travel in the checkpoint's ``extra`` so a round trip is exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

from megacore.checkpoint.directory import INDEX, checkpoint_entries, resolve_load_path
from megacore.checkpoint.errors import CheckpointError
from megacore.checkpoint.lock import DirectoryLock
from megacore.checkpoint.serialize import dtype_from_name, read_json

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch_dtype(name: Optional[str]):
    return None if name is None else dtype_from_name(DTYPES[name])


def check_output_free(ckpt_dir: str) -> None:
    """Raise when ``ckpt_dir`` already holds checkpoints (``megacore convert --from hf`` without --force)."""
    found = checkpoint_entries(ckpt_dir)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise CheckpointError(f"--output {ckpt_dir} already holds checkpoints ({shown}); converting into it would "
                              "point 'latest' at the converted step, and the next training run there would resume "
                              "from it and overwrite the later checkpoints. Choose an empty directory, or pass "
                              "--force to write there anyway")


def hf_to_megacore(hf_dir: str, ckpt_dir: str, step: int = 0, dtype: Optional[str] = None, force: bool = False) -> str:
    """Load a HF directory and save it as a megacore checkpoint; returns the ``iter_*`` path.

    Refuses a ``ckpt_dir`` that already holds checkpoints unless ``force``; holds its lock while writing."""
    from megacore.checkpoint.save import save_checkpoint
    from megacore.interop.hf import load_pretrained

    if not force:
        check_output_free(ckpt_dir)
    model = load_pretrained(hf_dir, dtype=_torch_dtype(dtype))
    extra = {"hf_family": getattr(model, "hf_family", None), "hf_config": getattr(model, "hf_config", None),
             "converted_from": os.path.abspath(hf_dir)}
    with DirectoryLock(ckpt_dir):
        if not force:  # again, under the lock: a run may have started writing there meanwhile
            check_output_free(ckpt_dir)
        return save_checkpoint(ckpt_dir, step, model, extra=extra).path


def megacore_to_hf(ckpt: str, out_dir: str, family: Optional[str] = None, dtype: Optional[str] = None,
                   group=None) -> str:
    """Read a megacore checkpoint (any layout) into one full model and export it as HF.

    Reading is collective over ``group`` (default: the world, when torch.distributed is initialized):
    a single rank of a running job passes a group of itself alone. A checkpoint of a fine-tuning
    run (``model.from_hf``) exports with its source's config.json keys, generation config and
    tokenizer files (``megacore.interop.hf.save_pretrained``'s ``source_dir``)."""
    from megacore.checkpoint.load import load_checkpoint
    from megacore.config import TransformerConfig
    from megacore.interop.hf import build_empty, save_pretrained
    from megacore.interop.hf_finetune import export_config

    path = resolve_load_path(ckpt, "latest")
    if path is None:
        raise CheckpointError(f"{ckpt} holds no checkpoint (no 'latest' file and no index.json)")
    index = read_json(os.path.join(path, INDEX), path)
    saved = index.get("model_config")
    if not saved:
        raise CheckpointError(f"checkpoint {path} records no model config, so the model cannot be rebuilt for export")
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    config = TransformerConfig(**{k: v for k, v in saved.items() if k in names})
    tensors = index.get("tensors") if isinstance(index, dict) else None
    model_keys = sorted(k for k in (tensors or {}) if k.startswith("model/"))
    if not model_keys:
        raise CheckpointError(f"checkpoint {path} holds no model weights (no 'model/...' tensors in its index.json)")
    torch_dtype = _torch_dtype(dtype) or dtype_from_name(tensors[model_keys[0]]["dtype"])
    import torch

    model = build_empty(config, torch_dtype, torch.device("cpu"))
    result = load_checkpoint(path, model, load_optimizer=False, load_rng=False, group=group)
    extra = result.extra if isinstance(result.extra, dict) else {}
    if extra.get("hf_family"):
        model.hf_family = extra["hf_family"]
        model.hf_config = extra.get("hf_config")
        if isinstance(model.hf_config, dict):  # a fine-tuning run's runtime keys are not the model's
            model.config = export_config(model.config, model.hf_config)
    source = extra.get("converted_from")
    save_pretrained(model, out_dir, family=family,
                    source_dir=source if isinstance(source, str) and os.path.isdir(source) else None)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megacore convert",
                                description="Convert between Hugging Face model directories and megacore checkpoints.")
    p.add_argument("--from", dest="source", required=True, choices=("hf", "megacore"),
                   help="format of --input: 'hf' (config.json + safetensors) or 'megacore' (a checkpoint directory)")
    p.add_argument("--input", required=True, help="directory to read")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--step", type=int, default=0, help="step recorded in the megacore checkpoint (--from hf)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="parameter dtype (default: as stored)")
    p.add_argument("--family", default=None, help="HF family to export (--from megacore; default: as imported or inferred)")
    p.add_argument("--force", action="store_true",
                   help="--from hf: write into an --output that already holds checkpoints (its 'latest' then names "
                        "the converted step, and training there resumes from it)")
    return p


def _describe(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"a file read is missing the entry {e}; it is damaged or was not written by megacore / transformers"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return str(e) or type(e).__name__


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.source == "hf":
            out = hf_to_megacore(args.input, args.output, step=args.step, dtype=args.dtype, force=args.force)
        else:
            out = megacore_to_hf(args.input, args.output, family=args.family, dtype=args.dtype)
    except (CheckpointError, ValueError, OSError, TypeError, KeyError) as e:  # ConfigError is a ValueError
        # A user's mistake (a wrong directory, a model that does not match, an unknown family, a
        # damaged file): one line naming it, not a traceback.
        print(f"error: {_describe(e)}", file=sys.stderr)
        return 2
    print(f"[megacore] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
