"""From an orbit dataset to the probes' tables: planet steps, the §4.3 selection, galaxies, the oracle.

Works on any object with the arrays of ``gravprobe.orbits.load_dataset`` (``states [N, T, 6]``,
``forces [N, T, 2]``, ``labelled [N, T]``, ``bodies [N, T]``; memory-mapped is fine).

Definitions (METHOD.md §4.3–4.4):

- **training states**: every labelled planet step (the fine-tuning labels);
- **held-out states**: the unlabelled planet steps of partially labelled sequences — for
  ``two_body_force`` exactly the held-out steps of the last 1,000 sequences (the first 9,000 are labelled
  at every planet step);
- **nearness** is the Euclidean distance between *standardised* state features
  ``(x, y, vx, vy, log m_planet, log m_star)`` (AU, AU/yr, log M☉; masses in log because the planet mass
  prior spans six decades, and standardising a linear mass would squash all small planets together);
  the scaler is fitted on the training states;
- the ``n_keep`` (5,000) held-out states nearest to any training state form the pool; galaxy ``s`` draws
  ``size`` (1,000) of them without replacement with ``numpy.random.default_rng(s)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

SR_NAMES = ("r", "m1", "m2")


@dataclass
class PlanetSteps:
    """A flat table of planet steps. ``system``/``step`` index the dataset ``[N, T]``.

    ``state [M, 6]``: rel x, rel y (AU), rel vx, rel vy (AU/yr), m_planet, m_star (M☉);
    ``force [M, 2]`` (M☉ AU yr⁻²); ``labelled [M]`` bool.
    """

    system: np.ndarray
    step: np.ndarray
    state: np.ndarray
    force: np.ndarray
    labelled: np.ndarray

    def __len__(self) -> int:
        return len(self.system)

    def subset(self, idx: np.ndarray) -> "PlanetSteps":
        return PlanetSteps(self.system[idx], self.step[idx], self.state[idx], self.force[idx], self.labelled[idx])

    @property
    def r(self) -> np.ndarray:
        """Separation [M] in AU."""
        return np.hypot(self.state[:, 0], self.state[:, 1])

    @property
    def magnitude(self) -> np.ndarray:
        """|F| [M] in M☉ AU yr⁻²."""
        return np.hypot(self.force[:, 0], self.force[:, 1])

    @property
    def sr_inputs(self) -> np.ndarray:
        """``[M, 3]`` = (r [AU], m1 = m_planet [M☉], m2 = m_star [M☉]), the symbolic-regression inputs."""
        return np.column_stack([self.r, self.state[:, 4], self.state[:, 5]])


def planet_steps(ds, systems: Sequence[int] | np.ndarray | None = None, *, labelled: bool | None = None,
                 chunk: int = 512) -> PlanetSteps:
    """Collect planet steps (``bodies >= 1``) of ``systems`` (default all); ``labelled`` filters if given."""
    n = ds.states.shape[0]
    systems = np.arange(n) if systems is None else np.asarray(systems, dtype=np.int64)
    parts = []
    for c in range(0, len(systems), chunk):  # chunks bound memory on large memory-mapped datasets
        sy = systems[c:c + chunk]
        bodies = np.asarray(ds.bodies[sy])
        lab = np.asarray(ds.labelled[sy], dtype=bool)
        mask = bodies >= 1
        if labelled is not None:
            mask &= lab if labelled else ~lab
        si, ti = np.nonzero(mask)
        parts.append((sy[si], ti.astype(np.int64), np.asarray(ds.states[sy][si, ti], dtype=np.float64),
                      np.asarray(ds.forces[sy][si, ti], dtype=np.float64), lab[si, ti]))
    if not parts:
        return PlanetSteps(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 6)), np.zeros((0, 2)),
                           np.zeros(0, bool))
    return PlanetSteps(*(np.concatenate(x) for x in zip(*parts)))


def split_force_data(ds) -> tuple[PlanetSteps, PlanetSteps]:
    """``(training, held_out)``: all labelled planet steps, and the unlabelled planet steps of partially
    labelled sequences (see the module docstring). Raises when the dataset has no such split."""
    bodies = np.asarray(ds.bodies)
    lab = np.asarray(ds.labelled, dtype=bool)
    planet = bodies >= 1
    n_lab = (lab & planet).sum(1)
    partial = np.nonzero((n_lab > 0) & (n_lab < planet.sum(1)))[0]
    if n_lab.sum() == 0:
        raise ValueError("the force dataset has no labelled steps; generate it with data=two_body_force "
                         "(or another preset with force labels)")
    if len(partial) == 0:
        raise ValueError("the force dataset has no partially labelled sequences, so no held-out steps; "
                         "two_body_force labels only 2 steps of each of its last sequences — check its spec")
    train = planet_steps(ds, labelled=True)
    held = planet_steps(ds, partial, labelled=False)
    log.info("force data: %d labelled training steps, %d held-out steps in %d sequences",
             len(train), len(held), len(partial))
    return train, held


def state_features(state: np.ndarray) -> np.ndarray:
    """``[M, 6]`` state → ``[M, 6]`` features (x, y, vx, vy, log m_planet, log m_star), unscaled."""
    state = np.asarray(state, dtype=np.float64)
    return np.column_stack([state[:, :4], np.log(state[:, 4]), np.log(state[:, 5])])


def _scaler(train_state: np.ndarray):
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(state_features(train_state))


def select_nearest(train_state: np.ndarray, held_state: np.ndarray, n_keep: int = 5000, *,
                   max_reference: int | None = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``n_keep`` held-out states nearest to any training state, nearest first, and their
    distances (standardised units). ``max_reference`` subsamples the training states used as the
    reference set (seeded) to bound time and memory; ``None`` uses all."""
    from sklearn.neighbors import NearestNeighbors

    if len(held_state) == 0 or len(train_state) == 0:
        raise ValueError("select_nearest needs non-empty training and held-out states")
    sc = _scaler(train_state)
    ref = train_state
    if max_reference is not None and len(ref) > max_reference:
        ref = ref[np.sort(np.random.default_rng(seed).choice(len(ref), max_reference, replace=False))]
    nn = NearestNeighbors(n_neighbors=1).fit(sc.transform(state_features(ref)))
    dist, _ = nn.kneighbors(sc.transform(state_features(held_state)))
    dist = dist[:, 0]
    n_keep = min(int(n_keep), len(held_state))
    order = np.argsort(dist, kind="stable")[:n_keep]
    return order, dist[order]


