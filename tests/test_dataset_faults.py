"""Disk and file faults while writing a dataset (issue 11): a read-only output root, a full disk (up front
and in the middle of a shard), a failed generate whose manifest must not block the corrected rerun, file
modes for datasets shared between users, and two writers on one folder. Each test checks the message and
that nothing good was lost or left behind."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gravprobe.common import StorageError, human_bytes
from gravprobe.orbits import (
    DatasetBusyError,
    DatasetError,
    DatasetSpec,
    MassError,
    ensure_dataset,
    estimated_bytes,
    load_dataset,
)
from gravprobe.orbits import store

SMALL = dict(n_systems=50, seq_len=120, shard_size=16)  # 4 shards


def _bytes(path: Path) -> dict:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.glob("shard-*/*.npy"))}


def _mtimes(path: Path) -> dict:
    return {str(f.relative_to(path)): f.stat().st_mtime_ns for f in sorted(path.glob("shard-*/*.npy"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The dataset of SMALL, seed 0, written without faults (to compare bytes against)."""
    return ensure_dataset(DatasetSpec(**SMALL), tmp_path_factory.mktemp("ref") / "ref", seed=0, workers=1,
                          progress=False)


def test_read_only_output_root_names_the_path_and_the_fix(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    spec = DatasetSpec(**SMALL)
    out = ro / "data" / "d"
    with pytest.raises(StorageError) as e:
        ensure_dataset(spec, out, seed=0, workers=1, progress=False)
    msg = str(e.value)
    assert str(out) in msg and "Read-only file system" in msg and "writable folder" in msg and "out=PATH" in msg
    assert human_bytes(estimated_bytes(spec)) in msg  # the bytes it needs
    assert e.value.errno == errno.EROFS and not ro.exists()


def test_complete_dataset_on_a_read_only_share_is_reused_without_writing(tmp_path, monkeypatch, reference):
    shared = tmp_path / "shared"
    shutil.copytree(reference, shared)
    (shared / ".lock").unlink(missing_ok=True)
    before = _mtimes(shared)

    def no_writes(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    # any attempt to create a folder, the lock file or a temporary file would fail
    monkeypatch.setattr(Path, "mkdir", no_writes)
    monkeypatch.setattr(store, "_FolderLock", no_writes)
    p = ensure_dataset(DatasetSpec(**SMALL), shared, seed=0, workers=1, progress=False)
    assert p == shared.resolve() and _mtimes(shared) == before and not (shared / ".lock").exists()


def test_not_enough_free_space_is_refused_before_any_shard(tmp_path, monkeypatch):
    from gravprobe import common

    spec = DatasetSpec(**SMALL)
    need = estimated_bytes(spec)
    free = need // 3
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * need, 10 * need - free, free))
    out = tmp_path / "full"
    with pytest.raises(StorageError, match="not enough free space") as e:
        ensure_dataset(spec, out, seed=0, workers=1, progress=False)
    msg = str(e.value)
    assert str(out) in msg and f"{human_bytes(need)} needed" in msg and f"{human_bytes(free)} free" in msg
    assert not list(out.glob("shard-*")) and not list(out.glob(".tmp-*")) and not (out / "manifest.json").exists()


def test_the_free_space_estimate_matches_what_is_written(reference):
    spec = DatasetSpec(**SMALL)
    written = sum(f.stat().st_size for f in reference.glob("shard-*/*.npy"))
    shards_only = sum(store.shard_bytes(spec, b - a) for a, b in map(spec.shard_range, range(spec.n_shards)))
    assert shards_only == written  # exact: shapes x item sizes + the .npy headers
    assert written < estimated_bytes(spec) < written + 4 * 4096  # plus the manifest's share
    subset = DatasetSpec(**SMALL, arrays=["tokens", "bodies"])
    assert estimated_bytes(subset) < estimated_bytes(spec) / 5


