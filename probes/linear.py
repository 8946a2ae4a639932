"""Activation capture and linear (ridge) / small-MLP probes (METHOD.md §4.1).

At every layer ``l = 0 … L`` (0 = embeddings, ``l`` = after block ``l``; ``model.hidden_states``) the
activation ``[C]`` at each planet step is regressed on physical targets of that step's true state; R² is
measured on *held-out systems* (a split by sequence, so a probe cannot memorise an orbit).

Ridge penalty: one per target, chosen by cross-validation *grouped by sequence* (``GroupKFold``: no orbit in
two folds) on the training sequences, over a log-spaced grid (``probe.linear.ridge_alphas``); a choice at the
grid's edge is flagged and logged. A held-out R² below ``decodable_min_r2`` (every negative R²) is reported as
*not decodable* — the number is kept beside the flag.

Settings are the typed ``probe.linear`` section (:class:`gravprobe.config.LinearProbeConfig`); a partial
mapping (a notebook's dict) has its missing keys filled from ``conf/probe/default.yaml`` by
:func:`probe_part`, the one place their defaults are written.

Targets (units): ``F_x, F_y`` and ``F_mag`` (M☉ AU yr⁻²), ``log_F_mag`` (ln |F|), ``r`` (AU), ``log_r``
(ln r), ``inv_r`` (AU⁻¹), ``inv_r2`` (AU⁻²), ``a`` (AU), ``e``, ``lrl_x, lrl_y`` (Laplace–Runge–Lenz
vector / μ, dimensionless), ``log_m1`` / ``log_m2`` (ln of the planet / star mass in M☉). |F|, r, 1/r and
1/r² span decades; a raw R² of them is decided by their largest values, so the log versions are probed
beside the raw ones.
"""
from __future__ import annotations

import logging
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from gravprobe.orbits import G, elements_from_state
from sklearn.model_selection import GroupKFold
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler

from gravprobe.common import progress
from gravprobe.config import LinearProbeConfig, MLPProbeConfig, ProbeConfig, group_defaults, to_container

log = logging.getLogger(__name__)


def probe_part(part: str, node: Any = None):
    """``probe.<part>`` typed: ``linear`` → :class:`~gravprobe.config.LinearProbeConfig`, ``readouts``,
    ``head``, ``selection`` …, or a nested part (``linear.mlp``, ``readouts.attention``). ``node`` is returned
    as it is when already typed; otherwise (a mapping, an OmegaConf node, ``None``) its missing keys are
    filled from ``conf/probe/default.yaml`` (:meth:`ProbeConfig.from_cfg <gravprobe.config.Schema.from_cfg>`)
    and it is validated; raises ``ConfigError`` (a ``ValueError``) naming ``probe.<part>.<key>``."""
    names = part.split(".")
    cls: Any = ProbeConfig
    for name in names:
        cls = typing.get_type_hints(cls)[name]
    if isinstance(cls, type) and isinstance(node, cls):
        return node
    tree = to_container(node)
    for name in reversed(names):
        tree = {name: {} if tree is None else tree}
    obj = ProbeConfig.from_cfg(tree)
    for name in names:
        obj = getattr(obj, name)
    return obj


def __getattr__(name: str):
    """``DEFAULT_ALPHAS`` (the grid of ``probe.linear.ridge_alphas``) and ``DECODABLE_MIN_R2``, read from
    ``conf/probe/default.yaml`` when first asked for (they are not written here)."""
    if name == "DEFAULT_ALPHAS":
        value = tuple(float(a) for a in ridge_alpha_grid(None))
    elif name == "DECODABLE_MIN_R2":
        value = probe_part("linear").decodable_min_r2
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # read once: later lookups find the module attribute
    return value


