"""Mamba-2 mixer and hybrid stacks: the chunked SSD against the step-by-step recurrence (fp64), the
mixer and a whole hybrid model against Hugging Face NemotronH (the Megatron-style hybrid), the
layer-pattern config and its errors."""

from __future__ import annotations

import pytest
import torch

import megacore
from megacore.config import ConfigError
from megacore.layers.mamba import MambaMixer, ssd_chunked, ssd_reference
from megacore.models.gpt import GPTModel


def _ssd_inputs(b=2, s=21, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, h, p, generator=gen, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(b, s, h, generator=gen, dtype=torch.float64))
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 2
    B = torch.randn(b, s, g, n, generator=gen, dtype=torch.float64)
    C = torch.randn(b, s, g, n, generator=gen, dtype=torch.float64)
    D = torch.randn(h, generator=gen, dtype=torch.float64)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("chunk", [1, 4, 7, 21, 32])
def test_chunked_scan_equals_the_recurrence(chunk):
    """Any chunk length (dividing the sequence or not, longer than it, 1) gives the recurrence's
    outputs, and their gradients, in fp64."""
    inputs = [t.requires_grad_() for t in _ssd_inputs()]
    ref, ref_final = ssd_reference(*inputs)
    got, final = ssd_chunked(*inputs[:5], chunk_size=chunk, D=inputs[5])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, ref_final, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, inputs, g)
    grads = torch.autograd.grad(got, inputs, g)
    for name, a, r in zip("x dt A B C D".split(), grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("chunk", [3, 8])
def test_scan_in_two_parts_with_the_carried_state_equals_one_scan(chunk):
    """Scanning positions 0..k-1, then k..s-1 from the state the first part ends in, gives the
    one-pass outputs and final state: what incremental decoding relies on."""
    x, dt, A, B, C, D = _ssd_inputs()
    whole, whole_final = ssd_chunked(x, dt, A, B, C, chunk, D)
    k = 13
    first, mid = ssd_chunked(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], chunk, D)
    second, final = ssd_chunked(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], chunk, D, initial_state=mid)
    ref_second, _ = ssd_reference(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], D, initial_state=mid)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(second, ref_second, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, whole_final, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", [4, 1])
def test_cached_decoding_equals_the_full_forward(kernel):
    """Prefill 7 tokens, then feed 1, 3 and 1 more through the cache: every new position's logits
    equal the uncached forward over the whole prefix (attention k/v and Mamba states both carried;
    a conv kernel of 1 keeps no conv inputs)."""
    from megacore.inference.kv_cache import KVCache

    cfg = megacore.TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                     ffn_hidden_size=48, vocab_size=64, seq_length=32, layer_pattern="M*M-",
                                     mamba_head_dim=8, mamba_state_dim=4, mamba_num_groups=2, mamba_chunk_size=4,
                                     mamba_conv_kernel=kernel, attention_backend="reference")
    model = GPTModel(cfg, seed=0).eval()
    _randomize(model, 11)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch=2, max_length=16)
        start = 0
        for n in (7, 1, 3, 1):
            got = model(ids[:, start:start + n], kv_cache=cache)
            torch.testing.assert_close(got, full[:, start:start + n], rtol=1e-5, atol=1e-5)
            start += n
        cache.reset()
        torch.testing.assert_close(model(ids[:, :5], kv_cache=cache), full[:, :5], rtol=1e-5, atol=1e-5)


def _hf_config(pattern, **kw):
    from transformers import NemotronHConfig

    kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8, n_groups=2, conv_kernel=4,
                chunk_size=8, layer_norm_epsilon=1e-5, mlp_hidden_act="relu2", tie_word_embeddings=False,
                layers_block_type=[kinds[c] for c in pattern], time_step_min=0.01)
    base.update(kw)
    return NemotronHConfig(**base)


def _our_config(pattern, hf):
    return megacore.TransformerConfig(
        num_layers=len(pattern), hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads, kv_channels=hf.head_dim, ffn_hidden_size=hf.intermediate_size,
        vocab_size=hf.vocab_size, seq_length=32, vocab_padding_multiple=1, activation="squared_relu",
        position_embedding="none", norm_epsilon=hf.layer_norm_epsilon, layer_pattern=pattern,
        mamba_num_heads=hf.mamba_num_heads, mamba_head_dim=hf.mamba_head_dim, mamba_state_dim=hf.ssm_state_size,
        mamba_num_groups=hf.n_groups, mamba_conv_kernel=hf.conv_kernel, mamba_chunk_size=hf.chunk_size,
        mamba_dt_clamp_min=hf.time_step_min)


