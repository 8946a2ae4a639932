"""The priors of METHOD.md §1.2 (the literature's pretraining distribution) and the solar-system preset.

Every draw goes through an explicit :class:`numpy.random.Generator`; scipy.stats distributions take it as
``random_state``. Draws happen in a fixed order with fixed shapes (``[n, K_max]`` for per-planet
quantities, whatever the drawn planet count), so that a system's parameters depend only on the generator
state, never on the sequence length or on how many planets a neighbour has.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

import numpy as np
from gravprobe.orbits import physics
from gravprobe.orbits.physics import G
from scipy import stats

# METHOD.md §1.2 (facts: the literature's pretraining distribution)
DEFAULT_PRIORS: dict = {
    "eccentricity": {"a": 0.867, "b": 3.03},  # Beta(a, b)
    "semi_major_axis": {"low": 0.3, "high": 32.0},  # U(low, high) AU
    "planet_mass": {"shape": 0.3202016, "loc": 6.009815e-8, "scale": 1.105595e-3,
                    "clip": [1e-9, 1e-3]},  # Gamma, Msun
    "star_mass": {"s": 0.2004501, "loc": -0.6793606, "scale": 1.6271509, "clip": [0.1, 5.0]},  # LogNormal
    "com_sigma": 1.0,  # centre of mass ~ N(0, sigma^2 I_2) AU
}

# Mercury ... Neptune (METHOD.md §1.2)
SOLAR_SYSTEM = {
    "names": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "planet_mass": [1.652e-7, 2.447e-6, 3.003e-6, 3.213e-7, 9.544e-4, 2.857e-4, 4.354e-5, 5.165e-5],
    "semi_major_axis": [0.387, 0.723, 1.000, 1.524, 5.203, 9.537, 19.189, 30.069],
    "eccentricity": [0.205, 0.007, 0.017, 0.093, 0.048, 0.054, 0.047, 0.009],
    "star_mass": 1.0,
}


@dataclass
class SystemParams:
    """Parameters of n systems with up to ``K_max`` planets (planet arrays ``[n, K_max]``, padded).

    ``n_planets`` [n]; ``e``, ``a`` (AU), ``m_planet`` (Msun), ``omega`` (argument of periapsis, rad),
    ``mean_anomaly`` (at t = 0, rad: the random phase offset U(0, period) as an angle) ``[n, K_max]``;
    ``m_star`` [n] Msun; ``dt_index`` [n] (index into the spec's ``dt_choices``); ``com`` [n, 2] AU;
    ``pin_planet`` [n] and ``pin_phase`` [n] (fraction of that planet's period) place the fixed star.
    """

    n_planets: np.ndarray
    e: np.ndarray
    a: np.ndarray
    m_planet: np.ndarray
    m_star: np.ndarray
    dt_index: np.ndarray
    omega: np.ndarray
    mean_anomaly: np.ndarray
    com: np.ndarray
    pin_planet: np.ndarray
    pin_phase: np.ndarray

    def take(self, idx) -> SystemParams:
        return SystemParams(**{k: v[idx] for k, v in self.__dict__.items()})

    @property
    def planet_mask(self) -> np.ndarray:
        """[n, K_max] bool: which padded planet slots are real."""
        return np.arange(self.e.shape[1])[None, :] < self.n_planets[:, None]


# The distribution each prior uses when its ``dist`` key is absent (today's presets, METHOD.md §1.2); other
# ``dist`` values are this project's additions, each with its own keys (see :func:`check_priors`).
DEFAULT_DIST = {"eccentricity": "beta", "semi_major_axis": "uniform", "planet_mass": "gamma",
                "star_mass": "lognormal"}
PRIOR_KEYS = {
    "eccentricity": {"beta": {"a", "b"}, "uniform": {"low", "high"}},
    "semi_major_axis": {"uniform": {"low", "high"}, "period_uniform": {"low", "high"}},
    "planet_mass": {"gamma": {"shape", "loc", "scale", "clip"}, "fixed": {"value"},
                    "loguniform": {"low", "high"}, "ratio_loguniform": {"low", "high"}},
    "star_mass": {"lognormal": {"s", "loc", "scale", "clip"}, "fixed": {"value"},
                  "loguniform": {"low", "high"}},
}


def prior_dist(priors: dict, name: str) -> str:
    """The distribution of prior ``name`` (``priors[name]["dist"]``, else :data:`DEFAULT_DIST`)."""
    return priors[name].get("dist", DEFAULT_DIST[name])


def merge_priors(given: dict | None) -> dict:
    """:data:`DEFAULT_PRIORS` updated by ``given``: a prior whose ``dist`` differs from the default replaces
    the default entry (no Beta parameters left beside a uniform range); one with the default ``dist`` (or
    none) is merged key by key, and an explicit default ``dist`` is dropped (so that specs, and their hashes,
    do not change by spelling it)."""
    out = json.loads(json.dumps(DEFAULT_PRIORS))
    for k, v in dict(given or {}).items():
        if isinstance(v, dict) and k in DEFAULT_DIST:
            v = dict(v)
            if v.get("dist", DEFAULT_DIST[k]) == DEFAULT_DIST[k]:
                v.pop("dist", None)
                out[k] = {**out[k], **v}
            else:
                out[k] = v
        else:
            out[k] = v
    return out


# Valid values of every numeric prior key: (lower bound, strict, upper bound or None, unit, example fix).
# ``clip`` is checked apart (a pair 0 < low <= high).
_KEY_RANGES = {
    ("eccentricity", "beta", "a"): (0.0, True, None, "", DEFAULT_PRIORS["eccentricity"]["a"]),
    ("eccentricity", "beta", "b"): (0.0, True, None, "", DEFAULT_PRIORS["eccentricity"]["b"]),
    ("planet_mass", "gamma", "shape"): (0.0, True, None, "", DEFAULT_PRIORS["planet_mass"]["shape"]),
    ("planet_mass", "gamma", "loc"): (None, False, None, " Msun", DEFAULT_PRIORS["planet_mass"]["loc"]),
    ("planet_mass", "gamma", "scale"): (0.0, True, None, " Msun", DEFAULT_PRIORS["planet_mass"]["scale"]),
    ("planet_mass", "fixed", "value"): (0.0, True, None, " Msun", 3e-6),
    ("star_mass", "lognormal", "s"): (0.0, True, None, "", DEFAULT_PRIORS["star_mass"]["s"]),
    ("star_mass", "lognormal", "loc"): (None, False, None, " Msun", DEFAULT_PRIORS["star_mass"]["loc"]),
    ("star_mass", "lognormal", "scale"): (0.0, True, None, " Msun", DEFAULT_PRIORS["star_mass"]["scale"]),
    ("star_mass", "fixed", "value"): (0.0, True, None, " Msun", 1.0),
}
# low/high ranges: (smallest low, is it strict, high must stay below, unit, example fix "low, high")
_RANGE_BOUNDS = {
    ("eccentricity", "uniform"): (0.0, False, 1.0, "", "0.0, 0.6"),
    ("semi_major_axis", "uniform"): (0.0, True, None, " AU", "0.3, 32.0"),
    ("semi_major_axis", "period_uniform"): (0.0, True, None, " yr", "1.0, 2.0"),
    ("planet_mass", "loguniform"): (0.0, True, None, " Msun", "1e-7, 1e-3"),
    ("planet_mass", "ratio_loguniform"): (0.0, True, None, " (m_p / m_s)", "0.02, 1.0"),
    ("star_mass", "loguniform"): (0.0, True, None, " Msun", "0.5, 2.0"),
}
_ERRORS = {"eccentricity": physics.EccentricityError, "semi_major_axis": physics.SemiMajorAxisError,
           "planet_mass": physics.MassError, "star_mass": physics.MassError}


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)) \
        and bool(np.isfinite(x))


def _bound_text(lo, strict: bool, hi, unit: str, what: str = "value") -> str:
    parts = []
    if lo is not None:
        parts.append(f"{what} {'>' if strict else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{what} < {hi:g}")
    return (" and ".join(parts) or f"any finite {what}") + unit


def _check_range(prefix: str, name: str, dist: str, p: dict) -> None:
    """``low``/``high`` of a uniform-type prior; messages name ``<prefix>.<name>.low`` / ``.high``."""
    err = _ERRORS[name]
    lo_min, strict, hi_max, unit, example = _RANGE_BOUNDS[name, dist]
    lo, hi = p.get("low"), p.get("high")
    key = f"{prefix}.{name}"
    valid = (f"valid: {lo_min:g} {'<' if strict else '<='} low < high" + (f" < {hi_max:g}" if hi_max is not None
                                                                             else "") + unit)
    fix = f"fix: e.g. {key}.low={example.split(', ')[0]} {key}.high={example.split(', ')[1]}"
    bad = [k for k, v in (("low", lo), ("high", hi)) if not _is_number(v)]
    if bad or not lo < hi:
        which = ", ".join(f"{key}.{k}" for k in (bad or ["low", "high"]))
        raise err(f"{key}: {dist} needs numbers low < high, got low={lo!r}, high={hi!r} ({which}); {valid}; "
                  f"{fix}")
    if strict and lo <= lo_min:
        raise err(f"{key}: {dist} needs low > {lo_min:g}, got {key}.low={lo!r}{unit}; {valid}; "
                  f"fix: set {key}.low "
                  f"to a positive number, e.g. {example.split(', ')[0]}")
    if not strict and lo < lo_min:
        why = "; an eccentricity is never negative" if name == "eccentricity" else ""
        raise err(f"{key}: low={lo} must be >= {lo_min:g} ({key}.low{why}); "
                  f"{valid}; fix: e.g. {key}.low={lo_min:g}")
    if hi_max is not None and hi >= hi_max:
        raise err(f"{key}: high={hi} must be < {hi_max:g} ({key}.high; e >= 1 is an unbound orbit); {valid}; "
                  f"fix: e.g. {key}.high=0.95")


def _check_clip(prefix: str, name: str, p: dict) -> None:
    key = f"{prefix}.{name}.clip"
    c = p.get("clip")
    ok = isinstance(c, (list, tuple, np.ndarray)) and len(c) == 2 and all(_is_number(x) for x in c)
    if not ok or not 0 < c[0] <= c[1]:
        raise physics.MassError(f"{key}={c!r} must be two masses [low, high] with 0 < low <= high (Msun): draws "
                                "are clipped into that range; fix: e.g. "
                                f"{key}={list(DEFAULT_PRIORS[name]['clip'])}")


def validate_priors(priors: dict, key_prefix: str = "data.priors") -> None:
    """Check merged priors (see :func:`merge_priors`) without drawing anything; raise an error naming the
    config key (``<key_prefix>.<prior>.<key>``), its value, the valid range and a fix.

    Unknown prior names, unknown distributions and unknown or missing keys raise ``ValueError``; values
    out of range raise the physics error of the quantity (:class:`~gravprobe.orbits.physics.EccentricityError`,
    ``SemiMajorAxisError``, ``MassError``; ``e`` must stay in [0, 1), masses, semi-major axes, periods and
    distribution scales positive); ``com_sigma`` must be a finite number >= 0 (AU). ``key_prefix`` is how
    the caller spells the priors: ``data.priors`` for a dataset spec, ``priors`` for :func:`sample_systems`.
    """
    if not isinstance(priors, dict):
        raise TypeError(f"{key_prefix} must be a mapping of prior name -> settings, got {priors!r}")
    known = set(PRIOR_KEYS) | {"com_sigma"}
    unknown = sorted(set(priors) - known)
    if unknown:
        hints = {u: difflib.get_close_matches(str(u), known, n=1) for u in unknown}
        hint = "; ".join(f"did you mean {key_prefix}.{h[0]} for {u!r}?" for u, h in hints.items() if h)
        raise ValueError(f"{key_prefix} has unknown prior(s) {unknown}; valid: {sorted(known)}"
                         f"{'; ' + hint if hint else ''}")
    for name, dists in PRIOR_KEYS.items():
        key = f"{key_prefix}.{name}"
        if name not in priors:
            raise ValueError(f"{key} is missing; give every prior of {sorted(PRIOR_KEYS)} (merge_priors() fills "
                             "in the defaults)")
        p = priors[name]
        if not isinstance(p, dict):
            raise TypeError(f"{key} must be a mapping, got {p!r}")
        dist = p.get("dist", DEFAULT_DIST[name])
        if not isinstance(dist, str) or dist not in dists:
            raise ValueError(f"{key}.dist={dist!r} is unknown; choose one of {sorted(dists)}")
        keys = set(p) - {"dist"}
        if keys != dists[dist]:
            raise ValueError(f"{key} ({dist}) takes keys {sorted(dists[dist])}, "
                             f"got {sorted(keys)}"
                             f"{'; drop ' + str(sorted(keys - dists[dist])) if keys - dists[dist] else ''}"
                             f"{'; add ' + str(sorted(dists[dist] - keys)) if dists[dist] - keys else ''}")
        if (name, dist) in _RANGE_BOUNDS:
            _check_range(key_prefix, name, dist, p)
        if dist in ("gamma", "lognormal"):
            _check_clip(key_prefix, name, p)
        for k in sorted(dists[dist]):
            if (name, dist, k) not in _KEY_RANGES:
                continue
            lo, strict, hi, unit, example = _KEY_RANGES[name, dist, k]
            v = p[k]
            if not _is_number(v) or (lo is not None and (v <= lo if strict else v < lo)):
                what = {"beta": "Beta(a, b)", "gamma": "the Gamma distribution",
                        "lognormal": "the log-normal distribution", "fixed": "a fixed mass"}[dist]
                need = _bound_text(lo, strict, hi, unit, k)
                raise _ERRORS[name](f"{key}.{k}={v!r} is out of range: {what} needs {need} (a finite number); "
                                    f"fix: e.g. {key}.{k}={example:g}")
    sigma = priors.get("com_sigma", DEFAULT_PRIORS["com_sigma"])
    if not _is_number(sigma) or sigma < 0:
        raise ValueError(f"{key_prefix}.com_sigma={sigma!r} is out of range: the centre of mass is drawn from "
                         "N(0, sigma^2 I) AU, so sigma must be a finite number >= 0 AU (0: at the origin); "
                         "fix: e.g. "
                         f"{key_prefix}.com_sigma={DEFAULT_PRIORS['com_sigma']:g}")


def check_priors(priors: dict) -> None:
    """:func:`validate_priors` of a dataset spec's priors (keys named ``data.priors.<prior>.<key>``)."""
    validate_priors(priors, "data.priors")


def mass_bounds(priors: dict, name: str) -> tuple[float, float]:
    """Smallest and largest mass (Msun) prior ``name`` can give (``ratio_loguniform``: the ratio's range)."""
    p = priors[name]
    dist = prior_dist(priors, name)
    if dist == "fixed":
        return float(p["value"]), float(p["value"])
    if dist in ("loguniform", "ratio_loguniform"):
        return float(p["low"]), float(p["high"])
    return float(p["clip"][0]), float(p["clip"][1])


def _loguniform(rng: np.random.Generator, low: float, high: float, size) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size=size))


