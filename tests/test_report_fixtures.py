"""Synthetic run and sweep folders in the documented results.json schema (docs/results_schema.md).

Helpers only (imported by test_report.py and test_notebook.py); the numbers are made up but shaped
like real ones, and chosen so that every aggregate the report prints can be checked by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

LENGTHS = ("1", "2", "4", "8", "16")
TARGETS = ("F_x", "F_y", "F_mag", "log_F_mag", "r", "inv_r", "inv_r2")  # as gravprobe.probes names them


def galaxy(seed: int, newtonian: bool) -> dict:
    if newtonian:
        return {"seed": seed, "expression": "39.478*m1*m2/r**2", "newtonian": True,
                "reasons": "symbolically C*m1*m2/r**2",
                "exponents": {"r": [-2.0, -2.01, -1.99], "m1": [1.0, 0.99, 1.01], "m2": [1.0, 0.98, 1.02]},
                "r2_newton": 0.999}
    return {"seed": seed, "expression": "cos(cos(2.19*m1))", "newtonian": False,
            "reasons": "exponent of r -0.31 outside CI of -2; R² of Newtonian fit 0.41",
            "exponents": {"r": [-0.31, -0.5, -0.1], "m1": [0.2, 0.0, 0.4], "m2": [0.9, 0.7, 1.1]},
            "r2_newton": 0.41}


def variant_results(name: str, seed: int, *, n_newton: int, with_oracle: bool, shift: float = 0.0) -> dict:
    """results.json sections of one variant; losses grow with length by a variant-dependent slope."""
    slope = {"softmax": 0.5, "lssa": 0.2, "lssar": 0.05}.get(name, 0.3)
    base = 3.0 + 0.1 * seed + shift
    ext = {mod: {k: round(base + off + slope * i, 6) for i, k in enumerate(LENGTHS)}
           for mod, off in (("orbits", 0.0), ("text", 1.0))}
    probes = {"attention": name,
              "linear": {t: {str(layer): round(0.2 + 0.15 * layer - 0.01 * j, 4) for layer in range(3)}
                         for j, t in enumerate(TARGETS)},
              "galaxies": [galaxy(g, g < n_newton) for g in range(5)]}
    if with_oracle:
        probes["oracle"] = {"galaxies": [galaxy(g, True) for g in range(5)]}
    return {"pretrain": {"attention": name, "steps": 20,
                         "loss": {"orbits": {"first": 8.9, "last": base}, "text": {"first": 5.5, "last": base + 1}},
                         "length_extrapolation": ext},
            "probes": probes}


def config(seed: int, variants: list[str], stage: str = "run") -> dict:
    return {"stage": stage, "seed": seed, "attention": {"name": variants[0], "params": {}},
            "pipeline": {"variants": variants, "report": True}, "model": {"name": "tiny"}}


def write_run(run_dir: Path, variants: list[str], seed: int = 0, *, n_newton: dict | None = None,
              drop: dict | None = None, shift: float = 0.0) -> Path:
    """A `gravprobe run` folder; ``drop={"lssar": "probes"}`` leaves that section out (or ``"folder"``)."""
    n_newton = n_newton or {}
    drop = drop or {}
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = config(seed, variants)
    (run_dir / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    (run_dir / "results.json").write_text(json.dumps({
        "config": cfg,
        "pipeline": {"variants": variants, "oracle_variant": variants[0],
                     "datasets": {"data": "/tmp/data/a", "force_data": "/tmp/data/b"},
                     "stages": {"generate": "done"}, "timings_s": {"generate": 1.5}, "complete": not drop}}))
    for i, name in enumerate(variants):
        if drop.get(name) == "folder":
            continue
        vdir = run_dir / name
        (vdir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (vdir / "checkpoints" / "last.pt").write_bytes(b"fake")
        res = {"config": {**cfg, "attention": {"name": name}},
               **variant_results(name, seed, n_newton=n_newton.get(name, 0), with_oracle=i == 0, shift=shift)}
        if drop.get(name) in ("pretrain", "probes"):
            res.pop(drop[name])
        (vdir / "results.json").write_text(json.dumps(res))
        rows = ["true,predicted"] + [f"{x:.6g},{x * (1.05 if k % 2 else 0.95):.6g}"
                                     for k, x in enumerate(10.0 ** (-5 + 0.05 * i) for i in range(100))]
        (vdir / "force_predictions.csv").write_text("\n".join(rows) + "\n")
    return run_dir


def write_sweep(sweep_dir: Path, variants=("softmax", "lssar"), seeds=(0, 1, 2), *, drop_job: int | None = None
                ) -> Path:
    """A `-m attention=... seed=...` sweep: one job per (variant, seed), each training its variant only."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for name in variants:
        for seed in seeds:
            d = sweep_dir / f"{job}_run_attention={name},seed={seed}"
            write_run(d, [name], seed, n_newton={"lssar": 4, "softmax": 0}, shift=0.0,
                      drop={name: "probes"} if job == drop_job else None)
            (d / ".hydra").mkdir(exist_ok=True)
            (d / ".hydra" / "overrides.yaml").write_text(
                f"- stage=run\n- attention={name}\n- seed={seed}\n")
            job += 1
    return sweep_dir


