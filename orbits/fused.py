"""Fused Kepler-mode sequence builder: numba loops around numpy's SIMD ``cbrt`` and ``tan``.

The numpy engine (:func:`gravprobe.orbits.dataset._simulate_kepler` plus the assembly in ``_build_chunk``)
computes every quantity as a whole-grid array: ~40 float64 temporaries per token, which makes it bound by
memory traffic, not arithmetic. A plain numba loop removes the traffic but is bound by scalar ``tan`` and
``cbrt`` calls (~45 ns per token together, where numpy's SIMD loops take ~3 ns). This module does both,
per chunk of ``CHUNK_TOKENS`` planet tokens held in a scratch array (one row per quantity):

1. ``_pass_starter`` (numba, per system and step) reduces the mean anomaly, gathers the planet's
   constants and forms the argument of Mikkola's cube root;
2. ``np.cbrt`` (numpy, SIMD);
3. ``_pass_tangent`` (numba, flat) finishes the starter ``E0`` and forms the tangent's half-angle argument;
4. ``np.tan`` (numpy, SIMD);
5. ``_pass_solve`` (numba, flat and branch-free, so LLVM vectorises it) takes the Householder and Newton
   steps and forms the relative state and the star's force;
6. ``_pass_write`` (numba, per system and step) polishes near-parabolic tokens (e > 0.99999), forms the
   observed positions and tokens and writes every output array in place, star, marker and padding rows
   included, so nothing is assembled afterwards.

The arithmetic repeats :func:`gravprobe.orbits.physics._kepler_sincos`, ``_kepler_xy`` and
``_simulate_kepler`` operation by operation (same order, no fused multiply-add, per-planet constants
computed by the same numpy expressions), so both engines give the same bytes; ``tests/test_orbits_dataset.py``
checks that on every output array. ``GRAVPROBE_ORBITS_ENGINE=numpy`` selects the numpy engine (the
reference, and the fallback where numba is not installed).
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np

log = logging.getLogger(__name__)

# planet tokens per chunk (the scratch array holds 17 float64 rows of this length)
CHUNK_TOKENS = 16384
_ENGINES = ("auto", "numba", "numpy")
_kernels = None
_logged = False


def kepler_engine() -> str:
    """The Kepler-mode engine in use: ``numba`` (the fused path) or ``numpy``.

    ``GRAVPROBE_ORBITS_ENGINE`` = ``auto`` (default: numba when it imports), ``numba`` (error if it does
    not) or ``numpy``. Both engines give the same bytes (tested).
    """
    global _logged
    want = os.environ.get("GRAVPROBE_ORBITS_ENGINE", "auto").strip().lower() or "auto"
    if want not in _ENGINES:
        raise ValueError(f"GRAVPROBE_ORBITS_ENGINE={want!r}: choose one of {', '.join(_ENGINES)}")
    if want == "numpy":
        return "numpy"
    try:
        _get_kernels()
    except ImportError as e:
        if want == "numba":
            raise ImportError("GRAVPROBE_ORBITS_ENGINE=numba but numba does not import "
                              f"({e}); install it with `pip install numba` or unset the variable") from e
        if not _logged:
            log.warning("numba is not installed: the orbit generator uses its numpy path (same bytes, "
                        "~4x slower); `pip install numba` for the fused path")
            _logged = True
        return "numpy"
    return "numba"


def _get_kernels():
    """Compile (or load from numba's on-disk cache) the loops; numba is imported lazily."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = _build_kernels(cache=True)
        except RuntimeError as e:  # no writable cache folder (read-only install and home): compile per process
            if "cannot cache" not in str(e):
                raise
            log.info("numba cannot cache the orbit kernels (%s; set NUMBA_CACHE_DIR to a writable folder): "
                     "compiling them in this process", e)
            _kernels = _build_kernels(cache=False)
    return _kernels


# rows of the per-chunk scratch array (float64, one column per planet token)
_ROWS = ("Ma", "sg", "e", "E0", "tan", "a", "q", "cw", "sw", "n", "kG", "x", "y", "vx", "vy", "fx", "fy")
R = {name: i for i, name in enumerate(_ROWS)}


def _build_kernels(cache: bool = True):
    import numba

    from gravprobe.orbits.physics import G

    jit = numba.njit(cache=cache, nogil=True, error_model="numpy")
    TWO_PI = 2.0 * math.pi
    HALF_PI = 0.5 * math.pi
    INV_TWO_PI = 0.5 / math.pi

    @jit
    def _pass_starter(n_planets, dts, a, e, q, cw, sw, n, M0, mp, ms, T, ns, buf):
        """Per planet token (systems, steps, planets in sequence order): M reduced to [0, pi] and its sign,
        the planet's constants, Mikkola's alpha and the argument of his cube root. ``ns``: star tokens per
        step (1, or 0 for planet-only sequences). Returns the count."""
        Ma, sg, ee, al, zz = buf[0], buf[1], buf[2], buf[3], buf[4]
        k = 0
        for i in range(n_planets.shape[0]):
            K = n_planets[i]
            dt = dts[i]
            for s in range((T - 1) // (K + ns)):
                t = s * dt
                for j in range(K):
                    ej = e[i, j]
                    M = M0[i, j] + n[i, j] * t
                    turns = np.floor(M * INV_TWO_PI + 0.5)
                    m = turns * -TWO_PI + M
                    sg[k] = math.copysign(1.0, m)
                    m = abs(m)
                    inv = 1.0 / (4.0 * ej + 0.5)
                    a_ = (1.0 - ej) * inv
                    b_ = (m * 0.5) * inv
                    Ma[k] = m
                    ee[k] = ej
                    al[k] = a_
                    zz[k] = math.sqrt(a_ * a_ * a_ + b_ * b_) + b_
                    buf[5, k] = a[i, j]
                    buf[6, k] = q[i, j]
                    buf[7, k] = cw[i, j]
                    buf[8, k] = sw[i, j]
                    buf[9, k] = n[i, j]
                    buf[10, k] = mp[i, j] * ms[i] * -G
                    k += 1
        return k

    @jit
    def _pass_tangent(cnt, ee, Ma, al, zz):
        """z = cbrt(...) in ``zz`` -> starter E0 (into ``al``) and the tangent's argument (into ``zz``)."""
        for k in range(cnt):
            z = zz[k]
            ej = ee[k]
            sm = z - al[k] / z
            t = sm * sm
            t = t * t * sm * 0.078
            sm -= t / (1.0 + ej)
            E0 = (sm * sm * -4.0 + 3.0) * sm * ej + Ma[k]
            al[k] = E0
            zz[k] = (E0 - HALF_PI) * 0.5

    @numba.njit(inline="always")
    def _refine(E0, t, m, ej):
        """sin E0, cos E0 from t = tan((E0 - pi/2)/2); a fourth-order Householder step and a Newton step
        (sine and cosine by angle addition with Taylor series of the small increment). Returns
        (sin E, cos E, d) with E = E0 + d the Newton iterate (for the near-parabolic polish)."""
        t2 = t * t
        u = 1.0 / (1.0 + t2)
        sE = (1.0 - t2) * u
        cE = t * u * -2.0
        f = E0 - ej * sE - m
        f1 = 1.0 - ej * cE
        f2 = ej * sE
        d = -(f / f1)
        d = -(f / (d * f2 * 0.5 + f1))
        d = -(f / ((d * f2 * 0.5 + f1) + d * d * ej * cE * (1.0 / 6.0)))
        dd = d * d
        sd = (1.0 - (1.0 - dd * (1.0 / 20.0)) * dd * (1.0 / 6.0)) * d
        cm = (1.0 - dd * (1.0 / 12.0)) * dd * -0.5
        ds = sE * cm + cE * sd
        cosE = cE * cm - sE * sd + cE
        d -= (d - ej * ds + f) / (1.0 - ej * cosE)
        dd = d * d
        sd = (1.0 - (1.0 - dd * (1.0 / 20.0)) * dd * (1.0 / 6.0)) * d
        cm = (1.0 - dd * (1.0 / 12.0)) * dd * -0.5
        sinE = sE + (sE * cm + cE * sd)
        cosE = cE * cm - sE * sd + cE
        return sinE, cosE, d

    @numba.njit(inline="always")
    def _state(sinE, cosE, ej, aj, qj, c_, s_, nj, kG):
        """Relative position and velocity rotated by omega, and the star's force (``kG = -G m_p m_s``)."""
        xp = (cosE - ej) * aj
        aq = aj * qj
        yp = aq * sinE
        kv = nj / (1.0 - ej * cosE)
        vxp = -(aj * kv * sinE)
        vyp = aq * kv * cosE
        x = c_ * xp - s_ * yp
        y = s_ * xp + c_ * yp
        r2 = x * x + y * y
        kf = kG / (math.sqrt(r2) * r2)
        return x, y, c_ * vxp - s_ * vyp, s_ * vxp + c_ * vyp, kf * x, kf * y

    @jit
    def _pass_solve(cnt, ee, Ma, E0s, tans, sg, a, q, cw, sw, n, kG, x, y, vx, vy, fx, fy):
        """Flat and branch-free, so LLVM vectorises it (AVX2: four tokens per instruction)."""
        for k in range(cnt):
            ej = ee[k]
            sinE, cosE, _ = _refine(E0s[k], tans[k], Ma[k], ej)
            x[k], y[k], vx[k], vy[k], fx[k], fy[k] = _state(sinE * sg[k], cosE, ej, a[k], q[k], cw[k], sw[k],
                                                            n[k], kG[k])

    @jit
    def _polish(buf, k):
        """Token k with e > 0.99999: Newton iterations from the refined E (as the numpy path); False if
        they do not converge."""
        ej, m = buf[2, k], buf[0, k]
        _, _, d = _refine(buf[3, k], buf[4, k], m, ej)
        E = buf[3, k] + d
        for _ in range(50):
            dE = (E - ej * math.sin(E) - m) / (1.0 - ej * math.cos(E))
            E = E - dE
            if abs(dE) < 1e-15:
                out = _state(math.sin(E) * buf[1, k], math.cos(E), ej, buf[5, k], buf[6, k], buf[7, k],
                             buf[8, k], buf[9, k], buf[10, k])
                for r in range(6):
                    buf[11 + r, k] = out[r]
                return True
        return False

    @jit
    def _pass_write(n_planets, origin, cp, cs, mp, ms, buf, L, w, top, pad, dt_id, ns,
                    tokens, positions, states, forces, bodies, labelled):
        """Scatter the flat results into the sequence layout: observed positions and their tokens, states,
        forces, the star rows, the dt marker and the padding, every cell written. Returns -1 - i if the
        near-parabolic polish of system i failed, else the token count."""
        T = tokens.shape[1]
        k = 0
        for i in range(n_planets.shape[0]):
            K = n_planets[i]
            ox = origin[i, 0]
            oy = origin[i, 1]
            cpi = cp[i]
            csi = cs[i]
            tokens[i, 0, 0] = dt_id[i]
            tokens[i, 0, 1] = dt_id[i]
            bodies[i, 0] = -1
            labelled[i, 0] = False
            for c in range(2):
                positions[i, 0, c] = 0.0
                forces[i, 0, c] = 0.0
            for c in range(6):
                states[i, 0, c] = 0.0
            p = 1
            x = 0.0
            y = 0.0
            for s in range((T - 1) // (K + ns)):
                for j in range(K):
                    if buf[2, k] > 0.99999 and not _polish(buf, k):
                        return -1 - i
                    x = buf[11, k]
                    y = buf[12, k]
                    X = cpi * x + ox
                    Y = cpi * y + oy
                    positions[i, p, 0] = X
                    positions[i, p, 1] = Y
                    tokens[i, p, 0] = min(max(np.floor((X + L) / w), 0.0), top)
                    tokens[i, p, 1] = min(max(np.floor((Y + L) / w), 0.0), top)
                    states[i, p, 0] = x
                    states[i, p, 1] = y
                    states[i, p, 2] = buf[13, k]
                    states[i, p, 3] = buf[14, k]
                    states[i, p, 4] = mp[i, j]
                    states[i, p, 5] = ms[i]
                    forces[i, p, 0] = buf[15, k]
                    forces[i, p, 1] = buf[16, k]
                    bodies[i, p] = j + 1
                    labelled[i, p] = True
                    p += 1
                    k += 1
                if ns == 0:
                    continue
                # the star: for K = 1 opposite the planet about the centre of mass, for K > 1 pinned (cs = 0)
                X = ox - csi * x
                Y = oy - csi * y
                positions[i, p, 0] = X
                positions[i, p, 1] = Y
                tokens[i, p, 0] = min(max(np.floor((X + L) / w), 0.0), top)
                tokens[i, p, 1] = min(max(np.floor((Y + L) / w), 0.0), top)
                for c in range(6):
                    states[i, p, c] = 0.0
                forces[i, p, 0] = 0.0
                forces[i, p, 1] = 0.0
                bodies[i, p] = 0
                labelled[i, p] = False
                p += 1
            while p < T:
                tokens[i, p, 0] = pad
                tokens[i, p, 1] = pad
                positions[i, p, 0] = 0.0
                positions[i, p, 1] = 0.0
                for c in range(6):
                    states[i, p, c] = 0.0
                forces[i, p, 0] = 0.0
                forces[i, p, 1] = 0.0
                bodies[i, p] = -1
                labelled[i, p] = False
                p += 1
        return k

    return _pass_starter, _pass_tangent, _pass_solve, _pass_write


def fill_kepler(consts: dict, n_planets, dts, origin, cp, cs, tokenizer, dt_id, out: dict, *,
                star_token: bool = True) -> None:
    """Write the Kepler-mode arrays of S systems into ``out`` (``tokens``, ``positions``, ``states``,
    ``forces``, ``bodies``, ``labelled``; ``[S, T, ...]``, any views).

    ``consts``: per-planet arrays ``[S, K]`` named ``a, e, q, cw, sw, n, M0, mp`` and ``ms`` ``[S]`` (the
    same expressions as the numpy path); ``origin`` [S, 2], ``cp``/``cs`` [S] place the planet and star
    (see ``_simulate_kepler``); ``labelled`` comes back as "every planet step" (partial labelling is
    applied by the caller); ``star_token=False`` leaves the star rows out (planet-only sequences).
    """
    starter, tangent, solve, write = _get_kernels()
    T = out["tokens"].shape[1]
    S = len(n_planets)
    ns = int(bool(star_token))
    per = np.maximum((T - 1) // (n_planets + ns) * n_planets, 1)
    L, w, top, pad = tokenizer.coord_range, tokenizer.bin_width, float(tokenizer.n_bins - 1), tokenizer.pad_id
    buf = np.empty((len(_ROWS), max(CHUNK_TOKENS, int(per.max()))))
    c = consts
    ends = np.cumsum(per)
    lo = 0
    while lo < S:
        # the longest run of systems from lo whose planet tokens fit the scratch array
        hi = int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + buf.shape[1], side="right"))
        hi = max(hi, lo + 1)
        sl = slice(lo, hi)
        cnt = starter(n_planets[sl], dts[sl], c["a"][sl], c["e"][sl], c["q"][sl], c["cw"][sl], c["sw"][sl],
                      c["n"][sl], c["M0"][sl], c["mp"][sl], c["ms"][sl], T, ns, buf)
        zz = buf[R["tan"], :cnt]
        np.cbrt(zz, out=zz)
        tangent(cnt, buf[R["e"]], buf[R["Ma"]], buf[R["E0"]], buf[R["tan"]])
        np.tan(zz, out=zz)
        solve(cnt, *(buf[R[name]] for name in ("e", "Ma", "E0", "tan", "sg", "a", "q", "cw", "sw", "n", "kG",
                                                "x", "y", "vx", "vy", "fx", "fy")))
        r = write(n_planets[sl], origin[sl], cp[sl], cs[sl], c["mp"][sl], c["ms"][sl], buf, L, w, top, pad,
                  dt_id[sl], ns, out["tokens"][sl], out["positions"][sl], out["states"][sl], out["forces"][sl],
                  out["bodies"][sl], out["labelled"][sl])
        if r < 0:
            from gravprobe.orbits.physics import IntegrationError

            raise IntegrationError("Kepler's equation did not converge for e > 0.99999 "
                                   f"(system {lo - 1 - r} of this block)")
        lo = hi
