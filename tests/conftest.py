"""Test-wide setup.

Without a GPU, Triton kernels run in the interpreter (``TRITON_INTERPRET=1``) on tiny shapes; the
variable must be set before anything imports triton, hence here. ``gpu``-marked tests skip without
CUDA.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
