"""Tables: the numbers the report shows, computed from loaded results (``gravprobe.report.load``).

Every function here returns plain Python data (dicts, lists, strings); ``markdown`` turns them into
``report.md`` and ``figures`` into PNGs, the notebook shows them directly.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from gravprobe.common import arm_label  # noqa: F401  (re-exported: the report's name for an arm)
from gravprobe.config import group_defaults

from .load import RunResult, SweepResult, VariantResult

log = logging.getLogger(__name__)

LENGTH_KEYS_ORDER = ("1", "2", "4", "8", "16", "32", "64")
MODALITIES = ("orbits", "text")
# units of the losses in results.json and metrics.csv, per modality (and orbit_mode for orbits): a discrete
# orbit model's loss is the mean of its x- and y-bin cross-entropies (pretrain/model.py), a continuous one's
# the MSE of the next (x, y) in model units (position / model.position_scale)
BASELINES = ("copy_previous", "constant_velocity", "constant_acceleration")  # pretrain.dynamics baselines
LOSS_UNITS = {"text": "nats/token", "discrete": "nats/coordinate", "continuous": "MSE/coordinate (model units²)"}


def orbit_mode(config: dict | None) -> str:
    """``model.orbit_mode`` of a run's config (``"discrete"`` when not given, the model's default)."""
    return str(((config or {}).get("model") or {}).get("orbit_mode") or "discrete")


def loss_unit(modality: str, config: dict | None = None, *, short: bool = False) -> str:
    """The unit of a ``modality`` loss (``"orbits"`` or ``"text"``) for a run with ``config``; ``short``
    gives the first word only (``"MSE/coordinate"``) for table headers."""
    unit = LOSS_UNITS["text"] if modality == "text" else LOSS_UNITS.get(orbit_mode(config), LOSS_UNITS["discrete"])
    return unit.split(" (")[0] if short else unit


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


#: a held-out R² below it reads "not decodable" (issue 10): ``probe.linear.decodable_min_r2``, written once in
#: conf/probe/default.yaml (a run's own threshold, recorded in its results, wins where the report has it)
DECODABLE_MIN_R2 = float(group_defaults("probe")["linear"]["decodable_min_r2"])


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

    - ``loss/<modality>/last`` (final training-run validation loss; units: ``loss_unit``),
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



def summary_table(run: RunResult) -> list[dict]:
    """One row per variant (and the controls): the numbers a reader looks at first.

    ``orbits@1x``/``orbits@16x``/``text@1x``/``text@16x``: validation loss (``loss_unit``) at 1× and at the
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



def _pm(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "—"
    return f"{_fmt(s['mean'])} ± {_fmt(s['std'])} (n={s['n']})"

