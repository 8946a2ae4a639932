"""Typed config schemas and the one validation every stage runs before any work.

The Hydra config (``conf/``) is composed by the CLI; this module turns each group into a typed object and
checks it, so that a bad value fails at once with one message instead of crashing an hour into a run:

- ``data`` / ``force_data`` → :class:`gravprobe.orbits.DatasetSpec`, ``model`` → :class:`GPTConfig`
  (gravprobe.pretrain.model; built here with the data's vocabulary) — those dataclasses are reused, not
  duplicated; this module adds the ranges their constructors do not check (``n_layers >= 1`` …);
- ``train`` → :class:`TrainConfig`, ``text`` → :class:`TextConfig`, ``probe`` → :class:`ProbeConfig`,
  ``sr`` → :class:`SRConfig`, the top-level keys → :class:`RootConfig`.

**Defaults live in the YAML files only** (``conf/<group>/<option>.yaml``, where Hydra users look for them).
The dataclasses declare names (equal to the YAML keys), types and valid ranges, never a default value:
``TrainConfig.from_cfg(cfg.train)`` reads a composed node; a partial node (a dict written in code or a
test) has its missing keys filled from the packaged YAML of the group's default option
(:data:`GROUP_DEFAULTS`). The only ``None`` defaults are in :class:`SRConfig`, whose keys differ between
backends: there ``None`` means "fit_equation's own default", which itself is read from ``conf/sr/``.

:func:`validate_config` ``(cfg, stage)`` checks everything a stage reads (per :data:`STAGES`) and raises
one :class:`ConfigError` listing every problem, each naming the key, the value, the valid range and the
fix; an unknown key is answered with the closest valid keys (:func:`unknown_key_message`).

:func:`to_container` and :func:`select` are the one OmegaConf-to-dict conversion and the one dotted-key
read the stages use.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, Optional, Union

# --------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One ``gravprobe <stage>``: the function that runs it (``module.function(cfg, run_dir) -> dict``),
    the ``results.json`` sections a complete run of it holds, and the config groups it reads."""

    module: str
    function: str
    sections: tuple[str, ...]
    groups: tuple[str, ...]


#: The one stage table: the CLI dispatches on it, the pipeline runs its stages from it, the report reads
#: which sections a stage's folder must hold (``report`` builds from files and reads no group).
STAGES: dict[str, Stage] = {
    "generate": Stage("gravprobe.orbits.generate", "main", (), ("data",)),
    "pretrain": Stage("gravprobe.pretrain.train", "main", ("pretrain",),
                      ("data", "model", "attention", "train", "text")),
    "probe": Stage("gravprobe.probes.pipeline", "main", ("probes",), ("force_data", "probe", "sr")),
    "report": Stage("gravprobe.report", "main", (), ()),
    "run": Stage("gravprobe.pipeline", "main", ("pretrain", "probes"),
                 ("data", "force_data", "model", "attention", "train", "text", "probe", "sr")),
}

#: For every group with a typed schema here: the packaged option whose YAML holds the group's defaults.
GROUP_DEFAULTS = {"train": "default", "text": "stdlib", "probe": "default", "sr": "default"}


class ConfigError(ValueError):
    """A config that cannot run. ``problems`` lists every problem (key, value, valid range, fix); the
    message is all of them, one per line."""

    def __init__(self, problems: list[str] | str, header: str = "the config cannot run") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(f"{header}:\n  - " + "\n  - ".join(self.problems))


