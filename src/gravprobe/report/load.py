"""Loading: run and sweep folders as Python objects, and the number files the stages write.

Nothing here draws or formats; ``tables`` computes from these objects, ``figures`` draws them and
``markdown`` writes ``report.md``. Readers never import torch (a report needs matplotlib, not a GPU stack).

Files read (docs/results_schema.md): ``results.json`` and ``config.yaml`` of every run folder;
``.hydra/overrides.yaml`` of sweep jobs; in a stage folder the number files the figures are drawn from:
``metrics.csv`` (pretraining curves), ``probes_linear.csv`` (linear-probe R² per layer and target),
``force_predictions.csv`` (predicted and true |F| per labelled held-out point, by source) and
``laws_<source>.npz`` (the regression inputs and targets of every galaxy, by source).
"""
from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gravprobe.config import STAGES

log = logging.getLogger(__name__)

#: The ``results.json`` sections a complete stage folder holds: each stage's own
#: (:data:`gravprobe.config.STAGES`) plus ``variant``, one variant's folder inside a ``gravprobe run`` folder.
STAGE_SECTIONS = {**{name: s.sections for name, s in STAGES.items() if s.sections},
                  "variant": STAGES["run"].sections}


class ReportError(ValueError):
    """The folder given to the report is not a run or sweep folder."""


# ----------------------------------------------------------------------------------------- loading
@dataclass
class VariantResult:
    """One attention variant's results inside one run.

    ``pretrain`` / ``probes`` are the sections of its ``results.json`` (``None`` when absent);
    ``missing`` names every expected piece that is not there.
    """

    name: str
    dir: Path
    pretrain: dict | None = None
    probes: dict | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def galaxies(self) -> list[dict]:
        return list((self.probes or {}).get("galaxies") or [])

    @property
    def oracle_galaxies(self) -> list[dict]:
        return list(((self.probes or {}).get("oracle") or {}).get("galaxies") or [])


@dataclass
class RunResult:
    """One run folder (any stage). ``variants`` in the order the run names them."""

    dir: Path
    stage: str
    config: dict
    variants: dict[str, VariantResult]
    pipeline: dict | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def oracle(self) -> list[dict]:
        """The oracle's galaxies (METHOD §4.4), from whichever variant's probes hold them."""
        for v in self.variants.values():
            if v.oracle_galaxies:
                return v.oracle_galaxies
        return []

    @property
    def truth(self) -> list[dict]:
        """The noisy-truth control's galaxies (true |F| with small noise through the same regression)."""
        for v in self.variants.values():
            gals = (((v.probes or {}).get("truth") or {}).get("galaxies")) or []
            if gals:
                return list(gals)
        return []

    def control(self, name: str) -> dict:
        """A model-independent control's section (``oracle``, ``truth``, ``oracle_without_m1``,
        ``memoriser``; METHOD §4.4/§4.6) from whichever variant's probes hold it, ``{}`` when none does."""
        for v in self.variants.values():
            sec = (v.probes or {}).get(name)
            if isinstance(sec, dict) and (sec.get("galaxies") or sec.get("note")):
                return sec
        return {}

    @property
    def problems(self) -> list[str]:
        out = list(self.missing)
        for v in self.variants.values():
            out += [f"{v.name}: {m}" for m in v.missing]
        return out

    @property
    def complete(self) -> bool:
        return not self.problems


@dataclass
class SweepResult:
    """A ``--multirun`` folder: one ``RunResult`` per job folder, in job order."""

    dir: Path
    runs: list[RunResult]
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems and all(r.complete for r in self.runs)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON ({e}); the stage that wrote it was interrupted or the "
                          "file was edited by hand — rerun that stage") from e


def _read_config(run_dir: Path, results: dict | None) -> dict:
    if results and isinstance(results.get("config"), dict):
        return results["config"]
    for cand in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if cand.exists():
            from omegaconf import OmegaConf

            try:
                return OmegaConf.to_container(OmegaConf.load(cand), resolve=False)  # type: ignore[return-value]
            except Exception as e:  # noqa: BLE001 - an unparsable config is reported, not fatal
                log.warning("cannot read %s: %s", cand, e)
    return {}


