"""gravprobe.orbits — orbit simulator, tokenizer and sharded trajectory datasets (numpy + numba, no torch).

Units: AU, years, solar masses, ``G = 4 pi^2``. Quick use::

    import numpy as np
    from gravprobe.orbits import PlanetarySystem, DatasetSpec, generate_arrays, ensure_dataset, load_dataset

    traj = PlanetarySystem.from_elements(1.0, [3e-6], a=[1.0], e=[0.0167],
                                         rng=np.random.default_rng(0)).simulate(n_steps=500, dt=0.0189)
    spec = DatasetSpec(name="pretrain", n_systems=64)
    arrays = generate_arrays(spec, seed=0)                     # in memory
    ds = load_dataset(ensure_dataset(spec, "/tmp/pretrain", seed=0))  # on disk, memory-mapped
"""
from gravprobe.orbits.dataset import (
    ARRAYS,
    ConcatArray,
    DatasetError,
    DatasetSpec,
    OrbitDataset,
    build_sequences,
    dataset_dir,
    ensure_dataset,
    generate_arrays,
    load_dataset,
    repair_dataset,
    star_wobble_bins,
)
from gravprobe.orbits.physics import (
    G,
    EccentricityError,
    Elements,
    IntegrationError,
    MassError,
    MassRatioError,
    PhysicsError,
    PlanetarySystem,
    SemiMajorAxisError,
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
from gravprobe.orbits.tokens import OrbitTokenizer

__all__ = [
    "ARRAYS", "ConcatArray", "DatasetError", "DatasetSpec", "OrbitDataset", "build_sequences", "dataset_dir",
    "ensure_dataset", "generate_arrays", "load_dataset", "repair_dataset", "star_wobble_bins", "G", "EccentricityError",
    "Elements", "IntegrationError", "MassError", "MassRatioError", "PhysicsError", "PlanetarySystem",
    "SemiMajorAxisError", "TimeStepError", "Trajectory", "elements_from_state", "gravity_force",
    "integrate_nbody", "kepler_drift", "kepler_state", "orbital_period", "solve_kepler", "DEFAULT_PRIORS",
    "SOLAR_SYSTEM", "SystemParams", "sample_systems", "OrbitTokenizer",
]
