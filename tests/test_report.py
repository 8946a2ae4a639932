"""The report, from files alone: complete and incomplete runs, single-stage runs, and sweeps."""
from __future__ import annotations

import json
import statistics

import pytest
from test_report_fixtures import LENGTHS, write_run, write_sweep

from gravprobe import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_ok(path):
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_complete_run_report(tmp_path):
    run_dir = write_run(tmp_path / "run", ["softmax", "lssa", "lssar"], seed=3, n_newton={"lssar": 5, "lssa": 2})
    out = report.report_dir(run_dir)
    assert out == run_dir / "report.md"
    md = out.read_text()
    assert "Status: **complete**" in md
    # the summary: per variant losses at 1x and 16x, best log|F| probe (0.47, not F_mag's 0.48), Newton
    # count; the oracle's count
    summary = md.split("## Summary", 1)[1].split("##", 1)[0]
    assert "orbits loss 16×" in summary
    assert "| lssar | — | 3.300 | 3.500 | 4.300 | 4.500 | 0.470 | 5/5 |" in summary
    assert "| oracle | — | — | — | — | — | — | 5/5 |" in summary
    # every variant's galaxies, with their verdict counts, and the oracle's row
    assert "**softmax** — newtonian in 0 of 5 galaxies" in md
    assert "**lssa** — newtonian in 2 of 5 galaxies" in md
    assert "**lssar** — newtonian in 5 of 5 galaxies" in md
    assert "**oracle** (2-NN on the true state) — newtonian in 5 of 5 galaxies" in md
    assert md.count("`cos(cos(2.19*m1))`") == 5 + 3  # softmax 5, lssa 3 non-newtonian galaxies
    assert "-2.00 [-2.01, -1.99]" in md  # exponent with its confidence interval
    # loss vs length tables for both modalities, with every length
    # (units per modality, issue 12: a discrete orbit model's loss is per coordinate, text's per token)
    assert "Validation loss (orbits, nats/coordinate)" in md and "Validation loss (text, nats/token)" in md
    assert "orbits, nats/token" not in md
    assert all(f"{k}×" in md for k in LENGTHS)
    # probe R² per layer table
    assert "| target | L0 | L1 | L2 |" in md
    # the config, and the plots
    assert "resolved config" in md and "seed: 3" in md
    assert _png_ok(run_dir / "figures" / "loss_vs_length.png")
    assert _png_ok(run_dir / "figures" / "probe_r2.png")
    assert _png_ok(run_dir / "figures" / "force_pred_vs_true.png")
    assert "](figures/loss_vs_length.png)" in md and "](figures/force_pred_vs_true.png)" in md


def test_report_is_rebuilt_from_files_alone(tmp_path):
    run_dir = write_run(tmp_path / "run", ["softmax", "lssar"])
    first = report.report_dir(run_dir).read_text()
    (run_dir / "report.md").unlink()
    for p in (run_dir / "figures").iterdir():
        p.unlink()
    assert report.report_dir(run_dir).read_text() == first
    assert _png_ok(run_dir / "figures" / "loss_vs_length.png")


@pytest.mark.parametrize("drop, expect", [
    ({"lssar": "probes"}, "lssar: probes missing"),
    ({"lssar": "pretrain"}, "lssar: pretrain missing"),
    ({"lssa": "folder"}, "lssa: folder lssa/ missing"),
])
def test_incomplete_run_is_reported_not_skipped(tmp_path, drop, expect):
    run_dir = write_run(tmp_path / "run", ["softmax", "lssa", "lssar"], drop=drop)
    run = report.load(run_dir)
    assert not run.complete
    assert any(expect in p for p in run.problems), run.problems
    md = report.report_dir(run_dir).read_text()
    assert "Status: **incomplete**" in md and expect in md
    # the variants that did finish are still reported in full
    assert "**softmax** — newtonian in 0 of 5 galaxies" in md


def test_missing_checkpoint_and_oracle_are_problems(tmp_path):
    run_dir = write_run(tmp_path / "run", ["lssar", "softmax"])
    (run_dir / "softmax" / "checkpoints" / "last.pt").unlink()
    res = json.loads((run_dir / "lssar" / "results.json").read_text())
    res["probes"].pop("oracle")
    (run_dir / "lssar" / "results.json").write_text(json.dumps(res))
    problems = report.load(run_dir).problems
    assert any("softmax: checkpoint missing" in p for p in problems)
    assert any("oracle missing" in p for p in problems)


