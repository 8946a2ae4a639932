"""The Triton kernels compile for real NVIDIA targets (Triton IR → PTX → cubin), without a GPU.

The interpreter that runs tests/test_kernels.py on a CPU accepts code the GPU compiler rejects; this runs
``python -m gravprobe.kernels.compile_check`` in its own process (with TRITON_INTERPRET unset).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _compile(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-m", "gravprobe.kernels.compile_check", *args], env=env,
                          capture_output=True, text=True, timeout=1800, check=False)


def test_lssar_kernels_compile_for_sm90():
    result = _compile("--arch", "90", "--quick", "--variants", "lssar")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok   sm_90") == 3  # forward, dQ, dK/dV


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_kernel_specialisation_compiles(arch):
    result = _compile("--arch", arch)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
