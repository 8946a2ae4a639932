"""The analysis notebook executes top to bottom on a run folder and on a sweep folder.

The notebook is kept as a jupytext percent script (notebooks/analysis.py); this test converts it and
runs it with nbclient in a fresh kernel, with ``GRAVPROBE_RUN`` pointing at a synthetic folder in the
documented schema. tests/test_pipeline_e2e.py runs it on a real smoke run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from test_report_fixtures import write_run, write_sweep

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.py"


def execute_notebook(run_dir: Path, monkeypatch, timeout: int = 300):
    """Execute the notebook on ``run_dir``; return the executed notebook's outputs as one text blob."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nb = jupytext.read(NOTEBOOK)
    monkeypatch.setenv("GRAVPROBE_RUN", str(run_dir))
    # the kernel spec runs `python`: make it this interpreter (the one with gravprobe installed)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    texts, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                texts.append(out["text"])
            data = out.get("data", {})
            texts.append(data.get("text/markdown", ""))
            images += "image/png" in data
    return "\n".join(texts), images


def test_notebook_executes_on_a_run(tmp_path, monkeypatch):
    run_dir = write_run(tmp_path / "run", ["softmax", "lssar"], n_newton={"lssar": 4})
    text, images = execute_notebook(run_dir, monkeypatch)
    assert "RunResult" in text and "complete" in text
    assert "| lssar | 4 | 5 | 1 |" in text  # verdict summary
    assert "| oracle | 5 | 5 | 1 |" in text
    assert "`cos(cos(2.19*m1))`" in text  # the equations table
    assert "exponent of r -0.31" in text  # reasons of a rejected galaxy
    # newtonian counts, force predictions, loss vs length, probe R²
    assert images >= 4


def test_notebook_executes_on_a_sweep(tmp_path, monkeypatch):
    sweep_dir = write_sweep(tmp_path / "sweep", seeds=(0, 1), drop_job=3)
    text, images = execute_notebook(sweep_dir, monkeypatch)
    assert "SweepResult" in text and "INCOMPLETE" in text and "probes missing" in text
    assert "| softmax | 0 | 10 | 2 |" in text
    assert images >= 4
