"""The one console script: ``gravprobe <stage> [hydra overrides...]``.

Stages: ``generate``, ``pretrain``, ``probe``, ``report``, ``run`` (the whole pipeline; the table is
:data:`gravprobe.config.STAGES`). ``--multirun`` (``-m``) works for every stage. The stage implementations
are imported lazily so that, e.g., ``gravprobe generate`` never imports torch.

Before Hydra starts (and so before it creates a run folder), :func:`preflight` composes the config with
Hydra's compose API and validates it for the stage (:func:`gravprobe.config.validate_config`): a misspelt key
is answered with the closest valid keys, a bad value with its valid range, each problem on one line, exit
code 2. In a ``--multirun`` sweep every value of every swept key is checked (beside the other keys' first
values). ``--help``, ``--info``, ``--cfg`` and ``--shell-completion`` go straight to Hydra.
"""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from gravprobe.config import STAGES, ConfigError

USAGE = f"""usage: gravprobe <stage> [--multirun] [hydra overrides...]

stages: {', '.join(STAGES)}
  gravprobe generate data=pretrain data.n_systems=1000 workers=2
  gravprobe pretrain experiment=smoke attention=lssar
  gravprobe probe checkpoint=PATH
  gravprobe report PATH_TO_RUN_OR_SWEEP
  gravprobe run experiment=smoke
  gravprobe run -m attention=softmax,lssa,lssar seed=0,1,2
Hydra's own flags (--cfg job, --info, --help) work after the stage name.
"""

log = logging.getLogger("gravprobe")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("gp_tag"):
        # run folder suffix: "<stage>" or "<stage>_<key=value,...>" (filesystem-safe)
        def tag(stage: str, overrides: str) -> str:
            s = f"{stage}_{overrides}" if overrides else stage
            return "".join(c if (c.isalnum() or c in "=,._-") else "-" for c in s)[:120]

        OmegaConf.register_new_resolver("gp_tag", tag)


def _task(cfg) -> dict | None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    stage = cfg.stage
    mod_name, fn_name = STAGES[stage].module, STAGES[stage].function
    log.info("gravprobe %s -> %s", stage, run_dir)
    # every run folder holds its resolved config
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    threads = int(cfg.get("threads") or 0)
    if threads > 0 and stage in ("pretrain", "probe", "run"):
        # a fixed intra-op thread count; on a busy or shared machine fewer threads than cores avoids
        # threads spinning against each other (much slower than one thread for small models)
        import torch

        torch.set_num_threads(threads)
        log.info("torch intra-op threads: %d", threads)
    if stage in ("pretrain", "probe", "run") and cfg.get("train") is not None and cfg.get("device") != "cuda":
        # the probe stage trains too (the force head) and reads activations: the same per-step page faults
        from gravprobe.common import set_cpu_allocator

        set_cpu_allocator(str(cfg.train.get("cpu_allocator", "heap")))       # logs once per process
    fn = getattr(importlib.import_module(mod_name), fn_name)
    try:
        summary = fn(cfg, run_dir)
    except ConfigError as e:  # a config problem only the stage could see (e.g. a resumed run of another config)
        log.error("%s", e)
        raise SystemExit(2) from None
    if stage in ("pretrain", "probe"):
        # stages write numbers; the report package draws every figure (`run` draws in its report step)
        try:
            from gravprobe.report import draw_figures

            for path in draw_figures(run_dir):
                log.info("figure %s", path)
        except Exception as e:  # a figure must never cost the numbers the stage wrote
            log.warning("could not draw the figures of %s (%s: %s); `gravprobe report %s` retries",
                        run_dir, type(e).__name__, e, run_dir)
    return summary


# ----------------------------------------------------------------------------------------- preflight
#: flags after which the CLI does not compose or validate: Hydra answers them itself
PASSTHROUGH_FLAGS = ("-h", "--help", "--hydra-help", "-i", "--info", "-c", "--cfg", "-sc", "--shell-completion",
                     "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package",
                     "--experimental-rerun")
#: at most this many compositions are validated for one sweep (each swept value once)
MAX_SWEEP_CHECKS = 64


def _group_names() -> set[str]:
    """Config groups of the packaged config (``conf/<group>/``, ``conf/hydra/launcher``)."""
    from importlib.resources import files

    out = set()
    for d in files("gravprobe.conf").iterdir():
        if d.is_dir() and not d.name.startswith("_"):
            out.add(d.name)
    return out


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """Override lists to validate for a sweep: every sweep at its first value, then each further value of
    each swept key with the others at their first values. ``glob(...)`` sweeps are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: list[list[str]] = []
    for o in parsed:
        if not o.is_sweep_override():
            choices.append([o.input_line])
        elif isinstance(o.value(), Glob):
            choices.append([])
        else:
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
    first = [c[0] for c in choices if c]
    runs = [first]
    for i, c in enumerate(choices):
        for v in c[1:]:
            if len(runs) >= MAX_SWEEP_CHECKS:
                return runs
            runs.append([v if j == i else cc[0] for j, cc in enumerate(choices) if cc])
    return runs


def _unknown_keys(overrides: list[str], stage: str) -> dict[str, str]:
    """``{override: message}`` for the overrides that set a key the config does not have (``data.n_sytems=10``),
    with the closest valid keys; the config is composed with the group choices alone to know the valid keys."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from omegaconf import DictConfig, OmegaConf

    from gravprobe.config import unknown_key_message

    groups = _group_names()
    parsed = OverridesParser.create().parse_overrides(overrides)
    group_ov = [o.input_line for o in parsed if o.key_or_group.split("/")[0] in groups and "." not in o.key_or_group
                or "/" in o.key_or_group]
    base = compose("config", overrides=[*group_ov, f"stage={stage}"])
    out: dict[str, str] = {}
    for o in parsed:
        key = o.key_or_group
        if o.input_line in group_ov or o.type != OverrideType.CHANGE or key.startswith("hydra.") or key == "hydra":
            continue
        node: object = base
        path: list[str] = []
        for part in key.split("."):
            if not isinstance(node, DictConfig):
                out[o.input_line] = (f"{'.'.join(path)} is a value, not a section: {key} does not exist; set "
                                     f"{'.'.join(path)}=VALUE")
                break
            if part not in node:
                out[o.input_line] = unknown_key_message(".".join([*path, part]), [str(k) for k in node.keys()])
                break
            path.append(part)
            node = OmegaConf.select(base, ".".join(path), throw_on_missing=False)
    return out


