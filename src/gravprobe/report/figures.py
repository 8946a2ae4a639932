"""Figures: every PNG of a run, a sweep and the notebook, drawn from the numbers the stages wrote.

Stages write numbers (CSV, NPZ, ``results.json``); this module alone draws them. ``fig_*`` build a
matplotlib ``Figure`` with the object API (no pyplot state, no GUI backend, safe in threads and notebooks)
or return ``None`` when there is nothing to draw; ``plot_*`` save one; ``figure_png`` gives its bytes.

What a reader can rely on in every figure:
- every series is visible: distinct colours *and* line styles *and* markers, so lines stay apart in
  grey-scale and where they overlap; a probe R² below the axis floor is drawn on the floor as ▼ with its
  value written beside it (never clipped silently), and the "not decodable" band is shaded and named;
- layer axes have integer ticks; lengths are labelled ``1×, 2×, …``; units are stated (losses per
  modality via ``tables.loss_unit``: nats/coordinate for discrete orbits, nats/token for text);
- titles wrap instead of being cut off (a recovered law is shown in full).

``draw_figures(path)`` draws every figure the files of a stage folder, a run folder (its variant
sub-folders) or a sweep folder allow, into those stage folders (``loss_curves.png``,
``length_extrapolation.png``, ``probes_linear.png``, ``force_pred_vs_true.png``,
``equations_<source>.png``), and skips a figure whose numbers are not there (older run folders).
"""
from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .load import (
    Laws,
    RunResult,
    SweepResult,
    VariantResult,
    force_predictions_by_source,
    is_head_source,
    law_sources,
    linear_panels,
    load,
    read_laws,
    read_metrics,
    read_probes_linear,
)
from .tables import BASELINES, DECODABLE_MIN_R2, MODALITIES, _isnum, _length_keys, loss_unit

log = logging.getLogger(__name__)

DPI = 110
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
R2_FLOOR = -0.5  # probe R² axes stop here; lower values sit on the floor as ▼ with their value written
SR_NAMES = ("r", "m1", "m2")  # the regression's inputs, columns of laws_<source>.npz X (probes.data.SR_NAMES)
SOURCE_TITLES = {"head": "fine-tuned model (force head)", "oracle": "k-NN oracle on the true state",
                 "truth": "true |F| with noise", "oracle_no_m1": "k-NN oracle without m1",
                 "oracle_without_m1": "k-NN oracle without m1", "memoriser": "label memoriser"}


# ------------------------------------------------------------------------------------------ basics
def _grid(n: int, *, max_cols: int = 5, width: float = 4.2, height: float = 3.6, extra_height: float = 0.0):
    """A constrained-layout figure with ``n`` panels in rows of at most ``max_cols``; returns
    ``(fig, axes)`` with exactly ``n`` axes (surplus grid cells removed)."""
    from matplotlib.figure import Figure

    ncols = max(1, min(n, max_cols))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(width * ncols, (height + extra_height) * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    """One row of ``ncols`` panels (kept for callers of the original report module)."""
    return _grid(ncols, max_cols=max(1, ncols), width=width, height=height)


def style(i: int) -> dict[str, Any]:
    """The ``i``-th series' style: colour, line style and marker all differ between neighbours
    (10 colours × 4 line styles × 10 markers before a combination repeats)."""
    return {"color": f"C{i % 10}" if i < 10 else _tab20(i), "ls": LINE_STYLES[i % len(LINE_STYLES)],
            "marker": MARKERS[i % len(MARKERS)]}


def _tab20(i: int):
    from matplotlib import colormaps

    return colormaps["tab20"]((2 * (i - 10) + 1) % 20)  # the lighter halves, after the 10 default colours


def wrap(text: str, width: int = 48) -> str:
    """``text`` wrapped at ``width`` characters per line (long words such as ``m1*m2/r**2`` are broken too),
    so that no title is cut off at the figure's edge."""
    return "\n".join(textwrap.fill(part, width, break_long_words=True, break_on_hyphens=False) or part
                     for part in str(text).split("\n"))


def save_figure(fig, out: Path) -> Path | None:
    """Write ``fig`` to ``out`` (PNG; folders made as needed); ``None`` when ``fig`` is ``None``."""
    if fig is None:
        return None
    from gravprobe.common import atomic_write_bytes

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, figure_png(fig), what="a figure")
    return out


