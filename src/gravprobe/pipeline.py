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
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from gravprobe.common import atomic_write_bytes, update_results

log = logging.getLogger(__name__)

#: the stage functions the pipeline calls, ``(module, function)``, each ``fn(cfg, run_dir) -> dict``
STAGE_FUNCTIONS = {
    "pretrain": ("gravprobe.pretrain.train", "main"),
    "probe": ("gravprobe.probes.pipeline", "main"),
}
#: config keys that may differ when a run folder is resumed (they do not change any result)
RESUME_IGNORED_KEYS = ("stage", "workers", "threads", "device", "home", "out", "force_out", "report", "pipeline.report",
                       "pipeline.stop_after", "train.stop_at")


class PipelineConfigError(ValueError):
    """A config the pipeline cannot run; the message lists every problem and how to fix it."""


# ------------------------------------------------------------------------------------------ variants
def attention_choices() -> list[str]:
    """Attention variants the pipeline can train: packaged ``conf/attention/*.yaml`` (∩ ``VARIANTS``)."""
    from importlib.resources import files

    names = sorted(p.name[:-5] for p in (files("gravprobe.conf") / "attention").iterdir()
                   if p.name.endswith(".yaml"))
    try:
        from gravprobe.attention import VARIANTS

        names = [n for n in names if n in VARIANTS]
    except ImportError:  # attention not importable: the config files are the list
        pass
    return names


