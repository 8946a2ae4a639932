"""The ``generate`` stage: ``gravprobe generate data=<preset> data.n_systems=N workers=N out=PATH seed=S``.

Writes (or resumes, or reuses) the dataset of ``cfg.data`` at ``out`` (default ``${home}/data/<name>``)
and records a summary in the run folder's ``results.json["generate"]``. Never imports torch.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from gravprobe.orbits.dataset import DatasetError, DatasetSpec, ensure_dataset, load_dataset

log = logging.getLogger(__name__)


def main(cfg, run_dir) -> dict:
    from gravprobe.common import update_results

    spec = DatasetSpec.from_config(cfg.data)
    out = Path(cfg.out) if cfg.get("out") else Path(cfg.home) / "data" / spec.name
    t0 = time.perf_counter()
    try:
        path = ensure_dataset(spec, out, seed=int(cfg.seed), workers=int(cfg.get("workers", 0) or 0))
    except DatasetError as e:
        if "already holds a dataset" in str(e) and not cfg.get("out"):
            raise DatasetError(f"{e}. The default folder {out} is taken by another spec; pass e.g. "
                               f"out={out}-{spec.spec_hash()[:8]}-s{cfg.seed}") from None
        raise
    seconds = time.perf_counter() - t0
    ds = load_dataset(path)
    summary = {
        "path": str(path), "name": spec.name, "mode": spec.mode, "n_systems": len(ds),
        "seq_len": spec.seq_len,
        "n_shards": ds.meta["n_shards"], "seed": int(cfg.seed), "spec_hash": spec.spec_hash(),
        "seconds": round(seconds, 3), "arrays": list(spec.stored_arrays),
        "bytes": sum(f["bytes"] for rec in ds.meta["shards"] for f in rec["files"].values()),
        "max_energy_error": float(np.max(np.asarray(ds.energy_error))),
    }
    if "labelled" in spec.stored_arrays:
        summary["labelled_steps"] = int(sum(np.asarray(ds.labelled[s:s + 4096]).sum()
                                            for s in range(0, len(ds), 4096)))
    update_results(run_dir, "generate", summary)
    log.info("dataset %s: %d systems x %d tokens, %.2f GB, in %.1f s", path, len(ds), spec.seq_len,
             summary["bytes"] / 1e9, seconds)
    return summary
