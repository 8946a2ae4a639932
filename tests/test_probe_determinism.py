"""Issue 10: the probe stage's numbers are a function of (checkpoint, force data, config) alone.

- two fresh Python processes probing one checkpoint (one after unrelated random draws) write identical
  ``results.json["probes"]`` sections and identical numbers files (CSV tables, law data);
- a resumed ``gravprobe run`` (``pipeline.stop_after=pretrain``, then the full run on the same folder, which
  reuses the pretraining) gives the same probe results as an uninterrupted run.

Wall-clock fields (``seconds``) are the only things left out of the comparisons; the controls cache is off
(``probe.controls.cache_dir=null``), so that every run fits every law itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

#: Wall-clock measurements: the only fields of the probes section allowed to differ between runs.
WALL_CLOCK = {"seconds"}

#: The smallest probe stage that still runs every part: linear (+MLP) and readouts with their untrained
#: controls, the fine-tuned head, one galaxy, every control, Operon on the log representation, 1 thread.
TINY_PROBES = [
    "probe.linear.n_systems=24", "probe.linear.max_steps_per_system=4", "probe.linear.cv_folds=2",
    "probe.linear.ridge_alphas.num=6", "probe.linear.mlp.hidden=8", "probe.linear.mlp.max_iter=20",
    "probe.readouts.n_systems=40", "probe.readouts.cv_folds=2", "probe.readouts.ridge_alphas.num=6",
    "probe.readouts.attention.windows=[1,2]", "probe.readouts.attention.n_systems=4",
    "probe.head.steps=6", "probe.head.batch_size=4", "probe.head.warmup=2", "probe.head.max_train_systems=30",
    "probe.selection.n_keep=200", "probe.selection.galaxy_size=100", "probe.selection.seeds=[3]",
    "probe.controls.cache_dir=null",
    "sr.transform=log", "sr.search_points=100", "sr.options.n_threads=1",
    "sr.representation_options.log.population_size=100", "sr.representation_options.log.generations=8",
]


def without(obj, keys: set[str]):
    """``obj`` (JSON data) with every dict entry named in ``keys`` removed, at any depth."""
    if isinstance(obj, dict):
        return {k: without(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [without(v, keys) for v in obj]
    return obj


#: The probe stage's CSV tables (a run folder also holds pretraining's metrics.csv, with wall times).
PROBE_TABLES = ("probes_linear.csv", "force_predictions.csv", "force_head_loss.csv", "equations_*.csv")


def assert_same_numbers(a: Path, b: Path) -> None:
    """The probe stage's numbers files in two folders are identical: tables byte for byte, law data exactly."""
    csvs = sorted(p.name for pattern in PROBE_TABLES for p in a.glob(pattern))
    assert csvs == sorted(p.name for pattern in PROBE_TABLES for p in b.glob(pattern))
    for name in ("probes_linear.csv", "force_predictions.csv", "force_head_loss.csv",
                 "equations_head_galaxy3.csv", "equations_oracle_galaxy3.csv"):
        assert name in csvs, name
    for name in csvs:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    laws = sorted(p.name for p in a.glob("laws_*.npz"))
    assert laws == sorted(p.name for p in b.glob("laws_*.npz"))
    assert laws == ["laws_head.npz", "laws_memoriser.npz", "laws_oracle.npz", "laws_oracle_no_m1.npz",
                    "laws_truth.npz"]
    for name in laws:
        la, lb = np.load(a / name), np.load(b / name)
        assert sorted(la.files) == sorted(lb.files) == ["X", "galaxy", "y"]
        for key in la.files:
            np.testing.assert_array_equal(la[key], lb[key], err_msg=f"{name}[{key}]")


# ------------------------------------------------------------------------------ two processes, one checkpoint
_PROBE = textwrap.dedent("""
    import json, sys, types
    import numpy as np, torch
    from hydra import compose, initialize_config_module
    from gravprobe.cli import _register_resolvers
    from gravprobe.pretrain.model import GPT, GPTConfig
    from gravprobe.probes.pipeline import run_probes

    ckpt, data, run_dir, burn, overrides = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    torch.rand(burn)                     # unrelated draws before the stage must not change anything
    np.random.rand(burn)
    ds = types.SimpleNamespace(**dict(np.load(data)))
    model = GPT(GPTConfig(n_layers=1, n_heads=2, d_model=16, block_size=33, orbit_vocab=7003, dropout=0.1,
                          attention={"name": "softmax", "params": {}, "backend": "torch"}))
    model.load_state_dict(torch.load(ckpt))
    _register_resolvers()
    with initialize_config_module(config_module="gravprobe.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=json.loads(overrides))
    run_probes(model, ds, cfg, run_dir)
""")