def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "results.json").exists() or (path / "config.yaml").exists() or (path / ".hydra").is_dir()


def is_sweep_dir(path: Path) -> bool:
    path = Path(path)
    if (path / "multirun.yaml").exists():
        return True
    return not is_run_dir(path) and any(is_run_dir(p) for p in path.iterdir() if p.is_dir())


def _variant_of(stage_dir: Path, name: str, expected: Iterable[str], need_checkpoint: bool) -> VariantResult:
    res = _read_json(stage_dir / "results.json") or {}
    v = VariantResult(name=name, dir=stage_dir, pretrain=res.get("pretrain"), probes=res.get("probes"))
    if not stage_dir.is_dir():
        v.missing.append(f"folder {stage_dir.name}/ missing (nothing ran for this variant)")
        return v
    for section in expected:
        if not res.get(section):
            v.missing.append(f"{section} missing (no '{section}' in {stage_dir.name}/results.json)")
    if need_checkpoint and not (stage_dir / "checkpoints" / "last.pt").exists():
        v.missing.append("checkpoint missing (checkpoints/last.pt)")
    req, done = (v.probes or {}).get("requested"), (v.probes or {}).get("done")
    if isinstance(req, list) and isinstance(done, list):
        # the probe stage says what its config asked for and what it wrote: that subset is what counts
        v.missing += [f"probes: {part} missing" for part in req if part not in done]
    elif v.probes is not None and v.probes.get("galaxies") is not None and len(v.galaxies) == 0:
        v.missing.append("probes have no galaxies")
    return v


def load_run(path: str | Path) -> RunResult:
    """Read one run folder (``gravprobe run``, ``pretrain`` or ``probe``) into a ``RunResult``."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder")
    results = _read_json(path / "results.json")
    config = _read_config(path, results)
    stage = str(config.get("stage") or ("run" if (results or {}).get("pipeline") else "")) or "unknown"
    run = RunResult(dir=path, stage=stage, config=config, variants={})
    if results is None:
        run.missing.append("results.json missing (no stage finished in this folder)")
    if stage == "run" and "pipeline" not in (results or {}) and (
            (results or {}).get("pretrain") or (results or {}).get("probes") or _is_variant_dir(path)):
        stage = run.stage = "variant"  # one variant's folder inside a `gravprobe run` folder
    if stage == "run":
        run.pipeline = (results or {}).get("pipeline")
        names = list((run.pipeline or {}).get("variants") or _configured_variants(config))
        if not names:
            run.missing.append("no variants named (pipeline.variants / attention.name)")
        for name in names:
            run.variants[name] = _variant_of(path / name, name, STAGE_SECTIONS["variant"], need_checkpoint=True)
        asked = [(v.probes or {}).get("requested") for v in run.variants.values()]
        oracle_asked = not all(isinstance(a, list) for a in asked) or any("oracle" in a for a in asked)
        if names and oracle_asked and not run.oracle:
            run.missing.append("oracle missing (no variant's probes hold 'oracle')")
    elif stage in ("pretrain", "probe", "variant"):
        res = results or {}
        name = ((res.get("pretrain") or {}).get("attention") or (res.get("probes") or {}).get("attention")
                or (config.get("attention") or {}).get("name") or "model")
        run.variants[name] = _variant_of(path, name, STAGE_SECTIONS[stage], need_checkpoint=stage != "probe")
        if results is None:  # already said at run level
            run.variants[name].missing = [m for m in run.variants[name].missing if "results.json" not in m]
    else:
        run.missing.append(f"unknown stage {stage!r} (config.yaml has no 'stage')")
    return run


def _is_variant_dir(path: Path) -> bool:
    try:
        parent = json.loads((path.parent / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return path.name in ((parent.get("pipeline") or {}).get("variants") or [])


def _configured_variants(config: dict) -> list[str]:
    pv = (config.get("pipeline") or {}).get("variants")
    if pv:
        return [pv] if isinstance(pv, str) else list(pv)
    name = (config.get("attention") or {}).get("name")
    return [name] if name else []


def load_sweep(path: str | Path) -> SweepResult:
    """Read a sweep folder: every sub-folder that looks like a run folder, in Hydra's job order."""
    path = Path(path)
    sub = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def order(p: Path):
        head = p.name.split("_", 1)[0]
        return (0, int(head), p.name) if head.isdigit() else (1, 0, p.name)

    sweep = SweepResult(dir=path, runs=[])
    for p in sorted(sub, key=order):
        if is_run_dir(p):
            sweep.runs.append(load_run(p))
        elif p.name not in ("figures",):
            sweep.problems.append(f"{p.name}/ is not a run folder (no config.yaml or results.json)")
    if not sweep.runs:
        sweep.problems.append("no run folders (the sweep has not started any job)")
    return sweep


