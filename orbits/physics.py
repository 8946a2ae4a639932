"""Gravitational physics in 2-D, vectorised over whole batches with numpy (float64).

Units everywhere: lengths in AU, times in years, masses in solar masses, so that
``G = 4 pi^2 AU^3 yr^-2 Msun^-1``; velocities are AU/yr and forces Msun AU/yr^2.

Three ways to move bodies (METHOD.md §1.1):

* :func:`kepler_state` — the exact two-body solution of a relative orbit from orbital elements, solving
  Kepler's equation ``E - e sin E = M`` by Newton iterations on whole arrays (:func:`solve_kepler`).
* :func:`integrate_nbody` — planets that also attract each other, integrated with the symplectic
  Wisdom–Holman map in democratic heliocentric coordinates (Duncan, Levison & Lee 1998): an exact
  Kepler drift about the star (universal variables, :func:`kepler_drift`), planet–planet kicks and the
  star's "jump" drift, in a second-order ``jump/2 kick/2 drift kick/2 jump/2`` splitting with a fixed
  number of sub-steps per output step. With one planet the planet–planet term vanishes and the map's only
  error is the splitting of the star's recoil, ``O(m_p/m_s * (h/P)^2)``.
* :class:`PlanetarySystem` — the user-facing object (orbital-element or Cartesian constructors) that
  returns trajectories from either method.

Invalid physics raises a subclass of :class:`PhysicsError` (itself a ``ValueError``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

G = 4.0 * np.pi**2
"""Gravitational constant in AU^3 yr^-2 Msun^-1."""


# ----------------------------------------------------------------------------------------------- errors
class PhysicsError(ValueError):
    """Physically invalid input (the base of every error this module raises for bad values)."""


class EccentricityError(PhysicsError):
    """An eccentricity outside [0, 1): only bound, elliptical orbits are supported."""


class MassError(PhysicsError):
    """A non-positive (or non-finite) mass."""


class SemiMajorAxisError(PhysicsError):
    """A non-positive (or non-finite) semi-major axis."""


class TimeStepError(PhysicsError):
    """A non-positive (or non-finite) time step."""


class MassRatioError(PhysicsError):
    """A planet at least as heavy as its star where the mode needs a dominant star."""


class IntegrationError(PhysicsError):
    """A numerical method did not converge (e.g. an unbound or singular state)."""


def _check_positive(name: str, x, err: type[PhysicsError], fix: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    bad = ~(np.isfinite(x) & (x > 0))
    if bad.any():
        raise err(f"{name} must be finite and > 0, got {x[bad].ravel()[:5].tolist()}; {fix}")
    return x


def check_masses(m, name: str = "mass") -> np.ndarray:
    return _check_positive(name, m, MassError, "masses are in solar masses and must be positive")


def check_semi_major_axis(a) -> np.ndarray:
    return _check_positive("semi-major axis", a, SemiMajorAxisError, "give a in AU, > 0 (bound orbits)")


def check_dt(dt) -> np.ndarray:
    return _check_positive("time step dt", dt, TimeStepError, "give dt in years, > 0")


def check_eccentricity(e) -> np.ndarray:
    e = np.asarray(e, dtype=np.float64)
    bad = ~(np.isfinite(e) & (e >= 0) & (e < 1))
    if bad.any():
        raise EccentricityError(f"eccentricity must lie in [0, 1), got {e[bad].ravel()[:5].tolist()}; "
                                "unbound (e >= 1) orbits are not supported")
    return e


def check_star_dominates(m_planet, m_star) -> None:
    m_planet, m_star = np.broadcast_arrays(np.asarray(m_planet, float), np.asarray(m_star, float))
    bad = m_planet >= m_star
    if bad.any():
        raise MassRatioError(f"planet mass {m_planet[bad].ravel()[:5].tolist()} >= star mass "
                             f"{m_star[bad].ravel()[:5].tolist()} Msun; the fixed-star and N-body modes "
                             "need a star heavier than each planet")


# ------------------------------------------------------------------------------------------------ Kepler
def orbital_period(a, mu) -> np.ndarray:
    """Kepler's third law ``P = 2 pi sqrt(a^3 / mu)`` in years (a in AU, mu = G(m1+m2) in AU^3/yr^2)."""
    return 2.0 * np.pi * np.sqrt(np.asarray(a, float) ** 3 / np.asarray(mu, float))


