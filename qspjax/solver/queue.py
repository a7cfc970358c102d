"""A forward batch solver that keeps every lane busy: patients queue for a fixed number of lanes.

``jax.vmap`` of one patient's solve (:func:`qspjax.solver.simulate.simulate_patient`) runs every
patient of a batch in lock-step: each adaptive solve is a ``while_loop`` whose batched version
steps until the *slowest* patient of the batch has finished that segment, the finished lanes
computing masked steps meanwhile. Between two doses the slowest of 32 patients takes about twice
the mean number of steps, so about half of the work is thrown away (``benchmarks/RESULTS.md``).

Here one ``while_loop`` advances ``lanes`` patients by one Rosenbrock step per iteration, each
lane at its own place in its own timeline: a lane whose segment ends applies the next event's
jumps and goes on; a lane whose patient reaches the horizon (or fails) writes its results and
takes the next patient of the queue. Lanes idle only when the queue is empty.

Numerically it is the same method as the lock-step path: the same Rosenbrock step, the same
error norm and step-size controller as :class:`diffrax.PIDController` (pure integral by default),
the same dense output on the output grid, the same jumps at events, the extinction rule applied at
the end of the step in which a lesion falls below its threshold, and each segment starting with
the previous segment's mean accepted step. The solutions agree to within the tolerance
(``tests/test_queue.py``); step counts differ slightly (no restart after an extinction).

The loop is not reverse-differentiable (a ``while_loop`` with a data-dependent trip count);
:func:`qspjax.solver.simulate.simulate_batch` uses it only for concrete (untraced) inputs and the
lock-step path, which is differentiable, under ``jax.grad``/``jit`` tracing.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jax import lax
from jax.flatten_util import ravel_pytree

from qspjax.model._base import State
from qspjax.model.composer import QSPModel
from qspjax.regimen import Schedule
from qspjax.solver.core import (
    STATUS_MAX_STEPS,
    STATUS_NONFINITE,
    STATUS_OK,
    STATUS_SOLVER_FAILED,
    SolverConfig,
    Trajectory,
    _flat_system,
    apply_events,
)
from qspjax.solver.rosenbrock import RodasInterpolation, _Rodas

# diffrax.PIDController's defaults, which the lock-step path uses.
_SAFETY, _FACTORMIN, _FACTORMAX = 0.9, 0.2, 10.0


def supports(config: SolverConfig) -> bool:
    """Whether the queue can run ``config``'s solver (the Rosenbrock methods: no solver state)."""
    return isinstance(config.make_solver(), _Rodas)


def _take(tree, index):
    return jax.tree_util.tree_map(lambda x: x[index] if eqx.is_array(x) and x.ndim > 0 else x, tree)


