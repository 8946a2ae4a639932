# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Did Newton's law emerge? — analysis of a gravprobe run or sweep
#
# This notebook reads a run folder (`gravprobe run …`) or a sweep folder (`gravprobe run -m …`)
# through `gravprobe.report` and shows what the report shows, interactively: the recovered equations of
# every galaxy and their verdicts, the oracle for comparison, the fine-tuned force head's predictions
# against the true force, and validation loss against sequence length. It computes nothing the library
# cannot; every number comes from the run's files.
#
# Which folder: the environment variable `GRAVPROBE_RUN`, else the newest run or sweep under
# `$GRAVPROBE_HOME` (default `./outputs`). The file is kept as a percent-format script (diff-friendly);
# `jupytext --to ipynb notebooks/analysis.py` makes the notebook, and `jupytext --sync` keeps both in step.

# %%
import os
from pathlib import Path

from IPython.display import Image, Markdown, display

from gravprobe import report

RUN = Path(os.environ["GRAVPROBE_RUN"]) if os.environ.get("GRAVPROBE_RUN") else report.latest()
result = report.load(RUN)
runs = result.runs if isinstance(result, report.SweepResult) else [result]
print(f"{type(result).__name__}: {result.dir}")
print(f"{len(runs)} run(s); variants: {sorted({n for r in runs for n in r.variants})}")
print("complete" if result.complete else "INCOMPLETE")
for r in runs:
    for problem in r.problems:
        print(f"  {r.dir.name}: {problem}")

# %% [markdown]
# ## Verdicts: how often was Newton's law recovered?
# Galaxies judged Newtonian (METHOD §4.5) out of all galaxies, summed over runs (seeds), per model;
# the oracle (2-nearest-neighbour regression on the true state) is the control that must succeed.

# %%
agg = report.aggregate(result)
summary = [{"model": name, "newtonian": a["newtonian"], "galaxies": a["galaxies"], "runs": a["runs"]}
           for name, a in agg.items()]
display(Markdown(report.markdown_table(summary)))
fig = report.fig_newtonian_counts(agg)
if fig is not None:
    display(Image(data=report.figure_png(fig)))

# %% [markdown]
# ## The recovered equations
# One row per galaxy: the law symbolic regression chose, the verdict, the power-law exponents of
# (r, m₁, m₂) with their confidence intervals (Newton: −2, 1, 1) and the R² of the best Newtonian fit.

# %%
rows = report.equations_table(result)
columns = ["run", "seed", "model", "galaxy", "expression", "newtonian", "r2_newton", "exp_r", "exp_m1", "exp_m2"]
display(Markdown(report.markdown_table(rows, columns)))

# %% [markdown]
# Why each non-Newtonian galaxy was rejected:

# %%
rejected = [r for r in rows if r["newtonian"] is False]
display(Markdown(report.markdown_table(rejected, ["run", "model", "galaxy", "reasons"]) if rejected
                 else "Every galaxy was judged Newtonian."))

# %% [markdown]
# ## Force predictions against the truth
# The fine-tuned force head's predicted |F| on held-out planet steps against the true |F|
# (M☉ AU yr⁻², log-log; the dashed line is perfect prediction): one panel per variant, then, where the
# probe stage saved them, every source of a variant (the head and the controls) side by side.

# %%
for r in runs:
    predictions = {name: report.force_predictions(v.dir) for name, v in r.variants.items()}
    fig = report.fig_force_predictions({n: p for n, p in predictions.items() if p})
    display(Markdown(f"**{r.dir.name}**"))
    if fig is not None:
        display(Image(data=report.figure_png(fig)))
    for name, v in r.variants.items():
        by_source = report.force_predictions_by_source(v.dir)
        if len(by_source) > 1:
            display(Image(data=report.figure_png(report.fig_force_predictions(by_source, title=name))))
        elif fig is None and report.force_prediction_figure(v) is not None:
            # an older run folder without the numbers: the probe stage's own figure
            display(Markdown(f"*{name}* (the probe stage's figure)"))
            display(Image(filename=str(report.force_prediction_figure(v))))
        elif fig is None:
            print(f"{name}: no force predictions saved")

# %% [markdown]
# ## Each galaxy's law against its data
# For every source whose regression data the probe stage saved (`laws_<source>.npz`: the fine-tuned
# head, the oracle, the noisy truth, …), each galaxy's recovered law evaluated on the galaxy's points
# against the |F| it was fitted to, titled with the verdict and the whole law.

# %%
shown = 0
for r in runs[:3]:  # a sweep has many runs: the first three here, every run in its folder's PNGs
    for name, v in r.variants.items():
        for source in report.law_sources(v.dir):
            laws = report.read_laws(v.dir, source, v.probes)
            fig = report.fig_laws(laws, title=f"{r.dir.name} / {name}: {source}") if laws else None
            if fig is not None:
                display(Image(data=report.figure_png(fig)))
                shown += 1
if not shown:
    print("no laws_<source>.npz saved (older run folders): see the equations tables above")

# %% [markdown]
# ## Validation loss against sequence length
# Loss at k× the training context, for orbits (nats per coordinate for discrete orbit models) and text
# (nats per token); for a sweep, the mean across seeds with the standard deviation as error bars.

# %%
series, errors = report.loss_series(result)
fig = report.fig_length_extrapolation(series, errors=errors, config=runs[0].config if runs else None)
if fig is not None:
    display(Image(data=report.figure_png(fig)))
else:
    print("no length-extrapolation results (pretraining has not finished)")

# %% [markdown]
# ## Linear probes: what the layers encode
# Held-out R² of ridge probes from each layer's activations to force and orbit quantities (from
# `probes_linear.csv` with the untrained network's control where the probe stage saved it, else from
# `results.json`). Values below the axis floor are marked ▼ with their value; the shaded band is
# "not decodable".

# %%
for r in runs:
    for name, v in r.variants.items():
        csv_path = v.dir / "probes_linear.csv"
        if csv_path.exists():
            fig = report.fig_probes_linear(report.read_probes_linear(csv_path), title=f"{r.dir.name} / {name}")
        else:
            fig = report.fig_probe_r2({name: (v.probes or {}).get("linear") or {}})
        if fig is not None:
            display(Markdown(f"**{r.dir.name}** / {name}"))
            display(Image(data=report.figure_png(fig)))
