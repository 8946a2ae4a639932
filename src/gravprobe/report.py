"""`gravprobe report`: rebuild ``report.md`` and its plots for a run or sweep folder from files alone.

Entry points
------------
- ``report_dir(path) -> Path``: write ``report.md`` (and PNGs) into ``path`` — a run folder of any stage
  or a sweep folder — reading nothing but the files in it; returns the path of ``report.md``. This is
  what ``gravprobe report DIR`` calls.
- ``main(cfg, run_dir)``: the Hydra form, ``gravprobe report report.source=DIR``.
- ``load(path) -> RunResult | SweepResult``: the same files as Python objects (used by the notebook);
  ``equations_table``, ``aggregate`` and ``force_predictions`` give the tables shown in the report.
- ``SweepReportCallback``: a Hydra callback (registered in ``conf/config.yaml``) that writes the sweep
  report when a ``--multirun`` ends.

Run folders and ``results.json``
--------------------------------
Every run folder holds ``config.yaml`` (resolved config, written by the CLI) and ``results.json``,
which grows stage by stage (``gravprobe.common.update_results``). The full schema, with units, is in
``docs/results_schema.md``; in short::

    {"config":   {...the resolved config...},
     "pretrain": {"attention": "lssar", "steps": 500,
                  "loss": {"orbits": {"first": 8.9, "last": 3.1}, "text": {"first": 5.5, "last": 2.9}},
                  "length_extrapolation": {"orbits": {"1": 3.1, "2": 3.2, "4": .., "8": .., "16": ..},
                                           "text":   {"1": .., ...}}},
     "probes":   {"linear": {"<target>": {"<layer>": r2, ...}, ...},
                  "galaxies": [{"seed": 0, "expression": "...", "newtonian": false, "reasons": "...",
                                "exponents": {"r": [..], "m1": [..], "m2": [..]}, "r2_newton": 0.41},
                               ... one per galaxy (5) ...],
                  "oracle": {"galaxies": [... same shape ...]},      # the 2-NN control (METHOD §4.4)
                  "truth":  {"galaxies": [... same shape ...]}},     # true |F| + noise, same regression
     "pipeline": {...}}   # only in a `gravprobe run` folder, see below

Losses are mean cross-entropy in nats per predicted token; length keys are multiples of the training
context (``"1"`` = the training length); R² is on held-out systems; layer keys are ``"0"`` (embeddings)
… ``"L"`` (after block L).

A ``gravprobe run`` folder (stage ``run``) holds one sub-folder per attention variant, each a complete
single-variant run folder (``<variant>/results.json`` with ``pretrain`` and ``probes``,
``<variant>/checkpoints/last.pt``), and a top-level ``results.json`` with ``config`` and::

    "pipeline": {"variants": ["softmax", "lssa", "lssar"],          # what this run trains, in order
                 "datasets": {"data": "<dir>", "force_data": "<dir>"},
                 "oracle_variant": "softmax",                       # whose probes hold the oracle
                 "stages": {"generate": "done", "softmax/pretrain": "done" | "reused", ...},
                 "timings_s": {"generate": 1.2, "softmax/pretrain": 30.5, ...},
                 "complete": true}

A sweep folder (``--multirun``; Hydra writes ``multirun.yaml`` into it) holds one run folder per job.

What counts as complete: a single-stage run needs its stage's section; a pipeline run needs, for every
variant it names, ``pretrain`` and ``probes`` sections and the checkpoint, and an oracle somewhere.
Anything missing is reported by name ("incomplete: lssa: probes missing"), never skipped silently.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gravprobe.common import arm_label  # noqa: F401  (re-exported: the report's name for an arm)

log = logging.getLogger(__name__)

LENGTH_KEYS_ORDER = ("1", "2", "4", "8", "16", "32", "64")
MODALITIES = ("orbits", "text")
STAGE_SECTIONS = {"pretrain": ("pretrain",), "probe": ("probes",), "run": ("pretrain", "probes"),
                  "variant": ("pretrain", "probes")}


class ReportError(ValueError):
    """The folder given to the report is not a run or sweep folder."""


# ----------------------------------------------------------------------------------------- loading
@dataclass
class VariantResult:
    """One attention variant's results inside one run.

    ``pretrain`` / ``probes`` are the sections of its ``results.json`` (``None`` when absent);
    ``missing`` names every expected piece that is not there.
    """

    name: str
    dir: Path
    pretrain: dict | None = None
    probes: dict | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def galaxies(self) -> list[dict]:
        return list((self.probes or {}).get("galaxies") or [])

    @property
    def oracle_galaxies(self) -> list[dict]:
        return list(((self.probes or {}).get("oracle") or {}).get("galaxies") or [])


@dataclass
class RunResult:
    """One run folder (any stage). ``variants`` in the order the run names them."""

    dir: Path
    stage: str
    config: dict
    variants: dict[str, VariantResult]
    pipeline: dict | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def oracle(self) -> list[dict]:
        """The oracle's galaxies (METHOD §4.4), from whichever variant's probes hold them."""
        for v in self.variants.values():
            if v.oracle_galaxies:
                return v.oracle_galaxies
        return []

    @property
    def truth(self) -> list[dict]:
        """The noisy-truth control's galaxies (true |F| with small noise through the same regression)."""
        for v in self.variants.values():
            gals = (((v.probes or {}).get("truth") or {}).get("galaxies")) or []
            if gals:
                return list(gals)
        return []

    def control(self, name: str) -> dict:
        """A model-independent control's section (``oracle``, ``truth``, ``oracle_without_m1``,
        ``memoriser``; METHOD §4.4/§4.6) from whichever variant's probes hold it, ``{}`` when none does."""
        for v in self.variants.values():
            sec = (v.probes or {}).get(name)
            if isinstance(sec, dict) and (sec.get("galaxies") or sec.get("note")):
                return sec
        return {}

    @property
    def problems(self) -> list[str]:
        out = list(self.missing)
        for v in self.variants.values():
            out += [f"{v.name}: {m}" for m in v.missing]
        return out

    @property
    def complete(self) -> bool:
        return not self.problems


@dataclass
class SweepResult:
    """A ``--multirun`` folder: one ``RunResult`` per job folder, in job order."""

    dir: Path
    runs: list[RunResult]
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems and all(r.complete for r in self.runs)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON ({e}); the stage that wrote it was interrupted or the "
                          "file was edited by hand — rerun that stage") from e


def _read_config(run_dir: Path, results: dict | None) -> dict:
    if results and isinstance(results.get("config"), dict):
        return results["config"]
    for cand in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if cand.exists():
            from omegaconf import OmegaConf

            try:
                return OmegaConf.to_container(OmegaConf.load(cand), resolve=False)  # type: ignore[return-value]
            except Exception as e:  # noqa: BLE001 - an unparsable config is reported, not fatal
                log.warning("cannot read %s: %s", cand, e)
    return {}


def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "results.json").exists() or (path / "config.yaml").exists() or (path / ".hydra").is_dir()


def is_sweep_dir(path: Path) -> bool:
    path = Path(path)
    if (path / "multirun.yaml").exists():
        return True
    return not is_run_dir(path) and any(is_run_dir(p) for p in path.iterdir() if p.is_dir())


