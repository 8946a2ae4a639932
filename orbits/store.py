"""Datasets on disk: the one rule for a dataset's folder, the sharded writer and the memory-mapped reader.

Folder: :func:`dataset_path` decides where the dataset of (spec, seed) lives, for ``gravprobe generate`` and
every stage that reads one: ``<root>/data/<name>-<spec_hash[:8]>-s<seed>``, where ``root`` is the config's
``home`` (``${oc.env:GRAVPROBE_HOME,./outputs}``), unless ``out=PATH`` names the folder. Naming the folder
after the spec hash and the seed (not just the preset's name) lets one output root hold every size and
seed of a preset side by side, and lets a later stage find the dataset from its own config alone.

Layout: ``<out>/manifest.json`` plus ``<out>/shard-<k>/<array>.npy`` (one ``.npy`` per array per shard,
memory-mappable; every array, or those of ``DatasetSpec.arrays``). Shard k holds systems
``[k * shard_size, (k+1) * shard_size)`` and is a pure function of (spec, seed, k) (see
:mod:`gravprobe.orbits.build`), so the bytes do not depend on the number of worker processes.

Writing (:func:`ensure_dataset`): one writer at a time per folder (an ``fcntl.flock`` on ``<out>/.lock``;
a second writer waits for the first, then reuses its dataset), the free space checked against the bytes
the shards will take before any shard is written, each shard written into ``.tmp-shard-<k>-<pid>/`` and
renamed into place (temporary folders are removed on failure and swept on resume), and the manifest
rewritten atomically as shards finish, so that an interrupted run resumes where it stopped. A complete
dataset that verifies is reused without writing anything (it may live on a read-only share).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from gravprobe.orbits.build import _block_params, _output_shapes, _shard_buffers, build_sequences
from gravprobe.orbits.spec import ARRAYS, DatasetSpec
from gravprobe.orbits.tokens import OrbitTokenizer

from gravprobe.common import (
    StorageError,
    atomic_write_json,
    check_free_space,
    code_version,
    output_root,
    sha256_file,
    storage_error,
)
from gravprobe.common import progress as progress_bar  # `progress` is the writer's on/off argument
from gravprobe.config import select  # stdlib only at import: no torch, no omegaconf

log = logging.getLogger(__name__)

FORMAT = "gravprobe-orbits/1"
LOCK_NAME = ".lock"
#: the config key that overrides the folder of each dataset the stages read (``null``: :func:`dataset_path`)
OUT_KEYS = {"data": "out", "force_data": "force_out"}
_NPY_HEADER_BYTES = 128  # numpy's .npy header (format 1.0) for these shapes
_MANIFEST_BYTES_PER_SHARD = 2048  # a shard's record in manifest.json (checksums of up to 9 files), generously


class DatasetError(RuntimeError):
    """A dataset on disk is missing, incomplete, corrupted, or was made from a different spec."""


class DatasetBusyError(DatasetError):
    """Another process is writing the dataset folder (raised only by ``ensure_dataset(..., wait=False)``)."""


# ------------------------------------------------------------------------------------------ the folder
def dataset_path(spec: DatasetSpec, seed: int, root: str | os.PathLike | None = None,
                 out: str | os.PathLike | None = None) -> Path:
    """The folder of the dataset of (``spec``, ``seed``): ``out`` when given, else
    ``<root>/data/<name>-<spec_hash[:8]>-s<seed>``. ``root``: the output root, i.e. the config's ``home``
    (pass it; ``None`` reads ``$GRAVPROBE_HOME``, default ``./outputs``). The one rule for ``generate`` and
    every stage that reads a dataset (:func:`config_dataset_path` applies it to a config)."""
    if out is not None and str(out) != "":
        return Path(out).expanduser().resolve()

    base = Path(root).expanduser().resolve() if root is not None and str(root) != "" else output_root()
    return base / "data" / f"{spec.name}-{spec.spec_hash()[:8]}-s{int(seed)}"


def dataset_dir(spec: DatasetSpec, seed: int, root: str | os.PathLike | None = None) -> Path:
    """:func:`dataset_path` without an ``out`` override (kept for code written against the old name)."""
    return dataset_path(spec, seed, root)


def config_dataset_path(cfg: Any, key: str = "data") -> tuple[DatasetSpec, Path]:
    """The spec of ``cfg[key]`` (``data``: the pretraining set; ``force_data``: the probing set) and its
    folder by :func:`dataset_path`, from the config's ``seed``, ``home`` and the key's override (``out`` for
    ``data``, ``force_out`` for ``force_data``; see :data:`OUT_KEYS`). Takes a Hydra config or a dict."""
    if key not in OUT_KEYS:
        raise ValueError(f"config_dataset_path: key={key!r} is not a dataset of the config; choose one of "
                         f"{sorted(OUT_KEYS)}")
    spec = DatasetSpec.from_config(select(cfg, key))
    seed = select(cfg, "seed")
    if seed is None:
        raise ValueError("config_dataset_path: the config has no seed (conf/config.yaml sets it; compose the config "
                         "with Hydra, or give the dict a seed)")

    return spec, dataset_path(spec, int(seed), output_root(cfg), select(cfg, OUT_KEYS[key]))


def repair_command(path: Path) -> str:
    return f"python -m gravprobe.orbits repair {path}"


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_bytes(spec: DatasetSpec, count: int) -> int:
    """Bytes on disk of a shard of ``count`` systems: the stored arrays' shapes times their item sizes,
    plus the ``.npy`` headers."""
    shapes = _output_shapes(spec, int(count))
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize + _NPY_HEADER_BYTES
               for name, (shape, dtype) in shapes.items() if name in spec.stored_arrays)


def estimated_bytes(spec: DatasetSpec, shards: list[int] | None = None) -> int:
    """Bytes the shards ``shards`` (default all) of a dataset of ``spec`` take on disk, manifest included."""
    shards = range(spec.n_shards) if shards is None else shards
    total = 0
    for k in shards:
        start, stop = spec.shard_range(k)
        total += shard_bytes(spec, stop - start) + _MANIFEST_BYTES_PER_SHARD
    return total


# ------------------------------------------------------------------------------------------ the writer
def _write_shard(spec_dict: dict, seed: int, k: int, out: str) -> dict:
    """Worker: build shard k, write it to a temporary folder, then rename it into place atomically. The
    temporary folder is removed on any failure; a full or read-only disk raises
    :class:`gravprobe.common.StorageError` naming the shard's folder and its size."""

    spec = DatasetSpec.from_config(spec_dict)
    start, stop = spec.shard_range(k)
    rows = np.arange(stop - start)
    arrays = build_sequences(spec, _block_params(spec, seed, k).take(rows), index=np.arange(start, stop),
                             seed=seed, block=k, rows=rows, out=_shard_buffers(spec, stop - start))
    out = Path(out)
    final = out / _shard_name(k)
    tmp = out / f".tmp-{_shard_name(k)}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        files = {}
        # no fsync: a crash can leave a shard that is renamed but not on disk, which the checksum
        # verification on resume (and load_dataset(verify=True)) detects and regenerates
        for name in spec.stored_arrays:
            f = tmp / f"{name}.npy"
            with open(f, "wb") as fh:
                np.save(fh, np.ascontiguousarray(arrays[name]))
            files[name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f), "dtype": str(arrays[name].dtype),
                           "shape": list(arrays[name].shape)}
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise storage_error(e, final, f"shard {k} of dataset {spec.name!r}",
                                shard_bytes(spec, stop - start)) from e
        raise
    return {"index": k, "start": start, "count": stop - start, "files": files}


