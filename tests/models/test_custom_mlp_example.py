"""Keeps examples/custom_mlp.py working: run its main() and check the custom MLP is really used."""

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_mlp.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("megacore_example_custom_mlp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_mlp_example_runs_and_trains():
    example = _load_example()
    out = example.main(steps=4, verbose=False)
    model, losses = out["model"], out["losses"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # memorizing one fixed batch
    for layer in model.decoder.layers.values():
        assert type(layer.mlp) is example.ReluSquaredMLP
        # The learned scale took part in backward and moved away from its init of ones.
        assert not torch.equal(layer.mlp.channel_scale.detach(), torch.ones_like(layer.mlp.channel_scale))
    # Deterministic: the same seed reproduces the same run.
    assert example.main(steps=4, verbose=False)["losses"] == losses


def test_custom_mlp_matches_its_formula_and_init():
    example = _load_example()
    cfg = example.tiny_config()
    mlp = example.ReluSquaredMLP(cfg)
    with torch.no_grad():
        mlp.channel_scale.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    w1, w2, s = (t.detach().double() for t in (mlp.linear_fc1.weight, mlp.linear_fc2.weight, mlp.channel_scale))
    expected = (torch.clamp(x.double() @ w1.T, min=0) ** 2 * s) @ w2.T
    torch.testing.assert_close(mlp(x).double(), expected, rtol=1e-5, atol=1e-6)
    # In a model, materialize fills the custom parameters from their marks: the scale starts at 1.
    from megacore.layers import LayerSpec
    from megacore.models import GPTModel

    model = GPTModel(cfg, layer_spec=LayerSpec(mlp=example.ReluSquaredMLP), seed=3)
    assert torch.equal(model.decoder.layers["1"].mlp.channel_scale, torch.ones(cfg.ffn_size))
    again = GPTModel(cfg, layer_spec=LayerSpec(mlp=example.ReluSquaredMLP), seed=3)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
