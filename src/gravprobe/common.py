"""Small utilities shared by every stage: the output root, atomic writes, checksums, code version."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from gravprobe import __version__


def output_root(cfg: Any = None) -> Path:
    """The one directory every stage writes under. Given a config, its ``home`` key (which defaults to
    ``${oc.env:GRAVPROBE_HOME,./outputs}``; a ``home=PATH`` override wins everywhere, so the config and this
    function cannot disagree); without one (or without ``home``), ``$GRAVPROBE_HOME`` or ``./outputs``."""
    home = None
    if cfg is not None:
        home = cfg.get("home") if hasattr(cfg, "get") else getattr(cfg, "home", None)
    if home is None or str(home) == "":
        home = os.environ.get("GRAVPROBE_HOME", "./outputs")
    return Path(str(home)).expanduser().resolve()


#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: What :func:`set_cpu_allocator` applied in this process (``None``: nothing yet).
_ALLOCATOR: str | None = None


def set_cpu_allocator(mode: str = "heap") -> str:
    """How this process's CPU tensors get their memory from glibc ``malloc`` (PyTorch's CPU allocator).

    glibc serves every block above its mmap threshold (128 KiB at start, rising with the largest block freed,
    at most 32 MiB) by a fresh ``mmap`` and gives it back to the kernel on ``free``, and trims the heap's top
    back as well. A training step frees and re-allocates its activations and gradients every step, so each
    step faults them in again page by page (the kernel zeroes every page): 4,800-7,300 minor faults per step
    of ``model=liu``, 13-15 ms of its 87 ms training step on a 2-core VM (``benchmarks/RESULTS.md``, issue 13).

    ``mode="heap"``: blocks up to 256 MiB come from the heap, freed memory stays in it for the next step, and
    up to 1 GiB of free heap top is kept (the process's resident memory stays at its peak); ``"system"``:
    glibc's defaults (nothing is changed). Not glibc (musl, macOS, Windows), or an allocator of the user's
    already in charge (``LD_PRELOAD`` of jemalloc/tcmalloc/mimalloc, or ``MALLOC_*_`` variables): nothing is
    changed either. Process-wide and idempotent; logs what it did the first time and returns that line.
    """
    global _ALLOCATOR
    if mode not in ("heap", "system"):
        raise ValueError(f"cpu allocator mode {mode!r}: choose heap (keep freed memory for reuse) or system")
    if _ALLOCATOR is not None:
        return _ALLOCATOR
    if mode == "system":
        _ALLOCATOR = "CPU allocator: glibc defaults (train.cpu_allocator=system)"
        logging.getLogger("gravprobe").info(_ALLOCATOR)
        return _ALLOCATOR
    preload = os.environ.get("LD_PRELOAD", "")
    own = [k for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                       "GLIBC_TUNABLES") if k in os.environ]
    if any(a in preload for a in ("jemalloc", "tcmalloc", "mimalloc")):
        msg = f"CPU allocator: left alone (LD_PRELOAD={preload})"
    elif own:
        msg = f"CPU allocator: left alone ({', '.join(own)} set)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        msg = "CPU allocator: left alone (not glibc)"
    else:
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            results = [libc.mallopt(param, value) for param, value in (          # each one tried
                (_M_MMAP_THRESHOLD, 256 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))]
            ok = results == [1, 1, 1]
        except (OSError, AttributeError) as exc:
            ok, msg = False, f"CPU allocator: left alone (mallopt unavailable: {exc})"
        else:
            msg = ("CPU allocator: freed tensor memory stays in glibc's heap for reuse (mmap threshold 256 MiB, "
                   "trim threshold 1 GiB; train.cpu_allocator=system for glibc's defaults)" if ok else
                   "CPU allocator: glibc refused some of the mallopt settings (mmap/trim threshold, top pad)")
    _ALLOCATOR = msg
    logging.getLogger("gravprobe").info(msg)
    return msg


def code_version() -> str:
    """Package version plus the git commit (and ``+dirty``) when run from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class StorageError(OSError):
    """A file could not be written or read for a reason outside gravprobe: a full disk, a read-only or
    missing folder, missing permissions. The message names the path, what was being written, the bytes
    needed where known, and the fix."""

    def __str__(self) -> str:  # the message alone: it already names the path (OSError would add errno and path)
        return str(self.strerror or super().__str__())


_FIXES = {
    errno.ENOSPC: "free space there or point the output root elsewhere (GRAVPROBE_HOME=PATH, or out=PATH for generate)",
    errno.EDQUOT: "free space within your quota or point the output root elsewhere (GRAVPROBE_HOME=PATH)",
    errno.EROFS: "the file system is read-only: set GRAVPROBE_HOME (or out=PATH for generate) to a writable folder",
    errno.EACCES: "you may not write there: set GRAVPROBE_HOME (or out=PATH for generate) to a folder you own",
    errno.EPERM: "you may not write there: set GRAVPROBE_HOME (or out=PATH for generate) to a folder you own",
    errno.ENOTDIR: "a file stands where a folder is needed: set GRAVPROBE_HOME (or out=PATH) to a folder",
}


def storage_error(exc: OSError, path: str | os.PathLike, what: str = "a file",
                  needed: int | None = None) -> StorageError:
    """Turn a raw ``OSError`` from writing ``path`` into a :class:`StorageError` that a person can act on."""
    need = f" ({human_bytes(needed)} needed)" if needed else ""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    fix = _FIXES.get(exc.errno, "check that the folder exists and is writable")
    err = StorageError(exc.errno or 0, f"cannot write {what} at {path}{need}: {reason}; {fix}")
    err.filename = str(path)
    return err


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_free_space(path: str | os.PathLike, needed: int, what: str, margin: float = 1.1) -> None:
    """Raise :class:`StorageError` before any work if the file system holding ``path`` has less than
    ``needed`` bytes (times a safety ``margin``) free."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # cannot tell: let the write itself report
    if free < needed * margin:
        raise StorageError(errno.ENOSPC, f"not enough free space for {what} at {path}: {human_bytes(needed)} "
                                         f"needed, {human_bytes(free)} free; {_FIXES[errno.ENOSPC]}")


def _file_mode() -> int:
    """The mode an ordinary ``open()`` would give a new file (0666 minus the umask): ``mkstemp`` makes
    files 0600, which would keep datasets and run folders shared between users unreadable."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "a file") -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never half. The
    temporary file is removed on any failure; a full or read-only disk raises :class:`StorageError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise storage_error(e, path, what, len(data)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise storage_error(e, path, what, len(data)) from e
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, what: str = "a file") -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode(), what)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def update_results(run_dir: str | os.PathLike, section: str, value: Any) -> dict:
    """Merge ``{section: value}`` into ``run_dir/results.json`` (atomically) and return the whole file."""
    path = Path(run_dir) / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[section] = value
    atomic_write_json(path, results)
    return results


def arm_label(attention: dict | None, name: str | None = None) -> str:
    """A study arm's name from its attention config: the variant, plus its window and sharpening power
    (``"softmax"``, ``"softmax w=2"``, ``"lssar p=3"``), so that arms of one variant stay apart in a sweep.
    Written by training and the probe stage into ``results.json`` and read by the report."""
    att = attention or {}
    label = str(att.get("name") or name or "model")
    if att.get("window"):
        label += f" w={att['window']}"
    p = (att.get("params") or {}).get("sharpen_power")
    if label.startswith("lssar") and p is not None:
        label += f" p={p:g}" if isinstance(p, (int, float)) else f" p={p}"
    return label


class _LogProgress:
    """tqdm's small interface (iterate, ``update``, ``set_postfix``, ``close``, context manager) for output
    that is not a terminal: a log line at most every ``interval`` seconds (and at the end) instead of one
    bar redraw per step, so that Hydra's log, CI and ``nohup`` files stay readable."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, disable=False,
                 interval: float = 30.0, **_ignored) -> None:
        import time

        self._time = time.monotonic
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.interval = total, initial, interval
        self._start = self._last = self._time()
        self._start_n, self._postfix, self._closed = initial, "", False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def _line(self) -> str:
        rate = (self.n - self._start_n) / max(self._time() - self._start, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        post = f" {self._postfix}" if self._postfix else ""
        return f"{self.desc}: {done} {self.unit}{pct}, {rate:.3g} {self.unit}/s{post}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._time()
        if not self.disable and now - self._last >= self.interval:
            self._last = now
            logging.getLogger("gravprobe.progress").info(self._line())

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed and not self.disable and self.n > self._start_n:
            logging.getLogger("gravprobe.progress").info(self._line() + " - done")
        self._closed = True


def progress(iterable=None, **kwargs):
    """A progress bar on a terminal (tqdm), a log line every ``interval`` seconds (default 30) elsewhere.
    Takes tqdm's arguments (``total``, ``desc``, ``unit``, ``initial``, ``disable``, ``leave``). Set
    ``GRAVPROBE_PROGRESS=bar`` or ``=log`` to choose regardless of the terminal."""
    import sys

    mode = os.environ.get("GRAVPROBE_PROGRESS", "").lower()
    tty = sys.stderr.isatty() if hasattr(sys.stderr, "isatty") else False
    if mode == "bar" or (mode != "log" and tty):
        from tqdm.auto import tqdm

        kwargs.pop("interval", None)
        return tqdm(iterable, **kwargs)
    return _LogProgress(iterable, **kwargs)
