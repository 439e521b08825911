"""The Triton kernels compile for a real GPU (sm_90 cubin via Triton's bundled ptxas), checked on CPU."""

import os
import subprocess
import sys

import pytest

from megacore.kernels import triton_available


def _ptxas_available() -> bool:
    if not triton_available():
        return False
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_available(), reason="needs triton with its bundled ptxas")
def test_all_kernels_compile_for_sm90(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "compile_sm90.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: really compile
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ALL COMPILED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