def _write_shard_star(args) -> dict:
    return _write_shard(*args)


def _check_shard(out: Path, rec: dict, verify: bool, names=ARRAYS) -> str | None:
    """None if shard ``rec`` on disk holds the arrays ``names`` as its manifest record says, else the reason."""

    d = out / _shard_name(rec["index"])
    for name in names:
        f = d / f"{name}.npy"
        info = rec["files"].get(name)
        if info is None:
            return f"{name}.npy is not listed in the manifest"
        if not f.exists():
            return f"{f.name} is missing"
        size = f.stat().st_size
        if size != info["bytes"]:
            return f"{f.name} has {size} bytes, the manifest says {info['bytes']} (truncated or overwritten)"
        if verify and sha256_file(f) != info["sha256"]:
            return f"{f.name} fails its sha256 checksum (corrupted)"
    return None


def _read_manifest(out: Path) -> dict | None:
    f = out / "manifest.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{f} is not valid JSON ({e}); delete {out} and regenerate it") from e


def _new_manifest(spec: DatasetSpec, seed: int) -> dict:

    return {"format": FORMAT, "spec": spec.to_dict(), "spec_hash": spec.spec_hash(), "seed": int(seed),
            "code_version": code_version(), "n_systems": spec.n_systems, "seq_len": spec.seq_len,
            "vocab": {"n_bins": spec.n_bins, "dt_ids": [spec.n_bins + i for i in range(len(spec.dt_choices))],
                      "pad_id": spec.tokenizer.pad_id, "coord_range": spec.coord_range},
            "n_shards": spec.n_shards, "shards": [None] * spec.n_shards, "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _spec_mismatch(man: dict, spec: DatasetSpec, seed: int) -> str | None:
    if man.get("format") != FORMAT:
        return f"format {man.get('format')!r} != {FORMAT!r}"
    if man.get("spec_hash") != spec.spec_hash() or man.get("spec") != spec.to_dict():
        theirs = man.get("spec", {})
        diff = sorted(k for k in set(theirs) | set(spec.to_dict()) if theirs.get(k) != spec.to_dict().get(k))
        return f"a different spec (differs in: {', '.join(diff) or 'hash'})"
    if int(man.get("seed", -1)) != int(seed):
        return f"seed {man.get('seed')} (asked for {seed})"
    return None


def _ours(name: str) -> bool:
    """Files the writer itself leaves in a dataset folder besides the manifest and shards."""
    return name == LOCK_NAME or name.startswith((".tmp-shard-", ".manifest.json."))


def _refuse_foreign_folder(out: Path) -> None:
    if out.is_dir() and not (out / "manifest.json").exists() and any(not _ours(p.name) for p in out.iterdir()):
        raise DatasetError(f"{out} exists, is not empty and holds no manifest.json; choose another folder "
                           "(out=PATH) or delete it")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a dataset folder; choose another folder (out=PATH)")


def _verified_shards(out: Path, man: dict) -> int:
    """How many shards the manifest ``man`` records whose files are on disk and pass their checksums
    (stops at the first: the question is only whether there is any)."""
    try:
        names = DatasetSpec.from_config(man["spec"]).stored_arrays
    except (ValueError, TypeError, KeyError):
        names = ARRAYS
    for rec in man.get("shards") or []:
        if isinstance(rec, dict) and _check_shard(out, rec, True, names) is None:
            return 1
    return 0


def _sweep_tmp(out: Path) -> int:
    """Remove temporary shard folders (left by a killed or failed writer); the caller holds the lock."""
    stale = list(out.glob(".tmp-shard-*"))
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return len(stale)


def _clear_unverified(out: Path) -> None:
    """Remove what an unfinished dataset with no verified shard left (its manifest and shard folders)."""
    for d in out.glob("shard-*"):
        shutil.rmtree(d, ignore_errors=True)
    _sweep_tmp(out)
    (out / "manifest.json").unlink(missing_ok=True)


class _FolderLock:
    """An exclusive ``fcntl.flock`` on ``<out>/.lock``, held while a process writes the dataset folder.

    The kernel releases it when the holder exits, however it exits, so a killed writer never leaves the
    folder locked. ``wait=True``: wait for the other writer (logging its pid) and then go on, which
    finds its dataset complete and reuses it; ``wait=False``: raise :class:`DatasetBusyError`."""

    def __init__(self, out: Path, wait: bool = True, poll_s: float = 0.2, log_every_s: float = 60.0):
        self.out, self.path, self.wait = out, out / LOCK_NAME, wait
        self.poll_s, self.log_every_s = poll_s, log_every_s
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def __enter__(self) -> _FolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock, as before
            log.warning("no fcntl on this platform: %s is written without a lock", self.out)
            return self

        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
        except OSError as e:
            raise storage_error(e, self.path, "the dataset's lock file") from e
        t0 = next_log = time.monotonic()
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                who = self.holder()
                if not self.wait:
                    os.close(self.fd)
                    self.fd = None
                    raise DatasetBusyError(
                        f"another writer ({who}) holds {self.out}: it is generating this dataset now. Wait for "
                        "it to finish and run again (the dataset is then reused), or write elsewhere with "
                        "out=PATH") from None
                now = time.monotonic()
                if now >= next_log:
                    log.warning("another writer (%s) holds %s; waiting for it to finish (%.0f s so far), then "
                                "reusing what it wrote", who, self.out, now - t0)
                    next_log = now + self.log_every_s
                time.sleep(self.poll_s)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _complete(out: Path, man: dict | None, spec: DatasetSpec, seed: int, verify: bool) -> bool:
    """The folder holds the complete, matching dataset and every shard checks out."""
    if man is None or not man.get("complete") or _spec_mismatch(man, spec, seed):
        return False
    shards = man.get("shards") or []
    return len(shards) == spec.n_shards and all(
        r is not None and _check_shard(out, r, verify, spec.stored_arrays) is None for r in shards)


def ensure_dataset(spec: DatasetSpec, out: str | os.PathLike, *, seed: int, workers: int = 0,
                   verify: bool = True, progress: bool = True, wait: bool = True) -> Path:
    """Make sure ``out`` holds the complete dataset of (spec, seed); return ``out``.

    Reuses a complete dataset whose manifest matches (checking sha256 checksums when ``verify``) without
    writing anything; resumes an incomplete one (verified shards are kept, the rest regenerated). A folder
    holding a dataset of another spec or seed is refused with :class:`DatasetError`, unless it holds no
    verified shard (a ``generate`` that failed or was stopped early): then it is replaced, with a warning.
    One writer at a time: a second process waits for the first (``wait=False``: raises
    :class:`DatasetBusyError`). Before any shard is written the free space is checked against the shards'
    size; a full or read-only disk raises :class:`gravprobe.common.StorageError` naming the path and the
    bytes needed, keeping every finished shard and leaving no temporary file. ``workers``: processes
    (0 = all cores); the bytes do not depend on it.
    """

    out = Path(out).expanduser().resolve()
    man = _read_manifest(out)
    if _complete(out, man, spec, seed, verify):
        if man.get("code_version") != code_version():
            log.info("dataset %s was written by %s (now %s)", out, man.get("code_version"), code_version())
        log.info("dataset %s is complete (%d systems, %d shards)", out, spec.n_systems, spec.n_shards)
        return out
    _refuse_foreign_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, out, f"the folder of dataset {spec.name!r}", estimated_bytes(spec)) from e
    with _FolderLock(out, wait=wait):
        return _ensure_locked(spec, out, seed, workers, verify, progress)


