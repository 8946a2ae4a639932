"""benchmarks/bench_pretrain.py at tiny sizes: the rows, the ratios and the baseline in a child process with
its own CPU allocator (``--baseline-allocator``), so the benchmark keeps working between the sessions that
measure with it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_pretrain.py"
TINY = ["--models", "tiny", "--override", "model.n_layers=1", "model.d_model=16", "model.n_heads=1",
        "--batch", "2", "--seq-len", "16", "--n-bins", "8", "--threads", "1", "--seconds", "0.02",
        "--rounds", "1", "--warmup", "1"]


def _run(tmp_path, *args):
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, *args, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_rows_and_ratios_against_softmax(tmp_path):
    _stdout, res = _run(tmp_path, "--variants", "softmax", "lssa")
    assert res["cpu_allocator"].startswith("CPU allocator")
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"softmax", "lssa"} and rows["softmax"]["ratio_vs_softmax"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["page_faults_per_step"] >= 0 for r in rows.values())


def _git_head() -> bool:
    try:
        subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:pretrain/model.py"], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@pytest.mark.skipif(not _git_head(), reason="needs a git checkout (the baseline is a git revision)")
def test_baseline_in_a_child_process_with_glibc_defaults(tmp_path):
    stdout, res = _run(tmp_path, "--variants", "softmax", "lssa", "--baseline", "HEAD",
                       "--baseline-allocator", "system")
    assert "baseline runners in a child process: CPU allocator: glibc defaults" in stdout
    base = [r for r in res["rows"] if r["baseline"]]
    assert [r["variant"] for r in base] == ["softmax", "lssa"]
    assert all(r["new_vs_this"] > 0 and r["params"] == res["rows"][0]["params"] for r in base)
    assert "softmax [base] [system]" in stdout


def test_baseline_allocator_needs_a_baseline(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--baseline-allocator", "system"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "--baseline-allocator needs --baseline REV" in proc.stderr