# -------------------------------------------------------------------------------------------- helpers
def to_container(node: Any, resolve: bool = True) -> Any:
    """A plain Python value of ``node``: OmegaConf ``DictConfig``/``ListConfig`` → dict/list (interpolations
    resolved when ``resolve``), a schema dataclass → dict, mappings and lists copied, ``None`` → ``None``."""
    if node is None:
        return None
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=resolve)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        pass
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.asdict(node)
    if isinstance(node, Mapping):
        return {k: to_container(v, resolve) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [to_container(v, resolve) for v in node]
    return node


_MISSING = object()


def select(node: Any, key: str, default: Any = None) -> Any:
    """``node[a][b]…`` for ``key="a.b…"`` on an OmegaConf node, a mapping, a dataclass or any object.

    Returns ``default`` when a part of the path is missing or a parent is ``None``; a key that is present
    with the value ``null`` returns ``None`` (a null is a choice, e.g. ``train.seq_len: null``)."""
    cur = node
    for part in key.split("."):
        if cur is None:
            return default
        if isinstance(cur, Mapping) or hasattr(cur, "keys") and hasattr(cur, "get"):
            try:
                if part not in cur:
                    return default
                cur = cur[part]
            except Exception:  # an OmegaConf missing value (???) or an unresolvable interpolation
                return default
        else:
            cur = getattr(cur, part, _MISSING)
            if cur is _MISSING:
                return default
    return cur


@functools.lru_cache(maxsize=None)
def _packaged_yaml(rel: str) -> dict:
    """A packaged ``conf/<rel>`` file as a plain dict (``${home}`` resolved against the output root)."""
    from omegaconf import OmegaConf

    from gravprobe.common import output_root

    node = OmegaConf.create(files("gravprobe.conf").joinpath(rel).read_text())
    raw = OmegaConf.to_container(node, resolve=False)
    raw.pop("defaults", None)
    root = OmegaConf.create({"home": str(output_root()), "_": raw})
    return OmegaConf.to_container(root, resolve=True)["_"]


def group_defaults(group: str, option: str | None = None) -> dict:
    """The defaults of a config group: the packaged ``conf/<group>/<option>.yaml`` (``option`` defaults to
    :data:`GROUP_DEFAULTS`); the single place where a default value is written."""
    return _packaged_yaml(f"{group}/{option or GROUP_DEFAULTS[group]}.yaml")


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def closest_keys(key: str, valid: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """Up to ``n`` valid keys closest to ``key`` (difflib), best first."""
    return difflib.get_close_matches(key, list(valid), n=n, cutoff=0.5)


def unknown_key_message(full_key: str, valid: list[str] | tuple[str, ...]) -> str:
    """``unknown key data.n_sytems; did you mean data.n_systems? (valid keys under data: …)``."""
    parent, _, leaf = full_key.rpartition(".")
    near = closest_keys(leaf, valid)
    where = f"under {parent}" if parent else "at the top level"
    hint = f"did you mean {' or '.join((parent + '.' if parent else '') + k for k in near)}? " if near else ""
    return f"unknown key {full_key}; {hint}(valid keys {where}: {', '.join(sorted(valid))})"


# ------------------------------------------------------------------------------------- schema machinery
def rng(*, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
        each: bool = False, doc: str = "") -> Any:
    """A schema field's valid range (``ge``/``gt``/``le``/``lt``; ``each`` for every list element) and what
    the key means (``doc``, used in messages). The field has no default: defaults live in the YAML."""
    return field(metadata={"ge": ge, "gt": gt, "le": le, "lt": lt, "each": each, "doc": doc})


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _range_text(md: Mapping) -> str:
    lo = ("[", md["ge"]) if md.get("ge") is not None else ("(", md["gt"]) if md.get("gt") is not None else None
    hi = ("]", md["le"]) if md.get("le") is not None else (")", md["lt"]) if md.get("lt") is not None else None
    if lo and hi:
        return f"in {lo[0]}{_fmt(lo[1])}, {_fmt(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {_fmt(lo[1])}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {_fmt(hi[1])}"
    return ""


def _in_range(v: float, md: Mapping) -> bool:
    return not ((md.get("ge") is not None and v < md["ge"]) or (md.get("gt") is not None and v <= md["gt"])
                or (md.get("le") is not None and v > md["le"]) or (md.get("lt") is not None and v >= md["lt"]))


def _describe(tp: Any, md: Mapping) -> str:
    """``an integer >= 1``, ``a number in [0, 1)``, ``one of cosine, step, constant`` …"""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    r = _range_text(md)
    if origin is Union:
        parts = [_describe(a, md) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple):
        inner = _describe(args[0], {}) if args else "values"
        inner = {"an integer": "integers", "a number": "numbers", "a string": "strings"}.get(inner, inner)
        return f"a list of {inner}" + (f" (each {r})" if r else "") + (f" of length {len(args)}" if origin is tuple else "")
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + (f" {r}" if r else "")
    if tp is float:
        return "a number" + (f" {r}" if r else "")
    if tp is str:
        return "a string"
    if tp in (dict, Any):
        return "a mapping" if tp is dict else "a value"
    return getattr(tp, "__name__", str(tp))


def _check_value(v: Any, tp: Any, md: Mapping) -> tuple[bool, Any]:
    """``(ok, converted value)`` of ``v`` against type ``tp`` and range ``md``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True, v
    if origin is Union:
        if v is None:
            return type(None) in args, None
        for a in args:
            if a is type(None):
                continue
            ok, out = _check_value(v, a, md)
            if ok:
                return True, out
        return False, v
    if origin is Literal:
        return (v in args and type(v) is type(next(a for a in args if a == v))), v
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            return False, v
        if origin is tuple and len(v) != len(args):
            return False, v
        item_md = {**md, "each": False} if md.get("each") else {}
        out = []
        for i, x in enumerate(v):
            ok, y = _check_value(x, args[i] if origin is tuple else (args[0] if args else Any), item_md)
            if not ok:
                return False, v
            out.append(y)
        return True, out
    if tp is bool:
        return isinstance(v, bool), v
    if tp is int:
        ok = isinstance(v, int) and not isinstance(v, bool) and _in_range(v, md)
        return ok, v
    if tp is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and _in_range(float(v), md)
        return ok, float(v) if ok else v
    if tp is str:
        return isinstance(v, str), v
    if tp is dict:
        return isinstance(v, Mapping), v
    return isinstance(v, tp), v


class Schema:
    """Base of the typed config sections: ``from_cfg`` (raises :class:`ConfigError`) and ``check``
    (returns the object or ``None`` and the problems). Subclasses are dataclasses whose field names are the
    YAML keys; ``_problems`` adds checks across fields."""

    #: the group whose packaged YAML fills missing keys (``None``: no filling)
    GROUP: typing.ClassVar[str | None] = None

    @classmethod
    def from_cfg(cls, node: Any, prefix: str | None = None):
        """The typed section of ``node`` (``cfg.train``, a dict, …); raises :class:`ConfigError`."""
        obj, problems = cls.check(node, prefix)
        if problems:
            raise ConfigError(problems)
        return obj

    @classmethod
    def check(cls, node: Any, prefix: str | None = None, defaults: Mapping | None = None):
        """``(object or None, problems)``; missing keys come from ``defaults`` (the group's packaged YAML)."""
        prefix = cls.GROUP if prefix is None else prefix
        plain = to_container(node)
        if plain is None:
            plain = {}
        if not isinstance(plain, Mapping):
            return None, [f"{prefix}={plain!r} must be a mapping of keys ({', '.join(f.name for f in dataclasses.fields(cls))})"]
        if defaults is None and cls.GROUP is not None:
            defaults = group_defaults(cls.GROUP)
        if defaults:
            plain = _deep_merge(defaults, plain)
        return _build(cls, plain, prefix, defaults or {})

    def _problems(self, prefix: str) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, plain: Mapping, prefix: str, defaults: Mapping) -> tuple[Any, list[str]]:
    hints = typing.get_type_hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls)}
    problems = [unknown_key_message(_key(prefix, k), list(flds)) for k in plain if k not in flds]
    values: dict[str, Any] = {}
    for name, f in flds.items():
        key = _key(prefix, name)
        tp = hints[name]
        if name not in plain:
            if f.default is not dataclasses.MISSING:
                values[name] = f.default
                continue
            problems.append(f"{key} is missing; set {key}=<{_describe(tp, f.metadata)}>")
            continue
        v = plain[name]
        sub = next((a for a in (tp, *typing.get_args(tp)) if isinstance(a, type) and issubclass(a, Schema)), None)
        if sub is not None and not (v is None and type(None) in typing.get_args(tp)):
            if not isinstance(v, Mapping):
                problems.append(f"{key}={v!r} must be a mapping with keys {', '.join(sorted(_field_names(sub)))}")
                continue
            obj, sub_problems = _build(sub, v, key, defaults.get(name) or {})
            problems += sub_problems
            values[name] = obj
            continue
        ok, conv = _check_value(v, tp, f.metadata)
        if not ok:
            problems.append(_bad_value(key, v, tp, f.metadata, defaults.get(name, _MISSING)))
            continue
        values[name] = conv
    if problems:
        return None, problems
    obj = cls(**values)
    problems += obj._problems(prefix)
    return (None if problems else obj), problems


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _bad_value(key: str, v: Any, tp: Any, md: Mapping, default: Any = _MISSING) -> str:
    desc = _describe(tp, md)
    doc = f" ({md['doc']})" if md.get("doc") else ""
    if typing.get_origin(tp) is Literal or (typing.get_origin(tp) is Union and all(
            typing.get_origin(a) is Literal or a is type(None) for a in typing.get_args(tp))):
        members = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
        choices = (["null"] if type(None) in members else []) + [
            str(c) for a in members if a is not type(None) for c in typing.get_args(a)]
        msg = f"{key}={v!r}{doc}; choose from: {', '.join(choices)}"
        if default is not _MISSING and default != v:
            return f"{msg}; fix: {key}={_yaml(default)} (the default) or another of those"
        return msg
    else:
        msg = f"{key}={v!r} must be {desc}{doc}"
    if default is not _MISSING and default != v:
        return f"{msg}; fix: {key}={_yaml(default)} (the default) or another value in range"
    return f"{msg}; fix: set {key} to {desc}"


