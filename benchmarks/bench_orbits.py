"""Speed of the orbit dataset generator (not a test; run after tests/test_orbits*.py pass).

Times the ``pretrain`` preset (1000-token multi-planet sequences, with states and force labels) built
by :func:`gravprobe.orbits.generate_arrays` in one process -- with the fused numba engine
(``orbits/fused.py``, the default) and with the whole-array numpy engine (same bytes) -- against a scalar
baseline written below in the style of the literature's reference generator: one Newton solve of
Kepler's equation per point in a Python loop. All produce the same quantities per point (position,
relative state, force, tokens). Reports sequences per second per core (CPU time of this process, so
that other load on the machine counts less) and wall time, their ratio, the ``nbody`` preset separately,
and the extrapolated time for 10M pretraining sequences on all cores of this machine.

    python benchmarks/bench_orbits.py                 # ~1 minute
    python benchmarks/bench_orbits.py --systems 4096 --baseline 40 --nbody 32
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats

from gravprobe.orbits import DatasetSpec, ensure_dataset, generate_arrays
from gravprobe.orbits.physics import G
from gravprobe.orbits.priors import DEFAULT_PRIORS


def baseline_system(rng: np.random.Generator):
    """One system drawn per call from the METHOD.md §1.2 priors, scalar style (both baselines share it):
    K planets, e, a (AU), planet masses, star mass (M☉), dt (yr), argument of periapsis, mean anomaly."""
    p = DEFAULT_PRIORS
    K = int(rng.integers(1, 11))
    e = stats.beta(p["eccentricity"]["a"], p["eccentricity"]["b"]).rvs(size=K, random_state=rng)
    a = stats.uniform(0.3, 31.7).rvs(size=K, random_state=rng)
    pm = p["planet_mass"]
    mp = np.clip(stats.gamma(pm["shape"], loc=pm["loc"], scale=pm["scale"]).rvs(size=K, random_state=rng), *pm["clip"])
    ps = p["star_mass"]
    ms = float(np.clip(stats.lognorm(ps["s"], loc=ps["loc"], scale=ps["scale"]).rvs(random_state=rng), *ps["clip"]))
    dt = [0.0189, 0.486][int(rng.integers(0, 2))]
    omega = rng.uniform(0, 2 * math.pi, K)
    M0 = rng.uniform(0, 2 * math.pi, K)
    return K, e, a, mp, ms, dt, omega, M0


def baseline_sequence(rng: np.random.Generator, seq_len: int = 1000, n_bins: int = 7000, L: float = 50.0):
    """One pretraining sequence, scalar style: priors per system, a Newton solve per point."""
    K, e, a, mp, ms, dt, omega, M0 = baseline_system(rng)
    com = rng.normal(0, 1, 2)
    star = (float(com[0]), float(com[1]))
    w = 2 * L / n_bins
    tokens = np.full((seq_len, 2), n_bins + 2, dtype=np.int16)
    states = np.zeros((seq_len, 6), dtype=np.float32)
    forces = np.zeros((seq_len, 2), dtype=np.float32)
    tokens[0] = n_bins + (dt == 0.486)
    n_steps = (seq_len - 1) // (K + 1)
    pos = 1
    for s in range(n_steps):
        t = s * dt
        for j in range(K):
            mu = G * (mp[j] + ms)
            n = math.sqrt(mu / a[j] ** 3)
            M = (M0[j] + n * t) % (2 * math.pi)
            E = M if e[j] < 0.8 else math.pi
            for _ in range(50):  # Newton
                dE = (E - e[j] * math.sin(E) - M) / (1 - e[j] * math.cos(E))
                E -= dE
                if abs(dE) < 1e-12:
                    break
            cE, sE = math.cos(E), math.sin(E)
            q = math.sqrt(1 - e[j] ** 2)
            xp, yp = a[j] * (cE - e[j]), a[j] * q * sE
            k = a[j] * n / (1 - e[j] * cE)
            vxp, vyp = -k * sE, k * q * cE
            cw, sw = math.cos(omega[j]), math.sin(omega[j])
            x, y = cw * xp - sw * yp, sw * xp + cw * yp
            vx, vy = cw * vxp - sw * vyp, sw * vxp + cw * vyp
            r = math.hypot(x, y)
            f = -G * mp[j] * ms / r**3
            X, Y = star[0] + x, star[1] + y
            tokens[pos] = (min(max(int((X + L) // w), 0), n_bins - 1), min(max(int((Y + L) // w), 0), n_bins - 1))
            states[pos] = (x, y, vx, vy, mp[j], ms)
            forces[pos] = (f * x, f * y)
            pos += 1
        tokens[pos] = (min(max(int((star[0] + L) // w), 0), n_bins - 1),
                       min(max(int((star[1] + L) // w), 0), n_bins - 1))
        pos += 1
    return tokens, states, forces


def baseline_sequence_numpy(rng: np.random.Generator, seq_len: int = 1000, n_bins: int = 7000, L: float = 50.0):
    """The same sequence in the style of the literature's reference generator: per point, one
    ``scipy.optimize.newton`` solve and small numpy vectors for the state, rotation, force and bins."""
    from scipy.optimize import newton

    K, e, a, mp, ms, dt, omega, M0 = baseline_system(rng)
    star = rng.normal(0, 1, 2)
    edges = np.linspace(-L, L, n_bins + 1)
    out_tokens, out_states, out_forces = [[n_bins + (dt == 0.486)] * 2], [np.zeros(6)], [np.zeros(2)]
    for s in range((seq_len - 1) // (K + 1)):
        for j in range(K):
            mu = G * (mp[j] + ms)
            n = np.sqrt(mu / a[j] ** 3)
            M = np.mod(M0[j] + n * s * dt, 2 * np.pi)
            E = newton(lambda E: E - e[j] * np.sin(E) - M, M, fprime=lambda E: 1 - e[j] * np.cos(E), tol=1e-12)  # noqa: B023 (called at once)
            R = np.array([[np.cos(omega[j]), -np.sin(omega[j])], [np.sin(omega[j]), np.cos(omega[j])]])
            r = R @ np.array([a[j] * (np.cos(E) - e[j]), a[j] * np.sqrt(1 - e[j] ** 2) * np.sin(E)])
            k = a[j] * n / (1 - e[j] * np.cos(E))
            v = R @ np.array([-k * np.sin(E), k * np.sqrt(1 - e[j] ** 2) * np.cos(E)])
            f = -G * mp[j] * ms * r / np.linalg.norm(r) ** 3
            out_tokens.append(np.clip(np.digitize(star + r, edges) - 1, 0, n_bins - 1))
            out_states.append(np.concatenate([r, v, [mp[j], ms]]))
            out_forces.append(f)
        out_tokens.append(np.clip(np.digitize(star, edges) - 1, 0, n_bins - 1))
        out_states.append(np.zeros(6))
        out_forces.append(np.zeros(2))
    return np.array(out_tokens), np.array(out_states), np.array(out_forces)


def _timed(fn, repeat: int = 1):
    """Run ``fn`` ``repeat`` times; return its output and the best wall and CPU seconds (best-of-n damps
    the noise of other processes on a shared machine)."""
    best_w = best_c = float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best_w, best_c = min(best_w, time.perf_counter() - w0), min(best_c, time.process_time() - c0)
    return out, best_w, best_c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", type=int, default=4096, help="sequences for the vectorised pretrain run")
    ap.add_argument("--baseline", type=int, default=20, help="sequences for the scalar baseline")
    ap.add_argument("--nbody", type=int, default=16, help="sequences for the nbody preset (0 to skip)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many timings")
    ap.add_argument("--write", action="store_true", help="also time writing a dataset to disk (1 worker)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.2f}; numpy {np.__version__}")

    spec = DatasetSpec(name="pretrain", n_systems=args.systems, seq_len=1000, shard_size=min(1024, args.systems))
    # time block by block (1024 sequences each, `repeat` passes): the median is the typical rate, the best
    # the least disturbed by other processes on a shared machine
    block = spec.shard_size
    rates = {}
    for engine in ("numpy", "numba"):
        os.environ["GRAVPROBE_ORBITS_ENGINE"] = engine
        generate_arrays(spec.replace(n_systems=64), seed=99)  # warm-up (and numba's compile or cache load)
        per_block = []  # (wall, cpu) seconds per sequence
        for _ in range(args.repeat):
            for start in range(0, args.systems, block):
                count = min(block, args.systems - start)
                arr, w, c = _timed(lambda: generate_arrays(spec, seed=0, start=start, count=count))  # noqa: B023
                per_block.append((w / count, c / count))
                n_tok = int((arr["bodies"] >= 0).sum()) / count
        walls, cpus = np.array(per_block).T
        rates[engine] = (1 / np.median(cpus), 1 / np.median(walls), 1 / cpus.min())
        print(f"{engine:>5} engine, pretrain: {args.repeat} x {args.systems} sequences ({n_tok:.0f} tokens each), "
              f"per block of {block}: median {rates[engine][0]:,.0f} seq/s/core (CPU; "
              f"{1e6 / rates[engine][0]:.0f} us/seq), best {rates[engine][2]:,.0f}; wall median "
              f"{rates[engine][1]:,.0f} seq/s")
    os.environ.pop("GRAVPROBE_ORBITS_ENGINE")
    vec_cpu, vec_wall, vec_best = rates["numba"]
    print(f"fused (numba) engine: {vec_cpu / rates['numpy'][0]:.2f}x the numpy engine per core")

    rng = np.random.default_rng(0)
    _, bwall, bcpu = _timed(lambda: [baseline_sequence_numpy(rng) for _ in range(args.baseline)], args.repeat)
    base_cpu, base_wall = args.baseline / bcpu, args.baseline / bwall
    print(f"scalar baseline (literature style: scipy newton + numpy per point): {args.baseline} sequences in "
          f"{bwall:.2f} s wall / {bcpu:.2f} s CPU -> {base_cpu:,.2f} seq/s/core, {1e3 / base_cpu:.1f} ms/seq "
          f"(the literature's generator: ~160 ms/seq)")
    _, _, fcpu = _timed(lambda: [baseline_sequence(rng) for _ in range(args.baseline)], args.repeat)
    fast_cpu = args.baseline / fcpu
    print(f"scalar baseline (plain-Python math, a tighter loop than the literature's): {1e3 / fast_cpu:.1f} ms/seq, "
          f"{fast_cpu:,.1f} seq/s/core")
    print(f"speed-up per core (CPU time): {vec_cpu / base_cpu:,.0f}x vs the literature-style baseline, "
          f"{vec_cpu / fast_cpu:,.0f}x vs the plain-math loop, {vec_cpu * 0.160:,.0f}x vs 160 ms/seq; "
          f"wall: {vec_wall / base_wall:,.0f}x")
    t10m = 1e7 / (vec_cpu * cores)
    print(f"extrapolated 10M pretrain sequences on {cores} cores: {t10m / 60:.1f} min at the median rate, "
          f"{1e7 / (vec_best * cores) / 60:.1f} min at the best "
          f"(literature-style baseline: {1e7 / (base_cpu * cores) / 3600:.1f} h)")

    if args.write:
        n_write = min(args.systems, 2048)
        for label, arrays in (("all arrays", None), ("tokens + bodies", ["tokens", "bodies"])):
            with tempfile.TemporaryDirectory() as d:
                wspec = spec.replace(n_systems=n_write, arrays=arrays)
                _, wwall, wcpu = _timed(lambda: ensure_dataset(wspec, d, seed=0, workers=1, progress=False))  # noqa: B023
                kb = sum(f.stat().st_size for f in Path(d).rglob("*.npy")) / n_write / 1024
            print(f"write to disk, {label} ({kb:.1f} KB/seq; 1 worker, incl. .npy files + sha256): "
                  f"{n_write / wwall:,.0f} seq/s wall, {n_write / wcpu:,.0f} seq/s/core CPU -> 10M on {cores} "
                  f"cores: {1e7 / (n_write / wwall * cores) / 60:.1f} min, {kb * 1e7 / 1024**2:,.0f} GB")

    if args.nbody:
        # as the nbody preset: systems that miss the tolerance at max_substeps are redrawn (their cost counts)
        nspec = DatasetSpec(name="nbody", mode="nbody", n_systems=args.nbody, shard_size=args.nbody,
                            nbody={"above_tolerance": "redraw"})
        arr, nwall, ncpu = _timed(lambda: generate_arrays(nspec, seed=0))
        err = arr["energy_error"]
        print(f"nbody preset:        {args.nbody} sequences in {nwall:.1f} s wall / {ncpu:.1f} s CPU -> "
              f"{args.nbody / ncpu:.2f} seq/s/core; energy error median {np.median(err):.1e}, "
              f"max {err.max():.1e}, {np.mean(err > nspec.nbody['energy_tolerance']):.0%} above "
              f"{nspec.nbody['energy_tolerance']:.0e}")


if __name__ == "__main__":
    main()
