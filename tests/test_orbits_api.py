"""The public physics API of gravprobe.orbits: scalars and arrays in, typed errors that name the argument.

One test per failure of issue 11 (each asserts the message), plus scalar/array agreement and the rule that
validating priors draws no random numbers.
"""
from __future__ import annotations

import numpy as np
import pytest
from gravprobe.orbits.physics import (
    EccentricityError,
    G,
    MassError,
    PhysicsError,
    PlanetarySystem,
    SemiMajorAxisError,
    StateError,
    TimeStepError,
    elements_from_state,
    gravity_force,
    integrate_nbody,
    kepler_drift,
    kepler_drift_universal,
    kepler_state,
    orbital_period,
    solve_kepler,
)
from gravprobe.orbits.priors import DEFAULT_PRIORS, merge_priors, sample_systems, validate_priors


def _earth(**kw) -> PlanetarySystem:
    return PlanetarySystem.from_elements(1.0, [3e-6], a=[1.0], e=[0.0167], omega=0.0, mean_anomaly=0.0, **kw)


# ------------------------------------------------------------------------------------ scalars in, scalars out
def test_state_error_is_exported_and_typed():
    from gravprobe import orbits

    assert orbits.StateError is StateError and "StateError" in orbits.__all__
    assert issubclass(StateError, PhysicsError) and issubclass(StateError, ValueError)


def test_solve_kepler_scalar_gives_a_float_equal_to_the_array_result():
    E = solve_kepler(1.0, 0.5)
    assert isinstance(E, float) and np.ndim(E) == 0
    assert abs(E - 0.5 * np.sin(E) - 1.0) < 1e-15
    assert E == solve_kepler(np.array([1.0]), np.array([0.5]))[0]
    # shapes broadcast as before; a 0-d array is a scalar too
    assert solve_kepler(np.zeros((3, 4)), 0.2).shape == (3, 4)
    assert np.ndim(solve_kepler(np.array(2.0), np.array(0.1))) == 0


def test_kepler_state_scalar_gives_one_vector():
    r, v = kepler_state(1.0, 0.5, 0.3, 1.0, G)
    assert r.shape == (2,) and v.shape == (2,)
    ra, va = kepler_state([1.0], [0.5], [0.3], [1.0], [G])
    np.testing.assert_array_equal(r, ra[0])
    np.testing.assert_array_equal(v, va[0])
    assert np.hypot(*r) == pytest.approx(1.0 * (1 - 0.5 * np.cos(solve_kepler(1.0, 0.5))), rel=1e-14)


def test_other_functions_take_scalars_and_one_vector():
    assert orbital_period(1.0, G) == pytest.approx(1.0) and np.ndim(orbital_period(1.0, G)) == 0
    el = elements_from_state([1.0, 0.0], [0.0, 2 * np.pi], G)
    assert np.ndim(el.a) == 0 and el.lrl.shape == (2,) and el.e == pytest.approx(0.0, abs=1e-12)
    for drift in (kepler_drift, kepler_drift_universal):
        r1, _ = drift([1.0, 0.0], [0.0, 2 * np.pi], G, 1.0)  # one period of a circular 1 AU orbit
        assert r1.shape == (2,) and np.allclose(r1, [1.0, 0.0], atol=1e-9)
    # a negative dt drifts backwards
    r_back, _ = kepler_drift([1.0, 0.0], [0.0, 2 * np.pi], G, -0.25)
    assert np.allclose(r_back, [0.0, -1.0], atol=1e-9)
    assert gravity_force([1.0, 0.0], 1e-6, 1.0).shape == (2,)


def test_integrate_nbody_takes_one_system_without_batch_axis():
    sys = _earth()
    args = {"star_pos0": sys.star_pos, "star_vel0": sys.star_vel, "planet_pos0": sys.star_pos + sys.rel_pos,
            "planet_vel0": sys.star_vel + sys.rel_vel}
    one = integrate_nbody(1.0, sys.m_planet, **args, dt=0.01, n_steps=5, substeps=2)
    batch = integrate_nbody(np.array([1.0]), sys.m_planet[None], **{k: v[None] for k, v in args.items()},
                            dt=np.array([0.01]), n_steps=5, substeps=2)
    assert one.planet_pos.shape == (1, 5, 2) and one.star_pos.shape == (5, 2)
    assert isinstance(one.energy_error, float)
    np.testing.assert_array_equal(one.planet_pos, batch.planet_pos[0])