def _copy_mixer(ours: MambaMixer, theirs) -> None:
    with torch.no_grad():
        for a, b in [("in_proj.weight", "in_proj.weight"), ("out_proj.weight", "out_proj.weight"),
                     ("conv1d.weight", "conv1d.weight"), ("conv1d.bias", "conv1d.bias"), ("dt_bias", "dt_bias"),
                     ("A_log", "A_log"), ("D", "D"), ("norm_weight", "norm.weight")]:
            ours.get_parameter(a).copy_(theirs.get_parameter(b))


def _randomize(module, seed):
    """Every parameter random (HF's init sets D, norms and dt_bias to constants that hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() > 1 else 0.5) + (1.0 if "norm" in name else 0.0))


def test_mixer_matches_hugging_face_nemotron_h_mixer():
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    hf_cfg = _hf_config("M")
    theirs = NemotronHMamba2Mixer(hf_cfg, layer_idx=0).eval()
    _randomize(theirs, 1)
    ours = MambaMixer(_our_config("M", hf_cfg))
    _copy_mixer(ours, theirs)
    x = torch.randn(2, 19, hf_cfg.hidden_size, generator=torch.Generator().manual_seed(2))  # 19: not a chunk multiple
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(3))  # (seeded: not the global RNG's state)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    for a, b in [("in_proj.weight", "in_proj.weight"), ("A_log", "A_log"), ("dt_bias", "dt_bias"), ("D", "D"),
                 ("conv1d.weight", "conv1d.weight"), ("norm_weight", "norm.weight")]:
        got, want = ours.get_parameter(a).grad, theirs.get_parameter(b).grad
        # fp32 sums over every token in a different order: judge each gradient on its own scale
        err = (got - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item(), (a, err, want.abs().max().item())


def _hf_to_ours(model: GPTModel, hf_model) -> None:
    sd = hf_model.state_dict()
    with torch.no_grad():
        model.embedding.word_embeddings.weight.copy_(sd["model.embeddings.weight"])
        model.decoder.final_norm.weight.copy_(sd["model.norm_f.weight"])
        model.output_layer.weight.copy_(sd["lm_head.weight"])
        for i, layer in model.decoder.layers.items():
            pre = f"model.layers.{i}."
            layer.input_norm.weight.copy_(sd[pre + "norm.weight"])
            if hasattr(layer, "mixer"):
                _copy_mixer(layer.mixer, hf_model.model.layers[int(i)].mixer)
            elif hasattr(layer, "self_attention"):
                q, k, v = (sd[pre + f"mixer.{n}_proj.weight"] for n in "qkv")
                groups = hf_model.config.num_key_value_heads
                d = hf_model.config.head_dim
                rows = []
                for gi in range(groups):  # megacore's fused QKV: per KV group [its q heads | k | v]
                    per = q.shape[0] // d // groups
                    rows += [q[gi * per * d:(gi + 1) * per * d], k[gi * d:(gi + 1) * d], v[gi * d:(gi + 1) * d]]
                layer.self_attention.linear_qkv.weight.copy_(torch.cat(rows))
                layer.self_attention.linear_proj.weight.copy_(sd[pre + "mixer.o_proj.weight"])
            else:
                layer.mlp.linear_fc1.weight.copy_(sd[pre + "mixer.up_proj.weight"])
                layer.mlp.linear_fc2.weight.copy_(sd[pre + "mixer.down_proj.weight"])


def _paired_models(pattern: str, seed: int):
    """A randomized HF NemotronHForCausalLM (eager attention) for ``pattern`` and our GPTModel holding
    the same weights, both in eval mode: (hf config, hf model, ours)."""
    from transformers import NemotronHForCausalLM

    hf_cfg = _hf_config(pattern)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = NemotronHForCausalLM(hf_cfg).eval()
    _randomize(hf, seed)
    ours = GPTModel(_our_config(pattern, hf_cfg), seed=0).eval()
    _hf_to_ours(ours, hf)
    return hf_cfg, hf, ours


def test_hybrid_model_matches_hugging_face_nemotron_h():
    """A 'M*M-M' stack (Mamba, attention without rotary, squared-ReLU MLP): logits, loss and the
    input-embedding gradient equal HF NemotronHForCausalLM's with the same weights."""
    hf_cfg, hf, ours = _paired_models("M*M-M", seed=3)
    ids = torch.randint(0, hf_cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    theirs = hf(input_ids=ids, labels=ids)
    logits = ours(ids)
    torch.testing.assert_close(logits[..., :hf_cfg.vocab_size], theirs.logits, rtol=1e-4, atol=1e-4)
    loss = ours(ids[:, :-1], labels=ids[:, 1:])
    torch.testing.assert_close(loss, theirs.loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    theirs.loss.backward()
    torch.testing.assert_close(ours.embedding.word_embeddings.weight.grad[:hf_cfg.vocab_size],
                               hf.model.embeddings.weight.grad, rtol=1e-3, atol=1e-6)


def test_hybrid_training_steps_reduce_the_loss_and_recompute_keeps_gradients():
    cfg = megacore.TransformerConfig(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                     vocab_size=64, seq_length=16, layer_pattern="M*-", mamba_head_dim=8,
                                     mamba_state_dim=4, mamba_num_groups=2, mamba_chunk_size=4)
    ids = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("none", "full"):
        model = GPTModel(cfg, seed=5)
        if mode == "full":
            rc = megacore.RecomputeConfig(granularity="full")
            rc.validate()
            model.configure_recompute(rc)
        model(ids[:, :-1], labels=ids[:, 1:]).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in grads["none"]:
        torch.testing.assert_close(grads["full"][name], grads["none"][name], rtol=0, atol=0, msg=name)
    model = GPTModel(cfg, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("kw, key, words", [
    (dict(layer_pattern="M*X"), "model.layer_pattern", "layer kinds"),
    (dict(layer_pattern="M*"), "model.layer_pattern", "num_layers=3"),
    (dict(layer_pattern="M*-", mamba_head_dim=48), "model.mamba_head_dim", "divide"),
    (dict(layer_pattern="M*-", mamba_num_groups=3), "model.mamba_num_groups", "divide"),
    (dict(layer_pattern="M*-", mamba_head_dim=16, mamba_dt_clamp_min=-1.0), "model.mamba_dt_clamp_min", ">= 0"),
    (dict(layer_pattern="M*-", mamba_head_dim=16, sliding_window=4), "model.sliding_window", "Mamba"),
])
def test_bad_hybrid_configs_name_the_key(kw, key, words):
    base = dict(num_layers=3, hidden_size=64, num_attention_heads=4, vocab_size=64)
    with pytest.raises(ConfigError, match=key) as err:
        megacore.TransformerConfig(**base, **kw).validate()
    assert words in str(err.value)


def _per_document(fn, seq_idx, *tensors):
    """``fn`` run on each document of each row alone (the independent reference for packing), the
    outputs concatenated back along the sequence."""
    rows = []
    for r in range(seq_idx.shape[0]):
        parts = []
        for d in seq_idx[r].unique():
            keep = seq_idx[r] == d
            parts.append(fn(*(t[r:r + 1, keep] for t in tensors)))
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0)


# Row 0: documents of 5, 9 and 7 positions (boundaries inside chunks and at 14 = 2 chunks of 7);
# row 1: one document of 2 positions, then one of 19.
SEQ_IDX = torch.tensor([[0] * 5 + [1] * 9 + [2] * 7, [4] * 2 + [5] * 19])


@pytest.mark.parametrize("chunk", [1, 4, 7, 32])
def test_packed_documents_scan_like_separate_sequences(chunk):
    """With ``seq_idx`` the chunked scan equals the recurrence with resets (values and every gradient,
    fp64) and each document scanned alone."""
    inputs = [t.requires_grad_() for t in _ssd_inputs()]
    x, dt, A, B, C, D = inputs
    ref, _ = ssd_reference(*inputs, seq_idx=SEQ_IDX)
    got, _ = ssd_chunked(x, dt, A, B, C, chunk, D, seq_idx=SEQ_IDX)
    alone = _per_document(lambda x_, dt_, B_, C_: ssd_reference(x_, dt_, A, B_, C_, D)[0], SEQ_IDX, x, dt, B, C)
    torch.testing.assert_close(ref, alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, alone, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    for name, a, r in zip("x dt A B C D".split(), torch.autograd.grad(got, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=name)


def test_packed_documents_conv_like_separate_sequences():
    from megacore.kernels.causal_conv1d import causal_conv1d_silu_documents, causal_conv1d_silu_reference

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 21, 6, generator=gen, dtype=torch.float64)
    w, bias = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    got = causal_conv1d_silu_documents(x, w, bias, SEQ_IDX)
    want = _per_document(lambda x_: causal_conv1d_silu_reference(x_, w, bias), SEQ_IDX, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _hybrid(seq=16):
    cfg = megacore.TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                     vocab_size=64, seq_length=seq, ffn_hidden_size=48, layer_pattern="M*M-",
                                     mamba_head_dim=8, mamba_state_dim=4, mamba_num_groups=2, mamba_chunk_size=4)
    return GPTModel(cfg, seed=0).double()


def test_packed_documents_through_a_hybrid_model_equal_separate_sequences():
    """A row packing documents of 6 and 10 tokens, with the document mask of data.reset_attention_mask
    and reset position ids, gives each document's logits and the same parameter gradients as the two
    documents run as sequences of their own."""
    model = _hybrid()
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    doc = torch.tensor([0] * 6 + [1] * 10)
    mask = (torch.ones(16, 16, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :]))[None, None]
    positions = torch.cat([torch.arange(6), torch.arange(10)])[None]
    packed = model(ids, position_ids=positions, attention_mask=mask)
    alone = torch.cat([model(ids[:, :6]), model(ids[:, 6:])], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    grads = []
    for out in (packed, alone):
        model.zero_grad()
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:  # (the mixer computes dt in fp32 even in an fp64 model: dt_bias, A_log to ~1e-7)
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-9, msg=name)


def test_mamba_layer_names_a_mask_it_cannot_read():
    from megacore.layers.hybrid import sequence_index

    with pytest.raises(ValueError, match="boolean"):
        sequence_index(torch.zeros(1, 1, 4, 4), 1)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[2, :2] = False                          # position 2 starts a new document
    assert sequence_index(mask[None, None], 2).tolist() == [[0, 0, 1, 1]] * 2


def test_greedy_generation_matches_hugging_face_nemotron_h():
    """Greedy generation (prefill, then one token at a time through the k/v + Mamba-state cache)
    gives HF's tokens."""
    from megacore.inference.sampling import generate

    hf_cfg, hf, ours = _paired_models("M*M-", seed=7)
    assert ours.supports_kv_cache
    prompt = torch.randint(0, hf_cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(8))
    want = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    got = generate(ours, prompt, max_new_tokens=8)
    assert torch.equal(got, want), (got, want)


def test_flops_count_each_layer_kind():
    """N of the FLOPs formula equals the model's 2-D (matmul) parameters minus the input embedding,
    for a hybrid stack and a plain one; only attending layers add the 6·h·s term."""
    from megacore.training.flops import flops_per_token, matmul_params

    for pattern in ("M*M-", None):
        cfg = megacore.TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                         vocab_size=128, vocab_padding_multiple=1, seq_length=32,
                                         layer_pattern=pattern, mamba_head_dim=16, mamba_state_dim=8,
                                         mamba_num_groups=2)
        model = GPTModel(cfg, seed=0)
        n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "word_embeddings" not in name)
        assert matmul_params(cfg) == n
        attending = 1 if pattern else 4
        assert flops_per_token(cfg) == 6.0 * n + 6.0 * attending * 64 * 32


