"""`gravprobe run` orchestration: variants, validation before work, reuse, resume, refusal of a foreign run.

The stages are replaced by fakes that write the documented results.json sections, so these tests check
the pipeline's own logic in a second; tests/test_pipeline_e2e.py runs the real stages.
"""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_report_fixtures import variant_results

from gravprobe import pipeline, report
from gravprobe.common import update_results


def make_cfg(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="gravprobe.conf"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAVPROBE_HOME", str(tmp_path / "home"))


class FakeStages:
    """Stand-ins for pretrain / probe that record their calls and write realistic sections."""

    def __init__(self, monkeypatch, interrupt: str | None = None):
        self.calls: list[str] = []
        self.interrupt = interrupt
        self.oracle_flags: dict[str, bool] = {}
        monkeypatch.setattr(pipeline, "_stage", self.get)
        monkeypatch.setattr(pipeline, "ensure_datasets", self.datasets)

    def datasets(self, cfg):
        self.calls.append("generate")
        return {"data": "/tmp/d1", "force_data": "/tmp/d2"}

    def get(self, stage):
        return self.pretrain if stage == "pretrain" else self.probe

    def pretrain(self, cfg, run_dir):
        key = f"{cfg.attention.name}/pretrain"
        self.calls.append(key)
        if key == self.interrupt:
            raise KeyboardInterrupt
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"ckpt")
        update_results(run_dir, "pretrain", variant_results(cfg.attention.name, cfg.seed, n_newton=0,
                                                            with_oracle=False)["pretrain"])
        return {}

    def probe(self, cfg, run_dir):
        name = cfg.attention.name
        self.calls.append(f"{name}/probe")
        assert cfg.checkpoint == str(run_dir / "checkpoints" / "last.pt")
        oracle = bool(OmegaConf.select(cfg, "probe.oracle.enabled", default=True))
        self.oracle_flags[name] = oracle
        probes = variant_results(name, cfg.seed, n_newton=5 if name == "lssar" else 0, with_oracle=oracle)["probes"]
        if oracle:
            probes["truth"] = probes["oracle"]
        update_results(run_dir, "probes", probes)
        return {}


def test_smoke_variants_and_attention_override_rule():
    cfg = make_cfg("experiment=smoke")
    assert pipeline.variants_of(cfg, overrides=["experiment=smoke"]) == ["softmax", "lssa", "lssar"]
    # attention= on the command line (as in `-m attention=softmax,lssa,lssar`) trains that variant alone
    cfg = make_cfg("experiment=smoke", "attention=lssa")
    assert pipeline.variants_of(cfg, overrides=["experiment=smoke", "attention=lssa"]) == ["lssa"]
    # ... unless pipeline.variants is given explicitly too
    cfg = make_cfg("attention=lssa", "pipeline.variants=[lssa,softmax]")
    assert pipeline.variants_of(cfg, overrides=["attention=lssa", "pipeline.variants=[lssa,softmax]"]) == [
        "lssa", "softmax"]
    # default: just attention.name; `all`: every packaged variant
    assert pipeline.variants_of(make_cfg(), overrides=[]) == ["lssar"]
    assert pipeline.variants_of(make_cfg("pipeline.variants=all"), overrides=[]) == pipeline.attention_choices()
    assert {"softmax", "lssa", "lssar"} <= set(pipeline.attention_choices())


def test_variant_config_uses_packaged_node_and_keeps_overrides():
    cfg = make_cfg("attention=lssar", "attention.params.sharpen_power=3")
    same = pipeline.variant_config(cfg, "lssar")
    assert same.attention.params.sharpen_power == 3  # the command line's override survives
    soft = pipeline.variant_config(cfg, "softmax")
    assert soft.attention.name == "softmax" and "sharpen_power" not in (soft.attention.get("params") or {})
    assert cfg.attention.name == "lssar"  # the original is untouched
    assert pipeline.variant_config(make_cfg("attention.backend=torch"), "lssa").attention.backend == "torch"
    assert soft.model == cfg.model and soft.seed == cfg.seed