def _ensure_locked(spec: DatasetSpec, out: Path, seed: int, workers: int, verify: bool, progress: bool) -> Path:
    """:func:`ensure_dataset` once this process holds the folder's lock (the state is read afresh: another
    writer may have finished or changed it while this one waited)."""

    man = _read_manifest(out)
    if man is None:
        _refuse_foreign_folder(out)
    else:
        why = _spec_mismatch(man, spec, seed)
        if why and _verified_shards(out, man):
            raise DatasetError(f"{out} already holds a dataset with {why}; write to another folder "
                               "(out=PATH) or delete it")
        if why:
            log.warning("%s holds an unfinished dataset with %s and no verified shard (a generate that failed or "
                        "was stopped early); replacing it with the dataset asked for", out, why)
            _clear_unverified(out)
            man = None
        elif man.get("code_version") != code_version():
            log.info("dataset %s was written by %s (now %s)", out, man.get("code_version"), code_version())
    if man is None:
        man = _new_manifest(spec, seed)
    swept = _sweep_tmp(out)
    if swept:
        log.info("dataset %s: removed %d temporary shard folder(s) left by an interrupted run", out, swept)
    todo = []
    for k in range(spec.n_shards):
        rec = man["shards"][k]
        why = "not written" if rec is None else _check_shard(out, rec, verify, spec.stored_arrays)
        if why is not None:
            if rec is not None:
                log.warning("dataset %s: shard %d will be regenerated: %s", out, k, why)
            man["shards"][k] = None
            todo.append(k)
    if not todo and man.get("complete"):
        log.info("dataset %s is complete (%d systems, %d shards)", out, spec.n_systems, spec.n_shards)
        return out
    what = f"dataset {spec.name!r} ({len(todo)} of {spec.n_shards} shards)"
    check_free_space(out, estimated_bytes(spec, todo), what)
    man["complete"] = False
    atomic_write_json(out / "manifest.json", man, f"the manifest of dataset {spec.name!r}")
    nproc = min(len(todo), workers if workers and workers > 0 else (os.cpu_count() or 1)) or 1
    log.info("generating %s: %d of %d shards to write (%d systems, seq_len %d) with %d process(es) -> %s",
             spec.name, len(todo), spec.n_shards, spec.n_systems, spec.seq_len, nproc, out)

    bar = progress_bar(total=len(todo), desc=f"generate {spec.name}", unit="shard", disable=not progress)
    spec_dict = spec.to_dict()
    pool = None
    pending = 0
    try:
        if nproc == 1:
            results = (_write_shard(spec_dict, seed, k, str(out)) for k in todo)
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(nproc)
            results = pool.imap_unordered(_write_shard_star, [(spec_dict, seed, k, str(out)) for k in todo])
        # the manifest records each finished shard, so a resume keeps it; rewriting it (fsync'ed JSON that
        # grows with the shard count) is spaced so that it takes at most ~10% of the time: after every
        # shard while it is small, less often for 10M-sequence datasets (a kill then loses the few
        # shards finished since the last write, which the resume regenerates)
        last, cost = 0.0, 0.0
        for rec in results:
            man["shards"][rec["index"]] = rec
            pending += 1
            bar.update(1)
            if time.perf_counter() - last >= 10 * cost:
                t0 = time.perf_counter()
                atomic_write_json(out / "manifest.json", man, f"the manifest of dataset {spec.name!r}")
                pending, last = 0, time.perf_counter()
                cost = last - t0
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        _sweep_tmp(out)  # shards that terminated workers had begun
        raise
    finally:
        bar.close()
        if pending:
            try:
                atomic_write_json(out / "manifest.json", man, f"the manifest of dataset {spec.name!r}")
            except OSError as e:  # keep the error that stopped the run; this one only loses resumable work
                log.warning("could not record %d finished shard(s) in %s/manifest.json: %s", pending, out, e)
    man["complete"] = True
    man["code_version"] = code_version()
    atomic_write_json(out / "manifest.json", man, f"the manifest of dataset {spec.name!r}")
    return out


