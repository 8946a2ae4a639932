"""Training: losses fall, exact resume, clear errors (dataset, NaN, context), results schema, DDP smoke."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from gravprobe.pretrain import load_checkpoint

SMALL = [
    "data.n_systems=48", "data.seq_len=33", "data.n_bins=60", "data.shard_size=16", "data.planets=[1,2]",
    "model.n_layers=1", "model.n_heads=2", "model.d_model=32", "model.block_size=32",
    "attention=softmax", "workers=1",
    "train.batch_size=8", "train.warmup_steps=2", "train.lr=3e-3", "train.eval_every=0", "train.ckpt_every=0",
    "train.log_every=1", "train.eval_batches=2", "train.extrapolation.factors=[]",
]


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("GRAVPROBE_HOME", str(h))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    from pydoc_data.topics import topics

    for i, key in enumerate(sorted(topics)[:60]):
        (corpus / f"{i:03d}.txt").write_text(topics[key])
    return h


def compose(home: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    text = ["text=files", f"text.paths=[{home.parent / 'corpus'}]", "text.val_fraction=0.1"]
    with initialize_config_module("gravprobe.conf", version_base="1.3"):
        return hydra_compose("config", overrides=[*SMALL, *text, f"home={home}", *overrides])


def run(home, run_dir, *overrides):
    from gravprobe.pretrain.train import main

    return main(compose(home, *overrides), run_dir)


def train_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "train"]


def test_few_steps_lower_both_losses_and_write_results(home, tmp_path):
    rd = tmp_path / "run"
    out = run(home, rd, "train.steps=25", "train.text_ratio=0.5", "train.extrapolation.factors=[1,2]",
              "train.extrapolation.orbit_systems=2", "train.extrapolation.text_windows=2")
    res = json.loads((rd / "results.json").read_text())["pretrain"]
    assert res["attention"] == "softmax" and res["steps"] == 25
    for mod in ("orbits", "text"):
        assert res["loss"][mod]["last"] < res["loss"][mod]["first"] - 0.3, res["loss"]
        assert set(res["length_extrapolation"][mod]) == {"1", "2"}
        assert all(v > 0 for v in res["length_extrapolation"][mod].values())
    assert out["steps"] == 25
    for f in ("metrics.csv", "results.json", "checkpoints/last.pt"):
        assert (rd / f).is_file(), f
    assert not list(rd.glob("*.png"))                       # stages write numbers; the report draws figures
    rows = train_rows(rd)                                   # the numbers the loss-curve figure is drawn from
    assert sorted({int(r["step"]) for r in rows}) == list(range(1, 26))
    assert {r["modality"] for r in rows} == {"orbits", "text"}
    model, meta = load_checkpoint(rd / "checkpoints" / "last.pt")
    assert meta["step"] == 25 and model.n_layers == 1 and model.d_model == 32
    x = torch.zeros(1, 10, 2, dtype=torch.long)
    assert len(model.hidden_states(x)) == 2 and model.encode(x).shape == (1, 10, 32)
    assert not list(rd.glob("checkpoints/.*tmp"))          # no temporary files left behind


def test_resume_is_exact(home, tmp_path):
    common = ["train.steps=6", "train.text_ratio=0.25", "train.ckpt_every=3", "model.orbit_mode=continuous",
              "model.context_noise=0.1"]                  # noise: the RNG state must be restored too
    run(home, tmp_path / "straight", *common)
    out = run(home, tmp_path / "split", *common, "train.stop_at=3")
    assert out.get("stopped") and out["steps"] == 3
    run(home, tmp_path / "split", *common)                 # resume=auto picks up checkpoints/last.pt
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra, rb = train_rows(tmp_path / "straight"), train_rows(tmp_path / "split")
    assert [(r["step"], r["modality"], r["loss"]) for r in ra] == [(r["step"], r["modality"], r["loss"]) for r in rb]
    assert len(ra) == 12


def test_nan_loss_stops_and_keeps_last_good_checkpoint(home, tmp_path, monkeypatch):
    from gravprobe.pretrain import NonFiniteLossError
    from gravprobe.pretrain.model import GPT

    real = GPT.forward
    calls = {"n": 0}

    def poisoned(self, orbits=None, text=None, **kw):
        out = real(self, orbits, text, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 5:
                out["orbits"] = out["orbits"] * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    rd = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 5.*step 4"):
        run(home, rd, "train.steps=10", "train.ckpt_every=2")
    ckpt = torch.load(rd / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_dataset_and_context_errors(home, tmp_path):
    from gravprobe.pretrain.data import DatasetMismatchError
    from gravprobe.pretrain.model import SequenceTooLongError

    with pytest.raises(DatasetMismatchError, match="no orbit dataset"):
        run(home, tmp_path / "a", "train.steps=1", f"train.dataset={tmp_path / 'missing'}")
    with pytest.raises(DatasetMismatchError, match="data.seq_len"):
        run(home, tmp_path / "b", "train.steps=1", "train.seq_len=40")
    with pytest.raises(SequenceTooLongError, match="block_size"):
        run(home, tmp_path / "c", "train.steps=1", "model.position=learned", "model.block_size=16",
            "train.seq_len=24")
    run(home, tmp_path / "d", "train.steps=1")
    with pytest.raises(DatasetMismatchError, match="trained on dataset"):
        run(home, tmp_path / "d", "train.steps=2", "data.n_systems=40")   # resume onto other data
    with pytest.raises(ValueError, match="divisible"):
        run(home, tmp_path / "e", "train.steps=1", "train.batch_size=6", "train.grad_accum=4")


def test_grad_accum_matches_one_big_batch(home, tmp_path):
    run(home, tmp_path / "one", "train.steps=3")
    run(home, tmp_path / "acc", "train.steps=3", "train.grad_accum=2")
    a = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "acc/checkpoints/last.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_learned_positions_extrapolation_is_null_beyond_context(home, tmp_path):
    rd = tmp_path / "run"
    run(home, rd, "train.steps=2", "model.position=learned", "train.extrapolation.factors=[1,2]",
        "train.extrapolation.orbit_systems=2")
    ext = json.loads((rd / "results.json").read_text())["pretrain"]["length_extrapolation"]
    assert ext["orbits"]["1"] > 0 and ext["orbits"]["2"] is None
    assert "text" not in ext                                  # text_ratio=0: orbits only


def test_plot_length_extrapolation_several_variants(tmp_path):
    from gravprobe.pretrain.evaluate import plot_length_extrapolation   # moving to gravprobe.report (issue 12)

    results = {"softmax": {"length_extrapolation": {"orbits": {"1": 3.1, "2": 3.5, "4": 4.8},
                                                    "text": {"1": 3.2, "2": 4.0, "4": None}}},
               "lssar": {"length_extrapolation": {"orbits": {"1": 3.1, "2": 3.15, "4": 3.2}}}}
    out = plot_length_extrapolation(results, tmp_path / "ext.png")
    assert out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="nothing|no length"):
        plot_length_extrapolation({"a": {"length_extrapolation": {}}}, tmp_path / "none.png")
