"""End to end, with the real stages: `gravprobe run experiment=smoke` from the command line.

One test, in CI (not marked slow): it is the README's main command. It runs the smoke pipeline with a
planned stop inside the first variant's pretraining (``train.stop_at``), resumes it with the same command
in the same folder, checks every output (results.json sections and keys, report.md, figures, the stages'
files), runs it a third time to see that everything finished is reused, rebuilds the report with
`gravprobe report DIR`, and executes the analysis notebook on the run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

LENGTHS = {"1", "2", "4", "8", "16"}
VARIANTS = ["softmax", "lssa", "lssar"]


def gravprobe(*args: str, home: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRAVPROBE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gravprobe.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def test_smoke_pipeline_end_to_end(tmp_path, monkeypatch):
    home, run = tmp_path / "home", tmp_path / "run"
    args = ["run", "experiment=smoke", f"hydra.run.dir={run}"]

    # 1. stop inside softmax's pretraining, as an interrupted run would
    t0 = time.perf_counter()
    gravprobe(*args, "train.stop_at=10", home=home)
    res = json.loads((run / "results.json").read_text())
    assert res["pipeline"]["complete"] is False
    assert res["pipeline"]["stages"]["softmax/pretrain"] == "stopped at step 10"
    assert (run / "softmax" / "checkpoints" / "last.pt").exists()
    assert "Status: **incomplete**" in (run / "report.md").read_text()

    # 2. the same command resumes and finishes
    resumed = gravprobe(*args, home=home)
    wall = time.perf_counter() - t0
    assert "at step 10" in resumed.stdout + resumed.stderr  # pretrain resumed from its checkpoint
    assert "torch intra-op threads: 1" in resumed.stdout + resumed.stderr  # the preset's threads=1
    res = json.loads((run / "results.json").read_text())
    pipe = res["pipeline"]
    assert pipe["complete"] is True and pipe["variants"] == VARIANTS
    assert pipe["stages"]["generate"] == "done" and pipe["stages"]["softmax/pretrain"] == "done"
    assert res["config"]["seed"] == 0 and res["config"]["pipeline"]["variants"] == VARIANTS
    for d in pipe["datasets"].values():
        assert (Path(d) / "manifest.json").exists() and str(home) in d

    for i, v in enumerate(VARIANTS):
        vres = json.loads((run / v / "results.json").read_text())
        pre = vres["pretrain"]
        assert pre["attention"] == v and pre["steps"] == res["config"]["train"]["steps"]
        for mod in ("orbits", "text"):
            loss = pre["loss"][mod]
            assert 0 < loss["last"] < loss["first"], (v, mod, loss)  # it learned something
            assert set(pre["length_extrapolation"][mod]) == LENGTHS
        pr = vres["probes"]
        assert pr["linear"] and all(set(layers) == {"0", "1", "2"} for layers in pr["linear"].values())
        assert [g["seed"] for g in pr["galaxies"]] == [0, 1, 2, 3, 4]
        for g in pr["galaxies"]:
            assert {"expression", "newtonian", "reasons", "exponents", "r2_newton"} <= set(g)
            assert set(g["exponents"]) == {"r", "m1", "m2"}
        assert ("oracle" in pr) == (i == 0)  # the oracle once, in the first variant
        assert (run / v / "checkpoints" / "last.pt").exists() and (run / v / "config.yaml").exists()
    # the control must work even at smoke size: the 2-NN oracle recovers Newton's law
    oracle = json.loads((run / "softmax" / "results.json").read_text())["probes"]["oracle"]["galaxies"]
    assert sum(g["newtonian"] for g in oracle) >= 4

    md = (run / "report.md").read_text()
    assert "Status: **complete**" in md
    for v in VARIANTS:
        assert f"**{v}** — newtonian in" in md
    assert "**oracle** (2-NN on the true state)" in md and "resolved config" in md
    assert "predicted vs true force" in md and "## Summary" in md
    for png in ("loss_vs_length.png", "probe_r2.png"):
        assert (run / "figures" / png).read_bytes()[:4] == b"\x89PNG"
    print(f"\nsmoke pipeline (stop at step 10 + resume): {wall:.1f} s wall; stage timings {pipe['timings_s']}")

    # 3. once more: everything is reused
    t1 = time.perf_counter()
    gravprobe(*args, home=home)
    again = json.loads((run / "results.json").read_text())["pipeline"]["stages"]
    assert all(again[f"{v}/{s}"] == "reused" for v in VARIANTS for s in ("pretrain", "probe"))
    assert time.perf_counter() - t1 < 60

    # 4. the report rebuilds from files alone
    (run / "report.md").unlink()
    out = gravprobe("report", str(run), home=home)
    assert str(run / "report.md") in out.stdout and "Status: **complete**" in (run / "report.md").read_text()

    # 5. the notebook runs on the real run
    from test_notebook import execute_notebook

    text, images = execute_notebook(run, monkeypatch)
    assert "RunResult" in text and "| oracle |" in text and "no force predictions saved" not in text
    assert images >= 6  # newtonian counts, 3 force-prediction figures, loss vs length, probe R²


def test_bad_override_fails_before_any_work(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "GRAVPROBE_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "gravprobe.cli", "run", "experiment=smoke",
                           "pipeline.variants=[softmax,flash]", f"hydra.run.dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "unknown attention variant 'flash'" in err and "choose from:" in err and "lssar" in err
    assert not (home / "data").exists()  # nothing was generated


@pytest.mark.parametrize("override, message", [
    ("attention=flash", "Could not find 'attention/flash'"),
    ("train.stepz=3", "train.stepz"),
])
def test_hydra_rejects_unknown_groups_and_keys(tmp_path, override, message):
    env = {**os.environ, "GRAVPROBE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "gravprobe.cli", "run", override], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


def test_multirun_sweep_with_joblib_and_sweep_report(tmp_path):
    """`-m attention=a,b seed=0,1`: one job per (variant, seed), each training only its own variant, and
    the sweep folder gets its aggregate report when the sweep ends (stopped after the datasets here)."""
    home, sweep = tmp_path / "home", tmp_path / "sweep"
    gravprobe("run", "-m", "experiment=smoke", "attention=softmax,lssar", "seed=0,1", "pipeline.stop_after=generate",
              f"hydra.sweep.dir={sweep}", home=home)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        res = json.loads((job / "results.json").read_text())
        variants = res["pipeline"]["variants"]
        assert variants == [res["config"]["attention"]["name"]]  # attention= wins over the preset's list
        seen.add((variants[0], res["config"]["seed"]))
    assert seen == {("softmax", 0), ("softmax", 1), ("lssar", 0), ("lssar", 1)}
    md = (sweep / "report.md").read_text()
    assert "4 runs" in md and "Status: **incomplete**" in md and "swept: attention, seed" in md
    assert len(list((home / "data").iterdir())) == 4  # 2 datasets x 2 seeds, shared by the variants
