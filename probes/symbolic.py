"""Symbolic regression: ``fit_equation(X, y, names)`` with a PySR backend and an offline Operon backend.

Both backends return the same :class:`SRResult`: the chosen expression in sympy (in the caller's variable
names), the whole Pareto front as an :class:`EquationTable` (complexity, loss, score, expression), and the
name of the backend that ran.

Backends
--------
``pysr``
    PySR (Julia), the literature's engine. Imported lazily *inside* :func:`fit_equation` (importing PySR
    boots Julia). Install with ``pip install gravprobe[pysr]`` plus a Julia installation (PySR's
    ``juliapkg`` fetches one on first import when it has network access).
``operon``
    The offline engine: `pyoperon <https://github.com/heal-research/pyoperon>`_, Python bindings of the
    C++ Operon library (maintained, on PyPI as wheels, no Julia, no compiler). Why Operon rather than
    gplearn: gplearn is pure Python, unmaintained since 2023, has no local optimisation of constants
    (its constants are random and only change by mutation, so a coefficient such as 4π² is found by luck)
    and is 10-100× slower; Operon runs multi-objective NSGA-II over (accuracy, length) and so returns a
    Pareto front like PySR, fits every candidate's constants by Levenberg-Marquardt, runs multi-threaded
    and is deterministic for a given ``random_state`` (and thread count).
``auto``
    PySR when it can be imported and Julia starts, otherwise Operon; the choice is logged and stored in
    ``SRResult.backend``.

Scale handling (``transform``)
------------------------------
Gravitational force magnitudes in the two-body data span about five decades (planet masses 1e-9…1e-3
M☉, separations 0.3…40 AU). A squared or absolute error on raw ``y`` is decided by the few largest
forces alone. The default ``transform="log"`` fits ``log y = g(u_1, …, u_n)``, ``u_k`` the standardised
``log x_k`` (zero mean, unit variance over the galaxy, so that log m2's narrow range does not hide it from
the search), with a mean-squared
error, i.e. a *relative* error on ``y`` that weighs every decade equally, and maps the result back:
``y = exp(g(log x_1, …))`` simplified with sympy, so that e.g. ``g = c − 2 u_r + u_m1 + u_m2`` becomes
``C·m1·m2/r**2``. Every power law is linear in log space, which makes Newton's law (and its near misses
1/r, m1/r², r^-2.5) easy for the search to find and, importantly, equally easy — the verdict then decides.
``transform="none"`` fits raw ``y`` (divided by its median, only for numerics) on raw ``X``, with
``loss="l1"`` being the literature's ``max(1e-8, |ŷ − y|) − 1e-8`` (the PySR preset uses it).

Model selection (``selection``)
-------------------------------
The table is the Pareto front sorted by complexity; ``score_i = −Δlog(loss)/Δcomplexity`` against the
next simpler row (PySR's definition; 0 for the simplest row).

- ``"score"`` (default): the row with the highest score (the literature's "model selection by score").
  The table always starts with the constant model (complexity 1), as PySR's does, so that a degenerate
  early candidate cannot hand a large score to the step after it;
- ``"best"`` (PySR's own default): the highest score among rows whose loss is at most 1.5× the lowest
  loss. Not the default here: on 2-NN oracle data the lowest losses belong to long expressions that fit
  the oracle's own structure (loss about 2× below Newton's), and the 1.5× window then excludes Newton;
- ``"accuracy"``: the lowest loss.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import sympy as sp

log = logging.getLogger(__name__)

BACKENDS = ("auto", "operon", "pysr")
TRANSFORMS = ("log", "none")
LOSSES = ("mse", "l1")
SELECTIONS = ("best", "score", "accuracy")

#: Operon's defaults for this project: arithmetic (division gives 1/x) plus the literature's unary set.
OPERON_DEFAULTS: dict[str, Any] = {
    "allowed_symbols": "add,sub,mul,div,constant,variable",
    "population_size": 500,
    "generations": 60,
    "max_length": 20,
    "max_evaluations": 1_000_000,
    "optimizer_iterations": 5,
    "tournament_size": 3,
    "n_threads": 0,  # 0 = all cores
    "restarts": 1,
    "max_time": None,  # seconds per restart
}

#: The literature's PySR settings (METHOD.md §4.3).
PYSR_DEFAULTS: dict[str, Any] = {
    "niterations": 100,
    "binary_operators": ["+", "*"],
    "unary_operators": ["sin", "cos", "exp", "inv(x) = 1/x"],
    "maxsize": 20,
    "populations": 15,
    "procs": 0,  # 0 = serial (deterministic)
    "restarts": 3,
}

_LITERATURE_L1 = "loss(prediction, target) = max(1f-8, abs(prediction - target)) - 1f-8"


class BackendUnavailableError(RuntimeError):
    """The requested symbolic-regression backend cannot start (missing package or Julia)."""


# --------------------------------------------------------------------------------------------------
# result types
# --------------------------------------------------------------------------------------------------
@dataclass
class EquationTable:
    """Every candidate on the Pareto front, simplest first.

    Each row is a dict with ``complexity`` (int, node count as the backend counts it), ``loss`` (float,
    in the fit space, see the module docstring), ``score`` (float, −Δlog loss/Δcomplexity),
    ``expression`` (sympy, caller's variable names) and ``raw`` (the backend's own model string).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    COLUMNS = ("complexity", "loss", "score", "chosen", "expression", "raw")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def to_records(self) -> list[dict[str, Any]]:
        """Rows with the expression as a string (JSON/CSV friendly)."""
        return [{k: (str(r[k]) if k == "expression" else r.get(k)) for k in self.COLUMNS} for r in self.rows]

    def to_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.COLUMNS))
            w.writeheader()
            w.writerows(self.to_records())
        return path


