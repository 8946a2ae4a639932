"""``conf/attention/<variant>.yaml`` generated from the registry, so a variant's defaults are stated once.

Each variant of :data:`gravprobe.attention.reference.REGISTRY` has a Hydra config file (``attention=<name>``)
whose ``params`` are the registry's defaults, written by :func:`variant_yaml`. The files stay on disk (the
CLI lists and composes them, and ``attention.params.sharpen_power=3`` overrides a key that must exist), but
nobody edits them by hand: ``tests/test_attention_layer.py`` fails when one differs from the registry.
Hand-written study arms (``lssar_p3.yaml``, ``softmax_window4.yaml``: a variant under another name with
other values) are not generated; the tests check that they name a registered variant and list its params.

Usage (after adding or changing a registry entry)::

    python -m gravprobe.attention.config_files            # report files that differ (exit 1 if any)
    python -m gravprobe.attention.config_files --write    # (re)write them
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .reference import REGISTRY, Param

__all__ = ["conf_dir", "variant_yaml", "stale_files", "write_files"]

_COMMENT_COLUMN = 23          # the comments of every file line up here


def conf_dir() -> Path:
    """The ``conf/attention`` folder of the installed ``gravprobe.conf`` package."""
    from importlib.resources import files

    return Path(str(files("gravprobe.conf") / "attention"))


def _yaml_value(param: Param) -> str:
    if param.yaml is not None:
        return param.yaml
    value: Any = param.default
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _line(text: str, comment: str) -> str:
    return f"{text.ljust(_COMMENT_COLUMN - 1)} # {comment}" if comment else text


def variant_yaml(name: str) -> str:
    """The text of ``conf/attention/<name>.yaml`` for registry entry ``name`` (``KeyError`` if absent)."""
    spec = REGISTRY[name]
    lines = [
        f"# Attention variant `{name}` (METHOD.md §2), chosen with `attention={name}`. Read by",
        "# gravprobe.attention.CausalSelfAttention.from_config(cfg.attention, d_model, n_heads).",
        "# GENERATED from gravprobe.attention.reference.REGISTRY: edit the registry, then run",
        "#   python -m gravprobe.attention.config_files --write",
        "# backend: auto (per device and variant: attention/dispatch.py AUTO_ORDER) | torch | triton | flex",
        _line(f"name: {name}", spec.formula),
    ]
    if spec.params:
        lines.append("params:")
        lines += [_line(f"  {p.name}: {_yaml_value(p)}", p.doc) for p in spec.params]
    else:
        lines.append("params: {}")
    lines += [
        "backend: auto",
        _line("window: null", "W: query i sees keys max(1, i-W+1)..i, n_i = min(i, W); null = full causal "
              "context"),
    ]
    return "\n".join(lines) + "\n"


def stale_files(folder: Path | None = None) -> list[Path]:
    """The registry variants' files in ``folder`` (default :func:`conf_dir`) that are missing or differ."""
    folder = conf_dir() if folder is None else Path(folder)
    stale = []
    for name in REGISTRY:
        path = folder / f"{name}.yaml"
        if not path.is_file() or path.read_text() != variant_yaml(name):
            stale.append(path)
    return stale


def write_files(folder: Path | None = None) -> list[Path]:
    """(Re)write every stale file in ``folder`` (default :func:`conf_dir`); returns the paths written."""
    from gravprobe.common import atomic_write_bytes

    written = stale_files(folder)
    for path in written:
        atomic_write_bytes(path, variant_yaml(path.stem).encode(), f"attention config {path.stem}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the files that differ from the registry")
    parser.add_argument("--dir", type=Path, default=None, help="the conf/attention folder (default: the package's)")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_files(args.dir):
            print(f"wrote {path}")
        return 0
    stale = stale_files(args.dir)
    for path in stale:
        print(f"differs from the registry: {path}")
    if stale:
        print("run: python -m gravprobe.attention.config_files --write")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
