"""Activation capture and linear (ridge) / small-MLP probes (METHOD.md §4.1).

At every layer ``l = 0 … L`` (0 = embeddings, ``l`` = after block ``l``; ``model.hidden_states``) the
activation ``[C]`` at each planet step is regressed on physical targets of that step's true state; R² is
measured on *held-out systems* (a split by sequence, so a probe cannot memorise an orbit).

Targets (units): ``F_x, F_y`` and ``F_mag`` (M☉ AU yr⁻²), ``log_F_mag`` (log of |F|, because |F|
spans five decades and a raw-|F| R² is decided by its largest values), ``r`` (AU), ``inv_r`` (AU⁻¹),
``inv_r2`` (AU⁻²), ``a`` (AU), ``e``, ``lrl_x, lrl_y`` (Laplace–Runge–Lenz vector / μ, dimensionless).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from gravprobe.orbits import G, elements_from_state

log = logging.getLogger(__name__)

TARGETS = ("F_x", "F_y", "F_mag", "log_F_mag", "r", "inv_r", "inv_r2", "a", "e", "lrl_x", "lrl_y")


def probe_targets(state: np.ndarray, force: np.ndarray, names: Sequence[str] = TARGETS) -> np.ndarray:
    """``state [M, 6]``, ``force [M, 2]`` → ``[M, len(names)]`` target matrix (see the module docstring)."""
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ValueError(f"unknown probe target(s) {unknown}; valid: {list(TARGETS)}")
    state = np.asarray(state, dtype=np.float64)
    force = np.asarray(force, dtype=np.float64)
    r = np.hypot(state[:, 0], state[:, 1])
    fm = np.hypot(force[:, 0], force[:, 1])
    el = elements_from_state(state[:, 0:2], state[:, 2:4], G * (state[:, 4] + state[:, 5]))
    cols = {"F_x": force[:, 0], "F_y": force[:, 1], "F_mag": fm, "log_F_mag": np.log(fm), "r": r,
            "inv_r": 1 / r, "inv_r2": 1 / r**2, "a": el.a, "e": el.e, "lrl_x": el.lrl[:, 0],
            "lrl_y": el.lrl[:, 1]}
    return np.column_stack([cols[n] for n in names])


def model_inputs(model, ds, systems: np.ndarray):
    """The orbit input ``[B, T, 2]`` of ``systems`` in the kind the model takes: integer token ids for a
    discrete model, positions in AU (NaN at dt markers and padding) for a continuous one."""
    import torch

    systems = np.asarray(systems)
    mode = getattr(getattr(model, "cfg", None), "orbit_mode", "discrete")
    if mode == "continuous":
        pos = np.asarray(ds.positions[systems], dtype=np.float32).copy()
        pos[np.asarray(ds.bodies[systems]) < 0] = np.nan
        return torch.from_numpy(pos)
    return torch.from_numpy(np.asarray(ds.tokens[systems]).astype(np.int64))


def capture_activations(model, ds, systems: np.ndarray, steps_mask: np.ndarray, *, layers: Sequence[int] | None = None,
                        batch_size: int = 8, device: str = "cpu") -> dict[int, np.ndarray]:
    """Hidden states at selected steps. ``steps_mask [len(systems), T]`` bool picks the steps (e.g. planet
    steps); returns ``{layer: [M, C] float32}`` in row-major order of ``(system, step)`` over the mask."""
    import torch
    from tqdm.auto import tqdm

    n_all = model.n_layers + 1
    layers = list(range(n_all)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n_all]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: this model has layers 0..{n_all - 1} (0 = embeddings)")
    out: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    model.eval()
    with torch.no_grad():
        for b in tqdm(range(0, len(systems), batch_size), desc="activations", leave=False):
            sl = slice(b, b + batch_size)
            x = model_inputs(model, ds, systems[sl]).to(device)
            hs = model.hidden_states(x)
            m = torch.from_numpy(np.asarray(steps_mask[sl], dtype=bool)).to(device)
            for l in layers:
                out[l].append(hs[l][m].float().cpu().numpy())
    return {l: np.concatenate(v) if v else np.zeros((0, model.d_model), np.float32) for l, v in out.items()}


def r2_scores(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Column-wise R² ``[K]`` of ``[M, K]`` arrays."""
    ss_res = ((y_true - y_pred) ** 2).sum(0)
    ss_tot = ((y_true - y_true.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, np.nan)


def fit_probes(acts: dict[int, np.ndarray], targets: np.ndarray, is_train: np.ndarray, names: Sequence[str], *,
               alphas: Sequence[float] = (1e-3, 1e-2, 1e-1, 1, 10, 100, 1e3, 1e4), mlp: dict | None = None,
               seed: int = 0) -> list[dict]:
    """Ridge (RidgeCV, one alpha per target) and optionally an MLP probe per layer.

    ``acts {layer: [M, C]}``, ``targets [M, K]``, ``is_train [M]`` bool (the rest is held out). Activations
    and targets are standardised on the training rows. Returns rows ``{probe, layer, target, r2}``.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    is_train = np.asarray(is_train, dtype=bool)
    if is_train.all() or not is_train.any():
        raise ValueError("probes need both training and held-out rows (check probe.linear.heldout_fraction)")
    ok = np.isfinite(targets).all(1)
    ysc = StandardScaler().fit(targets[is_train & ok])
    Y = ysc.transform(np.where(ok[:, None], targets, 0.0))
    rows = []
    for layer, A in sorted(acts.items()):
        xsc = StandardScaler().fit(A[is_train & ok])
        Xs = xsc.transform(A)
        tr, te = is_train & ok, ~is_train & ok
        ridge = RidgeCV(alphas=list(alphas), alpha_per_target=True).fit(Xs[tr], Y[tr])
        for name, r2 in zip(names, r2_scores(Y[te], ridge.predict(Xs[te]))):
            rows.append({"probe": "ridge", "layer": int(layer), "target": name, "r2": float(r2)})
        if mlp and mlp.get("enabled", True):
            net = MLPRegressor(hidden_layer_sizes=(int(mlp.get("hidden", 64)),), max_iter=int(mlp.get("max_iter", 200)),
                               early_stopping=True, random_state=seed).fit(Xs[tr], Y[tr])
            for name, r2 in zip(names, r2_scores(Y[te], net.predict(Xs[te]))):
                rows.append({"probe": "mlp", "layer": int(layer), "target": name, "r2": float(r2)})
    return rows


def run_linear_probes(model, ds, cfg, *, layers="all", seed: int = 0, device: str = "cpu") -> list[dict]:
    """§4.1 end to end on ``ds`` (an orbit dataset with states and forces) with the ``probe.linear`` node.

    Uses ``n_systems`` sequences (the first ones), splits them by sequence into train/held-out
    (``heldout_fraction``), keeps at most ``max_steps_per_system`` planet steps per sequence (evenly
    spaced), and returns the rows of :func:`fit_probes`.
    """
    names = list(cfg.get("targets", TARGETS))
    n = min(int(cfg.get("n_systems", 400)), ds.states.shape[0])
    rng = np.random.default_rng(seed)
    systems = np.sort(rng.choice(ds.states.shape[0], n, replace=False))
    bodies = np.asarray(ds.bodies[systems])
    mask = bodies >= 1
    kmax = cfg.get("max_steps_per_system")
    if kmax:
        for i in range(len(systems)):
            idx = np.nonzero(mask[i])[0]
            if len(idx) > kmax:
                keep = idx[np.linspace(0, len(idx) - 1, int(kmax)).round().astype(int)]
                mask[i] = False
                mask[i, keep] = True
    n_held = max(1, int(round(float(cfg.get("heldout_fraction", 0.2)) * n)))
    if n_held >= n:
        raise ValueError(f"probe.linear.n_systems={n} leaves no training sequences; raise it")
    held_sys = set(rng.choice(systems, n_held, replace=False).tolist())
    layers = None if layers in (None, "all") else [int(l) for l in layers]
    acts = capture_activations(model, ds, systems, mask, layers=layers, batch_size=int(cfg.get("batch_size", 8)),
                               device=device)
    si, ti = np.nonzero(mask)
    states = np.asarray(ds.states[systems], dtype=np.float64)[si, ti]
    forces = np.asarray(ds.forces[systems], dtype=np.float64)[si, ti]
    targets = probe_targets(states, forces, names)
    is_train = np.array([s not in held_sys for s in systems[si]])
    mlp = dict(cfg.get("mlp", {}) or {})
    rows = fit_probes(acts, targets, is_train, names, alphas=list(cfg.get("ridge_alphas", (1e-3, 1e-1, 10, 1e3))),
                      mlp=mlp, seed=seed)
    log.info("linear probes: %d layers x %d targets on %d steps (%d held out)", len(acts), len(names), len(si),
             int((~is_train).sum()))
    return rows