def _cli_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (``[]`` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return [str(o) for o in HydraConfig.get().overrides.task]
    return []


def _overridden(key: str, overrides: list[str]) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def variants_of(cfg: DictConfig, overrides: list[str] | None = None) -> list[str]:
    """The attention variants this run trains, in order (see the module docstring for the rule)."""
    overrides = _cli_overrides() if overrides is None else overrides
    name = str(cfg.attention.name)
    listed = OmegaConf.select(cfg, "pipeline.variants", default=None)
    if _overridden("attention", overrides) and not _overridden("pipeline.variants", overrides):
        if listed is not None and list(_as_list(listed)) != [name]:
            log.info("attention=%s on the command line: training %s only (the preset's pipeline.variants=%s "
                     "is ignored; pass pipeline.variants=[...] to train several)", name, name,
                     list(_as_list(listed)))
        return [name]
    if listed is None:
        return [name]
    if isinstance(listed, str) and listed == "all":
        return attention_choices()
    return [str(v) for v in _as_list(listed)]


def _as_list(x: Any) -> list:
    if isinstance(x, str):
        return [s.strip() for s in x.split(",") if s.strip()]
    return list(x)


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
def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def validate(cfg: DictConfig, overrides: list[str] | None = None) -> list[str]:
    """Check everything the pipeline can check before any work; return the variants.

    Raises ``PipelineConfigError`` naming every problem (and the valid choices) at once.
    """
    problems: list[str] = []
    choices = attention_choices()
    variants = variants_of(cfg, overrides)
    if not variants:
        problems.append(f"pipeline.variants is empty; choose from: {', '.join(choices)}")
    for v in variants:
        if v not in choices:
            problems.append(f"unknown attention variant {v!r} (pipeline.variants / attention=); "
                            f"choose from: {', '.join(choices)}")
    if len(set(variants)) != len(variants):
        problems.append(f"pipeline.variants names a variant twice: {variants}")
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        problems.append(f"`gravprobe run` is one process (WORLD_SIZE={world}: started by torchrun?); train on "
                        "several GPUs with `torchrun --nproc_per_node=N -m gravprobe.cli pretrain ...` per variant, "
                        "then `gravprobe probe checkpoint=<run>/checkpoints/last.pt`")
    stop_after = _get(cfg, "pipeline.stop_after")
    if stop_after not in (None, "generate", "pretrain"):
        problems.append(f"pipeline.stop_after={stop_after!r}; choose from: null, generate, pretrain")
    if _get(cfg, "checkpoint"):
        problems.append("checkpoint= is for `gravprobe probe`; `gravprobe run` trains its own checkpoints "
                        "(drop the override)")

    def positive_int(key: str, minimum: int = 1, why: str = "") -> None:
        val = _get(cfg, key)
        if val is None:
            return
        if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
            problems.append(f"{key}={val!r} must be an integer >= {minimum}{why}")

    for ds in ("data", "force_data"):
        positive_int(f"{ds}.seq_len", 2, " (a sequence needs a dt marker and at least one position)")
        positive_int(f"{ds}.n_systems", 2 if ds == "data" else 1)
        positive_int(f"{ds}.n_bins", 2)
        positive_int(f"{ds}.shard_size", 1)
    for key in ("model.n_layers", "model.n_heads", "model.d_model", "model.block_size", "train.steps",
                "train.batch_size", "train.grad_accum"):
        positive_int(key)
    n_heads, d_model = _get(cfg, "model.n_heads"), _get(cfg, "model.d_model")
    if isinstance(n_heads, int) and isinstance(d_model, int) and n_heads > 0 and d_model % n_heads:
        problems.append(f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}")
    seq_len = _get(cfg, "train.seq_len")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 2):
        problems.append(f"train.seq_len={seq_len!r} must be >= 2 (or null for the data's length)")
    # the stages' own checks, without doing any work: the orbit specs' typed errors, and the model
    # config of every variant (unknown keys, positions, divisibility)
    from gravprobe.orbits import DatasetSpec

    specs = {}
    for ds in ("data", "force_data"):
        try:
            specs[ds] = DatasetSpec.from_config(cfg[ds])
        except (ValueError, TypeError, KeyError) as e:
            problems.append(f"{ds}: {e}")
    # the arrays each stage reads from disk (DatasetSpec.arrays may leave the others out)
    needs = {"force_data": ("states", "forces", "labelled", "bodies")}
    if _get(cfg, "model.orbit_mode") == "continuous":
        needs["data"] = ("positions",)
    for ds, names in needs.items():
        missing = [n for n in names if ds in specs and n not in specs[ds].stored_arrays]
        if missing:
            problems.append(f"{ds}.arrays={list(specs[ds].stored_arrays)} leaves out {missing}, which "
                            f"{'the probes' if ds == 'force_data' else 'model.orbit_mode=continuous'} read; "
                            f"add them or set {ds}.arrays=null")
    if not problems:
        from gravprobe.pretrain.train import model_config

        for v in variants:
            try:
                model_config(variant_config(cfg, v), int(cfg.data.n_bins) + 3, 257)
            except (ValueError, TypeError) as e:
                problems.append(f"model ({v}): {e}")
                break
    problems += _probe_size_problems(cfg)
    problems += sequence_length_problems(cfg)
    from gravprobe.probes.pipeline import protocol_problems

    problems += protocol_problems(cfg)
    if problems:
        raise PipelineConfigError("the config cannot run:\n  - " + "\n  - ".join(problems))
    return variants


def sequence_length_problems(cfg: DictConfig) -> list[str]:
    """Every stage's sequence lengths against the model, before any work: a learned-position model
    (``model.position=learned``) cannot run beyond ``model.block_size`` tokens, and the probes feed whole
    ``force_data`` sequences (all ``seq_len`` tokens) through it. RoPE models run at any length."""
    out: list[str] = []
    if _get(cfg, "model.position") != "learned":
        return out
    block = _get(cfg, "model.block_size")
    if not isinstance(block, int):
        return out
    train_len = _get(cfg, "train.seq_len")
    data_len = _get(cfg, "data.seq_len")
    if isinstance(train_len, int) and train_len > block:
        out.append(f"train.seq_len={train_len} exceeds model.block_size={block} of a learned-position model; "
                   "lower train.seq_len or raise model.block_size")
    probing = _get(cfg, "stage") in ("run", "probe", None)
    fd_len = _get(cfg, "force_data.seq_len")
    if probing and isinstance(fd_len, int) and fd_len > block:
        out.append(f"force_data.seq_len={fd_len} tokens exceeds model.block_size={block} of a learned-position "
                   f"model (the probes run whole force sequences through it); set force_data.seq_len<={block} or "
                   f"raise model.block_size (a learned-position model cannot run longer sequences)")
    if isinstance(data_len, int) and train_len is None and data_len - 1 > block:
        log.info("data.seq_len=%d: training uses the first model.block_size=%d tokens of each sequence",
                 data_len, block)
    return out


