"""The Mamba-2 Triton kernels compile for a real GPU (sm_90 cubin via Triton's bundled ptxas), on CPU."""

import os
import subprocess
import sys

import pytest

from tests.kernels.test_compile_sm90 import _ptxas_available


@pytest.mark.skipif(not _ptxas_available(), reason="needs triton with its bundled ptxas")
def test_mamba_kernels_compile_for_sm90(tmp_path):
    here = os.path.dirname(__file__)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: really compile
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(here, "compile_sm90_mamba.py"), "bf16"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ALL COMPILED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
