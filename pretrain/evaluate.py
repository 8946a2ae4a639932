"""Validation losses and length extrapolation (1x ... 16x the training context); the plots are the report's.

Length extrapolation (DESIGN.md ``results.json["pretrain"]["length_extrapolation"]``): the trained model's
mean next-token loss on sequences ``factor x`` longer than its training context — orbits: fresh held-out
systems of the same distribution simulated at the longest length with
:func:`gravprobe.orbits.generate_arrays` (a different seed from training) and truncated to each length;
text: evenly spaced windows of the validation split. Losses are token-weighted means over all target
positions of the sequence (nats; per coordinate for discrete orbits, like training).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import orbit_inputs
from .model import GPT

log = logging.getLogger(__name__)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and device.type == "cuda") \
        else contextlib.nullcontext()


def n_targets(model: GPT, seq: np.ndarray, modality: str, orbit_targets: str = "all") -> int:
    """Scored target positions of full sequences ``seq`` (``[b, L + 1, 2]`` orbits, ``[b, L + 1]`` text);
    ``orbit_targets="last"`` scores one target per orbit sequence (see ``GPT.orbit_targets``)."""
    if len(seq) == 0:
        return 0
    if modality == "text":
        return seq.shape[0] * (seq.shape[1] - 1)
    tgt = seq[:, 1:]
    if model.cfg.orbit_mode == "discrete":
        valid = tgt[..., 0] != model.cfg.orbit_pad
    else:
        valid = np.isfinite(tgt).all(-1)
    return int(valid.any(1).sum()) if orbit_targets == "last" else int(valid.sum())


@torch.no_grad()
def mean_loss(model: GPT, batches: Sequence[np.ndarray], modality: str, device: torch.device,
              bf16: bool = False, orbit_targets: str = "all") -> float:
    """Token-weighted mean loss of ``model`` over ``batches`` (each ``[b, L + 1, 2]`` orbits or ``[b, L + 1]``
    text). Returns NaN when there is nothing to score. ``orbit_targets``: see ``GPT.orbit_targets``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for seq in batches:
            n = n_targets(model, seq, modality, orbit_targets)
            if n == 0:
                continue
            x = torch.from_numpy(np.ascontiguousarray(seq)).to(device)
            with _autocast(device, bf16):
                kw = {"orbit_targets": orbit_targets} if modality == "orbits" else {}
                loss = model(**{modality: x}, **kw)[modality]
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def length_extrapolation(model: GPT, *, factors: Sequence[int], orbit_len: int | None, text_len: int | None,
                         spec: Any = None, seed: int = 0, n_systems: int = 16, text_split: Any = None,
                         n_windows: int = 16, batch_size: int = 4, device: torch.device | str = "cpu",
                         bf16: bool = False) -> dict[str, dict[str, float | None]]:
    """Validation loss at ``factor x`` the training context -> ``{"orbits": {"1": loss, ...}, "text": {...}}``.

    ``spec``: the training :class:`gravprobe.orbits.DatasetSpec`; held-out systems are simulated from a copy
    with ``seq_len = max(factors) * orbit_len + 1`` and ``n_systems`` systems under ``seed`` (pass one that
    training never used). ``text_split``: the validation :class:`~gravprobe.pretrain.text.TextSplit`.
    A modality is left out when its length/source is ``None``; a factor beyond a learned-position model's
    context gives ``None``.
    """
    device = torch.device(device)
    factors = [int(f) for f in factors]
    out: dict[str, dict[str, float | None]] = {}
    limit = model.cfg.block_size if model.cfg.position == "learned" else None
    if not factors:
        return out

    def run(modality: str, length: int, make) -> dict[str, float | None]:
        res: dict[str, float | None] = {}
        for f in factors:
            L = f * length
            if limit is not None and L > limit:
                log.info("length extrapolation: %s at %dx (%d tokens) exceeds the learned-position context %d",
                         modality, f, L, limit)
                res[str(f)] = None
                continue
            seqs = make(L + 1)
            res[str(f)] = mean_loss(model, [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)],
                                    modality, device, bf16)
            log.info("length extrapolation: %s %2dx (%d tokens): loss %.4f", modality, f, L, res[str(f)])
        return res

    if orbit_len and spec is not None and model.cfg.orbit_vocab:
        from gravprobe.orbits import generate_arrays

        long_spec = dataclasses.replace(spec, seq_len=max(factors) * orbit_len + 1, n_systems=n_systems)
        log.info("length extrapolation: simulating %d held-out systems of %d tokens (seed %d)", n_systems,
                 long_spec.seq_len, seed)
        arrays = generate_arrays(long_spec, seed, 0, n_systems)
        ids = np.arange(len(arrays["tokens"]))
        out["orbits"] = run("orbits", orbit_len, lambda n: orbit_inputs(
            arrays["tokens"], arrays.get("positions"), ids, n, spec.n_bins, model.cfg.orbit_mode))
    if text_len and text_split is not None and model.cfg.text_vocab:
        out["text"] = run("text", text_len, lambda n: text_split.windows(n_windows, n))
    return out


# ------------------------------------------------------------------------------------------------ plots
# The figures are the report's (gravprobe.report.figures draws every figure); these names stay for callers.
def plot_length_extrapolation(results: Mapping[str, Mapping[str, Any]], path: str | Path,
                              title: str | None = None) -> Path:
    """Loss vs length factor, one line per variant, one panel per modality — drawn by
    :func:`gravprobe.report.figures.plot_length_extrapolation`.

    ``results``: ``{variant: results_json["pretrain"]}`` (or any mapping holding ``"length_extrapolation"``,
    or the ``length_extrapolation`` dict itself). Writes a PNG to ``path`` and returns it; raises
    ``ValueError`` when there is nothing to plot.
    """
    from gravprobe.report.figures import plot_length_extrapolation as draw

    out = draw(results, Path(path), title=title or "")
    if out is None:
        raise ValueError("no length-extrapolation numbers to plot (every variant's table is empty)")
    return out


def plot_loss_curves(metrics_csv: str | Path, path: str | Path, title: str | None = None) -> Path:
    """Train and validation loss per modality against step, from ``metrics.csv``; writes a PNG — drawn by
    :func:`gravprobe.report.figures.plot_loss_curves`. Raises ``ValueError`` when the file has no rows."""
    from gravprobe.report.figures import plot_loss_curves as draw

    out = draw(metrics_csv, path, title=title or "")
    if out is None:
        raise ValueError(f"{metrics_csv} has no loss rows to plot")
    return out
