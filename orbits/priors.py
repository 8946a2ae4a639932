"""The priors of METHOD.md §1.2 (the literature's pretraining distribution) and the solar-system preset.

Every draw goes through an explicit :class:`numpy.random.Generator`; scipy.stats distributions take it as
``random_state``. Draws happen in a fixed order with fixed shapes (``[n, K_max]`` for per-planet
quantities, whatever the drawn planet count), so that a system's parameters depend only on the generator
state, never on the sequence length or on how many planets a neighbour has.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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

    def take(self, idx) -> "SystemParams":
        return SystemParams(**{k: v[idx] for k, v in self.__dict__.items()})

    @property
    def planet_mask(self) -> np.ndarray:
        """[n, K_max] bool: which padded planet slots are real."""
        return np.arange(self.e.shape[1])[None, :] < self.n_planets[:, None]


def sample_systems(rng: np.random.Generator, n: int, *, system: str = "prior", planets=(1, 10),
                   priors: dict | None = None, n_dt: int = 2, dt_index: int | None = None) -> SystemParams:
    """Draw ``n`` systems. ``system="prior"``: METHOD.md §1.2 priors (``planets`` = [K_min, K_max]);
    ``system="solar_system"``: the eight planets with fixed masses, a and e, star 1 Msun; orientations,
    phases, centre of mass and the star's pin point are random in both. ``dt_index`` fixes the time step
    (else uniform over the ``n_dt`` choices)."""
    p = {**DEFAULT_PRIORS, **(priors or {})}
    if system == "prior":
        kmin, kmax = int(planets[0]), int(planets[1])
        if not 1 <= kmin <= kmax:
            raise ValueError(f"planets must be [K_min, K_max] with 1 <= K_min <= K_max, got {list(planets)}")
        shape = (n, kmax)
        n_planets = rng.integers(kmin, kmax + 1, size=n)
        pe = p["eccentricity"]
        e = stats.beta(pe["a"], pe["b"]).rvs(size=shape, random_state=rng)
        pa = p["semi_major_axis"]
        a = stats.uniform(pa["low"], pa["high"] - pa["low"]).rvs(size=shape, random_state=rng)
        pm = p["planet_mass"]
        m_planet = np.clip(stats.gamma(pm["shape"], loc=pm["loc"], scale=pm["scale"]).rvs(
            size=shape, random_state=rng), *pm["clip"])
        ps = p["star_mass"]
        m_star = np.clip(stats.lognorm(ps["s"], loc=ps["loc"], scale=ps["scale"]).rvs(
            size=n, random_state=rng), *ps["clip"])
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
