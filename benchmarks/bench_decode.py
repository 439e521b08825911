"""Decoding speed on one GPU: megacore's static cache + CUDA graphs, its engine, its old loop, and
transformers' ``generate``, on the same random weights, side by side in one run.

    python benchmarks/bench_decode.py [--prompt-len 128 --new-tokens 256 --requests 64] [--json out.json]
    python benchmarks/bench_decode.py --tiny          # a tiny model on the CPU: checks that it runs

The model is DESIGN.md's 1B Llama (``configs/llama_1b_gpu.yaml``: L=16, h=2048, 16 heads, SwiGLU
ffn 5632, vocab 32000, untied), random, in bf16. Rows:

* **bandwidth limit**: at batch 1 every decode step reads every weight once (not the input embedding
  table: one row of it), so tokens/s <= HBM bandwidth (``--hbm-tbps``, H200: 4.8 TB/s) / those bytes.
* **static + graphs**: ``megacore.inference.static.StaticGenerator``, batch 1, greedy: the prompt
  prefilled once, then one captured CUDA graph replay per token (16 tokens per host sync).
* **static + graphs + compile**: the same step through ``torch.compile`` (``compile_step=True``:
  inductor fuses the elementwise work between the GEMVs) before it is captured.
* **static, eager**: the same without graphs (what the graphs save).
* **engine, 1 request**: ``megacore.inference.engine.Engine`` (paged cache, graphs) with one request.
* **old generate**: ``megacore.inference.sampling.generate`` (a Python loop, KV cache, eager).
* **transformers**: ``LlamaForCausalLM.generate(do_sample=False)`` (SDPA attention, its default cache).
* **engine, N requests**: ``--requests`` concurrent requests of mixed prompt lengths (uniform in
  [32, 512]) and ``max_new_tokens`` (uniform in [64, 256]), all submitted at once, greedy, ignoring
  eos: generated tokens / wall time (after one untimed run of the same work: graph captures). The
  ``(gather)`` row runs the same work with the paged decode kernel off (blocks gathered, then SDPA);
  the ``(1 prefill/fwd)`` row with each prompt prefilled alone instead of packed (``packed_prefill=False``).

Decode rates are (T(n) - T(1)) / (n - 1) over two runs that differ only in the number of new tokens,
so the prefill is not counted. The greedy tokens of the graphed path are compared with eager and
with transformers' (bf16 rounding may make long continuations drift apart; the count of equal
leading tokens is printed).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from megacore.config import TransformerConfig
from megacore.models import GPTModel

LLAMA_1B = dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=16, ffn_hidden_size=5632,
                vocab_size=32000, seq_length=2048, normalization="RMSNorm", activation="swiglu",
                position_embedding="rope", rotary_base=10000.0, tie_embeddings=False)
TINY = dict(LLAMA_1B, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab_size=256, seq_length=512)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def decode_rate(run, n: int, device) -> tuple[float, object]:
    """Tokens/s of decoding alone: (T(n) - T(1)) / (n - 1); also the result of the n-token run."""
    run(1)
    run(n)  # warm-up (captures, autotuning, allocator)
    t1 = min(timed(lambda: run(1), device) for _ in range(2))
    out = {}
    tn = timed(lambda: out.setdefault("v", run(n)), device)
    return (n - 1) / max(tn - t1, 1e-9), out["v"]


def leading_equal(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def hf_twin(model: GPTModel, dtype: torch.dtype, device):
    """transformers' LlamaForCausalLM holding the same weights."""
    import transformers

    from megacore.interop.hf import hf_state_dict
    from megacore.interop.hf_config import config_to_hf

    cfg = config_to_hf(model.config, "llama", dtype=dtype)
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    cfg.pop("dtype", None)
    hf_cfg = transformers.LlamaConfig(**cfg)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model, "llama"), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.eval()


