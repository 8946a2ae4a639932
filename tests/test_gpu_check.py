"""benchmarks/gpu_check.sh --dry-run: the GPU check's code paths on the CPU at tiny shapes, so the script
still works when the first session with a GPU runs it (issue 13 §3)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_check_dry_run_writes_one_results_file(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    text = out.read_text()
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{text[-6000:]}"
    for heading in ("# GPU check (DRY RUN", "## 1. Environment", "## 2. Correctness", "## 3. Attention speed",
                    "## 4. Training steps", "every stage ran"):
        assert heading in text, heading
    assert "kernel:lssar" in text and "flex:lssar" in text and "sdpa" in text
    assert "Targets (issue 13) — DRY RUN" in text and "Recommended auto order" in text
    assert "tiny     lssar" in text                      # the training-step table


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
