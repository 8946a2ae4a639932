"""The fine-tuned force head (METHOD.md §4.2).

The pretrained trunk (``model.encode``: orbit input ``[B, T, 2]`` → normed hidden ``[B, T, C]``) gets a
new linear regression head ``C → 1`` (magnitude protocol) or ``C → 2`` (vector protocol); trunk and head
are fine-tuned together with AdamW, the loss counting **only labelled planet steps**.

Protocols (``probe.head.protocol``):

``magnitude`` (the two-body force data, lr 6e-4, 10k steps in the literature)
    The head predicts ``z = (log|F| − μ)/σ`` with μ, σ the mean and standard deviation of log|F| over
    the training labels; the prediction is ``|F| = exp(μ + σ ẑ)`` (M☉ AU yr⁻²). Predicting the log
    makes every decade of the five count equally, and the prediction is positive by construction.
``vector`` (the solar-system protocol: 10 labelled planet steps per sequence, lr 2e-4)
    The head predicts ``F / s`` with ``s`` the median training |F| (MSE on both components, as in the
    literature, so the largest forces dominate); the symbolic regression then uses ``|F̂|``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from gravprobe.probes.linear import model_inputs, probe_part

from gravprobe.common import progress
from gravprobe.config import HeadConfig

log = logging.getLogger(__name__)

PROTOCOLS = ("magnitude", "vector")


@dataclass
class HeadResult:
    """Predictions of the fine-tuned head at the requested steps and the training curve."""

    pred_magnitude: np.ndarray  # [M] |F| (M☉ AU yr⁻²)
    pred_vector: np.ndarray | None  # [M, 2] (vector protocol only)
    losses: list[float]
    protocol: str


def _torch():
    import torch

    return torch


def build_head(model, protocol: str, *, seed: int | None = None):
    """The regression head ``C → 1`` (magnitude) or ``C → 2`` (vector): weights N(0, 0.02²), bias 0.

    With ``seed`` the weights come from a private ``torch.Generator`` seeded with it, so the head is the
    same whatever was drawn from torch's global RNG before the call; without, from the global RNG."""
    torch = _torch()
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown probe.head.protocol {protocol!r}; choose one of {PROTOCOLS}")
    with torch.random.fork_rng(devices=[]):      # nn.Linear's own default init must not move the global RNG
        head = torch.nn.Linear(model.d_model, 1 if protocol == "magnitude" else 2)
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
    torch.nn.init.zeros_(head.bias)
    return head


def finetune_force_head(model, ds, train_systems: np.ndarray, query_systems: np.ndarray, query_mask: np.ndarray,
                        cfg: HeadConfig | Mapping | None = None, *, seed: int = 0, device: str = "cpu"
                        ) -> HeadResult:
    """Fine-tune trunk + head on the labelled planet steps of ``train_systems`` and predict at
    ``query_mask [len(query_systems), T]`` (e.g. the held-out steps). ``cfg`` is ``probe.head`` (a
    :class:`~gravprobe.config.HeadConfig`, or a partial mapping filled from ``conf/probe/default.yaml``):
    ``protocol, lr, steps, batch_size, weight_decay, warmup, grad_clip, betas, freeze_trunk``."""
    cfg = probe_part("head", cfg)
    torch = _torch()
    protocol = cfg.protocol
    # every random draw of the fine-tuning follows from ``seed``, seeded before anything is drawn: the head's
    # weights (private generator), the batch order (private generator) and the global RNG that dropout and
    # context noise use -- so the same checkpoint and config give the same predictions in any process
    torch.manual_seed(int(seed))
    head = build_head(model, protocol, seed=seed).to(device)
    model.to(device)
    gen = torch.Generator().manual_seed(int(seed))

    train_systems = np.asarray(train_systems)
    lab = np.asarray(ds.labelled[train_systems], dtype=bool) & (np.asarray(ds.bodies[train_systems]) >= 1)
    keep = lab.any(1)
    train_systems, lab = train_systems[keep], lab[keep]
    if len(train_systems) == 0:
        raise ValueError("no labelled planet steps in the training systems; the force head needs force labels")
    forces_lab = np.asarray(ds.forces[train_systems], dtype=np.float64)[lab]
    mag = np.hypot(forces_lab[:, 0], forces_lab[:, 1])
    if protocol == "magnitude":
        mu, sigma = float(np.log(mag).mean()), float(np.log(mag).std() or 1.0)
    else:
        scale = float(np.median(mag)) or 1.0

    params = list(head.parameters()) + ([] if cfg.freeze_trunk else list(model.parameters()))
    betas = tuple(cfg.betas)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas)
    steps = cfg.steps
    warmup = cfg.warmup
    lr0 = cfg.lr
    bs = cfg.batch_size
    clip = cfg.grad_clip

    def lr_at(i: int) -> float:  # linear warm-up, cosine decay to 10 %
        if i < warmup:
            return lr0 * (i + 1) / warmup
        p = (i - warmup) / max(1, steps - warmup)
        return lr0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    model.train()
    head.train()
    losses = []
    bar = progress(range(steps), desc=f"force head ({protocol})", leave=False)
    for i in bar:
        pick = torch.randint(len(train_systems), (min(bs, len(train_systems)),), generator=gen).numpy()
        sy = train_systems[pick]
        x = model_inputs(model, ds, sy).to(device)
        m = torch.from_numpy(lab[pick]).to(device)
        f = torch.from_numpy(np.asarray(ds.forces[sy], dtype=np.float64)).to(device)[m]
        h = model.encode(x)[m]
        out = head(h).double()
        if protocol == "magnitude":
            target = (torch.log(torch.linalg.vector_norm(f, dim=-1)) - mu) / sigma
            loss = torch.mean((out[:, 0] - target) ** 2)
        else:
            loss = torch.mean((out - f / scale) ** 2)
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append(float(loss.detach()))
        if i % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    head.eval()

    preds = []
    qs = np.asarray(query_systems)
    with torch.no_grad():
        for b in range(0, len(qs), bs):
            x = model_inputs(model, ds, qs[b:b + bs]).to(device)
            m = torch.from_numpy(np.asarray(query_mask[b:b + bs], dtype=bool)).to(device)
            preds.append(head(model.encode(x)[m]).double().cpu().numpy())
    out = np.concatenate(preds) if preds else np.zeros((0, head.out_features))
    if protocol == "magnitude":
        return HeadResult(np.exp(mu + sigma * out[:, 0]), None, losses, protocol)
    vec = out * scale
    return HeadResult(np.hypot(vec[:, 0], vec[:, 1]), vec, losses, protocol)