def _variant_of(stage_dir: Path, name: str, expected: Iterable[str], need_checkpoint: bool) -> VariantResult:
    res = _read_json(stage_dir / "results.json") or {}
    v = VariantResult(name=name, dir=stage_dir, pretrain=res.get("pretrain"), probes=res.get("probes"))
    if not stage_dir.is_dir():
        v.missing.append(f"folder {stage_dir.name}/ missing (nothing ran for this variant)")
        return v
    for section in expected:
        if not res.get(section):
            v.missing.append(f"{section} missing (no '{section}' in {stage_dir.name}/results.json)")
    if need_checkpoint and not (stage_dir / "checkpoints" / "last.pt").exists():
        v.missing.append("checkpoint missing (checkpoints/last.pt)")
    req, done = (v.probes or {}).get("requested"), (v.probes or {}).get("done")
    if isinstance(req, list) and isinstance(done, list):
        # the probe stage says what its config asked for and what it wrote: that subset is what counts
        v.missing += [f"probes: {part} missing" for part in req if part not in done]
    elif v.probes is not None and v.probes.get("galaxies") is not None and len(v.galaxies) == 0:
        v.missing.append("probes have no galaxies")
    return v


def load_run(path: str | Path) -> RunResult:
    """Read one run folder (``gravprobe run``, ``pretrain`` or ``probe``) into a ``RunResult``."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder")
    results = _read_json(path / "results.json")
    config = _read_config(path, results)
    stage = str(config.get("stage") or ("run" if (results or {}).get("pipeline") else "")) or "unknown"
    run = RunResult(dir=path, stage=stage, config=config, variants={})
    if results is None:
        run.missing.append("results.json missing (no stage finished in this folder)")
    if stage == "run" and "pipeline" not in (results or {}) and (
            (results or {}).get("pretrain") or (results or {}).get("probes") or _is_variant_dir(path)):
        stage = run.stage = "variant"  # one variant's folder inside a `gravprobe run` folder
    if stage == "run":
        run.pipeline = (results or {}).get("pipeline")
        names = list((run.pipeline or {}).get("variants") or _configured_variants(config))
        if not names:
            run.missing.append("no variants named (pipeline.variants / attention.name)")
        for name in names:
            run.variants[name] = _variant_of(path / name, name, ("pretrain", "probes"), need_checkpoint=True)
        asked = [(v.probes or {}).get("requested") for v in run.variants.values()]
        oracle_asked = not all(isinstance(a, list) for a in asked) or any("oracle" in a for a in asked)
        if names and oracle_asked and not run.oracle:
            run.missing.append("oracle missing (no variant's probes hold 'oracle')")
    elif stage in ("pretrain", "probe", "variant"):
        res = results or {}
        name = ((res.get("pretrain") or {}).get("attention") or (res.get("probes") or {}).get("attention")
                or (config.get("attention") or {}).get("name") or "model")
        run.variants[name] = _variant_of(path, name, STAGE_SECTIONS[stage], need_checkpoint=stage != "probe")
        if results is None:  # already said at run level
            run.variants[name].missing = [m for m in run.variants[name].missing if "results.json" not in m]
    else:
        run.missing.append(f"unknown stage {stage!r} (config.yaml has no 'stage')")
    return run


def _is_variant_dir(path: Path) -> bool:
    try:
        parent = json.loads((path.parent / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return path.name in ((parent.get("pipeline") or {}).get("variants") or [])


def _configured_variants(config: dict) -> list[str]:
    pv = (config.get("pipeline") or {}).get("variants")
    if pv:
        return [pv] if isinstance(pv, str) else list(pv)
    name = (config.get("attention") or {}).get("name")
    return [name] if name else []


def load_sweep(path: str | Path) -> SweepResult:
    """Read a sweep folder: every sub-folder that looks like a run folder, in Hydra's job order."""
    path = Path(path)
    sub = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def order(p: Path):
        head = p.name.split("_", 1)[0]
        return (0, int(head), p.name) if head.isdigit() else (1, 0, p.name)

    sweep = SweepResult(dir=path, runs=[])
    for p in sorted(sub, key=order):
        if is_run_dir(p):
            sweep.runs.append(load_run(p))
        elif p.name not in ("figures",):
            sweep.problems.append(f"{p.name}/ is not a run folder (no config.yaml or results.json)")
    if not sweep.runs:
        sweep.problems.append("no run folders (the sweep has not started any job)")
    return sweep