#: Every probe target, declared once: name -> its value from the quantities of one state (``x``, ``y``, ``vx``,
#: ``vy``, ``m1`` planet, ``m2`` star, ``Fx``, ``Fy``, and the derived ``r``, ``F`` = |F| and ``el``, the orbital
#: elements). Adding a target is one entry here (plus ``conf/probe/default.yaml`` to probe it by default).
TARGET_FUNCTIONS: dict[str, Callable[[dict], np.ndarray]] = {
    "F_x": lambda q: q["Fx"],
    "F_y": lambda q: q["Fy"],
    "F_mag": lambda q: q["F"],
    "log_F_mag": lambda q: np.log(q["F"]),
    "r": lambda q: q["r"],
    "log_r": lambda q: np.log(q["r"]),
    "inv_r": lambda q: 1 / q["r"],
    "inv_r2": lambda q: 1 / q["r"] ** 2,
    "a": lambda q: q["el"].a,
    "e": lambda q: q["el"].e,
    "lrl_x": lambda q: q["el"].lrl[:, 0],
    "lrl_y": lambda q: q["el"].lrl[:, 1],
    "log_m1": lambda q: np.log(q["m1"]),
    "log_m2": lambda q: np.log(q["m2"]),
}
TARGETS = tuple(TARGET_FUNCTIONS)


class _Quantities(dict):
    """The per-state quantities targets are computed from; the orbital elements only when a target asks."""

    def __missing__(self, key):
        if key != "el":
            raise KeyError(key)
        self["el"] = el = elements_from_state(np.column_stack([self["x"], self["y"]]),
                                              np.column_stack([self["vx"], self["vy"]]),
                                              G * (self["m1"] + self["m2"]))
        return el


