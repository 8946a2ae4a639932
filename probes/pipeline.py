"""The ``probe`` stage: checkpoint + force data → probes, fine-tuned head, laws per galaxy, verdicts.

``main(cfg, run_dir)`` (called by ``gravprobe probe``) runs :func:`run_probes`, a short sequence of one
function per probe — :func:`probe_linear` (§4.1), :func:`probe_readouts` (Liu's readouts),
:func:`select_galaxies` (§4.3), :func:`probe_force_head` (§4.2, its laws by :func:`head_laws`),
:func:`run_controls` (§4.4/§4.6) — and writes numbers only (figures are the report's,
``gravprobe.report.draw_figures``) into ``run_dir``:

- ``results.json["probes"]`` = ``{"protocol", "requested", "done", "linear": {target: {layer: r2}},
  "mlp": {...}, "galaxies": [verdict × n_galaxies], "oracle": {"galaxies": [...]}, "truth": {...},
  "oracle_without_m1": {...}, "memoriser": {...}, "counts", "counts_reason", "counts_rule", "head": {...},
  "selection": {...}, "sr": {...}}`` (DESIGN.md "Runs and files"). ``requested`` lists the parts
  ``cfg.probe`` asked for, ``done`` those whose results are written (:func:`requested_parts`,
  :func:`parts_done`): the stage is complete when ``set(requested) <= set(done)``;
- ``results.json["probes"]`` also holds ``linear_probe`` (penalties, edge flags, decodability, the untrained
  control per target and layer), ``untrained`` (the probes of the untrained network) and ``readouts``
  (Liu's last-position readouts, :mod:`gravprobe.probes.readouts`) — docs/results_schema.md;
- ``probes_linear.csv`` (model, probe, layer, target, r2, decodable, alpha, alpha_edge; R² unclipped);
- ``force_head_loss.csv`` (step, loss) of the fine-tuning;
- ``force_predictions.csv`` (source, true, pred): |F| in M☉ AU yr⁻² at every point of the selected pool,
  true and predicted by each source (:data:`SOURCE_TITLES` names them: ``fine-tuned head``,
  ``2-NN oracle``, …);
- ``laws_<source>.npz`` — the data each galaxy's law was fitted on: ``X [n, 3]`` = (r AU, m1, m2 M☉),
  ``y [n]`` (|F| fitted to), ``galaxy [n]`` (the galaxy seed of each point), for ``source`` in ``head``
  (the fine-tuned model), ``oracle`` (2-NN), ``truth`` (true |F| with 1 % noise), ``oracle_no_m1`` (2-NN
  without log m_planet) and ``memoriser`` (the sequence's own labels);
- ``equations_<source>_galaxy<seed>.csv`` — the full Pareto front per galaxy, same sources.

Protocols (``probe.protocol``, METHOD §4.6): ``two_label`` (the literature's; held-out sequences keep 2
labels) or ``unlabelled`` (held-out sequences carry none; force data made with
``force_data.labelling.partial_steps=0``). The model-independent controls are cached by content under
``probe.controls.cache_dir`` (:func:`recover_laws_cached`).

Torch and the model are imported only inside the functions that need them (loading a checkpoint, choosing
the device); this module imports neither matplotlib nor PySR.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp
from gravprobe.probes import symbolic as _symbolic_module
from gravprobe.probes import verdict as _verdict_module
from gravprobe.probes.data import (
    FEATURES,
    PROTOCOLS,
    SR_NAMES,
    PlanetSteps,
    make_galaxies,
    memoriser_predict,
    nearest_training,
    noisy_truth,
    oracle_predict,
    select_nearest,
    sequence_label_counts,
    split_force_data,
)
from gravprobe.probes.force_head import finetune_force_head
from gravprobe.probes.linear import linear_report, probe_part, run_linear_probes
from gravprobe.probes.readouts import run_readouts, untrained_twin
from gravprobe.probes.symbolic import EquationTable, SRResult, evaluate, fit_equation
from gravprobe.probes.verdict import compare_to_newton

from gravprobe.common import arm_label, atomic_write_bytes, atomic_write_json, update_results
from gravprobe.config import (
    HeadConfig,
    LinearProbeConfig,
    ProbeConfig,
    SelectionConfig,
    SRConfig,
    group_defaults,
    select,
    to_container,
)

log = logging.getLogger(__name__)


def probe_config(probe_cfg) -> ProbeConfig:
    """``cfg.probe`` (an OmegaConf node, a dict — missing keys from ``conf/probe/default.yaml`` — or a
    :class:`~gravprobe.config.ProbeConfig`) as the typed, validated section; raises ``ConfigError``."""
    return probe_cfg if isinstance(probe_cfg, ProbeConfig) else ProbeConfig.from_cfg(probe_cfg)


def recover_laws(X: np.ndarray, y: np.ndarray, galaxies: Sequence[np.ndarray], seeds: Sequence[int],
                 sr_kwargs: dict, *, out_dir: str | Path | None = None, tag: str = "head",
                 verdict_kwargs: dict | None = None) -> tuple[list[dict], list[SRResult]]:
    """Fit one law per galaxy and judge it. ``X [P, 3]`` = (r, m1, m2) of the pool, ``y [P]`` the values
    to explain (predicted |F|); ``galaxies`` index the pool. Returns the verdict dicts (DESIGN.md shape
    plus details) and the SR results; writes ``equations_<tag>_galaxy<seed>.csv`` when ``out_dir``."""
    verdicts, fits = [], []
    for seed, idx in zip(seeds, galaxies):
        Xg, yg = X[idx], y[idx]
        t0 = time.perf_counter()
        res = fit_equation(Xg, yg, SR_NAMES, seed=int(seed), **sr_kwargs)
        v = compare_to_newton(res.expression, Xg, yg, SR_NAMES, **(verdict_kwargs or {}))
        d = {"seed": int(seed), "expression": str(res.expression), "newtonian": v.newtonian, "reasons": v.reasons,
             "exponents": v.exponents, "r2_newton": v.r2_newton, "symbolic": v.symbolic,
             "exponents_data": v.exponents_data, "r2_law": v.r2_law, "r2_power_law": v.r2_power_law,
             "power_law": getattr(v, "power_law", None), "mse_ratio": getattr(v, "mse_ratio", None),
             "representation": getattr(res, "representation", None),
             "backend": res.backend, "seconds": time.perf_counter() - t0}
        if out_dir is not None:
            path = res.table.to_csv(Path(out_dir) / f"equations_{tag}_galaxy{seed}.csv")
            d["table"] = path.name
        log.info("%s galaxy %d: %s -> %s", tag, seed, res.expression, "NEWTONIAN" if v.newtonian else "not newtonian")
        verdicts.append(d)
        fits.append(res)
    return verdicts, fits


# ------------------------------------------------------------------------ model-independent controls
#: Bump when the cached content or the way the controls are computed changes (invalidates old files).
CONTROLS_CACHE_VERSION = 1

NOT_APPLICABLE = "not applicable: no labels in held-out sequences"

#: The rule behind ``results.json["probes"]["counts"]`` (METHOD §4.6).
COUNTS_RULE = ("a model result counts only where it beats the memoriser's protocol: under two_label, the "
               "fine-tuned model's laws must be Newtonian in more galaxies than the label memoriser's (which "
               "passes by reading its own sequence's labels); under unlabelled, the memoriser has no labels "
               "and cannot run, so the result counts (Newtonian or not); no model galaxies -> does not count")


@dataclass
class CachedLaw:
    """A law read back from the controls cache: the chosen ``expression`` and ``predict`` like SRResult."""

    expression: Any
    names: tuple[str, ...] = SR_NAMES

    def predict(self, X: np.ndarray) -> np.ndarray:
        return evaluate(self.expression, self.names, X)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _regression_code_digest() -> str:
    """sha256 of the code that turns values into verdicts (``symbolic.py``, ``verdict.py``) and the SR
    engines' versions, so that a cache written by other code is not reused."""
    h = hashlib.sha256()
    for mod in (_symbolic_module, _verdict_module):
        h.update(Path(mod.__file__).read_bytes())
    for dist in ("pyoperon", "pysr", "sympy"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    return h.hexdigest()


def controls_cache_key(X: np.ndarray, y: np.ndarray, galaxies: Sequence[np.ndarray], seeds: Sequence[int],
                       sr_kwargs: dict, verdict_kwargs: dict | None) -> str:
    """sha256 of everything a control's laws depend on: the pool's SR inputs ``X [P, 3]``, the values
    ``y [P]``, the galaxies (indices into the pool) and their seeds, the SR settings, the verdict
    thresholds and the regression code (:func:`_regression_code_digest`). ``X``/``y``/galaxies are
    themselves functions of the force dataset, the protocol, the selection settings and the seed, so the
    key covers those without naming them, and cannot go stale."""
    data = _digest(np.asarray(X, np.float64), np.asarray(y, np.float64),
                   *[np.asarray(g, np.int64) for g in galaxies])
    payload = {"version": CONTROLS_CACHE_VERSION, "data": data, "code": _regression_code_digest(),
               "seeds": [int(s) for s in seeds], "sr": sr_kwargs, "verdict": verdict_kwargs or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read_cache(path: Path, key: str, n: int) -> dict | None:
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        if d.get("key") != key or len(d["verdicts"]) != n or len(d["tables"]) != n:
            raise ValueError("key or length mismatch")
        for v in d["verdicts"]:
            sp.sympify(v["expression"])
        return d
    except Exception as e:  # noqa: BLE001 - any unreadable cache is recomputed and rewritten
        log.warning("controls cache %s is unreadable (%s): ignoring it, it will be rewritten", path, e)
        return None


def recover_laws_cached(X: np.ndarray, y: np.ndarray, galaxies: Sequence[np.ndarray], seeds: Sequence[int],
                        sr_kwargs: dict, *, cache_dir: str | Path | None, out_dir: str | Path | None = None,
                        tag: str = "oracle", verdict_kwargs: dict | None = None
                        ) -> tuple[list[dict], list, bool]:
    """:func:`recover_laws` for a model-independent control, through the cache
    ``cache_dir/<tag>-<key>.json``
    (:func:`controls_cache_key`; ``cache_dir=None`` disables it). Returns ``(verdicts, laws, cached)``;
    on a hit nothing is fitted, the equation tables are rewritten into ``out_dir`` from the cache and the
    ``laws`` are :class:`CachedLaw`. A corrupt file is logged, ignored and rewritten."""
    if cache_dir is None:
        v, fits = recover_laws(X, y, galaxies, seeds, sr_kwargs, out_dir=out_dir, tag=tag,
                               verdict_kwargs=verdict_kwargs)
        return v, fits, False
    key = controls_cache_key(X, y, galaxies, seeds, sr_kwargs, verdict_kwargs)
    path = Path(cache_dir) / f"{tag}-{key[:24]}.json"
    hit = _read_cache(path, key, len(galaxies))
    if hit is not None:
        log.info("%s: laws read from the controls cache %s (no symbolic regression)", tag, path)
        symbols = {n: sp.Symbol(n, positive=True) for n in SR_NAMES}
        laws = [CachedLaw(sp.sympify(v["expression"], locals=symbols)) for v in hit["verdicts"]]
        verdicts = [dict(v) for v in hit["verdicts"]]
        if out_dir is not None:
            for v, rows in zip(verdicts, hit["tables"]):
                csv_path = Path(out_dir) / f"equations_{tag}_galaxy{v['seed']}.csv"
                v["table"] = EquationTable(rows).to_csv(csv_path).name
        return verdicts, laws, True
    verdicts, fits = recover_laws(X, y, galaxies, seeds, sr_kwargs, out_dir=out_dir, tag=tag,
                                  verdict_kwargs=verdict_kwargs)
    try:
        atomic_write_json(path, {"key": key, "tag": tag, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "n_pool": len(y), "seeds": [int(s) for s in seeds], "sr": sr_kwargs,
                                 "verdicts": verdicts, "tables": [f.table.to_records() for f in fits]})
        log.info("%s: laws cached in %s", tag, path)
    except OSError as e:
        log.warning("could not write the controls cache %s (%s); continuing without it", path, e)
    return verdicts, fits, False


def protocol_problems(cfg) -> list[str]:
    """``probe.protocol`` checked against ``force_data.labelling`` from the config alone, so that
    ``gravprobe run`` can refuse a mismatch before any training (:func:`split_force_data` checks the data
    itself at the probe stage). Returns one sentence per problem, naming the keys and the fix."""
    protocol = str(select(cfg, "probe.protocol", group_defaults("probe")["protocol"]))
    if protocol not in PROTOCOLS:
        return [f"probe.protocol={protocol!r} is not a protocol; choose one of {', '.join(PROTOCOLS)}"]
    if select(cfg, "force_data.labelling") is None:
        return []
    from gravprobe.orbits import DatasetSpec

    try:  # labelling keys left out take DatasetSpec's values
        ps = DatasetSpec.from_config(to_container(select(cfg, "force_data"))).labelling["partial_steps"]
    except (ValueError, TypeError, KeyError):
        return []  # a bad force_data is reported by its own check (gravprobe.config.validate_config)
    if protocol == "unlabelled" and int(ps) != 0:
        return [(f"probe.protocol=unlabelled needs held-out sequences without any label, but "
                 f"force_data.labelling.partial_steps={ps}; set force_data.labelling.partial_steps=0 "
                 "(or use probe.protocol=two_label, the literature's protocol)")]
    if protocol == "two_label" and int(ps) == 0:
        return [("probe.protocol=two_label holds out the unlabelled steps of partially labelled sequences, "
                 "but force_data.labelling.partial_steps=0 leaves them without labels; set "
                 "probe.protocol=unlabelled or force_data.labelling.partial_steps=2 (the literature's)")]
    return []


def requested_parts(pc) -> list[str]:
    """The parts of the probe stage that ``cfg.probe`` asks for, as they are named in
    ``results.json["probes"]["requested"]`` and ``["done"]`` (see :func:`parts_done`)."""
    pc = probe_config(pc)
    parts = [p for p in ("linear", "readouts", "head") if getattr(pc, p).enabled]
    if pc.oracle.enabled:
        parts.append("oracle")
        if pc.oracle.truth_control and pc.oracle.truth_noise >= 0:
            parts.append("truth")
    if pc.controls.memoriser:
        parts.append("memoriser")
    if pc.controls.oracle_without_m1:
        parts.append("oracle_without_m1")
    return parts


def parts_done(out: dict) -> list[str]:
    """The parts whose results are in ``out`` (the ``probes`` section): ``linear`` / ``readouts`` when
    non-empty, ``head`` when the model's galaxies are there, a control when its galaxies are there (the
    memoriser also when it was found not applicable)."""
    done = [p for p in ("linear", "readouts") if out.get(p)]
    if out.get("galaxies"):
        done.append("head")
    for c in ("oracle", "truth", "oracle_without_m1", "memoriser"):
        sec = out.get(c) or {}
        if sec.get("galaxies") or (c == "memoriser" and sec.get("applicable") is False):
            done.append(c)
    return done


def result_counts(protocol: str, model_galaxies: list[dict], memoriser: dict | None) -> tuple[bool, str]:
    """``(counts, reason)`` under :data:`COUNTS_RULE`."""
    if not model_galaxies:
        return False, "no model galaxies (probe.head disabled or not run)"
    n_model = sum(bool(g["newtonian"]) for g in model_galaxies)
    if protocol == "unlabelled":
        return True, (f"unlabelled protocol: the memoriser cannot run; the model is Newtonian in {n_model} "
                      f"of {len(model_galaxies)} galaxies")
    if not memoriser or not memoriser.get("galaxies"):
        return False, ("two_label protocol without the memoriser control (probe.controls.memoriser=false): "
                       "the result cannot be told from memorisation")
    n_mem = sum(bool(g["newtonian"]) for g in memoriser["galaxies"])
    return n_model > n_mem, (f"two_label protocol: model Newtonian in {n_model}, memoriser in {n_mem} of "
                             f"{len(model_galaxies)} galaxies")


def source_titles(k: int = 2) -> dict[str, str]:
    """The name of each source of |F| in ``force_predictions.csv`` (and the figures), by its section in
    ``results.json["probes"]``: ``galaxies`` (the fine-tuned head) and the controls (``k``-NN oracles)."""
    return {"galaxies": "fine-tuned head", "oracle": f"{k}-NN oracle", "truth": "true |F| with noise",
            "oracle_without_m1": f"{k}-NN oracle without m1", "memoriser": "label memoriser"}


#: The file tag of each source (``laws_<tag>.npz``, ``equations_<tag>_galaxy<seed>.csv``) by section.
SOURCE_TAGS = {"galaxies": "head", "oracle": "oracle", "truth": "truth", "oracle_without_m1": "oracle_no_m1",
               "memoriser": "memoriser"}


def run_controls(train: PlanetSteps, pool: PlanetSteps, galaxies: Sequence[np.ndarray], seeds: Sequence[int],
                 pc, *, protocol: str, seed: int, sr_kwargs: dict, verdict_kwargs: dict | None,
                 run_dir: Path, cache_dir: str | Path | None) -> tuple[dict, dict]:
    """The model-independent controls of METHOD §4.4/§4.6 on the selected ``pool`` (the model's pool),
    through the same galaxies, regression and verdict: the k-NN oracle, the noisy truth, the oracle without
    m1 and the label memoriser. Writes ``laws_<tag>.npz`` and the equation tables of each control that ran.
    Returns ``(sections, predictions)``: the ``results.json["probes"]`` sections by name and the (true,
    predicted) |F| at the pool per control, keyed by its :func:`source_titles` name."""
    pc = probe_config(pc)
    orc, ctl = pc.oracle, pc.controls
    k = orc.k
    X = pool.sr_inputs
    jobs: list[tuple[str, dict, Any]] = []  # (section, extra fields, () -> y, or None when not applicable)

    def oracle(exclude=()):
        return lambda: oracle_predict(train.state, train.magnitude, pool.state, k=k, exclude=exclude)

    if orc.enabled:
        jobs.append(("oracle", {"k": k}, oracle()))
        noise = orc.truth_noise
        if noise >= 0 and orc.truth_control:
            jobs.append(("truth", {"noise": noise}, lambda: noisy_truth(pool.magnitude, noise, seed)))
    if ctl.oracle_without_m1:
        feats = [f for f in FEATURES if f != "log_m_planet"]
        jobs.append(("oracle_without_m1", {"k": k, "features": feats}, oracle(("log_m_planet",))))
    if ctl.memoriser:
        extra = {"r_from": "true state", "applicable": protocol != "unlabelled"}
        jobs.append(("memoriser", extra,
                     None if protocol == "unlabelled" else (lambda: memoriser_predict(train, pool))))
    titles = source_titles(k)
    sections: dict[str, dict] = {}
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, extra, make_y in jobs:
        if make_y is None:
            sections[name] = {**extra, "note": NOT_APPLICABLE, "galaxies": []}
            log.info("%s: %s (%s protocol)", name, NOT_APPLICABLE, protocol)
            continue
        y = make_y()
        tag = SOURCE_TAGS[name]
        verdicts, _, cached = recover_laws_cached(X, y, galaxies, seeds, sr_kwargs, cache_dir=cache_dir,
                                                  out_dir=run_dir, tag=tag, verdict_kwargs=verdict_kwargs)
        sections[name] = {**extra, "cached": cached, "galaxies": verdicts}
        predictions[titles[name]] = (pool.magnitude, y)
        write_law_data(run_dir, tag, X, y, galaxies, seeds)
    return sections, predictions


# ------------------------------------------------------------------------ numbers for the report's figures
def _write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` (dicts with the same keys) as a CSV with a header, written atomically; nothing when empty."""
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode(), what=f"the probe table {Path(path).name}")


def write_law_data(run_dir: str | Path, tag: str, X: np.ndarray, y: np.ndarray, galaxies: Sequence[np.ndarray],
                   seeds: Sequence[int]) -> Path:
    """``run_dir/laws_<tag>.npz``: the points each galaxy's law was fitted on, galaxy after galaxy — ``X``
    ``[n, 3]`` float64 (r AU, m1 M☉, m2 M☉), ``y`` ``[n]`` float64 (|F| fitted to, M☉ AU yr⁻²) and
    ``galaxy`` ``[n]`` int64 (the seed of the point's galaxy); ``n`` = the sum of the galaxy sizes.
    ``X``/``y`` are the pool's, ``galaxies`` index it. The report draws each law against these points."""
    if len(galaxies) != len(seeds):
        raise ValueError(f"write_law_data: {len(galaxies)} galaxies but {len(seeds)} seeds; one seed per galaxy")
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    idx = [np.asarray(g, np.int64) for g in galaxies]
    buf = io.BytesIO()
    np.savez(buf, X=np.concatenate([X[g] for g in idx]) if idx else np.zeros((0, 3)),
             y=np.concatenate([y[g] for g in idx]) if idx else np.zeros(0),
             galaxy=np.concatenate([np.full(len(g), int(s), np.int64) for g, s in zip(idx, seeds)])
             if idx else np.zeros(0, np.int64))
    path = Path(run_dir) / f"laws_{tag}.npz"
    atomic_write_bytes(path, buf.getvalue(), what=f"the {tag} laws' data")
    return path


def write_force_predictions(predictions: dict[str, tuple[np.ndarray, np.ndarray]], run_dir: str | Path
                            ) -> Path | None:
    """``run_dir/force_predictions.csv`` with columns ``source,true,pred``: one row per point of the pool
    and source, |F| in M☉ AU yr⁻² (``repr`` precision, so the file reads back to the same floats). ``None``
    (no file) when there is nothing to write."""
    rows = [{"source": name, "true": repr(float(t)), "pred": repr(float(p))}
            for name, (true, pred) in predictions.items() for t, p in zip(true, pred)]
    if not rows:
        return None
    path = Path(run_dir) / "force_predictions.csv"
    _write_csv(rows, path)
    return path


def _nested(rows: list[dict], probe: str) -> dict:
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["probe"] == probe:
            out.setdefault(r["target"], {})[str(r["layer"])] = r["r2"]
    return out


# -------------------------------------------------------------------------------------------- main
def _device(cfg) -> str:
    want = str(select(cfg, "device"))
    if want == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def load_force_data(cfg):
    """Ensure and open the ``cfg.force_data`` dataset (same convention as pretrain/the pipeline)."""
    from gravprobe.orbits import config_dataset_path, ensure_dataset, load_dataset

    spec, path = config_dataset_path(cfg, "force_data")  # ${home}/data/<name>-<hash8>-s<seed>, or force_out=
    path = ensure_dataset(spec, path, seed=int(cfg.seed), workers=int(cfg.workers))
    return load_dataset(path)


def load_model(cfg, run_dir: Path, device: str):
    from gravprobe.pretrain import load_checkpoint

    ckpt = select(cfg, "checkpoint") or Path(run_dir) / "checkpoints" / "last.pt"
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint at {ckpt}: pass checkpoint=PATH (a pretrain run's "
                                "checkpoints/last.pt) or run `gravprobe run` so pretrain writes one in this run")
    model, meta = load_checkpoint(ckpt, map_location=device)
    log.info("probing checkpoint %s", ckpt)
    return model.to(device), meta, ckpt


def linear_section(model, ds, lin, layers, run_dir: Path, *, seed: int, device: str = "cpu") -> dict:
    """§4.1 probes of ``model`` and (``probe.linear.untrained_control``) of its untrained twin on the same
    sequences and split; writes ``probes_linear.csv`` (column ``model``: trained | untrained); returns the
    ``results.json["probes"]`` keys ``linear``, ``mlp``, ``linear_probe`` and ``untrained``
    (docs/results_schema.md). ``lin``: ``probe.linear`` (keys left out: ``conf/probe/default.yaml``'s)."""
    lin_cfg: LinearProbeConfig = probe_part("linear", lin)
    rows = run_linear_probes(model, ds, lin_cfg, layers=layers, seed=seed, device=device)
    rows_u: list[dict] = []
    if lin_cfg.untrained_control:
        rows_u = run_linear_probes(untrained_twin(model, seed, device), ds, lin_cfg, layers=layers, seed=seed,
                                   device=device)
    _write_csv([{"model": "trained", **r} for r in rows] + [{"model": "untrained", **r} for r in rows_u],
               run_dir / "probes_linear.csv")
    sec: dict[str, Any] = {"linear": _nested(rows, "ridge"), "linear_probe": linear_report(rows, rows_u, lin_cfg)}
    if any(r["probe"] == "mlp" for r in rows):
        sec["mlp"] = _nested(rows, "mlp")
    if rows_u:
        sec["untrained"] = {"seed": seed, "linear": _nested(rows_u, "ridge")}
        if any(r["probe"] == "mlp" for r in rows_u):
            sec["untrained"]["mlp"] = _nested(rows_u, "mlp")
    nd = sec["linear_probe"]["not_decodable"]
    if nd:
        log.info("linear probes: not decodable at any layer (best held-out R² < %s): %s",
                 sec["linear_probe"]["decodable_min_r2"], ", ".join(nd))
    return sec


def probe_linear(model, ds, probe_cfg, run_dir: Path, *, seed: int, device: str = "cpu") -> dict:
    """§4.1, on the pretrained weights (before the head fine-tunes the trunk): :func:`linear_section`, or
    ``{"linear": {}}`` when ``probe.linear`` is disabled."""
    pc = probe_config(probe_cfg)
    if not pc.linear.enabled:
        return {"linear": {}}
    return linear_section(model, ds, pc.linear, pc.layers, run_dir, seed=seed, device=device)


def probe_readouts(model, ds, probe_cfg, *, seed: int, device: str = "cpu") -> dict:
    """Liu's last-position readouts per hook site with their untrained control, on the pretrained weights:
    ``{"readouts": ...}`` (:func:`gravprobe.probes.readouts.run_readouts`), or ``{}`` when disabled."""
    pc = probe_config(probe_cfg)
    if not pc.readouts.enabled:
        return {}
    return {"readouts": run_readouts(model, ds, pc.readouts, seed=seed, device=device)}


@dataclass
class GalaxySelection:
    """The §4.3 selection: ``order`` indexes the held-out steps (nearest to a training state first),
    ``pool`` = those held-out steps, ``galaxies`` index the pool (one array per seed of ``seeds``), and
    ``summary`` is ``results.json["probes"]["selection"]``."""

    order: np.ndarray
    pool: PlanetSteps
    galaxies: list[np.ndarray]
    seeds: list[int]
    summary: dict


def select_galaxies(train: PlanetSteps, held: PlanetSteps, selection_cfg, *, protocol: str, seed: int
                    ) -> GalaxySelection:
    """§4.3: the reference = the training states (labelled steps, only sequences that carry labels); the
    pool = the ``n_keep`` held-out steps nearest to them; ``galaxy_size`` points per galaxy seed. Also
    measures how often the nearest training state lies in the state's own sequence — over all training
    states (the oracle's first neighbour) and over the selection's reference (a seeded subsample beyond
    ``max_reference``)."""
    sel: SelectionConfig = probe_part("selection", selection_cfg)
    max_ref = sel.max_reference
    order, dist, nearest = select_nearest(train.state, held.state, sel.n_keep,
                                          max_reference=max_ref, seed=seed, return_nearest=True)
    seeds = [int(s) for s in sel.seeds]
    size = min(sel.galaxy_size, len(order))
    galaxies = make_galaxies(len(order), size, seeds)
    pool = held.subset(order)
    subsampled = max_ref is not None and len(train) > int(max_ref)
    same_ref = train.system[nearest] == pool.system
    same_seq = train.system[nearest_training(train.state, pool.state)] == pool.system if subsampled else same_ref
    summary = {"protocol": protocol, "reference": "labelled planet steps",
               "n_training_states": len(train),
               "n_reference_sequences": len(np.unique(train.system)),
               "n_heldout_states": len(held), "n_heldout_sequences": len(np.unique(held.system)),
               "n_pool": len(order), "galaxy_size": size, "seeds": seeds,
               "max_distance": float(dist.max()),
               "same_sequence_fraction": float(same_seq.mean()),
               "same_sequence_fraction_reference": float(same_ref.mean()),
               "reference_subsampled": subsampled,
               "same_sequence_fraction_galaxies": [float(same_seq[g].mean()) for g in galaxies]}
    log.info("selection (%s protocol): %.1f %% of the %d selected states have their nearest training state "
             "in their own sequence", protocol, 100 * same_seq.mean(), len(order))
    return GalaxySelection(order, pool, galaxies, seeds, summary)


def head_training_systems(ds, held: PlanetSteps, head_cfg, *, protocol: str, seed: int) -> np.ndarray:
    """The sequences the head fine-tunes on: all, or ``probe.head.max_train_systems`` of them drawn with
    ``default_rng(seed)`` plus every held-out sequence (they are queried; under ``unlabelled`` they hold no
    label, so they are not among the drawn ones)."""
    n = ds.states.shape[0]
    heldout_systems = np.unique(held.system)
    max_train = probe_part("head", head_cfg).max_train_systems
    if not max_train:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    candidates = np.arange(n) if protocol == "two_label" else np.setdiff1d(np.arange(n), heldout_systems)
    picked = rng.choice(candidates, min(int(max_train), len(candidates)), replace=False)
    return np.union1d(picked, heldout_systems)


def probe_force_head(model, ds, held: PlanetSteps, selection: GalaxySelection, head_cfg, run_dir: Path, *,
                     protocol: str, seed: int, device: str = "cpu") -> tuple[dict, np.ndarray]:
    """§4.2: fine-tune the trunk and a new head on the labelled steps, predict |F| at every held-out step.
    Writes ``force_head_loss.csv``; returns ``(results.json["probes"]["head"], predicted |F| at the pool
    [n_pool] in M☉ AU yr⁻²)``."""
    head: HeadConfig = probe_part("head", head_cfg)
    train_systems = head_training_systems(ds, held, head, protocol=protocol, seed=seed)
    heldout_systems = np.unique(held.system)
    query_mask = (np.asarray(ds.bodies[heldout_systems]) >= 1) & ~np.asarray(ds.labelled[heldout_systems], bool)
    res = finetune_force_head(model, ds, train_systems, heldout_systems, query_mask, head, seed=seed,
                              device=device)
    if len(res.pred_magnitude) != len(held):  # pragma: no cover - ordering contract
        raise RuntimeError("force-head predictions do not line up with the held-out steps")
    predicted = res.pred_magnitude[selection.order]
    true = selection.pool.magnitude
    _write_csv([{"step": i, "loss": l} for i, l in enumerate(res.losses)], run_dir / "force_head_loss.csv")
    positive = predicted > 0
    abs_log_error = np.abs(np.log(predicted[positive]) - np.log(true[positive]))
    labels_per_sequence, _ = sequence_label_counts(ds)
    section = {"protocol": res.protocol, "steps": len(res.losses),
               "n_train_sequences_with_labels": int((labels_per_sequence[train_systems] > 0).sum()),
               "loss": {"first": res.losses[0] if res.losses else None,
                        "last": float(np.mean(res.losses[-20:])) if res.losses else None},
               "median_abs_log_error": float(np.median(abs_log_error)) if positive.any() else None}
    return section, predicted


def head_laws(selection: GalaxySelection, predicted: np.ndarray, run_dir: Path, *, sr_kwargs: dict,
              verdict_kwargs: dict | None) -> list[dict]:
    """The fine-tuned model's law per galaxy and its verdict (``results.json["probes"]["galaxies"]``);
    writes ``laws_head.npz`` and ``equations_head_galaxy<seed>.csv``."""
    X = selection.pool.sr_inputs
    verdicts, _ = recover_laws(X, predicted, selection.galaxies, selection.seeds, sr_kwargs, out_dir=run_dir,
                               tag="head", verdict_kwargs=verdict_kwargs)
    write_law_data(run_dir, "head", X, predicted, selection.galaxies, selection.seeds)
    return verdicts


def run_probes(model, ds, cfg, run_dir: Path, *, device: str = "cpu") -> dict:
    """Everything after loading, in order (module docstring): the frozen-model probes, the selection, the
    fine-tuned head and its laws (saved at once, so they survive an interruption of the controls), the
    controls, the counts rule; writes the numbers files and ``results.json["probes"]``, which it returns."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    probe_cfg = probe_config(cfg.probe)
    seed = int(cfg.seed)
    protocol = probe_cfg.protocol
    out: dict[str, Any] = {"protocol": protocol, "requested": requested_parts(probe_cfg), "done": []}
    train, held = split_force_data(ds, protocol)   # checks the dataset against probe.protocol before any work

    out.update(probe_linear(model, ds, probe_cfg, run_dir, seed=seed, device=device))
    out.update(probe_readouts(model, ds, probe_cfg, seed=seed, device=device))
    selection = select_galaxies(train, held, probe_cfg.selection, protocol=protocol, seed=seed)
    out["selection"] = selection.summary
    sr_kwargs = SRConfig.from_cfg(cfg.sr).fit_kwargs(int(cfg.workers))
    verdict_kwargs = probe_cfg.verdict.to_dict()
    out["sr"] = dict(sr_kwargs)

    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out["galaxies"] = []
    if probe_cfg.head.enabled:
        out["head"], predicted = probe_force_head(model, ds, held, selection, probe_cfg.head, run_dir,
                                                  protocol=protocol, seed=seed, device=device)
        predictions[source_titles()["galaxies"]] = (selection.pool.magnitude, predicted)
        out["galaxies"] = head_laws(selection, predicted, run_dir, sr_kwargs=sr_kwargs,
                                    verdict_kwargs=verdict_kwargs)
        out["done"] = parts_done(out)
        update_results(run_dir, "probes", out)

    # model-independent controls, through the same selection, galaxies, regression and verdict (cached by
    # content under probe.controls.cache_dir: a study on one dataset fits them once)
    controls, control_predictions = run_controls(
        train, selection.pool, selection.galaxies, selection.seeds, probe_cfg, protocol=protocol, seed=seed,
        sr_kwargs=sr_kwargs, verdict_kwargs=verdict_kwargs, run_dir=run_dir,
        cache_dir=probe_cfg.controls.cache_dir)
    out.update(controls)
    predictions.update(control_predictions)
    counts, reason = result_counts(protocol, out["galaxies"], out.get("memoriser"))
    out.update({"counts": counts, "counts_reason": reason, "counts_rule": COUNTS_RULE})
    log.info("result counts: %s (%s)", counts, reason)
    write_force_predictions(predictions, run_dir)
    out["done"] = parts_done(out)
    update_results(run_dir, "probes", out)
    return out


def main(cfg, run_dir) -> dict:
    """``gravprobe probe``: see the module docstring. Returns a small summary."""
    run_dir = Path(run_dir)
    device = _device(cfg)
    ds = load_force_data(cfg)
    model, meta, ckpt = load_model(cfg, run_dir, device)
    out = run_probes(model, ds, cfg, run_dir, device=device)
    # which model was probed: a probe-only folder names its arm from the checkpoint, not from cfg.attention
    att = (meta.get("model_config") or {}).get("attention") or {}
    out = update_results(run_dir, "probes", {**out, "attention": att.get("name"), "arm": arm_label(att),
                                             "checkpoint": str(ckpt)})["probes"]
    summary = {"checkpoint": str(ckpt),
               "newtonian_galaxies": sum(g["newtonian"] for g in out.get("galaxies", [])),
               "oracle_newtonian_galaxies": (sum(g["newtonian"] for g in out["oracle"]["galaxies"]) if (out.get("oracle") or {}).get("galaxies") else "not run here (probe.oracle.enabled=false: under `gravprobe run` the model-independent controls are computed once, with the first variant, and shared)"),
               "n_galaxies": len(out.get("galaxies", [])), "protocol": out.get("protocol"),
               "counts": out.get("counts")}
    log.info("probe summary: %s", summary)
    return summary
