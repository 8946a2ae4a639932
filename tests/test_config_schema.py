"""Typed config schemas (gravprobe.config): field names equal the YAML keys, defaults are written once (the
YAML), every stage's config is validated before any work with one message naming key, value, range and fix,
and the CLI answers a misspelt key with the closest valid keys, exit code 2 and no run folder."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from importlib.resources import files

import pytest
import yaml
from hydra import compose, initialize_config_module

from gravprobe import cli, config, pipeline
from gravprobe.config import (STAGES, ConfigError, ProbeConfig, RootConfig, SRConfig, TextConfig, TrainConfig,
                              select, to_container, validate_config)

EXPERIMENTS = sorted(p.name[:-5] for p in (files("gravprobe.conf") / "experiment").iterdir()
                     if p.name.endswith(".yaml"))


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_module(version_base="1.3", config_module="gravprobe.conf"):
        yield


@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAVPROBE_HOME", str(tmp_path / "home"))


def make_cfg(*overrides: str):
    return compose("config", overrides=list(overrides))


def _yaml(rel: str) -> dict:
    raw = yaml.safe_load((files("gravprobe.conf") / rel).read_text())
    raw.pop("defaults", None)
    return raw


def _schema_keys(cls) -> dict:
    """``{field: nested keys or None}`` of a schema dataclass."""
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out[f.name] = _schema_keys(tp) if isinstance(tp, type) and issubclass(tp, config.Schema) else None
    return out


def _yaml_keys(d: dict, schema: dict) -> dict:
    return {k: (_yaml_keys(v, schema.get(k) or {}) if isinstance(schema.get(k), dict) else None) for k, v in d.items()}


@pytest.mark.parametrize("cls, rel", [(TrainConfig, "train/default.yaml"), (ProbeConfig, "probe/default.yaml"),
                                      (TextConfig, "text/stdlib.yaml"), (TextConfig, "text/files.yaml"),
                                      (TextConfig, "text/fineweb_edu.yaml")])
def test_schema_fields_are_the_yaml_keys(cls, rel):
    """Every YAML key has a typed field and every field a YAML default (the one place defaults live)."""
    schema = _schema_keys(cls)
    assert _yaml_keys(_yaml(rel), schema) == schema


def test_sr_schema_covers_both_engines_and_root_covers_config_yaml():
    sr_fields = {f.name for f in dataclasses.fields(SRConfig)}
    for rel in ("sr/default.yaml", "sr/pysr.yaml"):
        assert set(_yaml(rel)) <= sr_fields, rel
    top = {k for k in _yaml("config.yaml") if k != "hydra"}
    assert top == {f.name for f in dataclasses.fields(RootConfig)}


def test_dataclasses_hold_no_default_values():
    """Defaults are the YAML's: no schema field of train/probe/text carries a default of its own."""
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (cls, f.name)
            if isinstance(f.type, type) and issubclass(f.type, config.Schema):
                walk(f.type)
    for cls in (TrainConfig, ProbeConfig, TextConfig, RootConfig):
        walk(cls)


def test_partial_node_is_filled_from_the_yaml():
    tc = TrainConfig.from_cfg({"steps": 5, "dynamics": {"enabled": False}})
    defaults = _yaml("train/default.yaml")
    assert tc.steps == 5 and tc.batch_size == defaults["batch_size"] and tc.schedule == defaults["schedule"]
    assert tc.dynamics.enabled is False and tc.dynamics.n_val == defaults["dynamics"]["n_val"]
    assert tc.betas == tuple(defaults["betas"]) or list(tc.betas) == defaults["betas"]
    assert isinstance(tc.lr, float)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("stage", list(STAGES))
def test_every_preset_validates_for_every_stage(name, stage):
    out = validate_config(make_cfg(f"experiment={name}", f"stage={stage}"), stage, overrides=[f"experiment={name}"])
    if stage == "report":
        assert out is None
        return
    assert out.root.stage == stage
    for group in STAGES[stage].groups:
        if group != "attention":
            assert getattr(out, group) is not None, group


