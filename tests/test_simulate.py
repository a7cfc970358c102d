"""The simulator against SciPy, invariants, gradients, batching and failure isolation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.integrate import solve_ivp

from qspjax.regimen import compile_schedule, parse_regimen
from qspjax.solver.simulate import (STATUS_OK, SolverConfig, _flat_system, apply_events, simulate_batch,
                             simulate_patient)
from qspjax.vpop import build_models

TIGHT = SolverConfig(rtol=1e-10, atol=1e-13, max_steps=100_000)
VARIED = ("k_C1_growth", "k_C_T1", "k_T1", "q_T1_T_in", "n_T1_clones", "P1_C1", "k_cell_clear",
          "alpha_tumor", "k_T1_act", "k_APC_mat", "C_PDL1_total", "k_cl_nivolumab")


def _regimen():
    return parse_regimen({
        "name": "test",
        "ici": [{"drug": "nivolumab", "dose": 3, "unit": "mg/kg", "interval_days": 2.5, "cycles": 3, "start_day": 0}],
        "rt": [{"dose_per_fraction_gy": 8, "fractions": 2, "days": [1, 3.5], "lesion": "irradiated"}],
    })


@pytest.fixture(scope="module")
def two_lesion_patients(params):
    """Three patients with parameters perturbed around the nominal, two lesions, tumor state from
    the reference export with a smaller second lesion."""
    from qspjax.model.reference import state_from_species

    rng = np.random.default_rng(7)
    n = 3
    values = {k: jnp.asarray(params.values[k] * np.exp(0.3 * rng.standard_normal(n))) for k in VARIED}
    models = build_models(params, values, n, ("nivolumab",), 2)
    y0 = jax.vmap(lambda m: state_from_species(m, params.initial_state))(models)
    y0["C1"] = y0["C1"].at[:, 1].multiply(0.2)
    return models, y0


def _scipy_solve(model, y0, schedule):
    """The same right-hand side and events, integrated by SciPy's Radau at rtol 1e-10; returns
    the state at every output day (after the jumps of an event on that day)."""
    system = _flat_system(model, y0)
    f = jax.jit(lambda z: system.term.vf(0.0, z, None))
    jac = jax.jit(jax.jacfwd(lambda z: system.term.vf(0.0, z, None)))
    events = schedule.events
    times = np.asarray(schedule.times)
    grid = np.asarray(schedule.output_days)
    out = {}
    y = y0
    for k in range(len(times)):
        y, _ = apply_events(model, y, tuple(e[k] for e in events))
        t_next = times[k + 1] if k + 1 < len(times) else times[k]
        for g in grid[(grid >= times[k]) & (grid <= t_next)]:
            out[float(g)] = y if g == times[k] else None
        if t_next > times[k]:
            z0 = np.asarray(ravel_pytree(y)[0] / system.scale)
            inside = grid[(grid > times[k]) & (grid <= t_next)]
            sol = solve_ivp(lambda t, z: np.asarray(f(jnp.asarray(z))), (times[k], t_next), z0,
                            method="Radau", jac=lambda t, z: np.asarray(jac(jnp.asarray(z))),
                            rtol=1e-10, atol=1e-13, t_eval=np.unique(np.append(inside, t_next)))
            assert sol.success
            for j, g in enumerate(sol.t):
                if g in inside:
                    out[float(g)] = system.unravel(jnp.asarray(sol.y[:, j]) * system.scale)
            y = system.unravel(jnp.asarray(sol.y[:, -1]) * system.scale)
    return [out[float(g)] for g in grid]


# Both batch solvers on the same patients: the lane queue (3 patients on 2 lanes, so that one lane
# takes a second patient after its first) and lock-step vmap.
_BATCHINGS = {"queue": ("queue", 2), "lockstep": ("lockstep", None)}


@pytest.fixture(scope="module")
def tight_solutions(two_lesion_patients):
    models, y0 = two_lesion_patients
    # Output days between and on event days (0, 1, 2.5, 3.5 and 5 are event days).
    schedule = compile_schedule(_regimen(), ("nivolumab",), np.array([0.0, 0.75, 1.0, 2.0, 3.5, 4.25, 6.0]),
                                n_lesions=2)
    return schedule, {name: simulate_batch(models, y0, schedule, dataclasses.replace(TIGHT, batching=b, lanes=lanes))
                      for name, (b, lanes) in _BATCHINGS.items()}


# lock-step against Radau is opt-in (slow): it follows from queue against Radau (1e-5) and the
# queue-lockstep agreement below (1e-6), which both run by default
@pytest.mark.parametrize("batching", ["queue", pytest.param("lockstep", marks=pytest.mark.slow)])
def test_matches_scipy_radau_for_several_patients(two_lesion_patients, tight_solutions, batching):
    models, y0 = two_lesion_patients
    schedule, solutions = tight_solutions
    traj = solutions[batching]
    assert np.all(np.asarray(traj.status) == STATUS_OK)
    for i in range(2):
        model = jax.tree_util.tree_map(lambda x: x[i], models)
        yi = jax.tree_util.tree_map(lambda x: x[i], y0)
        ref = _scipy_solve(model, yi, schedule)
        typical = model.scales()
        for k, yk in enumerate(ref):
            for name, v in yk.items():
                ours = np.asarray(traj.ys[name][i, k])
                want = np.asarray(v)
                # relative error, with a floor of 1e-7 of the state's typical size for states at ~0:
                # the solve's absolute tolerance is 1e-13 of it, and a pool that is exactly 0 until
                # the first RT fraction (C_doomed_icd) holds ~1e-13 x typical in Rodas5P (the
                # non-negative projection keeps the positive half of round-off-level excursions)
                scale = np.maximum(np.abs(want), 1e-7 * np.asarray(typical[name]))
                assert np.all(np.abs(ours - want) <= 1e-5 * scale), (i, k, name)


def test_queue_refills_lanes_and_agrees_with_lockstep(tight_solutions):
    _, solutions = tight_solutions
    queue, lock = solutions["queue"], solutions["lockstep"]
    for traj in (queue, lock):
        assert np.all(np.asarray(traj.status) == STATUS_OK)
    for name in queue.ys:
        a, c = np.asarray(queue.ys[name]), np.asarray(lock.ys[name])
        # The same method and controller: at rtol 1e-10 the two paths agree far inside 1e-6 (a
        # refilled lane that kept anything of its previous patient would not).
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6 * np.max(np.abs(c)) + 1e-300, err_msg=name)
    # Steps differ only by the lock-step path's restarts after extinction: a few per patient.
    q, l = np.asarray(queue.num_steps), np.asarray(lock.num_steps)
    assert np.all(np.abs(q - l) <= 0.05 * l + 3), (q, l)


def test_queue_isolates_a_failing_patient(params, reference_state):
    n = 3
    growth = np.full(n, params.values["k_C1_growth"])
    growth[1] = np.inf  # this patient cannot be solved
    models = build_models(params, {"k_C1_growth": jnp.asarray(growth)}, n, ("nivolumab",), 1)
    y0 = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), reference_state)
    sched = compile_schedule(parse_regimen({"name": "none"}), ("nivolumab",), np.array([0.0, 0.5]), 1)
    traj = simulate_batch(models, y0, sched, SolverConfig(batching="queue", lanes=2))
    status = np.asarray(traj.status)
    assert status[1] != STATUS_OK and status[0] == STATUS_OK and status[2] == STATUS_OK
    # The healthy patients are identical (same parameters), whichever lane and neighbour they had.
    np.testing.assert_array_equal(np.asarray(traj.ys["C1"][0]), np.asarray(traj.ys["C1"][2]))
    assert np.all(np.isfinite(np.asarray(traj.ys["C1"])[[0, 2]]))


def test_solver_config_refuses_unknown_batching():
    with pytest.raises(ValueError, match="batching 'fast'.*'queue'"):
        SolverConfig(batching="fast")
    with pytest.raises(ValueError, match="lanes 0"):
        SolverConfig(lanes=0)


def test_states_stay_non_negative_and_lesions_behave(two_lesion_patients):
    models, y0 = two_lesion_patients
    schedule = compile_schedule(_regimen(), ("nivolumab",), np.arange(0.0, 7.0), n_lesions=2)
    traj = simulate_batch(models, y0, schedule, SolverConfig())
    for name, v in traj.ys.items():
        assert np.all(np.asarray(v) >= -1e-9 * np.max(np.abs(np.asarray(v)) + 1e-300)), name


def test_one_rt_fraction_scales_cancer_cells_by_lq_survival_in_field_only(params, two_lesion_patients):
    models, y0 = two_lesion_patients
    model = jax.tree_util.tree_map(lambda x: x[0], models)
    y = jax.tree_util.tree_map(lambda x: x[0], y0)
    d = 8.0
    zero_d = jnp.zeros(1)
    event = (zero_d, zero_d, jnp.asarray([d, 0.0]), jnp.asarray(1.0), jnp.asarray(0.0), jnp.zeros(2))
    y1, _ = apply_events(model, y, event)
    a = float(model.rt.p["alpha_tumor"])
    b = a / float(model.rt.p["alpha_beta_tumor"])
    assert float(y1["C1"][0]) == pytest.approx(float(y["C1"][0]) * np.exp(-a * d - b * d * d), rel=1e-12)
    assert float(y1["C1"][1]) == float(y["C1"][1])
    assert float(y1["C_doomed"][0]) == pytest.approx(float(y["C1"][0]) * (1 - np.exp(-a * d - b * d * d)), rel=1e-12)
    # Lymphocytes: the irradiated lesion's T cells and (a smaller dose) the blood lose cells, not lesion 2.
    assert float(y1["T1_T"][0]) < float(y["T1_T"][0]) and float(y1["T1_T"][1]) == float(y["T1_T"][1])
    assert float(y1["T1_C"]) < float(y["T1_C"])


# opt-in: a compilation (~38 s) for one property that every cohort test exercises (each patient
# reaches its baseline only by untreated growth, grow_to_baseline)
@pytest.mark.slow
def test_untreated_tumor_grows(reference_model, reference_state):
    sched = compile_schedule(parse_regimen({"name": "none"}), reference_model.drugs, np.arange(0.0, 31.0, 10.0), 1)
    traj = jax.jit(lambda m, y: simulate_patient(m, y, sched, SolverConfig()))(reference_model, reference_state)
    c = np.asarray(traj.ys["C1"][:, 0])
    assert int(traj.status) == STATUS_OK and np.all(np.diff(c) > 0)


@pytest.mark.slow
def test_gradient_through_the_solver_matches_finite_differences(params, reference_state):
    names = VARIED[:11]
    base = {k: jnp.asarray([params.values[k]]) for k in names}
    mild = parse_regimen({
        "name": "mild",
        "ici": [{"drug": "nivolumab", "dose": 3, "unit": "mg/kg", "interval_days": 14, "cycles": 1}],
        "rt": [{"dose_per_fraction_gy": 2, "fractions": 1, "days": [1]}],
    })
    sched = compile_schedule(mild, ("nivolumab",), np.array([0.0, 2.0, 4.0]), n_lesions=1)
    config = SolverConfig(rtol=1e-9, atol=1e-12, max_steps=100_000)

    def objective(values):
        models = build_models(params, values, 1, ("nivolumab",), 1)
        y0 = jax.tree_util.tree_map(lambda x: x[None], reference_state)
        traj = simulate_batch(models, y0, sched, config)
        return jnp.log(traj.ys["C1"][0, -1, 0]) + jnp.log(traj.ys["T1_T"][0, -1, 0])

    objective = jax.jit(objective)
    assert np.isfinite(float(objective(base)))
    grad = jax.jit(jax.grad(objective))(base)
    for k in names:
        h = 1e-4
        up = dict(base, **{k: base[k] * (1 + h)})
        dn = dict(base, **{k: base[k] * (1 - h)})
        fd = (objective(up) - objective(dn)) / (2 * h * base[k][0])
        g = grad[k][0]
        assert float(g) == pytest.approx(float(fd), rel=1e-4, abs=1e-10 / float(base[k][0])), k


@pytest.mark.slow
def test_a_batch_of_1000_patients_runs_as_one_call_and_flags_failures(params, reference_state):
    n = 1000
    rng = np.random.default_rng(3)
    growth = params.values["k_C1_growth"] * np.exp(0.3 * rng.standard_normal(n))
    growth[17] = np.inf  # this patient cannot be solved
    models = build_models(params, {"k_C1_growth": jnp.asarray(growth)}, n, ("nivolumab",), 1)
    y0 = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), reference_state)
    sched = compile_schedule(parse_regimen({"name": "none"}), ("nivolumab",), np.array([0.0, 0.5]), 1)
    # Healthy patients need 8 steps for these 12 hours; the unsolvable one spends its step budget
    # (per extinction piece), and under vmap every patient waits for it: a small budget keeps
    # the test fast (256 steps cost ~20 s here, 32 steps ~2 s).
    traj = simulate_batch(models, y0, sched, SolverConfig(max_steps=32))
    status = np.asarray(traj.status)
    assert status.shape == (n,)
    assert status[17] != STATUS_OK
    assert np.all(np.delete(status, 17) == STATUS_OK)
    assert np.all(np.delete(np.asarray(traj.num_steps), 17) <= 32)
    c = np.asarray(traj.ys["C1"][:, -1, 0])
    assert np.all(np.isfinite(np.delete(c, 17)))


def test_new_regimen_of_the_same_shape_does_not_recompile(reference_model, reference_state):
    from qspjax.solver import simulate as sim

    grid = np.array([0.0, 1.0, 2.0])
    a = compile_schedule(parse_regimen({"name": "a", "ici": [
        {"drug": "nivolumab", "dose": 240, "unit": "mg", "interval_days": 1, "cycles": 2}]}), ("nivolumab",), grid, 1)
    b = compile_schedule(parse_regimen({"name": "b", "ici": [
        {"drug": "nivolumab", "dose": 480, "unit": "mg", "interval_days": 2, "cycles": 1, "start_day": 1}]}),
        ("nivolumab",), grid, 1)
    models = jax.tree_util.tree_map(lambda x: x[None], reference_model)
    y0 = jax.tree_util.tree_map(lambda x: x[None], reference_state)
    sim.simulate_batch(models, y0, a)
    # Concrete inputs run on the lane queue (SolverConfig.batching "auto"), not the vmap path.
    before = sim._simulate_queue_jit._cached._cache_size()
    lockstep_before = sim._simulate_batch_jit._cached._cache_size()
    assert before >= 1
    out = sim.simulate_batch(models, y0, b)
    assert sim._simulate_queue_jit._cached._cache_size() == before
    assert sim._simulate_batch_jit._cached._cache_size() == lockstep_before
    assert float(out.ys["ab_C"][0, 1, 0]) > 0
