"""The report draws every figure from the numbers the stages write (issue 12), and draws them readably:
every target visible, distinct colours and line styles, integer layer ticks, titles that wrap."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tomllib
from test_report_fixtures import LONG_LAW, NEWTON, PROBE_TARGETS, write_run, write_stage_numbers

from gravprobe import report

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stage_folder(tmp_path) -> Path:
    """A single-stage probe folder (config + results) holding every number file."""
    d = tmp_path / "probe"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"config": {"stage": "probe", "seed": 0,
                                                           "attention": {"name": "lssar"}},
                                                "pretrain": {"length_extrapolation": {"orbits": {"1": 1.0, "2": 1.2}}},
                                                "probes": {"attention": "lssar"}}))
    write_stage_numbers(d)
    return d


def _labels(ax) -> list[str]:
    return [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def test_draw_figures_draws_every_figure_the_numbers_allow(tmp_path):
    d = _stage_folder(tmp_path)
    written = report.draw_figures(d)
    names = sorted(p.name for p in written)
    assert names == sorted(["loss_curves.png", "length_extrapolation.png", "probes_linear.png",
                            "force_pred_vs_true.png", "equations_head.png", "equations_oracle.png"])
    for p in written:
        assert p.parent == d and p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000, p


def test_old_folders_without_number_files_still_report(tmp_path):
    """A run folder from before the stages wrote numbers: figures without numbers are skipped (the old
    stage PNG is left as it is), the report is written, nothing raises."""
    run_dir = write_run(tmp_path / "run", ["softmax"])
    vdir = run_dir / "softmax"
    (vdir / "force_predictions.csv").unlink()
    old_png = vdir / "equations_head.png"
    old_png.write_bytes(PNG_MAGIC + b"old stage figure" * 100)
    before = old_png.read_bytes()
    written = report.draw_figures(run_dir)
    assert [p.name for p in written] == ["length_extrapolation.png"]  # results.json has the numbers
    assert old_png.read_bytes() == before
    md = report.report_dir(run_dir).read_text()
    assert "Status: **complete**" in md and "softmax/equations_head.png" in md


def test_unreadable_law_file_is_skipped_with_a_warning(tmp_path, caplog):
    d = _stage_folder(tmp_path)
    np.savez(d / "laws_truth.npz", X=np.ones((4, 2)), y=np.ones(4), galaxy=np.zeros(4))  # X must be [n, 3]
    assert report.read_laws(d, "truth", {}) is None
    assert "want X [n, 3] (r, m1, m2)" in caplog.text
    assert report.law_sources(d) == ["head", "oracle", "truth"]  # found, then skipped by draw_figures


def test_probe_r2_every_target_visible_distinct_and_integer_layers(tmp_path):
    d = _stage_folder(tmp_path)
    rows = report.read_probes_linear(d / "probes_linear.csv")
    panels = report.linear_panels(rows)
    assert list(panels) == ["ridge probes", "ridge probes, untrained network"]
    fig = report.fig_probe_r2(panels)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_label() in PROBE_TARGETS]
    assert [ln.get_label() for ln in lines] == list(PROBE_TARGETS)  # every target drawn, in order
    styles = {(str(ln.get_color()), ln.get_linestyle(), ln.get_marker()) for ln in lines}
    assert len(styles) == len(PROBE_TARGETS)
    # neighbours differ in colour AND line style (grey-scale and overlap safe)
    for a, b in zip(lines, lines[1:]):
        assert a.get_color() != b.get_color() and a.get_linestyle() != b.get_linestyle()
    # -394 is not clipped silently: it sits on the floor as ▼, its value written beside it
    floor = report.R2_FLOOR
    assert ax.get_ylim()[0] < floor
    texts = [t.get_text() for t in ax.texts]
    assert "log_F_mag -394" in texts
    assert any(ln.get_marker() == "v" and list(ln.get_ydata()) == [floor] for ln in ax.get_lines())
    # the "not decodable" band is named in the one figure legend, with every target
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "not decodable (R² < 0.05)" in legend and set(PROBE_TARGETS) <= set(legend)
    # integer layer ticks
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [0.0, 1.0, 2.0]
    # the same target keeps its style in the untrained panel
    untrained = {ln.get_label(): ln.get_color() for ln in fig.axes[1].get_lines()}
    assert untrained["F_x"] == lines[0].get_color() and untrained["log_m2"] == lines[-1].get_color()


def test_law_titles_wrap_and_are_never_cut(tmp_path):
    d = _stage_folder(tmp_path)
    laws = report.read_laws(d, "head", json.loads((d / "results.json").read_text())["probes"])
    assert laws.X.shape == (60, 3) and [g["seed"] for g in laws.galaxies] == [0, 1, 2]
    fig = report.fig_laws(laws, title="lssar: fine-tuned model")
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles[0].startswith("galaxy 0: Newtonian") and titles[1].startswith("galaxy 1: not Newtonian")
    long_title = titles[1]
    assert "..." not in long_title and "…" not in long_title
    assert all(len(line) <= 38 for line in long_title.split("\n")[1:])
    # the whole law is there, only wrapped: the same characters as sympy's 4-digit form
    import sympy as sp

    syms = {n: sp.Symbol(n, positive=True) for n in ("r", "m1", "m2")}
    full = str(sp.N(sp.sympify(LONG_LAW, locals=syms), 4)).replace(" ", "")
    assert "".join(long_title.split("\n")[1:]).replace(" ", "") == full
    # a law in a symbol that is not an input gets a panel that says so
    assert "uses ['q']" in " ".join(t.get_text() for t in fig.axes[2].texts)


def test_evaluate_law_matches_numpy():
    X = np.array([[1.0, 0.5, 2.0], [2.0, 0.1, 1.0]])
    np.testing.assert_allclose(report.evaluate_law(NEWTON, X), 39.478 * X[:, 1] * X[:, 2] / X[:, 0] ** 2)
    np.testing.assert_allclose(report.evaluate_law("3.5", X), [3.5, 3.5])  # a constant law broadcasts
    with pytest.raises(ValueError, match="cannot read the law"):
        report.evaluate_law("m1 *", X)


def test_force_predictions_by_source_and_the_models_rows(tmp_path):
    d = _stage_folder(tmp_path)
    by = report.force_predictions_by_source(d)
    assert list(by) == ["fine-tuned head", "2-NN oracle"]
    assert len(by["fine-tuned head"]["true"]) == 60 and len(by["2-NN oracle"]["true"]) == 61
    head = report.force_predictions(d)  # the model's rows only, never mixed with a control's
    assert len(head["predicted"]) == 60
    assert head["predicted"][0] == pytest.approx(1.1 * head["true"][0], rel=1e-4)
    fig = report.fig_force_predictions(by)
    assert "1 ≤ 0 not shown" in fig.axes[1].get_title()
    assert "median |log₁₀ pred/true| 0.041" in fig.axes[0].get_title()  # log10(1.1)
    # the component format gives |F| as the norm
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "force_predictions.csv").write_text("fx_true,fy_true,fx_pred,fy_pred\n3,4,6,8\n")
    cols = report.force_predictions(tmp_path / "c")
    assert cols["true"] == [5.0] and cols["predicted"] == [10.0]


def test_loss_units_per_modality_and_orbit_mode():
    series = {"softmax": {"orbits": {"1": 1.0, "2": 1.5, "4": None}, "text": {"1": 3.0, "2": 3.2}},
              "lssar": {"length_extrapolation": {"orbits": {"1": 1.0, "2": 1.1, "4": 1.2}}}}
    fig = report.fig_length_extrapolation(series)
    orbits, text = fig.axes
    assert orbits.get_ylabel() == "validation loss (nats/coordinate)"
    assert text.get_ylabel() == "validation loss (nats/token)"
    assert [t.get_text() for t in orbits.get_xticklabels()] == ["1×", "2×", "4×"]
    assert "softmax (none at 4×)" in [t.get_text() for t in orbits.get_legend().get_texts()]
    cont = report.fig_length_extrapolation(series, config={"model": {"orbit_mode": "continuous"}})
    assert cont.axes[0].get_ylabel().startswith("validation loss (MSE/coordinate")
    assert report.fig_length_extrapolation({"a": {}}) is None


def test_loss_curves_one_panel_per_modality(tmp_path):
    d = _stage_folder(tmp_path)
    fig = report.fig_loss_curves(report.read_metrics(d / "metrics.csv"), title="lssar")
    assert [ax.get_title() for ax in fig.axes] == ["orbits", "text"]
    assert fig.axes[0].get_ylabel() == "loss (nats/coordinate)" and fig.axes[1].get_ylabel() == "loss (nats/token)"
    assert _labels(fig.axes[0]) == ["training batches", "validation"]
    assert fig.axes[0].get_yscale() == "linear"  # 5 → 0.83: one decade at most
    falling = [{"step": s, "split": "val", "modality": "orbits", "loss": 1.2 / (1 + s)} for s in range(0, 500, 50)]
    assert report.fig_loss_curves(falling).axes[0].get_yscale() == "log"


def test_pretrain_names_delegate_to_the_report(tmp_path):
    """``gravprobe.pretrain.evaluate``'s plot names stay for callers but draw through the report."""
    from gravprobe.pretrain import evaluate

    d = _stage_folder(tmp_path)
    out = evaluate.plot_loss_curves(d / "metrics.csv", tmp_path / "curves.png", title="x")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no length-extrapolation numbers"):
        evaluate.plot_length_extrapolation({"a": {"length_extrapolation": {}}}, tmp_path / "none.png")
    src = (ROOT / "pretrain" / "evaluate.py").read_text()
    assert "matplotlib" not in src  # one owner for figures