def load(path: str | Path) -> RunResult | SweepResult:
    """A run folder or a sweep folder, whichever ``path`` is."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ReportError(f"{path} does not exist or is not a folder; give a run folder (with results.json) "
                          "or a sweep folder (with multirun.yaml)")
    if is_run_dir(path):
        return load_run(path)
    if is_sweep_dir(path):
        return load_sweep(path)
    raise ReportError(f"{path} is neither a run folder (config.yaml / results.json) nor a sweep folder "
                      "(multirun.yaml or run sub-folders)")



def latest(home: str | Path | None = None) -> Path:
    """The most recently modified run or sweep folder under ``home`` (default ``output_root()``) that holds
    results (a ``results.json``) or is a sweep; folders of runs that failed before any stage are skipped."""
    from gravprobe.common import output_root

    home = Path(home) if home else output_root()
    cands = [p for sub in ("runs", "sweeps") for p in (home / sub).glob("*/*")
             if (p / "results.json").exists() or (p / "multirun.yaml").exists()]  # not failed starts
    if not cands:
        raise ReportError(f"no run or sweep folders under {home}/runs or {home}/sweeps; run `gravprobe run "
                          "experiment=smoke` first or give a folder")
    return max(cands, key=lambda p: p.stat().st_mtime)


# ------------------------------------------------------------------------------- the stages' numbers
FORCE_PREDICTION_FILES = ("force_predictions.csv", "predictions.csv")
TRUE_COLUMNS = ("true", "y_true", "target", "force_true")
PRED_COLUMNS = ("predicted", "pred", "y_pred", "force_pred")
HEAD_SOURCES = ("head", "fine-tuned head", "fine_tuned_head", "model")


def _find(variant_dir: Path, names: Iterable[str]) -> Path | None:
    """The first of ``names`` in ``variant_dir`` or ``variant_dir/probes``."""
    for base in (variant_dir, variant_dir / "probes"):
        for name in names:
            if (base / name).is_file():
                return base / name
    return None


def _force_columns(rows: list[dict]) -> dict[str, list] | None:
    """Float columns of ``rows`` with ``true``/``predicted`` (|F|) added; ``None`` without both."""
    cols: dict[str, list] = {}
    for key in rows[0]:
        try:
            cols[key] = [float(r[key]) for r in rows]
        except (TypeError, ValueError):
            continue
    true = next((k for k in cols if k.lower() in TRUE_COLUMNS), None)
    pred = next((k for k in cols if k.lower() in PRED_COLUMNS), None)
    if true is not None and pred is not None:
        cols["true"], cols["predicted"] = cols[true], cols[pred]
    elif {"fx_true", "fy_true", "fx_pred", "fy_pred"} <= set(cols):  # components: |F| = hypot
        cols["true"] = [(x * x + y * y) ** 0.5 for x, y in zip(cols["fx_true"], cols["fy_true"])]
        cols["predicted"] = [(x * x + y * y) ** 0.5 for x, y in zip(cols["fx_pred"], cols["fy_pred"])]
    else:
        return None
    return cols


def force_predictions_by_source(variant_dir: str | Path) -> dict[str, dict[str, list[float]]]:
    """Every source's predicted and true |F| (M☉ AU yr⁻²) from the probe stage's ``force_predictions.csv``.

    The file has one row per labelled held-out point, columns ``source,true,pred`` (the probe stage's
    format; ``fx_true,fy_true,fx_pred,fy_pred`` give |F| as their norm). A file without a ``source``
    column (older runs: the fine-tuned head alone) is the source ``"head"``. Returns
    ``{source: {"true": [...], "predicted": [...]}}`` in file order, ``{}`` when there is no file or it
    has no usable columns (logged, never raised: old run folders still report).
    """
    p = _find(Path(variant_dir), FORCE_PREDICTION_FILES)
    if p is None:
        return {}
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(str(r.get("source") or "head"), []).append(r)
    out = {}
    for source, srows in by.items():
        cols = _force_columns(srows)
        if cols is None:
            log.warning("%s: no true/predicted columns (want one of %s and one of %s, or fx/fy_true and "
                        "fx/fy_pred); its figure is skipped", p, TRUE_COLUMNS, PRED_COLUMNS)
            return {}
        out[source] = {"true": cols["true"], "predicted": cols["predicted"]}
    return out


def is_head_source(source: str) -> bool:
    """Whether a ``force_predictions.csv`` source is the model's fine-tuned force head."""
    return source.strip().lower() in HEAD_SOURCES


