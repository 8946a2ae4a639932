"""Issue 11: no poisoned checkpoints, and checkpoints that survive faults.

A diverging run (a real override, and each non-finite path: loss, gradients, weights, optimiser state)
stops before a bad step is applied or a bad checkpoint written; a full disk names the path and the
bytes and leaves no temporary file; a truncated, garbage or bit-flipped checkpoint is named, and resume
falls back to the newest checkpoint that verifies. Every test also checks that nothing good was lost.
"""
from __future__ import annotations

import errno
import io
import logging
import os
from pathlib import Path

import pytest
import torch
from gravprobe.pretrain import (
    CheckpointError,
    NonFiniteLossError,
    load_checkpoint,
    read_checkpoint,
    verify_checkpoint,
)
from gravprobe.pretrain.checkpoint import (
    CHECKPOINT_FORMAT,
    check_checkpoint_space,
    newest_good_checkpoint,
    save_checkpoint,
    state_digest,
)

from gravprobe.common import StorageError

SMALL = [
    "data.n_systems=48", "data.seq_len=33", "data.n_bins=60", "data.shard_size=16", "data.planets=[1,2]",
    "model.n_layers=1", "model.n_heads=2", "model.d_model=32", "model.block_size=32",
    "attention=softmax", "workers=1",
    "train.batch_size=8", "train.warmup_steps=2", "train.lr=3e-3", "train.eval_every=0", "train.ckpt_every=1",
    "train.log_every=1", "train.eval_batches=2", "train.extrapolation.factors=[]", "train.dynamics.enabled=false",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One output root (and so one generated dataset) for the whole module."""
    h = tmp_path_factory.mktemp("reliability") / "home"
    old = os.environ.get("GRAVPROBE_HOME")
    os.environ["GRAVPROBE_HOME"] = str(h)
    yield h
    if old is None:
        os.environ.pop("GRAVPROBE_HOME", None)
    else:
        os.environ["GRAVPROBE_HOME"] = old


def run(home: Path, run_dir: Path, *overrides: str) -> dict:
    from gravprobe.pretrain.train import main
    from hydra import compose, initialize_config_module

    with initialize_config_module("gravprobe.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*SMALL, f"home={home}", *overrides])
    return main(cfg, run_dir)


def ckpts(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_of(path: Path) -> int:
    return int(read_checkpoint(path)["step"])      # read_checkpoint verifies: checksum, format, finite


def assert_no_temporary_files(run_dir: Path) -> None:
    assert not list(ckpts(run_dir).glob(".*.tmp")), list(ckpts(run_dir).iterdir())


# ------------------------------------------------------------------------------------- divergence
def test_diverging_override_keeps_two_good_checkpoints(home, tmp_path):
    """A real override that diverges (lr=1000 with weight decay 1 blows the weights up): the run stops with
    the step and the last good checkpoint named; last.pt and prev.pt both verify and hold finite values."""
    rd = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        run(home, rd, "train.steps=20", "train.lr=1000", "train.weight_decay=1")
    msg = str(info.value)
    last, prev = ckpts(rd) / "last.pt", ckpts(rd) / "prev.pt"
    good = step_of(last)
    assert good >= 2 and step_of(prev) == good - 1
    assert f"at step {good + 1};" in msg and f"{last} (step {good})" in msg, msg
    assert "train.lr (now 1000)" in msg and "new run folder" in msg, msg
    model, meta = load_checkpoint(last)                   # what `probe` loads: finite weights
    assert meta["step"] == good and all(torch.isfinite(p).all() for p in model.parameters())
    assert_no_temporary_files(rd)


class _InfGrad(torch.autograd.Function):
    """Identity forward, non-finite backward: a finite loss whose gradient overflowed."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _poison(monkeypatch, at_call: int, how: str) -> None:
    """From the ``at_call``-th training step on, make the gradients, the weights or the AdamW state non-finite."""
    from gravprobe.pretrain.model import GPT

    calls = {"forward": 0, "step": 0}
    if how == "gradients":
        real = GPT.forward

        def forward(self, orbits=None, text=None, **kw):
            out = real(self, orbits, text, **kw)
            if self.training:
                calls["forward"] += 1
                if calls["forward"] >= at_call:
                    out["orbits"] = _InfGrad.apply(out["orbits"])
            return out

        monkeypatch.setattr(GPT, "forward", forward)
        return
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        res = real_step(self, *a, **kw)
        calls["step"] += 1
        if calls["step"] >= at_call:
            p = self.param_groups[0]["params"][0]
            with torch.no_grad():
                if how == "weights":
                    p.view(-1)[0] = float("nan")
                else:                                   # optimiser state only: the weights stay finite
                    self.state[p]["exp_avg_sq"].view(-1)[0] = float("inf")
        return res

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("how, expect", [
    ("gradients", r"non-finite gradient norm \(.*\) with a finite loss .* at step 3; .*the step was not applied"),
    ("weights", r"weights that became non-finite in the update .* at step 3; .*no checkpoint was written from it"),
    ("optimiser", r"NaN/inf in 1 optimiser-state tensor\(s\) .*exp_avg_sq.* before writing the checkpoint at step 3"),
])
def test_nonfinite_state_is_never_checkpointed(home, tmp_path, monkeypatch, how, expect):
    rd = tmp_path / "run"
    _poison(monkeypatch, 3, how)
    with pytest.raises(NonFiniteLossError, match=expect) as info:
        run(home, rd, "train.steps=6")
    assert f"{ckpts(rd) / 'last.pt'} (step 2)" in str(info.value)
    assert step_of(ckpts(rd) / "last.pt") == 2 and step_of(ckpts(rd) / "prev.pt") == 1
    assert_no_temporary_files(rd)


# --------------------------------------------------------------------------------------- disk faults
def test_disk_full_names_path_and_bytes_and_keeps_last_good(home, tmp_path, monkeypatch):
    rd = tmp_path / "run"
    real_fsync = os.fsync
    writes = {"n": 0}

    def fsync(fd):
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            writes["n"] += 1
            if writes["n"] == 3:                          # the third checkpoint: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError) as info:
        run(home, rd, "train.steps=5")
    msg = str(info.value)
    assert "step-3 checkpoint" in msg and str(ckpts(rd) / "last.pt") in msg, msg
    assert "needed" in msg and "No space left on device" in msg and "GRAVPROBE_HOME" in msg, msg
    assert step_of(ckpts(rd) / "last.pt") == 2 and step_of(ckpts(rd) / "prev.pt") == 1   # nothing good lost
    assert_no_temporary_files(rd)
    monkeypatch.setattr(os, "fsync", real_fsync)        # space freed: the same command resumes and finishes
    out = run(home, rd, "train.steps=5")
    assert out["steps"] == 5 and step_of(ckpts(rd) / "last.pt") == 5


def test_free_space_is_checked_before_training(home, tmp_path, monkeypatch):
    import shutil

    rd = tmp_path / "run"
    real = shutil.disk_usage

    def small_disk(path):
        usage = real(path)
        return usage._replace(free=1000) if str(path).startswith(str(rd)) else usage

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    with pytest.raises(StorageError, match=r"not enough free space for checkpoints .* needed, 1000 B free"):
        run(home, rd, "train.steps=3")
    assert not ckpts(rd).exists() or not list(ckpts(rd).iterdir())


def test_stale_temporary_files_are_swept_on_resume(home, tmp_path, caplog):
    rd = tmp_path / "run"
    run(home, rd, "train.steps=3", "train.stop_at=2")
    stale = ckpts(rd) / ".last.pt.k1ll3d.tmp"             # a write killed by SIGKILL leaves this behind
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="gravprobe.pretrain.checkpoint"):
        run(home, rd, "train.steps=3")
    assert not stale.exists() and "removed 1 temporary file" in caplog.text
    assert step_of(ckpts(rd) / "last.pt") == 3


