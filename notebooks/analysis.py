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
# (M☉ AU yr⁻², log-log; the dashed line is perfect prediction).

# %%
for r in runs:
    predictions = {name: report.force_predictions(v.dir) for name, v in r.variants.items()}
    fig = report.fig_force_predictions({n: p for n, p in predictions.items() if p})
    display(Markdown(f"**{r.dir.name}**"))
    if fig is not None:
        display(Image(data=report.figure_png(fig)))
        continue
    # no prediction table in the run folder: the probe stage's own figure, per variant
    for name, v in r.variants.items():
        png = report.force_prediction_figure(v)
        if png is not None:
            display(Markdown(f"*{name}* (fine-tuned head, 2-NN oracle where run)"))
            display(Image(filename=str(png)))
        else:
            print(f"{name}: no force predictions saved")

# %% [markdown]
# ## Validation loss against sequence length
# Loss (nats per token) at k× the training context, for orbits and text; for a sweep, the mean across
# seeds with the standard deviation as error bars.

# %%
series, errors = report.loss_series(result)
fig = report.fig_length_extrapolation(series, errors=errors)
if fig is not None:
    display(Image(data=report.figure_png(fig)))
else:
    print("no length-extrapolation results (pretraining has not finished)")

# %% [markdown]
# ## Linear probes: what the layers encode
# Held-out R² of ridge probes from each layer's activations to force and orbit quantities.

# %%
for r in runs:
    fig = report.fig_probe_r2({n: (v.probes or {}).get("linear") or {} for n, v in r.variants.items()})
    if fig is not None:
        display(Markdown(f"**{r.dir.name}**"))
        display(Image(data=report.figure_png(fig)))
