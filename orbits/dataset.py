"""Orbit-sequence datasets: the spec, the vectorised sequence builder, and the sharded on-disk format.

Sequence layout (METHOD.md §1.3): position 0 holds the dt marker; then, per time step, each planet in
turn, then the star; the rest is padding. A system with K planets fills ``n = (T - 1) // (K + 1)`` time
steps of a ``T``-token sequence.

Arrays per system (``T`` = ``seq_len``):

=============  ===============  ==========================================================================
name           shape / dtype    meaning
=============  ===============  ==========================================================================
tokens         [T, 2] int16     x and y bin ids; V / V+1 dt markers (both channels), V+2 padding
positions      [T, 2] float32   observed (inertial) coordinates that were tokenised, AU (0 at marker/pad)
states         [T, 6] float32   planet steps: rel x, rel y (AU), rel vx, rel vy (AU/yr), m_planet, m_star
                                (Msun); "rel" = planet - star; zero at star, marker and padding steps
forces         [T, 2] float32   force on the planet, Msun AU/yr^2: from the star (kepler mode) or from all
                                bodies (nbody mode); zero elsewhere
labelled       [T] bool         a force label is given (planet steps only, see ``labelling``)
bodies         [T] int8         -1 marker/padding, 0 star, j >= 1 planet j
dt             [] float64       time step, yr
n_bodies       [] int8          planets + star
energy_error   [] float32       nbody mode: max relative energy drift over the sequence (0 for kepler)
=============  ===============  ==========================================================================

On disk: ``<out>/manifest.json`` plus ``<out>/shard-<k>/<array>.npy`` (one ``.npy`` per array per shard,
memory-mappable; every array, or those of ``DatasetSpec.arrays``). Shard k holds systems
``[k * shard_size, (k+1) * shard_size)`` and is a pure function of (spec, seed, k): its random numbers
come from ``numpy.random.default_rng([seed, k, stream])``, so the bytes do not depend on the number of
worker processes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gravprobe.orbits import fused, physics
from gravprobe.orbits.physics import G
from gravprobe.orbits.priors import (
    DEFAULT_PRIORS,
    SystemParams,
    check_priors,
    mass_bounds,
    merge_priors,
    prior_dist,
    sample_systems,
)
from gravprobe.orbits.tokens import OrbitTokenizer

log = logging.getLogger(__name__)

FORMAT = "gravprobe-orbits/1"
MODES = ("kepler", "nbody")
SYSTEMS = ("prior", "solar_system")
ARRAYS = ("tokens", "positions", "states", "forces", "labelled", "bodies", "dt", "n_bodies", "energy_error")
PER_SYSTEM = ("dt", "n_bodies", "energy_error")  # always stored (``DatasetSpec.arrays`` selects the rest)
# nbody keys added later, with the defaults that keep earlier behaviour (and spec hashes)
_NBODY_ADDED = {"above_tolerance": "keep", "max_redraws": 8}
# top-level keys added later, with the defaults that keep earlier behaviour (left out of the spec dict there)
_SPEC_ADDED = {"star": "auto", "star_token": True}
STARS = ("auto", "fixed")
_STREAM_PARAMS, _STREAM_LABELS, _STREAM_REDRAW = 0, 1, 2  # default_rng([seed, k, stream, ...])


class DatasetError(RuntimeError):
    """A dataset on disk is missing, incomplete, corrupted, or was made from a different spec."""


def _floats(d):
    """Numbers in a nested dict/list as floats (so that 32 and 32.0 hash alike)."""
    if isinstance(d, dict):
        return {k: _floats(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_floats(v) for v in d]
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else d


@dataclass
class DatasetSpec:
    """Everything that determines a dataset's bytes (together with the seed).

    ``mode``: ``kepler`` (exact two-body orbits; K = 1 moves the star about the centre of mass, K > 1 pins
    it, METHOD.md §1.1) or ``nbody`` (same initial conditions, mutual forces, Wisdom–Holman).
    ``system``: ``prior`` (METHOD.md §1.2 priors) or ``solar_system``. ``dt``: ``null`` = uniform over
    ``dt_choices`` (years), else one of them. ``labelling.full_systems``: systems with a lower index get a
    label at every planet step; the rest get exactly ``labelling.partial_steps`` labelled planet steps
    (seeded); ``null`` labels every planet step of every system. ``nbody``: sub-steps are chosen so that
    the innermost orbit gets ``steps_per_orbit`` Wisdom–Holman steps (rounded up to a power of two, at most
    ``max_substeps``); systems whose relative energy drift exceeds ``energy_tolerance`` are re-integrated
    with 4x more sub-steps until they meet it or hit ``max_substeps``. Those that still exceed it (close
    planet-planet encounters) are kept, flagged by ``energy_error`` and counted in a warning
    (``above_tolerance: keep``, the default), or replaced by fresh draws from the priors, up to
    ``max_redraws`` times (``redraw``; this conditions the distribution on systems the integrator can
    follow to the tolerance, i.e. without close encounters). ``arrays``: the per-token arrays written to
    disk (``null``: all; e.g. ``[tokens, bodies]`` for a pretraining set of ~5 KB a sequence instead of
    ~46 KB); ``dt``, ``n_bodies`` and ``energy_error`` are always written, ``tokens`` is required.
    In-memory arrays (:func:`generate_arrays`) are always complete, and the choice does not change any
    array's bytes.

    ``star``: ``auto`` (default; METHOD.md §1.1: kepler mode K = 1 moves the star about the centre of mass,
    K > 1 pins it at a random point of its orbit with one planet; nbody mode moves it under every force) or
    ``fixed`` (kepler mode only: the star sits at the drawn centre point ``com`` for all time and the planets
    are test particles of the fixed star, ``mu = G m_s``, which is the exact motion under a star held in
    place; force labels stay ``G m_p m_s / r^2``). ``star_token``: ``true`` (default) puts a star token after
    each time step's planets; ``false`` leaves it out (planet-only sequences: ``n = (T - 1) // K`` steps), allowed
    only with ``star: fixed`` and ``priors.com_sigma: 0`` (the star at the origin, so leaving it out loses
    nothing). ``labelling.partial_steps: 0`` leaves the systems from ``full_systems`` on without any label
    (the unlabelled held-out protocol). Priors may choose other distributions with ``dist`` (see
    :func:`gravprobe.orbits.priors.sample_systems`).
    """

    name: str = "pretrain"
    mode: str = "kepler"
    system: str = "prior"
    n_systems: int = 1000
    seq_len: int = 1000
    n_bins: int = 7000
    coord_range: float = 50.0
    dt_choices: tuple = (0.0189, 0.486)
    dt: float | None = None
    planets: tuple = (1, 10)
    priors: dict = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_PRIORS)))
    labelling: dict = field(default_factory=lambda: {"full_systems": None, "partial_steps": 2})
    shard_size: int = 1024
    nbody: dict = field(default_factory=lambda: {"steps_per_orbit": 20.0, "max_substeps": 256,
                                                 "energy_tolerance": 1e-5})
    arrays: tuple | None = None
    star: str = "auto"
    star_token: bool = True

    def __post_init__(self) -> None:
        self.dt_choices = tuple(float(x) for x in self.dt_choices)
        self.planets = tuple(int(x) for x in self.planets)
        self.priors = _floats(merge_priors(self.priors))
        if not isinstance(self.star_token, (bool, np.bool_)):
            raise TypeError(f"data.star_token must be true or false, got {self.star_token!r}")
        self.star_token = bool(self.star_token)
        lab = {"full_systems": None, "partial_steps": 2, **dict(self.labelling or {})}
        full = lab.pop("full_systems")
        self.labelling = {"full_systems": None if full is None else int(full), **lab}
        nb = {"steps_per_orbit": 20.0, "max_substeps": 256, "energy_tolerance": 1e-5, **_NBODY_ADDED,
              **dict(self.nbody or {})}
        self.nbody = {**nb, "steps_per_orbit": float(nb["steps_per_orbit"]),
                      "max_substeps": int(nb["max_substeps"]),
                      "energy_tolerance": float(nb["energy_tolerance"]),
                      "max_redraws": int(nb["max_redraws"])}
        self.coord_range = float(self.coord_range)
        self.dt = None if self.dt is None else float(self.dt)
        if self.arrays is not None:
            if isinstance(self.arrays, str) or not all(isinstance(a, str) for a in self.arrays):
                raise ValueError(f"data.arrays={self.arrays!r} must be null or a list of array names from "
                                 f"{list(ARRAYS)}, e.g. [tokens, bodies]")
            bad = sorted(set(self.arrays) - set(ARRAYS))
            if bad:
                raise ValueError(f"data.arrays names unknown arrays {bad}; choose from {list(ARRAYS)} (or null "
                                 "for all)")
            if "tokens" not in self.arrays:
                raise ValueError(f"data.arrays={list(self.arrays)} must include tokens")
            keep = set(self.arrays) | set(PER_SYSTEM)
            # all arrays is spelled null, so that the spec (and its hash) is the same either way
            self.arrays = None if keep == set(ARRAYS) else tuple(a for a in ARRAYS if a in keep)
        for k in ("n_systems", "seq_len", "n_bins", "shard_size"):
            setattr(self, k, int(getattr(self, k)))
        unknown = set(self.labelling) - {"full_systems", "partial_steps"}
        unknown |= {f"nbody.{k}" for k in set(self.nbody)
                    - {"steps_per_orbit", "max_substeps", "energy_tolerance", *_NBODY_ADDED}}
        if unknown:
            raise ValueError(f"unknown dataset spec keys {sorted(unknown)}")
        self.validate()

    # ------------------------------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, cfg: Any) -> "DatasetSpec":
        """From a Hydra/OmegaConf node (``cfg.data``) or a plain dict; unknown keys raise."""
        if not isinstance(cfg, dict):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown dataset spec keys {unknown}; valid keys: {sorted(names)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dt_choices"] = list(self.dt_choices)
        d["planets"] = list(self.planets)
        # keys added after the format's first release are left out at their defaults, so that specs (and the
        # hashes naming datasets) written before them still match
        if self.arrays is None:
            del d["arrays"]
        else:
            d["arrays"] = list(self.arrays)
        for k, v in _NBODY_ADDED.items():
            if d["nbody"][k] == v:
                del d["nbody"][k]
        for k, v in _SPEC_ADDED.items():
            if d[k] == v:
                del d[k]
        return d

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`to_dict` (hex)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def replace(self, **changes) -> "DatasetSpec":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown data.mode {self.mode!r}; choose one of {list(MODES)}")
        if self.star not in STARS:
            raise ValueError(f"unknown data.star {self.star!r}; choose auto (METHOD §1.1: K = 1 moves about the "
                             "centre of mass, K > 1 pinned) or fixed (the star never moves)")
        if self.star == "fixed" and self.mode != "kepler":
            raise ValueError("data.star=fixed needs data.mode=kepler (the N-body integrator moves the star)")
        if not self.star_token and (self.star != "fixed" or float(self.priors["com_sigma"]) != 0.0):
            raise ValueError(f"data.star_token=false is allowed only with a fixed star at the origin "
                             f"(data.star=fixed and data.priors.com_sigma=0), got data.star={self.star!r} and "
                             f"data.priors.com_sigma={self.priors['com_sigma']}: a moving or displaced star "
                             "left out of the sequence would make its position unobservable")
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown data.system {self.system!r}; choose one of {list(SYSTEMS)}")
        if self.n_systems < 1:
            raise ValueError(f"data.n_systems must be >= 1, got {self.n_systems}")
        if self.shard_size < 1:
            raise ValueError(f"data.shard_size must be >= 1, got {self.shard_size}")
        if len(self.dt_choices) != 2:
            raise ValueError(f"data.dt_choices must hold the two time steps (yr), "
                             f"got {list(self.dt_choices)}")
        physics.check_dt(self.dt_choices)
        if self.nbody["above_tolerance"] not in ("keep", "redraw"):
            raise ValueError(f"data.nbody.above_tolerance={self.nbody['above_tolerance']!r}: choose keep "
                             "(flag the system in energy_error) or redraw (replace it with a fresh draw)")
        if self.nbody["max_redraws"] < 0:
            raise ValueError(f"data.nbody.max_redraws must be >= 0, got {self.nbody['max_redraws']}")
        if self.dt is not None and float(self.dt) not in self.dt_choices:
            raise ValueError(f"data.dt={self.dt} must be null or one of data.dt_choices "
                             f"{list(self.dt_choices)}")
        kmax = self.max_planets
        need = kmax + 1 + int(self.star_token)
        if self.seq_len < need:
            raise ValueError(f"data.seq_len={self.seq_len} is too short: a system with {kmax} planets needs "
                             f"at least {need} tokens (marker + one time step)")
        OrbitTokenizer(self.n_bins, self.coord_range)
        ps = self.labelling.get("partial_steps")
        if not isinstance(ps, (int, np.integer)) or isinstance(ps, bool) or ps < 0:
            raise ValueError(f"data.labelling.partial_steps must be an int >= 0 (0: the systems from "
                             f"full_systems on carry no label at all), got {ps!r}")
        pr = self.priors
        check_priors(pr)
        pm_hi = mass_bounds(pr, "planet_mass")[1]
        ps_lo = mass_bounds(pr, "star_mass")[0]
        ratio = prior_dist(pr, "planet_mass") == "ratio_loguniform"
        dominant = pm_hi < 1.0 if ratio else pm_hi < ps_lo
        if (self.mode == "nbody" or self.star == "fixed") and not dominant:
            raise physics.MassRatioError(f"{'nbody mode' if self.mode == 'nbody' else 'data.star=fixed'} needs "
                                         "planet masses below star masses: data.priors.planet_mass reaches "
                                         f"{pm_hi}{' m_s' if ratio else ' Msun'}, data.priors.star_mass starts at "
                                         f"{ps_lo} Msun")

    # ------------------------------------------------------------------------------------------ derived
    @property
    def max_planets(self) -> int:
        return 8 if self.system == "solar_system" else self.planets[1]

    @property
    def tokenizer(self) -> OrbitTokenizer:
        return OrbitTokenizer(self.n_bins, self.coord_range, n_dt=len(self.dt_choices))

    @property
    def stored_arrays(self) -> tuple[str, ...]:
        """The arrays a dataset of this spec holds on disk (``arrays``, in :data:`ARRAYS` order)."""
        return ARRAYS if self.arrays is None else self.arrays

    @property
    def n_shards(self) -> int:
        return -(-self.n_systems // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Systems ``[start, stop)`` of shard k."""
        start = k * self.shard_size
        return start, min(start + self.shard_size, self.n_systems)