# ------------------------------------------------------------------------------------ issue 11, one by one
@pytest.mark.parametrize("e, words", [([1.5], "e >= 1 is an unbound"), ([np.nan], "not finite"),
                                      ([0.2, 1.0], "e >= 1 is an unbound")])
def test_solve_kepler_rejects_unbound_or_nan_eccentricity(e, words):
    with pytest.raises(EccentricityError, match=rf"solve_kepler: e \(eccentricity\) must lie in \[0, 1\).*{words}"):
        solve_kepler(np.ones(len(e)), e)
    with pytest.raises(EccentricityError, match=r"kepler_state: e \(eccentricity\)"):
        kepler_state(1.0, e, 0.0, 0.0, G)


def test_solve_kepler_message_points_at_the_bad_element():
    e = np.full((2, 3), 0.1)
    e[1, 2] = 2.0
    with pytest.raises(EccentricityError, match=r"got \[2.0\] \(1 of 6 values; the first at index \(1, 2\)\)"):
        solve_kepler(0.0, e)
    with pytest.raises(StateError, match=r"solve_kepler: mean_anomaly must be finite"):
        solve_kepler([0.0, np.inf], 0.1)


@pytest.mark.parametrize("mode", ["kepler", "nbody"])
def test_from_cartesian_rejects_nan_position(mode):
    with pytest.raises(StateError, match=r"planet_pos must be finite coordinates \(AU\), got \[nan\].*NaN or inf"):
        PlanetarySystem.from_cartesian(1.0, [3e-6], [[np.nan, 0.0]], [[0.0, 6.28]]).simulate(5, 0.01, mode=mode)
    with pytest.raises(StateError, match=r"planet_vel must be finite"):
        PlanetarySystem.from_cartesian(1.0, [3e-6], [[1.0, 0.0]], [[0.0, np.inf]])
    with pytest.raises(StateError, match=r"star_pos must be finite"):
        PlanetarySystem.from_cartesian(1.0, [3e-6], [[1.0, 0.0]], [[0.0, 6.28]], star_pos=(np.nan, 0.0))
    with pytest.raises(StateError, match=r"planet_pos - star_pos \(a planet on its star\) has zero separation"):
        PlanetarySystem.from_cartesian(1.0, [3e-6], [[1.0, 0.0]], [[0.0, 6.28]], star_pos=(1.0, 0.0))


def test_negative_eccentricity_is_called_negative_not_unbound():
    with pytest.raises(EccentricityError, match=r"e \(eccentricity\) must lie in \[0, 1\), got -0.1: negative") as info:
        PlanetarySystem.from_elements(1.0, [3e-6], a=[1.0], e=[-0.1], omega=0, mean_anomaly=0)
    assert "unbound" not in str(info.value)
    with pytest.raises(EccentricityError, match="negative"):
        solve_kepler(0.0, -1e-9)


def test_one_element_list_is_not_broadcast_over_planets():
    with pytest.raises(ValueError, match=r"a must be one number \(for every planet\) or 2 values .*got shape \(1,\)"):
        PlanetarySystem.from_elements(1.0, [3e-6, 1e-5], a=[1.0], e=[0.1, 0.1], omega=0, mean_anomaly=0)
    with pytest.raises(ValueError, match=r"omega must be one number \(for every planet\) or 2 values"):
        PlanetarySystem.from_elements(1.0, [3e-6, 1e-5], a=[1.0, 2.0], e=0.1, omega=[0.0, 1.0, 2.0],
                                      mean_anomaly=0)
    with pytest.raises(ValueError, match=r"planet_pos must have shape \[K, 2\] = \[2, 2\]"):
        PlanetarySystem.from_cartesian(1.0, [3e-6, 1e-5], [[1.0, 0.0]], [[0.0, 6.0], [0.0, 3.0]])
    # one number is still used for every planet
    sys = PlanetarySystem.from_elements(1.0, [3e-6, 1e-5], a=2.0, e=0.1, omega=0, mean_anomaly=0)
    np.testing.assert_allclose(sys.elements().a, [2.0, 2.0], rtol=1e-12)


