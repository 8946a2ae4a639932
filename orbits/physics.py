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

Invalid physics raises a subclass of :class:`PhysicsError` (itself a ``ValueError``) that names the
argument, the offending values and the valid range: :class:`EccentricityError`, :class:`MassError`,
:class:`SemiMajorAxisError`, :class:`TimeStepError`, :class:`MassRatioError`, :class:`StateError` (NaN/inf
states or bodies at zero separation), :class:`IntegrationError`. Wrong shapes raise ``ValueError``,
non-numbers and non-integer counts ``TypeError``. Public functions validate once, at the boundary; the
kernels inside (and the numba engine of :mod:`gravprobe.orbits.fused`) trust their inputs. Scalars are
welcome everywhere: numbers give numpy float64 scalars, one state gives one vector of shape (2,).
"""
from __future__ import annotations

import logging
import reprlib
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
    """An eccentricity outside [0, 1): negative, unbound (e >= 1) or not finite."""


class MassError(PhysicsError):
    """A non-positive (or non-finite) mass."""


class SemiMajorAxisError(PhysicsError):
    """A non-positive (or non-finite) semi-major axis."""


class TimeStepError(PhysicsError):
    """A non-positive (or non-finite) time step, or fewer than one integration sub-step."""


class MassRatioError(PhysicsError):
    """A planet at least as heavy as its star where the mode needs a dominant star."""


class IntegrationError(PhysicsError):
    """A numerical method did not converge (e.g. an unbound or singular state)."""


class StateError(PhysicsError):
    """A position, velocity or angle that is not finite (NaN or inf), or a singular state (two bodies at
    zero separation, where gravity and the orbital elements are undefined)."""


# ------------------------------------------------------------------------------------------- validation
# Every public function validates its arguments once, here at the boundary, naming the argument; the
# numerical kernels below (``_kepler_sincos``, ``_kepler_xy``, ``_kepler_drift``, ``_integrate_nbody``)
# and the numba engine in :mod:`gravprobe.orbits.fused` trust their inputs.
def _fmt_bad(x: np.ndarray, bad: np.ndarray) -> str:
    """The offending values of ``x`` (where ``bad``): ``1.5`` for one value, else up to five of them with
    their count and the index of the first."""
    if x.size == 1:
        return repr(float(x.ravel()[0]))
    n = int(bad.sum())
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    vals = x[bad].ravel()[:5].tolist()
    return f"{vals}{' ...' if n > 5 else ''} ({n} of {x.size} values; the first at index {first})"


def _as_float(name: str, x) -> np.ndarray:
    """``x`` as a float64 array, or a TypeError naming ``name`` (strings, None, ragged lists...)."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be a number or an array of numbers, got {reprlib.repr(x)}")
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number or an array of numbers, got {reprlib.repr(x)} "
                        f"({exc})") from None


def _check_positive(name: str, x, err: type[PhysicsError], fix: str) -> np.ndarray:
    x = _as_float(name, x)
    bad = ~(np.isfinite(x) & (x > 0))
    if bad.any():
        raise err(f"{name} must be finite and > 0, got {_fmt_bad(x, bad)}; {fix}")
    return x


def _check_finite(name: str, x, what: str = "values", err: type[PhysicsError] | None = None) -> np.ndarray:
    """``x`` as float64; a :class:`StateError` (or ``err``) naming ``name`` where it is NaN or inf."""
    x = _as_float(name, x)
    bad = ~np.isfinite(x)
    if bad.any():
        raise (err or StateError)(f"{name} must be finite {what}, got {_fmt_bad(x, bad)} (NaN or inf); "
                                  f"check how {name} was computed")
    return x


def _check_xy(name: str, x, unit: str) -> np.ndarray:
    """A finite array of 2-D vectors ``[..., 2]`` (``unit`` for the message)."""
    x = _as_float(name, x)
    if x.ndim == 0 or x.shape[-1] != 2:
        raise ValueError(f"{name} must hold (x, y) vectors, shape [..., 2] in {unit}, got shape {x.shape}")
    return _check_finite(name, x, f"coordinates ({unit})")


def _broadcast(func: str, **arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``np.broadcast_arrays`` of the named arrays, or a ValueError listing every argument's shape."""
    try:
        return tuple(np.broadcast_arrays(*arrays.values()))
    except ValueError:
        shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in arrays.items())
        raise ValueError(f"{func}: the arguments must broadcast to one shape, got {shapes}") from None


