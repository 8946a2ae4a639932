"""`gravprobe run`: the whole experiment in one command — generate → pretrain → probe → report.

``main(cfg, run_dir)`` (the ``run`` stage):

1. **validate** the config before any work (``validate``): unknown attention variants, impossible sizes,
   a force dataset too small for the probes' selection — every problem at once, with the valid choices;
2. **generate** the pretraining dataset ``cfg.data`` and the probing dataset ``cfg.force_data`` with
   ``gravprobe.orbits.ensure_dataset`` under ``${home}/data/<name>-<spec hash>-s<seed>`` (or ``out=`` /
   ``force_out=``; the same folders ``generate``, ``pretrain`` and ``probe`` use; a dataset that
   exists and verifies is reused, an interrupted one is resumed);
3. for each attention variant (``variants_of``), in ``run_dir/<variant>/``: **pretrain**
   (``gravprobe.pretrain.train.main``; resumes from ``checkpoints/last.pt``) and **probe**
   (``gravprobe.probes.pipeline.main``; the oracle, which does not depend on the model, only for the
   first variant). A variant whose results are already complete is reused, not redone;
4. **report**: ``report.md`` + figures (``gravprobe.report.report_dir``).

Which variants: ``pipeline.variants`` (a list; ``null`` = ``[attention.name]``; ``all`` = every variant).
An ``attention=X`` given on the command line selects X alone even when an experiment preset lists
several, so ``gravprobe run -m experiment=smoke attention=softmax,lssa,lssar`` trains one variant per
job; ``pipeline.variants=[...]`` on the command line always wins. The variant that is ``attention.name``
keeps ``cfg.attention`` with all its overrides; the others get their packaged ``conf/attention/<name>.yaml``.

Scale: ``gravprobe run`` is one process (it refuses to start under ``torchrun``); a sweep spreads runs
over processes or cluster nodes (``-m``, ``hydra/launcher=submitit_slurm_gpu``); multi-GPU training of
one variant is ``torchrun … -m gravprobe.cli pretrain``, then ``gravprobe probe``.

Resuming: a killed run continues where it stopped when started again in the same folder —
``gravprobe run <same overrides> hydra.run.dir=<run folder>`` (the log prints this command at start).
Datasets are shared between runs anyway. A run folder that holds a run of a different config is refused.
"""
from __future__ import annotations

import copy
import importlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from gravprobe.common import atomic_write_bytes, update_results
from gravprobe.config import (STAGES, ConfigError, attention_choices, probe_size_problems,  # noqa: F401
                              select, sequence_length_problems, to_container, validate_config, variants_of)

log = logging.getLogger(__name__)

#: config keys that may differ when a run folder is resumed (they do not change any result)
RESUME_IGNORED_KEYS = ("stage", "workers", "threads", "device", "home", "out", "force_out", "report", "pipeline.report",
                       "pipeline.stop_after", "train.stop_at")

#: A config the pipeline cannot run; the message lists every problem and how to fix it (the name the
#: pipeline has always raised; it is :class:`gravprobe.config.ConfigError`).
PipelineConfigError = ConfigError