@pytest.mark.parametrize("stage, overrides, expected", [
    # the reports: each names the key, the value, the valid range and the fix
    ("pretrain", ["model.block_size=0"], ["model.block_size=0 must be an integer >= 2", "fix: set model.block_size"]),
    ("pretrain", ["train.batch_size=0"], ["train.batch_size=0 must be an integer >= 1", "fix: train.batch_size=32"]),
    ("pretrain", ["model.n_layers=0"], ["model.n_layers=0 must be an integer >= 1"]),
    ("pretrain", ["train.steps=-1"], ["train.steps=-1 must be an integer >= 1", "fix: train.steps=2000 (the default)"]),
    ("pretrain", ["train.lr=0"], ["train.lr=0 must be a number > 0"]),
    ("pretrain", ["train.val_fraction=1.0"], ["train.val_fraction=1.0 must be a number in [0, 1)"]),
    ("pretrain", ["train.schedule=cos"], ["train.schedule='cos'", "choose from: cosine, step, constant"]),
    ("pretrain", ["train.betas=[0.9,1.5]"], ["train.betas=[0.9, 1.5] must be a list of numbers (each in [0, 1))"]),
    ("pretrain", ["train.batch_size=10", "train.grad_accum=4"], ["train.batch_size=10 must be divisible by",
                                                                "fix: train.batch_size=8"]),
    ("pretrain", ["train.steps=true"], ["train.steps=True must be an integer >= 1"]),
    ("pretrain", ["+train.stepz=3"], ["unknown key train.stepz; did you mean train.steps"]),
    ("pretrain", ["model.d_model=30", "model.n_heads=4"], ["model.d_model=30 is not divisible by model.n_heads=4"]),
    ("pretrain", ["train.text_ratio=0.5", "text=files"], ["text.source=files but text.paths=[]"]),
    ("pretrain", ["text.tokenizer=sentencepiece"], ["text.tokenizer='sentencepiece'; choose from: byte, tiktoken"]),
    ("probe", ["probe.protocol=none"], ["probe.protocol='none'; choose from: two_label, unlabelled"]),
    ("probe", ["probe.head.protocol=scalar"], ["probe.head.protocol='scalar'; choose from: magnitude, vector"]),
    ("probe", ["probe.linear.targets=[F_mag,Fmag]"], ["unknown target(s) ['Fmag'] (Fmag: did you mean F_mag"]),
    ("probe", ["probe.selection.galaxy_size=5"], ["probe.selection.galaxy_size=5 must be an integer >= 10"]),
    ("probe", ["probe.verdict.ci=1.5"], ["probe.verdict.ci=1.5 must be a number in (0, 1)"]),
    ("probe", ["sr.backend=gplearn"], ["sr.backend='gplearn'; choose from: auto, operon, pysr"]),
    ("probe", ["+sr.options.populaton_size=3"], ["unknown key sr.options.populaton_size; did you mean "
                                                 "sr.options.population_size"]),
    ("probe", ["checkpoint=/no/such.pt"], ["checkpoint=/no/such.pt is not a file"]),
    ("generate", ["seed=-1"], ["seed=-1 must be an integer >= 0"]),
    ("generate", ["device=tpu"], ["device='tpu'; choose from: auto, cpu, cuda"]),
    ("run", ["pipeline.stop_after=probe"], ["pipeline.stop_after='probe'; choose from: null, generate, pretrain"]),
])
def test_bad_values_name_key_value_range_and_fix(stage, overrides, expected):
    with pytest.raises(ConfigError) as e:
        validate_config(make_cfg(*overrides), stage, overrides=overrides)
    for text in expected:
        assert text in str(e.value), (text, str(e.value))


def test_every_problem_at_once_and_only_the_stage_groups():
    cfg = make_cfg("train.steps=-1", "train.lr=0", "model.n_layers=0", "probe.protocol=none")
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, "pretrain")
    assert len(e.value.problems) == 3 and str(e.value).count("\n  - ") == 3
    assert "probe.protocol" not in str(e.value)          # pretrain does not read the probe group


def test_generate_ignores_the_training_groups():
    cfg = make_cfg("train.steps=-1", "model.n_layers=0", "probe.protocol=none")
    assert validate_config(cfg, "generate").data is not None
    with pytest.raises(ConfigError, match="probe.protocol"):
        validate_config(cfg, "run", overrides=[])