@pytest.mark.parametrize("n_steps, err, match", [
    (2.5, TypeError, r"n_steps must be an integer >= 1, got 2.5 \(float\)"),
    (3.0, TypeError, r"n_steps must be an integer >= 1, got 3.0 \(float\); pass n_steps=3"),
    ("10", TypeError, r"n_steps must be an integer >= 1, got '10' \(str\)"),
    (True, TypeError, r"n_steps must be an integer >= 1, got True \(bool\)"),
    (0, ValueError, r"n_steps must be an integer >= 1, got 0"),
])
def test_simulate_rejects_non_integer_n_steps(n_steps, err, match):
    with pytest.raises(err, match=match):
        _earth().simulate(n_steps=n_steps, dt=0.01)


def test_simulate_takes_numpy_integers_and_checks_its_other_arguments():
    assert _earth().simulate(n_steps=np.int64(4), dt=np.float32(0.01)).planet_pos.shape == (1, 4, 2)
    with pytest.raises(TypeError, match=r"substeps must be an integer >= 1, got 1.5"):
        _earth().simulate(4, 0.01, mode="nbody", substeps=1.5)
    with pytest.raises(TimeStepError, match=r"substeps must be an integer >= 1, got 0"):
        _earth().simulate(4, 0.01, mode="nbody", substeps=0)
    with pytest.raises(TimeStepError, match=r"dt \(time step\) must be finite and > 0, got nan"):
        _earth().simulate(4, float("nan"))
    with pytest.raises(TimeStepError, match=r"dt must be one time step"):
        _earth().simulate(4, [0.01, 0.02])
    with pytest.raises(ValueError, match=r"unknown mode 'rk4'"):
        _earth().simulate(4, 0.01, mode="rk4")
    with pytest.raises(TypeError, match=r"fixed_star must be None, True or False"):
        _earth().simulate(4, 0.01, fixed_star="yes")


def test_gravity_force_at_zero_separation():
    with pytest.raises(StateError, match=r"gravity_force: rel_pos has zero separation \(r = 0 AU\) at index \(1,\)"):
        gravity_force([[1.0, 0.0], [0.0, 0.0]], 1e-6, 1.0)
    # the documented ways out: a Plummer softening (finite everywhere, 0 at r = 0) or NaN on request
    F = gravity_force([[1.0, 0.0], [0.0, 0.0]], 1e-6, 1.0, softening=1e-3)
    assert np.all(np.isfinite(F)) and np.all(F[1] == 0.0)
    assert F[0, 0] == pytest.approx(-G * 1e-6 / (1 + 1e-6) ** 1.5, rel=1e-14)
    assert np.isnan(gravity_force([0.0, 0.0], 1e-6, 1.0, zero_separation="nan")).all()
    with np.errstate(divide="ignore", invalid="ignore"), pytest.raises(StateError):  # no implicit NaN
        gravity_force([0.0, 0.0], 1e-6, 1.0)
    with pytest.raises(ValueError, match=r"zero_separation='clip' is unknown"):
        gravity_force([1.0, 0.0], 1e-6, 1.0, zero_separation="clip")
    with pytest.raises(PhysicsError, match=r"softening must be one number >= 0 AU, got -1"):
        gravity_force([1.0, 0.0], 1e-6, 1.0, softening=-1.0)
    # a massless test particle feels no force; a negative mass is an error
    assert np.all(gravity_force([1.0, 0.0], 0.0, 1.0) == 0.0)
    with pytest.raises(MassError, match=r"gravity_force: m_planet must be finite and >= 0 Msun, got -1.0"):
        gravity_force([1.0, 0.0], -1.0, 1.0)


