"""Liu et al.'s readouts: last-position linear probes at every hook site, Newton and Kepler scores, the
attention mass on the last W keys, each beside the same measurement on an untrained network.

**Rows.** One row per sequence: the activation at the sequence's *last planet step* (the last position
with ``bodies >= 1`` within the model's context: ``block_size`` tokens for learned positions; the input
stops there, which changes nothing for a causal model), target = that step's true state (:func:`gravprobe.probes.linear.probe_targets`).
Sequences are split into training and held-out ones; the ridge penalty is chosen per target by
cross-validation grouped by sequence on the training rows (:func:`gravprobe.probes.linear.ridge_probe`), and
R² is measured on the held-out sequences.

**Hook sites** (forward hooks; the model is not changed), for a model with blocks ``1 … L``:

- ``emb``: the input of block 1 (embeddings, plus learned positions when the model has them);
- ``b<i>.attn``: the attention layer's output (after its output projection, before the residual add);
- ``b<i>.mlp``: the MLP's output (before the residual add);
- ``b<i>.resid``: the residual stream after block ``i`` (= ``model.hidden_states(x)[i]``).

**Scores.** Newton score = mean held-out R² of ``F_x, F_y, F_mag`` at one site; Kepler score = mean of
``a, e, lrl_x, lrl_y``. Each is reported per site and at its best site (the site that maximises it).

**Untrained control.** The same probes on the same architecture at random initialisation
(``GPT(model.cfg)`` built after ``torch.manual_seed(seed)``, without touching the caller's RNG state) on the
same sequences and split. A trained number *beats* its control when it exceeds the control's best (over
sites) by more than ``untrained_margin`` (R², ``probe.readouts.untrained_margin``). An in-sample probe on 1,000 rows gave |F|
R² 0.89 on an untrained network (issue 14); held-out scoring and the control keep that floor visible.

**Attention mass on the last W keys.** Per block and head, for queries ``i`` (0-based) at planet or star
steps with ``i ≥ max(W)`` (so every window is a strict part of the visible keys), the share
``Σ_{j=i-W+1..i} a_ij / Σ_{j≤i} a_ij`` averaged over queries and sequences, with the same average for a
uniform causal row (``W / (i + 1)``) as the reference: a model whose mass on the last few keys is far above
uniform acts as a soft window.

**Settings** are the typed ``probe.readouts`` section (:class:`gravprobe.config.ReadoutsConfig`); a partial
mapping has its missing keys filled from ``conf/probe/default.yaml`` (:func:`gravprobe.probes.linear.probe_part`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from gravprobe.probes.linear import (
    TARGETS,
    context_limit,
    drop_constant_targets,
    model_inputs,
    probe_part,
    probe_targets,
    ridge_alpha_grid,
    ridge_probe,
    split_systems,
)

from gravprobe.config import ReadoutsConfig

log = logging.getLogger(__name__)

NEWTON_TARGETS = ("F_x", "F_y", "F_mag")
KEPLER_TARGETS = ("a", "e", "lrl_x", "lrl_y")


def __getattr__(name: str):
    """``DEFAULT_TARGETS`` / ``DEFAULT_WINDOWS``: ``probe.readouts.targets`` / ``.attention.windows`` of
    ``conf/probe/default.yaml``, read when first asked for (they are not written here)."""
    if name == "DEFAULT_TARGETS":
        return tuple(probe_part("readouts").targets)
    if name == "DEFAULT_WINDOWS":
        return tuple(probe_part("readouts.attention").windows)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def site_names(n_layers: int) -> list[str]:
    """``["emb", "b1.attn", "b1.mlp", "b1.resid", …, "b<L>.resid"]``."""
    return ["emb"] + [f"b{i}.{p}" for i in range(1, n_layers + 1) for p in ("attn", "mlp", "resid")]


def last_planet_steps(bodies: np.ndarray) -> np.ndarray:
    """``bodies [N, T]`` → ``[N]`` index of each sequence's last planet step (``bodies >= 1``); ``-1`` when a
    sequence has none."""
    planet = np.asarray(bodies) >= 1
    T = planet.shape[1]
    last = T - 1 - np.argmax(planet[:, ::-1], axis=1)
    return np.where(planet.any(1), last, -1)


def untrained_twin(model, seed: int, device: str = "cpu"):
    """The same architecture at its random initialisation: ``GPT(model.cfg)`` after
    ``torch.manual_seed(seed)``, built inside ``torch.random.fork_rng`` so the caller's RNG is untouched."""
    import torch
    from gravprobe.pretrain.model import GPT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        twin = GPT(model.cfg)
    return twin.to(device).eval()


