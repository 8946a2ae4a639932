"""Markdown: ``report.md`` of a run or sweep folder, from the loaded results, the tables and the figures.

``render_run`` / ``render_sweep`` return the text; ``report_dir`` (in ``gravprobe.report``) writes it. The
report's own figures go to ``<folder>/figures/``; the stages' figures (drawn by ``figures.draw_figures``
into each stage folder) are linked.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .figures import (
    fig_dynamics,
    fig_force_predictions,
    force_prediction_figure,
    plot_length_extrapolation,
    plot_newtonian_counts,
    plot_probe_r2,
    save_figure,
)
from .load import RunResult, SweepResult, force_predictions
from .tables import (
    BASELINES,
    MODALITIES,
    _decodable,
    _fmt,
    _isnum,
    _length_keys,
    _mean_spread,
    _pm,
    aggregate,
    arm_of,
    dynamics_of,
    equations_table,
    format_exponent,
    learned_dynamics,
    loss_series,
    loss_unit,
    summary_table,
    sweep_overrides,
)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A list of dicts (e.g. ``equations_table``) as a Markdown table of ``columns`` (default: all keys)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def val(r: dict, c: str) -> Any:  # expressions as code, so that `*` is not read as emphasis
        v = r.get(c)
        return f"`{v}`" if c == "expression" and v is not None else v

    return "\n".join(_md_table(columns, [[val(r, c) for c in columns] for r in rows]))


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
                md += [f"Validation loss ({mod}, {loss_unit(mod, run.config)}) at k× the training length:", ""]
                md += _md_table(["variant", *[f"{k}×" for k in keys]],
                                [[n, *[(e.get(mod) or {}).get(k) for k in keys]] for n, e in ext.items()])
                md.append("")
        png = plot_length_extrapolation(ext, fig_dir / "loss_vs_length.png", config=run.config)
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
    config = sweep.runs[0].config if sweep.runs else {}
    md += [f"## Losses across seeds (mean ± sd, n; {', '.join(f'{m} in {loss_unit(m, config)}' for m in MODALITIES)})",
           ""]
    md += _md_table(["variant", *[f"{m} last" for m in MODALITIES]],
                    [[n, *[_pm(agg[n][f"loss/{m}/last"]) for m in MODALITIES]] for n in variants])
    md.append("")
    for mod in MODALITIES:
        keys = sorted({k.split("/")[2] for n in variants for k in agg[n] if k.startswith(f"extrapolation/{mod}/")},
                      key=lambda k: (float(k) if _isnum(k) else math.inf, k))
        if not keys:
            continue
        md += [f"Length extrapolation, {mod} (validation loss in {loss_unit(mod, config)} at k× training length, "
               "mean ± sd):", ""]
        md += _md_table(["variant", *[f"{k}×" for k in keys]],
                        [[n, *[_pm(agg[n].get(f"extrapolation/{mod}/{k}")) for k in keys]] for n in variants])
        md.append("")
    series, errors = loss_series(sweep)
    png = plot_length_extrapolation(series, base / "figures" / "loss_vs_length.png", errors=errors,
                                    title="mean ± sd across seeds", config=config)
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