def _yaml(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_yaml(x) for x in v) + "]"
    return str(v)


# ------------------------------------------------------------------------------------------ train
@dataclass
class DynamicsConfig(Schema):
    """``train.dynamics``: the model's next-position loss beside kinematic baselines after training."""

    enabled: bool
    n_val: Optional[int] = rng(ge=1, doc="validation systems scored; null = all")
    n_fit: Optional[int] = rng(ge=1, doc="training systems the baselines are fitted on; null = all")
    rollout_steps: int = rng(ge=1)
    n_rollout: int = rng(ge=1)
    batch_size: int = rng(ge=1)


@dataclass
class ExtrapolationConfig(Schema):
    """``train.extrapolation``: validation loss at multiples of the training context."""

    factors: list[int] = rng(ge=1, each=True, doc="multiples of the training context; [] = skip")
    orbit_systems: int = rng(ge=1)
    text_windows: int = rng(ge=1)
    batch_size: int = rng(ge=1)
    seed_offset: int = rng(ge=1, doc="held-out orbit seed = seed + seed_offset, never the training seed")


@dataclass
class TrainConfig(Schema):
    """``train``: pretraining (gravprobe.pretrain.train); defaults in ``conf/train/default.yaml``."""

    GROUP: typing.ClassVar[str] = "train"

    steps: int = rng(ge=1, doc="optimiser steps")
    batch_size: int = rng(ge=1, doc="sequences per optimiser step, all processes together")
    grad_accum: int = rng(ge=1, doc="micro-batches per optimiser step and process")
    orbit_loss: Literal["all", "last"] = rng()
    text_ratio: float = rng(ge=0, le=1, doc="fraction of text sequences per batch")
    seq_len: Optional[int] = rng(ge=2, doc="orbit context in tokens; null = the data's")
    text_seq_len: Optional[int] = rng(ge=2, doc="text context in tokens; null = the orbit context")
    lr: float = rng(gt=0, doc="AdamW peak learning rate")
    schedule: Literal["cosine", "step", "constant"] = rng()
    min_lr_ratio: float = rng(ge=0, le=1)
    lr_drop_at: float = rng(ge=0, le=1, doc="fraction of train.steps")
    warmup_steps: int = rng(ge=0)
    weight_decay: float = rng(ge=0)
    betas: tuple[float, float] = rng(ge=0, lt=1, each=True, doc="AdamW betas")
    grad_clip: float = rng(ge=0, doc="max gradient norm; 0 = off")
    precision: Literal["auto", "bf16", "fp32"] = rng()
    cpu_allocator: Literal["heap", "system"] = rng(doc="CPU: keep freed tensor memory in glibc's heap (heap) "
                                                       "or glibc's defaults (system)")
    val_fraction: float = rng(ge=0, lt=1, doc="last fraction of the systems held out")
    eval_every: int = rng(ge=0, doc="0 = at step 0 and the end only")
    eval_batches: int = rng(ge=1)
    log_every: int = rng(ge=1)
    ckpt_every: int = rng(ge=0, doc="0 = only at the end")
    resume: Union[bool, str] = rng(doc="auto | true | false | a checkpoint path")
    stop_at: Optional[int] = rng(ge=1, doc="stop with a checkpoint after this step")
    dataset: Optional[str] = rng(doc="an existing orbit dataset folder")
    dynamics: DynamicsConfig = rng()
    extrapolation: ExtrapolationConfig = rng()

    def _problems(self, prefix: str) -> list[str]:
        out = []
        world = os.environ.get("WORLD_SIZE", "1")
        parts = self.grad_accum * (int(world) if world.isdigit() and int(world) > 0 else 1)
        if self.batch_size % parts:
            out.append(f"{prefix}.batch_size={self.batch_size} must be divisible by processes x grad_accum = "
                       f"{parts} (each process takes batch_size / processes sequences in grad_accum micro-batches); "
                       f"fix: {prefix}.batch_size={max(parts, self.batch_size // parts * parts)} or "
                       f"{prefix}.grad_accum=1")
        return out


