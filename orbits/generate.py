"""The ``generate`` stage: ``gravprobe generate data=<preset> data.n_systems=N workers=N out=PATH seed=S``.

Writes (or resumes, or reuses) the dataset of ``cfg.data`` in the folder every later stage looks in
(:func:`gravprobe.orbits.store.dataset_path`: ``${home}/data/<name>-<spec hash>-s<seed>``, or ``out=PATH``),
logs that folder and what a later stage needs to find it, and records a summary in the run folder's
``results.json["generate"]``. Never imports torch.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from gravprobe.orbits.store import config_dataset_path, ensure_dataset, load_dataset

log = logging.getLogger(__name__)


def later_stages_hint(cfg, path) -> str:
    """How ``pretrain``, ``run`` and ``probe`` find the dataset just written at ``path``."""
    seed = int(cfg.seed)
    if cfg.get("out"):
        return (f"later stages read it with the same data settings, seed={seed} and out={path} (pretrain, run); "
                f"as the probing set, pass force_out={path} with the same settings under force_data")
    from gravprobe.common import output_root

    return (f"pretrain and run find it by themselves with the same data settings and seed={seed} under "
            f"home={output_root(cfg)}; as the probing set (probe), force_data needs the same settings")


def main(cfg, run_dir) -> dict:
    from gravprobe.common import update_results

    spec, out = config_dataset_path(cfg, "data")
    log.info("dataset %s (seed %d): %s", spec.name, int(cfg.seed), out)
    t0 = time.perf_counter()
    path = ensure_dataset(spec, out, seed=int(cfg.seed), workers=int(cfg.get("workers", 0) or 0))
    seconds = time.perf_counter() - t0
    ds = load_dataset(path)
    hint = later_stages_hint(cfg, path)
    summary = {
        "path": str(path), "name": spec.name, "mode": spec.mode, "n_systems": len(ds),
        "seq_len": spec.seq_len,
        "n_shards": ds.meta["n_shards"], "seed": int(cfg.seed), "spec_hash": spec.spec_hash(),
        "seconds": round(seconds, 3), "arrays": list(spec.stored_arrays),
        "bytes": sum(f["bytes"] for rec in ds.meta["shards"] for f in rec["files"].values()),
        "max_energy_error": float(np.max(np.asarray(ds.energy_error))),
        "later_stages": hint,
    }
    if "labelled" in spec.stored_arrays:
        summary["labelled_steps"] = int(sum(np.asarray(ds.labelled[s:s + 4096]).sum()
                                            for s in range(0, len(ds), 4096)))
    update_results(run_dir, "generate", summary)
    log.info("dataset %s: %d systems x %d tokens, %.2f GB, in %.1f s", path, len(ds), spec.seq_len,
             summary["bytes"] / 1e9, seconds)
    log.info("%s", hint)
    return summary