def probe_targets(state: np.ndarray, force: np.ndarray, names: Sequence[str] = TARGETS) -> np.ndarray:
    """``state [M, 6]``, ``force [M, 2]`` → ``[M, len(names)]`` target matrix (see the module docstring)."""
    unknown = [n for n in names if n not in TARGET_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown probe target(s) {unknown}; valid: {list(TARGETS)}")
    state = np.asarray(state, dtype=np.float64)
    force = np.asarray(force, dtype=np.float64)
    q = _Quantities(x=state[:, 0], y=state[:, 1], vx=state[:, 2], vy=state[:, 3], m1=state[:, 4], m2=state[:, 5],
                    Fx=force[:, 0], Fy=force[:, 1], r=np.hypot(state[:, 0], state[:, 1]),
                    F=np.hypot(force[:, 0], force[:, 1]))
    with np.errstate(divide="ignore", invalid="ignore"):   # a zero force/mass gives -inf: the row is dropped
        return np.column_stack([np.broadcast_to(TARGET_FUNCTIONS[n](q), (len(state),)) for n in names])


def orbit_n_bins(model, ds) -> int:
    """``V``, the number of coordinate bins of ``ds``'s tokens: the dataset's own (``ds.spec.n_bins``, its
    tokenizer defines its ids) when it has a spec, else the model's (``orbit_vocab = V + 3``). A discrete
    model reads the ids as embedding rows, so a dataset tokenised with other bins is refused."""
    vocab = int(getattr(getattr(model, "cfg", None), "orbit_vocab", 0) or 0)
    mode = getattr(getattr(model, "cfg", None), "orbit_mode", "discrete")
    spec_bins = getattr(getattr(ds, "spec", None), "n_bins", None)
    if spec_bins is not None:
        if mode == "discrete" and vocab and int(spec_bins) + 3 != vocab:
            raise ValueError(f"the probed data is tokenised with n_bins={spec_bins}, but the model's orbit "
                             f"vocabulary is {vocab} = n_bins + 3 with n_bins={vocab - 3}; generate the force "
                             f"data with force_data.n_bins={vocab - 3} (the pretraining data's)")
        return int(spec_bins)
    if vocab < 4:
        raise ValueError(f"the model has orbit_vocab={vocab}: no orbit modality to probe (needs n_bins + 3 >= 4)")
    return vocab - 3


def model_inputs(model, ds, systems: np.ndarray, length: int | None = None):
    """The orbit input ``[B, length, 2]`` (``length`` default: the whole sequence) of ``systems`` as the model
    was pretrained on it (:func:`gravprobe.pretrain.data.orbit_inputs`, the same rule for every stage):
    integer token ids for a discrete model, positions in AU (NaN at dt markers and padding) for a
    continuous one."""
    import torch
    from gravprobe.pretrain.data import orbit_inputs  # gravprobe.pretrain imports torch

    mode = getattr(getattr(model, "cfg", None), "orbit_mode", "discrete")
    T = int(ds.tokens.shape[1]) if length is None else int(length)
    positions = ds.positions if mode == "continuous" else None
    return torch.from_numpy(orbit_inputs(ds.tokens, positions, np.asarray(systems), T, orbit_n_bins(model, ds),
                                         mode))


def context_limit(model) -> int | None:
    """The longest input the model takes: ``block_size`` for learned positions, ``None`` (any) for RoPE."""
    return int(model.cfg.block_size) if getattr(model, "pos_emb", None) is not None else None


def capture_activations(model, ds, systems: np.ndarray, steps_mask: np.ndarray, *, layers: Sequence[int] | None = None,
                        batch_size: int | None = None, device: str = "cpu") -> dict[int, np.ndarray]:
    """Hidden states at selected steps. ``steps_mask [len(systems), T]`` bool picks the steps (e.g. planet
    steps); returns ``{layer: [M, C] float32}`` in row-major order of ``(system, step)`` over the mask. Each
    batch's input stops after its last selected step (exact for a causal model). ``batch_size`` ``None``:
    ``probe.linear.batch_size`` of ``conf/probe/default.yaml``."""
    import torch

    if batch_size is None:
        batch_size = probe_part("linear").batch_size

    n_all = model.n_layers + 1
    layers = list(range(n_all)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n_all]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: this model has layers 0..{n_all - 1} (0 = embeddings)")
    out: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    model.eval()
    with torch.no_grad():
        for b in progress(range(0, len(systems), batch_size), desc="activations", leave=False):
            sl = slice(b, b + batch_size)
            mb = np.asarray(steps_mask[sl], dtype=bool)
            cols = np.flatnonzero(mb.any(0))
            t_end = int(cols[-1]) + 1 if len(cols) else 1       # causal: later positions change nothing
            x = model_inputs(model, ds, systems[sl], t_end).to(device)
            hs = model.hidden_states(x)
            m = torch.from_numpy(mb[:, :t_end]).to(device)
            for l in layers:
                out[l].append(hs[l][m].float().cpu().numpy())
    return {l: np.concatenate(v) if v else np.zeros((0, model.d_model), np.float32) for l, v in out.items()}


def r2_scores(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Column-wise R² ``[K]`` of ``[M, K]`` arrays (the held-out rows' own mean is the baseline, so a probe
    that predicts the training mean scores ≤ 0)."""
    ss_res = ((y_true - y_pred) ** 2).sum(0)
    ss_tot = ((y_true - y_true.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, np.nan)


# ------------------------------------------------------------------------------------------ ridge
def ridge_alpha_grid(spec=None, *, part: str = "linear") -> np.ndarray:
    """The ridge penalty grid from ``probe.<part>.ridge_alphas`` (the schema's ``RidgeAlphas``): a list of
    penalties, or a mapping ``{min, max, num}`` (log-spaced, inclusive). ``None`` → the YAML's grid
    (``conf/probe/default.yaml``); a partial mapping has its missing keys from there. Penalties are in
    units of the standardised activations (sum of squares over training rows)."""
    key = f"probe.{part}.ridge_alphas"
    default = group_defaults("probe")[part]["ridge_alphas"]
    spec = to_container(default if spec is None else spec)
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"min", "max", "num"})
        if unknown:
            raise ValueError(f"{key} has unknown key(s) {unknown}; use {{min, max, num}} or a list of penalties")
        if isinstance(default, Mapping):
            spec = {**default, **spec}
        missing = sorted({"min", "max", "num"} - set(spec))
        if missing:
            raise ValueError(f"{key}={dict(spec)} misses {missing}; use {{min, max, num}} or a list of penalties")
        lo, hi, num = float(spec["min"]), float(spec["max"]), int(spec["num"])
        if not 0 < lo < hi or num < 2:
            raise ValueError(f"{key}={dict(spec)} needs 0 < min < max and num >= 2")
        return np.logspace(np.log10(lo), np.log10(hi), num)
    grid = np.sort(np.asarray(list(spec), dtype=np.float64))
    if grid.size < 2 or not (grid > 0).all():
        raise ValueError(f"{key}={list(spec)} must hold at least two positive penalties")
    return grid


def _ridge_path(Xtr: np.ndarray, Ytr: np.ndarray, Xte: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Ridge predictions at every penalty: ``[A, M_te, K]``. Centres on the training rows (unpenalised
    intercept) and solves all penalties from one eigendecomposition of the ``[C, C]`` Gram matrix."""
    mx, my = Xtr.mean(0), Ytr.mean(0)
    Xc, Yc = Xtr - mx, Ytr - my
    lam, V = np.linalg.eigh(Xc.T @ Xc)
    lam = np.clip(lam, 0.0, None)
    B = V.T @ (Xc.T @ Yc)                                   # [C, K]
    P = (Xte - mx) @ V                                      # [M_te, C]
    return np.stack([P @ (B / (lam + a)[:, None]) for a in alphas]) + my


def grouped_cv_alphas(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, alphas: np.ndarray, n_splits: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Choose one ridge penalty per target by ``GroupKFold`` cross-validation (a group = one sequence, so no
    orbit is in two folds). ``X [M, C]``, ``Y [M, K]``, ``groups [M]``. Returns ``(index into alphas [K],
    cross-validated mean squared error [A, K])``. Ties go to the larger penalty."""
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"grouped cross-validation needs at least 2 training sequences, got {n_groups}; "
                         "raise probe.linear.n_systems")
    folds = GroupKFold(n_splits=min(int(n_splits), n_groups))
    sse = np.zeros((len(alphas), Y.shape[1]))
    for tr, te in folds.split(X, Y, groups):
        sse += ((_ridge_path(X[tr], Y[tr], X[te], alphas) - Y[te]) ** 2).sum(1)
    mse = sse / len(X)
    best = len(alphas) - 1 - np.argmin(mse[::-1], axis=0)   # last minimum = largest penalty on ties
    return best, mse


def ridge_probe(X: np.ndarray, Y: np.ndarray, is_train: np.ndarray, groups: np.ndarray, *,
                alphas=None, n_splits: int | None = None) -> dict[str, np.ndarray]:
    """One ridge probe per target column, penalty by grouped CV on the training rows, scored on the rest.
    ``alphas``: a grid array or a ``ridge_alphas`` spec (:func:`ridge_alpha_grid`); ``alphas`` / ``n_splits``
    ``None``: ``probe.linear.ridge_alphas`` / ``cv_folds`` of ``conf/probe/default.yaml``.

    ``X [M, C]`` and ``Y [M, K]`` (already standardised or not: both are standardised here on the training
    rows), ``is_train [M]`` bool, ``groups [M]`` sequence ids. Returns ``r2 [K]`` (held-out R²),
    ``alpha [K]``, ``alpha_edge [K]`` (``"lower"``/``"upper"`` when the chosen penalty is the grid's first or
    last value, else ``""``) and ``pred [M_te, K]`` (held-out predictions in the units of ``Y``).
    """
    alphas = ridge_alpha_grid(alphas) if not isinstance(alphas, np.ndarray) else alphas
    if n_splits is None:
        n_splits = probe_part("linear").cv_folds
    is_train = np.asarray(is_train, dtype=bool)
    if is_train.all() or not is_train.any():
        raise ValueError("probes need both training and held-out rows (check probe.linear.heldout_fraction)")
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    mx, sx = X[is_train].mean(0), X[is_train].std(0)
    my, sy = Y[is_train].mean(0), Y[is_train].std(0)
    Xs = (X - mx) / np.where(sx > 0, sx, 1.0)
    Ys = (Y - my) / np.where(sy > 0, sy, 1.0)
    best, _ = grouped_cv_alphas(Xs[is_train], Ys[is_train], np.asarray(groups)[is_train], alphas, n_splits)
    path = _ridge_path(Xs[is_train], Ys[is_train], Xs[~is_train], alphas)     # [A, M_te, K]
    pred_s = path[best, :, np.arange(Y.shape[1])].T                           # [M_te, K]
    edge = np.where(best == 0, "lower", np.where(best == len(alphas) - 1, "upper", ""))
    return {"r2": r2_scores(Ys[~is_train], pred_s), "alpha": alphas[best], "alpha_edge": edge,
            "pred": pred_s * np.where(sy > 0, sy, 1.0) + my}


def drop_constant_targets(targets: np.ndarray, names: Sequence[str], rows: np.ndarray, what: str
                          ) -> tuple[np.ndarray, list[str], list[str]]:
    """Drop target columns that are constant (or non-finite) on the ``rows`` used for training: an R² of a
    constant is undefined (e.g. the star mass of a fixed-star data set). Returns ``(targets, names, dropped)``
    and logs what was dropped."""
    names = list(names)
    keep = []
    for k in range(targets.shape[1]):
        col = targets[rows, k]
        col = col[np.isfinite(col)]
        keep.append(bool(col.size > 1 and np.ptp(col) > 1e-12 * max(1.0, float(np.abs(col).max()))))
    dropped = [n for n, k in zip(names, keep) if not k]
    if not any(keep):
        raise ValueError(f"{what}: every target {names} is constant in these data; nothing to probe")
    if dropped:
        log.warning("%s: target(s) %s are constant in these data and are not probed", what, dropped)
    return targets[:, np.array(keep, bool)], [n for n, k in zip(names, keep) if k], dropped


def _log_edges(rows: list[dict], what: str) -> None:
    edges = [f"{r['target']}@{r['layer']}({r['alpha_edge']})" for r in rows if r.get("alpha_edge")]
    if edges:
        log.warning("%s: ridge penalty at the edge of the grid for %d probe(s): %s (lower: the target is fitted "
                    "with almost no penalty; upper: the probe predicts about the mean)", what, len(edges),
                    ", ".join(edges[:12]) + (" ..." if len(edges) > 12 else ""))


def fit_probes(acts: dict, targets: np.ndarray, is_train: np.ndarray, names: Sequence[str], *,
               groups: np.ndarray | None = None, alphas=None, cv_folds: int | None = None,
               mlp: MLPProbeConfig | Mapping | None = None, decodable_min_r2: float | None = None,
               seed: int = 0) -> list[dict]:
    """Ridge (penalty per target by grouped CV) and optionally an MLP probe per layer.

    ``acts {layer: [M, C]}``, ``targets [M, K]``, ``is_train [M]`` bool (the rest is held out),
    ``groups [M]`` the sequence of each row (``None``: every row its own group — only for data without
    sequences). Rows with a non-finite target are dropped. Returns one row per (probe, layer, target):
    ``{probe, layer, target, r2, decodable, alpha, alpha_edge}`` where ``decodable = r2 >= decodable_min_r2``
    (held-out R² below it — in particular any negative R² — means "not decodable"); ``alpha``/``alpha_edge``
    are ``None``/``""`` for the MLP.

    ``alphas``, ``cv_folds`` and ``decodable_min_r2`` left ``None`` are ``probe.linear``'s in
    ``conf/probe/default.yaml``; ``mlp`` (``probe.linear.mlp``, a partial mapping filled from there) adds
    the MLP probe when enabled, ``None`` = ridge only.
    """
    defaults = probe_part("linear") if cv_folds is None or decodable_min_r2 is None else None
    cv_folds = defaults.cv_folds if cv_folds is None else cv_folds
    decodable_min_r2 = defaults.decodable_min_r2 if decodable_min_r2 is None else decodable_min_r2
    mlp = None if mlp is None else probe_part("linear.mlp", mlp)
    is_train = np.asarray(is_train, dtype=bool)
    if is_train.all() or not is_train.any():
        raise ValueError("probes need both training and held-out rows (check probe.linear.heldout_fraction)")
    groups = np.arange(len(is_train)) if groups is None else np.asarray(groups)
    ok = np.isfinite(targets).all(1)
    tr, te = is_train & ok, ~is_train & ok
    grid = ridge_alpha_grid(alphas) if not isinstance(alphas, np.ndarray) else alphas

    def row(probe, layer, name, r2, alpha=None, edge=""):
        r2 = float(r2)
        return {"probe": probe, "layer": int(layer), "target": name, "r2": r2,
                "decodable": bool(np.isfinite(r2) and r2 >= decodable_min_r2),
                "alpha": None if alpha is None else float(alpha), "alpha_edge": str(edge)}

    rows = []
    for layer, A in sorted(acts.items()):
        A = np.asarray(A, np.float64)[ok]
        res = ridge_probe(A, targets[ok], tr[ok], groups[ok], alphas=grid, n_splits=cv_folds)
        rows += [row("ridge", layer, n, r2, a, e) for n, r2, a, e in zip(names, res["r2"], res["alpha"],
                                                                         res["alpha_edge"])]
        if mlp is not None and mlp.enabled:
            xsc, ysc = StandardScaler().fit(A[tr[ok]]), StandardScaler().fit(targets[tr])
            Xs, Y = xsc.transform(A), ysc.transform(targets[ok])
            net = MLPRegressor(hidden_layer_sizes=(mlp.hidden,), max_iter=mlp.max_iter,
                               early_stopping=True, random_state=seed).fit(Xs[tr[ok]], Y[tr[ok]])
            rows += [row("mlp", layer, n, r2) for n, r2 in zip(names, r2_scores(Y[te[ok]], net.predict(Xs[te[ok]])))]
    return rows


def probe_rows_of(ds, systems: np.ndarray, max_steps_per_system: int | None, *, limit: int | None = None
                  ) -> np.ndarray:
    """Planet-step mask ``[len(systems), T]`` with at most ``max_steps_per_system`` evenly spaced planet
    steps per sequence (``None``/0 = all), only among the first ``limit`` positions (a learned-position
    model's context; ``None`` = all)."""
    mask = np.asarray(ds.bodies[systems]) >= 1
    if limit is not None:
        mask[:, limit:] = False
    if max_steps_per_system:
        kmax = int(max_steps_per_system)
        for i in range(len(systems)):
            idx = np.nonzero(mask[i])[0]
            if len(idx) > kmax:
                keep = idx[np.linspace(0, len(idx) - 1, kmax).round().astype(int)]
                mask[i] = False
                mask[i, keep] = True
    return mask


def split_systems(n_total: int, n: int, heldout_fraction: float, rng: np.random.Generator, what: str = "linear"
                  ) -> tuple[np.ndarray, set]:
    """Draw ``n`` of ``n_total`` sequences (sorted) and the held-out subset (``heldout_fraction`` of them)."""
    systems = np.sort(rng.choice(n_total, n, replace=False))
    n_held = max(1, round(float(heldout_fraction) * n))
    if n_held >= n:
        raise ValueError(f"probe.{what}.n_systems={n} with heldout_fraction={heldout_fraction} leaves no "
                         "training sequences; raise n_systems")
    return systems, set(rng.choice(systems, n_held, replace=False).tolist())


def run_linear_probes(model, ds, cfg: LinearProbeConfig | Mapping | None = None, *, layers="all", seed: int = 0,
                      device: str = "cpu") -> list[dict]:
    """§4.1 end to end on ``ds`` (an orbit dataset with states and forces) with ``probe.linear`` (a
    :class:`~gravprobe.config.LinearProbeConfig`, or a partial mapping filled from ``conf/probe/default.yaml``).

    Draws ``n_systems`` sequences with ``numpy.random.default_rng(seed)``, splits them by sequence into
    train/held-out (``heldout_fraction``), keeps at most ``max_steps_per_system`` planet steps per sequence
    (evenly spaced), chooses each ridge penalty from ``ridge_alphas`` by ``cv_folds``-fold CV grouped by
    sequence on the training sequences, and returns the rows of :func:`fit_probes`. The same seed gives the
    same sequences and split for any model (the untrained control relies on it).
    """
    cfg = probe_part("linear", cfg)
    names = list(cfg.targets)
    n = min(cfg.n_systems, ds.states.shape[0])
    rng = np.random.default_rng(seed)
    systems, held_sys = split_systems(ds.states.shape[0], n, cfg.heldout_fraction, rng)
    limit = context_limit(model)
    mask = probe_rows_of(ds, systems, cfg.max_steps_per_system, limit=limit)
    layers = None if layers in (None, "all") else [int(l) for l in layers]
    acts = capture_activations(model, ds, systems, mask, layers=layers, batch_size=cfg.batch_size, device=device)
    si, ti = np.nonzero(mask)
    states = np.asarray(ds.states[systems], dtype=np.float64)[si, ti]
    forces = np.asarray(ds.forces[systems], dtype=np.float64)[si, ti]
    targets = probe_targets(states, forces, names)
    is_train = np.array([s not in held_sys for s in systems[si]])
    targets, names, _ = drop_constant_targets(targets, names, is_train, "linear probes")
    rows = fit_probes(acts, targets, is_train, names, groups=systems[si], alphas=ridge_alpha_grid(cfg.ridge_alphas),
                      cv_folds=cfg.cv_folds, mlp=cfg.mlp, seed=seed, decodable_min_r2=cfg.decodable_min_r2)
    _log_edges([r for r in rows if r["probe"] == "ridge"], "linear probes")
    log.info("linear probes: %d layers x %d targets on %d steps (%d held out)", len(acts), len(names), len(si),
             int((~is_train).sum()))
    return rows


def linear_report(rows: list[dict], untrained_rows: list[dict] | None,
                  cfg: LinearProbeConfig | Mapping | None = None) -> dict:
    """The extra information of the ridge probes for ``results.json["probes"]["linear_probe"]`` (the R²
    table itself stays in ``probes.linear``): the grid, folds and thresholds, and per target and layer the
    penalty, the edge flag, decodability and the untrained control; per target the best layer. ``cfg``:
    ``probe.linear`` as for :func:`run_linear_probes`."""
    cfg = probe_part("linear", cfg)
    grid = ridge_alpha_grid(cfg.ridge_alphas)
    margin = cfg.untrained_margin
    ridge = [r for r in rows if r["probe"] == "ridge"]
    u_by = {(r["target"], r["layer"]): r["r2"] for r in (untrained_rows or []) if r["probe"] == "ridge"}
    targets: dict = {}
    for r in ridge:
        u = u_by.get((r["target"], r["layer"]))
        targets.setdefault(r["target"], {"layers": {}})["layers"][str(r["layer"])] = {
            "r2": r["r2"], "decodable": r["decodable"], "alpha": r["alpha"], "alpha_edge": r["alpha_edge"] or None,
            "untrained_r2": u, "beats_untrained": None if u is None else bool(r["r2"] > u + margin)}
    for d in targets.values():
        best = max(d["layers"], key=lambda k: d["layers"][k]["r2"] if np.isfinite(d["layers"][k]["r2"]) else -np.inf)
        b = d["layers"][best]
        ub = [v["untrained_r2"] for v in d["layers"].values() if v["untrained_r2"] is not None]
        d.update(best_layer=best, r2=b["r2"], decodable=b["decodable"],
                 untrained_best_r2=max(ub) if ub else None,
                 beats_untrained=None if not ub else bool(b["r2"] > max(ub) + margin))
    return {"alphas": [float(a) for a in grid], "cv": "GroupKFold by sequence", "cv_folds": cfg.cv_folds,
            "decodable_min_r2": cfg.decodable_min_r2, "untrained_margin": margin,
            "alpha_at_edge": sorted(f"{r['target']}@{r['layer']}:{r['alpha_edge']}" for r in ridge if r["alpha_edge"]),
            "not_decodable": sorted(t for t, d in targets.items() if not d["decodable"]),
            "constant_targets": [t for t in cfg.targets if t not in targets],
            "targets": targets}