# ------------------------------------------------------------------------------------------- text
@dataclass
class HFTextConfig(Schema):
    """``text.hf``: a Hugging Face ``datasets`` stream (``text.source=hf``)."""

    path: str
    name: Optional[str]
    split: str
    text_field: str
    max_documents: Optional[int] = rng(ge=1)


@dataclass
class TextConfig(Schema):
    """``text``: language data for mixed pretraining (gravprobe.pretrain.text); defaults in
    ``conf/text/stdlib.yaml`` (the other options: ``files``, ``fineweb_edu``)."""

    GROUP: typing.ClassVar[str] = "text"

    name: str
    source: Literal["stdlib", "files", "hf"] = rng()
    paths: list[str] = rng(doc="source=files: files and/or folders")
    suffixes: list[str] = rng()
    hf: HFTextConfig = rng()
    tokenizer: Literal["byte", "tiktoken"] = rng()
    tiktoken_encoding: str
    val_fraction: float = rng(gt=0, lt=1, doc="documents held out for validation")
    max_chars: Optional[int] = rng(ge=1)
    shard_tokens: int = rng(ge=1)


# ------------------------------------------------------------------------------------------ probe
RidgeAlphas = Any  # {min, max, num} or a list of positive numbers; checked in _alpha_problems


def _alpha_problems(key: str, a: Any) -> list[str]:
    if isinstance(a, Mapping):
        extra = sorted(set(a) - {"min", "max", "num"})
        if extra:
            return [unknown_key_message(f"{key}.{extra[0]}", ["min", "max", "num"])]
        lo, hi, n = a.get("min"), a.get("max"), a.get("num")
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo < hi
                and isinstance(n, int) and n >= 2):
            return [f"{key}={a!r} must be {{min: >0, max: >min, num: integer >= 2}} (a log-spaced grid); fix: "
                    f"{key}={{min:1e-4,max:1e8,num:25}}"]
        return []
    if isinstance(a, (list, tuple)) and a and all(isinstance(x, (int, float)) and x > 0 for x in a):
        return []
    return [f"{key}={a!r} must be a grid {{min, max, num}} or a non-empty list of numbers > 0; fix: "
            f"{key}={{min:1e-4,max:1e8,num:25}}"]


def _target_problems(key: str, targets: list[str]) -> list[str]:
    from gravprobe.probes.linear import TARGETS

    bad = [t for t in targets if t not in TARGETS]
    if not targets:
        return [f"{key}=[] names no target; choose from: {', '.join(TARGETS)}"]
    return [f"{key} has unknown target(s) {bad}" + "".join(
        f" ({t}: did you mean {' or '.join(closest_keys(t, TARGETS))}?)" for t in bad if closest_keys(t, TARGETS))
        + f"; choose from: {', '.join(TARGETS)}"] if bad else []


@dataclass
class MLPProbeConfig(Schema):
    enabled: bool
    hidden: int = rng(ge=1)
    max_iter: int = rng(ge=1)


@dataclass
class _RidgeProbes(Schema):
    """What the linear probes and the readouts share: held-out systems, grouped-CV ridge, the untrained
    control (METHOD §4.1)."""

    enabled: bool
    n_systems: int = rng(ge=2, doc="sequences used, split into train / held out")
    heldout_fraction: float = rng(gt=0, lt=1)
    batch_size: int = rng(ge=1)
    targets: list[str]
    ridge_alphas: RidgeAlphas
    cv_folds: int = rng(ge=2)
    decodable_min_r2: float = rng(le=1)
    untrained_control: bool
    untrained_margin: float = rng(ge=0)

    def _problems(self, prefix: str) -> list[str]:
        return (_target_problems(f"{prefix}.targets", self.targets)
                + _alpha_problems(f"{prefix}.ridge_alphas", self.ridge_alphas))


@dataclass
class LinearProbeConfig(_RidgeProbes):
    """``probe.linear``: ridge (+ small MLP) probes on frozen activations (METHOD §4.1)."""

    max_steps_per_system: Optional[int] = rng(ge=1)
    mlp: MLPProbeConfig = rng()


@dataclass
class AttentionMassConfig(Schema):
    enabled: bool
    windows: list[int] = rng(ge=1, each=True)
    n_systems: int = rng(ge=1)


@dataclass
class ReadoutsConfig(_RidgeProbes):
    """``probe.readouts``: last-position readouts per hook site (Liu et al.)."""

    attention: AttentionMassConfig = rng()