def test_hugging_face_nemotron_h_round_trip(tmp_path):
    """A HF NemotronH directory loads into a hybrid GPTModel with HF's logits; saving it back writes a
    directory that HF loads, bit-identical weights and the same config structure."""
    from transformers import NemotronHForCausalLM

    from megacore.interop.hf import load_pretrained, save_pretrained

    hf_cfg = _hf_config("M*M-")
    torch.manual_seed(0)
    hf = NemotronHForCausalLM(hf_cfg).eval()
    _randomize(hf, 9)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf", attention_backend="reference")
    assert ours.config.layer_pattern == "M*M-" and ours.config.mamba_dt_clamp_min == hf_cfg.time_step_min
    ids = torch.randint(0, hf_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        torch.testing.assert_close(ours(ids)[..., :hf_cfg.vocab_size], want, rtol=1e-4, atol=1e-4)
    save_pretrained(ours, tmp_path / "back")
    again = NemotronHForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert again.config.layers_block_type == hf_cfg.layers_block_type
    for (name, a), b in zip(hf.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=0, atol=0)


def test_nemotron_h_export_refuses_what_it_cannot_hold(tmp_path):
    from megacore.interop.hf import save_pretrained

    cfg = megacore.TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                                     layer_pattern="M*", mamba_head_dim=8, mamba_state_dim=4, mamba_num_groups=2)
    with pytest.raises(ConfigError, match="activation"):  # swiglu: NemotronH's MLP is squared ReLU
        save_pretrained(GPTModel(cfg, seed=0), tmp_path / "x")
    with pytest.raises(ConfigError, match="layer_pattern"):
        save_pretrained(GPTModel(cfg, seed=0), tmp_path / "y", family="llama")


def test_mlp_layers_of_a_hybrid_stack_become_moe_layers_with_experts():
    from megacore.layers.moe import MoELayer

    cfg = megacore.TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                                     vocab_size=64, seq_length=8, layer_pattern="M-", mamba_head_dim=8,
                                     mamba_state_dim=4, mamba_num_groups=2, num_experts=4, moe_top_k=2)
    model = GPTModel(cfg, seed=0)
    assert isinstance(model.decoder.layers["1"].mlp, MoELayer)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], labels=ids[:, 1:]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
