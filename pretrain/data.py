"""Mixed orbit + text batches, streamed from memory-mapped arrays and deterministic given the seed.

The batch of optimiser step ``s`` is a pure function of ``(seed, s)``: a generator seeded with
``[seed, s]`` decides which of the ``batch_size`` sequences are text (exactly ``round(text_ratio *
batch_size)``, at shuffled positions), which training systems the orbit sequences come from, and where
the text windows start. The data position saved in a checkpoint is therefore just the step, and a
resumed run draws exactly the batches it would have drawn. Under DDP (``world`` processes) with
``accum`` micro-batches, the global batch is cut into ``world * accum`` equal consecutive slices and
process ``rank`` takes slices ``rank * accum ... rank * accum + accum - 1``; only those sequences are read.

Orbit sequences always start at position 0 (the dt marker, METHOD §1.3) and hold ``length + 1`` tokens
(input ``[:-1]``, next-token target ``[1:]``). The last ``val_fraction`` of the dataset's systems are
held out for validation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .text import TextSplit

log = logging.getLogger(__name__)


class DatasetMismatchError(RuntimeError):
    """The orbit dataset is missing, incomplete, or does not match what the run or checkpoint expects."""


@dataclass
class OrbitSource:
    """Orbit sequences of a dataset (``tokens [N, T, 2]`` memmap) split into train/validation systems.

    ``mode`` ``"discrete"`` yields int64 tokens; ``"continuous"`` yields float32 positions ``[.., 2]`` in AU
    with NaN where the token is a dt marker or padding (ids ``>= n_bins``).
    """

    tokens: np.ndarray
    positions: np.ndarray | None
    n_bins: int
    val_fraction: float = 0.05
    mode: str = "discrete"

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n < 2:
            raise DatasetMismatchError(f"the orbit dataset has {n} system(s); training needs at least 2 "
                                       "(some are held out for validation): raise data.n_systems")
        n_val = min(max(1, round(n * self.val_fraction)), n - 1)
        self.train_ids = np.arange(0, n - n_val)
        self.val_ids = np.arange(n - n_val, n)
        if self.mode == "continuous" and self.positions is None:
            raise DatasetMismatchError("continuous orbit mode needs the dataset's positions array; generate the "
                                       "dataset with positions in data.arrays (or data.arrays=null)")

    @property
    def seq_len(self) -> int:
        """Tokens per stored sequence T."""
        return int(self.tokens.shape[1])

    def check_length(self, length: int) -> None:
        if length + 1 > self.seq_len:
            raise DatasetMismatchError(
                f"training on orbit windows of {length} tokens needs sequences of >= {length + 1} tokens, "
                f"but the dataset holds {self.seq_len}; lower train.seq_len or regenerate with a larger "
                "data.seq_len")

    def read(self, ids: np.ndarray, length: int) -> np.ndarray:
        """Sequences ``ids`` truncated to ``length + 1`` tokens -> ``[n, length + 1, 2]``."""
        return orbit_inputs(self.tokens, self.positions, ids, length + 1, self.n_bins, self.mode)


def orbit_inputs(tokens: np.ndarray, positions: np.ndarray | None, ids: np.ndarray, length: int, n_bins: int,
                 mode: str) -> np.ndarray:
    """Dataset rows as model input: the one function pretraining, evaluation and the probes use.

    Rows ``ids`` of ``tokens [N, T, 2]`` (and ``positions [N, T, 2]`` in AU), first ``length`` steps →
    ``[len(ids), length, 2]``: int64 token ids (``mode="discrete"``) or float32 positions in AU with NaN
    where the step is not a coordinate (``mode="continuous"``; the model swaps NaN for its marker vector).

    A step is a coordinate when both of its token ids are bins (``id < n_bins``); ids ``n_bins …`` are the
    tokenizer's dt markers and padding (:meth:`gravprobe.orbits.OrbitTokenizer.is_special`). The tokens,
    not the ``bodies`` array (``-1`` = marker/padding), decide it because they are what the model reads,
    and ``tokens`` is stored in every dataset while ``bodies`` is optional (``data.arrays``). In a
    generated dataset both rules mark the same steps (coordinates are clipped into the bins).
    """
    if mode not in ("discrete", "continuous"):
        raise ValueError(f"orbit input mode={mode!r}; choose 'discrete' or 'continuous' (model.orbit_mode)")
    if mode == "continuous" and positions is None:
        raise DatasetMismatchError("continuous orbit input needs the dataset's positions array; generate the "
                                   "dataset with positions in data.arrays (or data.arrays=null)")
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        shape = (0, length, 2)
        return np.zeros(shape, np.int64 if mode == "discrete" else np.float32)
    order = np.argsort(ids, kind="stable")               # sorted reads are sequential on disk
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    tok = np.asarray(tokens[ids[order], :length], dtype=np.int64)[inv]
    if mode == "discrete":
        return tok
    pos = np.asarray(positions[ids[order], :length], dtype=np.float32)[inv]
    return np.where((tok < n_bins).all(-1, keepdims=True), pos, np.float32(np.nan))


@dataclass
class MicroBatch:
    orbits: np.ndarray    # [n_o, L_o + 1, 2]
    text: np.ndarray      # [n_t, L_t + 1]

    @property
    def size(self) -> int:
        return len(self.orbits) + len(self.text)


class MixedBatches:
    """Deterministic mixed batches: ``micro_batches(step, rank, world, accum)`` -> ``accum`` micro-batches."""

    def __init__(self, orbits: OrbitSource, text: TextSplit | None, *, batch_size: int, text_ratio: float,
                 orbit_len: int, text_len: int, seed: int, text_val: TextSplit | None = None) -> None:
        if not 0.0 <= text_ratio <= 1.0:
            raise ValueError(f"train.text_ratio must be in [0, 1], got {text_ratio}")
        if text_ratio > 0 and text is None:
            raise ValueError("train.text_ratio > 0 needs a text corpus")
        self.orbits, self.text, self.text_val = orbits, text, text_val
        self.batch_size, self.text_ratio, self.seed = int(batch_size), float(text_ratio), int(seed)
        self.n_text = round(self.text_ratio * self.batch_size)
        self.orbit_len, self.text_len = int(orbit_len), int(text_len)
        orbits.check_length(self.orbit_len)

    def micro_batches(self, step: int, rank: int = 0, world: int = 1, accum: int = 1) -> list[MicroBatch]:
        B, parts = self.batch_size, world * accum
        if B % parts:
            raise ValueError(f"train.batch_size={B} must be divisible by processes x grad_accum = {parts}")
        rng = np.random.default_rng([self.seed, step])
        is_text = np.zeros(B, dtype=bool)
        is_text[:self.n_text] = True
        rng.shuffle(is_text)
        orbit_ids = self.orbits.train_ids[rng.integers(0, len(self.orbits.train_ids), size=B)]
        text_where = (self.text.draw(rng, B, self.text_len + 1) if self.n_text
                      else np.zeros((B, 2), np.int64))
        m = B // parts
        out = []
        for j in range(rank * accum, rank * accum + accum):
            sl = slice(j * m, (j + 1) * m)
            t, ids, where = is_text[sl], orbit_ids[sl], text_where[sl]
            orb = self.orbits.read(ids[~t], self.orbit_len)
            txt = (self.text.read(where[t], self.text_len + 1) if self.n_text
                   else np.zeros((0, self.text_len + 1), np.int64))
            out.append(MicroBatch(orb, txt))
        return out

    def val_orbit_batches(self, n_batches: int, batch_size: int, length: int | None = None) -> list[np.ndarray]:
        """Fixed validation orbit batches (the held-out systems, cycled) -> list of ``[b, L + 1, 2]``."""
        length = self.orbit_len if length is None else length
        ids = self.orbits.val_ids
        take = np.resize(ids, min(n_batches * batch_size, max(len(ids), batch_size)))
        return [self.orbits.read(take[i:i + batch_size], length) for i in range(0, len(take), batch_size)]

    def val_text_batches(self, n_batches: int, batch_size: int, length: int | None = None) -> list[np.ndarray]:
        """Fixed validation text windows (evenly spaced over the validation split) -> list of ``[b, L + 1]``."""
        if self.text_val is None or self.n_text == 0:
            return []
        length = self.text_len if length is None else length
        w = self.text_val.windows(n_batches * batch_size, length + 1)
        return [w[i:i + batch_size] for i in range(0, len(w), batch_size)]