@pytest.mark.parametrize("overrides, message", [
    (["pipeline.variants=[softmax,flash]"], "unknown attention variant 'flash'"),
    (["pipeline.variants=[]"], "pipeline.variants is empty"),
    (["pipeline.variants=[lssa,lssa]"], "names a variant twice"),
    (["model.d_model=30", "model.n_heads=4"], "not divisible"),
    (["train.steps=0"], "train.steps=0 must be an integer >= 1"),
    (["++data.seq_len=1"], "data.seq_len=1 must be an integer >= 2"),
    (["checkpoint=/x.pt"], "checkpoint= is for `gravprobe probe`"),
    (["model.position=alibi"], "unknown model.position='alibi'; choose one of"),
    (["pipeline.stop_after=probe"], "pipeline.stop_after='probe'; choose from: null, generate, pretrain"),
    (["force_data.labelling.full_systems=null"], "leaves no partially labelled sequences"),
    (["force_data.n_systems=20", "force_data.labelling.full_systems=18", "force_data.seq_len=11"],
     "fewer than one galaxy of probe.selection.galaxy_size=1000"),
    (["probe.selection.galaxy_size=6000"], "exceeds probe.selection.n_keep=5000"),
    (["force_data.arrays=[tokens,bodies]"], "leaves out ['states', 'forces', 'labelled'], which the probes read"),
    (["model.orbit_mode=continuous", "data.arrays=[tokens]"], "leaves out ['positions'], which model.orbit_mode"),
    (["data.arrays=[tokens,velocities]"], "data: data.arrays names unknown arrays ['velocities']"),
    # the crash after 36 minutes of training: force data longer than a learned-position context
    (["model.position=learned", "model.block_size=200", "data.seq_len=201", "force_data.seq_len=1000"],
     "force_data.seq_len=1000 tokens exceeds model.block_size=200 of a learned-position model"),
])
def test_bad_overrides_fail_before_any_work(monkeypatch, tmp_path, overrides, message):
    fake = FakeStages(monkeypatch)
    cfg = make_cfg(*overrides)
    with pytest.raises(pipeline.PipelineConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        pipeline.main(cfg, tmp_path / "run")
    assert fake.calls == []  # nothing generated or trained
    if "attention variant" in message or "is empty" in message:
        assert "choose from: " in str(e.value) and "lssar" in str(e.value)


def test_full_run_then_reuse_then_partial_redo(monkeypatch, tmp_path):
    fake = FakeStages(monkeypatch)
    cfg = make_cfg("experiment=smoke")
    run_dir = tmp_path / "run"
    state = pipeline.main(cfg, run_dir)
    assert fake.calls == ["generate", "softmax/pretrain", "softmax/probe", "lssa/pretrain", "lssa/probe",
                          "lssar/pretrain", "lssar/probe"]
    assert state["complete"] and state["variants"] == ["softmax", "lssa", "lssar"]
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res) >= {"config", "pipeline"} and res["pipeline"]["complete"]
    assert set(res["pipeline"]["timings_s"]) >= {"generate", "softmax/pretrain", "lssar/probe"}
    for v in ("softmax", "lssa", "lssar"):
        assert (run_dir / v / "config.yaml").exists()
        assert OmegaConf.load(run_dir / v / "config.yaml").attention.name == v
    run = report.load(run_dir)
    assert run.complete, run.problems
    assert "Status: **complete**" in (run_dir / "report.md").read_text()

    # again in the same folder: everything is reused
    fake.calls.clear()
    pipeline.main(cfg, run_dir)
    assert fake.calls == ["generate"]
    assert json.loads((run_dir / "results.json").read_text())["pipeline"]["stages"]["lssa/pretrain"] == "reused"

    # a lost probes section is redone, and only that
    res = json.loads((run_dir / "lssa" / "results.json").read_text())
    res.pop("probes")
    (run_dir / "lssa" / "results.json").write_text(json.dumps(res))
    fake.calls.clear()
    pipeline.main(cfg, run_dir)
    assert fake.calls == ["generate", "lssa/probe"]


def test_oracle_runs_once(monkeypatch, tmp_path):
    fake = FakeStages(monkeypatch)
    cfg = make_cfg("experiment=smoke", "pipeline.report=false")
    assert cfg.probe.oracle.enabled
    pipeline.main(cfg, tmp_path / "run")
    assert fake.oracle_flags == {"softmax": True, "lssa": False, "lssar": False}
    assert report.load(tmp_path / "run").oracle  # the report finds it in the first variant
    assert cfg.probe.oracle.enabled  # the caller's config is untouched


def test_probes_interrupted_before_the_oracle_are_redone(monkeypatch, tmp_path):
    fake = FakeStages(monkeypatch)
    cfg = make_cfg("experiment=smoke", "pipeline.report=false")
    run_dir = tmp_path / "run"
    pipeline.main(cfg, run_dir)
    res = json.loads((run_dir / "softmax" / "results.json").read_text())
    res["probes"].pop("oracle")  # as the probe stage leaves it when killed after the model's galaxies
    (run_dir / "softmax" / "results.json").write_text(json.dumps(res))
    fake.calls.clear()
    pipeline.main(cfg, run_dir)
    assert fake.calls == ["generate", "softmax/probe"]