# ------------------------------------------------------------------------------------------ variants
def _cli_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (``[]`` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return [str(o) for o in HydraConfig.get().overrides.task]
    return []


def variant_config(cfg: DictConfig, name: str) -> DictConfig:
    """A copy of ``cfg`` whose ``attention`` node is variant ``name``.

    ``cfg.attention`` itself when it already is ``name`` (keeping its overrides), otherwise the packaged
    ``conf/attention/<name>.yaml`` (``hydra.compose`` cannot run inside a running Hydra app) with
    ``cfg.attention.backend`` carried over.
    """
    from importlib.resources import files

    out = copy.deepcopy(cfg)
    if str(cfg.attention.name) == name:
        return out
    path = files("gravprobe.conf") / "attention" / f"{name}.yaml"
    if not path.is_file():
        raise PipelineConfigError(f"unknown attention variant {name!r}; choose from: "
                                  f"{', '.join(attention_choices())}")
    node = OmegaConf.create(path.read_text())
    if "backend" in cfg.attention and "backend" in node:
        node.backend = cfg.attention.backend  # the backend choice (e.g. attention.backend=torch) is for all
    if cfg.attention.get("window") is not None and node.get("window") is None:
        node.window = cfg.attention.window    # so is a context window (attention.window=W on the command line)
    with open_dict(out):
        out.attention = node
    return out


# ---------------------------------------------------------------------------------------- validation
def validate(cfg: DictConfig, overrides: list[str] | None = None) -> list[str]:
    """Check everything the pipeline can check before any work (:func:`gravprobe.config.validate_config`
    for the ``run`` stage); return the variants. Raises ``ConfigError`` naming every problem at once."""
    return validate_config(cfg, "run", overrides=_cli_overrides() if overrides is None else overrides).variants


# ------------------------------------------------------------------------------------------- running
def _stage(name: str) -> Callable[[DictConfig, Path], dict]:
    stage = STAGES[name]
    return getattr(importlib.import_module(stage.module), stage.function)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _comparable(config: dict) -> dict[str, Any]:
    flat = _flat({k: v for k, v in config.items() if k != "hydra"})
    return {k: v for k, v in flat.items()
            if not any(k == i or k.startswith(i + ".") for i in RESUME_IGNORED_KEYS)}


#: config sections that only the probe stage reads: a run may be (re-)probed with other settings as long
#: as none of its variants has finished probing (e.g. pretrain with pipeline.stop_after=pretrain, probe later)
PROBE_ONLY_KEYS = ("probe", "sr", "force_data")


def _check_same_run(resolved: dict, run_dir: Path) -> bool:
    """True when ``run_dir`` already holds this run (resume); raise if it holds a different one.

    Keys that the old config does not have at all were added by a newer gravprobe since the run started and
    are not a difference. The probe stage's own keys (``PROBE_ONLY_KEYS``) may differ while no variant of the
    run has finished probing."""
    path = run_dir / "results.json"
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text()).get("config")
    except json.JSONDecodeError:
        return False  # unreadable: the stages' own checks decide what to redo
    if not old:
        return False
    a, b = _comparable(old), _comparable(resolved)
    new_keys = sorted(set(b) - set(a))
    if new_keys:
        log.info("config keys added since this run started (not compared): %s", ", ".join(new_keys[:12]))
    probed = any(_complete(d, "probes") for d in run_dir.iterdir() if d.is_dir())
    diff = sorted(k for k in set(a) | set(b) if k in a and a.get(k) != b.get(k)
                  and (probed or not k.startswith(tuple(p + "." for p in PROBE_ONLY_KEYS))))
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:8])
        raise PipelineConfigError(
            f"{run_dir} holds a run with a different config ({shown}{', …' if len(diff) > 8 else ''}); "
            "resume it with the same overrides, or start a new run folder (drop hydra.run.dir=)")
    return True


def _complete(vdir: Path, section: str, vcfg: DictConfig | None = None) -> bool:
    """Whether ``vdir/results.json`` holds a finished ``section`` (a stage may save partial results:
    the probes save the model's galaxies before the oracle's, so the oracle's are checked too)."""
    res_path = vdir / "results.json"
    if not res_path.exists():
        return False
    try:
        res = json.loads(res_path.read_text())
    except json.JSONDecodeError:
        return False
    if not res.get(section):
        return False
    if section == "pretrain":
        return (vdir / "checkpoints" / "last.pt").exists()
    if section == "probes":
        pr = res["probes"]
        if isinstance(pr.get("requested"), list) and isinstance(pr.get("done"), list):
            # the probe stage lists what its config asked for and what it wrote (probes.pipeline.requested_parts)
            return set(pr["requested"]) <= set(pr["done"])

        def sel(key: str, default: Any) -> Any:
            return default if vcfg is None else select(vcfg, key, default)

        if sel("probe.head.enabled", True) and not pr.get("galaxies"):
            return False
        if sel("probe.oracle.enabled", False) and not (pr.get("oracle") or {}).get("galaxies"):
            return False
        if (sel("probe.oracle.enabled", False) and sel("probe.oracle.truth_control", False)
                and not (pr.get("truth") or {}).get("galaxies")):
            return False
        if sel("probe.linear.enabled", True) and "linear" not in pr:
            return False
        # a run that asks for a subset of the probes (e.g. linear probes only) is complete when that subset is
        return True
    return True


@contextmanager
def _timed(timings: dict, key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - t0, 2)


def _resume_command(run_dir: Path) -> str:
    ov = [o for o in _cli_overrides() if not o.startswith(("stage=", "hydra.run.dir="))]
    return " ".join(["gravprobe run", *ov, f"hydra.run.dir={run_dir}"])