def figure_png(fig) -> bytes:
    """``fig`` as PNG bytes (for notebooks: ``IPython.display.Image(data=figure_png(fig))``)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(fig, axes, *, fontsize: int = 8) -> None:
    """One legend for the whole figure, right of the panels, with every labelled series of every panel."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=fontsize)


# ------------------------------------------------------------------------------------ pretraining
def _length_table(entry: Mapping) -> Mapping:
    """``{modality: {k: loss}}`` from a results.json ``pretrain`` section or the table itself."""
    entry = entry or {}
    return entry.get("length_extrapolation", entry) if isinstance(entry, Mapping) else {}


def fig_length_extrapolation(series: Mapping[str, Mapping], *, errors: Mapping[str, Mapping] | None = None,
                             title: str = "", config: dict | None = None):
    """Validation loss against sequence length (multiples of the training length), one panel per modality,
    one line per variant.

    ``series[variant]`` is ``{"orbits": {"1": loss, ...}, "text": {...}}`` or a whole results.json
    ``pretrain`` section holding it; ``errors`` the same shape with standard deviations (error bars).
    ``config`` (a run's resolved config) decides the orbit loss unit (``tables.loss_unit``). A ``None``
    loss (a learned-position model beyond its context) is not drawn and is named in the legend.
    """
    tables = {name: _length_table(s) for name, s in series.items()}
    mods = [m for m in MODALITIES if any((t or {}).get(m) for t in tables.values())]
    if not mods:
        return None
    fig, axes = _grid(len(mods), width=5.0, height=3.8)
    for ax, mod in zip(axes, mods):
        ticks: set[float] = set()
        for i, (name, t) in enumerate(tables.items()):
            d = (t or {}).get(mod) or {}
            keys = [k for k in _length_keys([d]) if _isnum(k)]
            ks = [k for k in keys if isinstance(d.get(k), (int, float)) and math.isfinite(d[k])]
            if not ks:
                continue
            missing = [k for k in keys if k not in ks]
            err = None
            if errors:
                e = (errors.get(name) or {}).get(mod) or {}
                err = [e.get(k) or 0.0 for k in ks]
            label = name + (f" (none at {', '.join(k + '×' for k in missing)})" if missing else "")
            st = style(i)
            ax.errorbar([float(k) for k in ks], [d[k] for k in ks], yerr=err, capsize=3, lw=1.5, ms=5,
                        label=label, **st)
            ticks |= {float(k) for k in ks}
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(sorted(ticks), [f"{t:g}×" for t in sorted(ticks)])
            ax.minorticks_off()
        ax.set_xlabel("sequence length / training length")
        ax.set_ylabel(f"validation loss ({loss_unit(mod, config)})")
        ax.set_title(mod)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(wrap(title, 90))
    return fig


def plot_length_extrapolation(series: Mapping[str, Mapping], out: Path, *,
                              errors: Mapping[str, Mapping] | None = None, title: str = "",
                              config: dict | None = None) -> Path | None:
    """:func:`fig_length_extrapolation` saved to ``out``; ``None`` when there is nothing to draw."""
    return save_figure(fig_length_extrapolation(series, errors=errors, title=title, config=config), out)