# --------------------------------------------------------------------------------------------- reading
class _ShardFiles:
    """The per-shard ``.npy`` files of one array, memory-mapped on first use. At most ``max_open`` maps stay
    open (each holds a file descriptor, and a 10M-sequence dataset has ~10k shards per array); pickles as
    its file names (no data), so data-loader workers reopen the files themselves."""

    def __init__(self, files: list[Path], max_open: int = 64):
        self.files = list(files)
        self.max_open = int(max_open)
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, k: int) -> np.ndarray:
        a = self._open.get(k)
        if a is None:
            a = self._open[k] = np.load(self.files[k], mmap_mode="r")
        else:
            self._open.move_to_end(k)
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return a

    def __getstate__(self) -> dict:
        return {"files": self.files, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def _npy_header(f: Path) -> tuple[tuple, np.dtype]:
    """Shape and dtype from a ``.npy`` header, without mapping the file."""
    with open(f, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    return tuple(shape), np.dtype(dtype)


class ConcatArray:
    """A read-only array-like concatenation of per-shard arrays along axis 0, loaded lazily.

    Supports ``shape``, ``dtype``, ``ndim``, ``len``, integer / slice / index-array / boolean indexing on
    axis 0 (plus further axes in a tuple) and ``np.asarray`` (which reads everything).
    """

    def __init__(self, parts, lengths=None, row_shape=None, dtype=None):
        """``parts``: arrays, or a sequence that yields them on demand (:class:`_ShardFiles`) together with
        their ``lengths``, ``row_shape`` and ``dtype`` (so that nothing is opened until it is read)."""
        self.parts = parts
        lengths = [len(p) for p in parts] if lengths is None else list(lengths)
        self.offsets = np.cumsum([0] + lengths)
        self.shape = (int(self.offsets[-1]),) + tuple(parts[0].shape[1:] if row_shape is None else row_shape)
        self.dtype = np.dtype(parts[0].dtype if dtype is None else dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ConcatArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.parts)})"

    def __array__(self, dtype=None, copy=None):
        a = np.concatenate([np.asarray(p) for p in self.parts]) if self.parts else np.empty(self.shape)
        return a if dtype is None else a.astype(dtype)

    def _row(self, i: int) -> np.ndarray:
        n = self.shape[0]
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} systems")
        i %= n
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[k][i - self.offsets[k]]

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            out = self._row(int(key))
            return out[rest] if rest else out
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:
                pieces = []
                for k, p in enumerate(self.parts):
                    lo, hi = max(start, self.offsets[k]), min(stop, self.offsets[k + 1])
                    if hi > lo:
                        pieces.append(p[lo - self.offsets[k]:hi - self.offsets[k]])
                out = (pieces[0] if len(pieces) == 1 else np.concatenate(pieces)) if pieces else \
                    np.empty((0,) + self.shape[1:], self.dtype)
                return out[(slice(None),) + rest] if rest else out
            key = np.arange(start, stop, step)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (self.shape[0],):
                raise IndexError(f"boolean index of shape {idx.shape} does not match {self.shape[0]} systems")
            idx = np.nonzero(idx)[0]
        idx = np.where(idx < 0, idx + self.shape[0], idx).astype(np.int64)
        if np.any((idx < 0) | (idx >= self.shape[0])):
            raise IndexError("index out of range")
        flat = idx.ravel()
        out = np.empty((len(flat),) + self.shape[1:], self.dtype)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        order = np.argsort(shard, kind="stable")  # group the rows by shard: one read per shard
        for sel in np.split(order, np.flatnonzero(np.diff(shard[order])) + 1):
            if len(sel):
                k = shard[sel[0]]
                out[sel] = self.parts[k][flat[sel] - self.offsets[k]]
        out = out.reshape(idx.shape + self.shape[1:])
        return out[(slice(None),) * idx.ndim + rest] if rest else out