# ------------------------------------------------------------------------------------ bad checkpoints
def test_truncated_last_pt_resume_falls_back_and_stays_exact(home, tmp_path, caplog):
    run(home, tmp_path / "straight", "train.steps=4", "model.context_noise=0.1", "model.orbit_mode=continuous")
    rd = tmp_path / "split"
    run(home, rd, "train.steps=4", "model.context_noise=0.1", "model.orbit_mode=continuous", "train.stop_at=3")
    last = ckpts(rd) / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])              # truncated
    with caplog.at_level(logging.WARNING, logger="gravprobe.pretrain.train"):
        run(home, rd, "train.steps=4", "model.context_noise=0.1", "model.orbit_mode=continuous")
    assert f"resuming from {ckpts(rd) / 'prev.pt'} (step 2), the newest checkpoint that verifies" in caplog.text
    assert "last.pt is damaged" in caplog.text and "moved to last.pt.damaged" in caplog.text
    assert (ckpts(rd) / "last.pt.damaged").read_bytes() == data[: len(data) // 2]   # kept for inspection
    a = read_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    b = read_checkpoint(last)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:                                  # replaying step 3 changed nothing: exact resume
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_no_checkpoint_verifies_is_an_error_not_a_silent_restart(home, tmp_path):
    rd = tmp_path / "run"
    run(home, rd, "train.steps=3", "train.stop_at=2")
    for name in ("last.pt", "prev.pt"):
        (ckpts(rd) / name).write_bytes(b"\x00garbage" * 64)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies: .*last.pt is damaged.*prev.pt is "
                                              r"damaged.*train.resume=false"):
        run(home, rd, "train.steps=3")
    run(home, rd, "train.steps=3", "train.resume=false")  # the way out the message names
    assert step_of(ckpts(rd) / "last.pt") == 3