def fig_loss_curves(rows: list[dict], *, title: str = "", config: dict | None = None):
    """Training and validation loss against step, one panel per modality (their units differ), from the
    rows of ``metrics.csv`` (``load.read_metrics``): train a solid line, validation dashed with markers; a
    logarithmic loss axis when the loss spans more than a factor 20."""
    mods = [m for m in MODALITIES if any(r.get("modality") == m for r in rows)]
    if not mods:
        return None
    fig, axes = _grid(len(mods), width=5.0, height=3.6)
    for ax, mod in zip(axes, mods):
        for j, split in enumerate(("train", "val")):
            pts = sorted((r["step"], r["loss"]) for r in rows if r.get("split") == split and r["modality"] == mod
                         and math.isfinite(r["loss"]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{j}", ls=LINE_STYLES[j],
                        marker=None if split == "train" else "o", ms=3, lw=1.3,
                        label="training batches" if split == "train" else "validation")
        losses = [r["loss"] for r in rows if r["modality"] == mod and math.isfinite(r["loss"])]
        if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
            ax.set_yscale("log")  # a loss falling by decades would sit flat on a linear axis
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss ({loss_unit(mod, config)})")
        ax.set_title(mod)
        _integer_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(wrap(title, 90))
    return fig


def plot_loss_curves(metrics_csv: str | Path, out: str | Path, title: str = "", *,
                     config: dict | None = None) -> Path | None:
    """:func:`fig_loss_curves` of a ``metrics.csv`` saved to ``out``; ``None`` when it has no rows."""
    return save_figure(fig_loss_curves(read_metrics(metrics_csv), title=title or "", config=config), Path(out))


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
    ax.set_title(wrap("model vs kinematic baselines (validation systems; lower is better)", 60))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------ probes
def fig_probe_r2(panels: Mapping[str, Mapping], *, floor: float = R2_FLOOR,
                 decodable_min_r2: float | None = DECODABLE_MIN_R2):
    """Held-out linear-probe R² against layer: one panel per entry of ``panels``, one line per target.

    ``panels[title] = {target: {layer: r2}}`` — per variant (``results.json["probes"]["linear"]``) or per
    probe kind (``load.linear_panels`` of ``probes_linear.csv``). A target keeps its colour, line style and
    marker in every panel; one legend names them all. R² below ``floor`` is drawn on the floor as ▼ with
    its value written beside it; R² below ``decodable_min_r2`` lies in a shaded band named "not decodable".
    """
    have = {n: t for n, t in panels.items() if isinstance(t, Mapping) and any(isinstance(d, Mapping) and d
                                                                               for d in t.values())}
    if not have:
        return None
    targets = list(dict.fromkeys(t for table in have.values() for t, d in table.items() if isinstance(d, Mapping)))
    fig, axes = _grid(len(have), max_cols=3, width=4.6, height=3.8)
    for ax, (name, table) in zip(axes, have.items()):
        below: dict[float, list[tuple[str, float, Any]]] = {}
        layers: set[float] = set()
        for i, target in enumerate(targets):
            per_layer = table.get(target)
            if not isinstance(per_layer, Mapping):
                continue
            pts = sorted((float(k), float(v)) for k, v in per_layer.items()
                         if _isnum(str(k)) and isinstance(v, (int, float)) and math.isfinite(v))
            if not pts:
                continue
            st = style(i)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            layers |= set(xs)
            ax.plot(xs, [max(y, floor) for y in ys], ms=4, lw=1.3, label=target, **st)
            for x, y in pts:
                if y < floor:
                    below.setdefault(x, []).append((target, y, st["color"]))
        for x, items in below.items():  # ▼ on the floor, one stacked "target R²" label per layer
            for k, (target, y, colour) in enumerate(items):
                ax.plot([x], [floor], marker="v", ms=8, color=colour, ls="none")
                ax.annotate(f"{target} {y:.3g}", (x, floor), xytext=(5, 4 + 8 * k), textcoords="offset points",
                            fontsize=6, color=colour)
        if decodable_min_r2 is not None:
            ax.axhspan(floor - 0.1, decodable_min_r2, color="0.9", zorder=0,
                       label=f"not decodable (R² < {decodable_min_r2:g})")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_ylim(floor - 0.08, 1.02)
        if layers:
            ax.set_xlim(min(layers) - 0.3, max(layers) + 0.3)
        ax.set_xlabel("layer (0 = embeddings, i = after block i)")
        ax.set_ylabel(f"held-out R² (below {floor:g}: ▼ with value)")
        ax.set_title(wrap(name, 50))
        _integer_ticks(ax)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes)
    return fig


