"""A segment longer than one solve's step budget is continued, not failed (issue 16)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from qspjax.regimen import compile_schedule, parse_regimen
from qspjax.solver.simulate import STATUS_OK, SolverConfig, simulate_batch


@pytest.mark.slow  # ~75 s; the lane queue (the default batch path) has its own step-budget tests in test_simulate.py
def test_a_segment_that_outgrows_max_steps_is_continued_to_the_same_solution(reference_model, reference_state):
    models = jax.tree_util.tree_map(lambda x: x[None], reference_model)
    y0 = jax.tree_util.tree_map(lambda x: x[None], reference_state)
    sched = compile_schedule(parse_regimen({"name": "none"}), ("nivolumab",), np.array([0.0, 5.0, 10.0]), 1)
    # The continuation of a spent diffrax solve belongs to the lock-step (vmap) path.
    whole = simulate_batch(models, y0, sched, SolverConfig(max_steps=4096, batching="lockstep"))
    steps = int(whole.num_steps[0])
    budget = max(4, steps // 3)  # a third of what the 10 days need: three continuations at least
    cut = simulate_batch(models, y0, sched, SolverConfig(max_steps=budget, max_restarts=6, batching="lockstep"))
    assert int(whole.status[0]) == STATUS_OK and int(cut.status[0]) == STATUS_OK
    assert int(cut.num_steps[0]) > budget  # one solve cannot exceed its budget: it was continued
    for k in ("C1", "T1_T", "ab_C"):
        np.testing.assert_allclose(np.asarray(cut.ys[k]), np.asarray(whole.ys[k]), rtol=1e-4, atol=1e-12)


@pytest.mark.slow
def test_pacific_patients_that_stalled_now_solve_the_whole_follow_up():
    # The durvalumab arm of PACIFIC over its 1,880 simulated days, uncalibrated model, seed 11:
    # patients 2, 3, 8 and 10 of the 48-patient cohort stalled near zero-valued states and ran
    # out of steps (benchmarks/RESULTS.md, "Non-negative Rodas4 steps"); with the non-negative
    # projection each solves in fewer than 8,000 steps. ~3 min on one core.
    import argparse

    from qspjax.commands._model_options import add_arguments, resolve
    from qspjax.data import load_trials
    from qspjax.params import load_parameters
    from qspjax.runner import build_population
    from qspjax.vpop import load_population, target_from_arm

    opts = argparse.ArgumentParser()
    add_arguments(opts)
    choice = resolve(opts.parse_args(["--uncalibrated"]))
    params = load_parameters(choice.main, choice.extra)
    arm = load_trials().get_arm("NCT02125461:crt_durva")
    regimen = parse_regimen(arm.regimen, source="PACIFIC durvalumab arm")
    config = SolverConfig(rtol=1e-5, atol=1e-8)
    pop = build_population(params, 48, 11, regimen.drugs, spec=load_population(str(choice.population)),
                           target=target_from_arm(arm), config=config, chunk=48)
    grid = np.arange(0.0, float(arm.follow_up_days) + 1e-9, 7.0)
    sched = compile_schedule(regimen, pop.drugs, grid, n_lesions=2)
    models, y0 = pop.take(np.array([2, 3, 8, 10]))
    traj = simulate_batch(models, y0, sched, SolverConfig(rtol=1e-5, atol=1e-8, max_restarts=1))
    assert np.all(np.asarray(traj.status) == STATUS_OK)
    assert np.all(np.asarray(traj.num_steps) < 8000)
    for k in ("C_doomed", "C_doomed_icd", "APC_T", "T1_T"):  # saved states stay non-negative to a
        assert float(np.min(np.asarray(traj.ys[k]))) > -1e-3  # rounding amount (cells) of the dense output