def test_disk_full_while_writing_a_shard(tmp_path, monkeypatch, reference):
    """ENOSPC in the middle of shard 2: a StorageError naming the shard and its size; the temporary folder
    is removed, shards 0 and 1 stay recorded, and the same call afterwards resumes to identical bytes."""
    spec = DatasetSpec(**SMALL)
    out = tmp_path / "d"
    real_save = np.save
    calls = {"n": 0}

    def save(fh, arr, *a, **k):
        if "shard-00002" in getattr(fh, "name", ""):
            calls["n"] += 1
            fh.write(b"\0" * 4096)  # part of a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(fh, arr, *a, **k)

    monkeypatch.setattr(store.np, "save", save)
    with pytest.raises(StorageError) as e:
        ensure_dataset(spec, out, seed=0, workers=1, progress=False)
    msg = str(e.value)
    assert calls["n"] == 1 and e.value.errno == errno.ENOSPC
    assert str(out.resolve() / "shard-00002") in msg and "No space left on device" in msg
    assert f"({human_bytes(store.shard_bytes(spec, 16))} needed)" in msg and "free space" in msg
    assert not list(out.glob(".tmp-*"))  # nothing half-written left behind
    man = json.loads((out / "manifest.json").read_text())
    assert [r is not None for r in man["shards"]] == [True, True, False, False] and not man["complete"]
    kept = _mtimes(out)
    monkeypatch.setattr(store.np, "save", real_save)
    # a temporary folder left by a killed writer is swept when the dataset is resumed
    (out / ".tmp-shard-00003-4242").mkdir()
    (out / ".tmp-shard-00003-4242" / "tokens.npy").write_bytes(b"x" * 1000)
    ensure_dataset(spec, out, seed=0, workers=1, progress=False)
    assert _bytes(out) == _bytes(reference) and not list(out.glob(".tmp-*"))
    assert all(_mtimes(out)[k] == t for k, t in kept.items())  # finished shards were kept, not redone
    assert load_dataset(out, verify=True).tokens.shape == (50, 120, 2)


def test_disk_full_in_a_worker_process_keeps_the_message(tmp_path):
    """StorageError crosses the process pool intact (errno, message, path)."""
    import pickle

    from gravprobe.common import storage_error

    e = storage_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "shard-00001", "shard 1", 12 << 20)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is StorageError and back.errno == errno.ENOSPC and str(back) == str(e)
    assert "12.0 MB needed" in str(back) and str(tmp_path / "shard-00001") in str(back)


def test_a_failed_generate_does_not_block_the_corrected_rerun(tmp_path, monkeypatch, caplog):
    """A generate that failed before its first shard (a bad prior) left a manifest of its spec; the rerun
    with the corrected spec replaces it, saying so. A folder with verified shards of another spec is still
    refused and left as it was."""
    bad = DatasetSpec(**SMALL, priors={"planet_mass": {"dist": "fixed", "value": 0.5}})
    real_build = store.build_sequences

    def build(spec, params, **k):
        raise MassError("planet mass 0.5 Msun: the prior draws planets as heavy as the star")

    monkeypatch.setattr(store, "build_sequences", build)
    out = tmp_path / "d"
    with pytest.raises(MassError):
        ensure_dataset(bad, out, seed=0, workers=1, progress=False)
    assert json.loads((out / "manifest.json").read_text())["spec_hash"] == bad.spec_hash()
    monkeypatch.setattr(store, "build_sequences", real_build)
    good = DatasetSpec(**SMALL)
    with caplog.at_level("WARNING", logger="gravprobe.orbits.store"):
        ensure_dataset(good, out, seed=0, workers=1, progress=False)
    assert "no verified shard" in caplog.text and "replacing it" in caplog.text and "differs in: priors" in caplog.text
    ds = load_dataset(out, verify=True)
    assert ds.spec == good and len(ds) == 50
    # now the folder holds verified shards: another spec is refused, nothing is touched
    before = _mtimes(out)
    with pytest.raises(DatasetError, match=r"already holds a dataset with a different spec \(differs in: n_systems\)"):
        ensure_dataset(good.replace(n_systems=60), out, seed=0, workers=1, progress=False)
    assert _mtimes(out) == before and load_dataset(out).spec == good