def plot_probe_r2(variants: Mapping[str, Mapping], out: Path, **kwargs) -> Path | None:
    """:func:`fig_probe_r2` saved to ``out``; ``None`` when there is nothing to draw."""
    return save_figure(fig_probe_r2(variants, **kwargs), out)


def fig_probes_linear(rows: list[dict], *, decodable_min_r2: float | None = DECODABLE_MIN_R2, title: str = ""):
    """``probes_linear.csv`` (``load.read_probes_linear``): one panel per probe kind of the trained model
    and one per kind of the untrained control, drawn by :func:`fig_probe_r2`."""
    fig = fig_probe_r2(linear_panels(rows), decodable_min_r2=decodable_min_r2)
    if fig is not None and title:
        fig.suptitle(wrap(title, 90))
    return fig


def fig_force_predictions(predictions: Mapping[str, Mapping], *, title: str = ""):
    """Predicted against true force magnitude (log-log), one panel per model or source, with y = x.

    ``predictions[name] = {"true": [...], "predicted": [...]}`` (M☉ AU yr⁻², from ``load.force_predictions``
    or ``load.force_predictions_by_source``). Each panel's title gives the median |log₁₀(pred/true)|;
    non-positive values cannot be shown on log axes and are counted in the title.
    """
    have = {n: p for n, p in predictions.items() if p and p.get("true")}
    if not have:
        return None
    fig, axes = _grid(len(have), max_cols=4, width=3.9, height=3.7, extra_height=0.3)
    for i, (ax, (name, p)) in enumerate(zip(axes, have.items())):
        pairs = [(t, q) for t, q in zip(p["true"], p["predicted"]) if t > 0 and q > 0
                 and math.isfinite(t) and math.isfinite(q)]
        dropped = len(p["true"]) - len(pairs)
        notes = []
        if pairs:
            t, q = zip(*pairs)
            ax.scatter(t, q, s=5, alpha=0.5, color=style(i)["color"], marker=style(i)["marker"], lw=0)
            lo, hi = min(min(t), min(q)), max(max(t), max(q))
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x (perfect)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend(fontsize=7, loc="upper left")
            errs = sorted(abs(math.log10(b / a)) for a, b in pairs)
            notes.append(f"median |log₁₀ pred/true| {errs[len(errs) // 2]:.2g}")
        if dropped:
            notes.append(f"{dropped} ≤ 0 not shown")
        ax.set_xlabel("true |F| (M☉ AU yr⁻²)")
        ax.set_ylabel("predicted |F| (M☉ AU yr⁻²)")
        ax.set_title(wrap(name, 40) + ("\n" + "; ".join(notes) if notes else ""), fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(wrap(title, 90))
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
    ax.bar(names, got, color="tab:green", label="newtonian", hatch="//")
    for i, (g, t) in enumerate(zip(got, tot)):
        ax.text(i, g, f"{g}/{t}", ha="center", va="bottom")
    ax.set_ylim(0, max(tot) * 1.12)  # room for the "k/n" labels above the tallest bar
    ax.set_ylabel("galaxies × seeds")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(fontsize=8)
    return fig


def plot_newtonian_counts(agg: dict[str, dict], out: Path) -> Path | None:
    return save_figure(fig_newtonian_counts(agg), out)


def evaluate_law(expression: str, X) -> Any:
    """A recovered law (a sympy-readable string in the symbols r, m1, m2) evaluated at ``X [n, 3]``
    (columns r, m1, m2) → ``[n]`` float array. Raises ``ValueError`` naming the expression when it does not
    parse or uses other symbols."""
    import numpy as np
    import sympy as sp

    syms = {n: sp.Symbol(n, positive=True) for n in SR_NAMES}
    try:
        expr = sp.sympify(str(expression), locals=syms)
    except (sp.SympifyError, SyntaxError, TypeError) as e:
        raise ValueError(f"cannot read the law {expression!r} with sympy ({e})") from e
    extra = {str(s) for s in expr.free_symbols} - set(SR_NAMES)
    if extra:
        raise ValueError(f"the law {expression!r} uses {sorted(extra)}; only {list(SR_NAMES)} are inputs")
    f = sp.lambdify([syms[n] for n in SR_NAMES], expr, modules="numpy")
    X = np.asarray(X, float)
    with np.errstate(all="ignore"):
        out = np.asarray(f(X[:, 0], X[:, 1], X[:, 2]), dtype=float)
    return np.broadcast_to(out, (len(X),)).copy()


def _law_text(expression: str) -> str:
    """The law as the title shows it: numbers to 4 significant figures, in full."""
    try:
        import sympy as sp

        syms = {n: sp.Symbol(n, positive=True) for n in SR_NAMES}
        return str(sp.N(sp.sympify(str(expression), locals=syms), 4))
    except Exception:  # noqa: BLE001 - an unreadable law is shown as written
        return str(expression)


def fig_laws(laws: Laws, *, title: str = ""):
    """Each galaxy's recovered law against the |F| it was fitted to (log-log, y = x dashed), one panel per
    galaxy of ``laws.galaxies``, titled with the verdict and the whole law (wrapped, never cut off).

    Points are the rows of ``laws.X``/``laws.y`` whose ``galaxy`` equals the entry's ``seed``. A law that
    cannot be evaluated, or a galaxy without points, gets a panel saying so."""
    import numpy as np

    gals = laws.galaxies or [{"seed": s} for s in dict.fromkeys(np.asarray(laws.galaxy).tolist())]
    if not gals:
        return None
    texts = [_law_text(g["expression"]) if g.get("expression") else "no law recorded" for g in gals]
    width = 38
    lines = max(wrap(t, width).count("\n") + 1 for t in texts)
    fig, axes = _grid(len(gals), max_cols=5, width=4.0, height=3.5, extra_height=0.17 * lines)
    for i, (ax, g, text) in enumerate(zip(axes, gals, texts)):
        seed = g.get("seed", i)
        mask = np.asarray(laws.galaxy) == seed
        verdict = {True: "Newtonian", False: "not Newtonian"}.get(g.get("newtonian"), "no verdict")
        ax.set_title(f"galaxy {seed}: {verdict}\n{wrap(text, width)}", fontsize=7, loc="left")
        ax.set_xlabel("|F| fitted to (M☉ AU yr⁻²)", fontsize=8)
        ax.set_ylabel("law's |F|", fontsize=8)
        ax.grid(alpha=0.3)
        y = laws.y[mask]
        problem = None
        if not mask.any():
            problem = f"no points of galaxy {seed} in {laws.path.name}"
        elif not g.get("expression"):
            problem = "no law in results.json"
        else:
            try:
                f = evaluate_law(g["expression"], laws.X[mask])
            except ValueError as e:
                problem = str(e)
            else:
                ok = (y > 0) & (f > 0) & np.isfinite(f) & np.isfinite(y)
                if ok.any():
                    ax.loglog(y[ok], f[ok], ls="none", marker=".", ms=3, alpha=0.6,
                              color="tab:green" if g.get("newtonian") else "tab:red")
                    lo, hi = y[ok].min(), y[ok].max()
                    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, zorder=0)
                    if (~ok).sum():
                        ax.text(0.98, 0.02, f"{int((~ok).sum())} ≤ 0 or not finite, not shown",
                                transform=ax.transAxes, ha="right", va="bottom", fontsize=6)
                else:
                    problem = "the law is ≤ 0 or not finite at every point"
        if problem:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, wrap(problem, 40), transform=ax.transAxes, ha="center", va="center", fontsize=7)
    fig.suptitle(wrap(title or SOURCE_TITLES.get(laws.source, laws.source), 90))
    return fig


