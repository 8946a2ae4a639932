"""The packaged Hydra config: every experiment preset composes on CPU for every stage, sets only keys
that exist (a misspelt key in a preset would otherwise be added silently), documents its run time and
hardware, and passes the pipeline's validation; launchers compose; the CLI's overrides parse."""
from __future__ import annotations

from importlib.resources import files

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from gravprobe import pipeline

EXPERIMENTS = sorted(p.name[:-5] for p in (files("gravprobe.conf") / "experiment").iterdir()
                     if p.name.endswith(".yaml"))
STAGES = ("generate", "pretrain", "probe", "report", "run")


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_module(version_base="1.3", config_module="gravprobe.conf"):
        yield


def make_cfg(*overrides: str, hydra: bool = False):
    return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def _preset(name: str) -> tuple[list[str], dict]:
    """A preset's group overrides (``override /model: small`` → ``model=small``) and its body."""
    raw = yaml.safe_load((files("gravprobe.conf") / "experiment" / f"{name}.yaml").read_text())
    groups = []
    for entry in raw.pop("defaults", []) or []:
        if isinstance(entry, dict):
            for k, v in entry.items():
                if k.startswith("override "):
                    groups.append(f"{k.split(' ', 1)[1].lstrip('/')}={v}")
    return groups, raw


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_expected_presets_exist():
    assert {"smoke", "study", "liu_locality", "paper"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("stage", STAGES)
def test_preset_composes_for_every_stage(name, stage, monkeypatch, tmp_path):
    monkeypatch.setenv("GRAVPROBE_HOME", str(tmp_path))
    cfg = make_cfg(f"experiment={name}", f"stage={stage}", "device=cpu")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.stage == stage and cfg.device == "cpu"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_sets_only_existing_keys(name):
    groups, body = _preset(name)
    base = OmegaConf.to_container(make_cfg(*groups), resolve=False)
    for key, value in _leaves(body):
        node = base
        for part in key.split("."):
            if node is None:  # a free-form mapping slot whose default is null (e.g. report.literature)
                break
            assert isinstance(node, dict) and part in node, (
                f"experiment/{name}.yaml sets {key}, which the config does not have (misspelt?)")
            node = node[part]
    # and the composed preset really carries its values
    cfg = make_cfg(f"experiment={name}")
    for key, value in _leaves(body):
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, (key, got, value)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_documents_hardware_and_time(name):
    text = (files("gravprobe.conf") / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert "hardware:" in text and "expected run time:" in text and "command:" in text


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_passes_pipeline_validation(name, monkeypatch, tmp_path):
    monkeypatch.setenv("GRAVPROBE_HOME", str(tmp_path))
    variants = pipeline.validate(make_cfg(f"experiment={name}"), overrides=[f"experiment={name}"])
    assert variants and all(v in pipeline.attention_choices() for v in variants)


def test_smoke_compares_three_variants_at_tiny_size():
    cfg = make_cfg("experiment=smoke")
    assert pipeline.variants_of(cfg, overrides=[]) == ["softmax", "lssa", "lssar"]
    assert cfg.model.name == "tiny" and cfg.train.steps <= 100 and cfg.data.n_systems <= 1000
    assert cfg.train.text_ratio > 0  # text losses exist, so the report has both modalities


def test_paper_is_the_literature_scale():
    cfg = make_cfg("experiment=paper")
    assert (cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_model) == (12, 12, 768)
    assert cfg.data.seq_len == 1000 and cfg.force_data.n_systems == 10000
    assert cfg.force_data.labelling.full_systems == 9000
    assert cfg.probe.head.steps == 10000 and cfg.probe.selection.galaxy_size == 1000
    assert cfg.sr.backend == "pysr"


def test_bad_group_choice_lists_the_valid_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as e:
        make_cfg("attention=flash")
    assert "lssar" in str(e.value) and "softmax" in str(e.value)


def test_misspelt_key_is_rejected():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="train.stepz"):
        make_cfg("train.stepz=3")


def test_sweep_callback_and_joblib_launcher_compose(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAVPROBE_HOME", str(tmp_path))
    cfg = make_cfg("experiment=smoke", hydra=True)
    assert cfg.hydra.callbacks.sweep_report._target_ == "gravprobe.report.SweepReportCallback"
    assert "joblib" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.n_jobs == 1
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "local"


def test_submitit_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = make_cfg("experiment=paper", "hydra/launcher=submitit_slurm_gpu", hydra=True)
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_ and launcher.gpus_per_node >= 1 and launcher.timeout_min > 0


def test_cli_places_stage_before_overrides(monkeypatch):
    """`gravprobe run -m a=1` must reach Hydra as one override list (a flag must not split it)."""
    import sys

    from gravprobe import cli

    seen = {}

    def fake_main(**kw):
        def wrap(task):
            def run():
                seen["argv"] = list(sys.argv)
            return run
        return wrap

    import hydra

    monkeypatch.setattr(hydra, "main", fake_main)
    monkeypatch.setattr(sys, "argv", ["gravprobe"])
    cli.main(["run", "-m", "attention=softmax,lssa", "seed=0,1"])
    assert seen["argv"][1:] == ["-m", "stage=run", "attention=softmax,lssa", "seed=0,1"]
    cli.main(["run", "--cfg", "job"])
    assert seen["argv"][1:] == ["stage=run", "--cfg", "job"]