def capture_sites(model, ds, systems: np.ndarray, steps: np.ndarray, *, batch_size: int | None = None,
                  device: str = "cpu") -> dict[str, np.ndarray]:
    """Activations ``{site: [len(systems), C] float32}`` at step ``steps[k]`` of sequence ``systems[k]``, at
    every hook site of :func:`site_names` (forward hooks on each block, its ``attn`` and its ``mlp``).
    ``batch_size`` ``None``: ``probe.readouts.batch_size`` of ``conf/probe/default.yaml``."""
    import torch

    if batch_size is None:
        batch_size = probe_part("readouts").batch_size

    systems, steps = np.asarray(systems), np.asarray(steps)
    if (steps < 0).any():
        raise ValueError("every sequence needs a step to read (got -1: a sequence without planet steps)")
    blocks = list(model.blocks)
    got: dict[str, torch.Tensor] = {}

    def save(name, pre=False):
        def hook(_mod, args, output=None):
            got[name] = args[0] if pre else output
        return hook

    handles = [blocks[0].register_forward_pre_hook(save("emb", pre=True))]
    for i, blk in enumerate(blocks, start=1):
        handles += [blk.attn.register_forward_hook(save(f"b{i}.attn")),
                    blk.mlp.register_forward_hook(save(f"b{i}.mlp")),
                    blk.register_forward_hook(save(f"b{i}.resid"))]
    names = site_names(len(blocks))
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(systems), batch_size):
                sl = slice(b, b + batch_size)
                # causal: positions after the read step change nothing, so the input stops there
                x = model_inputs(model, ds, systems[sl], int(steps[sl].max()) + 1).to(device)
                got.clear()
                model.hidden_states(x)
                rows = torch.arange(x.shape[0], device=device)
                idx = torch.from_numpy(steps[sl].astype(np.int64)).to(device)
                for n in names:
                    out[n].append(got[n][rows, idx].float().cpu().numpy())
    finally:
        for h in handles:
            h.remove()
    return {n: np.concatenate(v) if v else np.zeros((0, model.d_model), np.float32) for n, v in out.items()}


def attention_mass(model, ds, systems: np.ndarray, windows: Sequence[int] | None = None, *,
                   batch_size: int = 16, device: str = "cpu") -> dict:
    """Share of each query's attention on its last ``W`` keys, per block and head (module docstring);
    ``windows`` ``None``: ``probe.readouts.attention.windows`` of ``conf/probe/default.yaml``.

    Uses ``CausalSelfAttention.attention_weights(x) -> [B, H, T, T]`` with ``x`` the layer's input (captured
    by a forward pre-hook on ``block.attn``). Returns ``{"windows": [W…], "n_queries": int,
    "uniform": {W: share}, "layers": {"<i>": {"mean": {W: share}, "heads": {W: [share per head]}}}}``
    (keys are strings, blocks 1-based); windows ``≥ T`` are dropped with a warning.
    """
    import torch

    systems = np.asarray(systems)
    limit = context_limit(model)
    bodies = np.asarray(ds.bodies[systems])[:, :limit]       # a learned-position model reads its context only
    T = bodies.shape[1]
    windows = sorted({int(w) for w in (probe_part("readouts.attention").windows if windows is None else windows)})
    if any(w < 1 for w in windows):
        raise ValueError(f"probe.readouts.attention.windows={windows} must be positive key counts")
    dropped = [w for w in windows if w >= T]
    if dropped:
        log.warning("attention mass: windows %s are not shorter than the sequences (T=%d); dropped", dropped, T)
    windows = [w for w in windows if w < T]
    if not windows:
        return {"windows": [], "n_queries": 0, "uniform": {}, "layers": {}}
    blocks = list(model.blocks)
    if not all(hasattr(b.attn, "attention_weights") for b in blocks):
        raise RuntimeError("the attention layer has no attention_weights(x); update gravprobe.attention")
    wmax = max(windows)
    qpos = np.arange(T)
    # queries: real planet/star steps with more than max(W) visible keys
    qmask_all = (bodies >= 0) & (qpos >= wmax)[None, :]
    inputs: dict[int, torch.Tensor] = {}

    def grab(i):
        def hook(_mod, args):
            inputs[i] = args[0]
        return hook

    handles = [b.attn.register_forward_pre_hook(grab(i)) for i, b in enumerate(blocks)]
    H = blocks[0].attn.n_heads
    sums = np.zeros((len(blocks), H, len(windows)))
    n_q = 0
    uni = np.zeros(len(windows))
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(systems), batch_size):
                sl = slice(b, b + batch_size)
                qm = torch.from_numpy(qmask_all[sl]).to(device)                     # [B, T]
                if not bool(qm.any()):
                    continue
                inputs.clear()
                model.hidden_states(model_inputs(model, ds, systems[sl], T).to(device))
                cnt = int(qm.sum())
                for li, blk in enumerate(blocks):
                    a = blk.attn.attention_weights(inputs[li]).double()              # [B, H, T, T]
                    cs = a.cumsum(-1)
                    total = cs.diagonal(dim1=-2, dim2=-1)                           # [B, H, T] row sums
                    for wi, w in enumerate(windows):
                        before = torch.zeros_like(total)
                        before[..., w:] = cs.diagonal(offset=-w, dim1=-2, dim2=-1)  # cs[i, i - w]
                        share = 1.0 - before / total.clamp_min(1e-300)
                        share = torch.where(total > 0, share, torch.zeros_like(share))
                        sums[li, :, wi] += (share * qm[:, None, :]).sum((0, 2)).cpu().numpy()
                n_q += cnt
                pos = torch.arange(T, device=device, dtype=torch.float64)
                for wi, w in enumerate(windows):
                    uni[wi] += float(((w / (pos + 1))[None, :] * qm).sum())
    finally:
        for h in handles:
            h.remove()
    if n_q == 0:
        log.warning("attention mass: no query position beyond the largest window (%d); nothing measured", wmax)
        return {"windows": windows, "n_queries": 0, "uniform": {}, "layers": {}}
    share = sums / n_q
    return {"windows": windows, "n_queries": int(n_q),
            "uniform": {str(w): float(uni[wi] / n_q) for wi, w in enumerate(windows)},
            "layers": {str(li + 1): {"mean": {str(w): float(share[li, :, wi].mean()) for wi, w in enumerate(windows)},
                                     "heads": {str(w): [float(v) for v in share[li, :, wi]]
                                               for wi, w in enumerate(windows)}}
                       for li in range(len(blocks))}}