class OrbitDataset:
    """A dataset on disk, memory-mapped: attributes named as in the module docstring, each ``[N, ...]``.

    ``tokens``, ``positions``, ``states``, ``forces``, ``labelled``, ``bodies``, ``dt``, ``n_bodies``,
    ``energy_error``; ``meta`` is the manifest (spec, seed, code version, shards); ``spec`` the
    :class:`DatasetSpec`; ``len(ds)`` the number of systems.
    """

    def __init__(self, path: Path, meta: dict, arrays: dict[str, Any]):
        self.path = path
        self.meta = meta
        self.spec = DatasetSpec.from_config(meta["spec"])
        self.seed = int(meta["seed"])
        self.arrays = arrays
        for k, v in arrays.items():
            setattr(self, k, v)

    def __getattr__(self, name: str):  # only called for attributes not set in __init__
        if name in ARRAYS:
            raise AttributeError(f"{self.path} holds only {list(self.spec.stored_arrays)} (its data.arrays), not "
                                 f"{name!r}; generate it again with data.arrays=null (all arrays) or with "
                                 f"{name} in the list")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (f"OrbitDataset({str(self.path)!r}, name={self.spec.name!r}, systems={len(self)}, "
                f"seq_len={self.spec.seq_len}, shards={self.meta['n_shards']})")

    @property
    def tokenizer(self) -> OrbitTokenizer:
        return self.spec.tokenizer


