"""Did the model learn the dynamics? Its next-position predictions beside kinematic baselines (issue 14 §1).

A probe of a model's activations says something about physics only if the model predicts the orbits better
than a rule that knows no physics. :func:`evaluate_dynamics` scores the model and three kinematic rules on
exactly the same next-token targets of held-out systems and says whether the model beats the best rule.

Kinematic baselines
-------------------
Each token's *same-body history* is read from the dataset's ``bodies`` array ``[N, T]`` (-1 dt marker or
padding, 0 star, j >= 1 planet j), never from an assumed layout, so sequences with or without star tokens,
with any number of planets, work alike: body b's previous token is one time step back. With ``x1, x2, x3``
the body's last three positions (most recent first):

=========================  ==========================  =========================================
name                       prediction of ``x_t``        error on a circular orbit (radius r,
                                                        angle step phi = omega dt per time step)
=========================  ==========================  =========================================
``copy_previous``          ``x1``                       ``r |1 - e^{-i phi}|   = 2 r sin(phi/2)``
``constant_velocity``      ``2 x1 - x2``                ``r |1 - e^{-i phi}|^2 = 4 r sin^2(phi/2)``
``constant_acceleration``  ``3 x1 - 3 x2 + x3``         ``r |1 - e^{-i phi}|^3 = 8 r sin^3(phi/2)``
=========================  ==========================  =========================================

(The m-th order rule is the m-th backward difference set to zero; on ``z_n = r e^{i n phi}`` its miss is
``z_n (1 - e^{-i phi})^m``.) Discrete models are compared with the rules applied to the *bin ids* the model
reads (integer extrapolation, clipped to ``[0, V-1]`` like the tokenizer); continuous models with the rules
applied to the AU positions the model reads.

Scored targets
--------------
Window = the first ``context + 1`` tokens of a sequence (input ``[:context]``, targets ``[1:context+1]``, as
in training). A target is scored when it is a real body (star or planet) whose three previous same-body
positions lie inside the window (index >= 1). Every method, model and baselines, is scored on exactly this
set; ``n_targets`` counts positions (each has an x and a y coordinate).

Units
-----
- **Discrete models** (tokens = bin ids over ``V = n_bins`` uniform bins on ``[-coord_range, coord_range]``
  AU): ``loss`` in **nats per coordinate**, the mean over targets and over x and y of ``-log p(true bin)``,
  the unit of the training cross-entropy. The model's ``p`` is its softmax over all ``V + 3`` ids. A
  baseline is a point prediction, so it is turned into a distribution: ``p(true bin | predicted bin)`` =
  ``q(true - predicted)``, a distribution over integer bin offsets fitted per coordinate, renormalised over
  the V real bins (see :class:`ResidualDistribution`).
- **Continuous models**: ``loss`` = mean squared error **per coordinate in AU²** (the model's output is in
  AU; the training loss is the same quantity divided by ``position_scale²``).
- Both: ``next_position_error_au`` = mean Euclidean distance (AU) between predicted and true next position;
  ``next_position_r2`` = ``1 - Σ|pred - true|² / Σ|true - mean(true)|²`` pooled over x and y (each
  coordinate centred on its own mean). A discrete model's position is the **centre of its argmax bin**
  (over the V real bins); a baseline's the centre of its predicted bin. The truth is the dataset's
  ``positions`` (AU) when given, else the centre of the true bin (``"truth"`` in the result says which).
- ``rollout_error_au[s]``: mean position error (AU) of the s-th token generated autoregressively (s = 1..k)
  when the model (or a rule) is fed its own predictions, argmax bins for discrete models; see
  :func:`evaluate_dynamics`.

Why the baselines are fitted on training systems
------------------------------------------------
The residual distribution ``q`` is a fitted model, like the network: fitting it on the validation targets
it is scored on would give the baselines an in-sample advantage (a histogram of the scored residuals is
the best any offset distribution can do on them) that the network, trained on the training systems only,
does not have. Fitting both on the training split and scoring both on the held-out split compares like with
like. The continuous-mode baselines are point predictions scored by MSE and fit nothing.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import orbit_inputs

log = logging.getLogger(__name__)

BASELINES = ("copy_previous", "constant_velocity", "constant_acceleration")
_ORDER = {"copy_previous": 1, "constant_velocity": 2, "constant_acceleration": 3}
# x_t = sum_m c_m x_{t-m}: the m-th backward difference set to zero
_COEFFS = {1: (1, 0, 0), 2: (2, -1, 0), 3: (3, -3, 1)}
_HEAD_ROWS = 4096          # targets per call of the output heads
UNITS = {"discrete": "nats/coordinate", "continuous": "AU^2/coordinate (MSE)"}


# ------------------------------------------------------------------------------------------ the history
def previous_indices(bodies: np.ndarray, depth: int = 3) -> np.ndarray:
    """Index of each token's previous ``depth`` same-body tokens: ``bodies [n, L]`` (-1 marker/padding) ->
    ``[n, L, depth]`` int64, column m-1 = the body's m-th previous token, -1 where there is none (and at
    every marker/padding token)."""
    bodies = np.asarray(bodies)
    if bodies.ndim != 2:
        raise ValueError(f"bodies must be [n, L], got shape {bodies.shape}")
    n, L = bodies.shape
    out = np.full((n, L, depth), -1, dtype=np.int64)
    if n == 0 or L == 0:
        return out
    b = bodies.astype(np.int64)
    if b.min() < -1:
        raise ValueError(f"bodies holds {b.min()}; expected -1 (marker/padding), 0 (star) or j >= 1 (planet j)")
    nb = int(b.max()) + 2
    t = np.arange(L, dtype=np.int64)
    # groups (row, body) in token order: a stable sort on the key keeps t increasing within each group
    key = (np.arange(n, dtype=np.int64)[:, None] * nb + (b + 1)) * L + t
    order = np.argsort(key.ravel(), kind="stable")
    group = (key.ravel() // L)[order]
    prev1 = np.full(n * L, -1, dtype=np.int64)
    same = group[1:] == group[:-1]
    prev1[order[1:][same]] = order[:-1][same] % L
    prev1 = prev1.reshape(n, L)
    prev1[b < 0] = -1
    rows = np.arange(n)[:, None]
    cur = prev1
    for m in range(depth):
        out[..., m] = cur
        cur = np.where(cur >= 0, prev1[rows, np.maximum(cur, 0)], -1)
    return out


def kinematic_predictions(values: np.ndarray, prev: np.ndarray) -> dict[str, np.ndarray]:
    """The three rules at every token: ``values [n, L, 2]`` (bin ids or AU), ``prev [n, L, 3]`` from
    :func:`previous_indices` -> ``{name: [n, L, 2]}`` in the dtype of ``values`` (int64 for ids, float64
    for AU; unclipped). Entries without enough history are meaningless (mask them with ``prev``)."""
    ints = np.issubdtype(np.asarray(values).dtype, np.integer)
    v = np.asarray(values, dtype=np.int64 if ints else np.float64)
    rows = np.arange(v.shape[0])[:, None]
    hist = [v[rows, np.maximum(prev[..., m], 0)] for m in range(3)]
    return {name: sum(c * h for c, h in zip(_COEFFS[_ORDER[name]], hist)) for name in BASELINES}


# --------------------------------------------------------------------------------- residual distribution
@dataclass
class ResidualDistribution:
    """A distribution ``q`` over integer bin offsets ``o = true bin - predicted bin`` of one coordinate.

    ``q`` lives on all offsets that two bins of ``[0, V-1]`` can have, ``[-(V-1), V-1]``: inside a bounded
    support ``|o| <= support`` it is the training histogram with ``smoothing`` pseudo-counts per offset;
    the remaining offsets share a floor mass ``tail`` (Laplace estimate ``(n_out + 1) / (n + 2)`` of the
    chance of landing outside the support, ``n_out`` training residuals did) uniformly. ``q`` sums to 1.
    :meth:`log_prob` renormalises ``q(k - pred)`` over the V real bins ``k``, so that for every predicted
    bin the baseline is a proper distribution over the outcomes a target can take.
    """

    n_bins: int
    support: int
    log_q: np.ndarray     # [2V - 1], index o + V - 1
    n_fit: int
    tail: float
    smoothing: float

    @classmethod
    def fit(cls, residuals: np.ndarray, n_bins: int, *, support: int | None = None,
            smoothing: float = 0.5) -> ResidualDistribution:
        """Fit on integer ``residuals`` (true - predicted bin, predictions clipped to ``[0, V-1]``).

        ``support``: half-width of the histogram in bins; ``None`` = the largest ``|residual|`` seen (at
        most ``V - 1``), so that every training residual is inside and only offsets never seen in training
        fall to the floor. ``smoothing``: pseudo-count added to every offset of the support.
        """
        V = int(n_bins)
        r = np.asarray(residuals, dtype=np.int64).ravel()
        if len(r) and np.abs(r).max() > V - 1:
            raise ValueError(f"residuals reach {np.abs(r).max()} bins; with n_bins={V} they lie in "
                             f"[-{V - 1}, {V - 1}] (clip predictions to [0, V-1] first)")
        if not smoothing > 0:
            raise ValueError(f"smoothing={smoothing} must be > 0 (pseudo-count per offset)")
        S = (int(np.abs(r).max()) if len(r) else 0) if support is None else int(support)
        if S < 0:
            raise ValueError(f"support={support} must be >= 0 bins")
        S = min(S, V - 1)
        inside = np.abs(r) <= S
        n_out = int((~inside).sum())
        n_tail_offsets = 2 * (V - 1 - S)
        tail = (n_out + 1.0) / (len(r) + 2.0) if n_tail_offsets else 0.0
        counts = np.bincount(r[inside] + S, minlength=2 * S + 1).astype(np.float64) + smoothing
        q = np.full(2 * V - 1, tail / n_tail_offsets if n_tail_offsets else 0.0)
        q[V - 1 - S:V + S] = (1.0 - tail) * counts / counts.sum()
        with np.errstate(divide="ignore"):
            log_q = np.log(q)
        return cls(V, S, log_q, len(r), float(tail), float(smoothing))

    @property
    def q(self) -> np.ndarray:
        return np.exp(self.log_q)

    def log_prob(self, true_bin: np.ndarray, pred_bin: np.ndarray) -> np.ndarray:
        """``log p(true_bin | pred_bin)`` (nats) = ``log q(true - pred) - log Σ_{k=0}^{V-1} q(k - pred)``;
        ``pred_bin`` is clipped to ``[0, V-1]`` first."""
        V = self.n_bins
        pred = np.clip(np.asarray(pred_bin, dtype=np.int64), 0, V - 1)
        true = np.asarray(true_bin, dtype=np.int64)
        if np.any((true < 0) | (true >= V)):
            raise ValueError(f"true bins must lie in [0, {V - 1}]")
        cdf = np.concatenate([[0.0], np.cumsum(self.q)])
        z = cdf[2 * V - 1 - pred] - cdf[V - 1 - pred]       # offsets -pred ... V-1-pred
        return self.log_q[true - pred + V - 1] - np.log(z)


# ----------------------------------------------------------------------------------------- the window
@dataclass
class _Window:
    """The first ``L = context + 1`` tokens of ``n`` systems, with everything the scorers need."""

    ids: np.ndarray          # [n] system indices
    tokens: np.ndarray       # [n, L, 2] int64
    truth: np.ndarray        # [n, L, 2] float64 AU (NaN at markers/padding)
    bodies: np.ndarray       # [n, L] int64
    prev: np.ndarray         # [n, L, 3]
    inputs: np.ndarray       # [n, L, 2] model inputs (ids or AU with NaN)

    @property
    def scored(self) -> np.ndarray:
        """[n, L] bool: real body with three previous same-body tokens in the window."""
        return (self.bodies >= 0) & (self.prev[..., 2] >= 1)


def _read(arr, ids: np.ndarray, L: int) -> np.ndarray:
    order = np.argsort(ids, kind="stable")               # sorted reads are sequential on disk
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    return np.asarray(arr[ids[order], :L])[inv]


def _window(tokens, positions, bodies, ids: np.ndarray, L: int, n_bins: int, coord_range: float,
            mode: str) -> _Window:
    tok = _read(tokens, ids, L).astype(np.int64)
    bod = _read(bodies, ids, L).astype(np.int64)
    real = bod >= 0
    if np.any(real & (tok >= n_bins).any(-1)) or np.any(~real & (tok < n_bins).all(-1)):
        raise ValueError("tokens and bodies disagree: a body token holds a marker/padding id or a marker/padding "
                         "token holds bin ids; pass the bodies array of the same dataset")
    if positions is not None:
        truth = _read(positions, ids, L).astype(np.float64)
    else:
        width = 2.0 * coord_range / n_bins
        truth = -coord_range + (tok + 0.5) * width
    truth = np.where(real[..., None], truth, np.nan)
    inputs = orbit_inputs(tokens, positions, ids, L, n_bins, mode)
    return _Window(ids, tok, truth, bod, previous_indices(bod), inputs)


def _subset(ids: Sequence[int] | np.ndarray, n: int | None) -> np.ndarray:
    """``n`` evenly spaced entries of ``ids`` (all when ``n`` is None or >= len): deterministic."""
    ids = np.asarray(ids, dtype=np.int64)
    if n is None or n >= len(ids):
        return ids
    return ids[np.linspace(0, len(ids) - 1, int(n)).round().astype(np.int64)]


# -------------------------------------------------------------------------------------------- metrics
def _position_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """pred, true ``[M, 2]`` AU -> mean Euclidean error and pooled R²."""
    if len(true) == 0:
        return {"next_position_error_au": None, "next_position_r2": None}
    err = pred - true
    ss_res = float((err ** 2).sum())
    ss_tot = float(((true - true.mean(0)) ** 2).sum())
    return {"next_position_error_au": float(np.sqrt((err ** 2).sum(-1)).mean()),
            "next_position_r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else None}


def _centres(bins: np.ndarray, n_bins: int, coord_range: float) -> np.ndarray:
    return -coord_range + (np.clip(bins, 0, n_bins - 1) + 0.5) * (2.0 * coord_range / n_bins)


@torch.no_grad()
def _model_teacher_forced(model, win: _Window, scored: np.ndarray, n_bins: int, coord_range: float,
                          batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
    """Model outputs at the scored targets (flattened in ``np.nonzero(scored)`` order): predicted positions
    ``[M, 2]`` AU and, for discrete models, ``-log p`` of the true x and y bins ``[M, 2]`` (nats)."""
    discrete = model.cfg.orbit_mode == "discrete"
    preds, nll = [], []
    L = win.inputs.shape[1]
    for lo in range(0, len(win.ids), batch_size):
        sl = slice(lo, lo + batch_size)
        sc = scored[sl]
        if not sc.any():
            continue
        b, t = np.nonzero(sc)                                   # target t is read at input position t - 1
        x = torch.from_numpy(np.ascontiguousarray(win.inputs[sl, :L - 1])).to(device)
        h = model.encode(x)
        hb = h[torch.from_numpy(b).to(device), torch.from_numpy(t - 1).to(device)]     # [m, C]
        true_all = win.tokens[sl][b, t]                                                 # [m, 2]
        for a in range(0, len(hb), _HEAD_ROWS):             # bounded [rows, V + 3] logits (V = 7000: 115 MB)
            out = model.orbit_outputs(hb[None, a:a + _HEAD_ROWS])
            if not discrete:
                preds.append(out[0].float().cpu().double().numpy())
                continue
            true = torch.from_numpy(true_all[a:a + _HEAD_ROWS]).to(device)
            cols, arg = [], []
            for c, logits in enumerate(out):
                lp = torch.log_softmax(logits[0].float(), -1)
                cols.append(-lp.gather(-1, true[:, c:c + 1])[:, 0])
                arg.append(logits[0, :, :n_bins].max(-1).indices)      # max: faster than argmax on CPU
            nll.append(torch.stack(cols, -1).cpu().double().numpy())
            preds.append(_centres(torch.stack(arg, -1).cpu().numpy(), n_bins, coord_range))
    empty = np.zeros((0, 2))
    pred = np.concatenate(preds) if preds else empty
    return pred, ((np.concatenate(nll) if nll else empty) if discrete else None)


# ------------------------------------------------------------------------------------------- roll-out
def _rollout_systems(win: _Window, c: int) -> np.ndarray:
    """[n] bool: systems whose every real-body token in ``[c, L)`` has three previous same-body tokens."""
    tail_real = win.bodies[:, c:] >= 0
    ok = ~tail_real | (win.prev[:, c:, 2] >= 1)
    return ok.all(-1) & tail_real.any(-1)


def _rollout_errors(pred: np.ndarray, win: _Window, c: int) -> dict:
    """pred ``[n, L, 2]`` AU (only ``[c, L)`` read) -> ``{"rollout_error_au": {"s": mean error of generated
    token s}, "rollout_mean_error_au": mean over every generated body token}``."""
    per_step, all_d = {}, []
    for s, t in enumerate(range(c, win.truth.shape[1]), start=1):
        real = win.bodies[:, t] >= 0
        d = np.sqrt(((pred[real, t] - win.truth[real, t]) ** 2).sum(-1))
        per_step[str(s)] = float(d.mean()) if len(d) else None
        all_d.append(d)
    d = np.concatenate(all_d) if all_d else np.zeros(0)
    return {"rollout_error_au": per_step, "rollout_mean_error_au": float(d.mean()) if len(d) else None}


def _rollout_baselines(win: _Window, c: int, discrete: bool, n_bins: int, coord_range: float) -> dict[str, dict]:
    """Each rule fed its own predictions for tokens ``c .. L-1`` (bins clipped for discrete models)."""
    rows = np.arange(len(win.ids))
    out = {}
    for name in BASELINES:
        coef = _COEFFS[_ORDER[name]]
        seq = (win.tokens.astype(np.int64) if discrete else win.truth.copy())
        for t in range(c, seq.shape[1]):
            real = win.bodies[:, t] >= 0
            p = win.prev[:, t]
            nxt = sum(k * seq[rows, np.maximum(p[:, m], 0)] for m, k in enumerate(coef))
            if discrete:
                nxt = np.clip(nxt, 0, n_bins - 1)
            seq[real, t] = nxt[real]
        pos = _centres(seq, n_bins, coord_range) if discrete else seq
        out[name] = _rollout_errors(pos, win, c)
    return out


@torch.no_grad()
def _rollout_model(model, win: _Window, c: int, n_bins: int, coord_range: float, batch_size: int,
                   device: torch.device) -> dict:
    """The model fed its own predictions (argmax bins / AU) for tokens ``c .. L-1``; true tokens are kept
    where the sequence holds no body (padding)."""
    discrete = model.cfg.orbit_mode == "discrete"
    L = win.inputs.shape[1]
    pred = np.full(win.truth.shape, np.nan)
    for lo in range(0, len(win.ids), batch_size):
        sl = slice(lo, lo + batch_size)
        x = torch.from_numpy(np.ascontiguousarray(win.inputs[sl])).to(device).clone()
        real = torch.from_numpy(win.bodies[sl] >= 0).to(device)
        for t in range(c, L):
            out = model.orbit_outputs(model.encode(x[:, :t])[:, -1:])
            if discrete:
                nxt = torch.stack([o[:, 0, :n_bins].max(-1).indices for o in out], -1).to(x.dtype)
            else:
                nxt = out[:, 0].to(x.dtype)
            x[:, t] = torch.where(real[:, t, None], nxt, x[:, t])
        xs = x.cpu().numpy()
        pred[sl] = _centres(xs, n_bins, coord_range) if discrete else xs
    return _rollout_errors(pred, win, c)


# ---------------------------------------------------------------------------------------- entry point
def evaluate_dynamics(model, tokens, positions, bodies, *, n_bins: int, coord_range: float,
                      train_ids: Sequence[int] | np.ndarray, val_ids: Sequence[int] | np.ndarray, context: int,
                      rollout_steps: int = 20, n_val: int | None = 256, n_fit: int | None = 2048,
                      n_rollout: int | None = 32, batch_size: int = 32, smoothing: float = 0.5,
                      support: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Score ``model`` and the kinematic baselines on the same next-token targets of held-out systems.

    ``model``: a :class:`gravprobe.pretrain.model.GPT` with an orbit modality (read through
    ``model.cfg.orbit_mode``, ``encode`` and ``orbit_outputs``). ``tokens [N, T, 2]``, ``positions
    [N, T, 2]`` (AU; may be ``None`` for a discrete model, the truth is then the true bin's centre) and
    ``bodies [N, T]``: a dataset's arrays, memory-mapped or not (:func:`gravprobe.orbits.load_dataset`),
    read only at the rows used. ``n_bins``, ``coord_range``: its tokenizer (V, AU).
    ``train_ids`` / ``val_ids``: system indices of the two splits; the discrete baselines' residual
    distributions are fitted on ``n_fit`` training systems, everything is scored on ``n_val`` validation
    systems (evenly spaced subsets; ``None`` = all). ``context``: input tokens per sequence (the training
    context); windows are the first ``context + 1`` tokens, cut to the data's length and to a
    learned-position model's ``block_size``.

    Roll-out: on ``n_rollout`` of the validation systems (those whose last ``rollout_steps`` window tokens
    all have three previous same-body tokens), the first ``c = context + 1 - rollout_steps`` tokens are
    given and the model generates the last ``rollout_steps`` tokens one at a time from its own outputs; the
    baselines do the same with their rules. ``rollout_error_au[str(s)]`` = mean position error (AU) of
    generated token s over those systems.

    ``smoothing``, ``support``: of :meth:`ResidualDistribution.fit`. Deterministic (no random numbers; the
    model runs in eval mode, its training flag is restored). Returns a JSON-able dict (see the module
    docstring for the units)::

        {"unit", "mode", "n_targets", "n_systems", "context", "truth", "model_prediction",
         "model": {"loss", "next_position_error_au", "next_position_r2", "rollout_error_au": {"1": ..},
                   "rollout_mean_error_au"},
         "baselines": {"copy_previous": {...}, "constant_velocity": {...}, "constant_acceleration": {...}},
         "best_baseline", "beats_best_baseline", "verdict",
         "rollout": {"context", "steps", "n_systems", "n_targets": {"1": ..}}, "baseline_fit": {...}}

    ``best_baseline`` is the baseline of lowest ``loss``; ``beats_best_baseline`` = model loss below it.
    ``rollout_steps`` above ``context - 3`` is cut to it. When no target can be scored (contexts too short
    for three time steps of every body), ``n_targets`` is 0, ``model`` and ``baselines`` are ``None``,
    ``beats_best_baseline`` is False and ``verdict`` says why (logged as a warning, not raised, so that a
    training run's last stage does not fail on it).
    """
    cfg = model.cfg
    mode = cfg.orbit_mode
    if mode not in UNITS:
        raise ValueError(f"model.cfg.orbit_mode={mode!r}; expected one of {list(UNITS)}")
    discrete = mode == "discrete"
    V = int(n_bins)
    if not cfg.orbit_vocab:
        raise ValueError("the model has no orbit modality (model.orbit_vocab=0)")
    if discrete and cfg.orbit_vocab != V + 3:
        raise ValueError(f"model.orbit_vocab={cfg.orbit_vocab} does not match the data's n_bins={V} "
                         f"(expected n_bins + 3 = {V + 3}); pass the dataset's n_bins")
    if not discrete and positions is None:
        raise ValueError("a continuous model reads AU positions: pass the dataset's positions array "
                         "(generate the dataset with positions in data.arrays)")
    if bodies is None:
        raise ValueError("evaluate_dynamics needs the dataset's bodies array [N, T] (which body each token is); "
                         "generate the dataset with bodies in data.arrays")
    T = int(tokens.shape[1])
    if tuple(bodies.shape[:2]) != tuple(tokens.shape[:2]):
        raise ValueError(f"bodies {tuple(bodies.shape)} and tokens {tuple(tokens.shape)} differ in [N, T]")
    ctx = min(int(context), T - 1)
    if cfg.position == "learned" and ctx > cfg.block_size:
        log.info("dynamics: context %d cut to the learned-position block_size %d", ctx, cfg.block_size)
        ctx = cfg.block_size
    if ctx < 4:
        raise ValueError(f"context={context} leaves {ctx} input tokens; scoring needs >= 4 (marker + 3 steps)")
    k = int(rollout_steps)
    if k < 0:
        raise ValueError(f"rollout_steps={rollout_steps} must be >= 0")
    if k > ctx - 3:
        log.info("dynamics: rollout_steps %d cut to %d (a context of %d tokens keeps >= 4 given)", k, ctx - 3, ctx)
        k = ctx - 3
    L = ctx + 1
    device = torch.device(device)
    val = _subset(val_ids, n_val)
    fit_ids = _subset(train_ids, n_fit)
    if len(val) == 0:
        raise ValueError("val_ids is empty: nothing to score")
    if discrete and len(fit_ids) == 0:
        raise ValueError("train_ids is empty: the discrete baselines are fitted on training systems")

    win = _window(tokens, positions, bodies, val, L, V, coord_range, mode)
    scored = win.scored
    b, t = np.nonzero(scored)
    truth = win.truth[b, t]                                             # [M, 2] AU
    n_targets = len(b)
    if n_targets == 0:
        why = (f"No validation token has three previous positions of its body within the first {L} tokens, so "
               "the dynamics cannot be judged (raise the context or use fewer bodies per system).")
        log.warning("dynamics: %s", why)
        return {"unit": UNITS[mode], "mode": mode, "n_targets": 0, "n_systems": len(val), "context": ctx,
                "model": None, "baselines": None, "best_baseline": None, "beats_best_baseline": False,
                "verdict": why}

    # ---- baselines at the scored targets
    baselines: dict[str, dict] = {}
    fit_info: dict = {}
    if discrete:
        fwin = _window(tokens, None, bodies, fit_ids, L, V, coord_range, mode)
        fb, ft = np.nonzero(fwin.scored)
        fpred = kinematic_predictions(fwin.tokens, fwin.prev)
        vpred = kinematic_predictions(win.tokens, win.prev)
        for name in BASELINES:
            pf = np.clip(fpred[name][fb, ft], 0, V - 1)
            pv = np.clip(vpred[name][b, t], 0, V - 1)
            dists = [ResidualDistribution.fit(fwin.tokens[fb, ft, c] - pf[:, c], V, support=support,
                                              smoothing=smoothing) for c in range(2)]
            nll = np.stack([-d.log_prob(win.tokens[b, t, c], pv[:, c]) for c, d in enumerate(dists)], -1)
            baselines[name] = {"loss": float(nll.mean()),
                               **_position_metrics(_centres(pv, V, coord_range), truth)}
            fit_info[name] = {"support_bins": [d.support for d in dists], "tail_mass": [d.tail for d in dists]}
        fit_info = {"n_systems": len(fit_ids), "n_targets": len(fb), "smoothing": float(smoothing),
                    **fit_info}
    else:
        vpred = kinematic_predictions(win.truth, win.prev)
        for name in BASELINES:
            p = vpred[name][b, t]
            baselines[name] = {"loss": float(((p - truth) ** 2).mean()), **_position_metrics(p, truth)}

    # ---- the model at the same targets
    was_training = model.training
    model.eval()
    try:
        mpred, mnll = _model_teacher_forced(model, win, scored, V, coord_range, batch_size, device)
        loss = float(mnll.mean()) if discrete else float(((mpred - truth) ** 2).mean())
        result_model = {"loss": loss, **_position_metrics(mpred, truth)}
        c = L - k
        roll = np.nonzero(_rollout_systems(win, c))[0] if k else np.zeros(0, np.int64)
        roll = roll[_subset(np.arange(len(roll)), n_rollout)]
        if len(roll):
            rwin = _Window(*(getattr(win, f)[roll] for f in ("ids", "tokens", "truth", "bodies", "prev",
                                                            "inputs")))
            result_model.update(_rollout_model(model, rwin, c, V, coord_range, batch_size, device))
            for name, errs in _rollout_baselines(rwin, c, discrete, V, coord_range).items():
                baselines[name].update(errs)
            roll_counts = {str(s): int((rwin.bodies[:, t] >= 0).sum()) for s, t in enumerate(range(c, L), 1)}
        else:
            roll_counts = {}
            for r in (result_model, *baselines.values()):
                r.update({"rollout_error_au": {}, "rollout_mean_error_au": None})
    finally:
        model.train(was_training)

    best = min(BASELINES, key=lambda n: baselines[n]["loss"])
    beats = bool(loss < baselines[best]["loss"])
    unit = UNITS[mode]
    short = "nats/coordinate" if discrete else "AU^2/coordinate"
    verdict = (f"The model {'beats' if beats else 'does not beat'} the best kinematic baseline "
               f"({best.replace('_', '-')}): loss {_fmt(loss)} vs {_fmt(baselines[best]['loss'])} {short} on "
               f"{n_targets} held-out next positions"
               + ("." if beats else ", so its probe and symbolic-regression results are uninformative."))
    log.info("dynamics: %s", verdict)
    return {
        "unit": unit,
        "mode": mode,
        "n_targets": int(n_targets),
        "n_systems": len(val),
        "context": int(ctx),
        "truth": "positions" if positions is not None else "bin centres",
        "model_prediction": "argmax bin centre" if discrete else "regression output (AU)",
        "model": result_model,
        "baselines": baselines,
        "best_baseline": best,
        "beats_best_baseline": beats,
        "verdict": verdict,
        "rollout": {"context": int(L - k), "steps": k, "n_systems": len(roll), "n_targets": roll_counts},
        "baseline_fit": fit_info if discrete else {"fitted": False},
    }


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)