def force_predictions(variant_dir: str | Path) -> dict[str, list[float]] | None:
    """The model's predicted vs true force magnitudes written by the probes stage, as columns, or ``None``.

    Reads the first of ``FORCE_PREDICTION_FILES`` found in ``variant_dir`` (or ``variant_dir/probes``);
    returns a dict of float columns including ``true`` and ``predicted`` (units M☉ AU yr⁻²). When the file
    holds several sources (``source`` column: the head and the controls), these are the head's rows
    (:func:`force_predictions_by_source` gives every source); ``None`` when it has no head rows.
    """
    p = _find(Path(variant_dir), FORCE_PREDICTION_FILES)
    if p is None:
        return None
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "source" in rows[0]:
        rows = [r for r in rows if is_head_source(str(r.get("source") or ""))]
    if not rows:
        return None
    return _force_columns(rows)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.csv`` written by pretraining: ``step`` (int), ``split`` (train | val),
    ``modality`` (orbits | text), ``loss`` (float; nats/coordinate for discrete orbits, nats/token for
    text), and the other columns as text. Rows with an unreadable step or loss are skipped."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                out.append({**r, "step": int(float(r["step"])), "loss": float(r["loss"])})
            except (KeyError, TypeError, ValueError):
                continue
    return out


def read_probes_linear(path: str | Path) -> list[dict]:
    """Rows of ``probes_linear.csv`` (columns ``model`` trained | untrained, ``probe`` ridge | mlp, ``layer``,
    ``target``, ``r2``, ``decodable``, ``alpha``, ``alpha_edge``) with ``layer`` int and ``r2`` float
    (NaN when empty). A file without ``model`` (older runs) is the trained model's."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                layer = int(float(r["layer"]))
            except (KeyError, TypeError, ValueError):
                continue
            try:
                r2 = float(r.get("r2") or "nan")
            except ValueError:
                r2 = float("nan")
            out.append({**r, "model": r.get("model") or "trained", "probe": r.get("probe") or "ridge",
                        "layer": layer, "r2": r2})
    return out


def linear_panels(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``probes_linear.csv`` rows as the panels of :func:`~gravprobe.report.figures.fig_probe_r2`:
    ``{"ridge probes": {target: {layer: r2}}, "mlp probes": …, "ridge probes, untrained network": …}``
    (ridge first, the untrained network last; targets in file order)."""
    kinds = sorted({r["probe"] for r in rows}, key=lambda p: (p != "ridge", p))
    panels: dict[str, dict[str, dict[str, float]]] = {}
    for model in ("trained", "untrained"):
        for kind in kinds:
            sel = [r for r in rows if r["model"] == model and r["probe"] == kind]
            if not sel:
                continue
            title = f"{kind} probes" + (", untrained network" if model == "untrained" else "")
            table = panels.setdefault(title, {})
            for r in sel:
                table.setdefault(r["target"], {})[str(r["layer"])] = r["r2"]
    return panels


