"""Inference: autoregressive generation.

    from megacore.inference.generate import load_model      # HF directory or megacore checkpoint
    from megacore.inference.sampling import generate
    loaded = load_model("path/to/hf_or_checkpoint_dir")
    ids = generate(loaded.model, prompt_ids, max_new_tokens=32, temperature=0.8, top_k=50, seed=1)

``megacore.inference.sampling``: greedy / temperature / top-k / top-p decoding that recomputes the
full forward for every new token (no KV cache yet). ``megacore.inference.generate``: model and
tokenizer loading and the ``megacore generate`` command (the submodule is named after the command,
so the package re-exports no function called ``generate``).
"""
