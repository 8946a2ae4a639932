"""The sharded dataset: layout, labelling, purity (1 vs 2 workers), resume after interruption,
corruption detection, the memory-mapped reader and the `gravprobe generate` stage."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gravprobe.orbits import (
    ARRAYS,
    ConcatArray,
    DatasetError,
    DatasetSpec,
    dataset_dir,
    dataset_path,
    ensure_dataset,
    generate_arrays,
    load_dataset,
)

SMALL = dict(n_systems=50, seq_len=120, shard_size=16)


def _bytes(path: Path) -> dict:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.glob("shard-*/*.npy"))}


def test_sequence_layout():
    spec = DatasetSpec(**SMALL)
    a = generate_arrays(spec, seed=0)
    V = spec.n_bins
    tok, bodies, nb, dt = a["tokens"], a["bodies"], a["n_bodies"], a["dt"]
    assert tok.shape == (50, 120, 2) and tok.dtype == np.int16
    # position 0: the dt marker, in both channels
    assert np.array_equal(tok[:, 0, 0], np.where(dt == spec.dt_choices[0], V, V + 1))
    assert np.array_equal(tok[:, 0, 0], tok[:, 0, 1])
    for i in range(50):
        K = nb[i] - 1
        n = (120 - 1) // (K + 1)
        expect = np.full(120, -1)
        expect[1:1 + n * (K + 1)] = np.tile(np.r_[np.arange(1, K + 1), 0], n)
        assert np.array_equal(bodies[i], expect)
    pad = bodies == -1
    pad[:, 0] = False
    assert np.all(tok[pad] == V + 2) and np.all(tok[~pad & (bodies >= 0)] < V)
    assert np.array_equal(a["labelled"], bodies >= 1)
    # the tokens are the binned positions
    real = bodies >= 0
    assert np.array_equal(tok[real], spec.tokenizer.encode(a["positions"][real]))


def test_two_body_force_labelling():
    spec = DatasetSpec(name="two_body_force", n_systems=30, seq_len=50, shard_size=8, planets=(1, 1),
                       labelling={"full_systems": 20, "partial_steps": 2})
    a = generate_arrays(spec, seed=4)
    lab, bodies = a["labelled"], a["bodies"]
    assert np.all(a["n_bodies"] == 2)
    assert np.array_equal(lab[:20], bodies[:20] >= 1)
    assert np.all(lab[20:].sum(1) == 2) and np.all(bodies[20:][lab[20:]] >= 1)
    assert len({tuple(np.nonzero(r)[0]) for r in lab[20:]}) > 5  # seeded, but different per system
    b = generate_arrays(spec, seed=4)
    assert np.array_equal(lab, b["labelled"])


def test_generate_arrays_is_pure_in_system_index():
    spec = DatasetSpec(**SMALL)
    full = generate_arrays(spec, seed=3)
    part = generate_arrays(spec, seed=3, start=13, count=20)  # straddles shards 0, 1, 2
    for k in ARRAYS:
        assert np.array_equal(full[k][13:33], part[k]), k
    other = generate_arrays(spec, seed=4, start=0, count=5)
    assert not np.array_equal(full["tokens"][:5], other["tokens"])
    # a longer sequence continues the same systems
    longer = generate_arrays(spec.replace(seq_len=240), seed=3, start=0, count=8)
    assert np.array_equal(longer["n_bodies"], full["n_bodies"][:8])
    for i in range(8):
        n = (120 - 1) // int(full["n_bodies"][i]) * int(full["n_bodies"][i]) + 1
        assert np.array_equal(longer["positions"][i, :n], full["positions"][i, :n])


_ENGINE_CASES = {
    "pretrain": dict(n_systems=40, seq_len=1000, shard_size=16),  # 40k planet tokens: several chunks
    "partial_labels": dict(name="two_body_force", n_systems=30, seq_len=50, shard_size=8, planets=(1, 1),
                           labelling={"full_systems": 20, "partial_steps": 2}),
    "solar_system": dict(system="solar_system", n_systems=6, seq_len=300, shard_size=4, dt=0.486),
    "short_and_int32_tokens": dict(n_systems=30, seq_len=13, n_bins=40000, shard_size=16),
    # planet-only sequences around a fixed star (kepler_liu), the unlabelled protocol, a fixed star with
    # tokens and several planets, and the binary priors
    "fixed_star_planet_only": dict(n_systems=20, seq_len=101, shard_size=8, planets=(1, 1), star="fixed",
                                   star_token=False, labelling={"full_systems": 12, "partial_steps": 0},
                                   priors={"com_sigma": 0.0, "eccentricity": {"dist": "uniform", "low": 0.0,
                                                                              "high": 0.8}}),
    "fixed_star_with_tokens": dict(n_systems=12, seq_len=200, shard_size=8, planets=(1, 3), star="fixed"),
    "binary_priors": dict(n_systems=20, seq_len=121, shard_size=8, planets=(1, 1), n_bins=256,
                          coord_range=3.2, priors={"planet_mass": {"dist": "ratio_loguniform", "low": 0.02,
                                                                   "high": 1.0},
                                                   "star_mass": {"dist": "loguniform", "low": 0.5, "high": 2.0},
                                                   "semi_major_axis": {"dist": "period_uniform", "low": 1.0,
                                                                       "high": 2.0}}),
}


@pytest.mark.parametrize("case", sorted(_ENGINE_CASES))
def test_fused_engine_gives_the_numpy_bytes(case, monkeypatch):
    """The numba engine (orbits/fused.py) repeats the numpy path operation by operation: same bytes."""
    pytest.importorskip("numba")
    from gravprobe.orbits import fused

    spec = DatasetSpec(**_ENGINE_CASES[case])
    out = {}
    for engine in ("numpy", "numba"):
        monkeypatch.setenv("GRAVPROBE_ORBITS_ENGINE", engine)
        assert fused.kepler_engine() == engine
        out[engine] = generate_arrays(spec, seed=5)
    monkeypatch.setattr(fused, "CHUNK_TOKENS", 257)  # many chunks, and systems longer than one chunk
    out["small_chunks"] = generate_arrays(spec, seed=5)
    for k in ARRAYS:
        for other in ("numba", "small_chunks"):
            a, b = out["numpy"][k], out[other][k]
            assert a.dtype == b.dtype and a.shape == b.shape, (k, other)
            assert np.array_equal(a, b), (k, other, np.argwhere(a != b)[:3])


def test_fused_engine_near_parabolic_orbits(monkeypatch):
    """e > 0.99999 takes extra Newton iterations in both engines; states stay on the ellipse."""
    pytest.importorskip("numba")
    from gravprobe.orbits import G, build_sequences, elements_from_state, sample_systems

    spec = DatasetSpec(n_systems=4, seq_len=400, planets=(3, 3), shard_size=4)
    p = sample_systems(np.random.default_rng(1), 4, planets=(3, 3))
    p.e[:, 0] = [0.999991, 0.9999995, 0.99999999, 0.5]
    p.a[:, 0] = [0.5, 30.0, 2.0, 1.0]
    p.omega[1, 0], p.mean_anomaly[1, 0], p.dt_index[1] = 0.0, np.pi, 0  # starts at apoapsis, x ~ -60 AU
    res = {}
    for engine in ("numpy", "numba"):
        monkeypatch.setenv("GRAVPROBE_ORBITS_ENGINE", engine)
        res[engine] = build_sequences(spec, p)
    for k in ARRAYS:  # equal here; the polish uses libm's sin/cos against numpy's, which may differ by an ulp
        np.testing.assert_allclose(res["numba"][k].astype(float), res["numpy"][k].astype(float), rtol=1e-12,
                                   atol=0, err_msg=k)
    st, b = res["numba"]["states"].astype(float), res["numba"]["bodies"]
    first = b == 1
    el = elements_from_state(st[first][:, :2], st[first][:, 2:4], G * (st[first][:, 4] + st[first][:, 5]))
    e_true = np.repeat(p.e[:, 0], first.sum(1))
    assert np.all(np.abs(el.e - e_true) < 1e-4)
    assert np.all(res["numba"]["tokens"][1][b[1] == 1][:5, 0] == 0)  # beyond -50 AU: clipped to bin 0


def test_fused_engine_compiles_without_a_writable_cache(monkeypatch, caplog):
    """A read-only install with no writable home: numba cannot cache, the kernels compile per process."""
    numba_caching = pytest.importorskip("numba.core.caching")
    from gravprobe.orbits import fused

    monkeypatch.setattr(numba_caching.CacheImpl, "_locator_classes", [])
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setenv("GRAVPROBE_ORBITS_ENGINE", "numba")
    spec = DatasetSpec(n_systems=3, seq_len=40, shard_size=3)
    with caplog.at_level("INFO", logger="gravprobe.orbits.fused"):
        a = generate_arrays(spec, seed=0)
    assert "cannot cache" in caplog.text
    monkeypatch.setenv("GRAVPROBE_ORBITS_ENGINE", "numpy")
    b = generate_arrays(spec, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in ARRAYS)


def test_unknown_engine_is_an_error(monkeypatch):
    from gravprobe.orbits import fused

    monkeypatch.setenv("GRAVPROBE_ORBITS_ENGINE", "fortran")
    with pytest.raises(ValueError, match="GRAVPROBE_ORBITS_ENGINE='fortran'.*numba, numpy"):
        generate_arrays(DatasetSpec(**SMALL), seed=0, count=2)
    monkeypatch.setenv("GRAVPROBE_ORBITS_ENGINE", "numpy")
    assert fused.kepler_engine() == "numpy"

    # without numba: auto falls back to the numpy engine (same bytes); asking for numba is an error
    def no_numba():
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(fused, "_get_kernels", no_numba)
    monkeypatch.setenv("GRAVPROBE_ORBITS_ENGINE", "auto")
    assert fused.kepler_engine() == "numpy"
    monkeypatch.setenv("GRAVPROBE_ORBITS_ENGINE", "numba")
    with pytest.raises(ImportError, match="pip install numba"):
        fused.kepler_engine()


def test_same_bytes_for_one_and_two_workers_and_reload(tmp_path):
    spec = DatasetSpec(**SMALL)
    p1 = ensure_dataset(spec, tmp_path / "w1", seed=7, workers=1, progress=False)
    p2 = ensure_dataset(spec, tmp_path / "w2", seed=7, workers=2, progress=False)
    b1, b2 = _bytes(p1), _bytes(p2)
    assert len(b1) == len(ARRAYS) * spec.n_shards and b1 == b2
    m1, m2 = (json.loads((p / "manifest.json").read_text()) for p in (p1, p2))
    assert m1["shards"] == m2["shards"] and m1["complete"] and m1["seed"] == 7
    assert m1["spec"] == spec.to_dict() and m1["spec_hash"] == spec.spec_hash() and m1["code_version"]
    ds = load_dataset(p1, verify=True)
    mem = generate_arrays(spec, seed=7)
    assert len(ds) == 50 and ds.tokens.shape == (50, 120, 2) and ds.states.shape == (50, 120, 6)
    for k in ARRAYS:
        assert np.array_equal(np.asarray(getattr(ds, k)), mem[k]), k
    # lazy concatenation over shards: int, negative, slice across shards, fancy and boolean indexing
    t = ds.tokens
    assert isinstance(t, ConcatArray) and len(t) == 50
    assert np.array_equal(t[17], mem["tokens"][17]) and np.array_equal(t[-1], mem["tokens"][-1])
    assert np.array_equal(t[10:40], mem["tokens"][10:40]) and np.array_equal(t[::7], mem["tokens"][::7])
    idx = np.array([49, 0, 16, 15, 33, 16])
    assert np.array_equal(t[idx], mem["tokens"][idx])
    # shards are mapped on demand, at most max_open at a time, and pickle as file names
    t.parts.max_open = 2
    assert np.array_equal(np.asarray(t), mem["tokens"]) and len(t.parts._open) <= 2
    import pickle

    blob = pickle.dumps(t)
    assert len(blob) < 5000 and np.array_equal(pickle.loads(blob)[idx], mem["tokens"][idx])
    assert np.array_equal(t[idx, 1:3, 0], mem["tokens"][idx, 1:3, 0])
    mask = mem["n_bodies"] > 5
    assert np.array_equal(ds.states[mask], mem["states"][mask])
    assert np.array_equal(ds.dt[3:20], mem["dt"][3:20]) and ds.meta["seed"] == 7
    with pytest.raises(IndexError):
        t[50]
    # reusing a complete dataset does not rewrite it
    mtime = (p1 / "shard-00000" / "tokens.npy").stat().st_mtime_ns
    ensure_dataset(spec, p1, seed=7, workers=1, progress=False)
    assert (p1 / "shard-00000" / "tokens.npy").stat().st_mtime_ns == mtime


def test_resume_after_damage_gives_identical_bytes(tmp_path):
    spec = DatasetSpec(**SMALL)
    ref = ensure_dataset(spec, tmp_path / "ref", seed=1, workers=1, progress=False)
    out = tmp_path / "damaged"
    shutil.copytree(ref, out)
    man = json.loads((out / "manifest.json").read_text())
    # an interrupted run: shard 3 not yet recorded (but half-written in a tmp folder), shard 1 truncated,
    # shard 2 silently corrupted (same size), manifest not complete
    man["shards"][3] = None
    man["complete"] = False
    (out / "manifest.json").write_text(json.dumps(man))
    shutil.rmtree(out / "shard-00003")
    (out / ".tmp-shard-00003-999").mkdir()
    (out / ".tmp-shard-00003-999" / "tokens.npy").write_bytes(b"partial")
    f = out / "shard-00001" / "states.npy"
    f.write_bytes(f.read_bytes()[:-100])
    g = out / "shard-00002" / "forces.npy"
    raw = bytearray(g.read_bytes())
    raw[-10] ^= 0xFF
    g.write_bytes(bytes(raw))
    keep = (out / "shard-00000" / "tokens.npy").stat().st_mtime_ns
    ensure_dataset(spec, out, seed=1, workers=2, progress=False)
    assert _bytes(out) == _bytes(ref)
    assert not list(out.glob(".tmp-*"))
    assert (out / "shard-00000" / "tokens.npy").stat().st_mtime_ns == keep  # verified shard kept
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_resume_after_killed_generation(tmp_path):
    spec = DatasetSpec(n_systems=600, seq_len=400, shard_size=30)
    out = tmp_path / "killed"
    code = ("import sys; from gravprobe.orbits import DatasetSpec, ensure_dataset; "
            f"ensure_dataset(DatasetSpec(**{spec.to_dict()!r}), {str(out)!r}, seed=2, workers=1, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    man = None
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            man = json.loads((out / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            man = None
        if man and sum(r is not None for r in man["shards"]) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    man = json.loads((out / "manifest.json").read_text())
    done = sum(r is not None for r in man["shards"])
    assert not man["complete"] and 2 <= done < spec.n_shards, done
    with pytest.raises(DatasetError, match="incomplete.*repair"):
        load_dataset(out)
    ensure_dataset(spec, out, seed=2, workers=2, progress=False)
    ref = ensure_dataset(spec, tmp_path / "ref", seed=2, workers=2, progress=False)
    assert _bytes(out) == _bytes(ref)


def test_load_dataset_detects_damage(tmp_path):
    spec = DatasetSpec(**SMALL)
    p = ensure_dataset(spec, tmp_path / "d", seed=0, workers=1, progress=False)
    f = p / "shard-00002" / "positions.npy"
    good = f.read_bytes()
    f.write_bytes(good[:-8])
    with pytest.raises(DatasetError, match=r"shard 2 .*positions\.npy.*truncated.*python -m gravprobe.orbits repair"):
        load_dataset(p)
    raw = bytearray(good)
    raw[-3] ^= 0x01
    f.write_bytes(bytes(raw))
    load_dataset(p)  # same size: only the checksum can tell
    with pytest.raises(DatasetError, match=r"shard 2 .*positions\.npy.*sha256"):
        load_dataset(p, verify=True)
    # the repair command fixes it
    subprocess.run([sys.executable, "-m", "gravprobe.orbits", "repair", str(p), "--workers", "1"], check=True,
                   capture_output=True)
    assert f.read_bytes() == good and load_dataset(p, verify=True).tokens.shape == (50, 120, 2)
    # a manifest whose spec was edited
    man = json.loads((p / "manifest.json").read_text())
    man["spec"]["n_bins"] = 100
    (p / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DatasetError, match="spec_hash"):
        load_dataset(p)
    with pytest.raises(DatasetError, match="no dataset"):
        load_dataset(tmp_path / "nothing")


def test_arrays_option_writes_a_subset(tmp_path):
    full_spec = DatasetSpec(**SMALL)
    spec = DatasetSpec(**SMALL, arrays=["bodies", "tokens"])
    assert spec.stored_arrays == ("tokens", "bodies", "dt", "n_bodies", "energy_error")
    # "all arrays" is spelled null: the same spec and hash as a spec written before the key existed
    assert DatasetSpec(**SMALL, arrays=list(ARRAYS)) == full_spec and "arrays" not in full_spec.to_dict()
    assert spec.spec_hash() != full_spec.spec_hash() and spec.to_dict()["arrays"][:2] == ["tokens", "bodies"]
    p = ensure_dataset(spec, tmp_path / "d", seed=0, workers=1, progress=False)
    assert sorted(f.name for f in (p / "shard-00000").iterdir()) == [
        "bodies.npy", "dt.npy", "energy_error.npy", "n_bodies.npy", "tokens.npy"]
    ds = load_dataset(p, verify=True)
    ref = generate_arrays(full_spec, seed=0)
    for name in spec.stored_arrays:
        assert np.array_equal(np.asarray(getattr(ds, name)), ref[name]), name
    with pytest.raises(AttributeError, match=r"holds only \['tokens', 'bodies'.*data.arrays=null"):
        ds.states
    assert getattr(ds, "positions", None) is None
    # damage is found and repaired in the subset too
    f = p / "shard-00001" / "tokens.npy"
    good = f.read_bytes()
    f.write_bytes(good[:-4])
    with pytest.raises(DatasetError, match=r"shard 1 .*tokens\.npy.*truncated"):
        load_dataset(p)
    ensure_dataset(spec, p, seed=0, workers=1, progress=False)
    assert f.read_bytes() == good
    for bad, msg in [(["states"], "must include tokens"), (["tokens", "velocity"], r"unknown arrays \['velocity'\]"),
                     ("tokens", "must be null or a list")]:
        with pytest.raises(ValueError, match=msg):
            DatasetSpec(**SMALL, arrays=bad)


def test_nbody_systems_above_tolerance_are_kept_or_redrawn(caplog):
    # a tolerance the capped sub-steps cannot meet for every system (stands in for close encounters)
    tol = 1e-7
    base = dict(name="nb", mode="nbody", n_systems=24, seq_len=60, shard_size=8, planets=(2, 4))
    nb = {"energy_tolerance": tol, "max_substeps": 4, "steps_per_orbit": 4}
    keep = DatasetSpec(**base, nbody=nb)
    red = DatasetSpec(**base, nbody={**nb, "above_tolerance": "redraw", "max_redraws": 3})
    with caplog.at_level("WARNING", logger="gravprobe.orbits.build"):
        a = generate_arrays(keep, seed=1)
    high = a["energy_error"] > tol
    assert high.sum() >= 3 and "above_tolerance=redraw" in caplog.text
    b = generate_arrays(red, seed=1)
    assert np.all(b["energy_error"] <= tol)
    # systems that met the tolerance are untouched; the others are fresh draws
    for k in ARRAYS:
        assert np.array_equal(a[k][~high], b[k][~high]), k
    assert not np.array_equal(a["tokens"][high], b["tokens"][high])
    # still a pure function of (spec, seed, system index)
    part = generate_arrays(red, seed=1, start=5, count=9)
    for k in ARRAYS:
        assert np.array_equal(b[k][5:14], part[k]), k
    # the defaults (keep, 8) are left out of the spec dict: hashes from before these keys still match
    assert "above_tolerance" not in keep.to_dict()["nbody"] and red.to_dict()["nbody"]["above_tolerance"] == "redraw"
    assert DatasetSpec(**base, nbody={**nb, "above_tolerance": "keep", "max_redraws": 8}) == keep
    with pytest.raises(ValueError, match="above_tolerance='drop': choose keep"):
        DatasetSpec(**base, nbody={**nb, "above_tolerance": "drop"})


def test_ensure_dataset_refuses_other_spec(tmp_path):
    spec = DatasetSpec(**SMALL)
    p = ensure_dataset(spec, tmp_path / "d", seed=0, workers=1, progress=False)
    with pytest.raises(DatasetError, match="n_systems"):
        ensure_dataset(spec.replace(n_systems=60), p, seed=0, workers=1)
    with pytest.raises(DatasetError, match="seed"):
        ensure_dataset(spec, p, seed=1, workers=1)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="no manifest"):
        ensure_dataset(spec, tmp_path / "junk", seed=0)


def test_dataset_dir_convention(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAVPROBE_HOME", str(tmp_path))
    spec = DatasetSpec(**SMALL)
    d = dataset_dir(spec, 5)
    assert d == tmp_path.resolve() / "data" / f"pretrain-{spec.spec_hash()[:8]}-s5"
    assert dataset_dir(spec.replace(seq_len=121), 5) != d
    # the one rule: an explicit root (the config's home) wins over the environment, out= over both
    assert dataset_path(spec, 5) == d
    assert dataset_path(spec, 5, root=tmp_path / "other") == (tmp_path / "other").resolve() / d.relative_to(tmp_path.resolve())
    assert dataset_path(spec, 5, root=tmp_path / "other", out=tmp_path / "mine") == (tmp_path / "mine").resolve()


def test_old_module_path_still_imports():
    """`gravprobe.orbits.dataset` was split into spec / build / store; old imports keep working."""
    from gravprobe.orbits import build, spec, store
    from gravprobe.orbits.dataset import DatasetSpec as OldSpec
    from gravprobe.orbits.dataset import _layout, ensure_dataset as old_ensure

    assert OldSpec is spec.DatasetSpec is DatasetSpec and old_ensure is store.ensure_dataset
    assert _layout is build._layout
    import gravprobe.orbits.dataset as old

    with pytest.raises(AttributeError, match="re-exports"):
        old.no_such_name


def test_presets_compose_and_validate():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="gravprobe.conf", version_base="1.3"):
        specs = {name: DatasetSpec.from_config(compose("config", overrides=[f"data={name}"]).data)
                 for name in ("pretrain", "two_body_force", "solar_system", "nbody")}
    assert specs["pretrain"].seq_len == 1000 and specs["pretrain"].n_bins == 7000
    assert specs["pretrain"].planets == (1, 10) and specs["pretrain"].coord_range == 50.0
    assert specs["pretrain"].spec_hash() == DatasetSpec(name="pretrain", n_systems=specs["pretrain"].n_systems).spec_hash()
    f = specs["two_body_force"]
    assert f.n_systems == 10000 and f.planets == (1, 1) and f.labelling == {"full_systems": 9000, "partial_steps": 2}
    assert specs["solar_system"].system == "solar_system" and specs["solar_system"].dt == 0.486
    assert specs["nbody"].mode == "nbody" and specs["nbody"].nbody["above_tolerance"] == "redraw"
    s = generate_arrays(specs["solar_system"].replace(n_systems=2, shard_size=2, seq_len=60), seed=0)
    assert np.all(s["n_bodies"] == 9) and np.all(s["tokens"][:, 0, 0] == 7001)
    np.testing.assert_allclose(np.unique(s["states"][..., 4][s["bodies"] >= 1]),
                               np.unique(np.float32([1.652e-7, 2.447e-6, 3.003e-6, 3.213e-7, 9.544e-4, 2.857e-4,
                                                     4.354e-5, 5.165e-5])))


def test_generate_cli_end_to_end(tmp_path):
    env = {**os.environ, "GRAVPROBE_HOME": str(tmp_path)}
    args = ["data=two_body_force", "data.n_systems=24", "data.seq_len=64", "data.shard_size=10",
            "data.labelling.full_systems=20", "workers=1", "seed=3"]
    r = subprocess.run([sys.executable, "-m", "gravprobe.cli", "generate", *args], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (folder,) = (tmp_path / "data").iterdir()  # the folder every later stage looks in
    assert folder.name.startswith("two_body_force-") and folder.name.endswith("-s3")
    ds = load_dataset(folder, verify=True)
    assert ds.tokens.shape == (24, 64, 2) and ds.meta["seed"] == 3 and ds.meta["n_shards"] == 3
    assert folder == dataset_path(ds.spec, 3, root=tmp_path)
    assert np.all(np.asarray(ds.labelled[20:]).sum(1) == 2)
    (res,) = tmp_path.glob("runs/*/*/results.json")
    summary = json.loads(res.read_text())["generate"]
    assert summary["n_systems"] == 24 and summary["path"] == str(folder.resolve())
    assert "find it by themselves" in summary["later_stages"] and "seed=3" in summary["later_stages"]
    assert str(folder) in r.stdout + r.stderr  # the folder is logged
    # another seed (or spec) gets its own folder instead of a clash
    r = subprocess.run([sys.executable, "-m", "gravprobe.cli", "generate", *args[:-1], "seed=4"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name[-3:] for p in (tmp_path / "data").iterdir()) == ["-s3", "-s4"]
    # out= works, and the stage never imports torch
    code = ("import sys; from gravprobe.cli import main; "
            f"main(['generate', 'data=pretrain', 'data.n_systems=5', 'data.seq_len=30', 'out={tmp_path / 'o'}', "
            "'data.arrays=[tokens,bodies]']); "
            "assert 'torch' not in sys.modules, 'generate imported torch'")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_dataset(tmp_path / "o").tokens.shape == (5, 30, 2)
    assert f"out={(tmp_path / 'o').resolve()}" in r.stdout + r.stderr  # the override later stages need
    res = max(tmp_path.glob("runs/*/*/results.json"), key=lambda f: f.stat().st_mtime)
    summary = json.loads(res.read_text())["generate"]
    assert summary["arrays"] == ["tokens", "bodies", "dt", "n_bodies", "energy_error"]
    assert "labelled_steps" not in summary and summary["bytes"] == sum(
        f.stat().st_size for f in (tmp_path / "o").rglob("*.npy"))