def _scores(r2: dict[str, dict[str, float]], names: Sequence[str]) -> dict:
    """Mean R² of ``names`` per site and at the best site: ``{"targets", "score", "site", "per_site"}``
    (``score``/``site`` are ``None`` when a target is missing)."""
    if not all(n in next(iter(r2.values()), {}) for n in names):
        return {"targets": list(names), "score": None, "site": None, "per_site": {}}
    per_site = {s: float(np.mean([d[n] for n in names])) for s, d in r2.items()}
    best = max(per_site, key=lambda s: per_site[s] if np.isfinite(per_site[s]) else -np.inf)
    return {"targets": list(names), "score": per_site[best], "site": best, "per_site": per_site}


def _probe_sites(acts: dict[str, np.ndarray], Y: np.ndarray, names: Sequence[str], is_train: np.ndarray,
                 groups: np.ndarray, alphas: np.ndarray, cv_folds: int, decodable_min_r2: float) -> dict:
    ok = np.isfinite(Y).all(1)
    r2, alpha, edge = {}, {}, {}
    for site, A in acts.items():
        res = ridge_probe(A[ok], Y[ok], is_train[ok], groups[ok], alphas=alphas, n_splits=cv_folds)
        r2[site] = {n: float(v) for n, v in zip(names, res["r2"])}
        alpha[site] = {n: float(v) for n, v in zip(names, res["alpha"])}
        edge[site] = {n: str(v) or None for n, v in zip(names, res["alpha_edge"])}
    best = {}
    for n in names:
        s = max(r2, key=lambda k: r2[k][n] if np.isfinite(r2[k][n]) else -np.inf)
        best[n] = {"site": s, "r2": r2[s][n], "decodable": bool(r2[s][n] >= decodable_min_r2)}
    return {"r2": r2, "alpha": alpha, "alpha_edge": edge, "best": best,
            "newton": _scores(r2, NEWTON_TARGETS), "kepler": _scores(r2, KEPLER_TARGETS)}


