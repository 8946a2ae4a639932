"""Pretraining checkpoints: atomic, checksummed, never poisoned, with a fallback.

A checkpoint is one ``torch.save`` file (a dict: ``model``, ``optimizer``, ``scheduler``, ``rng``,
``step``, ``model_config``, ``config``, ``dataset``, ...) that also carries

- ``format``: :data:`CHECKPOINT_FORMAT` (2). Format 1 (before checksums) still loads, with a warning that
  it cannot be verified; an unknown format is refused with the version that would read it.
- ``sha256``: :func:`state_digest` of everything else in the dict: every tensor's dtype, shape and bytes
  and every other value's ``repr``, in dict order. Loading recomputes it, so a truncated, garbage or
  bit-flipped file is named as damaged instead of failing deep inside ``torch.load`` or, worse, loading.

A checkpoint *verifies* when it reads, its checksum matches and every floating-point tensor of the
weights and the optimiser state is finite (:func:`read_checkpoint`).

Two are kept per run: ``checkpoints/last.pt`` and the one before it, ``checkpoints/prev.pt``.
:func:`save_checkpoint` stages the new file whole (:func:`gravprobe.common.atomic_write_bytes`: a
temporary ``.last.pt.*.tmp``, fsync, rename; removed on failure, and a full or read-only disk raises
:class:`gravprobe.common.StorageError` naming the path and the bytes needed) and only then renames
``last.pt`` to ``prev.pt`` and the staged file to ``last.pt``. Resuming takes the newest that verifies
(:func:`newest_good_checkpoint`) and says so when that is not ``last.pt``; the temporary files of a write
killed by SIGKILL are swept then (:func:`sweep_temporary_files`).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gravprobe.common import StorageError, atomic_write_bytes, check_free_space, human_bytes, storage_error

from .model import GPT, GPTConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
LAST, PREVIOUS = "last.pt", "prev.pt"


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: damaged (truncated, garbage, checksum mismatch), not a gravprobe
    checkpoint, written by a newer format, or holding non-finite weights / optimiser state."""


# ------------------------------------------------------------------------------------------- checksums
def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 over the content of a checkpoint dict, without its ``sha256`` entry.

    Tensors contribute dtype, shape and raw bytes (from the CPU); numpy arrays likewise; dicts their keys
    in order; lists and tuples their items; ``None``, numbers, strings and bytes their ``repr``. Any other
    type raises ``TypeError`` (its ``repr`` might hold a memory address and never verify again).
    """
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "sha256"}, h)
    return h.hexdigest()


def _digest(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{obj.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"N{obj.dtype}{obj.shape}:".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}{{".encode())
        for k, v in obj.items():
            h.update(f"{k!r}:".encode())
            _digest(v, h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}[".encode())
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic)):
        h.update(f"{type(obj).__name__}={obj!r};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__} in a checkpoint; store plain values")


# ---------------------------------------------------------------------------------------- finiteness
def _trained_tensors(state: Mapping[str, Any]) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) for every floating-point tensor of the weights and the optimiser state."""
    for name, t in (state.get("model") or {}).items():
        if torch.is_tensor(t) and t.is_floating_point():
            yield f"model.{name}", t
    opt = (state.get("optimizer") or {}).get("state", {})
    for idx, per_param in opt.items():
        for key, t in per_param.items():
            if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0:
                yield f"optimizer.state[{idx}].{key}", t