# ------------------------------------------------------------------------------------- drawing all
def force_prediction_figure(variant: VariantResult) -> Path | None:
    """A variant folder's predicted-vs-true force figure (``force_pred_vs_true.png``), if there is one."""
    p = variant.dir / "force_pred_vs_true.png"
    return p if p.exists() else None


def draw_stage_figures(variant: VariantResult, config: dict | None = None) -> list[Path]:
    """Every figure one stage folder's numbers allow, written into that folder; returns the paths written.

    - ``metrics.csv`` → ``loss_curves.png``;
    - ``results.json`` ``pretrain.length_extrapolation`` → ``length_extrapolation.png``;
    - ``probes_linear.csv`` → ``probes_linear.png`` (trained and untrained panels);
    - ``force_predictions.csv`` → ``force_pred_vs_true.png`` (one panel per source);
    - ``laws_<source>.npz`` with the galaxies in ``results.json`` → ``equations_<source>.png``.
    A figure whose numbers are missing is skipped (an existing PNG of an older run is left as it is).
    """
    d = variant.dir
    name = variant.name
    out: list[Path] = []
    if (d / "metrics.csv").is_file():
        out.append(plot_loss_curves(d / "metrics.csv", d / "loss_curves.png", title=name, config=config))
    ext = (variant.pretrain or {}).get("length_extrapolation")
    if ext:
        out.append(plot_length_extrapolation({name: ext}, d / "length_extrapolation.png", config=config))
    if (d / "probes_linear.csv").is_file():
        thr = ((variant.probes or {}).get("linear_probe") or {}).get("decodable_min_r2", DECODABLE_MIN_R2)
        out.append(save_figure(fig_probes_linear(read_probes_linear(d / "probes_linear.csv"),
                                                 decodable_min_r2=thr, title=name), d / "probes_linear.png"))
    preds = force_predictions_by_source(d)
    if preds:
        ordered = dict(sorted(preds.items(), key=lambda kv: not is_head_source(kv[0])))
        out.append(save_figure(fig_force_predictions(ordered, title=f"{name}: held-out planet steps"),
                               d / "force_pred_vs_true.png"))
    k = ((variant.probes or {}).get("oracle") or {}).get("k")
    for source in law_sources(d):
        laws = read_laws(d, source, variant.probes)
        if laws is not None:
            title = f"{name}: {SOURCE_TITLES.get(source, source)}"
            title = title.replace("k-NN", f"{k}-NN") if isinstance(k, int) else title
            out.append(save_figure(fig_laws(laws, title=title), d / f"equations_{source}.png"))
    return [p for p in out if p is not None]


def draw_figures(path: str | Path | RunResult | SweepResult) -> list[Path]:
    """Draw every figure the files under ``path`` allow — a stage folder (``pretrain`` / ``probe``), a
    ``gravprobe run`` folder (each variant sub-folder) or a sweep folder (each job) — into the stage
    folders themselves (:func:`draw_stage_figures`). Reads files only; returns the PNGs written."""
    result = path if isinstance(path, (RunResult, SweepResult)) else load(path)
    runs = result.runs if isinstance(result, SweepResult) else [result]
    written: list[Path] = []
    for run in runs:
        for v in run.variants.values():
            if v.dir.is_dir():
                written += draw_stage_figures(v, run.config)
    log.info("figures drawn: %d under %s", len(written), result.dir)
    return written