def test_probe_sections_identical_in_two_processes(tmp_path):
    """One checkpoint (dropout on, so the global RNG matters) and one force dataset probed by two fresh
    interpreters, one after unrelated random draws: the same ``results.json["probes"]`` (every part:
    linear, readouts, head, selection, every control's laws and verdicts, counts) and the same files."""
    from gravprobe.orbits import DatasetSpec, generate_arrays
    from gravprobe.pretrain.model import GPT, GPTConfig

    spec = DatasetSpec.from_config({"name": "two_body_force", "planets": [1, 1], "n_systems": 120, "seq_len": 33,
                                    "labelling": {"full_systems": 80, "partial_steps": 2}, "shard_size": 120})
    arrays = generate_arrays(spec, seed=0)
    np.savez(tmp_path / "data.npz", **{k: arrays[k] for k in ("tokens", "positions", "states", "forces",
                                                               "labelled", "bodies")})
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=1, n_heads=2, d_model=16, block_size=33, orbit_vocab=7003, dropout=0.1,
                          attention={"name": "softmax", "params": {}, "backend": "torch"}))
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "probe.py").write_text(_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRAVPROBE_HOME": str(tmp_path / "home")}
    runs = [tmp_path / "run0", tmp_path / "run1"]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "tiny.pt"),
                               str(tmp_path / "data.npz"), str(run), str(burn), json.dumps(TINY_PROBES + ["workers=1"])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for run, burn in zip(runs, (0, 17))]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)

    a, b = (json.loads((run / "results.json").read_text())["probes"] for run in runs)
    assert set(a["requested"]) <= set(a["done"])                      # every part ran ...
    assert {"linear", "mlp", "readouts", "head", "galaxies", "oracle", "truth", "memoriser",
            "oracle_without_m1", "untrained", "selection"} <= set(a)
    assert [g["seed"] for g in a["galaxies"]] == [3]
    assert any(g["seconds"] > 0 for g in a["oracle"]["galaxies"])    # ... and the clock fields exist
    assert json.dumps(without(a, WALL_CLOCK), sort_keys=True) == json.dumps(without(b, WALL_CLOCK), sort_keys=True)
    assert_same_numbers(*runs)


# -------------------------------------------------------------------------------- resumed vs uninterrupted
def _compose(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="gravprobe.conf"):
        return compose("config", overrides=list(overrides))


#: One variant of the smoke run, at the smallest sizes every stage accepts.
TINY_RUN = ["experiment=smoke", "pipeline.variants=[softmax]", "pipeline.report=false",
            "data.n_systems=64", "data.shard_size=64", "force_data.n_systems=160", "force_data.shard_size=160",
            "force_data.labelling.full_systems=110", "train.steps=4", "train.ckpt_every=2", "train.warmup_steps=1",
            "train.eval_batches=1", "train.extrapolation.factors=[1,2]", "train.log_every=2",
            *TINY_PROBES]


@pytest.mark.slow  # three pipeline invocations with real stages: about 1 CPU-minute
def test_resumed_run_probes_like_an_uninterrupted_one(tmp_path, monkeypatch):
    """``gravprobe run`` stopped after pretraining and run again on the same folder (the pretraining is
    reused, the probes run in the second invocation) gives the probe results of one uninterrupted run."""
    from gravprobe import pipeline

    monkeypatch.setenv("GRAVPROBE_HOME", str(tmp_path / "home"))
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    state = pipeline.main(_compose(*TINY_RUN, "pipeline.stop_after=pretrain"), resumed)
    assert state["complete"] is False and state["stages"]["softmax/pretrain"] == "done"
    assert "probes" not in json.loads((resumed / "softmax" / "results.json").read_text())
    state = pipeline.main(_compose(*TINY_RUN), resumed)
    assert state["complete"] is True
    assert state["stages"]["softmax/pretrain"] == "reused" and state["stages"]["softmax/probe"] == "done"
    assert pipeline.main(_compose(*TINY_RUN), straight)["complete"] is True

    a, b = (json.loads((run / "softmax" / "results.json").read_text()) for run in (resumed, straight))
    assert a["pretrain"]["loss"] == b["pretrain"]["loss"]             # the same pretraining, reused or not
    assert a["probes"]["checkpoint"] == str(resumed / "softmax" / "checkpoints" / "last.pt")
    skip = WALL_CLOCK | {"checkpoint"}                                # the folders differ, nothing else may
    assert json.dumps(without(a["probes"], skip), sort_keys=True) == \
           json.dumps(without(b["probes"], skip), sort_keys=True)
    assert_same_numbers(resumed / "softmax", straight / "softmax")