def _kepler_sincos(mean_anomaly, e) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Solve ``E - e sin E = M``; return (E reduced to [-pi, pi], sin E, cos E, number of 2 pi turns).

    Non-iterative for the bulk: Mikkola's (1987) cubic starter (only ``sqrt``/``cbrt``, error < 4e-3 rad),
    one fourth-order Householder correction (sine and cosine from one ``tan``), then one Newton step whose
    sine and cosine come from the angle-addition formulas with Taylor series of the small increment (no
    further trig calls). Residual ``|E - e sin E - M|`` <= 1e-15 for e <= 0.99999 (tested); elements
    with e > 0.99999 get extra Newton iterations. Written with in-place numpy operations (this is the
    generator's hot loop; ~25% faster than the plain expressions).
    """
    M = np.asarray(mean_anomaly, dtype=np.float64)
    e = np.asarray(e, dtype=np.float64)
    turns = M * (0.5 / np.pi)
    turns += 0.5
    np.floor(turns, out=turns)
    Ma = turns * (-2.0 * np.pi)
    Ma += M  # M reduced to [-pi, pi); solve for |M| and restore the sign (E is odd in M)
    sgn = np.copysign(np.ones_like(Ma), Ma)
    np.abs(Ma, out=Ma)
    # Mikkola's starter: alpha = (1-e)/(4e+1/2), beta = M/(2(4e+1/2)), z = cbrt(beta + sqrt(beta^2 + alpha^3))
    inv = 4.0 * e
    inv += 0.5
    np.reciprocal(inv, out=inv)
    al = 1.0 - e
    al *= inv
    be = Ma * 0.5
    be *= inv
    z = al * al
    z *= al
    t = be * be
    z += t
    np.sqrt(z, out=z)
    z += be
    np.cbrt(z, out=z)
    sm = al / z
    np.subtract(z, sm, out=sm)  # s = z - alpha / z
    t = sm * sm
    t *= t
    t *= sm
    t *= 0.078
    z = 1.0 + e
    t /= z
    sm -= t  # s -= 0.078 s^5 / (1 + e)
    E0 = sm * sm
    E0 *= -4.0
    E0 += 3.0
    E0 *= sm
    E0 *= e
    E0 += Ma  # E0 = M + e (3 s - 4 s^3)
    # sin E0 and cos E0 from one tangent of a half angle (numpy's float64 tan is SIMD-vectorised, sin and
    # cos are not: ~4x cheaper). With phi = E0 - pi/2 in [-pi/2, pi/2 + 4e-3] and t = tan(phi/2):
    # sin E0 = cos phi = (1 - t^2)/(1 + t^2), cos E0 = -sin phi = -2t/(1 + t^2)
    t = E0 - 0.5 * np.pi
    t *= 0.5
    np.tan(t, out=t)
    t2 = t * t
    u = 1.0 + t2
    np.reciprocal(u, out=u)
    sE = 1.0 - t2
    sE *= u
    cE = t * u
    cE *= -2.0
    # fourth-order Householder step from E0
    f = e * sE
    np.subtract(E0, f, out=f)
    f -= Ma
    f1 = e * cE
    np.subtract(1.0, f1, out=f1)
    f2 = e * sE
    d = f / f1
    np.negative(d, out=d)
    t = d * f2
    t *= 0.5
    t += f1
    np.divide(f, t, out=d)
    np.negative(d, out=d)
    t = d * f2
    t *= 0.5
    t += f1
    u = d * d
    u *= e
    u *= cE
    u *= 1.0 / 6.0
    t += u
    np.divide(f, t, out=d)
    np.negative(d, out=d)
    # one Newton step at E0 + d with sin/cos by angle addition (|d| < 4e-3: Taylor to d^5 suffices)
    for it in range(2):
        dd = d * d
        sd = dd * (1.0 / 20.0)
        np.subtract(1.0, sd, out=sd)
        sd *= dd
        sd *= 1.0 / 6.0
        np.subtract(1.0, sd, out=sd)
        sd *= d  # sin d
        cm = dd * (1.0 / 12.0)
        np.subtract(1.0, cm, out=cm)
        cm *= dd
        cm *= -0.5  # cos d - 1
        ds = sE * cm
        t = cE * sd
        ds += t  # sin(E0 + d) - sin E0
        sinE = sE + ds
        cosE = cE * cm
        t = sE * sd
        cosE -= t
        cosE += cE
        if it == 1:
            break
        F = e * ds
        np.subtract(d, F, out=F)
        F += f  # (E0 + d) - e sin(E0 + d) - M without cancellation
        t = e * cosE
        np.subtract(1.0, t, out=t)
        F /= t
        d -= F
    E = E0 + d
    hard = e > 0.99999
    if np.any(hard):  # near-parabolic: polish with plain Newton iterations
        Eh, eh, Mh = E[hard], e[hard], Ma[hard]
        for _ in range(50):
            dE = (Eh - eh * np.sin(Eh) - Mh) / (1.0 - eh * np.cos(Eh))
            Eh = Eh - dE
            if np.max(np.abs(dE)) < 1e-15:
                break
        else:
            raise IntegrationError("Kepler's equation did not converge for e > 0.99999")
        E[hard], sinE[hard], cosE[hard] = Eh, np.sin(Eh), np.cos(Eh)
    E *= sgn
    sinE *= sgn
    return E, sinE, cosE, turns


def solve_kepler(mean_anomaly, e) -> np.ndarray:
    """Eccentric anomaly E solving ``E - e sin E = M`` elementwise (any broadcastable shapes), vectorised.

    See :func:`_kepler_sincos` for the method (no per-point loop, residual <= 1e-15 rad). e < 1 is
    required, not checked here (:func:`check_eccentricity`). The result keeps the 2 pi multiple of M,
    so ``|E - M| <= e``.
    """
    M, e = np.broadcast_arrays(np.asarray(mean_anomaly, np.float64), np.asarray(e, np.float64))
    E, _, _, turns = _kepler_sincos(M, e)
    return E + 2 * np.pi * turns


def kepler_state(a, e, omega, mean_anomaly, mu) -> tuple[np.ndarray, np.ndarray]:
    """Relative position [..., 2] (AU) and velocity [..., 2] (AU/yr) on a Kepler ellipse.

    ``a`` semi-major axis (AU), ``e`` eccentricity, ``omega`` argument of periapsis (rad, measured
    counter-clockwise from +x; motion is counter-clockwise), ``mean_anomaly`` (rad; 0 = periapsis),
    ``mu = G (m1 + m2)``. All inputs broadcast. Uses the perifocal form
    ``x = a (cos E - e), y = a sqrt(1-e^2) sin E`` (equivalent to METHOD's true-anomaly form,
    ``r = a (1 - e cos E)``) rotated by ``omega``.
    """
    a, e, omega, M, mu = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64)
                                                for x in (a, e, omega, mean_anomaly, mu)))
    pos, vel = _kepler_xy(a, e, np.sqrt(1.0 - e * e), np.cos(omega), np.sin(omega), np.sqrt(mu / a**3), M)
    return np.stack(pos, axis=-1), np.stack(vel, axis=-1)


def _kepler_xy(a, e, q, cw, sw, n, M):
    """Core of :func:`kepler_state` on flat arrays with precomputed ``q = sqrt(1-e^2)``, ``cos/sin omega``
    and mean motion ``n``; returns ((x, y), (vx, vy))."""
    _, sE, cE, _ = _kepler_sincos(M, e)
    xp = cE - e
    xp *= a  # a (cos E - e)
    aq = a * q
    yp = aq * sE  # b sin E
    k = e * cE
    np.subtract(1.0, k, out=k)
    np.divide(n, k, out=k)  # n / (1 - e cos E)
    vxp = a * k
    vxp *= sE
    np.negative(vxp, out=vxp)
    vyp = aq * k
    vyp *= cE

    def rot(u, v):
        x = cw * u
        x -= sw * v
        y = sw * u
        y += cw * v
        return x, y

    return rot(xp, yp), rot(vxp, vyp)


class Elements(NamedTuple):
    """Osculating elements of a relative orbit (arrays of the input's batch shape)."""

    a: np.ndarray  # semi-major axis, AU (negative for unbound orbits)
    e: np.ndarray  # eccentricity
    lrl: np.ndarray  # Laplace–Runge–Lenz vector A / mu = (v x h)/mu - r/|r|, dimensionless, [..., 2]
    omega: np.ndarray  # argument of periapsis, rad (direction of the LRL vector)
    h: np.ndarray  # specific angular momentum z-component, AU^2/yr
    energy: np.ndarray  # specific orbital energy, AU^2/yr^2


def elements_from_state(rel_pos, rel_vel, mu) -> Elements:
    """Orbital elements from relative position [..., 2] (AU), velocity [..., 2] (AU/yr) and ``mu``.

    ``mu = G (m_planet + m_star)`` in AU^3/yr^2 (broadcast against the batch shape). The eccentricity
    vector is the Laplace–Runge–Lenz vector divided by mu: ``e_vec = (v x h) / mu - r_hat``.
    """
    r = np.asarray(rel_pos, dtype=np.float64)
    v = np.asarray(rel_vel, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    rn = np.hypot(r[..., 0], r[..., 1])
    h = r[..., 0] * v[..., 1] - r[..., 1] * v[..., 0]
    energy = 0.5 * (v[..., 0] ** 2 + v[..., 1] ** 2) - mu / rn
    # v x (h z) = (vy h, -vx h)
    lrl = np.stack([v[..., 1] * h / mu - r[..., 0] / rn, -v[..., 0] * h / mu - r[..., 1] / rn], axis=-1)
    e = np.hypot(lrl[..., 0], lrl[..., 1])
    a = -mu / (2.0 * energy)
    return Elements(a=a, e=e, lrl=lrl, omega=np.arctan2(lrl[..., 1], lrl[..., 0]), h=h, energy=energy)


def gravity_force(rel_pos, m_planet, m_star) -> np.ndarray:
    """Newtonian force on the planet from the star, ``-G m_p m_s r_hat / r^2`` (Msun AU/yr^2) [..., 2].

    ``rel_pos`` = planet - star [..., 2] in AU; masses broadcast against the batch shape.
    """
    r = np.asarray(rel_pos, dtype=np.float64)
    r2 = r[..., 0] ** 2 + r[..., 1] ** 2
    k = -G * np.asarray(m_planet, float) * np.asarray(m_star, float) / (r2 * np.sqrt(r2))
    return r * k[..., None]


# -------------------------------------------------------------------------------- universal Kepler drift
def _stumpff(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stumpff functions C(z), S(z) for any real z (series near 0, trig/hyperbolic elsewhere)."""
    C = np.empty_like(z)
    S = np.empty_like(z)
    pos, neg = z > 1e-2, z < -1e-2
    small = ~(pos | neg)
    if pos.any():
        sz = np.sqrt(z[pos])
        C[pos] = 2.0 * np.sin(0.5 * sz) ** 2 / z[pos]
        S[pos] = (sz - np.sin(sz)) / sz**3
    if neg.any():
        sz = np.sqrt(-z[neg])
        C[neg] = (np.cosh(sz) - 1.0) / (-z[neg])
        S[neg] = (np.sinh(sz) - sz) / sz**3
    if small.any():
        zs = z[small]
        C[small] = 1 / 2 - zs * (1 / 24 - zs * (1 / 720 - zs * (1 / 40320 - zs / 3628800)))
        S[small] = 1 / 6 - zs * (1 / 120 - zs * (1 / 5040 - zs * (1 / 362880 - zs / 39916800)))
    return C, S


def kepler_drift(pos, vel, mu, dt, *, tol: float = 1e-13, max_iter: int = 50):
    """Advance relative states on exact Kepler orbits by ``dt``; returns new (pos, vel).

    ``pos``, ``vel`` [..., 2] (AU, AU/yr), ``mu`` and ``dt`` broadcast to ``pos.shape[:-1]``. Bound
    states use the fast elliptic form (Newton on the eccentric-anomaly increment, Lagrange f and g;
    Murray & Dermott §2.5); if any state is unbound, or Newton fails, every state goes through
    :func:`kepler_drift_universal` (robust for every conic).
    """
    r = np.asarray(pos, dtype=np.float64)
    v = np.asarray(vel, dtype=np.float64)
    x0, y0, vx, vy = r[..., 0], r[..., 1], v[..., 0], v[..., 1]
    r0 = np.sqrt(x0 * x0 + y0 * y0)
    inv_a = 2.0 / r0 - (vx * vx + vy * vy) / mu
    if not np.all(inv_a > 0):
        return kepler_drift_universal(r, v, mu, dt, tol=tol, max_iter=max_iter)
    a = 1.0 / inv_a
    n = np.sqrt(mu * inv_a**3)
    ec = 1.0 - r0 * inv_a  # e cos E0
    es = (x0 * vx + y0 * vy) / (n * a * a)  # e sin E0
    dM = n * dt
    x = dM * a / r0  # first-order guess dE = dM * dE/dM
    x = np.minimum(x, dM + 1.0)  # ...bounded: dE - dM = e sin E - e sin E0 <= 2 e
    for _ in range(max_iter):
        sx, cx = np.sin(x), np.cos(x)
        F = x - ec * sx + es * (1.0 - cx) - dM
        dF = 1.0 - ec * cx + es * sx
        dx = F / dF
        x -= dx
        if np.max(np.abs(dx), initial=0.0) < tol * (1.0 + np.max(np.abs(x), initial=0.0)):
            break
    else:
        return kepler_drift_universal(r, v, mu, dt, tol=tol, max_iter=max_iter)
    sx, cx = np.sin(x), np.cos(x)
    f = a / r0 * (cx - 1.0) + 1.0
    g = dt + (sx - x) / n
    rn = a * (1.0 - ec * cx + es * sx)
    fdot = -a * a * n * sx / (rn * r0)
    gdot = a / rn * (cx - 1.0) + 1.0
    new_r = np.stack([f * x0 + g * vx, f * y0 + g * vy], axis=-1)
    new_v = np.stack([fdot * x0 + gdot * vx, fdot * y0 + gdot * vy], axis=-1)
    return new_r, new_v


def kepler_drift_universal(pos, vel, mu, dt, *, tol: float = 1e-13, max_iter: int = 50):
    """:func:`kepler_drift` for any conic (universal variables, Laguerre–Conway iterations)."""
    r = np.asarray(pos, dtype=np.float64)
    v = np.asarray(vel, dtype=np.float64)
    shape = r.shape[:-1]
    mu = np.broadcast_to(np.asarray(mu, float), shape)
    dt = np.broadcast_to(np.asarray(dt, float), shape)
    r0 = np.hypot(r[..., 0], r[..., 1])
    v2 = v[..., 0] ** 2 + v[..., 1] ** 2
    sqmu = np.sqrt(mu)
    sigma = (r[..., 0] * v[..., 0] + r[..., 1] * v[..., 1]) / sqmu  # r0 * vr0 / sqrt(mu)
    alpha = 2.0 / r0 - v2 / mu
    beta = 1.0 - alpha * r0
    chi = sqmu * dt / r0
    n = 5.0
    for _ in range(max_iter):
        z = alpha * chi * chi
        C, S = _stumpff(z)
        F = sigma * chi * chi * C + beta * chi**3 * S + r0 * chi - sqmu * dt
        dF = sigma * chi * (1.0 - z * S) + beta * chi * chi * C + r0
        ddF = sigma * (1.0 - z * C) + beta * chi * (1.0 - z * S)
        root = np.sqrt(np.abs((n - 1) ** 2 * dF * dF - n * (n - 1) * F * ddF))
        step = n * F / (dF + np.copysign(root, dF))
        chi = chi - step
        if np.max(np.abs(step) / (np.abs(chi) + 1e-300), initial=0.0) < tol:
            break
    else:
        raise IntegrationError("universal Kepler drift did not converge; a state is probably singular "
                               "(zero separation) or the time step is far too long")
    z = alpha * chi * chi
    C, S = _stumpff(z)
    f = 1.0 - chi * chi * C / r0
    g = dt - chi**3 * S / sqmu
    new_r = f[..., None] * r + g[..., None] * v
    rn = np.hypot(new_r[..., 0], new_r[..., 1])
    fdot = sqmu / (rn * r0) * chi * (z * S - 1.0)
    gdot = 1.0 - chi * chi * C / rn
    new_v = fdot[..., None] * r + gdot[..., None] * v
    return new_r, new_v


# ------------------------------------------------------------------------------------------------ N-body
@dataclass
class NBodyTrajectory:
    """Output of :func:`integrate_nbody` at the output steps ``0..n_steps-1`` (shapes for batch B)."""

    star_pos: np.ndarray  # [B, n, 2] AU (inertial frame)
    star_vel: np.ndarray  # [B, n, 2] AU/yr
    planet_pos: np.ndarray  # [B, K, n, 2] AU (inertial frame)
    planet_vel: np.ndarray  # [B, K, n, 2] AU/yr
    energy_error: np.ndarray  # [B] max |E(t) - E(0)| / |E(0)| over the output steps


def _pair_accel(Q: np.ndarray, Gm: np.ndarray, r2_pad: np.ndarray) -> np.ndarray:
    """Planet–planet accelerations [B, K, 2] from heliocentric positions Q [B, K, 2].

    ``Gm`` [B, K, K] = G m_j for real pairs i != j, else 0; ``r2_pad`` [B, K, K] = 1 where the pair is
    not real (keeps the division finite), else 0.
    """
    dx = Q[:, None, :, 0] - Q[:, :, None, 0]  # [b, i, j] = Q_j - Q_i
    dy = Q[:, None, :, 1] - Q[:, :, None, 1]
    r2 = dx * dx + dy * dy + r2_pad
    w = Gm / (r2 * np.sqrt(r2))
    return np.stack([(w * dx).sum(2), (w * dy).sum(2)], axis=-1)


def nbody_energy(star_pos, star_vel, planet_pos, planet_vel, m_star, m_planet, real=None):
    """Total energy [B, ...] (Msun AU^2/yr^2) and angular momentum z (Msun AU^2/yr) of N-body states.

    Star arrays [B, ..., 2]; planet arrays [B, K, ..., 2]; ``m_star`` [B]; ``m_planet`` [B, K]
    (``real`` [B, K] masks padded planets).
    """
    B, K = m_planet.shape
    real = np.ones((B, K), bool) if real is None else real
    mp = np.where(real, m_planet, 0.0)
    extra = (None,) * (planet_pos.ndim - 3)
    mpe = mp[(slice(None), slice(None), *extra)]
    mse = m_star[(slice(None), *extra)]
    kin = 0.5 * mse * (star_vel**2).sum(-1) + 0.5 * (mpe * (planet_vel**2).sum(-1)).sum(1)
    rel = planet_pos - star_pos[:, None]
    pot = -(G * mse[:, None] * mpe / np.sqrt((rel**2).sum(-1))).sum(1)
    for i in range(K):
        for j in range(i + 1, K):
            both = (real[:, i] & real[:, j])[(slice(None), *extra)]
            dij = np.sqrt(((planet_pos[:, i] - planet_pos[:, j]) ** 2).sum(-1))
            pot = pot - np.where(both, G * mpe[:, i] * mpe[:, j] / np.where(both, dij, 1.0), 0.0)

    def lz(p, v):
        return p[..., 0] * v[..., 1] - p[..., 1] * v[..., 0]

    L = mse * lz(star_pos, star_vel) + (mpe * lz(planet_pos, planet_vel)).sum(1)
    return kin + pot, L


def integrate_nbody(m_star, m_planet, star_pos0, star_vel0, planet_pos0, planet_vel0, dt, n_steps,
                    substeps: int, *, real=None, active_steps=None) -> NBodyTrajectory:
    """Integrate star + K mutually attracting planets; record every ``dt`` for ``n_steps`` outputs.

    Inputs (inertial frame): ``m_star`` [B] Msun, ``m_planet`` [B, K] Msun, ``star_pos0``/``star_vel0``
    [B, 2], ``planet_pos0``/``planet_vel0`` [B, K, 2] (AU, AU/yr), ``dt`` [B] years, ``substeps`` the
    number of Wisdom–Holman steps per output step (same for the batch). ``real`` [B, K] marks real
    planets (padding is carried as massless test particles on distant circular orbits).
    ``active_steps`` [B] (optional, sorted descending) lets systems stop early: only the first
    ``count(active_steps > s)`` systems advance past output step s (their later outputs are zero).
    """
    m_star = check_masses(m_star, "star mass")
    m_planet = np.asarray(m_planet, dtype=np.float64)
    B, K = m_planet.shape
    real = np.ones((B, K), bool) if real is None else np.asarray(real, bool)
    check_masses(m_planet[real], "planet mass")
    check_star_dominates(np.where(real, m_planet, 0.0), m_star[:, None])
    dt = check_dt(np.broadcast_to(np.asarray(dt, float), (B,)))
    if substeps < 1:
        raise TimeStepError(f"substeps must be >= 1, got {substeps}")
    m = np.where(real, m_planet, 0.0)
    M = m_star + m.sum(1)
    # barycentric frame: centre of mass position R (constant, zero total momentum after the shift)
    Xs = np.asarray(star_pos0, float)
    Vs = np.asarray(star_vel0, float)
    Xp = np.asarray(planet_pos0, float)
    Vp = np.asarray(planet_vel0, float)
    R = (m_star[:, None] * Xs + (m[..., None] * Xp).sum(1)) / M[:, None]
    Vcm = (m_star[:, None] * Vs + (m[..., None] * Vp).sum(1)) / M[:, None]
    Q = Xp - Xs[:, None]  # heliocentric positions
    V = Vp - Vcm[:, None]  # barycentric planet velocities
    # padding: massless test particles far away on circular orbits (never used downstream)
    pad = ~real
    if pad.any():
        far = 1e3 * (1.0 + np.arange(K))[None, :].repeat(B, 0)
        Q[pad] = np.stack([far[pad], np.zeros(pad.sum())], -1)
        v_circ = np.sqrt(G * m_star[:, None].repeat(K, 1)[pad] / far[pad])
        V[pad] = np.stack([np.zeros(pad.sum()), v_circ], -1)
    mu = (G * m_star)[:, None]
    h = dt / substeps
    pair = real[:, :, None] & real[:, None, :] & ~np.eye(K, dtype=bool)[None]
    Gm = np.where(pair, G * m[:, None, :], 0.0)
    r2_pad = (~pair).astype(np.float64)

    n_active = np.full(n_steps, B) if active_steps is None else (np.asarray(active_steps)[None, :] >
                                                                  np.arange(n_steps)[:, None]).sum(1)
    Qs = np.zeros((B, K, n_steps, 2))
    Vs_ = np.zeros((B, K, n_steps, 2))
    Qs[:, :, 0], Vs_[:, :, 0] = Q, V
    for s in range(1, n_steps):
        b = int(n_active[s])
        if b == 0:
            break
        q, v, mb, hb, mub = Q[:b], V[:b], m[:b], h[:b], mu[:b]
        gm, pad2 = Gm[:b], r2_pad[:b]
        hh = hb[:, None, None]
        jump = (0.5 * hb / m_star[:b])[:, None, None] * mb[..., None]  # [b, K, 1]: h/2 * m_j / m_s
        for _ in range(substeps):
            # jump(h/2): heliocentric positions move with the star's barycentric recoil
            q = q + (jump * v).sum(1, keepdims=True)
            v = v + 0.5 * hh * _pair_accel(q, gm, pad2)
            q, v = kepler_drift(q, v, mub, hb[:, None])
            v = v + 0.5 * hh * _pair_accel(q, gm, pad2)
            q = q + (jump * v).sum(1, keepdims=True)
        Q[:b], V[:b] = q, v
        Qs[:b, :, s], Vs_[:b, :, s] = q, v

    # back to the inertial frame
    Vs_star = -(m[:, :, None, None] * Vs_).sum(1) / m_star[:, None, None]  # [B, n, 2]
    t = np.arange(n_steps)[None, :, None] * dt[:, None, None]
    Xs_star = R[:, None] + Vcm[:, None] * t - (m[:, :, None, None] * Qs).sum(1) / M[:, None, None]
    planet_pos = Xs_star[:, None] + Qs
    planet_vel = Vs_ + Vcm[:, None, None]
    star_vel = Vs_star + Vcm[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):  # outputs past a system's active steps are 0
        E, _ = nbody_energy(Xs_star, star_vel, planet_pos, planet_vel, m_star, m_planet, real)
    steps_ok = np.arange(n_steps)[None, :] < (n_steps if active_steps is None
                                               else np.asarray(active_steps)[:, None])
    err = np.where(steps_ok, np.abs(E - E[:, :1]) / np.abs(E[:, :1]), 0.0).max(1)
    return NBodyTrajectory(star_pos=Xs_star, star_vel=star_vel, planet_pos=planet_pos,
                           planet_vel=planet_vel, energy_error=err)


def nbody_substeps(dt, min_period, steps_per_orbit: float, max_substeps: int) -> np.ndarray:
    """Wisdom–Holman sub-steps per output step: ``ceil(dt / (P_min / steps_per_orbit))``, rounded up to a
    power of two (so that systems share batches) and capped at ``max_substeps``."""
    n = np.ceil(np.asarray(dt, float) * steps_per_orbit / np.asarray(min_period, float))
    n = np.maximum(n, 1)
    return np.minimum(2 ** np.ceil(np.log2(n)).astype(np.int64), max_substeps).astype(np.int64)


# -------------------------------------------------------------------------------------- user-facing API
@dataclass
class Trajectory:
    """A simulated system sampled every ``dt`` years (single system; K planets, n steps)."""

    times: np.ndarray  # [n] yr
    star_pos: np.ndarray  # [n, 2] AU
    star_vel: np.ndarray  # [n, 2] AU/yr
    planet_pos: np.ndarray  # [K, n, 2] AU
    planet_vel: np.ndarray  # [K, n, 2] AU/yr
    m_star: float
    m_planet: np.ndarray  # [K]

    @property
    def rel_pos(self) -> np.ndarray:
        """Planet minus star [K, n, 2] AU."""
        return self.planet_pos - self.star_pos[None]

    @property
    def rel_vel(self) -> np.ndarray:
        return self.planet_vel - self.star_vel[None]

    def star_forces(self) -> np.ndarray:
        """Force on each planet from the star [K, n, 2] (Msun AU/yr^2)."""
        return gravity_force(self.rel_pos, self.m_planet[:, None], self.m_star)

    def total_forces(self) -> np.ndarray:
        """Force on each planet from the star and every other planet [K, n, 2] (Msun AU/yr^2)."""
        F = self.star_forces()
        K = len(self.m_planet)
        for i in range(K):
            for j in range(K):
                if i != j:
                    F[i] += gravity_force(self.planet_pos[i] - self.planet_pos[j], self.m_planet[i],
                                          self.m_planet[j])
        return F

    def energy(self) -> np.ndarray:
        """Total energy [n] (Msun AU^2/yr^2), all pair interactions included."""
        E, _ = nbody_energy(self.star_pos[None], self.star_vel[None], self.planet_pos[None],
                            self.planet_vel[None], np.array([self.m_star]), self.m_planet[None])
        return E[0]

    def angular_momentum(self) -> np.ndarray:
        """Total angular momentum z-component [n] (Msun AU^2/yr) about the origin."""
        _, L = nbody_energy(self.star_pos[None], self.star_vel[None], self.planet_pos[None],
                            self.planet_vel[None], np.array([self.m_star]), self.m_planet[None])
        return L[0]


class PlanetarySystem:
    """A star with K planets in the plane, in AU / yr / Msun (G = 4 pi^2).

    Build it from orbital elements (:meth:`from_elements`) or from Cartesian states
    (:meth:`from_cartesian`), then call :meth:`simulate`:

    * ``mode="kepler"``: each planet follows its exact two-body orbit about the star (``mu = G(m_p+m_s)``).
      With one planet the star moves about the centre of mass; with ``fixed_star=True`` (the default for
      K > 1, METHOD.md §1.1) the star stays put and the planets do not attract each other.
    * ``mode="nbody"``: everything attracts everything (Wisdom–Holman, ``substeps`` per output step).

    >>> rng = np.random.default_rng(0)
    >>> sys = PlanetarySystem.from_elements(1.0, [3e-6], a=[1.0], e=[0.0167], rng=rng)
    >>> traj = sys.simulate(n_steps=100, dt=0.0189)
    """

    def __init__(self, m_star: float, m_planet, rel_pos, rel_vel, star_pos=(0.0, 0.0), star_vel=(0.0, 0.0)):
        self.m_star = float(check_masses(m_star, "star mass"))
        self.m_planet = check_masses(np.atleast_1d(np.asarray(m_planet, float)), "planet mass")
        self.rel_pos = np.asarray(rel_pos, float).reshape(-1, 2)
        self.rel_vel = np.asarray(rel_vel, float).reshape(-1, 2)
        if not (len(self.m_planet) == len(self.rel_pos) == len(self.rel_vel)):
            raise ValueError("m_planet, rel_pos and rel_vel must describe the same number of planets")
        r = np.hypot(self.rel_pos[:, 0], self.rel_pos[:, 1])
        if np.any(r <= 0):
            raise PhysicsError("a planet sits on the star (zero separation)")
        self.star_pos = np.asarray(star_pos, float).reshape(2)
        self.star_vel = np.asarray(star_vel, float).reshape(2)

    @classmethod
    def from_elements(cls, m_star: float, m_planet, a, e, omega=None, mean_anomaly=None, *,
                      star_pos=(0.0, 0.0), rng: np.random.Generator | None = None) -> "PlanetarySystem":
        """Planets from elements relative to the star: ``a`` (AU), ``e`` in [0, 1), ``omega`` argument of
        periapsis (rad) and ``mean_anomaly`` at t = 0 (rad). Missing angles are drawn U(0, 2 pi) from
        ``rng`` (a :class:`numpy.random.Generator`, required then). The star starts at ``star_pos``
        with the velocity that makes the total momentum zero (the centre of mass stays put); relative
        velocities follow from ``mu = G (m_p + m_s)``."""
        m_planet = check_masses(np.atleast_1d(np.asarray(m_planet, float)), "planet mass")
        a = check_semi_major_axis(np.broadcast_to(np.asarray(a, float), m_planet.shape))
        e = check_eccentricity(np.broadcast_to(np.asarray(e, float), m_planet.shape))
        m_star = float(check_masses(m_star, "star mass"))
        if (omega is None or mean_anomaly is None) and rng is None:
            raise TypeError("pass omega and mean_anomaly, or a numpy.random.Generator as rng to draw them")
        omega = (rng.uniform(0, 2 * np.pi, m_planet.shape) if omega is None
                 else np.broadcast_to(omega, m_planet.shape))
        mean_anomaly = (rng.uniform(0, 2 * np.pi, m_planet.shape) if mean_anomaly is None
                        else np.broadcast_to(mean_anomaly, m_planet.shape))
        pos, vel = kepler_state(a, e, omega, mean_anomaly, G * (m_planet + m_star))
        star_vel = -(m_planet[:, None] * vel).sum(0) / (m_star + m_planet.sum())  # zero total momentum
        return cls(m_star, m_planet, pos, vel, star_pos=star_pos, star_vel=star_vel)

    @classmethod
    def from_cartesian(cls, m_star: float, m_planet, planet_pos, planet_vel, star_pos=(0.0, 0.0),
                       star_vel=(0.0, 0.0)) -> "PlanetarySystem":
        """Planets from inertial positions [K, 2] (AU) and velocities [K, 2] (AU/yr) and the star's."""
        sp, sv = np.asarray(star_pos, float), np.asarray(star_vel, float)
        return cls(m_star, m_planet, np.asarray(planet_pos, float).reshape(-1, 2) - sp,
                   np.asarray(planet_vel, float).reshape(-1, 2) - sv, star_pos=sp, star_vel=sv)

    def elements(self) -> Elements:
        """Osculating elements of each planet's orbit about the star (t = 0)."""
        return elements_from_state(self.rel_pos, self.rel_vel, G * (self.m_planet + self.m_star))

    def simulate(self, n_steps: int, dt: float, *, mode: str = "kepler", fixed_star: bool | None = None,
                 substeps: int | None = None, steps_per_orbit: float = 40.0) -> Trajectory:
        """Positions and velocities at ``t = 0, dt, ..., (n_steps-1) dt`` (years)."""
        dt = float(check_dt(dt))
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        K = len(self.m_planet)
        t = np.arange(n_steps) * dt
        if mode == "kepler":
            fixed_star = K > 1 if fixed_star is None else fixed_star
            if K > 1 and not fixed_star:
                raise ValueError("kepler mode with several planets needs fixed_star=True (use mode='nbody')")
            el = self.elements()
            if np.any(el.e >= 1):
                raise EccentricityError(f"initial states are unbound (e = {el.e.tolist()})")
            if fixed_star:
                check_star_dominates(self.m_planet, self.m_star)
            mu = G * (self.m_planet + self.m_star)
            n = np.sqrt(mu / el.a**3)
            # mean anomaly at t=0 from the eccentric anomaly of the initial state
            cosE = (1 - np.hypot(*self.rel_pos.T) / el.a) / np.where(el.e > 0, el.e, 1)
            r_dot_v = (self.rel_pos * self.rel_vel).sum(-1)
            sinE = r_dot_v / (np.sqrt(mu * el.a) * np.where(el.e > 0, el.e, 1))
            E0 = np.arctan2(sinE, cosE)
            M0 = E0 - el.e * np.sin(E0)
            # circular orbits: periapsis is undefined; measure from the current position
            omega = np.where(el.e > 0, el.omega, np.arctan2(self.rel_pos[:, 1], self.rel_pos[:, 0]))
            M0 = np.where(el.e > 0, M0, 0.0)
            rel, relv = kepler_state(el.a[:, None], el.e[:, None], omega[:, None],
                                     M0[:, None] + n[:, None] * t[None], mu[:, None])
            if fixed_star:
                # the star is pinned where it starts (its initial velocity is ignored)
                star_pos = np.broadcast_to(self.star_pos, (n_steps, 2)).copy()
                star_vel = np.zeros((n_steps, 2))
            else:  # one planet, moving star: both about the centre of mass
                mtot = self.m_planet[0] + self.m_star
                com0 = self.star_pos + self.m_planet[0] / mtot * self.rel_pos[0]
                vcm = self.star_vel + self.m_planet[0] / mtot * self.rel_vel[0]
                com = com0[None] + t[:, None] * vcm[None]
                star_pos = com - self.m_planet[0] / mtot * rel[0]
                star_vel = vcm[None] - self.m_planet[0] / mtot * relv[0]
            return Trajectory(t, star_pos, star_vel, star_pos[None] + rel, star_vel[None] + relv,
                              self.m_star, self.m_planet.copy())
        if mode == "nbody":
            el = self.elements()
            if substeps is None:
                pmin = orbital_period(np.abs(el.a), G * (self.m_planet + self.m_star)).min()
                substeps = int(nbody_substeps(dt, pmin, steps_per_orbit, 1 << 16))
            tr = integrate_nbody(np.array([self.m_star]), self.m_planet[None], self.star_pos[None],
                                 self.star_vel[None], (self.star_pos + self.rel_pos)[None],
                                 (self.star_vel + self.rel_vel)[None], np.array([dt]), n_steps, substeps)
            return Trajectory(t, tr.star_pos[0], tr.star_vel[0], tr.planet_pos[0], tr.planet_vel[0],
                              self.m_star, self.m_planet.copy())
        raise ValueError(f"unknown mode {mode!r}; choose 'kepler' or 'nbody'")
