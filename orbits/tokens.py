"""The orbit tokenizer of METHOD.md §1.3: uniform bins over a square, dt markers and padding.

A coordinate ``v`` (AU) maps to bin ``k = floor((v + L) / (2 L / V))`` clipped to ``[0, V-1]`` (``L`` =
``coord_range`` = 50 AU, ``V`` = ``n_bins`` = 7000), independently for x and y; bins decode to their
centres, so any in-range coordinate decodes within half a bin width (``L / V`` AU). Special ids:
``V`` and ``V+1`` mark the two time steps (in both channels of position 0), ``V+2`` pads.
"""
from __future__ import annotations

import numpy as np


class OrbitTokenizer:
    """Encode (x, y) positions [..., 2] (AU) to integer ids [..., 2] and back."""

    def __init__(self, n_bins: int = 7000, coord_range: float = 50.0, n_dt: int = 2):
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        if not coord_range > 0:
            raise ValueError(f"coord_range must be > 0 AU, got {coord_range}")
        self.n_bins = int(n_bins)
        self.coord_range = float(coord_range)
        self.n_dt = int(n_dt)
        self.bin_width = 2.0 * self.coord_range / self.n_bins

    @property
    def pad_id(self) -> int:
        return self.n_bins + self.n_dt

    @property
    def vocab_size(self) -> int:
        """Ids per channel: bins, dt markers, padding."""
        return self.n_bins + self.n_dt + 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.int16) if self.vocab_size <= np.iinfo(np.int16).max else np.dtype(np.int32)

    def dt_id(self, dt_index) -> np.ndarray:
        """Marker id for the index of the time step in the spec's ``dt_choices`` (0 -> V, 1 -> V+1)."""
        dt_index = np.asarray(dt_index)
        if np.any((dt_index < 0) | (dt_index >= self.n_dt)):
            raise ValueError(f"dt index out of range [0, {self.n_dt})")
        return self.n_bins + dt_index

    def encode(self, positions) -> np.ndarray:
        """Bin ids [..., 2] (``self.dtype``) of positions [..., 2] in AU; out-of-range values clip."""
        v = np.asarray(positions, dtype=np.float64)
        k = np.floor((v + self.coord_range) / self.bin_width)
        return np.clip(k, 0, self.n_bins - 1).astype(self.dtype)

    def decode(self, ids) -> np.ndarray:
        """Bin-centre positions [..., 2] (AU, float64); special ids (markers, padding) decode to NaN."""
        ids = np.asarray(ids)
        out = -self.coord_range + (ids.astype(np.float64) + 0.5) * self.bin_width
        return np.where(ids < self.n_bins, out, np.nan)

    def is_special(self, ids) -> np.ndarray:
        return np.asarray(ids) >= self.n_bins