def test_interrupted_run_resumes(monkeypatch, tmp_path):
    fake = FakeStages(monkeypatch, interrupt="lssa/pretrain")
    cfg = make_cfg("experiment=smoke", "pipeline.report=false")
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(cfg, run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["pipeline"]["complete"] is False
    assert res["pipeline"]["stages"]["softmax/probe"] == "done"
    run = report.load(run_dir)
    assert not run.complete and any(p.startswith("lssa: pretrain missing") for p in run.problems)
    fake.interrupt = None
    fake.calls.clear()
    pipeline.main(cfg, run_dir)
    assert fake.calls == ["generate", "lssa/pretrain", "lssa/probe", "lssar/pretrain", "lssar/probe"]
    assert report.load(run_dir).complete


def test_refuses_a_folder_of_another_run(monkeypatch, tmp_path):
    FakeStages(monkeypatch)
    run_dir = tmp_path / "run"
    pipeline.main(make_cfg("experiment=smoke", "pipeline.report=false"), run_dir)
    with pytest.raises(pipeline.PipelineConfigError, match=r"different config \(seed: 0 -> 1"):
        pipeline.main(make_cfg("experiment=smoke", "seed=1"), run_dir)
    # what does not change results may differ (workers, device)
    pipeline.main(make_cfg("experiment=smoke", "workers=1", "device=cpu", "pipeline.report=false"), run_dir)


def test_a_stage_that_writes_nothing_is_an_error(monkeypatch, tmp_path):
    fake = FakeStages(monkeypatch)
    monkeypatch.setattr(fake, "probe", lambda cfg, run_dir: {})
    with pytest.raises(RuntimeError, match="lssar/probe returned without writing 'probes'"):
        pipeline.main(make_cfg(), tmp_path / "run")


def test_stop_after(monkeypatch, tmp_path):
    fake = FakeStages(monkeypatch)
    state = pipeline.main(make_cfg("experiment=smoke", "pipeline.stop_after=generate", "pipeline.report=false"),
                          tmp_path / "run")
    assert fake.calls == ["generate"] and state["complete"] is False
    fake.calls.clear()
    state = pipeline.main(make_cfg("experiment=smoke", "pipeline.stop_after=pretrain", "pipeline.report=false"),
                          tmp_path / "run")
    assert fake.calls == ["generate", "softmax/pretrain", "lssa/pretrain", "lssar/pretrain"]
    assert state["complete"] is False
    fake.calls.clear()
    assert pipeline.main(make_cfg("experiment=smoke", "pipeline.report=false"), tmp_path / "run")["complete"]
    assert fake.calls == ["generate", "softmax/probe", "lssa/probe", "lssar/probe"]


def test_refuses_to_run_under_torchrun(monkeypatch, tmp_path):
    fake = FakeStages(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(pipeline.PipelineConfigError, match="torchrun --nproc_per_node=N -m gravprobe.cli pretrain"):
        pipeline.main(make_cfg(), tmp_path / "run")
    assert fake.calls == []


def test_a_subset_of_probes_is_complete(monkeypatch, tmp_path):
    """Only linear probes asked for: the probe stage is complete once they are written (no SR results)."""
    fake = FakeStages(monkeypatch)

    def linear_only(cfg, run_dir):
        fake.calls.append(f"{cfg.attention.name}/probe")
        update_results(run_dir, "probes", {"linear": {"F_mag": {"0": 0.1}}, "galaxies": []})
        return {}

    monkeypatch.setattr(fake, "probe", linear_only)
    cfg = make_cfg("experiment=smoke", "pipeline.report=false", "probe.head.enabled=false",
                   "probe.oracle.enabled=false")
    assert pipeline.main(cfg, tmp_path / "run")["complete"]
    fake.calls.clear()
    pipeline.main(cfg, tmp_path / "run")
    assert fake.calls == ["generate"]  # reused


def test_pretrained_run_can_be_probed_with_other_probe_settings(monkeypatch, tmp_path):
    """stop_after=pretrain, then probe with changed probe/sr keys: allowed until a variant has been probed."""
    fake = FakeStages(monkeypatch)
    run_dir = tmp_path / "run"
    pipeline.main(make_cfg("experiment=smoke", "pipeline.stop_after=pretrain", "pipeline.report=false"), run_dir)
    fake.calls.clear()
    pipeline.main(make_cfg("experiment=smoke", "pipeline.report=false", "probe.head.steps=7"), run_dir)
    assert fake.calls == ["generate", "softmax/probe", "lssa/probe", "lssar/probe"]
    with pytest.raises(pipeline.PipelineConfigError, match="probe.head.steps: 7 -> 8"):
        pipeline.main(make_cfg("experiment=smoke", "pipeline.report=false", "probe.head.steps=8"), run_dir)
    with pytest.raises(pipeline.PipelineConfigError, match="train.steps"):
        pipeline.main(make_cfg("experiment=smoke", "pipeline.report=false", "probe.head.steps=7",
                               "train.steps=31"), run_dir)


def test_variant_config_carries_the_window():
    cfg = make_cfg("experiment=smoke", "attention=softmax", "attention.window=3")
    assert pipeline.variant_config(cfg, "lssar").attention.window == 3
    assert pipeline.variant_config(make_cfg("experiment=smoke"), "lssa").attention.window is None