def test_files_are_readable_by_group_and_others_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        out = ensure_dataset(DatasetSpec(**SMALL), tmp_path / "d", seed=0, workers=1, progress=False)
    finally:
        os.umask(old)
    paths = [out / "manifest.json", out / ".lock", *out.glob("shard-*"), *out.glob("shard-*/*.npy")]
    assert len(paths) == 2 + 4 + 4 * 9
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in paths}
    assert all(m & 0o044 == 0o044 for m in modes.values()), modes  # group and others may read
    assert all(m & 0o022 == 0 for m in modes.values()), modes  # and the umask's write bits are honoured
    assert modes["manifest.json"] == 0o644


def _hold_lock(out: Path, then_copy: Path | None, hold_s: float) -> subprocess.Popen:
    """Another process that takes the folder's lock the way a writer does (flock, then its pid into the
    file), holds it ``hold_s`` seconds, optionally "finishes" by copying a complete dataset in, and exits."""
    out.mkdir(parents=True, exist_ok=True)
    code = (f"import fcntl, os, shutil, socket, time\n"
            f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT, 0o666)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.ftruncate(fd, 0); os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}'.encode())\n"
            f"time.sleep({hold_s})\n")
    if then_copy is not None:
        code += (f"shutil.copytree({str(then_copy)!r}, {str(out)!r}, dirs_exist_ok=True, "
                 "ignore=shutil.ignore_patterns('.lock'))\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 30
    lock = out / ".lock"
    while time.time() < deadline and f"pid {proc.pid}" not in (lock.read_text() if lock.exists() else ""):
        time.sleep(0.01)
    assert proc.poll() is None, "the lock holder ended before the test could see its lock"
    return proc


def test_a_second_writer_is_told_who_holds_the_folder(tmp_path, monkeypatch):
    out = tmp_path / "d"
    proc = _hold_lock(out, None, 30)
    try:
        monkeypatch.setattr(store, "_write_shard", lambda *a: pytest.fail("wrote a shard without the lock"))
        with pytest.raises(DatasetBusyError, match=rf"another writer \(pid {proc.pid} on .*\) holds {out}.*out=PATH"):
            ensure_dataset(DatasetSpec(**SMALL), out, seed=0, workers=1, progress=False, wait=False)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "manifest.json").exists() and not list(out.glob("shard-*"))


def test_a_second_writer_waits_then_reuses_what_the_first_wrote(tmp_path, monkeypatch, caplog, reference):
    out = tmp_path / "d"
    proc = _hold_lock(out, reference, 1.0)
    try:
        monkeypatch.setattr(store, "_write_shard", lambda *a: pytest.fail("wrote a shard the first writer wrote"))
        with caplog.at_level("WARNING", logger="gravprobe.orbits.store"):
            ensure_dataset(DatasetSpec(**SMALL), out, seed=0, workers=1, progress=False)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"another writer (pid {proc.pid}" in caplog.text and "waiting for it to finish" in caplog.text
    assert _bytes(out) == _bytes(reference) and load_dataset(out, verify=True).spec == DatasetSpec(**SMALL)


@pytest.mark.slow
def test_two_real_writers_on_one_folder_do_the_work_once(tmp_path, monkeypatch, caplog, reference):
    """Two `ensure_dataset` processes: the second waits for the first and writes nothing."""
    spec = DatasetSpec(**SMALL)
    out = tmp_path / "d"
    code = ("import time; from gravprobe.orbits import DatasetSpec, store; orig = store._write_shard\n"
            "def slow(*a):\n    time.sleep(0.5); return orig(*a)\n"
            "store._write_shard = slow\n"
            f"store.ensure_dataset(DatasetSpec(**{SMALL!r}), {str(out)!r}, seed=0, workers=1, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and f"pid {proc.pid}" not in (
                (out / ".lock").read_text() if (out / ".lock").exists() else ""):
            time.sleep(0.02)
        assert proc.poll() is None, "the first writer ended before the test could see its lock"
        monkeypatch.setattr(store, "_write_shard", lambda *a: pytest.fail("wrote a shard twice"))
        with caplog.at_level("WARNING", logger="gravprobe.orbits.store"):
            ensure_dataset(spec, out, seed=0, workers=1, progress=False)  # waits, then reuses
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"another writer (pid {proc.pid}" in caplog.text
    assert _bytes(out) == _bytes(reference)
