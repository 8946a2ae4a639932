"""Benchmark: time to recover Newton's law from 2-NN oracle data with the offline engine (Operon).

Generates two-body force data with ``gravprobe.orbits.generate_arrays`` (in memory), runs the §4.3
selection and the §4.4 oracle, then fits every galaxy with ``fit_equation`` for several SR seeds and
judges each law with ``compare_to_newton``. Reports seconds per galaxy and the success rate.

    python benchmarks/bench_symbolic.py                       # 5 galaxies x 3 seeds, 2 threads
    python benchmarks/bench_symbolic.py --systems 10000 --seq-len 1000 --n-keep 5000 --galaxy-size 1000

Target (issue 5): every run recovers Newton, in under 30 s per galaxy on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", type=int, default=2000, help="two-body force sequences (last 10%% held out)")
    p.add_argument("--seq-len", type=int, default=257, help="tokens per sequence (planet steps = (T-1)/2)")
    p.add_argument("--n-keep", type=int, default=5000, help="held-out states nearest to training states")
    p.add_argument("--galaxy-size", type=int, default=1000)
    p.add_argument("--galaxies", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3, help="SR seeds per galaxy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--generations", type=int, default=None, help="override sr generations")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from gravprobe.orbits import DatasetSpec, generate_arrays
    from gravprobe.probes.data import SR_NAMES, make_galaxies, oracle_predict, select_nearest, split_force_data
    from gravprobe.probes.symbolic import OPERON_DEFAULTS, fit_equation
    from gravprobe.probes.verdict import compare_to_newton

    full = int(round(a.systems * 0.9))
    spec = DatasetSpec.from_config({"name": "two_body_force", "planets": [1, 1], "n_systems": a.systems,
                                    "seq_len": a.seq_len, "shard_size": 500,
                                    "labelling": {"full_systems": full, "partial_steps": 2}})
    t0 = time.perf_counter()
    import types

    ds = types.SimpleNamespace(**generate_arrays(spec, seed=0))
    train, held = split_force_data(ds)
    order, _ = select_nearest(train.state, held.state, a.n_keep)
    pool = held.subset(order)
    y = oracle_predict(train.state, train.magnitude, pool.state, k=2)
    X = pool.sr_inputs
    galaxies = make_galaxies(len(order), min(a.galaxy_size, len(order)), range(a.galaxies))
    prep = time.perf_counter() - t0
    print(f"data: {a.systems} systems x {a.seq_len} tokens, {len(train)} training / {len(held)} held-out "
          f"states, pool {len(order)}, oracle median |rel err| {np.median(np.abs(y / pool.magnitude - 1)):.4f} "
          f"({prep:.1f}s)")
    opts = {"n_threads": a.threads}
    if a.generations:
        opts["generations"] = a.generations
    print(f"engine: operon, {a.threads} threads, settings {dict(OPERON_DEFAULTS, **opts)}")
    rows = []
    for g, idx in enumerate(galaxies):
        for s in range(a.seeds):
            t = time.perf_counter()
            res = fit_equation(X[idx], y[idx], SR_NAMES, backend="operon", seed=s, **opts)
            v = compare_to_newton(res.expression, X[idx], y[idx])
            dt = time.perf_counter() - t
            rows.append({"galaxy": g, "seed": s, "seconds": dt, "newtonian": v.newtonian, "symbolic": v.symbolic,
                         "expression": str(res.expression), "r2_newton": v.r2_newton})
            print(f"galaxy {g} seed {s}: {dt:6.2f}s  {'NEWTON' if v.newtonian else 'not  '}  "
                  f"{'(symbolic)' if v.symbolic else '          '}  {res.expression}")
            sys.stdout.flush()
    secs = np.array([r["seconds"] for r in rows])
    ok = sum(r["newtonian"] for r in rows)
    summary = {"runs": len(rows), "recovered": ok, "success_rate": ok / len(rows),
               "seconds_per_galaxy": {"mean": float(secs.mean()), "median": float(np.median(secs)),
                                      "max": float(secs.max())},
               "threads": a.threads, "cpu_count": os.cpu_count(), "rows": rows}
    print(f"\nrecovered Newton in {ok}/{len(rows)} runs; seconds per galaxy: mean {secs.mean():.2f}, "
          f"median {np.median(secs):.2f}, max {secs.max():.2f} (target: all, < 30 s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if ok == len(rows) and secs.max() < 30 else 1


if __name__ == "__main__":
    sys.exit(main())
