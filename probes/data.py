"""From an orbit dataset to the probes' tables: planet steps, the §4.3 selection, galaxies, the controls.

Works on any object with the arrays of ``gravprobe.orbits.load_dataset`` (``states [N, T, 6]``,
``forces [N, T, 2]``, ``labelled [N, T]``, ``bodies [N, T]``; memory-mapped is fine).

Definitions (METHOD.md §4.3–4.6):

- **training states** (also the nearest-state *reference*): every labelled planet step (the fine-tuning
  labels). The reference is therefore drawn only from sequences that carry labels, never from a step
  without a label;
- **held-out states** depend on the protocol (``probe.protocol``, :data:`PROTOCOLS`):

  - ``two_label`` (the literature's): the unlabelled planet steps of partially labelled sequences — for
    ``two_body_force`` the held-out steps of the last 1,000 sequences, each of which keeps 2 labelled
    steps (the first 9,000 are labelled at every planet step). Those 2 labels are training states, so a
    held-out state's own sequence is in the reference;
  - ``unlabelled``: every planet step of the sequences that carry no label at all (a force dataset made
    with ``force_data.labelling.partial_steps=0``). No held-out sequence contributes to the reference;

- **nearness** is the Euclidean distance between *standardised* state features
  ``(x, y, vx, vy, log m_planet, log m_star)`` (AU, AU/yr, log M☉; masses in log because the planet mass
  prior spans six decades, and standardising a linear mass would squash all small planets together);
  the scaler is fitted on the training states;
- the ``n_keep`` (5,000) held-out states nearest to any training state form the pool; galaxy ``s`` draws
  ``size`` (1,000) of them without replacement with ``numpy.random.default_rng(s)``.

Controls (METHOD.md §4.4, §4.6): :func:`oracle_predict` (k-NN on the true state, optionally without some
features: ``exclude=("log_m_planet",)`` is the oracle without m1), :func:`noisy_truth`, and
:func:`memoriser_predict` (a sequence's own labels, no model).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.neighbors import KNeighborsRegressor, NearestNeighbors
from sklearn.preprocessing import StandardScaler

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

    def subset(self, idx: np.ndarray) -> PlanetSteps:
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


PROTOCOLS = ("two_label", "unlabelled")

#: Names of the columns of :func:`state_features` (``exclude`` takes these).
FEATURES = ("x", "y", "vx", "vy", "log_m_planet", "log_m_star")

_FIX_UNLABELLED = "force_data.labelling.partial_steps=0"


def sequence_label_counts(ds) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence ``[N]``: the number of labelled planet steps and the number of planet steps."""
    planet = np.asarray(ds.bodies) >= 1
    lab = np.asarray(ds.labelled, dtype=bool)
    return (lab & planet).sum(1), planet.sum(1)