def engine_throughput(model, requests: int, max_length: int, seed: int, low_high,
                      paged_kernel=None, packed_prefill=None) -> tuple[float, int, int, int]:
    from megacore.inference.engine import Engine, SamplingParams, build_runner

    rng = random.Random(seed)
    (p_lo, p_hi), (n_lo, n_hi) = low_high
    work = [([rng.randrange(model.config.vocab_size) for _ in range(rng.randint(p_lo, p_hi))], rng.randint(n_lo, n_hi))
            for _ in range(requests)]
    runner = build_runner(model, requests, max_length, block_size=16, paged_kernel=paged_kernel)
    engine = Engine(model, max_batch=requests, max_length=max_length, block_size=16, decode_steps=8, runner=runner,
                    packed_prefill=packed_prefill)
    device = next(model.parameters()).device

    def run():
        reqs = [engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in work]
        engine.run_until_done()
        return sum(len(r.token_ids) for r in reqs)

    run()  # captures every (batch, key-length) graph the timed run meets
    sync(device)
    t = time.perf_counter()
    calls = engine.prefill_calls
    tokens = run()
    sync(device)
    return tokens / (time.perf_counter() - t), tokens, engine.preemptions, engine.prefill_calls - calls


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the script runs)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--old-new-tokens", type=int, default=64, help="new tokens for the slow paths (old loop, eager)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth in TB/s (H200: 4.8)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled decode step (GPU only)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        device, dtype, cfg = torch.device("cpu"), torch.float32, TINY
        args.prompt_len, args.new_tokens, args.old_new_tokens = 8, 12, 6
        args.requests, spans = min(args.requests, 6), ((4, 20), (4, 12))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_decode needs a CUDA GPU (or --tiny for the CPU)")
        device, dtype, cfg = torch.device("cuda"), torch.bfloat16, LLAMA_1B
        spans = ((32, 512), (64, 256))
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTModel(TransformerConfig(**cfg), seed=0)
    model = model.to(dtype).eval()
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    read_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "word_embeddings" not in n)
    limit = args.hbm_tbps * 1e12 / read_bytes
    rows, tokens = [("bandwidth limit", limit)], {}

    from megacore.inference.sampling import generate
    from megacore.inference.static import StaticGenerator

    max_length = args.prompt_len + args.new_tokens
    graphs = device.type == "cuda"
    static = StaticGenerator(model, 1, max_length=max_length, use_graphs=graphs)
    rate, out = decode_rate(lambda n: static.generate(prompt, n), args.new_tokens, device)
    rows.append(("static + graphs" if graphs else "static (CPU: no graphs)", rate))
    tokens["graphed"] = out[0, args.prompt_len:].tolist()
    if graphs and not args.no_compile:
        compiled = StaticGenerator(model, 1, max_length=max_length, use_graphs=True, compile_step=True)
        rate, out = decode_rate(lambda n: compiled.generate(prompt, n), args.new_tokens, device)
        rows.append(("static + graphs + compile", rate))
        tokens["compiled"] = out[0, args.prompt_len:].tolist()
    if graphs:
        eager = StaticGenerator(model, 1, max_length=max_length, use_graphs=False)
        rate, out = decode_rate(lambda n: eager.generate(prompt, n), args.old_new_tokens, device)
        rows.append(("static, eager", rate))
        tokens["eager"] = out[0, args.prompt_len:].tolist()

    from megacore.inference.engine import Engine, SamplingParams

    one = Engine(model, max_batch=1, max_length=max_length, decode_steps=16)
    rate, _ = decode_rate(lambda n: one.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=n, ignore_eos=True)),
                          args.new_tokens, device)
    rows.append(("engine, 1 request", rate))
    rate, out = decode_rate(lambda n: generate(model, prompt, n), args.old_new_tokens, device)
    rows.append(("old generate", rate))
    tokens["old"] = out[0, args.prompt_len:].tolist()
    if not args.no_hf:
        try:
            hf = hf_twin(model, dtype, device)
        except ImportError:
            hf = None
        if hf is not None:
            with torch.no_grad():
                rate, out = decode_rate(lambda n: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                              attention_mask=torch.ones_like(prompt)), args.new_tokens,
                                        device)
            rows.append(("transformers generate", rate))
            tokens["transformers"] = out[0, args.prompt_len:].tolist()
            del hf
    rate, total, preempted, prefills = engine_throughput(model, args.requests, max_length=min(cfg["seq_length"], 1024), seed=2,
                                               low_high=spans)
    rows.append((f"engine, {args.requests} requests", rate))
    if device.type == "cuda":  # the same work reading the blocks through a gather + SDPA instead of the kernel
        gathered, _, _, _ = engine_throughput(model, args.requests, max_length=min(cfg["seq_length"], 1024), seed=2,
                                              low_high=spans, paged_kernel=False)
        rows.append((f"engine, {args.requests} req. (gather)", gathered))
    # the same work prefilling one request per forward (what packed prefill saves)
    alone, _, _, prefills_alone = engine_throughput(model, args.requests, max_length=min(cfg["seq_length"], 1024),
                                                    seed=2, low_high=spans, packed_prefill=False)
    rows.append((f"engine, {args.requests} req. (1 prefill/fwd)", alone))

    print(f"\n{'path':<28}{'tokens/s':>12}{'of limit':>10}   (weights read per token: {read_bytes / 1e9:.2f} GB, "
          f"{args.hbm_tbps} TB/s)")
    for name, r in rows:
        print(f"{name:<28}{r:>12.1f}{r / limit:>10.1%}")
    print(f"engine, {args.requests} requests: {total} tokens generated, {preempted} preemptions, {prefills} prefill "
          f"forwards packed ({prefills_alone} one request at a time) (throughput; the limit column compares with "
          "batch-1 reading)")
    ref = tokens["graphed"]
    for name in ("compiled", "eager", "old", "transformers"):
        if name in tokens:
            print(f"greedy tokens: graphed vs {name}: first {leading_equal(ref, tokens[name])} of "
                  f"{min(len(ref), len(tokens[name]))} equal")
    result = {"rows": {n: r for n, r in rows}, "weights_read_bytes": read_bytes, "hbm_tbps": args.hbm_tbps,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tiny": args.tiny,
              "engine_tokens": total, "engine_preemptions": preempted, "engine_prefill_forwards": prefills,
              "engine_prefill_forwards_alone": prefills_alone}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
