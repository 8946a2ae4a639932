"""Small utilities shared by every stage: the output root, atomic writes, checksums, code version."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from gravprobe import __version__


def output_root() -> Path:
    """The one directory every stage writes under: ``$GRAVPROBE_HOME`` or ``./outputs``."""
    return Path(os.environ.get("GRAVPROBE_HOME", "./outputs")).expanduser().resolve()


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


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