def split_force_data(ds, protocol: str = "two_label") -> tuple[PlanetSteps, PlanetSteps]:
    """``(training, held_out)`` under ``protocol`` (see the module docstring).

    ``training`` = all labelled planet steps (the labels and the nearest-state reference);
    ``held_out`` = the unlabelled planet steps of partially labelled sequences (``two_label``), or every
    planet step of the sequences without any label (``unlabelled``). Raises ``ValueError`` naming the
    config key and the fix when the dataset does not fit the protocol (e.g. ``unlabelled`` asked for on a
    dataset whose held-out sequences keep labels, or the other way round)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"probe.protocol={protocol!r} is not a protocol; choose one of "
                         f"{', '.join(PROTOCOLS)}")
    n_lab, n_planet = sequence_label_counts(ds)
    if n_lab.sum() == 0:
        raise ValueError("the force dataset has no labelled steps; generate it with data=two_body_force "
                         "(or another preset with force labels)")
    partial = np.nonzero((n_lab > 0) & (n_lab < n_planet))[0]
    bare = np.nonzero((n_lab == 0) & (n_planet > 0))[0]
    if protocol == "two_label":
        if len(bare):
            raise ValueError(
                "probe.protocol=two_label holds out the unlabelled steps of partially labelled sequences, "
                f"but {len(bare)} sequences of the force dataset carry no label at all (made with "
                f"{_FIX_UNLABELLED}); use probe.protocol=unlabelled with this dataset, or generate the force "
                "data with force_data.labelling.partial_steps=2 (the literature's)")
        if len(partial) == 0:
            raise ValueError("the force dataset has no partially labelled sequences, so no held-out steps; "
                             "two_body_force labels only 2 steps of each of its last sequences — check its "
                             "spec (force_data.labelling.full_systems must be below force_data.n_systems)")
        held_systems = partial
    else:
        if len(partial):
            raise ValueError(
                f"probe.protocol=unlabelled needs held-out sequences without any label, but {len(partial)} "
                "sequences of the force dataset are partially labelled; generate the force data with "
                f"{_FIX_UNLABELLED} (or use probe.protocol=two_label, the literature's protocol)")
        if len(bare) == 0:
            raise ValueError("probe.protocol=unlabelled: the force dataset has no sequence without labels, "
                             f"so no held-out steps; generate it with {_FIX_UNLABELLED} and "
                             "force_data.labelling.full_systems below force_data.n_systems")
        held_systems = bare
    train = planet_steps(ds, labelled=True)
    held = planet_steps(ds, held_systems, labelled=False)
    if not train.labelled.all() or held.labelled.any():  # pragma: no cover - planet_steps contract
        raise RuntimeError("training states must all be labelled and held-out states unlabelled")
    log.info("force data (%s protocol): %d labelled training steps in %d sequences, %d held-out steps in %d "
             "sequences", protocol, len(train), int((n_lab > 0).sum()), len(held), len(held_systems))
    return train, held


def state_features(state: np.ndarray, exclude: Sequence[str] = ()) -> np.ndarray:
    """``[M, 6]`` state → ``[M, F]`` features (:data:`FEATURES`: x, y, vx, vy, log m_planet, log m_star),
    unscaled, without the columns named in ``exclude``."""
    unknown = set(exclude) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown state feature(s) {sorted(unknown)}; the features are "
                         f"{', '.join(FEATURES)}")
    state = np.asarray(state, dtype=np.float64)
    cols = {"x": state[:, 0], "y": state[:, 1], "vx": state[:, 2], "vy": state[:, 3]}
    if "log_m_planet" not in exclude:
        cols["log_m_planet"] = np.log(state[:, 4])
    if "log_m_star" not in exclude:
        cols["log_m_star"] = np.log(state[:, 5])
    return np.column_stack([cols[f] for f in FEATURES if f not in exclude])


def _scaler(train_state: np.ndarray, exclude: Sequence[str] = ()):
    return StandardScaler().fit(state_features(train_state, exclude))


def select_nearest(train_state: np.ndarray, held_state: np.ndarray, n_keep: int = 5000, *,
                   max_reference: int | None = 200_000, seed: int = 0, return_nearest: bool = False):
    """Indices of the ``n_keep`` held-out states nearest to any training state, nearest first, and their
    distances (standardised units). ``max_reference`` subsamples the training states used as the
    reference set (seeded) to bound time and memory; ``None`` uses all. The reference is ``train_state``
    (pass labelled steps only, as :func:`split_force_data` returns them).

    With ``return_nearest=True`` also returns, per kept state, the index into ``train_state`` of its
    nearest reference state (to ask e.g. whether it lies in the same sequence)."""
    if len(held_state) == 0 or len(train_state) == 0:
        raise ValueError("select_nearest needs non-empty training and held-out states")
    sc = _scaler(train_state)
    ref_idx = np.arange(len(train_state))
    if max_reference is not None and len(ref_idx) > max_reference:
        ref_idx = np.sort(np.random.default_rng(seed).choice(len(ref_idx), max_reference, replace=False))
    nn = NearestNeighbors(n_neighbors=1).fit(sc.transform(state_features(train_state[ref_idx])))
    dist, nearest = nn.kneighbors(sc.transform(state_features(held_state)))
    dist, nearest = dist[:, 0], ref_idx[nearest[:, 0]]
    n_keep = min(int(n_keep), len(held_state))
    order = np.argsort(dist, kind="stable")[:n_keep]
    if return_nearest:
        return order, dist[order], nearest[order]
    return order, dist[order]


def nearest_training(train_state: np.ndarray, query_state: np.ndarray) -> np.ndarray:
    """``[Q]`` index into ``train_state`` of each query's nearest training state over *all* of them (the
    standardised features of :func:`select_nearest`, no subsample): the neighbour the oracle sees first."""
    sc = _scaler(train_state)
    nn = NearestNeighbors(n_neighbors=1).fit(sc.transform(state_features(train_state)))
    return nn.kneighbors(sc.transform(state_features(query_state)), return_distance=False)[:, 0]


def make_galaxies(n_pool: int, size: int = 1000, seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> list[np.ndarray]:
    """One index array per seed: ``size`` distinct indices into a pool of ``n_pool`` points."""
    if size > n_pool:
        raise ValueError(f"a galaxy of {size} points needs a pool of at least that many, got {n_pool}; "
                         "lower probe.selection.galaxy_size or raise probe.selection.n_keep / the data size")
    return [np.sort(np.random.default_rng(int(s)).choice(n_pool, size, replace=False)) for s in seeds]


def oracle_predict(train_state: np.ndarray, train_y: np.ndarray, query_state: np.ndarray, *, k: int = 2,
                   exclude: Sequence[str] = ()) -> np.ndarray:
    """The §4.4 oracle: k-nearest-neighbour regression (uniform weights) on the standardised true state.

    ``train_state [M, 6]``, ``train_y [M]`` (e.g. |F|), ``query_state [Q, 6]`` → ``[Q]``. ``exclude``
    drops :data:`FEATURES` columns from the input: ``("log_m_planet",)`` is the oracle without m1
    (METHOD §4.6), which never sees the planet mass.
    """
    sc = _scaler(train_state, exclude)
    knn = KNeighborsRegressor(n_neighbors=k).fit(sc.transform(state_features(train_state, exclude)), train_y)
    return knn.predict(sc.transform(state_features(query_state, exclude)))


class NoLabelsError(ValueError):
    """The label memoriser has no labels to use: a held-out state's sequence carries none."""