def load_dataset(path: str | os.PathLike, *, verify: bool = False) -> OrbitDataset:
    """Open a dataset written by :func:`ensure_dataset` without reading it into memory.

    Every shard file is checked against the manifest (presence, size, ``.npy`` header shape and dtype;
    sha256 too when ``verify``); a mismatch raises :class:`DatasetError` naming the shard and the command
    that regenerates it.
    """
    path = Path(path).expanduser().resolve()
    man = _read_manifest(path)
    fix = repair_command(path)
    if man is None:
        raise DatasetError(f"no dataset at {path} (manifest.json missing); create one with "
                           "`gravprobe generate data=<preset> out=PATH`")
    if man.get("format") != FORMAT:
        raise DatasetError(f"{path}: unknown dataset format {man.get('format')!r} (expected {FORMAT})")
    try:
        spec = DatasetSpec.from_config(man["spec"])
    except (ValueError, TypeError, KeyError) as e:
        raise DatasetError(f"{path}/manifest.json holds an invalid spec ({e}); regenerate the dataset") from e
    if spec.spec_hash() != man.get("spec_hash"):
        raise DatasetError(f"{path}/manifest.json: spec and spec_hash do not match (edited manifest?); "
                           f"regenerate with: {fix}")
    shards = man["shards"]
    if not man.get("complete") or any(r is None for r in shards) or len(shards) != spec.n_shards:
        missing = [k for k, r in enumerate(shards) if r is None]
        raise DatasetError(f"{path} is incomplete (shards not written: {missing[:10]}); "
                           f"finish it with: {fix}")
    files: dict[str, list] = {name: [] for name in spec.stored_arrays}
    for k, rec in enumerate(man["shards"]):
        start, stop = spec.shard_range(k)
        if rec["index"] != k or rec["start"] != start or rec["count"] != stop - start:
            raise DatasetError(f"{path}: manifest entry of shard {k} does not match the spec; "
                               f"regenerate with: {fix}")
        why = _check_shard(path, rec, verify, spec.stored_arrays)
        if why:
            raise DatasetError(f"{path}: shard {k} ({_shard_name(k)}/): {why}; regenerate it with: {fix}")
        for name in spec.stored_arrays:
            f = path / _shard_name(k) / f"{name}.npy"
            try:
                shape, dtype = _npy_header(f)
            except (ValueError, OSError) as e:
                raise DatasetError(f"{path}: shard {k}: {f.name} is unreadable ({e}); regenerate it with: "
                                   f"{fix}") from e
            info = rec["files"][name]
            if list(shape) != info["shape"] or str(dtype) != info["dtype"] or shape[0] != stop - start:
                raise DatasetError(f"{path}: shard {k}: {f.name} has shape {shape} {dtype}, the manifest "
                                   f"says {info['shape']} {info['dtype']}; regenerate it with: {fix}")
            files[name].append(f)
    arrays = {}
    for name, fs in files.items():
        info = man["shards"][0]["files"][name]
        if len(fs) == 1:
            arrays[name] = np.load(fs[0], mmap_mode="r")
        else:
            arrays[name] = ConcatArray(_ShardFiles(fs), [r["count"] for r in man["shards"]],
                                       tuple(info["shape"][1:]), info["dtype"])
    return OrbitDataset(path, man, arrays)


def repair_dataset(path: str | os.PathLike, *, workers: int = 0, progress: bool = True) -> Path:
    """Finish or repair the dataset at ``path`` from its own manifest (spec and seed): verified shards are
    kept, missing / truncated / corrupted ones regenerated."""
    path = Path(path).expanduser().resolve()
    man = _read_manifest(path)
    if man is None:
        raise DatasetError(f"no manifest.json in {path}: nothing to repair")
    spec = DatasetSpec.from_config(man["spec"])
    return ensure_dataset(spec, path, seed=int(man["seed"]), workers=workers, verify=True, progress=progress)
