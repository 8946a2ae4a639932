"""Probes on real (small) two-body force data: selection, oracle, linear probes, force head, the stage."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gravprobe.orbits import DatasetSpec, generate_arrays  # noqa: E402
from gravprobe.probes.data import (make_galaxies, noisy_truth, oracle_predict, planet_steps,  # noqa: E402
                                   select_nearest, split_force_data)
from gravprobe.probes.linear import TARGETS, probe_targets  # noqa: E402
from gravprobe.probes.pipeline import recover_laws, run_probes  # noqa: E402

G = 4 * np.pi**2
N_SYS, T, FULL = 400, 129, 300   # 64 planet steps per sequence; 100 held-out sequences


def force_spec(n=N_SYS, t=T, full=FULL) -> DatasetSpec:
    return DatasetSpec.from_config({"name": "two_body_force", "planets": [1, 1], "n_systems": n, "seq_len": t,
                                    "labelling": {"full_systems": full, "partial_steps": 2}, "shard_size": 200})


@pytest.fixture(scope="module")
def ds():
    return types.SimpleNamespace(**generate_arrays(force_spec(), seed=0))


def tiny_model(seed=0, d_model=32, n_layers=2):
    from gravprobe.pretrain.model import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=n_layers, n_heads=2, d_model=d_model, block_size=T, orbit_vocab=7003,
                         attention={"name": "softmax", "params": {}, "backend": "torch"}))


# ---------------------------------------------------------------------------------------- selection
def test_split_and_selection(ds):
    train, held = split_force_data(ds)
    lab = ds.labelled & (ds.bodies >= 1)
    assert len(train) == lab.sum()
    assert set(np.unique(held.system)) == set(range(FULL, N_SYS))    # only the partially labelled sequences
    assert not held.labelled.any() and train.labelled.all()
    assert len(held) == ((ds.bodies[FULL:] >= 1) & ~ds.labelled[FULL:]).sum()
    # states/forces line up with the dataset arrays
    i = 17
    np.testing.assert_allclose(held.state[i], ds.states[held.system[i], held.step[i]])
    np.testing.assert_allclose(held.magnitude, np.hypot(*held.force.T))
    r = held.r
    np.testing.assert_allclose(held.magnitude, G * held.state[:, 4] * held.state[:, 5] / r**2, rtol=2e-3)

    order, dist = select_nearest(train.state, held.state, 1000)
    assert len(order) == 1000 == len(set(order.tolist())) and np.all(np.diff(dist) >= 0)
    # brute-force check of the kept set on the standardised features
    from sklearn.preprocessing import StandardScaler

    from gravprobe.probes.data import state_features
    sc = StandardScaler().fit(state_features(train.state))
    A, B = sc.transform(state_features(train.state)), sc.transform(state_features(held.state[:300]))
    d_brute = np.sqrt(((B[:, None, :] - A[None]) ** 2).sum(-1)).min(1)
    kept = np.isin(np.arange(300), order)
    assert kept.sum() > 0
    assert d_brute[kept].max() <= dist.max() + 1e-9 and (d_brute[~kept] >= dist.max() - 1e-9).all()

    g1, g2 = make_galaxies(1000, 200, [0, 1, 2]), make_galaxies(1000, 200, [0, 1, 2])
    assert all((a == b).all() for a, b in zip(g1, g2))               # seeded
    assert all(len(np.unique(g)) == 200 for g in g1) and not (g1[0] == g1[1]).all()
    with pytest.raises(ValueError, match="galaxy of 2000"):
        make_galaxies(1000, 2000)


def test_split_needs_labels(ds):
    bad = types.SimpleNamespace(**{k: getattr(ds, k) for k in ("states", "forces", "bodies")},
                                labelled=np.zeros_like(ds.labelled))
    with pytest.raises(ValueError, match="no labelled steps"):
        split_force_data(bad)


# ------------------------------------------------------------------------------------------- oracle
def test_oracle_recovers_newton_in_five_of_five(ds, tmp_path):
    train, held = split_force_data(ds)
    order, _ = select_nearest(train.state, held.state, 1500)
    pool = held.subset(order)
    y = oracle_predict(train.state, train.magnitude, pool.state, k=2)
    assert np.median(np.abs(y / pool.magnitude - 1)) < 0.2
    galaxies = make_galaxies(len(order), 400, range(5))
    verdicts, fits = recover_laws(pool.sr_inputs, y, galaxies, list(range(5)),
                                  dict(backend="operon", n_threads=2, generations=30), out_dir=tmp_path, tag="oracle")
    assert [v["seed"] for v in verdicts] == [0, 1, 2, 3, 4]
    assert all(v["newtonian"] for v in verdicts), [(v["expression"], v["reasons"]) for v in verdicts]
    assert all((tmp_path / f"equations_oracle_galaxy{s}.csv").exists() for s in range(5))
    for v in verdicts:
        assert set(v["exponents"]) == {"r", "m1", "m2"} and len(v["exponents"]["r"]) == 3
        assert v["r2_newton"] > 0.99


def test_noisy_truth_is_relative_and_seeded():
    y = np.logspace(-9, -3, 1000)
    a, b = noisy_truth(y, 0.01, 3), noisy_truth(y, 0.01, 3)
    assert (a == b).all() and 0.005 < np.std(a / y - 1) < 0.015


# ------------------------------------------------------------------------------------ linear probes
def test_probe_targets_match_physics(ds):
    steps = planet_steps(ds, [0, 1, 2])
    t = probe_targets(steps.state, steps.force)
    assert t.shape == (len(steps), len(TARGETS))
    col = dict(zip(TARGETS, t.T))
    np.testing.assert_allclose(col["inv_r2"], 1 / col["r"] ** 2)
    np.testing.assert_allclose(col["log_F_mag"], np.log(col["F_mag"]))
    assert ((col["e"] >= 0) & (col["e"] < 1)).all() and (col["a"] > 0).all()
    np.testing.assert_allclose(np.hypot(col["lrl_x"], col["lrl_y"]), col["e"], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown probe target"):
        probe_targets(steps.state, steps.force, ["torque"])


def test_linear_probes_on_tiny_random_model(ds):
    from omegaconf import OmegaConf

    from gravprobe.probes.linear import capture_activations, run_linear_probes

    model = tiny_model()
    mask = ds.bodies[:3] >= 1
    acts = capture_activations(model, ds, np.arange(3), mask)
    assert sorted(acts) == [0, 1, 2] and acts[0].shape == (mask.sum(), 32)
    with pytest.raises(ValueError, match="out of range"):
        capture_activations(model, ds, np.arange(3), mask, layers=[5])
    cfg = OmegaConf.create({"n_systems": 60, "heldout_fraction": 0.25, "max_steps_per_system": 16,
                            "targets": ["r", "inv_r", "F_x"], "mlp": {"enabled": True, "hidden": 16, "max_iter": 50}})
    rows = run_linear_probes(model, ds, cfg, seed=0)
    assert {(r["probe"], r["layer"], r["target"]) for r in rows} == {
        (p, l, t) for p in ("ridge", "mlp") for l in range(3) for t in ("r", "inv_r", "F_x")}
    assert all(np.isfinite(r["r2"]) and r["r2"] <= 1 for r in rows)


# ----------------------------------------------------------------------------------------- force head
def test_force_head_learns_on_labelled_steps_only(ds):
    from omegaconf import OmegaConf

    from gravprobe.probes.force_head import finetune_force_head

    partial = np.arange(FULL, N_SYS)[:3]
    qmask = (ds.bodies[partial] >= 1) & ~ds.labelled[partial]
    cfg = OmegaConf.create({"protocol": "magnitude", "lr": 3e-3, "steps": 30, "batch_size": 4, "warmup": 3})
    # gradients reach head and trunk: it fits (memorises) four fully labelled sequences
    res = finetune_force_head(tiny_model(1), ds, np.arange(4), partial, qmask, cfg, seed=0)
    assert res.pred_magnitude.shape == (qmask.sum(),) and (res.pred_magnitude > 0).all()
    assert len(res.losses) == 30 and np.mean(res.losses[-5:]) < 0.5 * np.mean(res.losses[:3])

    # labels are the only supervision: scrambling unlabelled forces changes nothing
    ds2 = types.SimpleNamespace(**vars(ds))
    ds2.forces = np.where(ds.labelled[..., None], ds.forces, 123.0).astype(ds.forces.dtype)
    short = OmegaConf.merge(cfg, {"steps": 3})
    train_sys = np.arange(FULL - 4, FULL + 4)  # fully and partially labelled sequences
    a = finetune_force_head(tiny_model(1), ds, train_sys, partial[:1], qmask[:1], short, seed=0)
    b = finetune_force_head(tiny_model(1), ds2, train_sys, partial[:1], qmask[:1], short, seed=0)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)
    np.testing.assert_allclose(a.pred_magnitude, b.pred_magnitude, rtol=1e-5)
    model = tiny_model(1)
    with pytest.raises(ValueError, match="protocol"):
        finetune_force_head(model, ds, train_sys, partial, qmask, OmegaConf.create({"protocol": "torque"}))


# ------------------------------------------------------------------------------------ the probe stage
def _compose(overrides):
    from hydra import compose, initialize_config_module

    from gravprobe.cli import _register_resolvers

    _register_resolvers()
    with initialize_config_module(config_module="gravprobe.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


SMALL = ["probe.linear.n_systems=40", "probe.linear.max_steps_per_system=8", "probe.linear.mlp.enabled=false",
         "probe.head.steps=20", "probe.head.batch_size=4", "probe.head.warmup=2", "probe.head.max_train_systems=60",
         "probe.selection.n_keep=400", "probe.selection.galaxy_size=150", "probe.selection.seeds=[0,1]",
         "sr.options.population_size=200", "sr.options.generations=10", "sr.options.n_threads=2",
         "force_data.n_systems=200", "force_data.seq_len=65", "force_data.shard_size=100",
         "force_data.labelling.full_systems=150"]


def test_probe_stage_end_to_end(tmp_path, monkeypatch):
    """`main` on a tiny random checkpoint and a generated force dataset: results.json, CSVs and PNGs."""
    from gravprobe.probes import pipeline

    monkeypatch.setenv("GRAVPROBE_HOME", str(tmp_path / "home"))
    cfg = _compose(SMALL + ["workers=1"])
    model = tiny_model(2)
    monkeypatch.setattr(pipeline, "load_model", lambda cfg, run_dir, device: (model, {}, Path("tiny.pt")))
    run_dir = tmp_path / "run"
    summary = pipeline.main(cfg, run_dir)
    assert summary["n_galaxies"] == 2
    res = json.loads((run_dir / "results.json").read_text())["probes"]
    assert set(res["linear"]) == set(TARGETS) and set(res["linear"]["r"]) == {"0", "1", "2"}
    for section in (res["galaxies"], res["oracle"]["galaxies"], res["truth"]["galaxies"]):
        assert [g["seed"] for g in section] == [0, 1]
        for g in section:
            assert {"seed", "expression", "newtonian", "reasons", "exponents", "r2_newton"} <= set(g)
            assert isinstance(g["newtonian"], bool) and set(g["exponents"]) == {"r", "m1", "m2"}
    assert all(g["newtonian"] for g in res["truth"]["galaxies"])     # the control works even at this size
    for name in ("probes_linear.csv", "probes_linear.png", "force_pred_vs_true.png", "equations_head.png",
                 "equations_oracle.png", "equations_head_galaxy0.csv", "equations_oracle_galaxy1.csv",
                 "force_head_loss.csv"):
        assert (run_dir / name).exists(), name
    # the dataset went where the pipeline convention says
    assert list((tmp_path / "home" / "data").glob("two_body_force-*-s0"))


def test_missing_checkpoint_message(tmp_path):
    from gravprobe.probes.pipeline import load_model

    cfg = _compose(SMALL)
    with pytest.raises(FileNotFoundError, match="checkpoint=PATH"):
        load_model(cfg, tmp_path, "cpu")


def test_run_probes_without_head_still_reports_controls(ds, tmp_path):
    cfg = _compose(SMALL + ["probe.head.enabled=false", "probe.linear.enabled=false", "probe.oracle.truth_control=false"])
    out = run_probes(tiny_model(), ds, cfg, tmp_path)
    assert out["galaxies"] == [] and len(out["oracle"]["galaxies"]) == 2 and "truth" not in out


def test_force_head_vector_protocol(ds):
    from omegaconf import OmegaConf

    from gravprobe.probes.force_head import finetune_force_head

    partial = np.arange(FULL, FULL + 2)
    qmask = (ds.bodies[partial] >= 1) & ~ds.labelled[partial]
    cfg = OmegaConf.create({"protocol": "vector", "lr": 2e-4, "steps": 3, "batch_size": 2, "warmup": 1})
    res = finetune_force_head(tiny_model(3), ds, np.arange(FULL - 2, FULL + 2), partial, qmask, cfg, seed=0)
    assert res.protocol == "vector" and res.pred_vector.shape == (qmask.sum(), 2)
    np.testing.assert_allclose(res.pred_magnitude, np.hypot(*res.pred_vector.T))