# ---------------------------------------------------------------------------------------- the builder
def _block_params(spec: DatasetSpec, seed: int, k: int, redraw: int | None = None) -> SystemParams:
    """Parameters of the ``shard_size`` systems of block k (always the full block, for purity); ``redraw``
    = r: the r-th set of replacements for N-body systems that miss the energy tolerance."""
    stream = [_STREAM_PARAMS] if redraw is None else [_STREAM_REDRAW, int(redraw)]
    rng = np.random.default_rng([int(seed), int(k), *stream])
    dt_index = None if spec.dt is None else spec.dt_choices.index(float(spec.dt))
    return sample_systems(rng, spec.shard_size, system=spec.system, planets=spec.planets,
                          priors=spec.priors, n_dt=len(spec.dt_choices), dt_index=dt_index,
                          fixed_star=spec.star == "fixed")


_LAYOUTS: dict = {}


def _layout(n_planets: np.ndarray, T: int, star_token: bool = True):
    """Token grid [S, T]: time step ``s``, slot ``j`` (j == K is the star), the planet and star masks and
    ``bodies`` (-1 marker/padding, 0 star, j >= 1 planet j). One row pattern per planet count (cached),
    gathered per system. ``star_token=False``: K slots per step, no star."""
    kmax = int(n_planets.max()) if len(n_planets) else 1
    key = (T, kmax, bool(star_token))
    if key not in _LAYOUTS:
        K = np.arange(1, kmax + 1)[:, None]
        t = np.arange(T)[None, :]
        per = K + int(star_token)
        s = (t - 1) // per
        j = (t - 1) % per
        valid = (t >= 1) & (s < (T - 1) // per)
        bodies = np.where(valid & (j < K), j + 1, np.where(valid & (j == K), 0, -1)).astype(np.int8)
        _LAYOUTS[key] = (s.astype(np.int32), j.astype(np.int32), valid & (j < K), valid & (j == K), bodies)
    return tuple(x[n_planets - 1] for x in _LAYOUTS[key])


def _pin_star(p: SystemParams) -> tuple[np.ndarray, np.ndarray]:
    """Initial star position [S, 2] (AU): K = 1 -> on its orbit about the centre of mass at t = 0;
    K > 1 -> pinned at a random point (phase ``pin_phase``) of the two-body orbit with planet
    ``pin_planet`` (METHOD.md §1.1). Also returns the relative states of planet 0 at t = 0 for K = 1."""
    S = len(p.m_star)
    rows = np.arange(S)
    jp = np.where(p.n_planets == 1, 0, p.pin_planet)
    mp = p.m_planet[rows, jp]
    mu = G * (mp + p.m_star)
    # K = 1: star position at t = 0 (phase 0); K > 1: a random phase along that orbit
    extra = np.where(p.n_planets == 1, 0.0, 2 * np.pi * p.pin_phase)
    rel, _ = physics.kepler_state(p.a[rows, jp], p.e[rows, jp], p.omega[rows, jp],
                                  p.mean_anomaly[rows, jp] + extra, mu)
    return p.com - (mp / (mp + p.m_star))[:, None] * rel


def _labels(spec: DatasetSpec, seed: int, k: int, rows: np.ndarray, index: np.ndarray,
            is_planet: np.ndarray) -> np.ndarray:
    full = spec.labelling.get("full_systems")
    labelled = is_planet.copy()
    if full is None:
        return labelled
    partial = index >= int(full)
    if partial.any():
        rng = np.random.default_rng([int(seed), int(k), _STREAM_LABELS])
        keys = rng.random((spec.shard_size, spec.seq_len))[rows]
        keys = np.where(is_planet, keys, np.inf)
        n = int(spec.labelling["partial_steps"])
        pick = np.argsort(keys, axis=1, kind="stable")[:, :n]
        chosen = np.zeros_like(is_planet)
        np.put_along_axis(chosen, pick, True, axis=1)
        chosen &= is_planet
        labelled[partial] = chosen[partial]
    return labelled


def _kepler_setup(p: SystemParams, fixed_star: bool = False):
    """Per-planet constants ``[S, K]`` of Kepler mode (``a, e, q = sqrt(1-e^2), cw, sw = cos/sin omega,
    n = mean motion, M0, mp`` and ``ms`` [S]) and where bodies are drawn: ``origin`` [S, 2] and the
    planet/star coefficients ``cp``, ``cs`` [S] (K = 1: planet = com + m_s/M rel, star = com - m_p/M rel;
    K > 1: planet = pin + rel, star = pin). ``fixed_star``: the star stays at ``com`` (origin = com, cp = 1,
    cs = 0) and ``mu = G m_s`` (test particles of a star held in place). Shared by the numpy path and
    :mod:`gravprobe.orbits.fused`."""
    ms = p.m_star
    if fixed_star:
        S = len(ms)
        mu = G * np.broadcast_to(ms[:, None], p.m_planet.shape)
        origin, cp, cs = p.com, np.ones(S), np.zeros(S)
    else:
        mu = G * (p.m_planet + ms[:, None])
        single = p.n_planets == 1
        origin = np.where(single[:, None], p.com, _pin_star(p))
        m1 = p.m_planet[:, 0]
        cp = np.where(single, ms / (m1 + ms), 1.0)
        cs = np.where(single, m1 / (m1 + ms), 0.0)
    consts = {"a": p.a, "e": p.e, "q": np.sqrt(1.0 - p.e * p.e), "cw": np.cos(p.omega), "sw": np.sin(p.omega),
              "n": np.sqrt(mu / p.a**3), "M0": p.mean_anomaly, "mp": p.m_planet, "ms": ms}
    return consts, origin, cp, cs


def _simulate_kepler(p: SystemParams, dts: np.ndarray, T: int, s, j, is_planet, is_star, fixed_star=False):
    """Kepler mode on the token grid [S, T] with whole-grid numpy arrays (the reference for
    :mod:`gravprobe.orbits.fused`, which gives the same bytes ~4x faster): positions [S, T, 2] and, per
    planet step, the relative position and velocity, planet and star masses and the star's force on the
    planet (tuples of [S, T] arrays, exactly zero at non-planet cells).

    Every cell of the grid is computed (non-planet cells read a sentinel orbit with a = n = 0 and zero
    masses, so their outputs are zeros without masking): ~20% extra Kepler solves, but no scatter into the
    grid, which is slower in numpy."""
    S, K = p.e.shape
    c, origin, cp, cs = _kepler_setup(p, fixed_star)
    consts = ((c["a"], 0.0), (c["e"], 0.0), (c["q"], 1.0), (c["cw"], 1.0), (c["sw"], 0.0), (c["n"], 0.0),
              (c["M0"], 0.0), (c["mp"], 0.0), (np.broadcast_to(c["ms"][:, None], (S, K)), 0.0))
    fi = np.where(is_planet, np.arange(S, dtype=np.int32)[:, None] * K + j, S * K)  # S*K: the sentinel
    a, e, q, cw, sw, n, M0, mp, msp = (np.take(np.append(c.ravel(), sentinel), fi) for c, sentinel in consts)
    t = s * dts[:, None]
    (x, y), (vx, vy) = physics._kepler_xy(a, e, q, cw, sw, n, M0 + n * t)
    positions = np.empty((S, T, 2))
    ox, oy = origin[:, 0, None], origin[:, 1, None]
    cpp, css = cp[:, None], cs[:, None]
    # the star token follows the last planet token of its time step: for K = 1 the star is opposite that
    # planet about the centre of mass; for K > 1 it is pinned (cs = 0)
    star = is_star[:, 1:]
    plan = is_planet
    positions[..., 0] = np.where(plan, ox + cpp * x, 0.0)
    positions[..., 1] = np.where(plan, oy + cpp * y, 0.0)
    positions[:, 1:, 0] = np.where(star, ox - css * x[:, :-1], positions[:, 1:, 0])
    positions[:, 1:, 1] = np.where(star, oy - css * y[:, :-1], positions[:, 1:, 1])
    r2 = x * x + y * y
    den = np.sqrt(r2)
    den *= r2
    num = mp * msp
    num *= -G
    kf = np.divide(num, den, out=np.zeros_like(den), where=is_planet)
    return positions, (x, y), (vx, vy), mp, msp, (kf * x, kf * y), np.zeros(S)


def _simulate_nbody(spec: DatasetSpec, p: SystemParams, dts: np.ndarray, T: int, s, j, is_planet, is_star):
    """N-body positions, relative states and total forces on the token grid (float64)."""
    S, K = p.e.shape
    real = p.planet_mask
    m = np.where(real, p.m_planet, 0.0)
    mu = G * (p.m_planet + p.m_star[:, None])
    rel0, vel0 = physics.kepler_state(p.a, p.e, p.omega, p.mean_anomaly, mu)  # [S, K, 2] heliocentric
    star0 = _pin_star(p)
    Mtot = p.m_star + m.sum(1)
    star_v0 = -(m[..., None] * vel0).sum(1) / Mtot[:, None]  # zero total momentum
    n_steps = (T - 1) // (p.n_planets + 1)
    pmin = np.where(real, physics.orbital_period(p.a, mu), np.inf).min(1)
    cfg = spec.nbody
    sub = physics.nbody_substeps(dts, pmin, float(cfg["steps_per_orbit"]), int(cfg["max_substeps"]))
    nmax = int(n_steps.max())
    planet_pos = np.zeros((S, K, nmax, 2))
    planet_vel = np.zeros((S, K, nmax, 2))
    star_pos = np.zeros((S, nmax, 2))
    star_vel = np.zeros((S, nmax, 2))
    err = np.zeros(S)
    # K = 1: the N-body problem is the two-body problem, solved exactly (energy error 0)
    one = np.nonzero(p.n_planets == 1)[0]
    if len(one):
        t = np.arange(nmax)[None, :] * dts[one, None]
        m1, ms1 = p.m_planet[one, 0], p.m_star[one]
        n1 = np.sqrt(mu[one, 0] / p.a[one, 0] ** 3)
        rel, vel = physics.kepler_state(p.a[one, 0, None], p.e[one, 0, None], p.omega[one, 0, None],
                                        p.mean_anomaly[one, 0, None] + n1[:, None] * t, mu[one, 0, None])
        frac = (m1 / (m1 + ms1))[:, None, None]
        star_pos[one] = p.com[one, None] - frac * rel
        star_vel[one] = -frac * vel
        planet_pos[one, 0] = star_pos[one] + rel
        planet_vel[one, 0] = star_vel[one] + vel
    todo = np.nonzero(p.n_planets > 1)[0]
    tol = float(cfg["energy_tolerance"])
    while len(todo):
        for nsub in np.unique(sub[todo]):
            g = todo[sub[todo] == nsub]
            g = g[np.argsort(-n_steps[g], kind="stable")]
            kg = int(p.n_planets[g].max())
            tr = physics.integrate_nbody(p.m_star[g], p.m_planet[g, :kg], star0[g], star_v0[g],
                                         star0[g, None] + rel0[g, :kg], star_v0[g, None] + vel0[g, :kg],
                                         dts[g], int(n_steps[g].max()), int(nsub), real=real[g, :kg],
                                         active_steps=n_steps[g])
            n_g = tr.star_pos.shape[1]
            planet_pos[g, :kg, :n_g], planet_vel[g, :kg, :n_g] = tr.planet_pos, tr.planet_vel
            star_pos[g, :n_g], star_vel[g, :n_g] = tr.star_pos, tr.star_vel
            err[g] = tr.energy_error
        redo = todo[(err[todo] > tol) & (sub[todo] < int(cfg["max_substeps"]))]
        sub[redo] = np.minimum(sub[redo] * 4, int(cfg["max_substeps"]))
        todo = redo
    # total force on each planet: star + other planets (steps past a system's end are zeros: ignore)
    err_state = np.seterr(divide="ignore", invalid="ignore")
    F = physics.gravity_force(planet_pos - star_pos[:, None], m[..., None], p.m_star[:, None, None])
    for k2 in range(K):
        d = planet_pos - planet_pos[:, k2:k2 + 1]
        r2 = (d**2).sum(-1)
        ok = real[:, :, None] & real[:, k2:k2 + 1, None] & (np.arange(K) != k2)[None, :, None]
        w = np.where(ok, -G * m[..., None] * m[:, k2:k2 + 1, None] / np.where(ok, r2 * np.sqrt(r2), 1.0), 0.0)
        F += w[..., None] * d
    np.seterr(**err_state)
    row, col = np.nonzero(is_planet)
    jj, ss = j[row, col], s[row, col]
    positions = np.zeros((S, T, 2))
    positions[row, col] = planet_pos[row, jj, ss]
    srow, scol = np.nonzero(is_star)
    positions[srow, scol] = star_pos[srow, s[srow, scol]]
    grid = np.zeros((8, S, T))
    grid[0:2, row, col] = (planet_pos[row, jj, ss] - star_pos[row, ss]).T
    grid[2:4, row, col] = (planet_vel[row, jj, ss] - star_vel[row, ss]).T
    grid[4, row, col] = p.m_planet[row, jj]
    grid[5, row, col] = p.m_star[row]
    grid[6:8, row, col] = F[row, jj, ss].T
    return positions, (grid[0], grid[1]), (grid[2], grid[3]), grid[4], grid[5], (grid[6], grid[7]), err


# Kepler-mode work is streamed through the CPU caches in chunks of about this many tokens: numpy
# temporaries of ~16k float64 stay in L2, which is ~4x faster than whole-shard arrays.
_CHUNK_TOKENS = 16384


def _build_nbody(spec: DatasetSpec, params: SystemParams, index, seed, block, rows) -> dict[str, np.ndarray]:
    """N-body mode: :func:`_build_chunk`, then the ``above_tolerance`` policy for systems whose energy drift
    still exceeds the tolerance at ``max_substeps``. A redrawn system's replacement is row ``rows[i]`` of
    the block's r-th redraw stream, so the result stays a pure function of (spec, seed, system index)."""
    cfg = spec.nbody
    tol = cfg["energy_tolerance"]
    out = _build_chunk(spec, params, index, seed, block, rows)
    redrawn = 0
    if cfg["above_tolerance"] == "redraw":
        for r in range(cfg["max_redraws"]):
            bad = np.nonzero(out["energy_error"] > tol)[0]
            if not len(bad):
                break
            redrawn += len(bad)
            fresh = _block_params(spec, seed, block, redraw=r).take(rows[bad])
            part = _build_chunk(spec, fresh, index[bad], seed, block, rows[bad])
            for name, a in part.items():
                out[name][bad] = a
    still = out["energy_error"] > tol
    if redrawn:
        log.info("nbody: %d redraws for systems above the energy tolerance %.1e at max_substeps=%d (close "
                 "encounters)", redrawn, tol, cfg["max_substeps"])
    if still.any():
        fix = ("raise data.nbody.max_redraws" if cfg["above_tolerance"] == "redraw" else
               "set data.nbody.above_tolerance=redraw to replace them")
        log.warning("nbody: %d of %d systems exceed the energy tolerance %.1e at max_substeps=%d (worst %.2e; "
                    "likely close planet-planet encounters); they are flagged in the energy_error array (%s)",
                    still.sum(), len(still), tol, cfg["max_substeps"], out["energy_error"].max(), fix)
    return out


def build_sequences(spec: DatasetSpec, params: SystemParams, *, index: np.ndarray | None = None,
                    seed: int = 0, block: int = 0, rows: np.ndarray | None = None,
                    out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Simulate and tokenise the systems ``params`` (S of them) into the arrays of the module docstring.

    ``index`` are the systems' global indices (for the labelling scheme), ``seed``/``block``/``rows``
    select the label random stream (rows within the block). ``out``: arrays to fill (``[S, ...]``, e.g.
    buffers reused across shards, which saves the page faults of fresh memory).
    """
    S = len(params.m_star)
    index = np.arange(S) if index is None else np.asarray(index)
    rows = np.arange(S) if rows is None else np.asarray(rows)
    if spec.mode == "kepler" and fused.kepler_engine() == "numba":
        return _build_fused(spec, params, index, seed, block, rows, out)
    chunk = S if spec.mode == "nbody" else max(1, _CHUNK_TOKENS // spec.seq_len)
    build = _build_nbody if spec.mode == "nbody" else _build_chunk
    if S <= chunk and out is None:
        return build(spec, params, index, seed, block, rows)
    for lo in range(0, S, chunk):
        sl = slice(lo, min(S, lo + chunk))
        part = build(spec, params.take(sl), index[sl], seed, block, rows[sl])
        if out is None:
            out = {k: np.empty((S,) + v.shape[1:], v.dtype) for k, v in part.items()}
        for k, v in part.items():
            out[k][sl] = v
    return out


_BUFFERS: dict = {}


def _output_shapes(spec: DatasetSpec, S: int) -> dict[str, tuple[tuple, Any]]:
    T = spec.seq_len
    return {"tokens": ((S, T, 2), spec.tokenizer.dtype), "positions": ((S, T, 2), np.float32),
            "states": ((S, T, 6), np.float32), "forces": ((S, T, 2), np.float32), "labelled": ((S, T), bool),
            "bodies": ((S, T), np.int8), "dt": ((S,), np.float64), "n_bodies": ((S,), np.int8),
            "energy_error": ((S,), np.float32)}


def _shard_buffers(spec: DatasetSpec, S: int) -> dict[str, np.ndarray]:
    """Per-process output buffers for a shard of S systems, reused from shard to shard."""
    shapes = _output_shapes(spec, S)
    out = {}
    for name, (shape, dtype) in shapes.items():
        key = (name, shape, np.dtype(dtype).str)
        if key not in _BUFFERS:
            _BUFFERS[key] = np.empty(shape, dtype)
        out[name] = _BUFFERS[key]
    if len(_BUFFERS) > 4 * len(shapes):  # keep at most a few shapes alive
        for key in list(_BUFFERS)[: len(_BUFFERS) - 2 * len(shapes)]:
            del _BUFFERS[key]
    return out


def _check_params(spec: DatasetSpec, params: SystemParams) -> None:
    """Typed errors for physically invalid systems (custom priors or parameters passed in)."""
    physics.check_eccentricity(params.e[params.planet_mask])
    physics.check_semi_major_axis(params.a[params.planet_mask])
    physics.check_masses(params.m_planet[params.planet_mask], "planet mass")
    physics.check_masses(params.m_star, "star mass")
    if spec.mode == "nbody" or spec.star == "fixed" or np.any(params.n_planets > 1):
        multi = params.n_planets > 1 if spec.mode == "kepler" and spec.star == "auto" else \
            np.ones(len(params.m_star), bool)
        physics.check_star_dominates(np.where(params.planet_mask, params.m_planet, 0.0)[multi],
                                     params.m_star[multi, None])


def _build_fused(spec: DatasetSpec, params: SystemParams, index, seed, block, rows,
                 out) -> dict[str, np.ndarray]:
    """Kepler mode through :mod:`gravprobe.orbits.fused`: every array written in place into ``out``."""
    S = len(params.m_star)
    _check_params(spec, params)
    if out is None:
        out = {name: np.empty(shape, dtype) for name, (shape, dtype) in _output_shapes(spec, S).items()}
    dts = np.asarray(spec.dt_choices)[params.dt_index]
    tok = spec.tokenizer
    if S:
        consts, origin, cp, cs = _kepler_setup(params, spec.star == "fixed")
        fused.fill_kepler(consts, params.n_planets, dts, origin, cp, cs, tok, tok.dt_id(params.dt_index), out,
                          star_token=spec.star_token)
    full = spec.labelling.get("full_systems")
    if full is not None and np.any(index >= int(full)):
        out["labelled"][...] = _labels(spec, seed, block, rows, index, out["labelled"].copy())
    out["dt"][...] = dts
    out["n_bodies"][...] = params.n_planets + 1
    out["energy_error"][...] = 0.0
    return out


def _build_chunk(spec: DatasetSpec, params: SystemParams, index, seed, block, rows) -> dict[str, np.ndarray]:
    T = spec.seq_len
    S = len(params.m_star)
    _check_params(spec, params)
    dts = np.asarray(spec.dt_choices)[params.dt_index]
    s, j, is_planet, is_star, bodies = _layout(params.n_planets, T, spec.star_token)
    if spec.mode == "nbody":
        sim = _simulate_nbody(spec, params, dts, T, s, j, is_planet, is_star)
    else:
        sim = _simulate_kepler(params, dts, T, s, j, is_planet, is_star, spec.star == "fixed")
    positions, rel, vel, mp, ms, forces, err = sim

    tok = spec.tokenizer
    valid = is_planet | is_star
    tokens = tok.encode(positions)
    np.copyto(tokens, tok.pad_id, where=~valid[..., None])
    tokens[:, 0, :] = tok.dt_id(params.dt_index)[:, None]
    states = np.empty((S, T, 6), dtype=np.float32)
    for c, col in enumerate((*rel, *vel, mp, ms)):  # the simulators return zeros at non-planet cells
        states[..., c] = col
    F = np.empty((S, T, 2), dtype=np.float32)
    for c, col in enumerate(forces):
        F[..., c] = col
    return {
        "tokens": tokens,
        "positions": positions.astype(np.float32),
        "states": states,
        "forces": F,
        "labelled": _labels(spec, seed, block, rows, index, is_planet),
        "bodies": bodies,
        "dt": dts.astype(np.float64),
        "n_bodies": (params.n_planets + 1).astype(np.int8),
        "energy_error": np.asarray(err, dtype=np.float32),
    }


def generate_arrays(spec: DatasetSpec, seed: int, start: int = 0,
                    count: int | None = None) -> dict[str, np.ndarray]:
    """Arrays of systems ``[start, start + count)`` in memory (``count=None``: up to ``n_systems``).

    A pure function of (spec, seed, system index): the same systems as the on-disk dataset, whatever
    the range asked for. Indices beyond ``n_systems`` are allowed (more systems of the same distribution).
    Changing only ``seq_len`` keeps every system's parameters (longer or shorter trajectories of the same
    systems; the partial-labelling choice does change).
    """
    count = spec.n_systems - start if count is None else int(count)
    if start < 0 or count < 0:
        raise ValueError(f"need start >= 0 and count >= 0, got start={start}, count={count}")
    stop = start + count
    if count == 0:
        return build_sequences(spec, _block_params(spec, seed, 0).take(slice(0, 0)), seed=seed)
    ss = spec.shard_size
    blocks = range(start // ss, -(-stop // ss))
    out = None
    for k in blocks:
        lo, hi = max(start, k * ss), min(stop, (k + 1) * ss)
        params = _block_params(spec, seed, k)
        rows = np.arange(lo - k * ss, hi - k * ss)
        views = None if out is None else {name: a[lo - start:hi - start] for name, a in out.items()}
        part = build_sequences(spec, params.take(rows), index=np.arange(lo, hi), seed=seed, block=k, rows=rows,
                               out=views)
        if out is None:
            if len(blocks) == 1:
                return part
            # allocate the whole range once, then let every later block write into its slice
            out = {name: np.empty((count,) + a.shape[1:], a.dtype) for name, a in part.items()}
            for name, a in part.items():
                out[name][: hi - start] = a
    return out


def star_wobble_bins(spec: DatasetSpec, seed: int = 0, start: int = 0, count: int | None = None) -> np.ndarray:
    """The star's wobble ``a m_1 / (m_1 + m_s)`` (the semi-major axis of its orbit about the centre of mass)
    in bins of the spec's tokenizer, per system ``[count]`` (systems ``[start, start + count)``, default all
    of ``n_systems``), from the same parameters as the dataset. 0 where the star does not move with planet 1
    (``star: fixed``, or K > 1 in kepler mode, where it is pinned). A planet's mass can only leave a trace in
    the tokens where this is well above 1 (e.g. >= 2 bins)."""
    count = spec.n_systems - start if count is None else int(count)
    ss = spec.shard_size
    out = np.zeros(count)
    for k in range(start // ss, -(-(start + count) // ss)):
        lo, hi = max(start, k * ss), min(start + count, (k + 1) * ss)
        p = _block_params(spec, seed, k).take(np.arange(lo - k * ss, hi - k * ss))
        m1 = p.m_planet[:, 0]
        w = p.a[:, 0] * m1 / (m1 + p.m_star)
        moves = (p.n_planets == 1) | (spec.mode == "nbody")
        out[lo - start:hi - start] = np.where(moves & (spec.star == "auto"), w, 0.0) / spec.tokenizer.bin_width
    return out


# -------------------------------------------------------------------------------------------- on disk
def dataset_dir(spec: DatasetSpec, seed: int) -> Path:
    """Where the pipeline keeps a dataset: ``output_root()/data/<name>-<spec_hash[:8]>-s<seed>``."""
    from gravprobe.common import output_root

    return output_root() / "data" / f"{spec.name}-{spec.spec_hash()[:8]}-s{int(seed)}"


def repair_command(path: Path) -> str:
    return f"python -m gravprobe.orbits repair {path}"


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _write_shard(spec_dict: dict, seed: int, k: int, out: str) -> dict:
    """Worker: build shard k, write it to a temporary folder, then rename it into place atomically."""
    from gravprobe.common import sha256_file

    spec = DatasetSpec.from_config(spec_dict)
    start, stop = spec.shard_range(k)
    rows = np.arange(stop - start)
    arrays = build_sequences(spec, _block_params(spec, seed, k).take(rows), index=np.arange(start, stop),
                             seed=seed, block=k, rows=rows, out=_shard_buffers(spec, stop - start))
    out = Path(out)
    final = out / _shard_name(k)
    tmp = out / f".tmp-{_shard_name(k)}-{os.getpid()}"
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
    return {"index": k, "start": start, "count": stop - start, "files": files}


def _check_shard(out: Path, rec: dict, verify: bool, names=ARRAYS) -> str | None:
    """None if shard ``rec`` on disk holds the arrays ``names`` as its manifest record says, else the reason."""
    from gravprobe.common import sha256_file

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
    from gravprobe.common import code_version

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


def ensure_dataset(spec: DatasetSpec, out: str | os.PathLike, *, seed: int, workers: int = 0,
                   verify: bool = True, progress: bool = True) -> Path:
    """Make sure ``out`` holds the complete dataset of (spec, seed); return ``out``.

    Reuses a complete dataset whose manifest matches (checking sha256 checksums when ``verify``),
    resumes an incomplete one (verified shards are kept, the rest regenerated), and raises
    :class:`DatasetError` if ``out`` holds a dataset of another spec or seed. ``workers``: processes
    (0 = all cores); the bytes do not depend on it.
    """
    from gravprobe.common import atomic_write_json, code_version

    out = Path(out).expanduser().resolve()
    man = _read_manifest(out)
    if man is None and out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} exists, is not empty and holds no manifest.json; choose another folder "
                           "(out=PATH) or delete it")
    if man is not None:
        why = _spec_mismatch(man, spec, seed)
        if why:
            raise DatasetError(f"{out} already holds a dataset with {why}; write to another folder "
                               "(out=PATH) or delete it")
        if man.get("code_version") != code_version():
            log.info("dataset %s was written by %s (now %s)", out, man.get("code_version"), code_version())
    else:
        man = _new_manifest(spec, seed)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-shard-*"):
        shutil.rmtree(stale, ignore_errors=True)
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
    man["complete"] = False
    atomic_write_json(out / "manifest.json", man)
    nproc = min(len(todo), workers if workers and workers > 0 else (os.cpu_count() or 1)) or 1
    log.info("generating %s: %d of %d shards to write (%d systems, seq_len %d) with %d process(es) -> %s",
             spec.name, len(todo), spec.n_shards, spec.n_systems, spec.seq_len, nproc, out)
    from gravprobe.common import progress as progress_bar

    bar = progress_bar(total=len(todo), desc=f"generate {spec.name}", unit="shard", disable=not progress)
    spec_dict = spec.to_dict()
    try:
        if nproc == 1:
            results = (_write_shard(spec_dict, seed, k, str(out)) for k in todo)
            pool = None
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(nproc)
            results = pool.imap_unordered(_write_shard_star, [(spec_dict, seed, k, str(out)) for k in todo])
        # the manifest records each finished shard, so a resume keeps it; rewriting it (fsync'ed JSON that
        # grows with the shard count) is spaced so that it takes at most ~10% of the time: after every
        # shard while it is small, less often for 10M-sequence datasets (a kill then loses the few
        # shards finished since the last write, which the resume regenerates)
        pending, last, cost = 0, 0.0, 0.0
        for rec in results:
            man["shards"][rec["index"]] = rec
            pending += 1
            bar.update(1)
            if time.perf_counter() - last >= 10 * cost:
                t0 = time.perf_counter()
                atomic_write_json(out / "manifest.json", man)
                pending, last = 0, time.perf_counter()
                cost = last - t0
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        if "pool" in locals() and pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        if "pending" in locals() and pending:
            atomic_write_json(out / "manifest.json", man)
    man["complete"] = True
    man["code_version"] = code_version()
    atomic_write_json(out / "manifest.json", man)
    return out


def _write_shard_star(args) -> dict:
    return _write_shard(*args)


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
