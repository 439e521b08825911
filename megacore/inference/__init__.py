"""Inference: autoregressive generation.

    from megacore.inference.generate import load_model      # HF directory or megacore checkpoint
    from megacore.inference.sampling import generate
    loaded = load_model("path/to/hf_or_checkpoint_dir")
    ids = generate(loaded.model, prompt_ids, max_new_tokens=32, temperature=0.8, top_k=50, seed=1)

``megacore.inference.sampling``: greedy / temperature / top-k / top-p decoding, with a KV cache
(``megacore.inference.kv_cache.KVCache``) for one-device GPTModels. ``megacore.inference.generate``: model and
tokenizer loading and the ``megacore generate`` command (the submodule is named after the command,
so the package re-exports no function called ``generate``).
"""

from megacore.inference.kv_cache import KVCache  # noqa: E402,F401
