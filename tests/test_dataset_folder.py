"""One folder rule for datasets (issue 12): `generate` writes where `pretrain`, `probe` and `run` look
(`dataset_path`: ${home}/data/<name>-<hash8>-s<seed>), `out=` / `force_out=` override it in every stage,
and the config's `home` and $GRAVPROBE_HOME cannot disagree. The README's ladder (generate, then the later
stages) must not generate anything twice."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from gravprobe.common import output_root
from gravprobe.orbits import config_dataset_path, dataset_path, load_dataset, store

# the smoke experiment's datasets, smaller
TINY = ["experiment=smoke", "data.n_systems=32", "data.seq_len=65", "data.shard_size=16",
        "force_data.n_systems=40", "force_data.seq_len=65", "force_data.shard_size=16",
        "force_data.labelling.full_systems=24", "workers=1"]


def make_cfg(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="gravprobe.conf"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("GRAVPROBE_HOME", str(h))
    return h


@pytest.fixture
def writes(monkeypatch) -> list:
    """Every shard written in this process, as (dataset name, shard index)."""
    log: list = []
    real = store._write_shard

    def counted(spec_dict, seed, k, out):
        log.append((spec_dict["name"], k))
        return real(spec_dict, seed, k, out)

    monkeypatch.setattr(store, "_write_shard", counted)
    return log


def _snapshot(path: Path) -> dict:
    files = [path / "manifest.json", *sorted(path.glob("shard-*/*.npy"))]
    return {str(f.relative_to(path)): (f.stat().st_mtime_ns, f.stat().st_size) for f in files}


def _dist():
    from gravprobe.pretrain.train import _Dist

    return _Dist("cpu")


def test_the_ladder_generates_each_dataset_once(home, tmp_path, writes):
    """`generate` (rung 1), then the dataset steps of `run`, `pretrain` and `probe` with the same settings:
    the pretraining set is written once, by generate; the probing set once, by the first stage needing it."""
    from gravprobe.orbits.generate import main as generate
    from gravprobe.pipeline import ensure_datasets
    from gravprobe.pretrain.train import _ensure_orbits
    from gravprobe.probes.pipeline import load_force_data

    summary = generate(make_cfg("stage=generate", *TINY), tmp_path / "run_generate")
    data = Path(summary["path"])
    assert data.parent == home.resolve() / "data" and data.name.startswith("pretrain-") and data.name.endswith("-s0")
    assert writes == [("pretrain", 0), ("pretrain", 1)]
    before = _snapshot(data)

    datasets = ensure_datasets(make_cfg("stage=run", *TINY))  # `gravprobe run`'s generate step
    assert datasets["data"] == str(data)
    force = Path(datasets["force_data"])
    assert force.parent == data.parent and force.name.startswith("two_body_force-")
    assert writes[2:] == [("two_body_force", k) for k in range(3)]

    spec, path, ds, _ = _ensure_orbits(make_cfg("stage=pretrain", *TINY), _dist())  # `gravprobe pretrain`
    assert path == data and len(ds) == 32 and spec == ds.spec
    fds = load_force_data(make_cfg("stage=probe", *TINY))  # `gravprobe probe`
    assert fds.path == force and len(fds) == 40

    assert len(writes) == 5  # nothing was generated twice
    assert _snapshot(data) == before  # and the pretraining set was not touched
    assert sorted(p.name for p in (home / "data").iterdir()) == sorted([data.name, force.name])


def test_out_overrides_the_folder_in_every_stage(home, tmp_path, writes):
    from gravprobe.orbits.generate import main as generate
    from gravprobe.pipeline import ensure_datasets
    from gravprobe.pretrain.train import _ensure_orbits
    from gravprobe.probes.pipeline import load_force_data

    mine, mine_force = tmp_path / "mine", tmp_path / "mine_force"
    summary = generate(make_cfg("stage=generate", *TINY, f"out={mine}"), tmp_path / "g")
    assert summary["path"] == str(mine.resolve()) and f"out={mine.resolve()}" in summary["later_stages"]
    assert len(writes) == 2
    before = _snapshot(mine)
    _, path, _, _ = _ensure_orbits(make_cfg("stage=pretrain", *TINY, f"out={mine}"), _dist())
    assert path == mine.resolve()
    # the probing set's own override
    generate(make_cfg("stage=generate", *TINY, "data=two_body_force", "data.n_systems=40", "data.seq_len=65",
                      "data.shard_size=16", "data.labelling.full_systems=24", f"out={mine_force}"), tmp_path / "g2")
    assert len(writes) == 5
    assert load_force_data(make_cfg("stage=probe", *TINY, f"force_out={mine_force}")).path == mine_force.resolve()
    got = ensure_datasets(make_cfg("stage=run", *TINY, f"out={mine}", f"force_out={mine_force}"))
    assert got == {"data": str(mine.resolve()), "force_data": str(mine_force.resolve())}
    assert len(writes) == 5 and _snapshot(mine) == before and not (home / "data").exists()


def test_two_datasets_in_one_folder_are_refused_before_any_work(home, tmp_path, writes):
    from gravprobe.pipeline import PipelineConfigError, ensure_datasets

    same = tmp_path / "same"
    with pytest.raises(PipelineConfigError, match=f"both go to {same}.*different folders"):
        ensure_datasets(make_cfg("stage=run", *TINY, f"out={same}", f"force_out={same}"))
    assert writes == [] and not same.exists()


def test_home_and_the_environment_cannot_disagree(home, tmp_path):
    """`home=PATH` on the command line wins over $GRAVPROBE_HOME everywhere a stage has its config."""
    other = tmp_path / "other_home"
    cfg = make_cfg("stage=pretrain", *TINY, f"home={other}")
    assert output_root(cfg) == other.resolve() and output_root() == home.resolve()
    spec, path = config_dataset_path(cfg, "data")
    assert path == dataset_path(spec, 0, root=other) and path.is_relative_to(other.resolve())
    # the default still follows the environment, as before
    spec, path = config_dataset_path(make_cfg("stage=pretrain", *TINY), "data")
    assert path == home.resolve() / "data" / f"{spec.name}-{spec.spec_hash()[:8]}-s0"
    with pytest.raises(ValueError, match=r"key='model' is not a dataset of the config; choose one of \['data', 'force_data'\]"):
        config_dataset_path(cfg, "model")


@pytest.mark.slow
def test_the_readme_ladder_from_the_command_line(home, tmp_path):
    """`gravprobe generate experiment=smoke` then `gravprobe pretrain experiment=smoke` (real processes, a
    two-step training): pretrain logs that the dataset is complete and leaves it as generate wrote it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GRAVPROBE_HOME": str(home)}

    def gravprobe(*args):
        r = subprocess.run([sys.executable, "-m", "gravprobe.cli", *args], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        return r.stdout + r.stderr

    small = ["experiment=smoke", "data.n_systems=32", "data.shard_size=16"]
    out = gravprobe("generate", *small)
    (data,) = (home / "data").iterdir()
    assert str(data) in out and "find it by themselves" in out
    before = _snapshot(data)
    out = gravprobe("pretrain", *small, "train.steps=2", "train.ckpt_every=0", "text=stdlib",
                    f"hydra.run.dir={tmp_path / 'pre'}")
    assert f"dataset {data} is complete" in out and "generating pretrain" not in out
    assert _snapshot(data) == before and [p.name for p in (home / "data").iterdir()] == [data.name]
    assert load_dataset(data, verify=True).meta["n_systems"] == 32
