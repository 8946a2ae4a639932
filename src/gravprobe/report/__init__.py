"""`gravprobe report`: rebuild ``report.md`` and every figure of a run or sweep folder from files alone.

Stages write numbers (``results.json``, CSV, NPZ); this package alone turns them into tables, figures
and Markdown, for a run, a sweep and the notebook. Its modules:

- ``load``: run/sweep folders as ``RunResult`` / ``SweepResult`` / ``VariantResult``, and the readers of
  the stages' number files (``metrics.csv``, ``probes_linear.csv``, ``force_predictions.csv``,
  ``laws_<source>.npz``);
- ``tables``: the numbers shown (``aggregate``, ``equations_table``, ``summary_table``, ``loss_unit``, …);
- ``figures``: every figure (``fig_*`` return a matplotlib Figure; ``draw_figures(dir)`` draws the
  stage figures into each stage folder);
- ``markdown``: ``render_run`` / ``render_sweep``.
Every public name of these modules is importable from ``gravprobe.report`` itself.

Entry points
------------
- ``report_dir(path) -> Path``: draw the stage figures (``draw_figures``) and write ``report.md`` (and its
  ``figures/*.png``) into ``path`` — a run folder of any stage or a sweep folder — reading nothing but the
  files in it; returns the path of ``report.md``. This is what ``gravprobe report DIR`` calls.
- ``draw_figures(path) -> list[Path]``: only the stage figures, for a stage, run or sweep folder.
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

Losses are mean cross-entropy in nats per predicted text token, and per coordinate (x or y bin) for
discrete orbit models (``tables.loss_unit``; MSE per coordinate for continuous ones); length keys are multiples of the training
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

import logging
from pathlib import Path

from gravprobe.common import arm_label

from . import figures, markdown, tables  # noqa: F401  (the submodules, by name)
from . import load as load_module  # noqa: F401  (gravprobe.report.load is the function)
from .figures import (
    DPI,
    R2_FLOOR,
    SOURCE_TITLES,
    draw_figures,
    draw_stage_figures,
    evaluate_law,
    fig_dynamics,
    fig_force_predictions,
    fig_laws,
    fig_length_extrapolation,
    fig_loss_curves,
    fig_newtonian_counts,
    fig_probe_r2,
    fig_probes_linear,
    figure_png,
    force_prediction_figure,
    plot_length_extrapolation,
    plot_loss_curves,
    plot_newtonian_counts,
    plot_probe_r2,
    save_figure,
    style,
    wrap,
)
from .load import (
    FORCE_PREDICTION_FILES,
    LAW_SECTIONS,
    STAGE_SECTIONS,
    Laws,
    ReportError,
    RunResult,
    SweepResult,
    VariantResult,
    force_predictions,
    force_predictions_by_source,
    is_head_source,
    is_run_dir,
    is_sweep_dir,
    latest,
    law_galaxies,
    law_sources,
    linear_panels,
    load,
    load_run,
    load_sweep,
    read_laws,
    read_metrics,
    read_probes_linear,
)
from .markdown import CONTROLS, GALAXY_HEADER, READOUT_TARGETS, markdown_table, render_run, render_sweep
from .tables import (
    BASELINES,
    DECODABLE_MIN_R2,
    LENGTH_KEYS_ORDER,
    LOSS_UNITS,
    MODALITIES,
    aggregate,
    arm_of,
    dynamics_of,
    equations_table,
    format_exponent,
    learned_dynamics,
    loss_series,
    loss_unit,
    orbit_mode,
    summary_table,
    sweep_overrides,
)

log = logging.getLogger(__name__)

__all__ = [
    # entry points
    "report_dir", "main", "SweepReportCallback", "draw_figures", "draw_stage_figures",
    # loading
    "ReportError", "RunResult", "SweepResult", "VariantResult", "Laws", "STAGE_SECTIONS", "FORCE_PREDICTION_FILES",
    "LAW_SECTIONS", "load", "load_run", "load_sweep", "latest", "is_run_dir", "is_sweep_dir", "force_predictions",
    "force_predictions_by_source", "is_head_source", "read_metrics", "read_probes_linear", "linear_panels",
    "law_sources", "law_galaxies", "read_laws",
    # tables
    "LENGTH_KEYS_ORDER", "MODALITIES", "LOSS_UNITS", "BASELINES", "DECODABLE_MIN_R2", "aggregate", "arm_label",
    "arm_of", "dynamics_of", "learned_dynamics", "equations_table", "format_exponent", "loss_series", "loss_unit",
    "orbit_mode", "summary_table", "sweep_overrides",
    # figures
    "DPI", "R2_FLOOR", "SOURCE_TITLES", "fig_dynamics", "fig_force_predictions", "fig_laws",
    "fig_length_extrapolation", "fig_loss_curves", "fig_newtonian_counts", "fig_probe_r2", "fig_probes_linear",
    "figure_png", "force_prediction_figure", "plot_length_extrapolation", "plot_loss_curves",
    "plot_newtonian_counts", "plot_probe_r2", "save_figure", "style", "wrap", "evaluate_law",
    # markdown
    "CONTROLS", "GALAXY_HEADER", "READOUT_TARGETS", "markdown_table", "render_run", "render_sweep",
]


def report_dir(path: str | Path) -> Path:
    """Draw every figure and write ``report.md`` for a run or sweep folder; return the report's path.

    First the stage figures into each stage folder (:func:`draw_figures`: loss curves, length
    extrapolation, linear probes, force predictions, recovered laws — each only when its numbers are
    there), then ``report.md`` with its own ``figures/*.png``. A sweep report also (re)writes each of its
    runs' reports. Reads files only (results.json, config.yaml, the stages' CSV/NPZ files,
    .hydra/overrides.yaml); never trains or probes anything.
    """
    from gravprobe.common import atomic_write_bytes

    path = Path(path).expanduser().resolve()
    result = load(path)
    draw_figures(result)
    if isinstance(result, SweepResult):
        for run in result.runs:
            atomic_write_bytes(run.dir / "report.md", render_run(run).encode(), what="a run report")
        text = render_sweep(result)
    else:
        text = render_run(result)
    out = path / "report.md"
    atomic_write_bytes(out, text.encode(), what="the report")
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
