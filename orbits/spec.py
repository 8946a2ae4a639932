"""The dataset spec: everything that determines a dataset's bytes (together with the seed).

:class:`DatasetSpec` validates itself on construction (typed errors naming the ``data.<key>`` at fault) and
gives the canonical dict and hash that name a dataset (:meth:`DatasetSpec.spec_hash`). The arrays it
describes are built by :mod:`gravprobe.orbits.build` and stored by :mod:`gravprobe.orbits.store`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gravprobe.orbits import physics
from gravprobe.orbits.priors import DEFAULT_PRIORS, check_priors, mass_bounds, merge_priors, prior_dist
from gravprobe.orbits.tokens import OrbitTokenizer

MODES = ("kepler", "nbody")
SYSTEMS = ("prior", "solar_system")
ARRAYS = ("tokens", "positions", "states", "forces", "labelled", "bodies", "dt", "n_bodies", "energy_error")
PER_SYSTEM = ("dt", "n_bodies", "energy_error")  # always stored (``DatasetSpec.arrays`` selects the rest)
# nbody keys added later, with the defaults that keep earlier behaviour (and spec hashes)
_NBODY_ADDED = {"above_tolerance": "keep", "max_redraws": 8}
# top-level keys added later, with the defaults that keep earlier behaviour (left out of the spec dict there)
_SPEC_ADDED = {"star": "auto", "star_token": True}
STARS = ("auto", "fixed")


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
    def from_config(cls, cfg: Any) -> DatasetSpec:
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

    def replace(self, **changes) -> DatasetSpec:
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
