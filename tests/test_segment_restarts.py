"""A segment longer than one solve's step budget is continued, not failed (issue 16)."""

from __future__ import annotations

import jax
import numpy as np

from qspjax.regimen import compile_schedule, parse_regimen
from qspjax.simulate import STATUS_OK, SolverConfig, simulate_batch


def test_a_segment_that_outgrows_max_steps_is_continued_to_the_same_solution(reference_model, reference_state):
    models = jax.tree_util.tree_map(lambda x: x[None], reference_model)
    y0 = jax.tree_util.tree_map(lambda x: x[None], reference_state)
    sched = compile_schedule(parse_regimen({"name": "none"}), ("nivolumab",), np.array([0.0, 5.0, 10.0]), 1)
    whole = simulate_batch(models, y0, sched, SolverConfig(max_steps=4096))
    steps = int(whole.num_steps[0])
    budget = max(4, steps // 3)  # a third of what the 10 days need: three continuations at least
    cut = simulate_batch(models, y0, sched, SolverConfig(max_steps=budget, max_restarts=6))
    assert int(whole.status[0]) == STATUS_OK and int(cut.status[0]) == STATUS_OK
    assert int(cut.num_steps[0]) > budget  # one solve cannot exceed its budget: it was continued
    for k in ("C1", "T1_T", "ab_C"):
        np.testing.assert_allclose(np.asarray(cut.ys[k]), np.asarray(whole.ys[k]), rtol=1e-4, atol=1e-12)