def run_readouts(model, ds, cfg: ReadoutsConfig | Mapping | None = None, *, seed: int = 0, device: str = "cpu"
                 ) -> dict:
    """Liu's readouts (module docstring) on ``ds`` with ``probe.readouts`` (a
    :class:`~gravprobe.config.ReadoutsConfig`, or a partial mapping filled from ``conf/probe/default.yaml``):
    ``n_systems, heldout_fraction, batch_size, targets, ridge_alphas, cv_folds, decodable_min_r2,
    untrained_control, untrained_margin, attention: {enabled, windows, n_systems}``.

    Sequences are drawn with ``numpy.random.default_rng(seed)``; the untrained control is
    :func:`untrained_twin` ``(model, seed)``. Returns the ``results.json["probes"]["readouts"]`` section
    (docs/results_schema.md): ``r2 {site: {target: r2}}``, ``best {target: {site, r2, decodable,
    untrained_r2, beats_untrained}}``, ``newton``/``kepler`` ``{score, site, per_site, untrained_score,
    beats_untrained}``, ``alpha``, ``alpha_edge``, ``attention_mass``, ``untrained {…same…}`` and the
    settings.
    """
    import time

    t0 = time.perf_counter()
    cfg = probe_part("readouts", cfg)
    names = list(cfg.targets)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ValueError(f"probe.readouts.targets has unknown target(s) {unknown}; valid: {list(TARGETS)}")
    alphas = ridge_alpha_grid(cfg.ridge_alphas, part="readouts")
    cv_folds = cfg.cv_folds
    dmin = cfg.decodable_min_r2
    margin = cfg.untrained_margin
    bs = cfg.batch_size

    # the last planet step inside the model's context (a learned-position model reads block_size tokens)
    last_all = last_planet_steps(np.asarray(ds.bodies)[:, :context_limit(model)])
    usable = np.nonzero(last_all >= 0)[0]
    n = min(cfg.n_systems, len(usable))
    rng = np.random.default_rng(seed)
    pick, held = split_systems(len(usable), n, cfg.heldout_fraction, rng, what="readouts")
    systems = usable[pick]
    held_sys = {int(usable[h]) for h in held}
    steps = last_all[systems]
    rows = np.arange(len(systems))   # index per sequence first: dataset arrays may be lazy (axis-0 indexing only)
    states = np.asarray(ds.states[systems], dtype=np.float64)[rows, steps]
    forces = np.asarray(ds.forces[systems], dtype=np.float64)[rows, steps]
    Y = probe_targets(states, forces, names)
    is_train = np.array([s not in held_sys for s in systems])
    Y, names, constant = drop_constant_targets(Y, names, is_train, "readouts")

    att = cfg.attention
    att_on = att.enabled
    windows = list(att.windows)
    att_sys = systems[: att.n_systems]

    def measure(m) -> dict:
        acts = capture_sites(m, ds, systems, steps, batch_size=bs, device=device)
        res = _probe_sites(acts, Y, names, is_train, systems, alphas, cv_folds, dmin)
        if att_on:
            res["attention_mass"] = attention_mass(m, ds, att_sys, windows, batch_size=max(1, bs // 4), device=device)
        return res

    out = measure(model)
    out.update(n_systems=int(n), n_train=int(is_train.sum()), n_heldout=int((~is_train).sum()), targets=names,
               constant_targets=constant,
               sites=site_names(model.n_layers), cv_folds=cv_folds, alphas=[float(a) for a in alphas],
               decodable_min_r2=dmin, untrained_margin=margin, seed=int(seed))
    if cfg.untrained_control:
        ctl = measure(untrained_twin(model, seed, device))
        out["untrained"] = ctl
        for t, b in out["best"].items():
            u = ctl["best"][t]["r2"]
            b.update(untrained_r2=u, beats_untrained=bool(b["r2"] > u + margin))
        for k in ("newton", "kepler"):
            s, u = out[k]["score"], ctl[k]["score"]
            out[k].update(untrained_score=u, beats_untrained=None if s is None or u is None else bool(s > u + margin))
    edges = [f"{s}:{t}({e})" for s, d in out["alpha_edge"].items() for t, e in d.items() if e]
    if edges:
        log.warning("readouts: ridge penalty at the grid's edge for %d probe(s): %s", len(edges),
                    ", ".join(edges[:12]) + (" ..." if len(edges) > 12 else ""))
    out["seconds"] = time.perf_counter() - t0
    nw, kp = out["newton"], out["kepler"]
    log.info("readouts on %d sequences (%d held out): Newton score %s at %s (untrained %s), Kepler score %s at %s "
             "(untrained %s), %.1f s", n, out["n_heldout"], _fmt(nw["score"]), nw["site"], _fmt(nw.get("untrained_score")),
             _fmt(kp["score"]), kp["site"], _fmt(kp.get("untrained_score")), out["seconds"])
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