def nonfinite_tensors(state: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Names of the weight tensors and of the optimiser-state tensors that hold NaN or inf."""
    weights, optim = [], []
    for name, t in _trained_tensors(state):
        if not bool(torch.isfinite(t).all()):
            (weights if name.startswith("model.") else optim).append(name)
    return weights, optim


def describe_nonfinite(weights: list[str], optim: list[str]) -> str:
    parts = []
    if weights:
        parts.append(f"{len(weights)} weight tensor(s) (e.g. {weights[0]})")
    if optim:
        parts.append(f"{len(optim)} optimiser-state tensor(s) (e.g. {optim[0]})")
    return "NaN/inf in " + " and ".join(parts)


# ------------------------------------------------------------------------------------------ write
def serialise(state: Mapping[str, Any]) -> bytes:
    """The file content of a checkpoint: ``state`` plus ``format`` and ``sha256``, as ``torch.save`` bytes."""
    full = {**state, "format": CHECKPOINT_FORMAT}
    full["sha256"] = state_digest(full)
    buf = io.BytesIO()
    torch.save(full, buf)
    return buf.getvalue()


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``prev.pt`` beside ``last.pt`` (``<stem>.prev.pt`` else)."""
    path = Path(path)
    return path.with_name(PREVIOUS if path.name == LAST else f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | Path, state: Mapping[str, Any], *, keep_previous: bool = True) -> int:
    """Write ``state`` to ``path`` atomically, with its format version and checksum; return the bytes written.

    The caller checks that the state is finite first (:func:`nonfinite_tensors`): this function writes what
    it is given. The new file is staged whole as ``.<name>.new.tmp`` (``atomic_write_bytes``: fsync'd, its
    own temporary file removed on failure); only then does the existing ``path`` become
    :func:`previous_path` (with ``keep_previous``) and the staged file ``path``. A failed write therefore
    changes no kept checkpoint, and a kill between the two renames leaves ``prev.pt`` to resume from.
    Raises :class:`gravprobe.common.StorageError` (the path, the bytes needed, the fix) on a full or
    read-only disk.
    """
    path = Path(path)
    data = serialise(state)
    what = f"the step-{state.get('step')} checkpoint" if "step" in state else "a checkpoint"
    staged = path.with_name(f".{path.name}.new.tmp")
    try:
        try:
            atomic_write_bytes(staged, data, what=what)
        except StorageError as e:      # name the checkpoint, not the staging file
            cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
            raise storage_error(cause, path, what, len(data)) from cause
        try:
            if keep_previous and path.is_file():
                os.replace(path, previous_path(path))
            os.replace(staged, path)
        except OSError as e:
            raise storage_error(e, path, what, len(data)) from e
    finally:
        if staged.exists():
            staged.unlink()
    return len(data)


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer_slots: int = 2) -> int:
    """Serialised size of a training checkpoint before one exists: the weights plus ``optimizer_slots``
    same-sized tensors per parameter (AdamW: ``exp_avg``, ``exp_avg_sq``) plus 1 MB for config and RNG."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + optimizer_slots * params + (1 << 20)


def check_checkpoint_space(ckpt_dir: str | Path, size: int) -> int:
    """Raise :class:`gravprobe.common.StorageError` before training if ``ckpt_dir`` cannot hold the two kept
    checkpoints plus the one being written (3 x ``size`` at the moment of a write, less what the
    existing ``last.pt``/``prev.pt`` already occupy). Returns the bytes still needed."""
    ckpt_dir = Path(ckpt_dir)
    existing = sum(p.stat().st_size for p in (ckpt_dir / LAST, ckpt_dir / PREVIOUS) if p.is_file())
    needed = max(0, 3 * size - existing)
    if needed:
        check_free_space(ckpt_dir, needed, f"checkpoints (2 kept + 1 being written, ~{human_bytes(size)} each)")
    return needed


def sweep_temporary_files(ckpt_dir: str | Path) -> list[Path]:
    """Remove the ``.<name>.*.tmp`` files a killed write leaves in ``ckpt_dir``; return what was removed."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed = []
    for tmp in sorted(ckpt_dir.glob(".*.tmp")):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted checkpoint write in %s: %s",
                    len(removed), ckpt_dir, ", ".join(p.name for p in removed))
    return removed


