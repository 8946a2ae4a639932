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

Representations (``transform``)
-------------------------------
Gravitational force magnitudes in the two-body data span about five decades (planet masses 1e-9…1e-3
M☉, separations 0.3…40 AU). A squared or absolute error on raw ``y`` is decided by the few largest
forces alone, so every search below that the default uses fits ``log y`` with a squared error: a
log-ratio (relative) error of the law ``y = exp(g)`` that weighs every decade equally. What differs is the
*representation*, i.e. which inputs ``g`` is built from:

``"log"`` (the power-law search, the previous default)
    ``g(u_1, …, u_n)`` over ``u_k`` = standardised ``log x_k`` with ``+ − × ÷``. Every power law is linear
    in this space, so Newton's law and its power-law near misses are found quickly — and so is nothing
    else: a law with a sum inside (softened gravity) comes back as its nearest power law.
``"mixed"``
    ``g(u_1, …, u_n, v_1, …, v_n)`` over the standardised logs *and* the raw variables ``v_k = x_k/s_k``
    (``s_k`` the median over the fit points, only for numerics), with ``+ − × ÷ exp log``. ``exp(g)`` is
    then any law of the raw variables the grammar can write, and laws that are products of factors become
    sums: ``C m1 m2 e^{−r/λ}/r²`` is ``c + u_m1·a + u_m2·b − 2 log r − v_r s_r/λ``, softened gravity
    ``c + … − log(v_r² + ε²/s_r²)``, a sum of two power terms ``c + … − 3 log r + log(v_r + c')``.
``"none"``
    raw ``y`` (divided by its median, only for numerics) on raw ``X``; ``loss="l1"`` is the literature's
    ``max(1e-8, |ŷ − y|) − 1e-8`` (the PySR preset uses it).
``"multi"`` (the default)
    runs every representation in ``representations`` (default ``("log", "mixed")``) on the same *fit*
    points and chooses among all their candidates on **one common held-out error**: the RMS of
    ``log(ŷ/y)`` on a deterministic held-out fifth of the galaxy (``holdout``; the split does not depend on
    ``seed``). No representation is favoured: a power law found in log space and a softened law found in
    mixed space meet on the same scale. ``search_points`` caps how many fit points the search sees (the
    constants are fitted on those too), which bounds the run time.

A single representation (``transform="log"`` etc.) behaves as before: it searches all points and ranks
its front on its own training loss (``holdout=0``), unless ``holdout`` is given.

Model selection (``selection``)
-------------------------------
The table keeps every candidate of every representation (column ``representation``); the rows that beat
every simpler row on ``loss`` (the held-out error under ``"multi"``, else the training loss) form the
Pareto front (``pareto``), and only those are eligible. ``score_i = −Δlog(loss)/Δcomplexity`` against the
next simpler front row (PySR's definition; 0 for the simplest). Complexity is the backend's node count in
its own representation; a power law has the same length in ``log`` and ``mixed``.

- ``"parsimony"`` (default under ``"multi"``): the simplest front row whose held-out error is at most
  ``(1 + tolerance)`` × the lowest (``tolerance`` 0.2 by default). With 1 % noise a law that is missing a
  term is several times worse than the true law on held-out points, while the true law is within a few
  per cent of the best long expression, so this picks the true law's complexity and no longer;
- ``"score"`` (default for a single representation; the literature's): the highest score. The front
  always starts with the constant model (complexity 1), as PySR's does, so that a degenerate early
  candidate cannot hand a large score to the step after it. It can stop at a power law when the next
  improvement (a softening, a screening factor) is large but costs several nodes;
- ``"best"`` (PySR's own default): the highest score among rows whose loss is at most 1.5× the lowest;
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
REPRESENTATIONS = ("log", "mixed", "none")
TRANSFORMS = ("multi", *REPRESENTATIONS)
LOSSES = ("mse", "l1")
SELECTIONS = ("parsimony", "best", "score", "accuracy")

def _packaged_sr(option: str) -> dict[str, Any]:
    """``conf/sr/<option>.yaml`` (package data): the one place where the engines' settings are written."""
    from importlib.resources import files

    import yaml

    return yaml.safe_load(files("gravprobe.conf").joinpath("sr", f"{option}.yaml").read_text())


_SR_DEFAULT = _packaged_sr("default")

#: Operon's settings for this project, shared by every representation: ``options`` of ``conf/sr/default.yaml``
#: (the ``sr=default`` preset; ``n_threads: 0`` = all cores). Written only there.
OPERON_DEFAULTS: dict[str, Any] = dict(_SR_DEFAULT["options"])

#: Per-representation Operon settings, applied over OPERON_DEFAULTS and under the caller's own options
#: (``representation_options`` beats both): ``representation_options`` of ``conf/sr/default.yaml``. Power laws
#: are linear in the log representation, so its search is short; the mixed representation needs ``exp`` and
#: ``log`` (the screened and the softened laws) and a larger population.
REPRESENTATION_DEFAULTS: dict[str, dict[str, Any]] = {
    rep: dict((_SR_DEFAULT.get("representation_options") or {}).get(rep) or {}) for rep in REPRESENTATIONS}

#: The representations ``transform="multi"`` searches when none are named (``representations`` of the YAML).
DEFAULT_REPRESENTATIONS = tuple(_SR_DEFAULT["representations"])

#: The literature's PySR settings (METHOD.md §4.3): ``options`` of ``conf/sr/pysr.yaml``. Written only there.
PYSR_DEFAULTS: dict[str, Any] = dict(_packaged_sr("pysr")["options"])

_LITERATURE_L1 = "loss(prediction, target) = max(1f-8, abs(prediction - target)) - 1f-8"

#: The held-out split is drawn from this fixed stream, independent of the SR seed (same galaxy → same split).
_SPLIT_SEED = 20_261_202


class SymbolicBackendUnavailable(RuntimeError):
    """The requested symbolic-regression backend cannot start (missing package or Julia). (Not
    ``gravprobe.attention.BackendUnavailableError``, which is about attention kernels.)"""


# --------------------------------------------------------------------------------------------------
# result types
# --------------------------------------------------------------------------------------------------
@dataclass
class EquationTable:
    """Every candidate of every representation searched, simplest first.

    Each row is a dict with ``complexity`` (int, node count as the backend counts it in its
    representation), ``loss`` (float: the held-out RMS of ``log(ŷ/y)`` when a held-out split is used —
    the common scale on which representations are compared — else the training loss in the fit space),
    ``score`` (−Δlog loss/Δcomplexity along the Pareto front; NaN off the front), ``chosen``,
    ``representation`` (``log`` | ``mixed`` | ``none`` | ``constant``), ``pareto`` (on the common Pareto
    front, i.e. eligible), ``fit_loss`` (training loss in the representation's own fit space),
    ``expression`` (sympy, caller's variable names) and ``raw`` (the backend's own model string).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    COLUMNS = ("complexity", "loss", "score", "chosen", "representation", "pareto", "fit_loss", "expression",
               "raw")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    @property
    def front(self) -> list[dict[str, Any]]:
        """The rows on the common Pareto front (rows without a ``pareto`` flag count as on it)."""
        return [r for r in self.rows if r.get("pareto", True)]

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
    """Outcome of :func:`fit_equation`. ``transform`` is what was asked (``multi`` or one
    representation); ``representation`` is the one the chosen law came from."""

    expression: sp.Expr
    table: EquationTable
    backend: str
    names: tuple[str, ...]
    transform: str
    selection: str
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    representation: str = ""
    heldout_error: float = float("nan")

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
    out = np.asarray(out)
    if np.iscomplexobj(out):
        out = np.where(np.abs(out.imag) <= 1e-12 * np.abs(out.real), out.real, np.nan)
    return np.broadcast_to(np.asarray(out, dtype=np.float64), (X.shape[0],)).copy()


def heldout_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(fit, held_out)`` index arrays for ``n`` points; ``held_out`` has
    ``round(fraction·n)`` points (at least 5 when ``fraction > 0``), drawn from a fixed stream so that the
    same galaxy always splits the same way, whatever the SR seed."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {fraction}")
    if fraction == 0:
        return np.arange(n), np.arange(0)
    k = max(5, round(fraction * n))
    if n - k < 10:
        raise ValueError(f"holdout={fraction} leaves {n - k} of {n} points to fit; need at least 10 (lower it)")
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


# --------------------------------------------------------------------------------------------------
# representations
# --------------------------------------------------------------------------------------------------
@dataclass
class _Representation:
    """How the caller's ``X [N, k] → y [N]`` is presented to a backend and mapped back."""

    name: str
    names: tuple[str, ...]
    x_loc: np.ndarray  # [k] mean of log x over the fit points
    x_scale: np.ndarray  # [k] std of log x (1 where constant)
    raw_scale: np.ndarray  # [k] median of x over the fit points (mixed) or ones
    y_scale: float  # raw y divisor (none) or 1
    fit_syms: tuple[sp.Symbol, ...]

    @classmethod
    def build(cls, name: str, X: np.ndarray, y: np.ndarray, names: tuple[str, ...]) -> _Representation:
        k = X.shape[1]
        if name in ("log", "mixed"):
            lx = np.log(X)
            sd = lx.std(0)
            x_loc, x_scale = lx.mean(0), np.where(sd > 0, sd, 1.0)
        else:
            x_loc, x_scale = np.zeros(k), np.ones(k)
        raw_scale = np.ones(k)
        if name == "mixed":
            med = np.median(np.abs(X), 0)
            raw_scale = np.where(med > 0, med, 1.0)
        y_scale = (float(np.median(np.abs(y))) or 1.0) if name == "none" else 1.0
        if name == "log":
            fs = tuple(sp.Symbol(f"u_{n}", real=True) for n in names)
        elif name == "mixed":
            fs = (*(sp.Symbol(f"u_{n}", real=True) for n in names), *(sp.Symbol(f"v_{n}", real=True) for n in names))
        else:
            fs = tuple(sp.Symbol(n, real=True) for n in names)
        return cls(name, names, x_loc, x_scale, raw_scale, y_scale, fs)

    def features(self, X: np.ndarray) -> np.ndarray:
        """``X [N, k]`` → the backend's inputs ``[N, k]`` (log, none) or ``[N, 2k]`` (mixed)."""
        if self.name == "none":
            return X
        u = (np.log(X) - self.x_loc) / self.x_scale
        return np.column_stack([u, X / self.raw_scale]) if self.name == "mixed" else u

    def target(self, y: np.ndarray) -> np.ndarray:
        return y / self.y_scale if self.name == "none" else np.log(y)

    def log_prediction(self, g: np.ndarray) -> np.ndarray:
        """Fit-space prediction ``g [N]`` → ``log ŷ [N]`` (NaN where ŷ ≤ 0)."""
        if self.name == "none":
            with np.errstate(all="ignore"):
                return np.where(g > 0, np.log(np.where(g > 0, g, 1.0) * self.y_scale), np.nan)
        return g

    def to_original(self, g: sp.Expr, syms: Sequence[sp.Symbol], *, simplify: bool,
                    X_check: np.ndarray | None = None) -> sp.Expr:
        """Map a fit-space expression back to ``y = f(x)`` in the caller's symbols.

        The readable form (``exp`` of a sum split into a product of powers, then sympy's ``simplify`` for
        the chosen law) is kept only when it evaluates like the fit-space expression on ``X_check``
        (``[M, k]``, relative 1e-6); otherwise the literal ``exp(g(…))`` is returned. Splitting can
        underflow: ``exp(−1751)·exp(1749.7·m1**0.0006)`` is 0 in float64 while ``exp(g)`` is not.
        """
        k = len(syms)
        if self.name == "none":
            literal = (g * self.y_scale).subs(dict(zip(self.fit_syms, syms)), simultaneous=True)
            forms = [literal]
        else:
            sub = {u: (sp.log(s) - float(m)) / float(sd)
                   for u, s, m, sd in zip(self.fit_syms[:k], syms, self.x_loc, self.x_scale)}
            if self.name == "mixed":
                sub.update({v: s / float(c) for v, s, c in zip(self.fit_syms[k:], syms, self.raw_scale)})
            # unevaluated: sympy would pull a numeric term out of exp(c + …) and underflow exp(c)
            literal = sp.exp(sp.expand(g.subs(sub, simultaneous=True)), evaluate=False)
            # forcing log(a·b) → log a + log b is only sound when every log argument is a positive
            # variable (the log representation); in mixed space an argument can be negative somewhere
            forms = [sp.powsimp(sp.expand_log(sp.expand(literal), force=self.name == "log")), literal]
        if simplify:
            try:
                s = sp.simplify(forms[0])
                if sp.count_ops(s) <= sp.count_ops(forms[0]):
                    forms.insert(0, s)
            except Exception as e:  # noqa: BLE001  (sympy can fail on exotic forms; keep the others)
                log.debug("sympy could not simplify %s: %s", forms[0], e)
        if X_check is None or len(X_check) == 0:
            return forms[0]
        names = [s.name for s in syms]
        with np.errstate(all="ignore"):
            ref = _eval_fit(g, self.fit_syms, self.features(X_check))
            ref = np.exp(ref) if self.name != "none" else ref * self.y_scale
        for f in forms:
            try:
                val = evaluate(f, names, X_check)
            except Exception as e:  # noqa: BLE001  (lambdify of an exotic form: try the next one)
                log.debug("could not evaluate %s: %s", f, e)
                continue
            ok = np.isfinite(ref)
            if np.array_equal(np.isfinite(val), ok) and np.allclose(val[ok], ref[ok], rtol=1e-6, atol=0):
                return f
        return literal


# --------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------
def fit_equation(X: np.ndarray, y: np.ndarray, names: Sequence[str], *, backend: str = "auto", seed: int = 0,
                 transform: str = "multi", loss: str = "mse", selection: str | None = None,
                 representations: Sequence[str] | None = None, holdout: float | None = None,
                 tolerance: float = 0.2, search_points: int | None = None,
                 representation_options: dict[str, dict[str, Any]] | None = None,
                 **options: Any) -> SRResult:
    """Fit ``y ≈ f(X)`` by symbolic regression and return every candidate and the chosen law.

    Args:
        X: ``[N, k]`` inputs, columns named by ``names`` (for gravity: r in AU, m1 and m2 in M☉).
        y: ``[N]`` targets (for gravity: |F| in M☉ AU yr⁻²).
        names: ``k`` variable names; the returned expression uses sympy symbols with these names.
        backend: ``"auto"`` | ``"operon"`` | ``"pysr"``.
        seed: random seed (restart ``i`` uses ``seed + i``; every representation uses the same seed).
        transform: ``"multi"`` (default: search ``representations``, choose on the common held-out
            error), or one representation ``"log"`` | ``"mixed"`` | ``"none"`` (see the module docstring).
            ``log``, ``mixed`` and ``multi`` need X > 0 and y > 0.
        loss: ``"mse"`` or ``"l1"`` (the literature's max(1e-8, |ŷ−y|) − 1e-8), in the fit space.
        selection: ``"parsimony"`` (default for ``multi``) | ``"score"`` (default for one representation,
            the literature's) | ``"best"`` | ``"accuracy"``.
        representations: what ``multi`` searches (default :data:`DEFAULT_REPRESENTATIONS`).
        holdout: fraction of the points held out (deterministic split, :func:`heldout_split`) on which
            every candidate's RMS log-ratio error is measured; default 0.2 for ``multi``, 0 otherwise.
        tolerance: ``parsimony`` takes the simplest front row within ``(1 + tolerance)`` × the lowest loss.
        search_points: at most this many fit points are given to the search (a fixed subsample; None =
            all). Bounds the run time; the held-out error is always measured on all held-out points.
        representation_options: ``{representation: {option: value}}``, over everything else.
        **options: backend settings (see :data:`OPERON_DEFAULTS`, :data:`PYSR_DEFAULTS`); unknown keys
            for the backend that runs raise ``TypeError``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown symbolic-regression backend {backend!r}; choose one of {BACKENDS}")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {TRANSFORMS}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    reps = tuple(representations or DEFAULT_REPRESENTATIONS) if transform == "multi" else (transform,)
    bad = [r for r in reps if r not in REPRESENTATIONS]
    if bad or not reps:
        raise ValueError(f"unknown representation(s) {bad}; choose from {REPRESENTATIONS}")
    rep_opts = {str(k): dict(v or {}) for k, v in (representation_options or {}).items()}
    stray = set(rep_opts) - set(REPRESENTATIONS)
    if stray:
        raise ValueError(f"representation_options has unknown representation(s) {sorted(stray)}; "
                         f"choose from {REPRESENTATIONS}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    names = tuple(str(n) for n in names)
    if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[1] != len(names):
        raise ValueError(f"X must be [N, {len(names)}] matching names {names} and y [N]; got X {X.shape}, y {y.shape}")
    if X.shape[0] < 10:
        raise ValueError(f"need at least 10 samples for symbolic regression, got {X.shape[0]}")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("X and y must be finite (drop NaN/inf rows before fitting)")
    if any(r in ("log", "mixed") for r in reps) and (X.min() <= 0 or y.min() <= 0):
        raise ValueError(f"transform={transform!r} needs X > 0 and y > 0 (fit |F|, not signed components); "
                         f"got min X {X.min():.3g}, min y {y.min():.3g}; use transform='none' otherwise")

    if backend == "auto":
        backend = "pysr" if pysr_available() else "operon"
        log.info("symbolic regression backend: %s (auto)", backend)
    selection = selection or ("parsimony" if transform == "multi" else "score")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {SELECTIONS}")
    holdout = (0.2 if transform == "multi" else 0.0) if holdout is None else float(holdout)
    fit_idx, ho_idx = heldout_split(X.shape[0], holdout)
    search_idx = fit_idx
    if search_points is not None and len(fit_idx) > int(search_points):
        if int(search_points) < 10:
            raise ValueError(f"search_points must be >= 10, got {search_points}")
        pick = np.random.default_rng(_SPLIT_SEED + 1).choice(len(fit_idx), int(search_points), replace=False)
        search_idx = fit_idx[np.sort(pick)]
    use_ho = len(ho_idx) > 0

    syms = make_symbols(names)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    used: dict[str, Any] = {}
    for rep_name in reps:
        rep = _Representation.build(rep_name, X[fit_idx], y[fit_idx], names)
        Fs, ts = rep.features(X[search_idx]), rep.target(y[search_idx])
        opts = {**REPRESENTATION_DEFAULTS[rep_name], **options, **rep_opts.get(rep_name, {})} \
            if backend == "operon" else {**options, **rep_opts.get(rep_name, {})}
        t_rep = time.perf_counter()
        run = _run_operon if backend == "operon" else _run_pysr
        cands, used[rep_name] = run(Fs, ts, rep.fit_syms, seed=seed, loss=loss, **opts)
        log.info("%s/%s: %d candidates in %.1fs", backend, rep_name, len(cands), time.perf_counter() - t_rep)
        Ff, tf = rep.features(X[fit_idx]), rep.target(y[fit_idx])
        Fh, lyh = (rep.features(X[ho_idx]), np.log(y[ho_idx])) if use_ho else (None, None)
        for c in cands:
            g = c["expression"]
            # recompute the losses ourselves so that every backend, restart and representation is measured
            # the same way
            err = _eval_fit(g, rep.fit_syms, Ff) - tf
            fit_loss = float(np.mean(err**2) if loss == "mse" else np.mean(np.maximum(1e-8, np.abs(err)) - 1e-8))
            if not math.isfinite(fit_loss):
                continue
            common = _rms_log_ratio(rep.log_prediction(_eval_fit(g, rep.fit_syms, Fh)), lyh) if use_ho else fit_loss
            rows.append({"complexity": int(c["complexity"]), "loss": common, "fit_loss": fit_loss,
                         "raw": c["raw"], "fit_expression": g, "representation": rep_name, "_rep": rep})
    seconds = time.perf_counter() - t0

    # the constant model anchors the front (as PySR's first row does), so a degenerate early candidate that
    # is worse than a constant cannot earn a large score for the step after it
    rep0 = _Representation.build(reps[0], X[fit_idx], y[fit_idx], names)
    tf0 = rep0.target(y[fit_idx])
    const = float(np.mean(tf0) if loss == "mse" else np.median(tf0))
    err0 = const - tf0
    fit0 = float(np.mean(err0**2) if loss == "mse" else np.mean(np.maximum(1e-8, np.abs(err0)) - 1e-8))
    common0 = _rms_log_ratio(rep0.log_prediction(np.full(len(ho_idx), const)), np.log(y[ho_idx])) \
        if use_ho else fit0
    rows.insert(0, {"complexity": 1, "loss": common0, "fit_loss": fit0, "raw": f"{const:.6g}",
                    "fit_expression": sp.Float(const), "representation": "constant", "_rep": rep0})
    if not any(math.isfinite(r["loss"]) for r in rows[1:]):
        log.warning("%s: no finite candidate equation besides the constant (data degenerate?)", backend)

    rows.sort(key=lambda r: (r["complexity"], r["loss"] if math.isfinite(r["loss"]) else math.inf))
    front = _pareto(rows)
    on_front = {id(r) for r in front}
    for r in rows:
        r["pareto"] = id(r) in on_front
        r["score"] = float("nan")
    _add_scores(front)
    chosen = front[_select(front, selection, tolerance)]
    check_idx = np.concatenate([ho_idx, fit_idx])[:50]  # where readable forms must agree with the fit space
    for r in rows:
        # full sympy simplification is slow (up to seconds per expression): only the chosen law gets it
        r["chosen"] = r is chosen
        r["expression"] = r.pop("_rep").to_original(r["fit_expression"], syms, simplify=r is chosen,
                                                     X_check=X[check_idx])
    table = EquationTable(rows=[{k: r[k] for k in (*EquationTable.COLUMNS, "fit_expression")} for r in rows])
    expr = chosen["expression"]
    log.info("%s (%s): %d candidates in %.1fs; chosen (%s) %s complexity %d, loss %.4g: %s", backend,
             "+".join(reps), len(rows), seconds, selection, chosen["representation"], chosen["complexity"],
             chosen["loss"], expr)
    used = used[reps[0]] if len(reps) == 1 else used
    return SRResult(expression=expr, table=table, backend=backend, names=names, transform=transform,
                    selection=selection, seconds=seconds, options=used, representation=chosen["representation"],
                    heldout_error=float(chosen["loss"]) if use_ho else float("nan"))


# --------------------------------------------------------------------------------------------------
# table helpers
# --------------------------------------------------------------------------------------------------
def _rms_log_ratio(log_pred: np.ndarray, log_y: np.ndarray) -> float:
    """RMS of ``log ŷ − log y`` (inf when any prediction is non-positive or not finite)."""
    with np.errstate(all="ignore"):
        d = np.asarray(log_pred, dtype=np.float64) - log_y
        if not np.isfinite(d).all():
            return math.inf
        return float(np.sqrt(np.mean(d**2)))


def _pareto(rows: list[dict]) -> list[dict]:
    """Keep, per complexity, the lowest loss; then only rows that beat every simpler row."""
    best: dict[int, dict] = {}
    for r in rows:
        if not math.isfinite(r["loss"]):
            continue
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


def _select(rows: list[dict], selection: str, tolerance: float = 0.2) -> int:
    """Index into the Pareto front ``rows`` (simplest first) of the chosen law."""
    lowest = min(r["loss"] for r in rows)
    if selection == "accuracy":
        return int(np.argmin([r["loss"] for r in rows]))
    if selection == "score":
        return int(np.argmax([r["score"] for r in rows]))
    if selection == "parsimony":
        return next(i for i, r in enumerate(rows) if r["loss"] <= (1 + tolerance) * lowest)
    ok = [i for i, r in enumerate(rows) if r["loss"] <= 1.5 * lowest]
    return max(ok, key=lambda i: rows[i]["score"])


def _eval_fit(g: sp.Expr, fit_syms: Sequence[sp.Symbol], Xf: np.ndarray) -> np.ndarray:
    """``g`` on the fit-space inputs ``Xf [N, len(fit_syms)]`` → ``[N]``; NaN where it is not a finite
    real (including candidates sympy cannot print, e.g. with ``zoo`` from a division by a zero constant)."""
    if g.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        return np.full(Xf.shape[0], np.nan)
    try:
        f = sp.lambdify(list(fit_syms), g, modules="numpy")
    except (KeyError, TypeError, NameError) as e:
        log.debug("cannot evaluate candidate %s: %s", g, e)
        return np.full(Xf.shape[0], np.nan)
    with np.errstate(all="ignore"):
        out = f(*[Xf[:, i] for i in range(Xf.shape[1])])
    out = np.broadcast_to(np.asarray(out, dtype=np.complex128 if np.iscomplexobj(out) else np.float64),
                          (Xf.shape[0],))
    if np.iscomplexobj(out):
        return np.full(Xf.shape[0], np.nan)
    return out

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
        raise SymbolicBackendUnavailable("the offline engine needs pyoperon: pip install pyoperon") from e
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
    except SymbolicBackendUnavailable as e:
        log.info("PySR unavailable (%s)", str(e).split(":")[0])
        return False


def _import_pysr():
    try:
        import pysr  # noqa: F401  (boots Julia)
    except Exception as e:  # ImportError, or Julia failing to start (juliacall raises various types)
        raise SymbolicBackendUnavailable(f"{_PYSR_MISSING} (import failed: {type(e).__name__}: {e})") from e
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