@dataclass
class SRResult:
    """Outcome of :func:`fit_equation`."""

    expression: sp.Expr
    table: EquationTable
    backend: str
    names: tuple[str, ...]
    transform: str
    selection: str
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def symbols(self) -> tuple[sp.Symbol, ...]:
        return make_symbols(self.names)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Evaluate the chosen expression on ``X [N, n_vars]`` (columns in ``names`` order) → ``[N]``."""
        return evaluate(self.expression, self.names, X)


def make_symbols(names: Sequence[str]) -> tuple[sp.Symbol, ...]:
    """The sympy symbols used for the caller's variables (positive reals: separations and masses)."""
    return tuple(sp.Symbol(n, positive=True) for n in names)


def evaluate(expression: sp.Expr, names: Sequence[str], X: np.ndarray) -> np.ndarray:
    """Evaluate a sympy ``expression`` whose symbols are matched *by name* to the columns of ``X [N, k]``."""
    X = np.asarray(X, dtype=np.float64)
    by_name = {s.name: s for s in expression.free_symbols}
    unknown = set(by_name) - set(names)
    if unknown:
        raise ValueError(f"expression uses {sorted(unknown)} which are not among the columns {list(names)}")
    syms = [by_name.get(n, sp.Symbol(n)) for n in names]
    f = sp.lambdify(syms, expression, modules="numpy")
    with np.errstate(all="ignore"):
        out = f(*[X[:, i] for i in range(X.shape[1])])
    return np.broadcast_to(np.asarray(out, dtype=np.float64), (X.shape[0],)).copy()