def _check_count(name: str, value, minimum: int, err: type[ValueError] = ValueError) -> int:
    """An integer count (``int`` or numpy integer, not bool or float) ``>= minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        hint = (f"; pass {name}={int(value)}" if isinstance(value, (float, np.floating)) and np.isfinite(value)
                and float(value).is_integer() else "")
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__}){hint}")
    if value < minimum:
        raise err(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_masses(m, name: str = "mass") -> np.ndarray:
    """``m`` as float64 (any shape); :class:`MassError` naming ``name`` unless every mass is finite and > 0."""
    return _check_positive(name, m, MassError, "masses are in solar masses and must be positive")


def check_semi_major_axis(a, name: str = "semi-major axis") -> np.ndarray:
    """``a`` as float64; :class:`SemiMajorAxisError` naming ``name`` unless finite and > 0 (AU)."""
    return _check_positive(name, a, SemiMajorAxisError, "give a in AU, > 0 (bound orbits)")


def check_dt(dt, name: str = "time step dt") -> np.ndarray:
    """``dt`` as float64; :class:`TimeStepError` naming ``name`` unless finite and > 0 (years)."""
    return _check_positive(name, dt, TimeStepError, "give dt in years, > 0")


def check_eccentricity(e, name: str = "eccentricity") -> np.ndarray:
    """``e`` as float64; :class:`EccentricityError` naming ``name`` and the problem (not finite, negative or
    unbound) unless every value lies in [0, 1)."""
    e = _as_float(name, e)
    nonfinite = ~np.isfinite(e)
    with np.errstate(invalid="ignore"):
        neg, unbound = e < 0, e >= 1
    if nonfinite.any():
        raise EccentricityError(f"{name} must lie in [0, 1), got {_fmt_bad(e, nonfinite)}: not finite (NaN or "
                                "inf); check how it was computed")
    if neg.any():
        raise EccentricityError(f"{name} must lie in [0, 1), got {_fmt_bad(e, neg)}: negative; an "
                                "eccentricity is the length of the eccentricity vector (0 = circle), so pass "
                                "|e| and set the orbit's orientation with omega")
    if unbound.any():
        raise EccentricityError(f"{name} must lie in [0, 1), got {_fmt_bad(e, unbound)}: e >= 1 is an unbound "
                                "(parabolic or hyperbolic) orbit, which is not supported; pass 0 <= e < 1")
    return e


def check_star_dominates(m_planet, m_star) -> None:
    m_planet, m_star = np.broadcast_arrays(np.asarray(m_planet, float), np.asarray(m_star, float))
    bad = m_planet >= m_star
    if bad.any():
        raise MassRatioError(f"planet mass {m_planet[bad].ravel()[:5].tolist()} >= star mass "
                             f"{m_star[bad].ravel()[:5].tolist()} Msun; the fixed-star and N-body modes "
                             "need a star heavier than each planet")


def _check_mu(mu, name: str = "mu") -> np.ndarray:
    return _check_positive(name, mu, MassError, "mu = G (m1 + m2) in AU^3/yr^2 (G = 4 pi^2) must be positive")


def _scalar_out(x: np.ndarray, shape: tuple) -> np.ndarray:
    """Results of a flattened computation back in ``shape``; a 0-d ``shape`` gives a numpy float64 scalar."""
    x = x.reshape(shape)
    return x[()] if x.ndim == 0 else x


# ------------------------------------------------------------------------------------------------ Kepler
def orbital_period(a, mu) -> np.ndarray:
    """Kepler's third law ``P = 2 pi sqrt(a^3 / mu)`` in years (a in AU, mu = G(m1+m2) in AU^3/yr^2).

    ``a`` and ``mu`` broadcast; scalars give a numpy float64 scalar. A non-positive or non-finite ``a``
    raises :class:`SemiMajorAxisError`, ``mu`` :class:`MassError`.
    """
    a = check_semi_major_axis(a, "orbital_period: a (semi-major axis, AU)")
    mu = _check_mu(mu, "orbital_period: mu")
    a, mu = _broadcast("orbital_period", a=a, mu=mu)
    return _orbital_period(a, mu)


def _orbital_period(a, mu):
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

    See :func:`_kepler_sincos` for the method (no per-point loop, residual <= 1e-15 rad). The result keeps
    the 2 pi multiple of M, so ``|E - M| <= e``. Scalars give a numpy float64 scalar, arrays an array of the
    broadcast shape. ``e`` must lie in [0, 1) (:class:`EccentricityError` says whether it is negative,
    unbound or NaN) and ``mean_anomaly`` (rad) must be finite (:class:`StateError`).
    """
    M = _check_finite("solve_kepler: mean_anomaly", mean_anomaly, "angles (rad)")
    e = check_eccentricity(e, "solve_kepler: e (eccentricity)")
    M, e = _broadcast("solve_kepler", mean_anomaly=M, e=e)
    shape = M.shape
    E, _, _, turns = _kepler_sincos(M.ravel(), e.ravel())
    return _scalar_out(E + 2 * np.pi * turns, shape)