# ------------------------------------------------------------------ the number files a stage folder holds
PROBE_TARGETS = ("F_x", "F_y", "F_mag", "log_F_mag", "r", "log_r", "inv_r", "inv_r2", "a", "e", "lrl_x",
                 "lrl_y", "log_m1", "log_m2")  # 14 targets: more than one colour cycle
NEWTON = "39.478*m1*m2/r**2"
LONG_LAW = ("39.4784176*m1**1.0003*m2**0.99987/r**2.00012 + 0.000123456*exp(-3.21*r)*m1*log(1 + m2) "
            "- 0.00077*cos(2.19*m1)*sqrt(m2)/(1 + r**3)")  # longer than any title line


def write_stage_numbers(vdir: Path, *, n_layers: int = 3, n_points: int = 60, seed: int = 0) -> dict:
    """The number files of a pretrain + probe stage folder, in the formats the stages write:
    ``metrics.csv``, ``probes_linear.csv`` (one target far below the R² floor), ``force_predictions.csv``
    (``source,true,pred``: the head and the oracle), ``laws_head.npz`` / ``laws_oracle.npz`` (X = r, m1, m2;
    y; galaxy seed per point), and the matching ``probes`` galaxies merged into ``results.json``.
    Returns that ``probes`` section."""
    import numpy as np

    vdir.mkdir(parents=True, exist_ok=True)
    rows = ["step,split,modality,loss,lr,tokens,wall_s"]
    for step in range(0, 101, 10):
        for split in ("train", "val"):
            rows.append(f"{step},{split},orbits,{5.0 / (1 + step / 20):.4f},0.001,{step * 64},{step / 10:.2f}")
            rows.append(f"{step},{split},text,{6.0 / (1 + step / 40):.4f},0.001,{step * 64},{step / 10:.2f}")
    (vdir / "metrics.csv").write_text("\n".join(rows) + "\n")
    lines = ["model,probe,layer,target,r2,decodable,alpha,alpha_edge"]
    for model in ("trained", "untrained"):
        for layer in range(n_layers):
            for j, t in enumerate(PROBE_TARGETS):
                r2 = -394.0 if (t == "log_F_mag" and layer == 0) else round(0.9 - 0.06 * j - 0.1 * layer, 4)
                if model == "untrained":
                    r2 = round(0.01 - 0.002 * j, 4)
                lines.append(f"{model},ridge,{layer},{t},{r2},{r2 >= 0.05},10.0,")
    (vdir / "probes_linear.csv").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.uniform(0.5, 5, n_points), rng.uniform(1e-3, 1e-1, n_points),
                         rng.uniform(0.5, 2, n_points)])
    y = 39.478 * X[:, 1] * X[:, 2] / X[:, 0] ** 2
    galaxy = np.repeat([0, 1, 2], n_points // 3)
    np.savez(vdir / "laws_head.npz", X=X, y=y * rng.lognormal(0, 0.1, n_points), galaxy=galaxy)
    np.savez(vdir / "laws_oracle.npz", X=X, y=y, galaxy=galaxy)
    pred = ["source,true,pred"] + [f"fine-tuned head,{t:.6g},{t * 1.1:.6g}" for t in y] \
        + [f"2-NN oracle,{t:.6g},{t * 0.97:.6g}" for t in y] + ["2-NN oracle,1.0,0.0"]
    (vdir / "force_predictions.csv").write_text("\n".join(pred) + "\n")
    head = [{"seed": 0, "expression": NEWTON, "newtonian": True}, {"seed": 1, "expression": LONG_LAW,
                                                                    "newtonian": False},
            {"seed": 2, "expression": "m1*q/r", "newtonian": False}]  # q: not an input, cannot be evaluated
    probes = {"galaxies": head, "oracle": {"galaxies": [{"seed": s, "expression": NEWTON, "newtonian": True}
                                                        for s in (0, 1, 2)]},
              "linear_probe": {"decodable_min_r2": 0.05}}
    path = vdir / "results.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res["probes"] = {**(res.get("probes") or {}), **probes}
    path.write_text(json.dumps(res))
    return res["probes"]
