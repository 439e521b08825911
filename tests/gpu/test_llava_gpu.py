"""LLaVA on CUDA: the tiny HF LLaVA of tests/interop/test_hf_llava.py, loaded into megacore and run
on the GPU in fp32, gives HF's logits (run on the same GPU) within 1e-3 (cuDNN/cuBLAS kernels differ
from the CPU ones); in bf16 a training step runs and lowers the loss."""

import pytest
import torch

from tests.interop.test_hf_llava import _hf_model, _inputs, train_steps

pytestmark = pytest.mark.gpu


def test_llava_on_gpu_matches_hugging_face(tmp_path):
    from megacore.interop.hf_llava import load_pretrained_llava

    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained_llava(tmp_path / "hf", device="cuda")
    hf = hf.cuda()
    ids, pixels = _inputs(ours.config.vision.image_seq_length)
    ids, pixels = ids.cuda(), pixels.cuda()
    with torch.no_grad():
        diff = (ours(ids, pixels) - hf(input_ids=ids, pixel_values=pixels).logits).abs().max().item()
    assert diff < 1e-3, diff
    model = load_pretrained_llava(tmp_path / "hf", dtype=torch.bfloat16, device="cuda").train()
    losses = train_steps(model, ids, pixels)
    assert losses[-1] < losses[0] - 0.5, losses