@eqx.filter_jit
def simulate_queue(model_batch: QSPModel, y0_batch: State, schedule: Schedule,
                   config: SolverConfig = SolverConfig(), lanes: int = 32) -> Trajectory:
    """Solve N patients (leading axis N on every leaf of ``model_batch`` and ``y0_batch``) on
    ``min(lanes, N)`` lanes; returns the same :class:`Trajectory` as the lock-step path.

    A patient fails (its ``status``) when a segment takes more than ``config.max_steps * (1 +
    config.max_restarts + n_lesions)`` steps (the lock-step path's whole budget for a segment),
    when its step size falls below the round-off of its time (a stall), or when an accepted step
    is not finite; the other patients are not affected.
    """
    n = jax.tree_util.tree_leaves(y0_batch)[0].shape[0]
    b = min(lanes, n)
    solver = config.make_solver()
    if not isinstance(solver, _Rodas):
        raise ValueError(f"the queue solver runs the Rosenbrock methods; solver {config.solver!r} is not one")
    one_model, like = _take(model_batch, 0), _take(y0_batch, 0)  # the state's structure
    system0 = _flat_system(one_model, like)
    error_order = solver.error_order(system0.term)
    c1 = _flat_index(like, "C1")
    n_state = system0.scale.shape[0]
    times, grid = schedule.times, schedule.output_days
    n_times, n_grid = times.shape[0], grid.shape[0]
    events = schedule.events
    n_lesions = one_model.n_lesions
    budget = config.max_steps * (1 + config.max_restarts + n_lesions)

    def flat(model, y):
        return ravel_pytree(y)[0] / _flat_system(model, y).scale

    def lane_events(model, z, event):
        system = _flat_system(model, like)
        y, viable = apply_events(model, system.unravel(z * system.scale), event)
        return ravel_pytree(y)[0] / system.scale, viable

    def lane_step(model, t, h, z):
        system = _flat_system(model, like)
        z1, err, dense, _, _ = solver.step(system.term, t, t + h, z, None, None, False)
        # diffrax.PIDController's scaled error (a NaN candidate is scaled by the start state).
        candidate = jnp.where(jnp.any(jnp.isnan(z1)), z, z1)
        scale = config.atol + config.rtol * jnp.maximum(jnp.abs(z), jnp.abs(candidate))
        return z1, optx.rms_norm(err / scale), dense

    def lane_extinct(model, z):
        system = _flat_system(model, like)
        threshold = model.patient["extinction_threshold_cells"]
        cells = z[c1] * system.scale[c1]
        return z.at[c1].set(jnp.where(cells < threshold, 0.0, z[c1]))

    def load(state, done, rank):
        """Lanes in ``done`` take the next patients of the queue (``rank`` among the lanes done)."""
        p_new = state["next"] + rank
        idle = p_new >= n
        p_new = jnp.where(idle, n, p_new)
        source = jnp.minimum(p_new, n - 1)
        z0 = jax.vmap(flat)(_take(model_batch, source), _take(y0_batch, source))
        d = done[:, None]
        fresh_lane = dict(
            p=p_new, k=jnp.zeros_like(state["k"]), fresh=jnp.ones_like(state["fresh"]),
            t=jnp.full_like(state["t"], times[0]), t_seg=jnp.full_like(state["t"], times[0]),
            dt=jnp.full_like(state["dt"], config.first_step_days), gi=jnp.zeros_like(state["gi"]),
            seg_steps=jnp.zeros_like(state["seg_steps"]), seg_acc=jnp.zeros_like(state["seg_acc"]),
            steps=jnp.zeros_like(state["steps"]), status=jnp.zeros_like(state["status"]),
            prev_inv=jnp.ones_like(state["prev_inv"]), viable=jnp.full_like(state["viable"], jnp.nan))
        out = dict(state)
        for key, value in fresh_lane.items():
            out[key] = jnp.where(done.reshape(done.shape + (1,) * (value.ndim - 1)), value, state[key])
        out["z"] = jnp.where(d, z0, state["z"])
        out["next"] = state["next"] + jnp.sum(done)
        return out

    def body(state):
        p, k, t, z, dt = state["p"], state["k"], state["t"], state["z"], state["dt"]
        active = p < n
        models = _take(model_batch, jnp.minimum(p, n - 1))

        # 1. A lane at the start of a segment applies that timeline point's jumps.
        fresh = state["fresh"] & active
        event_k = jax.tree_util.tree_map(lambda a: a[k], events)
        z_ev, viable_ev = jax.vmap(lane_events)(models, z, event_k)
        z = jnp.where(fresh[:, None], z_ev, z)
        resected = fresh[:, None] & (event_k[5] > 0)
        viable = jnp.where(resected, viable_ev, state["viable"])
        # The grid day of an event is reported after its jumps: rewrite it.
        gi = jnp.where(fresh, jnp.searchsorted(grid, t, side="left"), state["gi"])

        # 2. One Rosenbrock step toward the segment's end.
        t_end = times[jnp.minimum(k + 1, n_times - 1)]
        span = t_end - t
        moving = active & (span > 0)
        h = jnp.where(moving, jnp.minimum(dt, span), 1.0)
        z1, scaled_error, dense = jax.vmap(lane_step)(models, t, h, z)
        keep = moving & (scaled_error < 1)
        inv = lax.stop_gradient(1.0 / scaled_error)
        factor = _SAFETY * inv ** ((config.icoeff + config.pcoeff) / error_order)
        if config.pcoeff != 0:
            factor = factor * state["prev_inv"] ** (-config.pcoeff / error_order)
        # A step whose error is not a number is rejected and shrunk as far as allowed.
        factor = jnp.where(jnp.isnan(factor), _FACTORMIN, factor)
        factor = jnp.clip(factor, jnp.where(keep, 1.0, _FACTORMIN), jnp.where(keep, _FACTORMAX, _SAFETY))
        dt_next = jnp.where(moving, h * factor, dt)
        prev_inv = jnp.where(keep & (inv > 0) & jnp.isfinite(inv), inv, state["prev_inv"])
        last = h >= span
        t_new = jnp.where(keep, jnp.where(last, t_end, t + h), t)
        z1 = jax.vmap(lane_extinct)(models, z1)
        finite = jnp.all(jnp.isfinite(z1), axis=1)
        z_new = jnp.where((keep & finite)[:, None], z1, z)

        # 3. Output-grid days reached: the step's dense output (the post-jump state at t itself).
        reach = jnp.where(keep & finite, t_new, t)
        interp = RodasInterpolation(t0=t, t1=t + h, y0=dense["y0"], y1=dense["y1"], k=dense["k"])

        def rows_due(c):
            gi_, _ = c
            return active & (gi_ < n_grid) & (grid[jnp.minimum(gi_, n_grid - 1)] <= reach)

        def write_row(c):
            gi_, saved_ = c
            due = rows_due(c)
            g = grid[jnp.minimum(gi_, n_grid - 1)]
            value = jax.vmap(lambda it, gg: it.evaluate(gg))(interp, g)
            value = jnp.where((g <= t)[:, None], z, value)
            saved_ = saved_.at[jnp.where(due, p, n), jnp.minimum(gi_, n_grid - 1)].set(value, mode="drop")
            return gi_ + due, saved_

        gi, saved = lax.while_loop(lambda c: jnp.any(rows_due(c)), write_row, (gi, state["saved"]))

        # 4. Bookkeeping: segment ends, failures, finished patients.
        counted = moving.astype(state["steps"].dtype)
        steps = state["steps"] + counted
        seg_steps = state["seg_steps"] + counted
        seg_acc = state["seg_acc"] + (keep & finite)
        seg_done = active & ((~moving) | (keep & finite & last))
        stalled = moving & (dt_next <= 1e-14 * jnp.maximum(jnp.abs(t), 1.0))
        status = jnp.where(keep & ~finite, STATUS_NONFINITE,
                           jnp.where(seg_steps > budget, STATUS_MAX_STEPS,
                                     jnp.where(stalled, STATUS_SOLVER_FAILED, STATUS_OK)))
        # Each segment begins with the previous one's mean accepted step, as the lock-step path.
        mean_step = jnp.clip((t_end - state["t_seg"]) / jnp.maximum(seg_acc, 1), 1e-6, None)
        dt_next = jnp.where(seg_done & (seg_acc > 0), mean_step, dt_next)
        patient_done = (seg_done & (k == n_times - 1)) | (active & (status != STATUS_OK))
        k = jnp.where(seg_done, k + 1, k)
        target = jnp.where(patient_done, p, n)
        new = dict(
            state, k=k, fresh=seg_done, t=jnp.where(seg_done, t_end, t_new), z=z_new, dt=dt_next, gi=gi,
            t_seg=jnp.where(seg_done, t_end, state["t_seg"]),
            seg_steps=jnp.where(seg_done, 0, seg_steps), seg_acc=jnp.where(seg_done, 0, seg_acc),
            steps=steps, status=status, prev_inv=prev_inv, viable=viable, saved=saved,
            out_status=state["out_status"].at[target].set(status, mode="drop"),
            out_steps=state["out_steps"].at[target].set(steps, mode="drop"),
            out_viable=state["out_viable"].at[target].set(viable, mode="drop"),
        )
        rank = jnp.cumsum(patient_done) - 1
        return load(new, patient_done & active, rank)

    z_init = jnp.zeros((b, n_state), system0.scale.dtype)
    state = dict(
        p=jnp.full((b,), n), k=jnp.zeros((b,), int), fresh=jnp.zeros((b,), bool), t=jnp.zeros((b,)),
        t_seg=jnp.zeros((b,)), z=z_init, dt=jnp.zeros((b,)), gi=jnp.zeros((b,), int),
        seg_steps=jnp.zeros((b,), int), seg_acc=jnp.zeros((b,), int), steps=jnp.zeros((b,), int),
        status=jnp.zeros((b,), int), prev_inv=jnp.ones((b,)), viable=jnp.zeros((b, n_lesions)),
        next=jnp.asarray(0), saved=jnp.zeros((n, n_grid, n_state), system0.scale.dtype),
        out_status=jnp.full((n,), STATUS_OK), out_steps=jnp.zeros((n,), int),
        out_viable=jnp.full((n, n_lesions), jnp.nan),
    )
    state = load(state, jnp.ones((b,), bool), jnp.arange(b))
    state = lax.while_loop(lambda s: jnp.any(s["p"] < n), body, state)

    def unflat(model, y0, zs):
        system = _flat_system(model, y0)
        return jax.vmap(lambda zz: model.apply_extinction(system.unravel(zz * system.scale)))(zs)

    ys = jax.vmap(unflat)(model_batch, y0_batch, state["saved"])
    return Trajectory(grid, ys, state["out_status"], state["out_viable"], state["out_steps"])


def _flat_index(like: State, key: str) -> np.ndarray:
    """Positions of state ``key`` in the flat vector ``ravel_pytree(like)`` (leaves in tree order)."""
    offset = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(like):
        size = int(np.prod(jnp.shape(leaf)))
        if path[0].key == key:
            return np.arange(offset, offset + size)
        offset += size
    raise KeyError(key)