def make_galaxies(n_pool: int, size: int = 1000, seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> list[np.ndarray]:
    """One index array per seed: ``size`` distinct indices into a pool of ``n_pool`` points."""
    if size > n_pool:
        raise ValueError(f"a galaxy of {size} points needs a pool of at least that many, got {n_pool}; "
                         "lower probe.selection.galaxy_size or raise probe.selection.n_keep / the data size")
    return [np.sort(np.random.default_rng(int(s)).choice(n_pool, size, replace=False)) for s in seeds]


def oracle_predict(train_state: np.ndarray, train_y: np.ndarray, query_state: np.ndarray, *, k: int = 2) -> np.ndarray:
    """The §4.4 oracle: k-nearest-neighbour regression (uniform weights) on the standardised true state.

    ``train_state [M, 6]``, ``train_y [M]`` (e.g. |F|), ``query_state [Q, 6]`` → ``[Q]``.
    """
    from sklearn.neighbors import KNeighborsRegressor

    sc = _scaler(train_state)
    knn = KNeighborsRegressor(n_neighbors=k).fit(sc.transform(state_features(train_state)), train_y)
    return knn.predict(sc.transform(state_features(query_state)))


def noisy_truth(force_magnitude: np.ndarray, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """True |F| with multiplicative Gaussian noise of relative size ``noise`` (the second control)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(force_magnitude, dtype=np.float64)
    return y * (1.0 + noise * rng.standard_normal(y.shape))