# ------------------------------------------------------------------------------------------- read
def read_checkpoint(path: str | Path) -> dict:
    """Load and verify a checkpoint onto the CPU -> its dict. Raises :class:`CheckpointError` naming the file
    and the reason (unreadable, not a checkpoint, unknown format, checksum mismatch, non-finite tensors),
    ``FileNotFoundError`` when there is no file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    size = path.stat().st_size
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # whatever torch.load trips over (zip, pickle, EOF, ...): the file is unusable
        raise CheckpointError(f"checkpoint {path} is damaged ({human_bytes(size)}; truncated or not a torch file:"
                              f" {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from e
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path} is not a gravprobe pretrain checkpoint (no format field)")
    fmt = ckpt["format"]
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(f"{path} has checkpoint format {fmt!r}; this gravprobe reads formats "
                              f"{READABLE_FORMATS}: upgrade gravprobe or re-run `gravprobe pretrain`")
    if fmt >= 2:
        stored = ckpt.get("sha256")
        try:
            actual = state_digest(ckpt)
        except TypeError as e:   # a value no gravprobe writes: the content was altered
            raise CheckpointError(f"checkpoint {path} is damaged: {e}") from e
        if stored != actual:
            raise CheckpointError(f"checkpoint {path} is damaged: its sha256 {str(stored)[:12]}... does not match "
                                  f"the content {actual[:12]}...")
    else:
        log.warning("%s is a format-1 checkpoint (written before checksums): it cannot be verified and is "
                    "loaded as it is; re-run `gravprobe pretrain` to get a verified one", path)
    weights, optim = nonfinite_tensors(ckpt)
    if weights or optim:
        raise CheckpointError(f"checkpoint {path} (step {ckpt.get('step')}) holds "
                              f"{describe_nonfinite(weights, optim)}: it was written by a diverging run")
    return ckpt


def verify_checkpoint(path: str | Path) -> tuple[bool, str]:
    """``(True, "step N")`` when ``path`` verifies (see :func:`read_checkpoint`), else ``(False, reason)``."""
    try:
        return True, f"step {read_checkpoint(path).get('step')}"
    except (CheckpointError, FileNotFoundError) as e:
        return False, str(e)


def checkpoint_candidates(ckpt_dir: str | Path) -> list[Path]:
    """The kept checkpoints of a run, newest first: ``last.pt``, then ``prev.pt``."""
    return [Path(ckpt_dir) / LAST, Path(ckpt_dir) / PREVIOUS]


def newest_good_checkpoint(ckpt_dir: str | Path, *, move_damaged: bool = False
                           ) -> tuple[Path | None, dict | None, list[str]]:
    """The newest kept checkpoint that verifies -> ``(path, state, problems)``.

    ``problems`` says why each newer kept checkpoint was passed over (damaged, or missing while an older
    one exists: a write killed between its two renames). ``(None, None, [])``: the run has no checkpoint;
    ``(None, None, problems)``: it has some and none verifies. With ``move_damaged`` (resume, rank 0) a
    damaged file is renamed ``<name>.damaged``: kept for inspection, never rotated over a good one.
    """
    problems: list[str] = []
    for path in checkpoint_candidates(ckpt_dir):
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        try:
            return path, read_checkpoint(path), problems
        except CheckpointError as e:
            if move_damaged:
                aside = path.with_name(path.name + ".damaged")
                os.replace(path, aside)
                e = CheckpointError(f"{e} (moved to {aside.name})")
            problems.append(str(e))
    if all(p.endswith(" is missing") for p in problems):
        problems = []
    return None, None, problems


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the trained model from a verified checkpoint -> ``(model in eval mode, meta)``.

    ``meta`` holds everything but the weights and optimiser state: ``model_config``, ``config`` (the
    resolved run config), ``step``, ``dataset`` (path, spec, n_bins), ``text`` (tokenizer, vocab), ...
    A damaged checkpoint raises :class:`CheckpointError` that also names the run's other checkpoints
    that verify.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; run `gravprobe pretrain` first or pass checkpoint=PATH")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        good = []
        for other in checkpoint_candidates(path.parent):
            if other.resolve() != path.resolve() and other.is_file():
                ok, what = verify_checkpoint(other)
                if ok:
                    good.append(f"{other} ({what}) verifies: pass checkpoint={other}")
        hint = "; ".join(good) if good else ("no other checkpoint of this run verifies: re-run `gravprobe pretrain`"
                                              " (a new run folder, or delete the damaged file)")
        raise CheckpointError(f"{e}; {hint}") from e
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(map_location if not isinstance(map_location, dict) else "cpu").eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "rng")}
    return model, meta