# ------------------------------------------------------------------------ every argument is named when wrong
@pytest.mark.parametrize("call, err, match", [
    (lambda: orbital_period(-1.0, G), SemiMajorAxisError, r"orbital_period: a \(semi-major axis, AU\) must be finite and > 0, got -1.0"),
    (lambda: orbital_period(1.0, 0.0), MassError, r"orbital_period: mu must be finite and > 0"),
    (lambda: kepler_state(0.0, 0.1, 0.0, 0.0, G), SemiMajorAxisError, r"kepler_state: a \(semi-major axis, AU\)"),
    (lambda: kepler_state(1.0, 0.1, np.nan, 0.0, G), StateError, r"kepler_state: omega must be finite angles"),
    (lambda: kepler_state(1.0, 0.1, 0.0, 0.0, -G), MassError, r"kepler_state: mu must be finite and > 0"),
    (lambda: kepler_state([1.0, 2.0], [0.1, 0.2, 0.3], 0.0, 0.0, G), ValueError,
     r"kepler_state: the arguments must broadcast to one shape, got a \(2,\), e \(3,\)"),
    (lambda: solve_kepler("1", 0.1), TypeError, r"solve_kepler: mean_anomaly must be a number or an array of numbers"),
    (lambda: elements_from_state([0.0, 0.0], [0.0, 1.0], G), StateError, r"elements_from_state: rel_pos has zero separation"),
    (lambda: elements_from_state([1.0, 0.0, 0.0], [0.0, 1.0], G), ValueError,
     r"elements_from_state: rel_pos must hold \(x, y\) vectors, shape \[..., 2\] in AU, got shape \(3,\)"),
    (lambda: elements_from_state([1.0, 0.0], [np.nan, 1.0], G), StateError, r"elements_from_state: rel_vel must be finite"),
    (lambda: kepler_drift([1.0, 0.0], [0.0, 6.0], G, np.inf), TimeStepError, r"kepler_drift: dt must be finite times \(yr\)"),
    (lambda: kepler_drift([0.0, 0.0], [0.0, 6.0], G, 0.1), StateError, r"kepler_drift: pos has zero separation"),
    (lambda: kepler_drift([[1.0, 0.0]], [0.0, 6.0], G, 0.1), ValueError, r"kepler_drift: pos \(1, 2\) and vel \(2,\) must have the same shape"),
    (lambda: kepler_drift_universal([1.0, 0.0], [0.0, 6.0], 0.0, 0.1), MassError, r"kepler_drift_universal: mu must be finite and > 0"),
    (lambda: kepler_drift([1.0, 0.0], [0.0, 6.0], G, 0.1, max_iter=0), ValueError, r"kepler_drift: max_iter must be an integer >= 1"),
    (lambda: PlanetarySystem(1.0, [3e-6], [[0.0, 0.0]], [[0.0, 6.0]]), StateError, r"rel_pos \(a planet on its star\) has zero separation"),
    (lambda: PlanetarySystem(np.array([1.0, 2.0]), [3e-6], [[1.0, 0.0]], [[0.0, 6.0]]), ValueError, r"m_star must be one mass"),
    (lambda: PlanetarySystem(1.0, [3e-6, -1.0], [[1.0, 0.0], [2.0, 0.0]], [[0.0, 6.0], [0.0, 4.0]]), MassError,
     r"m_planet \(Msun\) must be finite and > 0, got \[-1.0\] \(1 of 2 values; the first at index \(1,\)\)"),
    (lambda: PlanetarySystem.from_elements(1.0, [3e-6], a=[1.0], e=[0.1]), TypeError,
     r"pass omega and mean_anomaly, or a numpy.random.Generator as rng"),
    (lambda: PlanetarySystem.from_elements(1.0, [3e-6], a=[1.0], e=[0.1], omega=0, mean_anomaly=np.nan), StateError,
     r"mean_anomaly must be finite angles"),
    (lambda: integrate_nbody([1.0], [[3e-6]], [[0.0, 0.0]], [[0.0, 0.0]], [[[1.0, np.nan]]], [[[0.0, 6.0]]], 0.01, 3, 1),
     StateError, r"integrate_nbody: planet_pos0 must be finite"),
    (lambda: integrate_nbody([1.0], [[3e-6, 3e-6]], [[0.0, 0.0]], [[0.0, 0.0]], [[[1.0, 0.0], [1.0, 0.0]]],
                             [[[0.0, 6.0], [0.0, 6.0]]], 0.01, 3, 1),
     StateError, r"integrate_nbody: planet_pos0 \(two planets\) has zero separation"),
    (lambda: integrate_nbody([1.0], [[3e-6]], [[0.0, 0.0]], [[0.0, 0.0]], [[[1.0, 0.0]]], [[[0.0, 6.0]]], 0.01, 2.5, 1),
     TypeError, r"integrate_nbody: n_steps must be an integer >= 1, got 2.5"),
    (lambda: integrate_nbody([1.0], [[3e-6]], [[0.0, 0.0]], [[0.0, 0.0]], [[[1.0, 0.0]]], [[[0.0, 6.0]]], 0.01, 3, 0),
     TimeStepError, r"integrate_nbody: substeps must be an integer >= 1, got 0"),
    (lambda: integrate_nbody([1.0], [[3e-6]], [[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 0.0]], [[[0.0, 6.0]]], 0.01, 3, 1),
     ValueError, r"integrate_nbody: planet_pos0 must have shape \[1, 1, 2\]"),
])
def test_errors_name_the_argument(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_kepler_mode_names_the_unbound_planet():
    sys = PlanetarySystem.from_cartesian(1.0, [1e-6, 1e-6], [[1.0, 0.0], [2.0, 0.0]], [[0.0, 6.0], [0.0, 20.0]])
    with pytest.raises(EccentricityError, match=r"initial states of planets \[1\] are unbound .*mode='nbody'"):
        sys.simulate(5, 0.01)


# ------------------------------------------------------------------------------------------------------ priors
@pytest.mark.parametrize("priors, err, match", [
    ({"eccentricity": {"a": -1.0}}, EccentricityError,
     r"data.priors.eccentricity.a=-1.0 is out of range: Beta\(a, b\) needs a > 0 .*fix: e.g. data.priors.eccentricity.a=0.867"),
    ({"eccentricity": {"b": "x"}}, EccentricityError, r"data.priors.eccentricity.b='x' is out of range"),
    ({"semi_major_axis": {"low": -1.0, "high": 2.0}}, SemiMajorAxisError,
     (r"data.priors.semi_major_axis: uniform needs low > 0, got data.priors.semi_major_axis.low=-1.0 AU; "
      r"valid: 0 < low < high AU; fix: set data.priors.semi_major_axis.low to a positive number")),
    ({"semi_major_axis": {"low": 5.0, "high": 2.0}}, SemiMajorAxisError,
     r"needs numbers low < high, got low=5.0, high=2.0 \(data.priors.semi_major_axis.low, data.priors.semi_major_axis.high\)"),
    ({"planet_mass": {"scale": 0.0}}, MassError, r"data.priors.planet_mass.scale=0.0 is out of range: the Gamma distribution needs scale > 0"),
    ({"star_mass": {"s": -0.2}}, MassError, r"data.priors.star_mass.s=-0.2 is out of range: the log-normal distribution needs s > 0"),
    ({"star_mass": {"clip": [2.0, 1.0]}}, MassError, r"data.priors.star_mass.clip=\[2.0, 1.0\] must be two masses \[low, high\] with 0 < low <= high"),
    ({"com_sigma": -1.0}, ValueError, r"data.priors.com_sigma=-1.0 is out of range: .*sigma must be a finite number >= 0 AU"),
    ({"eccentricty": {"a": 1.0}}, ValueError, r"data.priors has unknown prior\(s\) \['eccentricty'\].*did you mean data.priors.eccentricity"),
])
def test_bad_priors_name_the_config_key(priors, err, match):
    from gravprobe.orbits import DatasetSpec

    with pytest.raises(err, match=match):
        DatasetSpec(priors=priors)
    with pytest.raises(err, match=match.replace("data.priors", "priors")):  # called directly: the argument's name
        sample_systems(np.random.default_rng(0), 4, priors=priors)


def test_priors_validation_draws_no_random_numbers():
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    with pytest.raises(EccentricityError):  # the raw scipy "Domain error" of the issue, now caught first
        sample_systems(rng, 4, priors={"eccentricity": {"a": -1.0, "b": 3.0}})
    assert rng.bit_generator.state == before
    validate_priors(merge_priors(None))
    # a partial prior is merged with the defaults and draws exactly what the full spelling draws
    p1 = sample_systems(np.random.default_rng(5), 50, priors={"eccentricity": {"a": 2.0}})
    p2 = sample_systems(np.random.default_rng(5), 50, priors={**DEFAULT_PRIORS, "eccentricity": {"a": 2.0, "b": 3.03}})
    for k, v in p1.__dict__.items():
        np.testing.assert_array_equal(v, getattr(p2, k))


def test_sample_systems_checks_its_arguments():
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator"):
        sample_systems(0, 4)
    with pytest.raises(TypeError, match=r"n \(number of systems\) must be an integer >= 0, got 2.5"):
        sample_systems(np.random.default_rng(0), 2.5)
    with pytest.raises(ValueError, match=r"dt_index=2 must be None or an index into the 2 time steps"):
        sample_systems(np.random.default_rng(0), 4, dt_index=2)
    with pytest.raises(ValueError, match=r"planets must be \[K_min, K_max\]"):
        sample_systems(np.random.default_rng(0), 4, planets=3)
