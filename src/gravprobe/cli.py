"""The one console script: ``gravprobe <stage> [hydra overrides...]``.

Stages: ``generate``, ``pretrain``, ``probe``, ``report``, ``run`` (the whole pipeline). ``--multirun``
(``-m``) works for every stage. The stage implementations are imported lazily so that, e.g.,
``gravprobe generate`` never imports torch.
"""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

STAGES = {
    # stage: (module, function); each function takes (cfg, run_dir) and returns a dict summary
    "generate": ("gravprobe.orbits.generate", "main"),
    "pretrain": ("gravprobe.pretrain.train", "main"),
    "probe": ("gravprobe.probes.pipeline", "main"),
    "report": ("gravprobe.report", "main"),
    "run": ("gravprobe.pipeline", "main"),
}

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
    mod_name, fn_name = STAGES[stage]
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
    fn = getattr(importlib.import_module(mod_name), fn_name)
    return fn(cfg, run_dir)


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
    # `stage=` goes just before the first override: Hydra's argparse takes the overrides as one
    # positional list, which must not be split by a flag (`stage=run -m a=1` would fail to parse)
    first = next((i for i, a in enumerate(rest) if "=" in a and not a.startswith("-")), 0)
    sys.argv = [f"gravprobe {stage}", *rest[:first], f"stage={stage}", *rest[first:]]
    hydra.main(version_base="1.3", config_path="pkg://gravprobe.conf", config_name="config")(_task)()


if __name__ == "__main__":
    main()