@dataclass
class HeadConfig(Schema):
    """``probe.head``: the fine-tuned force head (METHOD §4.2)."""

    enabled: bool
    protocol: Literal["magnitude", "vector"] = rng()
    lr: float = rng(gt=0)
    steps: int = rng(ge=1)
    batch_size: int = rng(ge=1)
    warmup: int = rng(ge=0)
    weight_decay: float = rng(ge=0)
    betas: tuple[float, float] = rng(ge=0, lt=1, each=True)
    grad_clip: float = rng(ge=0)
    freeze_trunk: bool
    max_train_systems: Optional[int] = rng(ge=1)


@dataclass
class SelectionConfig(Schema):
    """``probe.selection``: held-out states nearest the training states, split into galaxies (§4.3)."""

    n_keep: int = rng(ge=10)
    galaxy_size: int = rng(ge=10, doc="symbolic regression needs at least 10 points")
    seeds: list[int] = rng(doc="one galaxy per seed")
    max_reference: Optional[int] = rng(ge=1)

    def _problems(self, prefix: str) -> list[str]:
        out = []
        if not self.seeds:
            out.append(f"{prefix}.seeds=[] draws no galaxy; fix: e.g. {prefix}.seeds=[0,1,2,3,4]")
        if self.galaxy_size > self.n_keep:
            out.append(f"{prefix}.galaxy_size={self.galaxy_size} exceeds {prefix}.n_keep={self.n_keep} (a galaxy "
                       "is drawn from the n_keep held-out states nearest to the training states); lower the galaxy "
                       "size or raise n_keep")
        return out


@dataclass
class OracleConfig(Schema):
    enabled: bool
    k: int = rng(ge=1, doc="neighbours of the k-NN oracle")
    truth_control: bool
    truth_noise: float = rng(doc="relative Gaussian noise on the true |F|; < 0 turns the truth control off")


@dataclass
class ControlsConfig(Schema):
    memoriser: bool
    oracle_without_m1: bool
    cache_dir: Optional[str]


@dataclass
class VerdictConfig(Schema):
    """``probe.verdict``: thresholds of gravprobe.probes.verdict.compare_to_newton."""

    ci: float = rng(gt=0, lt=1, doc="confidence level")
    tol: float = rng(ge=0)
    r2_min: float = rng(ge=0, le=1)
    snap: float = rng(ge=0, le=0.5)
    margin: float = rng(ge=0)


@dataclass
class ProbeConfig(Schema):
    """``probe``: probing the force law (METHOD §4, gravprobe.probes); defaults in ``conf/probe/default.yaml``."""

    GROUP: typing.ClassVar[str] = "probe"

    protocol: Literal["two_label", "unlabelled"] = rng()
    layers: Union[Literal["all"], list[int]] = rng(doc='"all" or layer indices (0 = embeddings)')
    linear: LinearProbeConfig = rng()
    readouts: ReadoutsConfig = rng()
    head: HeadConfig = rng()
    selection: SelectionConfig = rng()
    oracle: OracleConfig = rng()
    controls: ControlsConfig = rng()
    verdict: VerdictConfig = rng()

    def _problems(self, prefix: str) -> list[str]:
        if isinstance(self.layers, list) and any(x < 0 for x in self.layers):
            return [f"{prefix}.layers={self.layers} must be \"all\" or indices >= 0 (0 = embeddings, i = after "
                    f"block i); fix: {prefix}.layers=all"]
        return []


