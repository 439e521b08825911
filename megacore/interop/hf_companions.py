"""The files beside the weights of a Hugging Face model directory that an export carries over from
the directory the model came from: the tokenizer's files and ``generation_config.json``.

Without them ``transformers`` loads the exported weights but not its tokenizer, and ``generate``
runs with no end-of-sequence token. ``generation_config.json`` is copied from the source when it
has one, else made from the token ids of the exported ``config.json`` (``bos_token_id``,
``eos_token_id``, ``pad_token_id``) the way transformers does (``_from_model_config``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megacore.interop.hf_io import copy_file, read_json_file

# What tokenizers of the common families keep beside the weights (fast and slow tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def tokenizer_files(source: Path) -> list[Path]:
    """The tokenizer files ``source`` holds (those of ``TOKENIZER_FILES``)."""
    return [source / name for name in TOKENIZER_FILES if (source / name).is_file()]


def generation_config_of(hf_config: dict) -> Optional[dict]:
    """The ``generation_config.json`` transformers derives from a model config: its token ids (None
    when the config names none)."""
    ids = {k: hf_config[k] for k in TOKEN_ID_KEYS if hf_config.get(k) is not None}
    return {"_from_model_config": True, **ids} if ids else None


def write_companions(out: Path, source: Optional[Path], hf_config: dict) -> list[str]:
    """Write the tokenizer files and ``generation_config.json`` into ``out`` (a directory being
    exported, whose ``config.json`` is ``hf_config``); returns the names written. ``source``: the
    HF directory the model came from (None or missing: only the generation config from the ids)."""
    written = []
    source = Path(source) if source is not None else None
    if source is not None and source.is_dir():
        for path in tokenizer_files(source):
            copy_file(path, out / path.name)
            written.append(path.name)
        if (source / GENERATION_CONFIG).is_file():
            read_json_file(source / GENERATION_CONFIG, "generation config")  # refuse to carry a damaged one
            copy_file(source / GENERATION_CONFIG, out / GENERATION_CONFIG)
            return written + [GENERATION_CONFIG]
    generation = generation_config_of(hf_config)
    if generation is not None:
        with open(out / GENERATION_CONFIG, "w") as f:
            json.dump(generation, f, indent=2, sort_keys=True)
            f.write("\n")
        written.append(GENERATION_CONFIG)
    return written