def test_package_installs_and_reexports_what_callers_use():
    """pyproject installs gravprobe.report (a wheel lists only named packages), and every
    ``report.<name>`` the notebook, CLI, pipeline and config use exists."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = cfg["tool"]["setuptools"]["packages"]
    for init in (ROOT / "src" / "gravprobe").glob("*/__init__.py"):
        assert f"gravprobe.{init.parent.name}" in packages, init
    used = set(re.findall(r"\breport\.([A-Za-z_]\w*)", (ROOT / "notebooks" / "analysis.py").read_text()))
    used |= {"report_dir", "main", "SweepReportCallback", "load", "STAGE_SECTIONS", "draw_figures"}
    assert used <= set(dir(report)), used - set(dir(report))
    assert set(report.__all__) <= set(dir(report))
    assert callable(report.load)  # the function, not the submodule of the same name


def test_the_probe_stages_writers_and_the_report_agree(tmp_path):
    """The files written by the probe stage's own writers (force_predictions.csv, laws_<tag>.npz) are the
    ones the report reads: every source, every galaxy's points, the head's rows for the run figure."""
    from gravprobe.probes.pipeline import SOURCE_TAGS, source_titles, write_force_predictions, write_law_data

    rng = np.random.default_rng(0)
    X = np.column_stack([rng.uniform(0.5, 5, 40), rng.uniform(1e-3, 0.1, 40), rng.uniform(0.5, 2, 40)])
    y = 39.478 * X[:, 1] * X[:, 2] / X[:, 0] ** 2
    galaxies, seeds = [np.arange(0, 20), np.arange(10, 30)], [3, 7]  # galaxies may share points
    titles = source_titles(2)
    for section in ("galaxies", "oracle"):
        write_law_data(tmp_path, SOURCE_TAGS[section], X, y, galaxies, seeds)
    write_force_predictions({titles["galaxies"]: (y, 1.1 * y), titles["oracle"]: (y, y)}, tmp_path)
    probes = {"galaxies": [{"seed": s, "expression": NEWTON, "newtonian": True} for s in seeds],
              "oracle": {"k": 2, "galaxies": [{"seed": s, "expression": NEWTON, "newtonian": True} for s in seeds]}}
    assert report.law_sources(tmp_path) == ["head", "oracle"]
    laws = report.read_laws(tmp_path, "head", probes)
    assert [int((laws.galaxy == s).sum()) for s in seeds] == [20, 20]
    np.testing.assert_allclose(report.evaluate_law(NEWTON, laws.X), laws.y)
    by = report.force_predictions_by_source(tmp_path)
    assert list(by) == [titles["galaxies"], titles["oracle"]]
    np.testing.assert_allclose(report.force_predictions(tmp_path)["predicted"], 1.1 * y)