# --------------------------------------------------------------------------------------------- sr
@dataclass
class SRConfig(Schema):
    """``sr``: symbolic regression (gravprobe.probes.symbolic.fit_equation). ``conf/sr/default.yaml`` (the
    offline Operon engine) and ``conf/sr/pysr.yaml`` (the literature's PySR) set different keys: a key left
    out (``None`` here) takes fit_equation's own default, which is read from those same files."""

    backend: Literal["auto", "operon", "pysr"] = rng()
    transform: Literal["multi", "log", "mixed", "none"] = rng()
    loss: Literal["mse", "l1"] = rng()
    selection: Optional[Literal["parsimony", "score", "best", "accuracy"]] = None
    representations: Optional[list[Literal["log", "mixed", "none"]]] = None
    holdout: Optional[float] = field(default=None, metadata={"ge": 0, "lt": 1})
    search_points: Optional[int] = field(default=None, metadata={"ge": 10})
    tolerance: Optional[float] = field(default=None, metadata={"ge": 0})
    options: dict = field(default_factory=dict)
    representation_options: Optional[dict] = None

    @classmethod
    def check(cls, node: Any, prefix: str | None = None, defaults: Mapping | None = None):
        # no filling from one option's YAML: the keys differ between backends (see the class docstring)
        return super().check(node, "sr" if prefix is None else prefix, defaults={})

    def _problems(self, prefix: str) -> list[str]:
        from gravprobe.probes import symbolic

        out = []
        if self.backend == "operon":
            valid = list(symbolic.OPERON_DEFAULTS)
            out += [unknown_key_message(f"{prefix}.options.{k}", valid) for k in self.options if k not in valid]
            for rep, opts in (self.representation_options or {}).items():
                if rep not in symbolic.REPRESENTATIONS:
                    out.append(unknown_key_message(f"{prefix}.representation_options.{rep}",
                                                   list(symbolic.REPRESENTATIONS)))
                    continue
                out += [unknown_key_message(f"{prefix}.representation_options.{rep}.{k}", valid)
                        for k in (opts or {}) if k not in valid]
        for k in ("n_threads", "restarts", "procs"):
            v = self.options.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                out.append(f"{prefix}.options.{k}={v!r} must be an integer >= 0; fix: {prefix}.options.{k}=0")
        for k in ("population_size", "generations", "max_length", "niterations", "maxsize", "populations"):
            v = self.options.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                out.append(f"{prefix}.options.{k}={v!r} must be an integer >= 1")
        return out

    def fit_kwargs(self, workers: int = 0) -> dict[str, Any]:
        """Keyword arguments of ``fit_equation``: the set keys, ``options`` flattened in
        (``n_threads: 0`` → ``workers`` when given)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "options"}
        options = dict(self.options)
        if "n_threads" in options and int(options["n_threads"] or 0) == 0 and workers:
            options["n_threads"] = int(workers)
        return {**d, **options}


# ------------------------------------------------------------------------------------------- root
@dataclass
class PipelineSection(Schema):
    """``pipeline``: what ``gravprobe run`` trains and where it stops."""

    variants: Union[None, Literal["all"], list[str], str] = rng(doc="attention variants; null = attention.name")
    report: bool
    stop_after: Optional[Literal["generate", "pretrain"]] = rng()


@dataclass
class ReportSection(Schema):
    source: Optional[str]
    literature: Optional[dict]


#: top-level keys holding a config group (typed by their own schema, not by :class:`RootConfig`)
GROUP_KEYS = ("data", "force_data", "model", "attention", "train", "text", "probe", "sr")


@dataclass
class RootConfig(Schema):
    """The top-level keys of ``conf/config.yaml`` (the groups are typed separately)."""

    stage: Literal["generate", "pretrain", "probe", "report", "run"] = rng()
    seed: int = rng(ge=0)
    workers: int = rng(ge=0, doc="0 = all cores")
    threads: int = rng(ge=0, doc="0 = torch's default")
    out: Optional[str] = rng(doc="folder of the data dataset")
    force_out: Optional[str] = rng(doc="folder of the force_data dataset")
    checkpoint: Optional[str] = rng(doc="probe: a checkpoint file")
    device: Literal["auto", "cpu", "cuda"] = rng()
    home: str
    pipeline: PipelineSection = rng()
    report: ReportSection = rng()

    @classmethod
    def check(cls, node: Any, prefix: str | None = None, defaults: Mapping | None = None):
        plain = to_container(node)
        if not isinstance(plain, Mapping):
            return None, [f"the config must be a mapping, got {type(plain).__name__}"]
        top = {k: v for k, v in plain.items() if k not in GROUP_KEYS and k != "hydra"}
        valid = _field_names(cls) + list(GROUP_KEYS)
        unknown = [unknown_key_message(k, valid) for k in top if k not in _field_names(cls)]
        obj, problems = _build(cls, {k: v for k, v in top.items() if k in _field_names(cls)}, "", {})
        return (None if unknown or problems else obj), unknown + problems


# ------------------------------------------------------------------------------------- model / data
#: ranges of GPTConfig fields its constructor does not check (the dataclass itself stays in pretrain.model)
MODEL_RANGES = {"n_layers": {"ge": 1}, "n_heads": {"ge": 1}, "d_model": {"ge": 1}, "block_size": {"ge": 2},
                "rope_base": {"gt": 0}, "mlp_ratio": {"ge": 1}, "dropout": {"ge": 0, "lt": 1},
                "position_scale": {"gt": 0}, "context_noise": {"ge": 0}}


def model_problems(model: Any, attention: Any, n_bins: int | None, label: str = "model") -> tuple[Any, list[str]]:
    """``(GPTConfig or None, problems)`` of a ``model`` node with ``attention`` and the data's ``n_bins``."""
    from gravprobe.pretrain.model import GPTConfig

    m = dict(to_container(model) or {})
    m.pop("name", None)
    hints = typing.get_type_hints(GPTConfig)
    valid = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("orbit_vocab", "text_vocab", "attention")]
    problems = [unknown_key_message(f"model.{k}", valid + ["name"]) for k in m if k not in valid]
    for k in valid:
        if k not in m:
            continue
        ok, conv = _check_value(m[k], hints[k], MODEL_RANGES.get(k, {}))
        if not ok:
            problems.append(_bad_value(f"model.{k}", m[k], hints[k], MODEL_RANGES.get(k, {})))
        else:
            m[k] = conv
    d, h = m.get("d_model"), m.get("n_heads")
    if isinstance(d, int) and isinstance(h, int) and h > 0 and d % h:
        problems.append(f"model.d_model={d} is not divisible by model.n_heads={h} (each head has d_model / n_heads "
                        f"dimensions); fix: model.d_model={max(h, d // h * h)} or a model.n_heads that divides {d}")
    if problems:
        return None, problems
    try:
        cfg = GPTConfig(**m, orbit_vocab=(int(n_bins) + 3) if n_bins else 259, text_vocab=257,
                        attention=to_container(attention) or {})
    except (ValueError, TypeError) as e:
        return None, [f"{label}: {e}" if label != "model" else str(e)]
    return cfg, []