def load(path: str | Path) -> RunResult | SweepResult:
    """A run folder or a sweep folder, whichever ``path`` is."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ReportError(f"{path} does not exist or is not a folder; give a run folder (with results.json) "
                          "or a sweep folder (with multirun.yaml)")
    if is_run_dir(path):
        return load_run(path)
    if is_sweep_dir(path):
        return load_sweep(path)
    raise ReportError(f"{path} is neither a run folder (config.yaml / results.json) nor a sweep folder "
                      "(multirun.yaml or run sub-folders)")


# ------------------------------------------------------------------------------------------ tables
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, int):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3) else f"{x:.{digits}f}"
    return str(x)


def format_exponent(e: Any) -> str:
    """An exponent entry: ``[est, lo, hi]`` → ``-2.00 [-2.01, -1.99]``; ``[est, err]`` → ``-2.00 ± 0.01``."""
    if isinstance(e, dict):
        est = e.get("estimate", e.get("value"))
        lo, hi = e.get("lo", e.get("low")), e.get("hi", e.get("high"))
        e = [est, lo, hi] if lo is not None else [est]
    if isinstance(e, (list, tuple)):
        vals = [v for v in e if isinstance(v, (int, float))]
        if len(vals) >= 3:
            return f"{vals[0]:.2f} [{vals[1]:.2f}, {vals[2]:.2f}]"
        if len(vals) == 2:
            return f"{vals[0]:.2f} ± {vals[1]:.2f}"
        if len(vals) == 1:
            return f"{vals[0]:.2f}"
        return "—"
    if isinstance(e, (int, float)):
        return f"{e:.2f}"
    return "—" if e is None else str(e)


def equations_table(result: RunResult | SweepResult) -> list[dict]:
    """One row per (run, variant or ``oracle``, galaxy): the recovered law and its verdict.

    Keys: ``run`` (folder name), ``seed`` (the run's seed), ``model`` (variant or ``"oracle"``),
    ``galaxy`` (galaxy seed), ``expression``, ``newtonian`` (bool or None), ``r2_newton``,
    ``exp_r``, ``exp_m1``, ``exp_m2`` (formatted exponents with confidence intervals), ``reasons``.
    """
    runs = result.runs if isinstance(result, SweepResult) else [result]
    rows = []
    for run in runs:
        groups = [(name, v.galaxies) for name, v in run.variants.items()] + [("oracle", run.oracle),
                                                                              ("truth", run.truth)]
        for model, gals in groups:
            for i, g in enumerate(gals):
                ex = g.get("exponents") or {}
                rows.append({"run": run.dir.name, "seed": run.seed, "model": model,
                             "galaxy": g.get("seed", i), "expression": g.get("expression"),
                             "newtonian": g.get("newtonian"), "r2_newton": g.get("r2_newton"),
                             "exp_r": format_exponent(ex.get("r")), "exp_m1": format_exponent(ex.get("m1")),
                             "exp_m2": format_exponent(ex.get("m2")), "reasons": g.get("reasons", "")})
    return rows


def _mean_spread(xs: list[float]) -> dict:
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(float(x))]
    if not xs:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"n": len(xs), "mean": m, "std": sd, "min": min(xs), "max": max(xs)}


def _length_keys(dicts: Iterable[dict]) -> list[str]:
    keys = {k for d in dicts for k in (d or {})}
    return sorted(keys, key=lambda k: (float(k) if _isnum(k) else math.inf, k))


def _isnum(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


DECODABLE_MIN_R2 = 0.05  # probes.linear's default: a held-out R² below it is "not decodable" (issue 10)


def _decodable(r2: Any) -> Any:
    """A held-out R² as the report shows it: below ``DECODABLE_MIN_R2`` it reads "not decodable" (the number
    beside it), never as a large negative score."""
    if isinstance(r2, (int, float)) and math.isfinite(r2) and r2 < DECODABLE_MIN_R2:
        return f"not decodable ({_fmt(r2, 2)})"
    return r2


def arm_of(v: VariantResult) -> str:
    """The arm a variant's results belong to (``pretrain.arm``, written by training; else the name)."""
    return str((v.pretrain or {}).get("arm") or (v.probes or {}).get("arm") or v.name)


def dynamics_of(v: VariantResult) -> dict:
    """``results.json["pretrain"]["dynamics"]``: the model's next-position loss against kinematic baselines
    on the same validation targets (``gravprobe.pretrain.dynamics``); ``{}`` when not measured."""
    return dict((v.pretrain or {}).get("dynamics") or {})


def learned_dynamics(v: VariantResult) -> bool | None:
    """Whether the model beats the best kinematic baseline (``None``: not measured)."""
    d = dynamics_of(v)
    b = d.get("beats_best_baseline")
    return None if b is None else bool(b)


def aggregate(sweep: SweepResult | RunResult) -> dict[str, dict]:
    """Per variant across the runs (seeds) of a sweep: mean, std (sample, ddof=1), min, max, n of

    - ``loss/<modality>/last`` (final training-run validation loss, nats/token),
    - ``extrapolation/<modality>/<k>`` (validation loss at k× the training length),
    - ``newtonian_per_run`` (galaxies judged Newtonian out of each run's galaxies),
    and the totals ``newtonian`` / ``galaxies`` (counts over all galaxies × seeds), ``runs``, ``seeds``.
    The key ``"oracle"`` holds the oracle's totals the same way.
    """
    runs = sweep.runs if isinstance(sweep, SweepResult) else [sweep]
    by_variant: dict[str, list[tuple[RunResult, VariantResult]]] = {}
    for run in runs:
        for name, v in run.variants.items():
            by_variant.setdefault(arm_of(v), []).append((run, v))
    out: dict[str, dict] = {}
    for name, pairs in by_variant.items():
        agg: dict[str, Any] = {"runs": len(pairs), "seeds": [r.seed for r, _ in pairs],
                               "complete_runs": sum(v.complete for _, v in pairs)}
        for mod in MODALITIES:
            agg[f"loss/{mod}/last"] = _mean_spread(
                [(((v.pretrain or {}).get("loss") or {}).get(mod) or {}).get("last") for _, v in pairs])
            ext = [(((v.pretrain or {}).get("length_extrapolation") or {}).get(mod) or {}) for _, v in pairs]
            for k in _length_keys(ext):
                agg[f"extrapolation/{mod}/{k}"] = _mean_spread([e.get(k) for e in ext])
        counts = [(sum(bool(g.get("newtonian")) for g in v.galaxies), len(v.galaxies)) for _, v in pairs
                  if v.galaxies]
        agg["newtonian"] = sum(c for c, _ in counts)
        agg["galaxies"] = sum(n for _, n in counts)
        agg["newtonian_per_run"] = _mean_spread([c for c, _ in counts])
        learned = [learned_dynamics(v) for _, v in pairs]
        agg["learned_dynamics"] = sum(bool(x) for x in learned)
        agg["dynamics_measured"] = sum(x is not None for x in learned)
        for key in ("loss", "next_position_error_au", "next_position_r2"):
            agg[f"dynamics/model/{key}"] = _mean_spread([(dynamics_of(v).get("model") or {}).get(key)
                                                         for _, v in pairs])
        base = [dynamics_of(v).get("baselines") or {} for _, v in pairs]
        for b in sorted({k for d in base for k in d}):
            agg[f"dynamics/{b}/loss"] = _mean_spread([(d.get(b) or {}).get("loss") for d in base])
        informative = [(sum(bool(g.get("newtonian")) for g in v.galaxies), len(v.galaxies)) for _, v in pairs
                       if v.galaxies and learned_dynamics(v)]
        ro = [(v.probes or {}).get("readouts") or {} for _, v in pairs]
        for score in ("newton", "kepler"):
            agg[f"readouts/{score}"] = _mean_spread([(r.get(score) or {}).get("score") for r in ro])
            agg[f"readouts/{score}/untrained"] = _mean_spread(
                [((r.get("untrained") or {}).get(score) or {}).get("score") for r in ro])
        for t in ("F_mag", "log_F_mag", "log_m1", "log_m2", "a"):
            agg[f"readouts/{t}"] = _mean_spread([((r.get("best") or {}).get(t) or {}).get("r2") for r in ro])
            agg[f"readouts/{t}/untrained"] = _mean_spread(
                [((r.get("best") or {}).get(t) or {}).get("untrained_r2") for r in ro])
        agg["counts"] = sum(bool((v.probes or {}).get("counts")) for _, v in pairs)
        agg["newtonian_informative"] = sum(c for c, _ in informative)
        agg["galaxies_informative"] = sum(n for _, n in informative)
        out[name] = agg
    for control in ("oracle", "truth", "oracle_without_m1", "memoriser"):
        gals = [run.control(control).get("galaxies") or [] for run in runs]
        gals = [g for g in gals if g]
        if control != "oracle" and not gals:
            continue
        out[control] = {"runs": len(gals), "newtonian": sum(bool(g.get("newtonian")) for o in gals for g in o),
                        "galaxies": sum(len(o) for o in gals),
                        "newtonian_per_run": _mean_spread([sum(bool(g.get("newtonian")) for g in o) for o in gals])}
    return out


# ----------------------------------------------------------------------------------- force predictions
FORCE_PREDICTION_FILES = ("force_predictions.csv", "predictions.csv")


def force_predictions(variant_dir: str | Path) -> dict[str, list[float]] | None:
    """Predicted vs true force magnitudes written by the probes stage, as columns, or ``None``.

    Reads the first of ``FORCE_PREDICTION_FILES`` found in ``variant_dir`` (or ``variant_dir/probes``);
    returns a dict of float columns including ``true`` and ``predicted`` (units Msun AU/yr²).
    """
    import csv

    variant_dir = Path(variant_dir)
    for base in (variant_dir, variant_dir / "probes"):
        for name in FORCE_PREDICTION_FILES:
            p = base / name
            if p.exists():
                with p.open() as f:
                    rows = list(csv.DictReader(f))
                if not rows:
                    return None
                cols: dict[str, list[float]] = {}
                for key in rows[0]:
                    try:
                        cols[key] = [float(r[key]) for r in rows]
                    except (TypeError, ValueError):
                        continue
                true = next((k for k in cols if k.lower() in ("true", "y_true", "target", "force_true")), None)
                pred = next((k for k in cols if k.lower() in ("predicted", "pred", "y_pred", "force_pred")), None)
                if true is None or pred is None:
                    return None
                cols["true"], cols["predicted"] = cols[true], cols[pred]
                return cols
    return None


def force_prediction_figure(variant: VariantResult) -> Path | None:
    """The probe stage's own predicted-vs-true force figure (``force_pred_vs_true.png``), if it made one."""
    p = variant.dir / "force_pred_vs_true.png"
    return p if p.exists() else None


# ------------------------------------------------------------------------------------------- plots
# ``fig_*`` build a matplotlib Figure (object API: no pyplot state, no GUI backend) or return None when
# there is nothing to draw; ``save_figure`` writes one; ``figure_png`` gives its bytes (for notebooks).
def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def save_figure(fig, out: Path) -> Path | None:
    if fig is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def figure_png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def fig_length_extrapolation(series: dict[str, dict], *, errors: dict[str, dict] | None = None, title: str = ""):
    """Validation loss against sequence length (multiples of the training length), one line per variant.

    ``series[variant] = {"orbits": {"1": loss, ...}, "text": {...}}``; ``errors`` the same shape with
    standard deviations (drawn as error bars).
    """
    mods = [m for m in MODALITIES if any((s or {}).get(m) for s in series.values())]
    if not mods:
        return None
    fig, axes = _figure(len(mods))
    for ax, mod in zip(axes, mods):
        for name, s in series.items():
            d = (s or {}).get(mod) or {}
            ks = [k for k in _length_keys([d]) if _isnum(k) and isinstance(d.get(k), (int, float))]
            if not ks:
                continue
            err = None
            if errors:
                e = (errors.get(name) or {}).get(mod) or {}
                err = [e.get(k) or 0.0 for k in ks]
            ax.errorbar([float(k) for k in ks], [d[k] for k in ks], yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("length / training length")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(mod)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_length_extrapolation(series: dict[str, dict], out: Path, *, errors: dict[str, dict] | None = None,
                              title: str = "") -> Path | None:
    return save_figure(fig_length_extrapolation(series, errors=errors, title=title), out)


def fig_probe_r2(variants: dict[str, dict]):
    """Linear-probe R² against layer, one panel per variant, one line per target."""
    have = {n: lin for n, lin in variants.items() if lin}
    if not have:
        return None
    fig, axes = _figure(len(have), width=4.2)
    for ax, (name, lin) in zip(axes, have.items()):
        for j, (target, per_layer) in enumerate(lin.items()):
            if not isinstance(per_layer, dict):
                continue
            ks = [k for k in _length_keys([per_layer]) if isinstance(per_layer.get(k), (int, float))]
            ax.plot([float(k) if _isnum(k) else i for i, k in enumerate(ks)], [per_layer[k] for k in ks],
                    marker=".", ls=("-", "--", ":")[(j // 10) % 3], label=target)  # 10 colours, then dashes
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("held-out R²")
        ax.set_ylim(max(-1.0, min(-0.05, ax.get_ylim()[0])), 1.02)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return fig


def plot_probe_r2(variants: dict[str, dict], out: Path) -> Path | None:
    return save_figure(fig_probe_r2(variants), out)


def fig_force_predictions(predictions: dict[str, dict]):
    """Predicted against true force magnitude (log-log), one panel per model, with the y = x line.

    ``predictions[model] = {"true": [...], "predicted": [...]}`` (M☉ AU yr⁻², e.g. from
    ``force_predictions``); non-positive values cannot be shown on log axes and are counted in the title.
    """
    have = {n: p for n, p in predictions.items() if p and p.get("true")}
    if not have:
        return None
    fig, axes = _figure(len(have), width=3.8, height=3.6)
    for ax, (name, p) in zip(axes, have.items()):
        pairs = [(t, q) for t, q in zip(p["true"], p["predicted"]) if t > 0 and q > 0]
        dropped = len(p["true"]) - len(pairs)
        if pairs:
            t, q = zip(*pairs)
            ax.scatter(t, q, s=4, alpha=0.5)
            lo, hi = min(min(t), min(q)), max(max(t), max(q))
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_xlabel("true |F| (M☉ AU/yr²)")
        ax.set_ylabel("predicted |F|")
        ax.set_title(name + (f" ({dropped} ≤ 0 not shown)" if dropped else ""), fontsize=9)
        ax.grid(alpha=0.3)
    return fig


def fig_newtonian_counts(agg: dict[str, dict]):
    """Galaxies judged Newtonian out of all galaxies × seeds, per model (from ``aggregate``)."""
    names = [n for n in agg if agg[n].get("galaxies")]
    if not names:
        return None
    fig, axes = _figure(1, width=max(4.0, 1.2 * len(names) + 2))
    ax = axes[0]
    got = [agg[n]["newtonian"] for n in names]
    tot = [agg[n]["galaxies"] for n in names]
    ax.bar(names, tot, color="0.85", label="galaxies")
    ax.bar(names, got, color="tab:green", label="newtonian")
    for i, (g, t) in enumerate(zip(got, tot)):
        ax.text(i, g, f"{g}/{t}", ha="center", va="bottom")
    ax.set_ylabel("galaxies × seeds")
    ax.legend(fontsize=8)
    return fig


def plot_newtonian_counts(agg: dict[str, dict], out: Path) -> Path | None:
    return save_figure(fig_newtonian_counts(agg), out)


def loss_series(result: RunResult | SweepResult) -> tuple[dict[str, dict], dict[str, dict] | None]:
    """``(series, errors)`` for ``fig_length_extrapolation``: a run's own values per variant, or a
    sweep's mean and sd across seeds per variant (``errors`` is None for a run)."""
    if isinstance(result, RunResult):
        return {n: (v.pretrain or {}).get("length_extrapolation") or {} for n, v in result.variants.items()}, None
    agg = aggregate(result)
    series: dict[str, dict] = {}
    errors: dict[str, dict] = {}
    for n, a in agg.items():
        if n in ("oracle", "truth"):
            continue
        for key, st in a.items():
            if key.startswith("extrapolation/") and isinstance(st, dict) and st.get("mean") is not None:
                _, mod, k = key.split("/")
                series.setdefault(n, {}).setdefault(mod, {})[k] = st["mean"]
                errors.setdefault(n, {}).setdefault(mod, {})[k] = st["std"]
    return series, errors


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A list of dicts (e.g. ``equations_table``) as a Markdown table of ``columns`` (default: all keys)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def val(r: dict, c: str) -> Any:  # expressions as code, so that `*` is not read as emphasis
        v = r.get(c)
        return f"`{v}`" if c == "expression" and v is not None else v

    return "\n".join(_md_table(columns, [[val(r, c) for c in columns] for r in rows]))


def latest(home: str | Path | None = None) -> Path:
    """The most recently modified run or sweep folder under ``home`` (default ``output_root()``) that holds
    results (a ``results.json``) or is a sweep; folders of runs that failed before any stage are skipped."""
    from gravprobe.common import output_root

    home = Path(home) if home else output_root()
    cands = [p for sub in ("runs", "sweeps") for p in (home / sub).glob("*/*")
             if (p / "results.json").exists() or (p / "multirun.yaml").exists()]  # not failed starts
    if not cands:
        raise ReportError(f"no run or sweep folders under {home}/runs or {home}/sweeps; run `gravprobe run "
                          "experiment=smoke` first or give a folder")
    return max(cands, key=lambda p: p.stat().st_mtime)


# ---------------------------------------------------------------------------------------- markdown
def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return _fmt(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return lines


def _rel(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return p.as_posix()


def _galaxy_rows(gals: list[dict]) -> list[list[Any]]:
    rows = []
    for i, g in enumerate(gals):
        ex = g.get("exponents") or {}
        rows.append([g.get("seed", i), f"`{g.get('expression')}`", g.get("newtonian"), g.get("r2_newton"),
                     format_exponent(ex.get("r")), format_exponent(ex.get("m1")), format_exponent(ex.get("m2")),
                     g.get("reasons", "")])
    return rows


GALAXY_HEADER = ["galaxy", "recovered law", "newtonian", "R² (best Newtonian fit)", "exp r", "exp m1", "exp m2",
                 "reasons"]


def _status(run: RunResult) -> list[str]:
    if run.complete:
        return ["Status: **complete**.", ""]
    return ["Status: **incomplete** — " + "; ".join(run.problems) + ".", ""]


def _run_sections(run: RunResult, base: Path, fig_dir: Path, heading: str = "##") -> list[str]:
    md: list[str] = []
    # losses
    rows = []
    for name, v in run.variants.items():
        loss = (v.pretrain or {}).get("loss") or {}
        rows.append([name, (v.pretrain or {}).get("steps"),
                     *[((loss.get(m) or {}).get(k)) for m in MODALITIES for k in ("first", "last")]])
    if any(v.pretrain for v in run.variants.values()):
        md += [f"{heading} Pretraining", ""]
        md += _md_table(["variant", "steps", "orbits first", "orbits last", "text first", "text last"], rows)
        md.append("")
        ext = {n: (v.pretrain or {}).get("length_extrapolation") or {} for n, v in run.variants.items()}
        for mod in MODALITIES:
            keys = _length_keys([e.get(mod) for e in ext.values()])
            if keys:
                md += [f"Validation loss ({mod}, nats/token) at k× the training length:", ""]
                md += _md_table(["variant", *[f"{k}×" for k in keys]],
                                [[n, *[(e.get(mod) or {}).get(k) for k in keys]] for n, e in ext.items()])
                md.append("")
        png = plot_length_extrapolation(ext, fig_dir / "loss_vs_length.png")
        if png:
            md += [f"![validation loss against length]({_rel(png, base)})", ""]
    md += _dynamics_section(run, base, fig_dir, heading)
    # probes
    lin = {n: (v.probes or {}).get("linear") or {} for n, v in run.variants.items()}
    md += _uninformative_warning(run)
    if any(lin.values()):
        md += [f"{heading} Linear probes (held-out R² per layer)", ""]
        for name, table in lin.items():
            if not table:
                continue
            layers = _length_keys([d for d in table.values() if isinstance(d, dict)])
            md += [f"**{name}**", ""]
            md += _md_table(["target", *[f"L{k}" for k in layers]],
                            [[t, *[_decodable((d or {}).get(k)) for k in layers]] for t, d in table.items()
                             if isinstance(d, dict)])
            md.append("")
        png = plot_probe_r2(lin, fig_dir / "probe_r2.png")
        if png:
            md += [f"![probe R² per layer]({_rel(png, base)})", ""]
    if any(v.galaxies for v in run.variants.values()) or run.oracle:
        md += [f"{heading} Recovered force laws (symbolic regression, METHOD §4.3–4.5)", ""]
        md += _uninformative_warning(run)
        for name, v in [*run.variants.items()]:
            if not v.galaxies:
                continue
            n_ok = sum(bool(g.get("newtonian")) for g in v.galaxies)
            md += [f"**{name}** — newtonian in {n_ok} of {len(v.galaxies)} galaxies", ""]
            md += _md_table(GALAXY_HEADER, _galaxy_rows(v.galaxies))
            md.append("")
        if run.oracle:
            n_ok = sum(bool(g.get("newtonian")) for g in run.oracle)
            md += [f"**oracle** (2-NN on the true state) — newtonian in {n_ok} of {len(run.oracle)} galaxies", ""]
            md += _md_table(GALAXY_HEADER, _galaxy_rows(run.oracle))
            md.append("")
        if run.truth:
            n_ok = sum(bool(g.get("newtonian")) for g in run.truth)
            md += [(f"**truth** (true |F| with noise, the regression's own control) — newtonian in {n_ok} of "
                    f"{len(run.truth)} galaxies"), ""]
            md += _md_table(GALAXY_HEADER, _galaxy_rows(run.truth))
            md.append("")
    md += _controls_section(run)
    md += _readouts_section(run, base, fig_dir, heading)
    preds = {n: force_predictions(v.dir) for n, v in run.variants.items() if v.dir.is_dir()}
    png = save_figure(fig_force_predictions({n: p for n, p in preds.items() if p}),
                      fig_dir / "force_pred_vs_true.png")
    if png:
        md += ["Fine-tuned force head on held-out steps, predicted against true |F|:", "",
               f"![predicted vs true force]({_rel(png, base)})", ""]
    else:  # no prediction table saved: show the probe stage's own figure of each variant
        stage_pngs = {n: force_prediction_figure(v) for n, v in run.variants.items()}
        if any(stage_pngs.values()):
            md += ["Predicted against true |F| on the held-out steps (the probe stage's figures):", ""]
            md += [f"![{n}: predicted vs true force]({_rel(p, base)})" for n, p in stage_pngs.items() if p]
            md.append("")
    # figures the stages made
    figs = []
    for v in run.variants.values():
        if v.dir.is_dir():
            figs += [p for p in sorted(v.dir.rglob("*.png")) if fig_dir not in p.parents]
    if figs:
        md += [f"{heading} Figures from the stages", ""]
        md += [f"- [{_rel(p, base)}]({_rel(p, base)})" for p in figs]
        md.append("")
    return md


BASELINES = ("copy_previous", "constant_velocity", "constant_acceleration")
CONTROLS = (("oracle", "2-NN oracle on the true state"), ("oracle_without_m1", "2-NN oracle without m1"),
            ("truth", "true |F| with noise"), ("memoriser", "label memoriser (its own sequence's labels)"))


def _newton_count(gals: list[dict]) -> str:
    return f"{sum(bool(g.get('newtonian')) for g in gals)}/{len(gals)}" if gals else "—"


def _controls_section(run: RunResult) -> list[str]:
    """The model beside the controls that separate a world model from memorisation (METHOD §4.6)."""
    rows = []
    for n, v in run.variants.items():
        pr = v.probes or {}
        if not pr.get("galaxies") and "counts" not in pr:
            continue
        rows.append([f"model: {arm_of(v)}", _newton_count(v.galaxies),
                     f"counts: {'yes' if pr.get('counts') else 'no'} — {pr.get('counts_reason', '')}"])
    for key, title in CONTROLS:
        sec = run.control(key)
        if sec:
            rows.append([title, _newton_count(sec.get("galaxies") or []), sec.get("note") or
                         ("cached" if sec.get("cached") else "")])
    if not rows:
        return []
    protocol = next((str((v.probes or {}).get("protocol")) for v in run.variants.values()
                     if (v.probes or {}).get("protocol")), None)
    md = [f"**Model against the controls** (protocol `{protocol}`; Newtonian galaxies):" if protocol else
          "**Model against the controls** (Newtonian galaxies):", ""]
    md += _md_table(["source", "newtonian", "note"], rows)
    sel = next(((v.probes or {}).get("selection") or {} for v in run.variants.values()
                if (v.probes or {}).get("selection")), {})
    if sel.get("same_sequence_fraction") is not None:
        md += ["", f"Selected states whose nearest training state lies in their own sequence: "
                   f"{100 * float(sel['same_sequence_fraction']):.1f} %."]
    md.append("")
    return md


READOUT_TARGETS = ("F_x", "F_y", "F_mag", "log_F_mag", "a", "e", "lrl_x", "lrl_y", "log_m1", "log_m2")


def _readouts_section(run: RunResult, base: Path, fig_dir: Path, heading: str) -> list[str]:
    """Liu et al.'s last-position readouts: Newton and Kepler scores and per-target best R², each beside
    the same probe on the untrained network."""
    ro = {n: (v.probes or {}).get("readouts") or {} for n, v in run.variants.items()}
    if not any(ro.values()):
        return []
    md = [f"{heading} Last-position readouts (Liu et al.; held-out sequences, trained vs untrained network)", ""]
    rows = []
    for n, r in ro.items():
        if not r:
            continue
        ut = r.get("untrained") or {}
        for score in ("newton", "kepler"):
            sc = r.get(score) or {}
            rows.append([n, f"{score.capitalize()} score", sc.get("score"), sc.get("site"),
                         (ut.get(score) or {}).get("score"), sc.get("beats_untrained")])
        for t in READOUT_TARGETS:
            b = (r.get("best") or {}).get(t)
            if b:
                rows.append([n, t, b.get("r2"), b.get("site"), b.get("untrained_r2"), b.get("beats_untrained")])
    md += _md_table(["variant", "readout", "R² (trained)", "best site", "R² (untrained)", "beats untrained"], rows)
    md.append("")
    for n, r in ro.items():
        am = r.get("attention_mass") or {}
        layers = am.get("layers") or {}
        if not layers:
            continue
        ws = [str(w) for w in am.get("windows") or []]
        uam = ((r.get("untrained") or {}).get("attention_mass") or {}).get("layers") or {}
        md += [f"Attention mass on the last W keys, **{n}** (mean over queries; uniform row for comparison):", ""]
        md += _md_table(["layer", *[f"W={w}" for w in ws], *[f"untrained W={w}" for w in ws]],
                        [[f"block {i}", *[(layers[i].get("mean") or {}).get(w) for w in ws],
                          *[((uam.get(i) or {}).get("mean") or {}).get(w) for w in ws]] for i in layers]
                        + [["uniform", *[(am.get("uniform") or {}).get(w) for w in ws], *["" for _ in ws]]])
        md.append("")
    return md


def _uninformative_warning(run: RunResult) -> list[str]:
    bad = [n for n, v in run.variants.items() if learned_dynamics(v) is False and (v.probes or {})]
    if not bad:
        return []
    return [f"**Uninformative for {', '.join(bad)}:** the model does not beat the best kinematic baseline "
            "(see \"Did the model learn the dynamics?\"), so what its probes and equations show says nothing "
            "about a learned world model. They are shown for completeness.", ""]


def fig_dynamics(dyn: dict[str, dict]):
    """Model loss against the kinematic baselines, one group of bars per variant (same targets, same unit)."""
    dyn = {n: d for n, d in dyn.items() if d.get("model")}
    if not dyn:
        return None
    fig, (ax,) = _figure(1, width=max(5.0, 1.6 * len(dyn) + 2), height=3.8)
    names = ["model", *BASELINES]
    width = 0.8 / len(names)
    for j, key in enumerate(names):
        vals = [((d.get("model") if key == "model" else (d.get("baselines") or {}).get(key)) or {}).get("loss")
                for d in dyn.values()]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(dyn))]
        ax.bar(xs, [v if isinstance(v, (int, float)) else float("nan") for v in vals], width,
               label=key.replace("_", " "), color=f"C{j}", hatch=["", "//", "..", "xx"][j % 4])
    ax.set_xticks(range(len(dyn)), list(dyn), rotation=20, ha="right")
    unit = next(iter(dyn.values())).get("unit", "")
    ax.set_ylabel(f"next-position loss ({unit})")
    if "MSE" in unit or "AU" in unit:
        ax.set_yscale("log")
    ax.set_title("model vs kinematic baselines (validation systems; lower is better)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig


def _dynamics_section(run: RunResult, base: Path, fig_dir: Path, heading: str) -> list[str]:
    dyn = {n: dynamics_of(v) for n, v in run.variants.items()}
    if not any(dyn.values()):
        return []
    unit = next((d.get("unit") for d in dyn.values() if d.get("unit")), "")
    md = [f"{heading} Did the model learn the dynamics?", "",
          f"Next-position loss ({unit}) on the same validation targets for the model and for kinematic "
          "baselines (the same body's previous positions; residual distributions fitted on the training "
          "systems). A probe or an equation means something only for a model that beats the best baseline.", ""]
    rows = []
    for n, d in dyn.items():
        if not d:
            continue
        m, b = d.get("model") or {}, d.get("baselines") or {}
        best = d.get("best_baseline")
        roll = m.get("rollout_error_au") or {}
        kmax = max(roll, key=lambda k: float(k)) if roll else None
        broll = ((b.get(best) or {}).get("rollout_error_au") or {}) if best else {}
        rows.append([n, m.get("loss"), *[(b.get(k) or {}).get("loss") for k in BASELINES],
                     m.get("next_position_error_au"), (b.get(best) or {}).get("next_position_error_au") if best else None,
                     m.get("next_position_r2"),
                     f"{_fmt(roll.get(kmax))} vs {_fmt(broll.get(kmax))} ({kmax} steps)" if kmax else None,
                     {True: "**yes**", False: "**no**"}.get(d.get("beats_best_baseline"), "—")])
    md += _md_table(["variant", "model", "copy previous", "const. velocity", "const. acceleration",
                     "next-pos. error (AU)", "best baseline's error (AU)", "next-pos. R²",
                     "roll-out error (AU), model vs best baseline", "beats best baseline"], rows)
    md.append("")
    md += [f"- {n}: {d['verdict']}" for n, d in dyn.items() if d.get("verdict")]
    md.append("")
    png = save_figure(fig_dynamics(dyn), fig_dir / "dynamics_vs_baselines.png")
    if png:
        md += [f"![model vs kinematic baselines]({_rel(png, base)})", ""]
    return md


def _config_block(config: dict) -> list[str]:
    if not config:
        return ["(no config found)", ""]
    from omegaconf import OmegaConf

    try:
        text = OmegaConf.to_yaml(OmegaConf.create(config))
    except Exception:  # noqa: BLE001 - a config with odd content is still shown
        text = json.dumps(config, indent=2, default=str)
    return ["<details><summary>resolved config</summary>", "", "```yaml", text.rstrip(), "```", "", "</details>", ""]


def render_run(run: RunResult) -> str:
    base = run.dir
    md = [f"# gravprobe report: {run.dir.name}", "",
          f"Stage `{run.stage}`, seed {run.seed}, variants: {', '.join(run.variants) or '—'}.", ""]
    if run.pipeline and run.pipeline.get("timings_s"):
        t = run.pipeline["timings_s"]
        md += ["Stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()
                                                 if isinstance(v, (int, float))) + ".", ""]
    md += _status(run)
    md += _summary(run)
    md += _run_sections(run, base, base / "figures")
    md += ["## Config", ""] + _config_block(run.config)
    return "\n".join(md) + "\n"


def summary_table(run: RunResult) -> list[dict]:
    """One row per variant (and the controls): the numbers a reader looks at first.

    ``orbits@1x``/``orbits@16x``/``text@1x``/``text@16x``: validation loss (nats/token) at 1× and at the
    longest measured multiple of the training length; ``newtonian``: "k/n" galaxies; ``best R² log|F|``: the
    best layer's linear-probe R² for the log force magnitude (target ``log_F_mag``; |F| spans five decades,
    so a raw-|F| R² is decided by a few of the largest forces; falls back to ``F_mag`` when absent).
    """
    rows = []
    for name, v in run.variants.items():
        ext = (v.pretrain or {}).get("length_extrapolation") or {}
        row: dict[str, Any] = {"model": name}
        for mod in MODALITIES:
            d = ext.get(mod) or {}
            keys = [k for k in _length_keys([d]) if _isnum(k)]
            row[f"{mod}@1x"] = d.get("1")
            row[f"{mod}@max"] = d.get(keys[-1]) if keys else None
            row[f"{mod} max x"] = keys[-1] if keys else None
        linear = (v.probes or {}).get("linear") or {}
        lin = linear.get("log_F_mag") or linear.get("F_mag") or {}
        best = max((x for x in lin.values() if isinstance(x, (int, float))), default=None)
        row["best R² log|F|"] = _decodable(best)
        row["newtonian"] = f"{sum(bool(g.get('newtonian')) for g in v.galaxies)}/{len(v.galaxies)}" if v.galaxies \
            else None
        row["learned dynamics"] = {True: "yes", False: "no (probes uninformative)"}.get(learned_dynamics(v))
        rows.append(row)
    for control, gals in (("oracle", run.oracle), ("truth", run.truth)):
        if gals:
            rows.append({"model": control, "newtonian": f"{sum(bool(g.get('newtonian')) for g in gals)}/{len(gals)}"})
    return rows


def _summary(run: RunResult) -> list[str]:
    rows = summary_table(run)
    if not rows:
        return []
    maxx = next((r.get("orbits max x") or r.get("text max x") for r in rows if r.get("orbits max x")
                 or r.get("text max x")), None)
    cols = ["model", "learned dynamics", "orbits@1x", "orbits@max", "text@1x", "text@max", "best R² log|F|",
            "newtonian"]
    header = ["model", "beats kinematic baselines", "orbits loss 1×",
              f"orbits loss {maxx}×" if maxx else "orbits loss max",
              "text loss 1×", f"text loss {maxx}×" if maxx else "text loss max",
              "best linear-probe R² of log\\|F\\|", "Newton recovered (galaxies)"]
    return ["## Summary", "", *_md_table(header, [[r.get(c) for c in cols] for r in rows]), ""]


def sweep_overrides(runs: list[RunResult]) -> tuple[list[str], list[str]]:
    """``(swept keys, common overrides)`` from the jobs' ``.hydra/overrides.yaml``: keys whose value
    differs between jobs, and ``key=value`` overrides every job shares."""
    values: dict[str, set[str]] = {}
    n = 0
    for r in runs:
        ov = r.dir / ".hydra" / "overrides.yaml"
        if not ov.exists():
            continue
        try:
            from omegaconf import OmegaConf

            items = [str(o) for o in OmegaConf.load(ov)]
        except Exception as e:  # noqa: BLE001 - an unreadable file only loses this description
            log.debug("cannot read %s: %s", ov, e)
            continue
        n += 1
        for o in items:
            k, _, v = o.partition("=")
            values.setdefault(k, set()).add(v)
    swept = sorted(k for k, v in values.items() if len(v) > 1 and k != "stage")
    common = sorted(f"{k}={next(iter(v))}" for k, v in values.items() if len(v) == 1 and k != "stage")
    return swept, common


def render_sweep(sweep: SweepResult) -> str:
    base = sweep.dir
    agg = aggregate(sweep)
    controls = [c for c in ("oracle", "truth", "oracle_without_m1", "memoriser") if c in agg]
    variants = [n for n in agg if n not in controls]
    swept, common = sweep_overrides(sweep.runs)
    md = [f"# gravprobe sweep report: {sweep.dir.name}", "",
          (f"{len(sweep.runs)} runs; variants: {', '.join(variants) or '—'}; swept: {', '.join(swept) or '—'}; "
           f"common overrides: {' '.join(f'`{c}`' for c in common) or '—'}."), ""]
    incomplete = [r for r in sweep.runs if not r.complete]
    if sweep.complete:
        md += ["Status: **complete** (every run finished every stage).", ""]
    else:
        md += ["Status: **incomplete**:", ""]
        md += [f"- {p}" for p in sweep.problems]
        md += [f"- `{r.dir.name}`: " + "; ".join(r.problems) for r in incomplete]
        md.append("")
    if any(agg[n].get("dynamics_measured") for n in variants):
        md += ["## Did the models learn the dynamics? (mean ± sd over seeds)", "",
               "Next-position loss on the same validation targets as the kinematic baselines (lower is better); "
               "a run counts as having learned the dynamics when it beats the best baseline. Probes and equations "
               "of runs that do not are uninformative.", ""]
        bases = [b for b in BASELINES if any(agg[n].get(f"dynamics/{b}/loss") for n in variants)]
        md += _md_table(["arm", "runs that beat the best baseline", "model loss",
                         *[b.replace("_", " ") for b in bases], "next-pos. error (AU)", "next-pos. R²"],
                        [[n, f"{agg[n]['learned_dynamics']}/{agg[n]['dynamics_measured']}",
                          _pm(agg[n].get("dynamics/model/loss")),
                          *[_pm(agg[n].get(f"dynamics/{b}/loss")) for b in bases],
                          _pm(agg[n].get("dynamics/model/next_position_error_au")),
                          _pm(agg[n].get("dynamics/model/next_position_r2"))] for n in variants])
        md.append("")
    md += ["## Newton's law recovered (galaxies × seeds)", ""]
    md += _md_table(["model", "newtonian", "galaxies", "per run (mean ± sd)", "runs",
                     "newtonian in runs that learned the dynamics", "runs whose result counts (beats the memoriser)"],
                    [[n, agg[n]["newtonian"], agg[n]["galaxies"], _pm(agg[n]["newtonian_per_run"]), agg[n]["runs"],
                      (f"{agg[n]['newtonian_informative']}/{agg[n]['galaxies_informative']}"
                       if n in variants and agg[n].get("dynamics_measured") else "—"),
                      f"{agg[n]['counts']}/{agg[n]['runs']}" if n in variants else "—"]
                     for n in [*variants, *controls]])
    md.append("")
    png = plot_newtonian_counts(agg, base / "figures" / "newtonian_counts.png")
    if png:
        md += [f"![newtonian counts]({_rel(png, base)})", ""]
    if any(agg[n].get("readouts/newton", {}).get("n") for n in variants):
        md += ["## Last-position readouts (Liu et al.; held-out sequences; mean ± sd over seeds)", "",
               "Newton score = mean R² of F_x, F_y, |F| at the best hook site; Kepler score = mean R² of a, e and "
               "the Laplace–Runge–Lenz vector; each beside the same probe on the untrained network.", ""]
        cols = [("readouts/newton", "Newton score"), ("readouts/newton/untrained", "untrained"),
                ("readouts/kepler", "Kepler score"), ("readouts/kepler/untrained", "untrained"),
                ("readouts/log_F_mag", "log\\|F\\| R²"), ("readouts/log_m1", "log m1 R²"),
                ("readouts/log_m1/untrained", "untrained"), ("readouts/log_m2", "log m2 R²")]
        md += _md_table(["arm", *[c[1] for c in cols]], [[n, *[_pm(agg[n].get(k)) for k, _ in cols]] for n in variants])
        md.append("")
    md += _literature_section(sweep, agg, variants)
    md += ["## Losses across seeds (mean ± sd, n)", ""]
    md += _md_table(["variant", *[f"{m} last" for m in MODALITIES]],
                    [[n, *[_pm(agg[n][f"loss/{m}/last"]) for m in MODALITIES]] for n in variants])
    md.append("")
    for mod in MODALITIES:
        keys = sorted({k.split("/")[2] for n in variants for k in agg[n] if k.startswith(f"extrapolation/{mod}/")},
                      key=lambda k: (float(k) if _isnum(k) else math.inf, k))
        if not keys:
            continue
        md += [f"Length extrapolation, {mod} (validation loss at k× training length, mean ± sd):", ""]
        md += _md_table(["variant", *[f"{k}×" for k in keys]],
                        [[n, *[_pm(agg[n].get(f"extrapolation/{mod}/{k}")) for k in keys]] for n in variants])
        md.append("")
    series, errors = loss_series(sweep)
    png = plot_length_extrapolation(series, base / "figures" / "loss_vs_length.png", errors=errors,
                                    title="mean ± sd across seeds")
    if png:
        md += [f"![loss against length]({_rel(png, base)})", ""]
    md += ["## Runs", ""]
    rows = []
    for r in sweep.runs:
        for n, v in r.variants.items():
            k = sum(bool(g.get("newtonian")) for g in v.galaxies)
            rows.append([f"[{r.dir.name}]({_rel(r.dir, base)}/report.md)", r.seed, arm_of(v),
                         (((v.pretrain or {}).get("loss") or {}).get("orbits") or {}).get("last"),
                         {True: "yes", False: "no"}.get(learned_dynamics(v), "—"),
                         f"{k}/{len(v.galaxies)}" if v.galaxies else "—", "yes" if v.complete else "no"])
    md += _md_table(["run", "seed", "arm", "orbits loss", "learned dynamics", "newtonian", "complete"], rows)
    md.append("")
    md += ["## Equations (every galaxy of every run)", ""]
    md += _md_table(["run", "seed", "model", "galaxy", "recovered law", "newtonian", "R² Newton"],
                    [[e["run"], e["seed"], e["model"], e["galaxy"], f"`{e['expression']}`", e["newtonian"],
                      e["r2_newton"]] for e in equations_table(sweep)])
    md.append("")
    return "\n".join(md) + "\n"


def _literature_section(sweep: SweepResult, agg: dict, variants: list[str]) -> list[str]:
    """Published numbers (``report.literature`` of the runs' config: ``{arm: {target: R²}}``) beside ours
    (the readouts' best-site held-out R², mean ± sd over seeds, and the untrained network's)."""
    lit: dict = {}
    for r in sweep.runs:
        lit.update(((r.config or {}).get("report") or {}).get("literature") or {})
    if not lit:
        return []
    rows = []
    for arm, vals in lit.items():
        for target, theirs in (vals or {}).items():
            mine = agg.get(arm, {})
            ours = _mean_spread([(((v.probes or {}).get("readouts") or {}).get("best") or {}).get(target, {}).get("r2")
                                 for r in sweep.runs for v in r.variants.values() if arm_of(v) == arm])
            unt = _mean_spread([(((v.probes or {}).get("readouts") or {}).get("best") or {}).get(target, {})
                                .get("untrained_r2") for r in sweep.runs for v in r.variants.values()
                                if arm_of(v) == arm])
            rows.append([arm, target, theirs, _pm(ours) if mine else "not run", _pm(unt) if mine else "—"])
    md = ["## The literature beside ours", "",
          "Published best-site last-position R² (report.literature) beside this sweep's readouts (held-out "
          "sequences; the literature's probes are in-sample) and the same probe on the untrained network.", ""]
    md += _md_table(["arm", "readout", "literature", "ours (mean ± sd)", "ours, untrained network"], rows)
    md.append("")
    return md


def _pm(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "—"
    return f"{_fmt(s['mean'])} ± {_fmt(s['std'])} (n={s['n']})"


def report_dir(path: str | Path) -> Path:
    """Write ``report.md`` (and ``figures/*.png``) for a run or sweep folder; return the report's path.

    A sweep report also (re)writes each of its runs' reports. Reads files only (results.json,
    config.yaml, .hydra/overrides.yaml); never trains or probes anything.
    """
    from gravprobe.common import atomic_write_bytes

    path = Path(path).expanduser().resolve()
    result = load(path)
    if isinstance(result, SweepResult):
        for run in result.runs:
            atomic_write_bytes(run.dir / "report.md", render_run(run).encode())
        text = render_sweep(result)
    else:
        text = render_run(result)
    out = path / "report.md"
    atomic_write_bytes(out, text.encode())
    state = "complete" if result.complete else "INCOMPLETE"
    log.info("report (%s) written: %s", state, out)
    return out


def main(cfg, run_dir: Path) -> dict:
    """``gravprobe report report.source=DIR``: report a run or sweep folder (``DIR``) in place."""
    source = (cfg.get("report") or {}).get("source")
    if not source:
        raise ReportError("say which folder to report: `gravprobe report PATH` or "
                          "`gravprobe report report.source=PATH` (a run folder or a sweep folder)")
    out = report_dir(Path(str(source)))
    return {"report": str(out)}


try:  # the Hydra callback that writes a sweep's report when a --multirun ends
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object  # type: ignore[assignment,misc]


class SweepReportCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """``on_multirun_end``: write ``report.md`` into the sweep folder (stages ``run``, ``pretrain``, ``probe``).

    Registered in ``conf/config.yaml`` under ``hydra.callbacks``; a failing report is logged, never
    turned into a failed sweep (the runs' own results are already on disk).
    """

    def on_multirun_end(self, config, **kwargs) -> None:
        if config.get("stage") not in ("run", "pretrain", "probe"):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        try:
            out = report_dir(sweep_dir)
            log.info("sweep report: %s", out)
        except Exception as e:  # noqa: BLE001 - reporting must not hide the sweep's own outcome
            log.error("could not write the sweep report for %s: %s (retry: gravprobe report %s)",
                      sweep_dir, e, sweep_dir)