# --------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------
def fit_equation(X: np.ndarray, y: np.ndarray, names: Sequence[str], *, backend: str = "auto", seed: int = 0,
                 transform: str = "log", loss: str = "mse", selection: str | None = None,
                 **options: Any) -> SRResult:
    """Fit ``y ≈ f(X)`` by symbolic regression and return the Pareto front and the chosen law.

    Args:
        X: ``[N, k]`` inputs, columns named by ``names`` (for gravity: r in AU, m1 and m2 in M☉).
        y: ``[N]`` targets (for gravity: |F| in M☉ AU yr⁻²).
        names: ``k`` variable names; the returned expression uses sympy symbols with these names.
        backend: ``"auto"`` | ``"operon"`` | ``"pysr"``.
        seed: random seed (restart ``i`` uses ``seed + i``).
        transform: ``"log"`` (default; fit log y on log X; needs X > 0 and y > 0) or ``"none"``.
        loss: ``"mse"`` or ``"l1"`` (the literature's max(1e-8, |ŷ−y|) − 1e-8), in the fit space.
        selection: ``"score"`` (default, the literature's) | ``"best"`` | ``"accuracy"``.
        **options: backend settings (see :data:`OPERON_DEFAULTS`, :data:`PYSR_DEFAULTS`); unknown keys
            for the backend that runs raise ``TypeError``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown symbolic-regression backend {backend!r}; choose one of {BACKENDS}")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {TRANSFORMS}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    names = tuple(str(n) for n in names)
    if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[1] != len(names):
        raise ValueError(f"X must be [N, {len(names)}] matching names {names} and y [N]; got X {X.shape}, y {y.shape}")
    if X.shape[0] < 10:
        raise ValueError(f"need at least 10 samples for symbolic regression, got {X.shape[0]}")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("X and y must be finite (drop NaN/inf rows before fitting)")
    if transform == "log" and (X.min() <= 0 or y.min() <= 0):
        raise ValueError("transform='log' needs X > 0 and y > 0 (fit |F|, not signed components); "
                         f"got min X {X.min():.3g}, min y {y.min():.3g}; use transform='none' otherwise")

    if backend == "auto":
        backend = "pysr" if pysr_available() else "operon"
        log.info("symbolic regression backend: %s (auto)", backend)
    selection = selection or "score"
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {SELECTIONS}")

    syms = make_symbols(names)
    if transform == "log":
        # standardised log-features: every variable enters the search on the same footing (log m1 spans
        # ~13 e-folds, log m2 ~1), which makes the search find small-variance factors such as m2 reliably
        lx = np.log(X)
        x_loc, x_scale = lx.mean(0), np.where(lx.std(0) > 0, lx.std(0), 1.0)
        Xf, yf, y_scale = (lx - x_loc) / x_scale, np.log(y), 1.0
    else:
        x_loc, x_scale = np.zeros(X.shape[1]), np.ones(X.shape[1])
        y_scale = float(np.median(np.abs(y))) or 1.0
        Xf, yf = X, y / y_scale
    fit_syms = tuple(sp.Symbol(f"u_{n}" if transform == "log" else n, real=True) for n in names)

    t0 = time.perf_counter()
    if backend == "operon":
        cands, used = _run_operon(Xf, yf, fit_syms, seed=seed, loss=loss, **options)
    else:
        cands, used = _run_pysr(Xf, yf, fit_syms, seed=seed, loss=loss, **options)
    seconds = time.perf_counter() - t0

    # the constant model anchors the front (as PySR's first row does), so a degenerate early candidate
    # that is worse than a constant cannot earn a large score for the step after it
    const = float(np.mean(yf) if loss == "mse" else np.median(yf))
    cands = [{"complexity": 1, "raw": f"{const:.6g}", "expression": sp.Float(const)}, *cands]
    rows = []
    for c in cands:
        g = c["expression"]
        # recompute the loss ourselves so that every backend and restart is measured the same way
        pred = _eval_fit(g, fit_syms, Xf)
        err = pred - yf
        lval = float(np.mean(err**2) if loss == "mse" else np.mean(np.maximum(1e-8, np.abs(err)) - 1e-8))
        if not math.isfinite(lval):
            continue
        rows.append({"complexity": int(c["complexity"]), "loss": lval, "raw": c["raw"], "fit_expression": g})
    if not rows:
        raise RuntimeError(f"{backend}: no finite candidate equation (data degenerate?)")
    rows = _pareto(rows)
    _add_scores(rows)
    chosen = _select(rows, selection)
    for i, r in enumerate(rows):
        # full sympy simplification is slow (seconds per expression): only the chosen law gets it
        r["expression"] = _to_original(r["fit_expression"], fit_syms, syms, transform, y_scale, x_loc, x_scale,
                                       simplify=i == chosen)
        r["chosen"] = i == chosen
    table = EquationTable(rows=[{k: r[k] for k in (*EquationTable.COLUMNS, "fit_expression")} for r in rows])
    expr = rows[chosen]["expression"]
    log.info("%s: %d candidates in %.1fs; chosen (%s) complexity %d: %s", backend, len(rows), seconds,
             selection, rows[chosen]["complexity"], expr)
    return SRResult(expression=expr, table=table, backend=backend, names=names, transform=transform,
                    selection=selection, seconds=seconds, options=used)


# --------------------------------------------------------------------------------------------------
# table helpers
# --------------------------------------------------------------------------------------------------
def _pareto(rows: list[dict]) -> list[dict]:
    """Keep, per complexity, the lowest loss; then only rows that beat every simpler row."""
    best: dict[int, dict] = {}
    for r in rows:
        if r["complexity"] not in best or r["loss"] < best[r["complexity"]]["loss"]:
            best[r["complexity"]] = r
    front, lowest = [], math.inf
    for c in sorted(best):
        if best[c]["loss"] < lowest:
            front.append(best[c])
            lowest = best[c]["loss"]
    return front


def _add_scores(rows: list[dict]) -> None:
    floor = 1e-30
    for i, r in enumerate(rows):
        if i == 0:
            r["score"] = 0.0
        else:
            p = rows[i - 1]
            r["score"] = float(-(math.log(max(r["loss"], floor)) - math.log(max(p["loss"], floor)))
                               / (r["complexity"] - p["complexity"]))


def _select(rows: list[dict], selection: str) -> int:
    if selection == "accuracy":
        return int(np.argmin([r["loss"] for r in rows]))
    if selection == "score":
        return int(np.argmax([r["score"] for r in rows]))
    lowest = min(r["loss"] for r in rows)
    ok = [i for i, r in enumerate(rows) if r["loss"] <= 1.5 * lowest]
    return max(ok, key=lambda i: rows[i]["score"])


def _eval_fit(g: sp.Expr, fit_syms: Sequence[sp.Symbol], Xf: np.ndarray) -> np.ndarray:
    f = sp.lambdify(list(fit_syms), g, modules="numpy")
    with np.errstate(all="ignore"):
        out = f(*[Xf[:, i] for i in range(Xf.shape[1])])
    out = np.broadcast_to(np.asarray(out, dtype=np.complex128 if np.iscomplexobj(out) else np.float64),
                          (Xf.shape[0],))
    if np.iscomplexobj(out):
        return np.full(Xf.shape[0], np.nan)
    return out


def _to_original(g: sp.Expr, fit_syms, syms, transform: str, y_scale: float, x_loc, x_scale, *,
                 simplify: bool = True) -> sp.Expr:
    """Map a fit-space expression back to ``y = f(x)`` in the caller's symbols, simplified."""
    if transform == "log":
        sub = {u: (sp.log(s) - float(m)) / float(sd) for u, s, m, sd in zip(fit_syms, syms, x_loc, x_scale)}
        expr = sp.exp(sp.expand(g.subs(sub, simultaneous=True)))
        expr = sp.powsimp(sp.expand_log(sp.expand(expr), force=True))
    else:
        expr = (g * y_scale).subs({u: s for u, s in zip(fit_syms, syms)}, simultaneous=True)
    if not simplify:
        return expr
    try:
        s = sp.simplify(expr)
        if sp.count_ops(s) <= sp.count_ops(expr):
            expr = s
    except Exception:  # pragma: no cover - sympy can fail on exotic forms; keep the unsimplified law
        pass
    return expr