def _dataset_problems(cfg: Any, ds: str) -> tuple[Any, list[str]]:
    from gravprobe.orbits import DatasetSpec

    problems = []

    def positive_int(key: str, minimum: int, why: str = "") -> None:
        val = select(cfg, key)
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < minimum):
            problems.append(f"{key}={val!r} must be an integer >= {minimum}{why}")

    positive_int(f"{ds}.seq_len", 2, " (a sequence needs a dt marker and at least one position)")
    positive_int(f"{ds}.n_systems", 2 if ds == "data" else 1)
    positive_int(f"{ds}.n_bins", 2)
    positive_int(f"{ds}.shard_size", 1)
    node = select(cfg, ds)
    if node is None:
        return None, problems + [f"{ds} is missing; choose a dataset preset ({ds if ds == 'data' else 'data@force_data'}=NAME)"]
    try:
        spec = DatasetSpec.from_config(to_container(node))
    except (ValueError, TypeError, KeyError) as e:
        msg = str(e)
        if "unknown dataset spec keys" in msg:
            from gravprobe.orbits import DatasetSpec as _S

            names = [f.name for f in dataclasses.fields(_S)]
            msg = "; ".join(unknown_key_message(f"{ds}.{k}", names)
                            for k in sorted(set(to_container(node)) - set(names)))
            return None, problems + [msg]
        return None, problems + [f"{ds}: {msg}"]
    return spec, problems


# ----------------------------------------------------------------------------------------- variants
def attention_choices() -> list[str]:
    """Attention variants the pipeline can train: packaged ``conf/attention/*.yaml`` (∩ ``VARIANTS``)."""
    names = sorted(p.name[:-5] for p in (files("gravprobe.conf") / "attention").iterdir()
                   if p.name.endswith(".yaml"))
    try:
        from gravprobe.attention import VARIANTS

        names = [n for n in names if n in VARIANTS]
    except ImportError:  # attention not importable: the config files are the list
        pass
    return names


def _overridden(key: str, overrides: list[str]) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def _as_list(x: Any) -> list:
    if isinstance(x, str):
        return [s.strip() for s in x.split(",") if s.strip()]
    return list(x)


def variants_of(cfg: Any, overrides: list[str] | None = None) -> list[str]:
    """The attention variants a ``run`` trains, in order: ``attention=X`` on the command line alone selects
    X (unless ``pipeline.variants`` is also given there); else ``pipeline.variants`` (``all`` = every
    variant, ``null`` = ``attention.name``)."""
    import logging

    if overrides is None:
        from gravprobe.pipeline import _cli_overrides

        overrides = _cli_overrides()
    name = str(select(cfg, "attention.name"))
    listed = select(cfg, "pipeline.variants")
    if _overridden("attention", overrides) and not _overridden("pipeline.variants", overrides):
        if listed is not None and list(_as_list(listed)) != [name]:
            logging.getLogger("gravprobe.pipeline").info(
                "attention=%s on the command line: training %s only (the preset's pipeline.variants=%s is "
                "ignored; pass pipeline.variants=[...] to train several)", name, name, list(_as_list(listed)))
        return [name]
    if listed is None:
        return [name]
    if isinstance(listed, str) and listed == "all":
        return attention_choices()
    return [str(v) for v in _as_list(to_container(listed))]


# --------------------------------------------------------------------------------------- validation
@dataclass
class ValidatedConfig:
    """The typed sections a stage reads (``None`` for those it does not), after :func:`validate_config`."""

    stage: str
    root: RootConfig
    data: Any = None            # gravprobe.orbits.DatasetSpec
    force_data: Any = None      # gravprobe.orbits.DatasetSpec
    model: Any = None           # gravprobe.pretrain.model.GPTConfig (attention.name's)
    train: TrainConfig | None = None
    text: TextConfig | None = None
    probe: ProbeConfig | None = None
    sr: SRConfig | None = None
    variants: list[str] = field(default_factory=list)


def validate_config(cfg: Any, stage: str | None = None, overrides: list[str] | None = None) -> ValidatedConfig | None:
    """Check every key the ``stage`` reads (default: ``cfg.stage``) before any work; return the typed
    sections, or ``None`` for ``report`` (it reads files, not config groups).

    Raises one :class:`ConfigError` listing every problem. ``overrides`` are the command-line overrides
    (for ``run``: an ``attention=X`` there selects X alone; default: the running Hydra job's).
    """
    stage = str(stage or select(cfg, "stage") or "run")
    if stage not in STAGES:
        raise ConfigError([f"stage={stage!r}; choose from: {', '.join(STAGES)}"])
    root, problems = RootConfig.check(cfg)
    if stage == "report":
        if problems:
            raise ConfigError(problems)
        return None
    groups = STAGES[stage].groups
    out = ValidatedConfig(stage=stage, root=root)
    if "data" in groups:
        out.data, p = _dataset_problems(cfg, "data")
        problems += p
    if "force_data" in groups:
        out.force_data, p = _dataset_problems(cfg, "force_data")
        problems += p
    for name, schema in (("train", TrainConfig), ("text", TextConfig), ("probe", ProbeConfig), ("sr", SRConfig)):
        if name in groups:
            obj, p = schema.check(select(cfg, name))
            setattr(out, name, obj)
            problems += p
    if "attention" in groups:
        choices = attention_choices()
        att = str(select(cfg, "attention.name"))
        if att not in choices:
            problems.append(f"unknown attention variant {att!r} (attention.name); choose from: {', '.join(choices)}")
    if stage == "run":
        problems += _run_problems(cfg, out, overrides)
    elif "model" in groups:
        out.model, p = model_problems(select(cfg, "model"), select(cfg, "attention"), select(cfg, "data.n_bins"))
        problems += p
    if "train" in groups and out.train is not None and out.text is not None and out.train.text_ratio > 0:
        if out.text.source == "files" and not out.text.paths:
            problems.append("train.text_ratio > 0 with text.source=files but text.paths=[]; fix: "
                            "text.paths=[DIR_OR_FILE,...], or text=stdlib, or train.text_ratio=0")
    if stage in ("probe", "run") and out.force_data is not None:
        problems += probe_size_problems(cfg)
        from gravprobe.probes.pipeline import protocol_problems

        if out.probe is not None:
            problems += protocol_problems(cfg)
    if stage == "probe":
        ckpt = select(cfg, "checkpoint")
        if ckpt and not Path(str(ckpt)).expanduser().is_file():
            problems.append(f"checkpoint={ckpt} is not a file; fix: checkpoint=<run>/checkpoints/last.pt of a "
                            "`gravprobe pretrain` or `gravprobe run` folder")
    if stage in ("pretrain", "probe", "run"):
        problems += sequence_length_problems(cfg, stage)
    if stage in ("pretrain", "run") and out.data is not None and select(cfg, "model.orbit_mode") == "continuous":
        if "positions" not in out.data.stored_arrays:
            problems.append(f"data.arrays={list(out.data.stored_arrays)} leaves out ['positions'], which "
                            "model.orbit_mode=continuous reads; add them or set data.arrays=null")
    if problems:
        raise ConfigError(_dedupe(problems))
    return out


