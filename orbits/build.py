"""The vectorised sequence builder: simulate and tokenise systems into the arrays of a dataset.

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

Shard k (systems ``[k * shard_size, (k+1) * shard_size)``) is a pure function of (spec, seed, k): its random
numbers come from ``numpy.random.default_rng([seed, k, stream])``. Module caches (token layouts per planet
count, per-process output buffers) only save work; they never change a byte. Writing to disk is
:mod:`gravprobe.orbits.store`.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from gravprobe.orbits import fused, physics
from gravprobe.orbits.physics import G
from gravprobe.orbits.priors import SystemParams, sample_systems
from gravprobe.orbits.spec import DatasetSpec

log = logging.getLogger(__name__)

_STREAM_PARAMS, _STREAM_LABELS, _STREAM_REDRAW = 0, 1, 2  # default_rng([seed, k, stream, ...])


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
    F = physics.gravity_force(planet_pos - star_pos[:, None], m[..., None], p.m_star[:, None, None],
                              zero_separation="nan")
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