def kepler_state(a, e, omega, mean_anomaly, mu) -> tuple[np.ndarray, np.ndarray]:
    """Relative position [..., 2] (AU) and velocity [..., 2] (AU/yr) on a Kepler ellipse.

    ``a`` semi-major axis (AU), ``e`` eccentricity, ``omega`` argument of periapsis (rad, measured
    counter-clockwise from +x; motion is counter-clockwise), ``mean_anomaly`` (rad; 0 = periapsis),
    ``mu = G (m1 + m2)`` (AU^3/yr^2). All inputs broadcast to a batch shape S; the outputs are
    ``S + (2,)`` (scalars give two arrays of shape (2,)). Uses the perifocal form
    ``x = a (cos E - e), y = a sqrt(1-e^2) sin E`` (equivalent to METHOD's true-anomaly form,
    ``r = a (1 - e cos E)``) rotated by ``omega``. Invalid elements raise the typed errors of
    :func:`check_semi_major_axis`, :func:`check_eccentricity`, :class:`StateError` (a NaN/inf angle) and
    :class:`MassError` (``mu``), each naming the argument.
    """
    a = check_semi_major_axis(a, "kepler_state: a (semi-major axis, AU)")
    e = check_eccentricity(e, "kepler_state: e (eccentricity)")
    omega = _check_finite("kepler_state: omega", omega, "angles (rad)")
    M = _check_finite("kepler_state: mean_anomaly", mean_anomaly, "angles (rad)")
    mu = _check_mu(mu, "kepler_state: mu")
    a, e, omega, M, mu = _broadcast("kepler_state", a=a, e=e, omega=omega, mean_anomaly=M, mu=mu)
    shape = a.shape
    a, e, omega, M, mu = (x.ravel() for x in (a, e, omega, M, mu))
    pos, vel = _kepler_xy(a, e, np.sqrt(1.0 - e * e), np.cos(omega), np.sin(omega), np.sqrt(mu / a**3), M)
    return np.stack(pos, axis=-1).reshape(shape + (2,)), np.stack(vel, axis=-1).reshape(shape + (2,))


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
    vector is the Laplace–Runge–Lenz vector divided by mu: ``e_vec = (v x h) / mu - r_hat``. One state
    (shape (2,)) gives numpy float64 scalars (``lrl`` shape (2,)). Unbound states are allowed (``e >= 1``,
    ``a < 0``); NaN/inf or a zero separation raise :class:`StateError`, ``mu <= 0`` :class:`MassError`.
    """
    r = _check_xy("elements_from_state: rel_pos", rel_pos, "AU")
    v = _check_xy("elements_from_state: rel_vel", rel_vel, "AU/yr")
    mu = _check_mu(mu, "elements_from_state: mu")
    try:
        np.broadcast_shapes(r.shape[:-1], v.shape[:-1], mu.shape)
    except ValueError:
        raise ValueError(f"elements_from_state: rel_pos {r.shape}, rel_vel {v.shape} and mu {mu.shape} must "
                         "broadcast (positions and velocities [..., 2], mu over the batch shape)") from None
    rn = np.hypot(r[..., 0], r[..., 1])
    _check_separation("elements_from_state: rel_pos", rn)
    h = r[..., 0] * v[..., 1] - r[..., 1] * v[..., 0]
    energy = 0.5 * (v[..., 0] ** 2 + v[..., 1] ** 2) - mu / rn
    # v x (h z) = (vy h, -vx h)
    lrl = np.stack([v[..., 1] * h / mu - r[..., 0] / rn, -v[..., 0] * h / mu - r[..., 1] / rn], axis=-1)
    e = np.hypot(lrl[..., 0], lrl[..., 1])
    a = -mu / (2.0 * energy)
    return Elements(a=a, e=e, lrl=lrl, omega=np.arctan2(lrl[..., 1], lrl[..., 0]), h=h, energy=energy)


def _check_separation(name: str, rn: np.ndarray) -> None:
    """:class:`StateError` where a separation ``rn`` (AU) is zero: bodies on top of each other."""
    bad = rn == 0
    if bad.any():
        where = "" if rn.size == 1 else (f" at index {tuple(int(i) for i in np.argwhere(bad)[0])} "
                                         f"({int(bad.sum())} of {rn.size})")
        raise StateError(f"{name} has zero separation (r = 0 AU){where}: two bodies sit on "
                         "top of each other, where gravity and the orbital elements are undefined; move them "
                         "apart")


ZERO_SEPARATION = ("raise", "nan")


def gravity_force(rel_pos, m_planet, m_star, *, softening: float = 0.0,
                  zero_separation: str = "raise") -> np.ndarray:
    """Newtonian force on the planet from the star, ``-G m_p m_s r_hat / r^2`` (Msun AU/yr^2) [..., 2].

    ``rel_pos`` = planet - star [..., 2] in AU (one vector (2,) gives (2,)); masses (Msun, >= 0: a massless
    test particle feels no force) broadcast against the batch shape. At ``r = 0`` the force diverges:

    * ``softening=eps`` (AU, > 0) gives the Plummer-softened force ``-G m_p m_s r / (r^2 + eps^2)^(3/2)``,
      finite everywhere and 0 at r = 0;
    * otherwise ``zero_separation="raise"`` (default) raises :class:`StateError` naming the element, and
      ``"nan"`` returns NaN there (for callers that evaluate unused slots, e.g. padding, and discard them:
      the dataset builder does).
    """
    r = _check_xy("gravity_force: rel_pos", rel_pos, "AU")
    mp, ms = (_as_float(f"gravity_force: {n}", m) for n, m in (("m_planet", m_planet), ("m_star", m_star)))
    for name, m in (("m_planet", mp), ("m_star", ms)):
        bad = ~(np.isfinite(m) & (m >= 0))
        if bad.any():
            raise MassError(f"gravity_force: {name} must be finite and >= 0 Msun, got {_fmt_bad(m, bad)}")
    if zero_separation not in ZERO_SEPARATION:
        raise ValueError(f"gravity_force: zero_separation={zero_separation!r} is unknown; choose 'raise' "
                         "(StateError at r = 0) or 'nan' (NaN there)")
    eps = float(_check_finite("gravity_force: softening", softening, "length (AU)", err=PhysicsError))
    if np.ndim(softening) or eps < 0:
        raise PhysicsError(f"gravity_force: softening must be one number >= 0 AU, got {softening!r}")
    try:
        np.broadcast_shapes(r.shape[:-1], mp.shape, ms.shape)
    except ValueError:
        raise ValueError(f"gravity_force: rel_pos {r.shape} [..., 2] and the masses m_planet {mp.shape}, "
                         f"m_star {ms.shape} must broadcast over the batch shape {r.shape[:-1]}") from None
    r2 = r[..., 0] ** 2 + r[..., 1] ** 2
    if eps > 0:
        r2 = r2 + eps * eps
    elif zero_separation == "raise":
        _check_separation("gravity_force: rel_pos", np.sqrt(r2))
    with np.errstate(divide="ignore", invalid="ignore"):  # r = 0 reaches here only when NaN was asked for
        k = -G * mp * ms / (r2 * np.sqrt(r2))
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


def _check_drift(func: str, pos, vel, mu, dt, tol, max_iter):
    """Validated (pos, vel, mu, dt) of a Kepler drift (see :func:`kepler_drift`)."""
    r = _check_xy(f"{func}: pos", pos, "AU")
    v = _check_xy(f"{func}: vel", vel, "AU/yr")
    mu = _check_mu(mu, f"{func}: mu")
    dt = _check_finite(f"{func}: dt", dt, "times (yr)", err=TimeStepError)
    if r.shape != v.shape:
        raise ValueError(f"{func}: pos {r.shape} and vel {v.shape} must have the same shape [..., 2]")
    for name, x in (("mu", mu), ("dt", dt)):
        try:
            if np.broadcast_shapes(x.shape, r.shape[:-1]) != r.shape[:-1]:
                raise ValueError
        except ValueError:
            raise ValueError(f"{func}: {name} of shape {x.shape} must broadcast to the batch shape "
                             f"{r.shape[:-1]} of pos {r.shape}") from None
    _check_separation(f"{func}: pos", np.hypot(r[..., 0], r[..., 1]))
    if not (isinstance(tol, (int, float, np.floating)) and np.isfinite(tol) and tol > 0):
        raise ValueError(f"{func}: tol must be a finite number > 0 (relative tolerance), got {tol!r}")
    _check_count(f"{func}: max_iter", max_iter, 1)
    return r, v, mu, dt


def kepler_drift(pos, vel, mu, dt, *, tol: float = 1e-13, max_iter: int = 50):
    """Advance relative states on exact Kepler orbits by ``dt``; returns new (pos, vel).

    ``pos``, ``vel`` [..., 2] (AU, AU/yr; one state (2,) gives (2,)), ``mu`` (AU^3/yr^2, > 0) and ``dt``
    (yr, any finite sign: negative drifts backwards) broadcast to ``pos.shape[:-1]``. Bound states use the
    fast elliptic form (Newton on the eccentric-anomaly increment, Lagrange f and g; Murray & Dermott
    §2.5); if any state is unbound, or Newton fails, every state goes through
    :func:`kepler_drift_universal` (robust for every conic). NaN/inf or zero-separation states raise
    :class:`StateError` naming the argument.
    """
    return _kepler_drift(*_check_drift("kepler_drift", pos, vel, mu, dt, tol, max_iter), tol=tol,
                         max_iter=max_iter)


def _kepler_drift(pos, vel, mu, dt, *, tol: float = 1e-13, max_iter: int = 50):
    """:func:`kepler_drift` without validation (the N-body integrator's inner loop)."""
    r = np.asarray(pos, dtype=np.float64)
    v = np.asarray(vel, dtype=np.float64)
    x0, y0, vx, vy = r[..., 0], r[..., 1], v[..., 0], v[..., 1]
    r0 = np.sqrt(x0 * x0 + y0 * y0)
    inv_a = 2.0 / r0 - (vx * vx + vy * vy) / mu
    if not np.all(inv_a > 0):
        return _kepler_drift_universal(r, v, mu, dt, tol=tol, max_iter=max_iter)
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
        return _kepler_drift_universal(r, v, mu, dt, tol=tol, max_iter=max_iter)
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
    """:func:`kepler_drift` for any conic (universal variables, Laguerre–Conway iterations); same arguments,
    shapes and errors."""
    return _kepler_drift_universal(*_check_drift("kepler_drift_universal", pos, vel, mu, dt, tol, max_iter),
                                   tol=tol, max_iter=max_iter)


def _kepler_drift_universal(pos, vel, mu, dt, *, tol: float = 1e-13, max_iter: int = 50):
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

    One system may be given without the batch axis (``m_star`` a scalar, ``m_planet`` [K], star states
    [2], planet states [K, 2], ``dt`` a scalar); its outputs then have no batch axis either (and
    ``energy_error`` is a float). ``m_star`` and ``dt`` may be scalars for a batch too. Every argument is
    validated once, here (typed errors naming it: :class:`MassError`, :class:`MassRatioError`,
    :class:`TimeStepError`, :class:`StateError` for NaN/inf states or bodies at zero separation).
    """
    m_planet = _as_float("integrate_nbody: m_planet", m_planet)
    single = m_planet.ndim == 1
    if single:
        if np.ndim(m_star) or np.ndim(dt):
            raise ValueError(f"integrate_nbody: one system (m_planet of shape {m_planet.shape}) takes a scalar "
                             f"m_star and dt, got shapes {np.shape(m_star)} and {np.shape(dt)}; for a batch "
                             "pass m_planet [B, K]")
        m_planet = m_planet[None]
        m_star, dt = np.reshape(m_star, 1), np.reshape(dt, 1)
        star_pos0, star_vel0 = np.asarray(star_pos0)[None], np.asarray(star_vel0)[None]
        planet_pos0, planet_vel0 = np.asarray(planet_pos0)[None], np.asarray(planet_vel0)[None]
        real = None if real is None else np.asarray(real)[None]
        active_steps = None if active_steps is None else np.reshape(active_steps, 1)
    if m_planet.ndim != 2:
        raise ValueError(f"integrate_nbody: m_planet must be [B, K] (or [K] for one system) Msun, got shape "
                         f"{m_planet.shape}")
    B, K = m_planet.shape
    n_steps = _check_count("integrate_nbody: n_steps", n_steps, 1)
    substeps = _check_count("integrate_nbody: substeps", substeps, 1, TimeStepError)
    m_star = check_masses(m_star, "integrate_nbody: m_star (star mass)")
    if m_star.shape not in ((), (B,)):
        raise ValueError(f"integrate_nbody: m_star must be a scalar or [B] = [{B}], got shape {m_star.shape}")
    m_star = np.broadcast_to(m_star, (B,))
    if real is None:
        real = np.ones((B, K), bool)
    else:
        real = np.asarray(real)
        if real.dtype != bool or real.shape != (B, K):
            raise ValueError(f"integrate_nbody: real must be a bool array [B, K] = [{B}, {K}], got "
                             f"{real.dtype} {real.shape}")
    check_masses(m_planet[real], "integrate_nbody: m_planet (planet mass)")
    check_star_dominates(np.where(real, m_planet, 0.0), m_star[:, None])
    dt = check_dt(dt, "integrate_nbody: dt (time step)")
    if dt.shape not in ((), (B,)):
        raise ValueError(f"integrate_nbody: dt must be a scalar or [B] = [{B}] years, got shape {dt.shape}")
    dt = np.broadcast_to(dt, (B,))
    states = {}
    for name, x, shape, unit in (("star_pos0", star_pos0, (B, 2), "AU"),
                                 ("star_vel0", star_vel0, (B, 2), "AU/yr"),
                                 ("planet_pos0", planet_pos0, (B, K, 2), "AU"),
                                 ("planet_vel0", planet_vel0, (B, K, 2), "AU/yr")):
        x = _check_xy(f"integrate_nbody: {name}", x, unit)
        if x.shape != shape:
            raise ValueError(f"integrate_nbody: {name} must have shape {list(shape)} ({unit}), got {x.shape}")
        states[name] = x
    Xs, Xp = states["star_pos0"], states["planet_pos0"]
    sep = np.hypot(*np.moveaxis(Xp - Xs[:, None], -1, 0))
    _check_separation("integrate_nbody: planet_pos0 - star_pos0 (a planet on its star)",
                      np.where(real, sep, 1.0))
    if K > 1:
        d = Xp[:, :, None] - Xp[:, None]
        pair = real[:, :, None] & real[:, None] & ~np.eye(K, dtype=bool)[None]
        _check_separation("integrate_nbody: planet_pos0 (two planets)",
                          np.where(pair, np.hypot(d[..., 0], d[..., 1]), 1.0))
    if active_steps is not None:
        act = np.asarray(active_steps)
        if act.shape != (B,) or not np.issubdtype(act.dtype, np.integer):
            raise ValueError(f"integrate_nbody: active_steps must be integers [B] = [{B}], got {act.dtype} "
                             f"{act.shape}")
        if np.any((act < 0) | (act > n_steps)) or np.any(np.diff(act) > 0):
            raise ValueError(f"integrate_nbody: active_steps must lie in [0, n_steps={n_steps}] and be sorted "
                             f"in descending order, got {act[:10].tolist()}{' ...' if B > 10 else ''}")
    tr = _integrate_nbody(m_star, m_planet, Xs, states["star_vel0"], Xp, states["planet_vel0"], dt, n_steps,
                          substeps, real, active_steps)
    if single:
        return NBodyTrajectory(star_pos=tr.star_pos[0], star_vel=tr.star_vel[0], planet_pos=tr.planet_pos[0],
                               planet_vel=tr.planet_vel[0], energy_error=float(tr.energy_error[0]))
    return tr


def _integrate_nbody(m_star, m_planet, star_pos0, star_vel0, planet_pos0, planet_vel0, dt, n_steps, substeps,
                     real, active_steps) -> NBodyTrajectory:
    """:func:`integrate_nbody` on validated, batched arrays."""
    B, K = m_planet.shape
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
            q, v = _kepler_drift(q, v, mub, hb[:, None])
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
    power of two (so that systems share batches) and capped at ``max_substeps``. ``dt`` and ``min_period``
    (yr, > 0; an infinite period, from a parabolic orbit, needs one sub-step) broadcast."""
    check_dt(dt, "nbody_substeps: dt")
    p = _as_float("nbody_substeps: min_period", min_period)
    if np.any(np.isnan(p) | (p <= 0)):
        raise TimeStepError("nbody_substeps: min_period must be > 0 years, got "
                            f"{_fmt_bad(p, np.isnan(p) | (p <= 0))}")
    if not (isinstance(steps_per_orbit, (int, float, np.integer, np.floating)) and np.isfinite(steps_per_orbit)
            and steps_per_orbit > 0):
        raise TimeStepError("nbody_substeps: steps_per_orbit must be a finite number > 0, got "
                            f"{steps_per_orbit!r}")
    _check_count("nbody_substeps: max_substeps", max_substeps, 1, TimeStepError)
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


def _one_mass(name: str, m) -> float:
    if np.ndim(m) != 0:
        raise ValueError(f"{name} must be one mass (a number, Msun), got shape {np.shape(m)}")
    return float(check_masses(m, f"{name} (Msun)"))


def _planet_masses(m_planet) -> np.ndarray:
    m = _as_float("m_planet", m_planet)
    if m.ndim > 1 or m.size == 0:
        raise ValueError(f"m_planet must be one mass or a list of K >= 1 masses (Msun), got shape {m.shape}")
    return check_masses(np.atleast_1d(m), "m_planet (Msun)")


def _per_planet(name: str, x, K: int) -> np.ndarray:
    """``x`` as [K]: one number for every planet, or exactly K values (never a silent broadcast of a list)."""
    x = _as_float(name, x)
    if x.ndim == 0:
        return np.full(K, float(x))
    if x.shape != (K,):
        raise ValueError(f"{name} must be one number (for every planet) or {K} values (one per planet in "
                         f"m_planet), got shape {x.shape}")
    return x


def _planet_vectors(name: str, x, K: int, unit: str) -> np.ndarray:
    """Planet vectors as [K, 2]: shape (K, 2), or (2,) for one planet; finite (:class:`StateError`)."""
    x = _check_xy(name, x, unit)
    if x.shape == (2,) and K == 1:
        x = x[None]
    if x.shape != (K, 2):
        raise ValueError(f"{name} must have shape [K, 2] = [{K}, 2] (one (x, y) per planet in m_planet; [2] for "
                         f"one planet) in {unit}, got shape {x.shape}")
    return x


def _star_vector(name: str, x, unit: str) -> np.ndarray:
    x = _check_xy(name, x, unit)
    if x.shape != (2,):
        raise ValueError(f"{name} must be one (x, y) vector, shape [2] in {unit}, got shape {x.shape}")
    return x


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
        """``m_star`` (Msun, one number), ``m_planet`` [K] (or one number for K = 1), relative states
        ``rel_pos``/``rel_vel`` = planet - star [K, 2] (or [2] for K = 1; AU, AU/yr), the star's inertial
        ``star_pos``/``star_vel`` [2]. Typed errors name the argument (:class:`MassError`,
        :class:`StateError` for NaN/inf states or a planet on its star); mismatched shapes raise ValueError."""
        self.m_star = _one_mass("m_star", m_star)
        self.m_planet = _planet_masses(m_planet)
        K = len(self.m_planet)
        self.rel_pos = _planet_vectors("rel_pos", rel_pos, K, "AU")
        self.rel_vel = _planet_vectors("rel_vel", rel_vel, K, "AU/yr")
        _check_separation("rel_pos (a planet on its star)", np.hypot(self.rel_pos[:, 0], self.rel_pos[:, 1]))
        self.star_pos = _star_vector("star_pos", star_pos, "AU")
        self.star_vel = _star_vector("star_vel", star_vel, "AU/yr")

    @classmethod
    def from_elements(cls, m_star: float, m_planet, a, e, omega=None, mean_anomaly=None, *,
                      star_pos=(0.0, 0.0), rng: np.random.Generator | None = None) -> PlanetarySystem:
        """Planets from elements relative to the star: ``a`` (AU), ``e`` in [0, 1), ``omega`` argument of
        periapsis (rad) and ``mean_anomaly`` at t = 0 (rad). Missing angles are drawn U(0, 2 pi) from
        ``rng`` (a :class:`numpy.random.Generator`, required then). The star starts at ``star_pos``
        with the velocity that makes the total momentum zero (the centre of mass stays put); relative
        velocities follow from ``mu = G (m_p + m_s)``.

        Each per-planet argument (``a``, ``e``, ``omega``, ``mean_anomaly``) is either one number, used for
        every planet, or one value per planet (length K = ``len(m_planet)``); any other length raises a
        ValueError (a one-element list for two planets is an error, not a broadcast)."""
        m_planet = _planet_masses(m_planet)
        K = len(m_planet)
        a = check_semi_major_axis(_per_planet("a", a, K), "a (semi-major axis, AU)")
        e = check_eccentricity(_per_planet("e", e, K), "e (eccentricity)")
        m_star = _one_mass("m_star", m_star)
        if (omega is None or mean_anomaly is None) and not isinstance(rng, np.random.Generator):
            raise TypeError("pass omega and mean_anomaly, or a numpy.random.Generator as rng to draw them, "
                            f"got rng={rng!r}")
        omega = (rng.uniform(0, 2 * np.pi, m_planet.shape) if omega is None
                 else _check_finite("omega", _per_planet("omega", omega, K), "angles (rad)"))
        mean_anomaly = (rng.uniform(0, 2 * np.pi, m_planet.shape) if mean_anomaly is None
                        else _check_finite("mean_anomaly", _per_planet("mean_anomaly", mean_anomaly, K),
                                           "angles (rad)"))
        star_pos = _star_vector("star_pos", star_pos, "AU")
        pos, vel = kepler_state(a, e, omega, mean_anomaly, G * (m_planet + m_star))
        star_vel = -(m_planet[:, None] * vel).sum(0) / (m_star + m_planet.sum())  # zero total momentum
        return cls(m_star, m_planet, pos, vel, star_pos=star_pos, star_vel=star_vel)

    @classmethod
    def from_cartesian(cls, m_star: float, m_planet, planet_pos, planet_vel, star_pos=(0.0, 0.0),
                       star_vel=(0.0, 0.0)) -> PlanetarySystem:
        """Planets from inertial positions [K, 2] (AU) and velocities [K, 2] (AU/yr; [2] for one planet) and
        the star's [2]. NaN/inf states raise :class:`StateError` naming the argument, a planet on the star
        too; a planet count that differs from ``len(m_planet)`` raises ValueError."""
        K = len(_planet_masses(m_planet))
        sp, sv = _star_vector("star_pos", star_pos, "AU"), _star_vector("star_vel", star_vel, "AU/yr")
        pp = _planet_vectors("planet_pos", planet_pos, K, "AU")
        pv = _planet_vectors("planet_vel", planet_vel, K, "AU/yr")
        _check_separation("planet_pos - star_pos (a planet on its star)", np.hypot(*(pp - sp).T))
        return cls(m_star, m_planet, pp - sp, pv - sv, star_pos=sp, star_vel=sv)

    def elements(self) -> Elements:
        """Osculating elements of each planet's orbit about the star (t = 0)."""
        return elements_from_state(self.rel_pos, self.rel_vel, G * (self.m_planet + self.m_star))

    def simulate(self, n_steps: int, dt: float, *, mode: str = "kepler", fixed_star: bool | None = None,
                 substeps: int | None = None, steps_per_orbit: float = 40.0) -> Trajectory:
        """Positions and velocities at ``t = 0, dt, ..., (n_steps-1) dt`` (years).

        ``n_steps`` an integer >= 1 (a float such as 2.5 raises TypeError), ``dt`` one number > 0 years
        (:class:`TimeStepError`), ``mode`` ``"kepler"`` or ``"nbody"``, ``fixed_star`` None (the default
        of the mode) or a bool, ``substeps`` None (from ``steps_per_orbit`` sub-steps per innermost period)
        or an integer >= 1. Kepler mode needs bound initial states (:class:`EccentricityError` names the
        planets that are not)."""
        if mode not in ("kepler", "nbody"):
            raise ValueError(f"unknown mode {mode!r}; choose 'kepler' or 'nbody'")
        n_steps = _check_count("n_steps", n_steps, 1)
        if np.ndim(dt) != 0:
            raise TimeStepError(f"dt must be one time step in years (a number), got shape {np.shape(dt)}")
        dt = float(check_dt(dt, "dt (time step)"))
        if fixed_star is not None and not isinstance(fixed_star, (bool, np.bool_)):
            raise TypeError(f"fixed_star must be None, True or False, got {fixed_star!r}")
        if substeps is not None:
            substeps = _check_count("substeps", substeps, 1, TimeStepError)
        if not (isinstance(steps_per_orbit, (int, float, np.integer, np.floating))
                and not isinstance(steps_per_orbit, bool) and np.isfinite(steps_per_orbit)
                and steps_per_orbit > 0):
            raise TimeStepError(f"steps_per_orbit must be a finite number > 0, got {steps_per_orbit!r}")
        K = len(self.m_planet)
        t = np.arange(n_steps) * dt
        if mode == "kepler":
            fixed_star = K > 1 if fixed_star is None else bool(fixed_star)
            if K > 1 and not fixed_star:
                raise ValueError("kepler mode with several planets needs fixed_star=True (use mode='nbody')")
            el = self.elements()
            if np.any(el.e >= 1):
                idx = np.nonzero(el.e >= 1)[0].tolist()
                raise EccentricityError("kepler mode needs bound orbits, but the initial states of planets "
                                        f"{idx} are unbound (e = {el.e[idx].tolist()} >= 1: speed at or above escape "
                                        "speed); lower rel_vel / planet_vel, or use mode='nbody'")
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
                pmin = _orbital_period(np.abs(el.a), G * (self.m_planet + self.m_star)).min()
                substeps = int(nbody_substeps(dt, pmin, steps_per_orbit, 1 << 16))
            tr = integrate_nbody(np.array([self.m_star]), self.m_planet[None], self.star_pos[None],
                                 self.star_vel[None], (self.star_pos + self.rel_pos)[None],
                                 (self.star_vel + self.rel_vel)[None], np.array([dt]), n_steps, substeps)
            return Trajectory(t, tr.star_pos[0], tr.star_vel[0], tr.planet_pos[0], tr.planet_vel[0],
                              self.m_star, self.m_planet.copy())
        raise AssertionError(mode)  # unreachable: checked above