def ensure_datasets(cfg: DictConfig) -> dict[str, str]:
    """Generate (or reuse / resume) ``cfg.data`` and ``cfg.force_data``; return their folders."""
    from gravprobe.orbits import config_dataset_path, ensure_dataset

    folders = {key: config_dataset_path(cfg, key) for key in ("data", "force_data")}
    (spec_d, path_d), (spec_f, path_f) = folders["data"], folders["force_data"]
    if path_d == path_f and spec_d.spec_hash() != spec_f.spec_hash():
        raise PipelineConfigError(f"data and force_data are different datasets but both go to {path_d} "
                                  "(out= and force_out= name the same folder); give them different folders")
    out = {}
    for key, (spec, path) in folders.items():
        log.info("dataset %s (%s): %s", key, spec.name, path)
        out[key] = str(ensure_dataset(spec, path, seed=int(cfg.seed), workers=int(cfg.workers)))
    return out


def main(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or resume) the whole pipeline in ``run_dir``; return ``results.json['pipeline']``."""
    run_dir = Path(run_dir)
    variants = validate(cfg)
    resolved = to_container(cfg)
    resumed = _check_same_run(resolved, run_dir)
    log.info("%s run in %s: variants %s", "resuming" if resumed else "starting", run_dir, ", ".join(variants))
    log.info("if interrupted, resume with: %s", _resume_command(run_dir))
    previous = (_read_results(run_dir).get("pipeline") or {}) if resumed else {}
    update_results(run_dir, "config", resolved)
    # timings of stages finished by an earlier invocation are kept (a reused stage costs nothing now)
    state: dict[str, Any] = {"variants": variants, "datasets": {}, "oracle_variant": variants[0],
                             "stages": {}, "timings_s": dict(previous.get("timings_s") or {}), "complete": False}

    def save() -> None:
        update_results(run_dir, "pipeline", state)

    try:
        state["complete"] = _run_stages(cfg, run_dir, variants, state, save)
        save()
    except KeyboardInterrupt:
        log.warning("interrupted; resume with: %s", _resume_command(run_dir))
        save()
        raise
    if bool(select(cfg, "pipeline.report", True)):
        from gravprobe.report import report_dir

        out = report_dir(run_dir)
        state["stages"]["report"] = "done"
        save()
        log.info("report%s: %s", "" if state["complete"] else " (incomplete run)", out)
    return state


def _read_results(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _run_stages(cfg: DictConfig, run_dir: Path, variants: list[str], state: dict, save: Callable[[], None]) -> bool:
    """generate, then per variant pretrain and probe; False when a planned stop (train.stop_at) ended early."""
    with _timed(state["timings_s"], "generate"):
        state["datasets"] = ensure_datasets(cfg)
    state["stages"]["generate"] = "done"
    save()
    stop_after = select(cfg, "pipeline.stop_after")
    if stop_after == "generate":
        log.info("pipeline.stop_after=generate: datasets ready, stopping")
        return False
    for i, name in enumerate(variants):
        vdir = run_dir / name
        vdir.mkdir(parents=True, exist_ok=True)
        vcfg = variant_config(cfg, name)
        with open_dict(vcfg):
            vcfg.checkpoint = str(vdir / "checkpoints" / "last.pt")
            if i > 0 and select(vcfg, "probe.oracle.enabled") is not None:
                vcfg.probe.oracle.enabled = False  # the oracle does not depend on the model: once
                log.info("%s: the controls (oracle and its kin) are shared: computed once, with %s", name, variants[0])
        atomic_write_bytes(vdir / "config.yaml", OmegaConf.to_yaml(vcfg, resolve=True).encode())
        for stage, section in (("pretrain", "pretrain"), ("probe", "probes")):
            key = f"{name}/{stage}"
            if stage == "probe" and stop_after == "pretrain":
                continue
            if _complete(vdir, section, vcfg):
                log.info("%s: complete in %s, reused", key, vdir)
                state["stages"][key] = "reused"
                continue
            log.info("%s ...", key)
            with _timed(state["timings_s"], key):
                out = _stage(stage)(vcfg, vdir) or {}
            if out.get("stopped"):  # train.stop_at: a planned stop, resumed by the same command later
                state["stages"][key] = f"stopped at step {out.get('steps')}"
                save()
                log.info("%s stopped as asked (train.stop_at); resume with: %s", key, _resume_command(run_dir))
                return False
            if not _complete(vdir, section, vcfg):
                raise RuntimeError(f"{key} returned without writing '{section}' into {vdir}/results.json")
            state["stages"][key] = "done"
            save()
    return stop_after is None