def _dedupe(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))


def _run_problems(cfg: Any, out: ValidatedConfig, overrides: list[str] | None) -> list[str]:
    """The ``run`` stage's own checks: variants, the pipeline keys, one model per variant, arrays."""
    problems: list[str] = []
    choices = attention_choices()
    variants = variants_of(cfg, overrides)
    out.variants = variants
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
    if select(cfg, "checkpoint"):
        problems.append("checkpoint= is for `gravprobe probe`; `gravprobe run` trains its own checkpoints "
                        "(drop the override)")
    if out.force_data is not None:
        missing = [n for n in ("states", "forces", "labelled", "bodies") if n not in out.force_data.stored_arrays]
        if missing:
            problems.append(f"force_data.arrays={list(out.force_data.stored_arrays)} leaves out {missing}, which "
                            "the probes read; add them or set force_data.arrays=null")
    if not problems and out.data is not None:
        from gravprobe.pipeline import variant_config

        for v in variants:
            vcfg = variant_config(cfg, v)
            mcfg, p = model_problems(select(vcfg, "model"), select(vcfg, "attention"), out.data.n_bins,
                                     label=f"model ({v})")
            if p:
                problems += p
                break
            if v == select(cfg, "attention.name") or out.model is None:
                out.model = mcfg
    return problems


def sequence_length_problems(cfg: Any, stage: str | None = None) -> list[str]:
    """Every stage's sequence lengths against the model: a learned-position model (``model.position=learned``)
    cannot run beyond ``model.block_size`` tokens, and the probes feed whole ``force_data`` sequences
    (all ``seq_len`` tokens) through it. RoPE models run at any length."""
    out: list[str] = []
    if select(cfg, "model.position") != "learned":
        return out
    block = select(cfg, "model.block_size")
    if not isinstance(block, int):
        return out
    stage = stage or select(cfg, "stage")
    train_len, text_len = select(cfg, "train.seq_len"), select(cfg, "train.text_seq_len")
    if stage in ("pretrain", "run", None):
        for key, val in (("train.seq_len", train_len), ("train.text_seq_len", text_len)):
            if isinstance(val, int) and val > block:
                out.append(f"{key}={val} exceeds model.block_size={block} of a learned-position model; "
                           f"lower {key} or raise model.block_size")
    fd_len = select(cfg, "force_data.seq_len")
    if stage in ("run", "probe", None) and isinstance(fd_len, int) and fd_len > block:
        out.append(f"force_data.seq_len={fd_len} tokens exceeds model.block_size={block} of a learned-position "
                   f"model (the probes run whole force sequences through it); set force_data.seq_len<={block} or "
                   f"raise model.block_size (a learned-position model cannot run longer sequences)")
    return out


def probe_size_problems(cfg: Any) -> list[str]:
    """The probes' selection (METHOD §4.3) needs held-out planet steps in ``force_data``: the sequences
    from ``labelling.full_systems`` on are labelled at only ``partial_steps`` steps, the rest is held out."""
    out: list[str] = []
    fd = "force_data"
    n_sys, seq_len = select(cfg, f"{fd}.n_systems"), select(cfg, f"{fd}.seq_len")
    full, partial = select(cfg, f"{fd}.labelling.full_systems"), select(cfg, f"{fd}.labelling.partial_steps", 0)
    planets = select(cfg, f"{fd}.planets")
    size = select(cfg, "probe.selection.galaxy_size")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (n_sys, seq_len)):
        return out
    if full is None or (isinstance(full, int) and full >= n_sys):
        out.append(f"force_data.labelling.full_systems={full} leaves no partially labelled sequences among "
                   f"force_data.n_systems={n_sys}, so nothing is held out for the probes; set it below n_systems "
                   "(two_body_force: 9,000 of 10,000)")
        return out
    if not isinstance(full, int):
        return out
    k_max = max(int(x) for x in planets) if planets else 1
    star_token = select(cfg, f"{fd}.star_token", True) is not False
    steps = (seq_len - 1) // (k_max + int(star_token))  # time steps per sequence: each planet, then the star
    held = (n_sys - int(full)) * max(0, steps - int(partial or 0))
    if isinstance(size, int) and not isinstance(size, bool):
        # (galaxy_size > n_keep is SelectionConfig's check)
        if held < size:
            out.append(f"force_data holds about {held} held-out planet steps ({n_sys - int(full)} partially labelled "
                       f"sequences × ({steps} steps − {partial} labelled)), fewer than one galaxy of "
                       f"probe.selection.galaxy_size={size}; raise force_data.n_systems / seq_len, lower "
                       "force_data.labelling.full_systems, or lower the galaxy size")
    return out