def memoriser_predict(train: PlanetSteps, query: PlanetSteps) -> np.ndarray:
    """The label memoriser (METHOD §4.6), a control that knows no physics beyond r: for each query state
    the mean of ``|F|·r²`` over the *labelled* steps of its own sequence, divided by the state's ``r²``.

    ``train``: the labelled steps (labels |F| in M☉ AU yr⁻², r in AU); ``query [Q]`` → ``[Q]`` in M☉ AU yr⁻².
    r is taken from the true states (the literature's control reads it from the tokens; within a bin of
    the true value, which changes nothing at the verdict's resolution). In the two-body data ``|F|·r²`` =
    G·m1·m2 is constant along a sequence, so two labels pin it exactly: under the ``two_label`` protocol
    this control is Newtonian without learning anything. Raises :class:`NoLabelsError` when a query's
    sequence has no labelled step (always, under the ``unlabelled`` protocol).
    """
    if not train.labelled.all():
        raise ValueError("memoriser_predict: `train` must hold labelled steps only")
    uniq, inv = np.unique(train.system, return_inverse=True)
    per_seq = np.bincount(inv, weights=train.magnitude * train.r ** 2) / np.bincount(inv)
    pos = np.searchsorted(uniq, query.system)
    pos_c = np.minimum(pos, max(len(uniq) - 1, 0))
    found = (pos < len(uniq)) & (uniq[pos_c] == query.system) if len(uniq) else np.zeros(len(query), bool)
    if not found.all():
        missing = np.unique(query.system[~found])
        raise NoLabelsError(f"not applicable: no labels in held-out sequences ({len(missing)} held-out "
                            "sequences carry no labelled step for the memoriser to use)")
    return per_seq[pos_c] / query.r ** 2


def noisy_truth(force_magnitude: np.ndarray, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """True |F| with multiplicative Gaussian noise of relative size ``noise`` (the second control)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(force_magnitude, dtype=np.float64)
    return y * (1.0 + noise * rng.standard_normal(y.shape))
