"""gravprobe.orbits — orbit simulator, tokenizer and sharded trajectory datasets (numpy + numba, no torch).

Units: AU, years, solar masses, ``G = 4 pi^2``. Quick use::

    import numpy as np
    from gravprobe.orbits import PlanetarySystem, DatasetSpec, generate_arrays, ensure_dataset, load_dataset

    traj = PlanetarySystem.from_elements(1.0, [3e-6], a=[1.0], e=[0.0167],
                                         rng=np.random.default_rng(0)).simulate(n_steps=500, dt=0.0189)
    spec = DatasetSpec(name="pretrain", n_systems=64)
    arrays = generate_arrays(spec, seed=0)                     # in memory
    ds = load_dataset(ensure_dataset(spec, "/tmp/pretrain", seed=0))  # on disk, memory-mapped

Modules: ``spec`` (``DatasetSpec``), ``build`` (arrays in memory), ``store`` (the folder rule
``dataset_path``, the writer ``ensure_dataset``, the reader ``load_dataset``), ``physics``, ``priors``,
``tokens``, ``fused``, ``generate`` (the CLI stage).
"""
from gravprobe.orbits.build import build_sequences, generate_arrays, star_wobble_bins
from gravprobe.orbits.physics import (
    EccentricityError,
    Elements,
    G,
    IntegrationError,
    MassError,
    MassRatioError,
    PhysicsError,
    PlanetarySystem,
    SemiMajorAxisError,
    StateError,
    TimeStepError,
    Trajectory,
    elements_from_state,
    gravity_force,
    integrate_nbody,
    kepler_drift,
    kepler_state,
    orbital_period,
    solve_kepler,
)
from gravprobe.orbits.priors import DEFAULT_PRIORS, SOLAR_SYSTEM, SystemParams, sample_systems
from gravprobe.orbits.spec import ARRAYS, DatasetSpec
from gravprobe.orbits.store import (
    ConcatArray,
    DatasetBusyError,
    DatasetError,
    OrbitDataset,
    config_dataset_path,
    dataset_dir,
    dataset_path,
    ensure_dataset,
    estimated_bytes,
    load_dataset,
    repair_dataset,
)
from gravprobe.orbits.tokens import OrbitTokenizer

__all__ = [
    "ARRAYS",
    "DEFAULT_PRIORS",
    "SOLAR_SYSTEM",
    "ConcatArray",
    "DatasetBusyError",
    "DatasetError",
    "DatasetSpec",
    "EccentricityError",
    "Elements",
    "G",
    "IntegrationError",
    "MassError",
    "MassRatioError",
    "OrbitDataset",
    "OrbitTokenizer",
    "PhysicsError",
    "PlanetarySystem",
    "SemiMajorAxisError",
    "StateError",
    "SystemParams",
    "TimeStepError",
    "Trajectory",
    "build_sequences",
    "config_dataset_path",
    "dataset_dir",
    "dataset_path",
    "elements_from_state",
    "ensure_dataset",
    "estimated_bytes",
    "generate_arrays",
    "gravity_force",
    "integrate_nbody",
    "kepler_drift",
    "kepler_state",
    "load_dataset",
    "orbital_period",
    "repair_dataset",
    "sample_systems",
    "solve_kepler",
    "star_wobble_bins",
]
