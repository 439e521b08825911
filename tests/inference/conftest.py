"""Inference tests run tiny models: one intra-op thread is faster than several (thread start-up and
contention cost more than the matrices take), most of all on a shared machine."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
