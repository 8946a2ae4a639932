"""The Newton verdict: is a recovered law C·m1·m2/r², and do the predictions say so?

:func:`compare_to_newton` looks at one recovered expression and the data it was fitted to, and reports

1. **symbolic**: ``expression / (m1·m2/r²)`` simplifies to a positive constant free of every variable
   (sympy, symbols matched by name). Constants a float-valued engine returns such as ``r**-2.00003``
   are first snapped to the nearest integer or half when within ``snap`` (default 0.02) — the
   reasons say when snapping was needed;
2. **power law of the law**: OLS of ``log f(X) = c + α log r + β log m1 + γ log m2`` on the galaxy's points,
   with two-sided t confidence intervals (level ``ci``, default 0.99), and the R² of that fit (a law
   that is not a power law, e.g. ``sin(r)``, has a low one and its "exponents" mean nothing);
3. **power law of the data**: the same fit on ``y`` (the model's predictions) — reported, so a reader can
   see what the predictions say even when the search found something else;
4. **Newton fit**: the best ``C·m1·m2/r²`` (only C fitted, in log space) and its R² on ``log y``
   (``r2_newton``), plus the R² of the recovered law itself on ``log y`` (``r2_law``).

5. **power-law form**: whether the law (after snapping) *is* a power law ``C·Π x_k^{a_k}`` — by its
   structure, or, failing that, numerically: its local exponents ``∂log f/∂log x_k`` are the same at
   every point (:func:`is_power_law`);
6. **law vs Newton**: the log-space mean squared residual of the best ``C·m1·m2/r²`` over that of the
   law (``mse_ratio``; > 1 when the law explains the data better).

Verdict (thresholds are arguments, defaults stated here): **newtonian** when the law is symbolically
Newtonian and ``r2_newton ≥ r2_min`` (0.99). Failing the symbolic test, a **power law** is newtonian when
every exponent is within its confidence interval *widened by* ``tol`` (0.05, an equivalence margin: with
1,000 points the intervals of an excellent fit shrink below any physically meaningful difference) of
(−2, 1, 1), that power-law fit has R² ≥ ``r2_min`` and ``r2_newton ≥ r2_min``. A law that is **not a
power law** (softened, screened, a sum of terms, …) is never judged by its local power-law fit alone: it
is newtonian only when, in addition to those conditions, it does *not* explain the data significantly
better than the best Newton law, i.e. ``mse_ratio ≤ 1 + margin`` (``margin`` 0.1: with 1,000 points the
sampling spread of a ratio of mean squares is about 5 %) — then its extra terms are not supported by the
data. A softened law with a small ε or a screened law with a long λ whose local exponents are close to
(−2, 1, 1) but which fits the data clearly better than Newton is therefore not Newtonian. All R² and
mean squares are in log space (relative errors), because |F| spans five decades.

Near misses are rejected by construction: 1/r (α = −1, β = γ = 0), m1/r² (γ = 0), m1·m2/r^2.5 (α = −2.5).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import sympy as sp
from scipy import stats

from gravprobe.probes.symbolic import evaluate

NEWTON_EXPONENTS = {"r": -2.0, "m1": 1.0, "m2": 1.0}


@dataclass
class PowerLawFit:
    """OLS ``log y = c + Σ_k α_k log x_k``: estimates, CIs (``[est, lo, hi]`` per variable) and R²."""

    intercept: float
    exponents: dict[str, list[float]]
    r2: float
    n: int


@dataclass
class Verdict:
    """One galaxy's verdict. ``exponents`` are the recovered law's, ``exponents_data`` the predictions';
    ``power_law`` whether the law is one (:func:`is_power_law`); ``mse_ratio`` Newton's log-space mean
    squared residual over the law's (> 1: the law explains the data better)."""

    expression: str
    newtonian: bool
    symbolic: bool
    reasons: str
    exponents: dict[str, list[float]]
    exponents_data: dict[str, list[float]]
    r2_power_law: float
    r2_newton: float
    r2_law: float
    newton_constant: float
    power_law: bool = True
    mse_ratio: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def power_law_fit(X: np.ndarray, y: np.ndarray, names: Sequence[str], *, ci: float = 0.99) -> PowerLawFit:
    """Fit ``log y = c + Σ α_k log X[:, k]`` by OLS; t-intervals at level ``ci``.

    ``X [N, k] > 0`` and ``y [N] > 0``; raises ``ValueError`` otherwise.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if (X <= 0).any() or (y <= 0).any() or not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("power-law fit needs finite X > 0 and y > 0")
    n, k = X.shape
    lx = np.log(X)
    # a variable that does not vary (e.g. m2 = 1 M☉ in the solar system) has no identifiable exponent:
    # it is left out of the design and reported as [nan, -inf, inf]
    varies = lx.std(0) > 1e-12 * np.maximum(1.0, np.abs(lx).max(0))
    A = np.column_stack([np.ones(n), lx[:, varies]])
    ly = np.log(y)
    coef, *_ = np.linalg.lstsq(A, ly, rcond=None)
    resid = ly - A @ coef
    dof = max(n - A.shape[1], 1)
    s2 = float(resid @ resid) / dof
    cov = s2 * np.linalg.pinv(A.T @ A)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    t = stats.t.ppf(0.5 + ci / 2, dof)
    sst = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float(resid @ resid) / sst if sst > 0 else (1.0 if float(resid @ resid) == 0 else 0.0)
    ex, j = {}, 1
    for nm, v in zip(names, varies):
        if v:
            ex[nm] = [float(coef[j]), float(coef[j] - t * se[j]), float(coef[j] + t * se[j])]
            j += 1
        else:
            ex[nm] = [float("nan"), float("-inf"), float("inf")]
    return PowerLawFit(intercept=float(coef[0]), exponents=ex, r2=r2, n=n)


def newton_fit(X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Best ``C·m1·m2/r²`` for ``X = [r, m1, m2]`` (only C, least squares in log space) → ``(C, R²_log)``."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    good = (y > 0) & np.isfinite(y)
    if good.sum() < 2:
        return float("nan"), float("-inf")
    base = np.log(X[good, 1]) + np.log(X[good, 2]) - 2 * np.log(X[good, 0])
    ly = np.log(y[good])
    logc = float(np.mean(ly - base))
    resid = ly - base - logc
    sst = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float(resid @ resid) / sst if sst > 0 else 0.0
    if good.sum() < len(y):  # non-positive predictions cannot be Newtonian: penalise by their fraction
        r2 -= (len(y) - good.sum()) / len(y)
    return float(np.exp(logc)), r2


def _snap(expr: sp.Expr, snap: float) -> sp.Expr:
    """Replace float exponents within ``snap`` of an integer or half by that number."""
    def fix(p):
        e = p.exp
        if e.is_Float:
            h = round(float(e) * 2) / 2
            if abs(float(e) - h) <= snap:
                return sp.Pow(p.base, sp.Rational(int(h * 2), 2))
        return p

    return expr.replace(lambda q: q.is_Pow and q.exp.is_Float, fix)


def is_symbolically_newtonian(expression: sp.Expr, names: Sequence[str] = ("r", "m1", "m2")) -> tuple[bool, float]:
    """``(True, C)`` when ``expression = C·m1·m2/r²`` with a constant ``C > 0`` free of the variables."""
    by_name = {s.name: s for s in expression.free_symbols}
    extra = set(by_name) - set(names)
    if extra:
        return False, float("nan")
    r, m1, m2 = (by_name.get(n, sp.Symbol(n, positive=True)) for n in names)
    ratio = sp.simplify(sp.powsimp(expression * r**2 / (m1 * m2), force=True))
    if ratio.free_symbols & {r, m1, m2}:
        return False, float("nan")
    try:
        c = complex(sp.N(ratio))
    except (TypeError, ValueError):
        return False, float("nan")
    if abs(c.imag) > 1e-12 * max(1.0, abs(c.real)) or not np.isfinite(c.real) or c.real <= 0:
        return False, float(c.real)
    return True, float(c.real)


def is_power_law(expression: sp.Expr, names: Sequence[str] = ("r", "m1", "m2"),
                 X: np.ndarray | None = None, *, rtol: float = 1e-6) -> bool:
    """True when ``expression`` is ``C·Π x_k^{a_k}`` with constants ``C``, ``a_k`` (symbols matched by name).

    First structurally (every factor that depends on a variable is a variable or a variable to a
    constant power, after ``powsimp``/``expand_power_base``); when that fails and ``X [N, k]`` (columns
    ``names``) is given, numerically: each local exponent ``x_k ∂f/∂x_k / f`` spreads by at most ``rtol``
    (relative to max(1, |mean|)) over the points — this catches forms such as ``exp(c + 2 log r)`` that
    sympy leaves unsimplified. A symbol that is not among ``names`` makes it not a power law.
    """
    by_name = {s.name: s for s in expression.free_symbols}
    if set(by_name) - set(names):
        return False
    vars_ = set(by_name.values())
    e = sp.powsimp(sp.expand_power_base(sp.expand(expression), force=True), force=True)
    structural = True
    for f in sp.Mul.make_args(e):
        if not (f.free_symbols & vars_):
            continue
        if f.is_Symbol or (f.is_Pow and f.base.is_Symbol and not (f.exp.free_symbols & vars_)):
            continue
        structural = False
        break
    if structural or X is None:
        return structural
    X = np.asarray(X, dtype=np.float64)
    for name, sym in by_name.items():
        col = X[:, list(names).index(name)]
        try:
            local = sp.lambdify(list(by_name.values()), sp.diff(expression, sym) * sym / expression, "numpy")
            with np.errstate(all="ignore"):
                a = np.broadcast_to(np.asarray(local(*[X[:, list(names).index(n)] for n in by_name]),
                                               dtype=np.float64), col.shape)
        except (TypeError, ValueError, ZeroDivisionError):
            return False
        if not np.isfinite(a).all() or np.ptp(a) > rtol * max(1.0, float(np.abs(a).mean())):
            return False
    return True


def compare_to_newton(expression: sp.Expr | str, X: np.ndarray, y: np.ndarray,
                      names: Sequence[str] = ("r", "m1", "m2"), *, ci: float = 0.99, tol: float = 0.05,
                      r2_min: float = 0.99, snap: float = 0.02, margin: float = 0.1) -> Verdict:
    """Judge one recovered law against Newton's ``C·m1·m2/r²`` (see the module docstring).

    Args:
        expression: the recovered law (sympy, or a string parsed with positive symbols ``names``).
        X: ``[N, 3]`` the galaxy's inputs, columns ``names`` = (r [AU], m1 [M☉], m2 [M☉]).
        y: ``[N]`` the values the law was fitted to (predicted |F|, M☉ AU yr⁻²).
        ci: confidence level of the exponent intervals; tol: equivalence margin added to each side;
        r2_min: R² threshold (log space) for "explains the predictions"; snap: exponent snapping width;
        margin: a non-power law whose log-space mean squared residual is below Newton's by more than this
            factor (``mse_newton > (1 + margin)·mse_law``) explains the data better than Newton.
    """
    names = tuple(names)
    if len(names) != 3:
        raise ValueError(f"names must be the three variables (r, m1, m2) in this order; got {names}")
    if isinstance(expression, str):
        expression = sp.sympify(expression, locals={n: sp.Symbol(n, positive=True) for n in names})
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    reasons: list[str] = []

    sym, C = is_symbolically_newtonian(expression, names)
    snapped = False
    if not sym:
        sym, C = is_symbolically_newtonian(_snap(expression, snap), names)
        snapped = sym
    c_fit, r2_newton = newton_fit(X, y)

    f = evaluate(expression, names, X)
    nan3 = [float("nan")] * 3
    try:
        law = power_law_fit(X, f, names, ci=ci)
        ex_law, r2_pl = law.exponents, law.r2
    except ValueError:
        ex_law, r2_pl = {n: list(nan3) for n in names}, float("-inf")
        reasons.append("the law is not positive and finite on every point, so it has no power-law form")
    try:
        ex_data = power_law_fit(X, y, names, ci=ci).exponents
    except ValueError:
        ex_data = {n: list(nan3) for n in names}
    good = (f > 0) & np.isfinite(f) & (y > 0)
    if good.sum() >= 2:
        ly = np.log(y[good])
        sst = float(((ly - ly.mean()) ** 2).sum())
        r2_law = 1.0 - float(((ly - np.log(f[good])) ** 2).sum()) / sst if sst > 0 else 0.0
    else:
        r2_law = float("-inf")
    # law vs Newton on the same points, log space; a law that is not positive everywhere explains nothing
    pos = (y > 0) & np.isfinite(y)
    ly_all = np.log(y[pos])
    base = np.log(X[pos, 1]) + np.log(X[pos, 2]) - 2 * np.log(X[pos, 0])
    mse_newton = float(np.mean((ly_all - base - np.mean(ly_all - base)) ** 2)) if pos.any() else float("inf")
    if good.sum() == pos.sum() and pos.any():
        mse_law = float(np.mean((ly_all - np.log(f[pos])) ** 2))
    else:
        mse_law = float("inf")
    mse_ratio = mse_newton / mse_law if mse_law > 0 else (float("inf") if mse_newton > 0 else 1.0)
    power = sym or is_power_law(_snap(expression, snap), names, X)

    target = dict(zip(names, NEWTON_EXPONENTS.values()))
    inside = {n: (ex_law[n][1] - tol <= target[n] <= ex_law[n][2] + tol) for n in names}
    explains = r2_newton >= r2_min

    if sym:
        reasons.append(f"symbolically C*m1*m2/r^2 with C = {C:.6g}" + (" (exponents snapped within "
                                                                      f"{snap})" if snapped else ""))
    else:
        reasons.append("not symbolically C*m1*m2/r^2")
    ex_txt = ", ".join(f"{n} {ex_law[n][0]:+.4f} [{ex_law[n][1]:+.4f}, {ex_law[n][2]:+.4f}]" for n in names)
    reasons.append(f"law's power-law exponents ({ci:.0%} CI) {ex_txt}; R2 {r2_pl:.4f}")
    fixed = [n for n in names if ex_law[n][1] == float("-inf")]
    if fixed and r2_pl > float("-inf"):
        reasons.append(f"{', '.join(fixed)} constant in this galaxy: exponent not identifiable, not tested")
    misses = [n for n in names if not inside[n]]
    if misses:
        reasons.append(f"exponent(s) of {', '.join(misses)} exclude Newton's (-2, 1, 1) by more than {tol}")
    reasons.append(f"Newton fit R2 (log) {r2_newton:.4f} {'>=' if explains else '<'} {r2_min}; "
                   f"law R2 (log) {r2_law:.4f}")
    better = mse_ratio > 1 + margin

    if sym:
        newtonian = explains
    elif power:
        newtonian = (not misses) and r2_pl >= r2_min and explains
        if newtonian:
            reasons.append("numerically Newtonian: every exponent agrees within CI + tolerance")
    else:
        reasons.append(f"not a power law: judged by its fit, not by its local exponents; Newton's mean squared "
                       f"log residual is {mse_ratio:.3g}x the law's ({'>' if better else '<='} 1 + {margin})")
        newtonian = (not better) and (not misses) and r2_pl >= r2_min and explains
        if better:
            reasons.append("the law explains the data significantly better than C*m1*m2/r^2: not Newtonian")
        elif newtonian:
            reasons.append("numerically Newtonian: its non-power-law terms do not explain the data better than "
                           "C*m1*m2/r^2 and every exponent agrees within CI + tolerance")
    return Verdict(expression=str(expression), newtonian=bool(newtonian), symbolic=bool(sym),
                   reasons="; ".join(reasons), exponents=ex_law, exponents_data=ex_data, r2_power_law=r2_pl,
                   r2_newton=r2_newton, r2_law=r2_law, newton_constant=c_fit,
                   power_law=bool(power), mse_ratio=float(mse_ratio),
                   extra={"ci": ci, "tol": tol, "r2_min": r2_min, "margin": margin})