LAW_FILE_PREFIX, LAW_FILE_SUFFIX = "laws_", ".npz"
# a laws_<source>.npz file's source → the results.json["probes"] section holding its galaxies' laws
LAW_SECTIONS = {"head": "head", "oracle": "oracle", "truth": "truth", "oracle_no_m1": "oracle_without_m1",
                "oracle_without_m1": "oracle_without_m1", "memoriser": "memoriser"}


@dataclass
class Laws:
    """One source's regression data (``laws_<source>.npz``) and the laws recovered from it.

    ``X [n, 3]``: the inputs r (AU), m1, m2 (M☉) in that order; ``y [n]``: the |F| the laws were fitted
    to (M☉ AU yr⁻²); ``galaxy [n]``: the galaxy seed of each point; ``galaxies``: the results.json entries
    (``seed``, ``expression`` in the symbols r, m1, m2, ``newtonian``, …) of this source.
    """

    source: str
    path: Path
    X: Any
    y: Any
    galaxy: Any
    galaxies: list[dict]


def law_sources(variant_dir: str | Path) -> list[str]:
    """The sources with a ``laws_<source>.npz`` in ``variant_dir`` (or ``variant_dir/probes``), sorted."""
    variant_dir = Path(variant_dir)
    found = set()
    for base in (variant_dir, variant_dir / "probes"):
        if base.is_dir():
            found |= {p.name[len(LAW_FILE_PREFIX):-len(LAW_FILE_SUFFIX)]
                      for p in base.glob(f"{LAW_FILE_PREFIX}*{LAW_FILE_SUFFIX}")}
    return sorted(found, key=lambda s: (s != "head", s))


def law_galaxies(probes: dict | None, source: str) -> list[dict]:
    """The galaxies (results.json entries) of a law source: ``probes.head.galaxies`` (else
    ``probes.galaxies``) for the head, ``probes.<section>.galaxies`` for a control (``LAW_SECTIONS``)."""
    probes = probes or {}
    section = LAW_SECTIONS.get(source, source)
    gals = (probes.get(section) or {}).get("galaxies") if isinstance(probes.get(section), dict) else None
    if not gals and section == "head":
        gals = probes.get("galaxies")
    return list(gals or [])


def read_laws(variant_dir: str | Path, source: str, probes: dict | None) -> Laws | None:
    """``laws_<source>.npz`` of ``variant_dir`` with its galaxies from ``probes`` (results.json), or
    ``None`` when the file is missing or unreadable (logged: the figure is skipped, the report goes on)."""
    import numpy as np

    p = _find(Path(variant_dir), [f"{LAW_FILE_PREFIX}{source}{LAW_FILE_SUFFIX}"])
    if p is None:
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            X, y, galaxy = np.asarray(z["X"], float), np.asarray(z["y"], float), np.asarray(z["galaxy"])
    except (OSError, KeyError, ValueError) as e:
        log.warning("cannot read %s (%s); want arrays X [n, 3], y [n], galaxy [n]; its figure is skipped", p, e)
        return None
    if X.ndim != 2 or X.shape[1] != 3 or len(y) != len(X) or len(galaxy) != len(X):
        log.warning("%s: shapes X %s, y %s, galaxy %s; want X [n, 3] (r, m1, m2), y [n], galaxy [n]; its figure "
                    "is skipped", p, X.shape, y.shape, galaxy.shape)
        return None
    return Laws(source=source, path=p, X=X, y=y, galaxy=galaxy, galaxies=law_galaxies(probes, source))
