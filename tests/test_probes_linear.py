"""Probe statistics (issue 10): grouped-CV ridge, held-out R², "not decodable", log targets, the untrained
control's report, the probe modules' imports, the input rule shared with pretraining (issue 12), and the
seeded force head (same predictions in two processes)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gravprobe.probes.linear import (
    DEFAULT_ALPHAS,
    TARGETS,
    _ridge_path,
    fit_probes,
    linear_report,
    probe_targets,
    ridge_alpha_grid,
    ridge_probe,
)


def _sequences(n_seq=60, rows=20, c=16, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_seq), rows)
    return rng, rng.normal(size=(n_seq * rows, c)), groups


# ---------------------------------------------------------------------------------------------- ridge
def test_ridge_path_is_sklearn_ridge():
    from sklearn.linear_model import Ridge

    rng, X, _ = _sequences()
    Y = X[:, :3] @ rng.normal(size=(3, 2)) + 5.0 + rng.normal(size=(len(X), 2))
    alphas = np.array([1e-3, 1.0, 300.0])
    path = _ridge_path(X[:500], Y[:500], X[500:], alphas)
    assert path.shape == (3, len(X) - 500, 2)
    for a, p in zip(alphas, path):
        np.testing.assert_allclose(p, Ridge(alpha=a).fit(X[:500], Y[:500]).predict(X[500:]), rtol=1e-9, atol=1e-9)


def test_planted_target_decoded_and_noise_not_decodable():
    rng, X, groups = _sequences()
    planted = X @ rng.normal(size=X.shape[1]) + 0.05 * rng.normal(size=len(X))
    noise = rng.normal(size=(len(X), 5))                       # five independent pure-noise targets
    Y = np.column_stack([planted, noise])
    names = ["planted"] + [f"noise{i}" for i in range(5)]
    rows = fit_probes({3: X}, Y, groups < 45, names, groups=groups)
    by = {r["target"]: r for r in rows}
    assert by["planted"]["r2"] > 0.95 and by["planted"]["decodable"]
    for i in range(5):
        r = by[f"noise{i}"]
        assert r["r2"] <= 0.05 and r["decodable"] is False, r
    assert all(r["layer"] == 3 and r["probe"] == "ridge" and r["alpha"] in DEFAULT_ALPHAS for r in rows)


def test_grouped_cv_does_not_reward_memorising_a_sequence():
    """Rows of one sequence share an identity vector and a per-sequence target: a row-wise CV sees the same
    sequences in its folds and picks a small penalty that fails on new sequences; the grouped CV does not."""
    rng = np.random.default_rng(0)
    n_seq, rows, c = 80, 10, 96
    groups = np.repeat(np.arange(n_seq), rows)
    X = rng.normal(size=(n_seq, c))[groups] + 0.1 * rng.normal(size=(n_seq * rows, c))
    y = rng.normal(size=n_seq)[groups][:, None]
    is_train = groups < 60
    grouped = ridge_probe(X, y, is_train, groups)
    rowwise = ridge_probe(X, y, is_train, np.arange(len(X)))
    assert grouped["alpha_edge"][0] == "upper" and grouped["r2"][0] <= 0.05
    assert rowwise["alpha"][0] < 1e3 and rowwise["r2"][0] < grouped["r2"][0] - 0.3


def test_alpha_grid_and_edge_flag(caplog):
    g = ridge_alpha_grid({"min": 1e-2, "max": 1e2, "num": 5})
    np.testing.assert_allclose(g, [1e-2, 1e-1, 1, 10, 100])
    np.testing.assert_allclose(ridge_alpha_grid([10, 1]), [1, 10])
    assert ridge_alpha_grid(None)[0] == 1e-4 and ridge_alpha_grid(None)[-1] == 1e8
    with pytest.raises(ValueError, match="unknown key"):
        ridge_alpha_grid({"lo": 1})
    with pytest.raises(ValueError, match="0 < min < max"):
        ridge_alpha_grid({"min": 10, "max": 1})
    with pytest.raises(ValueError, match="positive"):
        ridge_alpha_grid([0, 1])
    # a narrow grid that cannot reach the right penalty: the choice is at its edge and says so
    rng, X, groups = _sequences()
    y = X @ rng.normal(size=X.shape[1])
    res = ridge_probe(X, y[:, None], groups < 45, groups, alphas=np.array([1e3, 1e4]))
    assert res["alpha_edge"][0] == "lower" and res["alpha"][0] == 1e3
    res = ridge_probe(X, rng.normal(size=(len(X), 1)), groups < 45, groups, alphas=np.array([1e-4, 1e-3]))
    assert res["alpha_edge"][0] == "upper"


def test_probes_need_train_and_heldout_rows():
    _, X, groups = _sequences()
    with pytest.raises(ValueError, match="heldout_fraction"):
        fit_probes({0: X}, X[:, :1], np.ones(len(X), bool), ["t"], groups=groups)
    with pytest.raises(ValueError, match="at least 2 training sequences"):
        ridge_probe(X, X[:, :1], groups < 1, groups)


def test_log_targets():
    state = np.array([[3.0, 4.0, 0.0, 2.0, 1e-3, 1.0], [1.0, 0.0, 0.0, 6.0, 2e-6, 0.5]])
    r = np.hypot(state[:, 0], state[:, 1])
    force = -(4 * np.pi**2) * (state[:, 4] * state[:, 5] / r**3)[:, None] * state[:, :2]
    t = dict(zip(TARGETS, probe_targets(state, force).T))
    np.testing.assert_allclose(t["log_r"], np.log(r))
    np.testing.assert_allclose(t["log_m1"], np.log(state[:, 4]))
    np.testing.assert_allclose(t["log_m2"], np.log(state[:, 5]))
    np.testing.assert_allclose(t["log_F_mag"], np.log(4 * np.pi**2 * state[:, 4] * state[:, 5] / r**2))


def test_linear_report_untrained_control_and_not_decodable():
    rows = [{"probe": "ridge", "layer": l, "target": t, "r2": v, "decodable": v >= 0.05, "alpha": 1.0,
             "alpha_edge": "upper" if t == "noise" else ""}
            for t, vals in {"F": [0.2, 0.9, 0.95], "noise": [-0.3, -0.01, 0.02]}.items() for l, v in enumerate(vals)]
    unt = [dict(r, r2=r["r2"] - 0.5 if r["target"] == "F" else r["r2"]) for r in rows]
    unt[1]["r2"] = 0.93                                              # untrained F at layer 1 is almost as good
    rep = linear_report(rows, unt, {"untrained_margin": 0.05, "ridge_alphas": [1, 10]})
    f, n = rep["targets"]["F"], rep["targets"]["noise"]
    assert f["best_layer"] == "2" and f["r2"] == 0.95 and f["decodable"]
    assert f["untrained_best_r2"] == 0.93 and f["beats_untrained"] is False        # 0.95 < 0.93 + 0.05
    assert f["layers"]["2"]["beats_untrained"] is True and f["layers"]["1"]["beats_untrained"] is False
    assert not n["decodable"] and rep["not_decodable"] == ["noise"]
    assert rep["alpha_at_edge"] == ["noise@0:upper", "noise@1:upper", "noise@2:upper"]
    assert rep["alphas"] == [1.0, 10.0] and rep["cv"].startswith("GroupKFold")
    assert linear_report(rows, None, {})["targets"]["F"]["beats_untrained"] is None


def test_probe_modules_import_neither_torch_nor_matplotlib_nor_pysr():
    """Issue 12: the probe stage writes numbers (the report draws); torch is imported by the functions that
    run a model, PySR (Julia) only when it is the chosen engine."""
    code = ("import sys\n"
            "import gravprobe.probes.pipeline, gravprobe.probes.linear, gravprobe.probes.readouts\n"
            "import gravprobe.probes.force_head, gravprobe.probes.data, gravprobe.probes.verdict\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'pysr', 'juliacall') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_model_inputs_are_the_pretraining_inputs():
    """Issue 12: one function turns dataset rows into model input for pretraining and the probes. A step
    is a coordinate when its token ids are bins (< n_bins); in generated data that is exactly bodies >= 0,
    and a dataset stored without `bodies` (data.arrays) is probed the same way."""
    from gravprobe.orbits import DatasetSpec, generate_arrays
    from gravprobe.pretrain.data import orbit_inputs
    from gravprobe.pretrain.model import GPT, GPTConfig
    from gravprobe.probes.linear import model_inputs, orbit_n_bins

    spec = DatasetSpec.from_config({"name": "two_body_force", "planets": [1, 1], "n_systems": 6, "seq_len": 33,
                                    "labelling": {"full_systems": 4, "partial_steps": 2}, "shard_size": 6})
    arrays = generate_arrays(spec, seed=0)
    ds = types.SimpleNamespace(**arrays)
    systems = np.array([4, 0, 2])
    for mode in ("discrete", "continuous"):
        model = GPT(GPTConfig(n_layers=1, n_heads=1, d_model=8, block_size=33, orbit_vocab=spec.n_bins + 3,
                              orbit_mode=mode, attention={"name": "softmax", "params": {}, "backend": "torch"}))
        x = model_inputs(model, ds, systems).numpy()
        np.testing.assert_array_equal(x, orbit_inputs(arrays["tokens"], arrays["positions"], systems, 33,
                                                      spec.n_bins, mode))
        no_bodies = types.SimpleNamespace(tokens=arrays["tokens"], positions=arrays["positions"])
        np.testing.assert_array_equal(model_inputs(model, no_bodies, systems, 20).numpy(), x[:, :20])
        if mode == "continuous":
            np.testing.assert_array_equal(np.isnan(x).all(-1), arrays["bodies"][systems] < 0)
            np.testing.assert_array_equal(x[~np.isnan(x)], arrays["positions"][systems][~np.isnan(x)])
        else:
            assert x.dtype == np.int64 and (x == arrays["tokens"][systems]).all()
    # a discrete model cannot read data tokenised with other bins: refused, naming the fix
    other = types.SimpleNamespace(**arrays, spec=types.SimpleNamespace(n_bins=128))
    with pytest.raises(ValueError, match=r"n_bins=128.*force_data.n_bins=7000"):
        orbit_n_bins(GPT(GPTConfig(n_layers=1, n_heads=1, d_model=8, orbit_vocab=7003)), other)


# ----------------------------------------------------------------------------------- seeded force head
def test_head_does_not_depend_on_earlier_draws():
    from gravprobe.pretrain.model import GPT, GPTConfig
    from gravprobe.probes.force_head import build_head

    model = GPT(GPTConfig(n_layers=1, n_heads=1, d_model=8, orbit_vocab=10))
    a = build_head(model, "magnitude", seed=3)
    torch.randn(1000)
    state = torch.get_rng_state()
    b = build_head(model, "magnitude", seed=3)
    assert torch.equal(state, torch.get_rng_state())                  # building the head draws nothing global
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, build_head(model, "magnitude", seed=4).weight)


_FINETUNE = textwrap.dedent("""
    import sys, types, numpy as np, torch
    from omegaconf import OmegaConf
    from gravprobe.pretrain.model import GPT, GPTConfig
    from gravprobe.probes.force_head import finetune_force_head
    ckpt, data, out, burn = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ds = types.SimpleNamespace(**dict(np.load(data)))
    model = GPT(GPTConfig(n_layers=1, n_heads=2, d_model=16, block_size=33, orbit_vocab=7003, dropout=0.1,
                          attention={"name": "softmax", "params": {}, "backend": "torch"}))
    model.load_state_dict(torch.load(ckpt))
    torch.rand(burn)                     # unrelated draws before the call must not change anything
    np.random.rand(burn)
    part = np.arange(8, 12)
    qmask = (ds.bodies[part] >= 1) & ~ds.labelled[part]
    cfg = OmegaConf.create({"protocol": "magnitude", "lr": 1e-3, "steps": 6, "batch_size": 3, "warmup": 2})
    # the frozen-model probes first (the head fine-tunes the trunk), as the probe stage does
    from gravprobe.probes.linear import run_linear_probes
    from gravprobe.probes.readouts import run_readouts
    grid = {"min": 1e-3, "max": 1e6, "num": 10}
    lin = run_linear_probes(model, ds, {"n_systems": 12, "max_steps_per_system": 4, "cv_folds": 2,
                                        "ridge_alphas": grid, "mlp": {"enabled": True, "hidden": 8, "max_iter": 20}},
                            seed=7)
    rd = run_readouts(model, ds, {"n_systems": 12, "cv_folds": 2, "ridge_alphas": grid,
                                  "attention": {"windows": [1, 2], "n_systems": 4}}, seed=7)
    rd.pop("seconds")
    res = finetune_force_head(model, ds, np.arange(12), part, qmask, cfg, seed=7)
    np.save(out, np.concatenate([res.pred_magnitude, np.asarray(res.losses)]))
    import json
    open(out + ".json", "w").write(json.dumps({"linear": lin, "readouts": rd}, sort_keys=True))