def test_probe_names_a_damaged_checkpoint_and_the_good_one(home, tmp_path):
    from gravprobe.probes.pipeline import load_model

    rd = tmp_path / "run"
    run(home, rd, "train.steps=2")
    last, prev = ckpts(rd) / "last.pt", ckpts(rd) / "prev.pt"
    good = last.read_bytes()
    last.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=rf"{last} is damaged .*truncated or not a torch file.*{prev} "
                                              r"\(step 1\) verifies: pass checkpoint="):
        load_model({"checkpoint": str(last)}, rd, "cpu")
    flipped = bytearray(good)                             # one flipped byte inside the tensor data
    i = good.index(b"data/0") + 4096 if b"data/0" in good else len(good) // 2
    flipped[i] ^= 0xFF
    last.write_bytes(bytes(flipped))
    ok, why = verify_checkpoint(last)
    assert not ok and ("sha256" in why or "damaged" in why), why
    last.write_bytes(good)
    meta = load_model({"checkpoint": str(last)}, rd, "cpu")[1]
    assert meta["step"] == 2 and meta["format"] == CHECKPOINT_FORMAT


# ------------------------------------------------------------------------------ the checkpoint file
def _state(step: int = 7) -> dict:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(4, 3), "b": torch.zeros(3)}, "optimizer": {"state": {}, "param_groups": []},
            "step": step, "rng": [{"numpy": ("MT19937", torch.arange(3).numpy(), 1, 0, 0.0)}],
            "config": {"train": {"lr": 1e-3, "betas": [0.9, 0.95]}, "name": None}}


def test_checksum_format_and_rotation(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    assert read_checkpoint(path)["step"] == 2 and read_checkpoint(tmp_path / "checkpoints/prev.pt")["step"] == 1
    ckpt = torch.load(path, weights_only=False)           # still an ordinary torch file
    assert ckpt["format"] == CHECKPOINT_FORMAT == 2 and ckpt["sha256"] == state_digest(ckpt)
    ckpt["model"]["w"][0, 0] += 1e-6                      # a changed value no longer verifies
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"is damaged: its sha256 .* does not match"):
        read_checkpoint(path)
    found, state, problems = newest_good_checkpoint(path.parent)
    assert found == tmp_path / "checkpoints/prev.pt" and state["step"] == 1 and "sha256" in problems[0]
    assert path.exists()                                   # only a resume moves a damaged file aside


def test_format_1_loads_unverified_and_unknown_formats_are_refused(tmp_path, caplog):
    old = tmp_path / "old.pt"
    torch.save({**_state(), "format": 1}, old)             # written before checksums
    with caplog.at_level(logging.WARNING):
        assert read_checkpoint(old)["step"] == 7
    assert "format-1 checkpoint" in caplog.text and "cannot be verified" in caplog.text
    torch.save({**_state(), "format": 9}, old)
    with pytest.raises(CheckpointError, match=r"format 9; this gravprobe reads formats \(1, 2\): upgrade"):
        read_checkpoint(old)
    torch.save({"weights": torch.zeros(2)}, old)
    with pytest.raises(CheckpointError, match="not a gravprobe pretrain checkpoint"):
        read_checkpoint(old)
    poisoned = {**_state(), "format": 1}
    poisoned["model"]["w"][1, 1] = float("nan")            # what a diverged format-1 run left behind
    torch.save(poisoned, old)
    with pytest.raises(CheckpointError, match=r"holds NaN/inf in 1 weight tensor\(s\) \(e.g. model.w\)"):
        read_checkpoint(old)


def test_failed_write_restores_last_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match=rf"cannot write the step-3 checkpoint at {path} \(.* needed\)"):
        save_checkpoint(path, _state(3))
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 2 and read_checkpoint(tmp_path / "prev.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]


def test_space_estimate_counts_three_checkpoints_less_existing(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    assert check_checkpoint_space(tmp_path, 1000) == 3000     # nothing there yet: 3 x 1000 B < 10,000 B free
    with pytest.raises(StorageError, match=r"2 kept \+ 1 being written.*needed, 9.8 KB free"):
        check_checkpoint_space(tmp_path, 4000)
    (tmp_path / "last.pt").write_bytes(b"x" * 4000)
    (tmp_path / "prev.pt").write_bytes(b"x" * 4000)
    assert check_checkpoint_space(tmp_path, 4000) == 4000     # two already on disk: one more is needed


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_exact(home, tmp_path):
    """A training process killed with SIGKILL (possibly mid-write) resumes from what it left, exactly."""
    import signal
    import subprocess
    import sys
    import time

    common = ["train.steps=30", "train.ckpt_every=2", "model.orbit_mode=continuous", "model.context_noise=0.1"]
    run(home, tmp_path / "straight", *common)
    rd = tmp_path / "killed"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_pretrain_reliability as t; "
            "from pathlib import Path; t.run(Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(home), str(rd), *common],
                            env={**os.environ, "GRAVPROBE_HOME": str(home)}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (ckpts(rd) / "prev.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed; raise train.steps"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    out = run(home, rd, *common)
    assert out["steps"] == 30
    assert_no_temporary_files(rd)
    a = read_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    b = read_checkpoint(ckpts(rd) / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