def test_empty_run_folder_is_incomplete(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.yaml").write_text("stage: run\nseed: 0\nattention: {name: lssar}\npipeline: {variants: null}\n")
    run = report.load(d)
    assert not run.complete
    assert any("results.json missing" in p for p in run.problems)
    assert any("lssar: folder lssar/ missing" in p for p in run.problems)
    assert "incomplete" in report.report_dir(d).read_text()


def test_single_stage_pretrain_folder(tmp_path):
    d = tmp_path / "pre"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "last.pt").write_bytes(b"x")
    from test_report_fixtures import variant_results

    res = variant_results("lssa", 0, n_newton=0, with_oracle=False)
    (d / "results.json").write_text(json.dumps({"config": {"stage": "pretrain", "seed": 0,
                                                           "attention": {"name": "lssa"}},
                                                "pretrain": res["pretrain"]}))
    run = report.load(d)
    assert run.stage == "pretrain" and list(run.variants) == ["lssa"] and run.complete
    md = report.report_dir(d).read_text()
    assert "## Pretraining" in md and "Recovered force laws" not in md


def test_sweep_aggregates_across_seeds(tmp_path):
    sweep_dir = write_sweep(tmp_path / "sweep", variants=("softmax", "lssar"), seeds=(0, 1, 2))
    sweep = report.load(sweep_dir)
    assert isinstance(sweep, report.SweepResult) and len(sweep.runs) == 6 and sweep.complete
    agg = report.aggregate(sweep)
    # mean ± sample sd of the final orbit loss across the three seeds, checked independently
    for name in ("softmax", "lssar"):
        lasts = [json.loads((r.dir / name / "results.json").read_text())["pretrain"]["loss"]["orbits"]["last"]
                 for r in sweep.runs if name in r.variants]
        assert agg[name]["loss/orbits/last"]["mean"] == pytest.approx(statistics.mean(lasts))
        assert agg[name]["loss/orbits/last"]["std"] == pytest.approx(statistics.stdev(lasts))
        assert agg[name]["loss/orbits/last"]["n"] == 3
        assert agg[name]["seeds"] == [0, 1, 2]
    assert agg["lssar"]["extrapolation/orbits/16"]["mean"] < agg["softmax"]["extrapolation/orbits/16"]["mean"]
    assert (agg["lssar"]["newtonian"], agg["lssar"]["galaxies"]) == (12, 15)
    assert (agg["softmax"]["newtonian"], agg["softmax"]["galaxies"]) == (0, 15)
    assert (agg["oracle"]["newtonian"], agg["oracle"]["galaxies"]) == (30, 30)

    md = report.report_dir(sweep_dir).read_text()
    assert "Status: **complete**" in md
    assert "| lssar | 12 | 15 |" in md and "| softmax | 0 | 15 |" in md
    assert "swept: attention, seed" in md
    assert _png_ok(sweep_dir / "figures" / "loss_vs_length.png")
    assert _png_ok(sweep_dir / "figures" / "newtonian_counts.png")
    # each run got its own report, linked from the sweep's
    assert all((r.dir / "report.md").exists() for r in sweep.runs)
    assert "0_run_attention=softmax,seed=0/report.md" in md
    # every galaxy of every run is listed
    assert len(report.equations_table(sweep)) == 6 * 5 + 6 * 5  # variants + oracle rows


def test_sweep_with_an_incomplete_job(tmp_path):
    sweep_dir = write_sweep(tmp_path / "sweep", seeds=(0, 1), drop_job=3)
    (sweep_dir / "stray").mkdir()
    sweep = report.load(sweep_dir)
    assert not sweep.complete
    md = report.report_dir(sweep_dir).read_text()
    assert "Status: **incomplete**" in md
    line = next(ln for ln in md.splitlines() if "3_run_attention=lssar,seed=1`:" in ln)
    assert "lssar: probes missing" in line
    assert "stray/ is not a run folder" in md
    agg = report.aggregate(sweep)
    assert agg["lssar"]["galaxies"] == 5 and agg["lssar"]["complete_runs"] == 1