# --------------------------------------------------------------------------------------------------
# Operon
# --------------------------------------------------------------------------------------------------
_OPERON_FUNCS = {
    "exp": sp.exp, "log": sp.log, "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "tanh": sp.tanh,
    "sqrt": sp.sqrt, "cbrt": sp.cbrt, "abs": sp.Abs, "square": lambda x: x**2, "pow": lambda a, b: a**b,
    "logabs": lambda x: sp.log(sp.Abs(x)), "sqrtabs": lambda x: sp.sqrt(sp.Abs(x)),
    "aq": lambda a, b: a / sp.sqrt(1 + b**2), "fmin": sp.Min, "fmax": sp.Max,
}


def parse_operon(model: str, variables: Sequence[str], syms: Sequence[sp.Symbol]) -> sp.Expr:
    """Parse an Operon infix model string (``X1``… variables, ``^`` for powers) into sympy."""
    local = dict(_OPERON_FUNCS)
    local.update({v: s for v, s in zip(variables, syms)})
    return sp.sympify(model.replace("^", "**"), locals=local)


def _run_operon(Xf, yf, fit_syms, *, seed: int, loss: str, **options) -> tuple[list[dict], dict]:
    try:
        from pyoperon.sklearn import SymbolicRegressor
    except ImportError as e:  # pragma: no cover - pyoperon is a core dependency
        raise BackendUnavailableError("the offline engine needs pyoperon: pip install pyoperon") from e
    unknown = set(options) - set(OPERON_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown Operon option(s) {sorted(unknown)}; valid: {sorted(OPERON_DEFAULTS)}")
    opt = {**OPERON_DEFAULTS, **options}
    n_threads = int(opt.pop("n_threads")) or (os.cpu_count() or 1)
    restarts = int(opt.pop("restarts"))
    max_time = opt.pop("max_time")
    if isinstance(opt["allowed_symbols"], (list, tuple)):
        opt["allowed_symbols"] = ",".join(opt["allowed_symbols"])
    objective = {"mse": "mse", "l1": "mae"}[loss]
    variables = [f"X{i + 1}" for i in range(Xf.shape[1])]
    cands = []
    for k in range(max(1, restarts)):
        sr = SymbolicRegressor(objectives=[objective, "length"], n_threads=n_threads, random_state=seed + k,
                               max_time=None if max_time is None else int(max_time), **opt)
        sr.fit(Xf, yf)
        names_ = list(sr.variables_.values())
        if names_ != variables:  # the Dataset names columns X1..Xn; guard against a change upstream
            variables = names_
        for p in sr.pareto_front_:
            try:
                g = parse_operon(p["model"], variables, fit_syms)
            except (sp.SympifyError, TypeError, SyntaxError) as e:
                log.warning("operon: could not parse %r (%s); skipped", p["model"], e)
                continue
            cands.append({"complexity": int(p["length"]), "raw": p["model"], "expression": g})
    return cands, {**opt, "n_threads": n_threads, "restarts": restarts, "max_time": max_time,
                   "objective": objective}


# --------------------------------------------------------------------------------------------------
# PySR (lazy)
# --------------------------------------------------------------------------------------------------
_PYSR_MISSING = (
    "the 'pysr' symbolic-regression backend needs PySR and Julia: `pip install gravprobe[pysr]` (or "
    "`pip install pysr`) and a Julia installation (PySR's juliapkg downloads one on first import when it "
    "has network access; see https://astroautomata.com/PySR). Without Julia, use the offline engine: "
    "backend='operon' (or `sr=default` on the command line), which needs nothing else."
)


def pysr_available() -> bool:
    """True when ``import pysr`` works (which starts Julia). Never raises."""
    try:
        _import_pysr()
        return True
    except BackendUnavailableError as e:
        log.info("PySR unavailable (%s)", str(e).split(":")[0])
        return False


def _import_pysr():
    try:
        import pysr  # noqa: F401  (boots Julia)
    except Exception as e:  # ImportError, or Julia failing to start (juliacall raises various types)
        raise BackendUnavailableError(f"{_PYSR_MISSING} (import failed: {type(e).__name__}: {e})") from e
    return pysr


def _run_pysr(Xf, yf, fit_syms, *, seed: int, loss: str, **options) -> tuple[list[dict], dict]:
    pysr = _import_pysr()
    opt = {**PYSR_DEFAULTS, **options}
    restarts = int(opt.pop("restarts"))
    procs = int(opt.pop("procs"))
    unary = list(opt.pop("unary_operators"))
    mappings = {"inv": lambda x: 1 / x} if any(u.startswith("inv") for u in unary) else {}
    cands = []
    for k in range(max(1, restarts)):
        kw = dict(opt)
        kw.update(unary_operators=unary, extra_sympy_mappings=mappings, random_state=seed + k,
                  model_selection="score", progress=False, verbosity=0, temp_equation_file=True)
        if loss == "l1":
            kw["elementwise_loss"] = _LITERATURE_L1
        if procs == 0:
            kw.update(deterministic=True, parallelism="serial")
        else:
            kw.update(procs=procs, parallelism="multiprocessing")
        model = pysr.PySRRegressor(**kw)
        model.fit(Xf, yf, variable_names=[f"x{i}" for i in range(Xf.shape[1])])
        eqs = model.equations_
        local = {f"x{i}": s for i, s in enumerate(fit_syms)}
        for _, row in eqs.iterrows():
            g = row["sympy_format"].subs({sp.Symbol(n): s for n, s in local.items()}, simultaneous=True)
            cands.append({"complexity": int(row["complexity"]), "raw": str(row["equation"]), "expression": g})
    return cands, {**opt, "unary_operators": unary, "restarts": restarts, "procs": procs}