def test_select_and_to_container():
    cfg = make_cfg("train.seq_len=null")
    assert select(cfg, "train.seq_len", 7) is None          # a null is a value
    assert select(cfg, "train.nope", 7) == 7 and select(None, "a.b", 3) == 3
    assert select({"a": {"b": 1}}, "a.b") == 1 and select(TrainConfig.from_cfg({}), "dynamics.enabled") is True
    plain = to_container(cfg.train)
    assert isinstance(plain, dict) and isinstance(plain["betas"], list)
    assert to_container(TrainConfig.from_cfg({}))["steps"] == _yaml("train/default.yaml")["steps"]


def test_one_stage_table():
    assert cli.STAGES is config.STAGES and pipeline.STAGES is config.STAGES
    assert set(STAGES) == {"generate", "pretrain", "probe", "report", "run"}
    assert not hasattr(pipeline, "STAGE_FUNCTIONS") and not hasattr(pipeline, "_get")


def test_sr_settings_are_written_once():
    from gravprobe.attention import BackendUnavailableError
    from gravprobe.probes import symbolic

    default, pysr = _yaml("sr/default.yaml"), _yaml("sr/pysr.yaml")
    assert symbolic.OPERON_DEFAULTS == default["options"]
    assert symbolic.PYSR_DEFAULTS == pysr["options"]
    assert symbolic.REPRESENTATION_DEFAULTS["log"] == default["representation_options"]["log"]
    assert symbolic.DEFAULT_REPRESENTATIONS == tuple(default["representations"])
    assert not hasattr(symbolic, "BackendUnavailableError")
    assert not issubclass(symbolic.SymbolicBackendUnavailable, BackendUnavailableError)
    kw = SRConfig.from_cfg(make_cfg().sr).fit_kwargs(workers=3)
    assert kw["n_threads"] == 3 and kw["population_size"] == default["options"]["population_size"]
    assert SRConfig.from_cfg(make_cfg("sr=pysr").sr).fit_kwargs()["niterations"] == pysr["options"]["niterations"]


# ---------------------------------------------------------------------------------------------- CLI
def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code, capsys.readouterr().err


def test_cli_misspelt_key_suggests_the_closest(capsys, tmp_path):
    code, err = _cli(capsys, "pretrain", "data.n_sytems=10")
    assert code == 2
    assert "unknown key data.n_sytems; did you mean data.n_systems" in err
    assert "valid keys under data: " in err and "seq_len" in err
    assert "Traceback" not in err and "+data.n_sytems" not in err   # not Hydra's wrong fix
    assert not (tmp_path / "home").exists()                         # no run folder left behind


def test_cli_bad_values_one_message_exit_2(capsys, tmp_path):
    code, err = _cli(capsys, "pretrain", "model.block_size=0", "train.batch_size=0", "model.n_layers=0",
                     "train.steps=-1", "sed=1")
    assert code == 2 and "Traceback" not in err
    for key in ("model.block_size=0", "train.batch_size=0", "model.n_layers=0", "train.steps=-1",
                "unknown key sed; did you mean seed"):
        assert key in err
    assert not (tmp_path / "home").exists()


def test_cli_sweep_checks_every_value(capsys, tmp_path):
    code, err = _cli(capsys, "run", "-m", "train.steps=5,-1", "seed=0,1")
    assert code == 2
    assert "train.steps=-1 must be an integer >= 1" in err and "[in the sweep job train.steps=-1 seed=0]" in err
    code, err = _cli(capsys, "run", "-m", "attention=softmax,flash")
    assert code == 2 and "attention/flash" in err and "softmax" in err
    assert not (tmp_path / "home").exists()


def test_cli_valid_config_reaches_hydra(monkeypatch):
    import hydra

    seen = {}

    def fake_main(**kw):
        return lambda task: (lambda: seen.setdefault("argv", list(sys.argv)))

    monkeypatch.setattr(hydra, "main", fake_main)
    monkeypatch.setattr(sys, "argv", ["gravprobe"])
    cli.main(["run", "-m", "experiment=smoke", "attention=softmax,lssa", "seed=range(0,3)"])
    assert seen["argv"][1:] == ["-m", "stage=run", "experiment=smoke", "attention=softmax,lssa", "seed=range(0,3)"]
    assert cli.preflight("pretrain", ["--cfg", "job", "train.steps=-1"]) is None   # Hydra's flags pass through


def test_generate_preflight_does_not_import_torch():
    code = ("import sys; from gravprobe import cli; m = cli.preflight('generate', ['data.n_systems=10']); "
            "print(m is None, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
