"""The ``probe`` stage: checkpoint + force data → probes, fine-tuned head, laws per galaxy, verdicts.

``main(cfg, run_dir)`` (called by ``gravprobe probe``) writes into ``run_dir``:

- ``results.json["probes"]`` = ``{"linear": {target: {layer: r2}}, "mlp": {...},
  "galaxies": [verdict × n_galaxies], "oracle": {"galaxies": [...]}, "truth": {"galaxies": [...]},
  "head": {...}, "selection": {...}, "sr": {...}}`` (DESIGN.md "Runs and files");
- ``probes_linear.csv`` (probe, layer, target, r2) and ``probes_linear.png`` (R² per layer);
- ``equations_<source>_galaxy<seed>.csv`` — the full Pareto front per galaxy, for ``source`` in
  ``head`` (the fine-tuned model), ``oracle`` (2-NN) and ``truth`` (true |F| with 1 % noise);
- ``force_pred_vs_true.png`` and ``equations_<source>.png`` (each galaxy's law against its data).

Torch and the model are imported only inside the functions that need them.
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gravprobe.probes.data import (SR_NAMES, make_galaxies, noisy_truth, oracle_predict, select_nearest,
                                   split_force_data)
from gravprobe.probes.symbolic import SRResult, fit_equation
from gravprobe.probes.verdict import compare_to_newton

log = logging.getLogger(__name__)


def _get(node, key, default=None):
    if node is None:
        return default
    try:
        v = node.get(key, default)
    except AttributeError:
        v = getattr(node, key, default)
    return default if v is None else v


def _plain(node) -> dict:
    if node is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(node)


def sr_settings(sr_cfg, workers: int = 0) -> dict[str, Any]:
    """``cfg.sr`` → keyword arguments of :func:`fit_equation` (``n_threads: 0`` → ``workers``)."""
    d = _plain(sr_cfg)
    options = dict(d.pop("options", {}) or {})
    d.pop("name", None)
    if "n_threads" in options and int(options["n_threads"] or 0) == 0 and workers:
        options["n_threads"] = int(workers)
    return {**d, **options}


def recover_laws(X: np.ndarray, y: np.ndarray, galaxies: Sequence[np.ndarray], seeds: Sequence[int],
                 sr_kwargs: dict, *, out_dir: str | Path | None = None, tag: str = "head",
                 verdict_kwargs: dict | None = None) -> tuple[list[dict], list[SRResult]]:
    """Fit one law per galaxy and judge it. ``X [P, 3]`` = (r, m1, m2) of the pool, ``y [P]`` the values
    to explain (predicted |F|); ``galaxies`` index the pool. Returns the verdict dicts (DESIGN.md shape
    plus details) and the SR results; writes ``equations_<tag>_galaxy<seed>.csv`` when ``out_dir``."""
    verdicts, fits = [], []
    for seed, idx in zip(seeds, galaxies):
        Xg, yg = X[idx], y[idx]
        t0 = time.perf_counter()
        res = fit_equation(Xg, yg, SR_NAMES, seed=int(seed), **sr_kwargs)
        v = compare_to_newton(res.expression, Xg, yg, SR_NAMES, **(verdict_kwargs or {}))
        d = {"seed": int(seed), "expression": str(res.expression), "newtonian": v.newtonian, "reasons": v.reasons,
             "exponents": v.exponents, "r2_newton": v.r2_newton, "symbolic": v.symbolic,
             "exponents_data": v.exponents_data, "r2_law": v.r2_law, "r2_power_law": v.r2_power_law,
             "backend": res.backend, "seconds": time.perf_counter() - t0}
        if out_dir is not None:
            path = res.table.to_csv(Path(out_dir) / f"equations_{tag}_galaxy{seed}.csv")
            d["table"] = path.name
        log.info("%s galaxy %d: %s -> %s", tag, seed, res.expression, "NEWTONIAN" if v.newtonian else "not newtonian")
        verdicts.append(d)
        fits.append(res)
    return verdicts, fits


# ------------------------------------------------------------------------------------------- plots
def plot_linear(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = sorted({r["probe"] for r in rows})
    fig, axes = plt.subplots(1, len(probes), figsize=(6 * len(probes), 4), squeeze=False)
    for ax, p in zip(axes[0], probes):
        for t in sorted({r["target"] for r in rows}):
            pts = sorted((r["layer"], r["r2"]) for r in rows if r["probe"] == p and r["target"] == t)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=t)
        ax.set(xlabel="layer (0 = embeddings)", ylabel="held-out R²", title=f"{p} probes", ylim=(-0.1, 1.02))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pred_vs_true(series: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 4.2), squeeze=False)
    for ax, (name, (true, pred)) in zip(axes[0], series.items()):
        ok = (true > 0) & (pred > 0)
        ax.loglog(true[ok], pred[ok], ".", ms=2, alpha=0.4)
        lo, hi = true[ok].min(), true[ok].max()
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel="true |F| (M☉ AU yr⁻²)", ylabel="predicted |F|", title=name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_laws(X: np.ndarray, y: np.ndarray, galaxies, fits: list[SRResult], verdicts: list[dict], title: str,
              path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import sympy as sp

    fig, axes = plt.subplots(1, len(fits), figsize=(4.2 * len(fits), 4.4), squeeze=False)
    for ax, idx, res, v in zip(axes[0], galaxies, fits, verdicts):
        f = res.predict(X[idx])
        ok = (y[idx] > 0) & (f > 0) & np.isfinite(f)
        ax.loglog(y[idx][ok], f[ok], ".", ms=4, alpha=0.6, color="C0")
        if ok.any():
            lo, hi = y[idx][ok].min(), y[idx][ok].max()
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, zorder=0)
        expr = str(sp.N(res.expression, 4))
        expr = expr if len(expr) < 60 else expr[:57] + "..."
        ax.set_title(f"galaxy {v['seed']}: {'NEWTON' if v['newtonian'] else 'not Newton'}\n{expr}", fontsize=7)
        ax.set(xlabel="|F| fitted to", ylabel="law")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _nested(rows: list[dict], probe: str) -> dict:
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["probe"] == probe:
            out.setdefault(r["target"], {})[str(r["layer"])] = r["r2"]
    return out


# -------------------------------------------------------------------------------------------- main
def _device(cfg) -> str:
    want = str(_get(cfg, "device", "auto"))
    if want == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def load_force_data(cfg):
    """Ensure and open the ``cfg.force_data`` dataset (same convention as pretrain/the pipeline)."""
    from gravprobe.orbits import DatasetSpec, dataset_dir, ensure_dataset, load_dataset

    spec = DatasetSpec.from_config(cfg.force_data)
    path = ensure_dataset(spec, dataset_dir(spec, int(cfg.seed)), seed=int(cfg.seed), workers=int(_get(cfg, "workers", 0)))
    return load_dataset(path)


def load_model(cfg, run_dir: Path, device: str):
    from gravprobe.pretrain import load_checkpoint

    ckpt = _get(cfg, "checkpoint") or Path(run_dir) / "checkpoints" / "last.pt"
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint at {ckpt}: pass checkpoint=PATH (a pretrain run's "
                                "checkpoints/last.pt) or run `gravprobe run` so pretrain writes one in this run")
    model, meta = load_checkpoint(ckpt, map_location=device)
    log.info("probing checkpoint %s", ckpt)
    return model.to(device), meta, ckpt


def run_probes(model, ds, cfg, run_dir: Path, *, device: str = "cpu") -> dict:
    """Everything after loading: linear probes, head, oracle, truth control, laws and verdicts."""
    from gravprobe.common import update_results
    from gravprobe.probes.force_head import finetune_force_head
    from gravprobe.probes.linear import run_linear_probes

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pc = cfg.probe
    seed = int(_get(cfg, "seed", 0))
    workers = int(_get(cfg, "workers", 0))
    out: dict[str, Any] = {}

    # §4.1 linear probes (on a copy of the pretrained weights: the head fine-tunes the trunk afterwards)
    lin = _get(pc, "linear")
    if lin is not None and _get(lin, "enabled", True):
        rows = run_linear_probes(model, ds, lin, layers=_get(pc, "layers", "all"), seed=seed, device=device)
        _write_csv(rows, run_dir / "probes_linear.csv")
        plot_linear(rows, run_dir / "probes_linear.png")
        out["linear"] = _nested(rows, "ridge")
        if any(r["probe"] == "mlp" for r in rows):
            out["mlp"] = _nested(rows, "mlp")
    else:
        out["linear"] = {}

    # §4.3 selection: training states = labelled steps; pool = held-out steps nearest to them
    train, held = split_force_data(ds)
    sel = _get(pc, "selection")
    order, dist = select_nearest(train.state, held.state, int(_get(sel, "n_keep", 5000)),
                                 max_reference=_get(sel, "max_reference", 200_000), seed=seed)
    seeds = [int(s) for s in _get(sel, "seeds", [0, 1, 2, 3, 4])]
    size = min(int(_get(sel, "galaxy_size", 1000)), len(order))
    galaxies = make_galaxies(len(order), size, seeds)
    pool = held.subset(order)
    X = pool.sr_inputs
    out["selection"] = {"n_training_states": len(train), "n_heldout_states": len(held), "n_pool": len(order),
                        "galaxy_size": size, "seeds": seeds, "max_distance": float(dist.max())}
    sr_kwargs = sr_settings(cfg.sr, workers)
    verdict_kwargs = _plain(_get(pc, "verdict")) or {}
    out["sr"] = {k: v for k, v in sr_kwargs.items()}

    # §4.2 fine-tuned head → predictions at the held-out steps
    head_cfg = _get(pc, "head")
    series = {}
    if head_cfg is not None and _get(head_cfg, "enabled", True):
        n = ds.states.shape[0]
        partial = np.unique(held.system)
        max_train = _get(head_cfg, "max_train_systems")
        train_systems = np.arange(n)
        if max_train:
            rng = np.random.default_rng(seed)
            train_systems = np.union1d(rng.choice(n, min(int(max_train), n), replace=False), partial)
        qmask = (np.asarray(ds.bodies[partial]) >= 1) & ~np.asarray(ds.labelled[partial], dtype=bool)
        res = finetune_force_head(model, ds, train_systems, partial, qmask, head_cfg, seed=seed, device=device)
        if len(res.pred_magnitude) != len(held):  # pragma: no cover - ordering contract
            raise RuntimeError("force-head predictions do not line up with the held-out steps")
        y_head = res.pred_magnitude[order]
        series["fine-tuned head"] = (pool.magnitude, y_head)
        _write_csv([{"step": i, "loss": l} for i, l in enumerate(res.losses)], run_dir / "force_head_loss.csv")
        ok = y_head > 0
        rel = np.abs(np.log(y_head[ok]) - np.log(pool.magnitude[ok]))
        out["head"] = {"protocol": res.protocol, "steps": len(res.losses),
                       "loss": {"first": res.losses[0] if res.losses else None,
                                "last": float(np.mean(res.losses[-20:])) if res.losses else None},
                       "median_abs_log_error": float(np.median(rel)) if ok.any() else None}
        v, fits = recover_laws(X, y_head, galaxies, seeds, sr_kwargs, out_dir=run_dir, tag="head",
                               verdict_kwargs=verdict_kwargs)
        out["galaxies"] = v
        plot_laws(X, y_head, galaxies, fits, v, "fine-tuned model", run_dir / "equations_head.png")
        update_results(run_dir, "probes", out)  # partial results survive an interruption of the controls
    else:
        out["galaxies"] = []

    # §4.4 oracle and the noisy-truth control, through the same selection and regression
    orc = _get(pc, "oracle")
    if orc is None or _get(orc, "enabled", True):
        y_or = oracle_predict(train.state, train.magnitude, pool.state, k=int(_get(orc, "k", 2)))
        series["2-NN oracle"] = (pool.magnitude, y_or)
        v, fits = recover_laws(X, y_or, galaxies, seeds, sr_kwargs, out_dir=run_dir, tag="oracle",
                               verdict_kwargs=verdict_kwargs)
        out["oracle"] = {"k": int(_get(orc, "k", 2)), "galaxies": v}
        plot_laws(X, y_or, galaxies, fits, v, "2-NN oracle", run_dir / "equations_oracle.png")
        noise = float(_get(orc, "truth_noise", 0.01))
        if noise >= 0 and _get(orc, "truth_control", True):
            y_tr = noisy_truth(pool.magnitude, noise, seed)
            v, fits = recover_laws(X, y_tr, galaxies, seeds, sr_kwargs, out_dir=run_dir, tag="truth",
                                   verdict_kwargs=verdict_kwargs)
            out["truth"] = {"noise": noise, "galaxies": v}
            plot_laws(X, y_tr, galaxies, fits, v, f"true |F| with {noise:.0%} noise", run_dir / "equations_truth.png")
    if series:
        plot_pred_vs_true(series, run_dir / "force_pred_vs_true.png")
    update_results(run_dir, "probes", out)
    return out


def main(cfg, run_dir) -> dict:
    """``gravprobe probe``: see the module docstring. Returns a small summary."""
    run_dir = Path(run_dir)
    device = _device(cfg)
    ds = load_force_data(cfg)
    model, _, ckpt = load_model(cfg, run_dir, device)
    out = run_probes(model, ds, cfg, run_dir, device=device)
    summary = {"checkpoint": str(ckpt),
               "newtonian_galaxies": sum(g["newtonian"] for g in out.get("galaxies", [])),
               "oracle_newtonian_galaxies": sum(g["newtonian"] for g in out.get("oracle", {}).get("galaxies", [])),
               "n_galaxies": len(out.get("galaxies", []))}
    log.info("probe summary: %s", summary)
    return summary