""")


def test_finetune_identical_in_two_processes(tmp_path):
    """Same checkpoint, data and config in two fresh interpreters (one after unrelated random draws):
    byte-identical force-head predictions and losses (dropout on, so the global RNG matters too), and
    identical linear-probe and readout results."""
    from gravprobe.orbits import DatasetSpec, generate_arrays
    from gravprobe.pretrain.model import GPT, GPTConfig

    spec = DatasetSpec.from_config({"name": "two_body_force", "planets": [1, 1], "n_systems": 12, "seq_len": 33,
                                    "labelling": {"full_systems": 8, "partial_steps": 2}, "shard_size": 12})
    arrays = generate_arrays(spec, seed=0)
    np.savez(tmp_path / "data.npz", **{k: arrays[k] for k in ("tokens", "states", "forces", "labelled", "bodies")})
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=1, n_heads=2, d_model=16, block_size=33, orbit_vocab=7003, dropout=0.1,
                          attention={"name": "softmax", "params": {}, "backend": "torch"}))
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "finetune.py").write_text(_FINETUNE)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "finetune.py"), str(tmp_path / "tiny.pt"),
                               str(tmp_path / "data.npz"), str(tmp_path / f"pred{i}.npy"), str(burn)], env=env)
             for i, burn in enumerate((0, 17))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    a, b = (tmp_path / "pred0.npy").read_bytes(), (tmp_path / "pred1.npy").read_bytes()
    assert a == b
    ja, jb = (tmp_path / "pred0.npy.json").read_text(), (tmp_path / "pred1.npy.json").read_text()
    assert ja == jb and '"newton"' in ja                     # linear probes and readouts: same numbers too
    pred = np.load(tmp_path / "pred0.npy")
    assert np.isfinite(pred).all() and len(pred) > 6


def test_run_linear_probes_same_numbers_for_same_seed():
    from gravprobe.orbits import DatasetSpec, generate_arrays
    from gravprobe.pretrain.model import GPT, GPTConfig
    from gravprobe.probes.linear import run_linear_probes
    from omegaconf import OmegaConf

    spec = DatasetSpec.from_config({"name": "two_body_force", "planets": [1, 1], "n_systems": 40, "seq_len": 33,
                                    "labelling": {"full_systems": 30, "partial_steps": 2}, "shard_size": 40})
    ds = types.SimpleNamespace(**generate_arrays(spec, seed=0))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=1, n_heads=2, d_model=16, block_size=33, orbit_vocab=7003,
                          attention={"name": "softmax", "params": {}, "backend": "torch"}))
    cfg = OmegaConf.create({"n_systems": 40, "heldout_fraction": 0.25, "max_steps_per_system": 8,
                            "targets": ["log_F_mag", "log_r", "log_m1", "log_m2", "e"], "cv_folds": 3,
                            "ridge_alphas": {"min": 1e-3, "max": 1e6, "num": 10},
                            "mlp": {"enabled": True, "hidden": 8, "max_iter": 20}})
    a = run_linear_probes(model, ds, cfg, seed=1)
    b = run_linear_probes(model, ds, cfg, seed=1)
    assert a == b
    assert {(r["probe"], r["layer"]) for r in a} == {(p, l) for p in ("ridge", "mlp") for l in (0, 1)}
    assert all(isinstance(r["decodable"], bool) for r in a)


def test_capture_stops_after_the_last_step_and_respects_the_context():
    """Cutting the input after a batch's last selected step gives the full-input activations (causal), and a
    learned-position model shorter than the sequences is probed inside its context."""
    from gravprobe.orbits import DatasetSpec, generate_arrays
    from gravprobe.pretrain.model import GPT, GPTConfig
    from gravprobe.probes.linear import capture_activations, model_inputs, run_linear_probes
    from omegaconf import OmegaConf

    spec = DatasetSpec.from_config({"name": "two_body_force", "planets": [1, 1], "n_systems": 30, "seq_len": 33,
                                    "labelling": {"full_systems": 20, "partial_steps": 2}, "shard_size": 30})
    ds = types.SimpleNamespace(**generate_arrays(spec, seed=0))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, n_heads=2, d_model=16, block_size=20, orbit_vocab=7003, position="learned",
                          attention={"name": "softmax", "params": {}, "backend": "torch"}))
    systems = np.arange(4)
    mask = np.zeros((4, 33), bool)
    mask[:, [3, 7]] = True
    mask[2, 11] = True
    acts = capture_activations(model, ds, systems, mask, batch_size=2)
    with torch.no_grad():
        hs = model.hidden_states(model_inputs(model, ds, systems)[:, :20])
    for l in (0, 1, 2):
        np.testing.assert_allclose(acts[l], hs[l][torch.from_numpy(mask[:, :20])].numpy(), rtol=1e-5, atol=1e-6)
    cfg = OmegaConf.create({"n_systems": 30, "heldout_fraction": 0.3, "max_steps_per_system": None, "cv_folds": 2,
                            "targets": ["log_r"], "ridge_alphas": [1e-2, 1, 100], "mlp": {"enabled": False}})
    rows = run_linear_probes(model, ds, cfg, seed=0)                 # 33 tokens > block_size 20: no error
    assert len(rows) == 3 and all(np.isfinite(r["r2"]) for r in rows)


def test_probe_settings_default_from_the_yaml_only():
    """Issue 12: the probe functions take the typed sections; a partial mapping (a notebook's dict) is filled
    from conf/probe/default.yaml, and the modules restate no default with ``cfg.get(key, default)``."""
    import inspect
    import re

    from gravprobe.probes import force_head, linear, readouts

    from gravprobe.config import HeadConfig, LinearProbeConfig, ReadoutsConfig, group_defaults

    yml = group_defaults("probe")
    lin = linear.probe_part("linear", {"n_systems": 12, "mlp": {"hidden": 8}})
    assert isinstance(lin, LinearProbeConfig) and lin.n_systems == 12 and lin.mlp.hidden == 8
    assert lin.mlp.max_iter == yml["linear"]["mlp"]["max_iter"] and lin.cv_folds == yml["linear"]["cv_folds"]
    assert linear.probe_part("linear", lin) is lin
    assert isinstance(linear.probe_part("head", None), HeadConfig)
    assert isinstance(linear.probe_part("readouts", {}), ReadoutsConfig)
    assert linear.probe_part("readouts.attention", {"n_systems": 2}).windows == yml["readouts"]["attention"]["windows"]
    grid = yml["linear"]["ridge_alphas"]
    np.testing.assert_allclose(ridge_alpha_grid({"num": 3}), np.logspace(np.log10(grid["min"]), np.log10(grid["max"]), 3))
    assert DEFAULT_ALPHAS == tuple(ridge_alpha_grid(None)) and len(DEFAULT_ALPHAS) == grid["num"]
    assert readouts.DEFAULT_TARGETS == tuple(yml["readouts"]["targets"])
    for mod in (linear, readouts, force_head):
        assert not re.search(r"\b(cfg|spec|mlp|att)\.get\(", inspect.getsource(mod)), mod.__name__