def test_equations_table_rows(tmp_path):
    run_dir = write_run(tmp_path / "run", ["softmax", "lssar"], n_newton={"lssar": 3})
    rows = report.equations_table(report.load(run_dir))
    assert [r["model"] for r in rows] == ["softmax"] * 5 + ["lssar"] * 5 + ["oracle"] * 5
    assert sum(r["newtonian"] for r in rows if r["model"] == "lssar") == 3
    assert rows[0]["exp_r"] == "-0.31 [-0.50, -0.10]"


def test_force_predictions_loader(tmp_path):
    run_dir = write_run(tmp_path / "run", ["softmax"])
    cols = report.force_predictions(run_dir / "softmax")
    assert len(cols["true"]) == 100 and len(cols["predicted"]) == 100
    assert report.force_predictions(tmp_path) is None


def test_bad_paths_raise_clear_errors(tmp_path):
    with pytest.raises(report.ReportError, match="does not exist"):
        report.report_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="neither a run folder"):
        report.report_dir(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(report.ReportError, match="not valid JSON"):
        report.report_dir(bad)


def test_cli_report_dir_and_hydra_form(tmp_path, capsys, monkeypatch):
    from omegaconf import OmegaConf

    from gravprobe import cli

    run_dir = write_run(tmp_path / "0_run_attention=lssar,seed=0", ["lssar"])  # a sweep job's folder name
    cli.main(["report", str(run_dir)])
    assert str(run_dir / "report.md") in capsys.readouterr().out
    (run_dir / "report.md").unlink()
    out = report.main(OmegaConf.create({"report": {"source": str(run_dir)}}), tmp_path / "hydra_run")
    assert out["report"] == str(run_dir / "report.md") and (run_dir / "report.md").exists()
    with pytest.raises(report.ReportError, match="report.source"):
        report.main(OmegaConf.create({"report": {"source": None}}), tmp_path)


def test_sweep_callback_writes_sweep_report(tmp_path):
    from omegaconf import OmegaConf

    sweep_dir = write_sweep(tmp_path / "sweep", seeds=(0,))
    cfg = OmegaConf.create({"stage": "run", "hydra": {"sweep": {"dir": str(sweep_dir)}}})
    report.SweepReportCallback().on_multirun_end(cfg)
    assert "gravprobe sweep report" in (sweep_dir / "report.md").read_text()
    # a `generate` sweep gets no report
    other = tmp_path / "gen"
    other.mkdir()
    report.SweepReportCallback().on_multirun_end(
        OmegaConf.create({"stage": "generate", "hydra": {"sweep": {"dir": str(other)}}}))
    assert not (other / "report.md").exists()


def test_latest_skips_folders_without_results(tmp_path):
    import os
    import time

    older = write_run(tmp_path / "runs" / "2026-01-01" / "10-00-00_run", ["lssar"])
    failed = tmp_path / "runs" / "2026-01-01" / "11-00-00_run"
    failed.mkdir(parents=True)
    (failed / "config.yaml").write_text("stage: run\n")
    now = time.time()
    os.utime(older, (now - 100, now - 100))
    assert report.latest(tmp_path) == older
    with pytest.raises(report.ReportError, match="no run or sweep folders"):
        report.latest(tmp_path / "empty")


def _dynamics(beats: bool, model_loss: float) -> dict:
    base = {"copy_previous": {"loss": 3.0, "next_position_error_au": 0.3},
            "constant_velocity": {"loss": 1.6, "next_position_error_au": 0.02},
            "constant_acceleration": {"loss": 1.4, "next_position_error_au": 0.01,
                                      "rollout_error_au": {"1": 0.01, "10": 0.2}}}
    return {"unit": "nats/coordinate", "model": {"loss": model_loss, "next_position_error_au": 0.005,
                                                  "next_position_r2": 0.999, "rollout_error_au": {"1": 0.005, "10": 0.1}},
            "baselines": base, "best_baseline": "constant_acceleration", "beats_best_baseline": beats,
            "verdict": "beats" if beats else "does not beat"}


def test_dynamics_section_and_uninformative_probes(tmp_path):
    """A model that does not beat the kinematic baselines is said so, and its probes are flagged."""
    run_dir = write_run(tmp_path / "run", ["softmax", "lssar"])
    for name, beats, loss in (("softmax", False, 5.0), ("lssar", True, 0.7)):
        res = json.loads((run_dir / name / "results.json").read_text())
        res["pretrain"]["dynamics"] = _dynamics(beats, loss)
        res["pretrain"]["arm"] = "lssar p=3" if name == "lssar" else name
        (run_dir / name / "results.json").write_text(json.dumps(res))
    md = report.report_dir(run_dir).read_text()
    dyn = md.split("## Did the model learn the dynamics?", 1)[1].split("\n## ", 1)[0]
    assert "| softmax | 5.000 | 3.000 | 1.600 | 1.400 |" in dyn and "**no**" in dyn
    assert "| lssar | 0.700 |" in dyn and "**yes**" in dyn
    assert "0.100 vs 0.200 (10 steps)" in dyn
    assert (run_dir / "figures" / "dynamics_vs_baselines.png").stat().st_size > 1000
    assert "**Uninformative for softmax:**" in md and "Uninformative for softmax, lssar" not in md
    summary = md.split("## Summary", 1)[1].split("##", 1)[0]
    assert "| softmax | no (probes uninformative) |" in summary and "| lssar | yes |" in summary
    agg = report.aggregate(report.load(run_dir))
    assert set(agg) >= {"softmax", "lssar p=3"}  # arms, not variant names
    assert agg["softmax"]["learned_dynamics"] == 0 and agg["lssar p=3"]["learned_dynamics"] == 1
    assert agg["softmax"]["galaxies_informative"] == 0 and agg["lssar p=3"]["galaxies_informative"] == 5


def test_arm_label():
    assert report.arm_label({"name": "softmax", "window": None}) == "softmax"
    assert report.arm_label({"name": "softmax", "window": 2}) == "softmax w=2"
    assert report.arm_label({"name": "lssar", "params": {"sharpen_power": 3}}) == "lssar p=3"


def test_sweep_prints_the_literature_beside_ours(tmp_path):
    from test_report_fixtures import write_sweep

    sweep = write_sweep(tmp_path / "sweep", variants=("softmax",), seeds=(0, 1))
    for i, d in enumerate(sorted(p for p in sweep.iterdir() if p.is_dir())):
        res = json.loads((d / "results.json").read_text())
        res["config"]["report"] = {"literature": {"softmax": {"F_mag": 0.96}, "softmax w=2": {"F_mag": 1.0}}}
        (d / "results.json").write_text(json.dumps(res))
        vres = json.loads((d / "softmax" / "results.json").read_text())
        vres["probes"]["readouts"] = {"best": {"F_mag": {"r2": 0.90 + 0.02 * i, "untrained_r2": 0.5}}}
        (d / "softmax" / "results.json").write_text(json.dumps(vres))
    md = report.report_dir(sweep).read_text()
    lit = md.split("## The literature beside ours", 1)[1].split("\n## ", 1)[0]
    assert "| softmax | F_mag | 0.960 | 0.910 ± 0.014 (n=2) | 0.500 ± 0.000 (n=2) |" in lit
    assert "| softmax w=2 | F_mag | 1.000 | not run | — |" in lit


def test_negative_probe_r2_reads_not_decodable(tmp_path):
    run_dir = write_run(tmp_path / "run", ["softmax"])
    res = json.loads((run_dir / "softmax" / "results.json").read_text())
    res["probes"]["linear"]["log_F_mag"] = {"0": -394.0, "1": -0.2, "2": 0.01}
    (run_dir / "softmax" / "results.json").write_text(json.dumps(res))
    md = report.report_dir(run_dir).read_text()
    assert "| log_F_mag | not decodable (-394.00) | not decodable (-0.20) | not decodable (0.01) |" in md
    summary = md.split("## Summary", 1)[1].split("##", 1)[0]
    assert "-394" not in summary  # the best layer of log|F| is 0.01: not decodable
    assert "not decodable (0.01)" in summary