def _probe_size_problems(cfg: DictConfig) -> list[str]:
    """The probes' selection (METHOD §4.3) needs held-out planet steps in ``force_data``: the sequences
    from ``labelling.full_systems`` on are labelled at only ``partial_steps`` steps, the rest is held out."""
    out: list[str] = []
    fd = "force_data"
    n_sys, seq_len = _get(cfg, f"{fd}.n_systems"), _get(cfg, f"{fd}.seq_len")
    full, partial = _get(cfg, f"{fd}.labelling.full_systems"), _get(cfg, f"{fd}.labelling.partial_steps", 0)
    planets = _get(cfg, f"{fd}.planets")
    size, n_keep = _get(cfg, "probe.selection.galaxy_size"), _get(cfg, "probe.selection.n_keep")
    if not all(isinstance(x, int) for x in (n_sys, seq_len)):
        return out
    if full is None or (isinstance(full, int) and full >= n_sys):
        out.append(f"force_data.labelling.full_systems={full} leaves no partially labelled sequences among "
                   f"force_data.n_systems={n_sys}, so nothing is held out for the probes; set it below n_systems "
                   "(two_body_force: 9,000 of 10,000)")
        return out
    k_max = max(int(x) for x in planets) if planets else 1
    star_token = _get(cfg, f"{fd}.star_token", True) is not False
    steps = (seq_len - 1) // (k_max + int(star_token))  # time steps per sequence: each planet, then the star
    held = (n_sys - int(full)) * max(0, steps - int(partial or 0))
    if isinstance(size, int):
        if isinstance(n_keep, int) and size > n_keep:
            out.append(f"probe.selection.galaxy_size={size} exceeds probe.selection.n_keep={n_keep} (a galaxy is "
                       "drawn from the n_keep held-out states nearest to the training states)")
        if held < size:
            out.append(f"force_data holds about {held} held-out planet steps ({n_sys - int(full)} partially labelled "
                       f"sequences × ({steps} steps − {partial} labelled)), fewer than one galaxy of "
                       f"probe.selection.galaxy_size={size}; raise force_data.n_systems / seq_len, lower "
                       "force_data.labelling.full_systems, or lower the galaxy size")
    return out


# ------------------------------------------------------------------------------------------- running
def _stage(name: str) -> Callable[[DictConfig, Path], dict]:
    mod, fn = STAGE_FUNCTIONS[name]
    return getattr(importlib.import_module(mod), fn)


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
            return default if vcfg is None else OmegaConf.select(vcfg, key, default=default)

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
    resolved = OmegaConf.to_container(cfg, resolve=True)
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
    if bool(OmegaConf.select(cfg, "pipeline.report", default=True)):
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
    stop_after = OmegaConf.select(cfg, "pipeline.stop_after", default=None)
    if stop_after == "generate":
        log.info("pipeline.stop_after=generate: datasets ready, stopping")
        return False
    for i, name in enumerate(variants):
        vdir = run_dir / name
        vdir.mkdir(parents=True, exist_ok=True)
        vcfg = variant_config(cfg, name)
        with open_dict(vcfg):
            vcfg.checkpoint = str(vdir / "checkpoints" / "last.pt")
            if i > 0 and OmegaConf.select(vcfg, "probe.oracle.enabled", default=None) is not None:
                vcfg.probe.oracle.enabled = False  # the oracle does not depend on the model: once
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