def preflight(stage: str, rest: list[str]) -> str | None:
    """Compose and validate the config of ``gravprobe <stage> <rest>`` before Hydra runs anything; return the
    message to print (one problem per line) or ``None`` when the config can run."""
    if any(a.split("=", 1)[0] in PASSTHROUGH_FLAGS for a in rest):
        return None
    from hydra.errors import OverrideParseException

    overrides = [a for a in rest if not a.startswith("-")]
    multirun = any(a in ("-m", "--multirun") for a in rest)
    try:
        runs = _sweep_variants(overrides) if multirun else [overrides]
    except OverrideParseException as e:
        return f"gravprobe {stage}: cannot parse the overrides: {e}"
    problems: list[str] = []
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from hydra.core.global_hydra import GlobalHydra

    backup = get_gh_backup()  # an embedding program (a test, a notebook) may hold a Hydra instance already
    GlobalHydra.instance().clear()
    try:
        problems = _compose_and_validate(stage, runs)
    finally:
        restore_gh_from_backup(backup)
    if not problems:
        return None
    problems = list(dict.fromkeys(problems))
    return f"gravprobe {stage}: the config cannot run (nothing was started):\n  - " + "\n  - ".join(problems)


def _compose_and_validate(stage: str, runs: list[list[str]]) -> list[str]:
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    from gravprobe.config import validate_config

    problems: list[str] = []
    with initialize_config_module(version_base="1.3", config_module="gravprobe.conf"):
        for ov in runs:
            first = ov is runs[0]
            try:
                cfg = compose("config", overrides=[*ov, f"stage={stage}"])
            except HydraException as e:
                try:
                    unknown = _unknown_keys(ov, stage)
                except HydraException:
                    unknown = {}
                problems += list(unknown.values()) or ["; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())]
                if not unknown:
                    continue
                ov = [o for o in ov if o not in unknown]  # the other overrides are still checked, all at once
                try:
                    cfg = compose("config", overrides=[*ov, f"stage={stage}"])
                except HydraException:
                    continue
            if first:
                problems += _unwritable_home(cfg)
            try:
                validate_config(cfg, stage, overrides=ov)
            except ConfigError as e:
                # a problem of one sweep job only names that job
                problems += [p if first or p in problems else f"{p} [in the sweep job {' '.join(ov)}]"
                             for p in e.problems]
    return problems


def _unwritable_home(cfg) -> list[str]:
    """The output root must be writable before Hydra creates a run folder under it (a read-only share or a
    missing permission would otherwise end in a raw ``OSError`` traceback). Tried for real: the root is
    not created here: a temporary file (and folder) is made and removed in the nearest existing folder."""
    import errno
    import os
    import tempfile

    from gravprobe.common import output_root, storage_error

    try:
        root = output_root(cfg)
    except Exception:  # an unresolvable home is reported by the schema check
        return []
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the nearest folder that exists: nothing is created here
    try:
        if not probe.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe} is not a folder")
        with tempfile.TemporaryFile(dir=probe):
            pass
        if probe != root:  # creating the missing folders needs write access to probe, just shown; but a
            (probe / f".gravprobe-probe-{os.getpid()}").mkdir()  # pseudo file system may refuse folders
            (probe / f".gravprobe-probe-{os.getpid()}").rmdir()
    except OSError as e:
        return [str(storage_error(e, root, "run folders under the output root (home=)"))]
    return []


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"gravprobe: unknown stage {stage!r}; choose one of: {', '.join(STAGES)}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    if stage == "report" and rest and not rest[0].startswith("-") and ("=" not in rest[0] or Path(rest[0]).is_dir()):
        # (run folders are named after their overrides, e.g. `0_run_attention=lssa,seed=0`: an existing
        # folder is a folder even when its name holds "=")
        # `gravprobe report DIR` rebuilds a report from files alone, no Hydra composition needed
        from gravprobe.report import report_dir

        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        out = report_dir(Path(rest[0]))
        print(out)
        return

    import hydra

    _register_resolvers()
    message = preflight(stage, rest)
    if message:
        print(message, file=sys.stderr)
        sys.exit(2)
    # `stage=` goes just before the first override: Hydra's argparse takes the overrides as one
    # positional list, which must not be split by a flag (`stage=run -m a=1` would fail to parse)
    first = next((i for i, a in enumerate(rest) if "=" in a and not a.startswith("-")), 0)
    sys.argv = [f"gravprobe {stage}", *rest[:first], f"stage={stage}", *rest[first:]]
    hydra.main(version_base="1.3", config_path="pkg://gravprobe.conf", config_name="config")(_task)()


if __name__ == "__main__":
    main()