def sample_systems(rng: np.random.Generator, n: int, *, system: str = "prior", planets=(1, 10),
                   priors: dict | None = None, n_dt: int = 2, dt_index: int | None = None,
                   fixed_star: bool = False) -> SystemParams:
    """Draw ``n`` systems. ``system="prior"``: METHOD.md §1.2 priors (``planets`` = [K_min, K_max]);
    ``system="solar_system"``: the eight planets with fixed masses, a and e, star 1 Msun; orientations,
    phases, centre of mass and the star's pin point are random in both. ``dt_index`` fixes the time step
    (else uniform over the ``n_dt`` choices).

    Besides the defaults, ``priors`` may choose (key ``dist``): ``eccentricity: uniform {low, high}``;
    ``semi_major_axis: period_uniform {low, high}`` (the orbital period ``P ~ U(low, high)`` yr, and
    ``a = (mu P^2 / 4 pi^2)^(1/3)`` from Kepler's third law with ``mu = G (m_p + m_s)``, or ``G m_s`` for a
    ``fixed_star``); ``planet_mass``: ``fixed {value}``, ``loguniform {low, high}`` (Msun) or
    ``ratio_loguniform {low, high}`` (``m_p = q m_s``, ``q`` log-uniform); ``star_mass``: ``fixed {value}`` or
    ``loguniform {low, high}``. The default distributions draw exactly as before (same numbers)."""
    # validation draws nothing: the generator's state (and so every draw below) is unchanged
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), "
                        f"got {rng!r}")
    n = physics._check_count("n (number of systems)", n, 0)
    n_dt = physics._check_count("n_dt (number of time steps)", n_dt, 1)
    if dt_index is not None and not (physics._check_count("dt_index", dt_index, 0) < n_dt):
        raise ValueError(f"dt_index={dt_index} must be None or an index into the {n_dt} time steps, "
                         f"0..{n_dt - 1}")
    p = merge_priors(priors)
    validate_priors(p, "priors")
    if system == "prior":
        if isinstance(planets, (str, bytes)) or np.ndim(planets) != 1 or len(planets) != 2:
            raise ValueError(f"planets must be [K_min, K_max] with 1 <= K_min <= K_max, got {planets!r}")
        kmin = physics._check_count("planets[0] (K_min)", planets[0], 1)
        kmax = physics._check_count("planets[1] (K_max)", planets[1], 1)
        if not 1 <= kmin <= kmax:
            raise ValueError(f"planets must be [K_min, K_max] with 1 <= K_min <= K_max, got {list(planets)}")
        shape = (n, kmax)
        n_planets = rng.integers(kmin, kmax + 1, size=n)
        pe = p["eccentricity"]
        if prior_dist(p, "eccentricity") == "beta":
            e = stats.beta(pe["a"], pe["b"]).rvs(size=shape, random_state=rng)
        else:  # uniform
            e = rng.uniform(pe["low"], pe["high"], size=shape)
        pa = p["semi_major_axis"]
        a = stats.uniform(pa["low"], pa["high"] - pa["low"]).rvs(size=shape, random_state=rng)
        pm = p["planet_mass"]
        pm_dist = prior_dist(p, "planet_mass")
        if pm_dist == "gamma":
            m_planet = np.clip(stats.gamma(pm["shape"], loc=pm["loc"], scale=pm["scale"]).rvs(
                size=shape, random_state=rng), *pm["clip"])
        elif pm_dist == "fixed":
            m_planet = np.full(shape, float(pm["value"]))
        else:  # loguniform (Msun) or ratio_loguniform (q, multiplied by m_s below)
            m_planet = _loguniform(rng, pm["low"], pm["high"], shape)
        ps = p["star_mass"]
        ps_dist = prior_dist(p, "star_mass")
        if ps_dist == "lognormal":
            m_star = np.clip(stats.lognorm(ps["s"], loc=ps["loc"], scale=ps["scale"]).rvs(
                size=n, random_state=rng), *ps["clip"])
        elif ps_dist == "fixed":
            m_star = np.full(n, float(ps["value"]))
        else:
            m_star = _loguniform(rng, ps["low"], ps["high"], n)
        if pm_dist == "ratio_loguniform":
            m_planet = m_planet * m_star[:, None]
        if prior_dist(p, "semi_major_axis") == "period_uniform":
            mu = G * (m_star[:, None] if fixed_star else m_planet + m_star[:, None])
            a = np.cbrt(mu * a * a / (4.0 * np.pi**2))  # ``a`` held the periods (yr)
    elif system == "solar_system":
        kmax = len(SOLAR_SYSTEM["names"])
        shape = (n, kmax)
        n_planets = np.full(n, kmax)
        e = np.broadcast_to(np.asarray(SOLAR_SYSTEM["eccentricity"]), shape).copy()
        a = np.broadcast_to(np.asarray(SOLAR_SYSTEM["semi_major_axis"]), shape).copy()
        m_planet = np.broadcast_to(np.asarray(SOLAR_SYSTEM["planet_mass"]), shape).copy()
        m_star = np.full(n, float(SOLAR_SYSTEM["star_mass"]))
    else:
        raise ValueError(f"unknown system {system!r}; choose 'prior' or 'solar_system'")
    dti = rng.integers(0, n_dt, size=n) if dt_index is None else np.full(n, int(dt_index))
    omega = rng.uniform(0.0, 2 * np.pi, size=shape)
    mean_anomaly = 2 * np.pi * rng.uniform(0.0, 1.0, size=shape)
    com = rng.normal(0.0, float(p["com_sigma"]), size=(n, 2))
    pin_planet = np.minimum((rng.uniform(0.0, 1.0, size=n) * n_planets).astype(np.int64), n_planets - 1)
    pin_phase = rng.uniform(0.0, 1.0, size=n)
    return SystemParams(n_planets=n_planets.astype(np.int64), e=e, a=a, m_planet=m_planet, m_star=m_star,
                        dt_index=dti.astype(np.int64), omega=omega, mean_anomaly=mean_anomaly, com=com,
                        pin_planet=pin_planet, pin_phase=pin_phase)
