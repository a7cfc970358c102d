"""Solving the model: event segments, pre-treatment growth, batches of virtual patients.

One patient is solved by a ``lax.scan`` over the timeline of a compiled :class:`Schedule`: at each
point the instantaneous treatment effects (antibody bolus, RT fraction, chemotherapy cycle,
surgery) are applied exactly at their time, the state is recorded, and diffrax integrates the
ODE to the next point. The scan has a fixed length, so one compilation serves every regimen of
the same shape. A batch is either the same function under ``jax.vmap`` over the model's parameter
leaves and the initial states (lock-step, differentiable) or, for forward runs, the lane queue of
:mod:`qspjax.solver.queue` (``SolverConfig.batching``). The state is integrated divided by a typical magnitude per
state, so one absolute tolerance fits species from 1e-22 mol/L to 1e10 cells.
"""

from __future__ import annotations

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jax import lax
from jax.flatten_util import ravel_pytree

from qspjax.model._base import State
from qspjax.model.cancer import diameter_from_volume
from qspjax.model.composer import QSPModel
from qspjax.regimen import Schedule
from qspjax.solver import queue
from qspjax.solver.core import (  # noqa: F401  (the solver's settings and codes, used from here by callers)
    STATUS_BASELINE_NOT_REACHED,
    STATUS_MAX_STEPS,
    STATUS_NAMES,
    STATUS_NONFINITE,
    STATUS_OK,
    STATUS_SOLVER_FAILED,
    SolverConfig,
    Trajectory,
    _all_finite,
    _flat_system,
    _FlatSystem,
    _status_of,
    apply_events,
)


def _integrate_segment(model: QSPModel, system: _FlatSystem, z0, t0, t1, dt0, grid, saved, config: SolverConfig):
    """Integrate the flat system from t0 to t1, starting with step ``dt0``, and write the state at
    the ``grid`` days inside [t0, t1] into ``saved`` (G, n).

    A lesion whose cancer cells fall below the extinction threshold is set to zero (QSP-IO's
    event) at the end of the solver step in which it crossed: the solve stops there, the lesion
    is cleared, and the solve goes on. Each lesion can go extinct once, so ``n_lesions + 1`` solves
    cover a segment; a solve that spends its ``max_steps`` budget before ``t1`` is continued from
    where it stopped by up to ``config.max_restarts`` further solves, so a long treatment-free
    segment (PACIFIC's 1,848 days) is not cut short by a per-solve budget. Spare solves have
    t0 = t1 and cost nothing. A segment fails (``STATUS_MAX_STEPS``) only when every solve is spent.
    Returns (z(t1), saved, status, steps, accepted steps).
    """
    threshold = model.patient["extinction_threshold_cells"]

    def cancer_cells(z):
        return system.unravel(z * system.scale)["C1"]

    def fell_below(t, y, args, **kwargs):
        # ``y`` is the flat scaled state, ``args`` which lesions still had cancer cells.
        return jnp.any(args & (cancer_cells(y) < threshold))

    # A boolean event: the solve stops at the end of the step in which a lesion fell below the
    # threshold (within a fraction of a cell of it), with no root find. A root find located the
    # crossing more finely but its iterates could leave the step (Newton) or reject a crossing at
    # the step's end (bisection), failing whole patients for a sub-cell detail.
    event = dfx.Event(fell_below)

    def piece(_, carry):
        z, t_start, saved, status, steps, accepted, dt = carry
        alive = cancer_cells(z) > threshold
        # A failed segment is not integrated further: a zero-length solve.
        t_stop = jnp.where(status == STATUS_OK, t1, t_start)
        sol = dfx.diffeqsolve(
            system.term, config.make_solver(), t_start, t_stop, dt, z, args=alive,
            stepsize_controller=config.controller(), max_steps=config.max_steps, event=event, adjoint=config.adjoint(),
            saveat=dfx.SaveAt(subs=(dfx.SubSaveAt(ts=jnp.clip(grid, t_start, t_stop)), dfx.SubSaveAt(t1=True))),
            throw=False,
        )
        # Grid rows past an event time are not reached (inf) and are masked out.
        (_, t_end), (z_grid, z_end) = sol.ts, sol.ys
        t_end, z_end = t_end[-1], z_end[-1]
        inside = (grid >= t_start) & (grid <= t_end)
        saved = jnp.where(inside[:, None], z_grid, saved)
        y_end = model.apply_extinction(system.unravel(z_end * system.scale))
        z_end = ravel_pytree(y_end)[0] / system.scale
        # Running out of steps is not a failure while solves remain: the next one continues,
        # unless this solve spent its whole budget without advancing (a step size collapsed to
        # nothing: further solves would only repeat it, at max_steps each).
        out_of_steps = sol.result == dfx.RESULTS.max_steps_reached
        stalled = (t_end - t_start) <= 1e-9 * jnp.maximum(t1 - t0, 1.0)
        piece_status = jnp.where(out_of_steps & ~stalled, STATUS_OK, _status_of(sol.result))
        status = jnp.where(status == STATUS_OK, piece_status, status)
        n_accepted = sol.stats["num_accepted_steps"]
        # The continuation starts with this solve's mean accepted step, not a fresh search.
        dt = jnp.where(n_accepted > 0, jnp.clip((t_end - t_start) / jnp.maximum(n_accepted, 1), 1e-6, None), dt)
        return (z_end, t_end, saved, status, steps + sol.stats["num_steps"], accepted + n_accepted,
                lax.stop_gradient(dt))

    init = (z0, t0, saved, jnp.asarray(STATUS_OK), jnp.asarray(0), jnp.asarray(0), dt0)
    n_solves = model.n_lesions + 1 + config.max_restarts
    z1, t_reached, saved, status, steps, accepted, _ = lax.fori_loop(0, n_solves, piece, init)
    status = jnp.where((status == STATUS_OK) & (t_reached < t1), STATUS_MAX_STEPS, status)
    return z1, saved, status, steps, accepted


def simulate_patient(model: QSPModel, y0: State, schedule: Schedule, config: SolverConfig = SolverConfig()) -> Trajectory:
    """Solve one patient over the schedule (differentiable in ``model`` and ``y0``).

    A ``lax.scan`` runs over the event timeline: at each event day the jumps are applied, then
    diffrax integrates to the next event day, saving the output-grid days that fall inside by
    dense interpolation. The solver is restarted only at events, and each restart begins with
    the mean accepted step of the previous segment rather than a fresh step-size search.
    """
    times = schedule.times
    grid = schedule.output_days
    next_times = jnp.concatenate([times[1:], times[-1:]])
    events = schedule.events
    nan_lesions = jnp.full((model.n_lesions,), jnp.nan)
    system = _flat_system(model, y0, config.guard_cotangents)
    z_first = ravel_pytree(y0)[0] / system.scale
    saved0 = jnp.zeros(grid.shape + z_first.shape, z_first.dtype)

    def step(carry, xs):
        z, status, viable_at_surgery, steps, dt, saved = carry
        t, t_next, event = xs
        y, viable = apply_events(model, system.unravel(z * system.scale), event)
        viable_at_surgery = jnp.where(event[5] > 0, viable, viable_at_surgery)
        z = ravel_pytree(y)[0] / system.scale
        # A patient that already failed is not integrated further (a zero-length segment): its
        # status says so, and under vmap its batch no longer waits for it to exhaust max_steps
        # in every later segment.
        t_next = jnp.where(status == STATUS_OK, t_next, t)
        # Later segments overwrite a shared boundary day: the state recorded there is post-jump.
        z_next, saved, seg_status, seg_steps, accepted = _integrate_segment(
            model, system, z, t, t_next, dt, grid, saved, config)
        finite = jnp.all(jnp.isfinite(z_next)) & jnp.all(jnp.isfinite(saved))
        seg_status = jnp.where((seg_status == STATUS_OK) & ~finite, STATUS_NONFINITE, seg_status)
        status = jnp.where(status == STATUS_OK, seg_status, status)
        mean_step = (t_next - t) / jnp.maximum(accepted, 1)
        dt = jnp.where(accepted > 0, jnp.clip(mean_step, 1e-6, None), dt)
        return (z_next, status, viable_at_surgery, steps + seg_steps, lax.stop_gradient(dt), saved), None

    init = (z_first, jnp.asarray(STATUS_OK), nan_lesions, jnp.asarray(0), jnp.asarray(config.first_step_days),
            saved0)
    # Reverse mode keeps only each segment's carry and recomputes the segment's solve on the way
    # back: without it every one of a segment's solves kept its own copy of the output grid
    # (G x 53 per solve, n_lesions + 1 + max_restarts solves per segment), 77.9 GB for the
    # 12-arm objective at 32 patients x 372 days (benchmarks/RESULTS.md).
    body = jax.checkpoint(step) if config.checkpoint_segments else step
    (_, status, viable, steps, _, saved), _ = jax.lax.scan(body, init, (times, next_times, events))
    # A cleared lesion stays at zero; the implicit solver's round-off (~1e-21 cells) is not kept.
    ys = jax.vmap(lambda z: model.apply_extinction(system.unravel(z * system.scale)))(saved)
    return Trajectory(grid, ys, status, viable, steps)


def simulate_batch(model_batch: QSPModel, y0_batch: State, schedule: Schedule,
                   config: SolverConfig = SolverConfig(), *, devices=None) -> Trajectory:
    """Solve a batch of patients: a leading patient axis on every leaf of the model and states.

    Concrete inputs run on the lane queue of :mod:`qspjax.solver.queue` (``SolverConfig.batching``,
    forward only); traced inputs (inside ``jax.grad``, ``jit``) on ``vmap`` of
    :func:`simulate_patient`, which is differentiable. With more than one device (``devices``, default every device of the run: the local ones, or
    every process's after :func:`qspjax.solver.distributed.initialize`), the patient axis is split over
    them (:func:`over_devices`) and each device solves its own share; the result is the same as on
    one device, and complete on every process.
    """
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((model_batch, y0_batch)))
    if config.batching == "queue" or (config.batching == "auto" and not traced and queue.supports(config)):
        return over_devices(_simulate_queue_jit, (model_batch, y0_batch), (schedule, config), devices)
    return over_devices(_simulate_batch_jit, (model_batch, y0_batch), (schedule, config), devices)


def over_devices(fn, batch: tuple, static: tuple = (), devices=None):
    """``fn(*batch, *static, mesh)`` with the leading (patient) axis of ``batch``'s arrays split
    over ``devices`` (default ``jax.devices()``); ``mesh`` is ``None`` on one device.

    ``fn`` (a jitted batch solver such as :func:`_simulate_batch_jit`) is expected to run its
    per-device work under :func:`per_device`, so that each device steps its own patients in its
    own loop. A batch whose size does not divide by the device count is padded with copies of its
    last patient, and the copies are dropped from the result.

    Across several processes (``jax.distributed``) every process passes the whole batch (cohorts
    are drawn from a seed, so each can build it), its devices solve their share, and every process
    gets the whole result back (an all-gather). Inside a traced function (the calibration
    objective) the result stays a traced global array.
    """
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) == 1:
        return fn(*batch, *static, None)
    from jax.sharding import Mesh

    n = _batch_size(batch)
    pad = (-n) % len(devices)
    batch = _pad_batch(batch, pad)
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(batch))
    mesh = Mesh(np.asarray(devices), ("patients",))
    out = fn(*shard_patients(batch, mesh), *static, mesh)
    if jax.process_count() > 1 and not traced:
        from jax.experimental import multihost_utils

        out = jax.tree_util.tree_map(jnp.asarray, multihost_utils.process_allgather(out, tiled=True))
    if pad:
        out = jax.tree_util.tree_map(lambda x: x[:n] if _batched(x) else x, out)
    return out


def over_processes(fn, batch: tuple):
    """``fn(*batch)`` with the leading (patient) axis of ``batch``'s arrays split between the
    processes of a ``jax.distributed`` run, each process computing its own slice on its default
    device, and every process getting the whole result back (an all-gather). With one process, or
    inside a traced function, just the call.

    For batched work that cannot run under ``shard_map`` (the pre-treatment growth, whose
    root-found stop event does not trace there) but that every process would otherwise repeat in
    full. Every array leaf of ``fn``'s result must carry the patient axis first. A batch that does
    not divide by the process count is padded with copies of its last patient, dropped again.
    """
    leaves = jax.tree_util.tree_leaves(batch)
    k = jax.process_count()
    if k == 1 or any(isinstance(x, jax.core.Tracer) for x in leaves):
        return fn(*batch)
    from jax.experimental import multihost_utils

    n = _batch_size(batch)
    per = -(-n // k)
    pad = per * k - n

    start = jax.process_index() * per
    mine = jax.tree_util.tree_map(lambda x: x[start:start + per] if _batched(x) else x, _pad_batch(batch, pad))
    out = fn(*mine)
    out = multihost_utils.process_allgather(out, tiled=True)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[:n], out)


def _pad_batch(batch, pad: int):
    """``batch`` with ``pad`` copies of its last patient appended to every batched leaf."""
    if not pad:
        return batch
    return jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if _batched(x) else x, batch)


def _batched(x) -> bool:
    return eqx.is_array(x) and x.ndim > 0


def _batch_size(tree) -> int:
    sizes = {int(x.shape[0]) for x in jax.tree_util.tree_leaves(tree) if _batched(x)}
    if len(sizes) != 1:
        raise ValueError(f"the arrays of a batch must share one leading (patient) axis; got sizes {sorted(sizes)}")
    return sizes.pop()


def per_device(fn, mesh, batch: tuple, shared: tuple = ()):
    """``fn(*batch, *shared)`` for a patient batch, each device of ``mesh`` running it on its
    own shard (``jax.shard_map``); with ``mesh`` ``None``, just the call. ``shared`` arrays (a
    schedule) are the same on every device.

    Why not a plain ``vmap`` over a sharded axis: a vmapped adaptive solve is a ``while_loop``
    whose condition asks whether *any* patient still runs; partitioned over devices, that is an
    all-reduce across devices at every solver step, so every device steps in lock-step with the
    slowest patient anywhere. Under ``shard_map`` each device's loop ends when its own patients
    are done, with no communication at all until the results are gathered.
    """
    if mesh is None:
        return fn(*batch, *shared)
    from jax.sharding import PartitionSpec as P

    dyn, stat = eqx.partition((batch, shared), eqx.is_array)
    specs = (jax.tree_util.tree_map(_patient_spec, dyn[0]), jax.tree_util.tree_map(lambda _: P(), dyn[1]))

    def local(d):
        b, s = eqx.combine(d, stat)
        return fn(*b, *s)

    out_specs = jax.tree_util.tree_map(_patient_spec, jax.eval_shape(local, dyn))
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out_specs, check_vma=False)(dyn)


def shard_patients(tree, mesh):
    """Place every array leaf of ``tree`` on ``mesh`` (one axis, ``patients``) with its leading
    (patient) axis split over the devices, scalars replicated (:func:`_patient_spec`); the caller
    (:func:`over_devices`) has padded the patient axis to a multiple of the device count. The mesh
    may span processes: each process then fills its own devices' shards from its copy of the leaf."""
    from jax.sharding import NamedSharding

    multi_process = len({d.process_index for d in mesh.devices.flat}) > 1

    def put(x):
        if not eqx.is_array(x):
            return x
        sharding = NamedSharding(mesh, _patient_spec(x))
        if isinstance(x, jax.core.Tracer):
            return jax.lax.with_sharding_constraint(x, sharding)
        if multi_process:
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, tree)


def _patient_spec(x):
    """How a leaf lies on the ``patients`` mesh: split along its leading axis, or (a scalar) whole."""
    from jax.sharding import PartitionSpec

    return PartitionSpec("patients") if x.ndim > 0 else PartitionSpec()


@eqx.filter_jit
def _simulate_batch_jit(model_batch, y0_batch, schedule, config, mesh=None):
    def solve(models, y0s, sched):
        return jax.vmap(lambda m, y: simulate_patient(m, y, sched, config))(models, y0s)

    return per_device(solve, mesh, (model_batch, y0_batch), (schedule,))


@eqx.filter_jit
def _simulate_queue_jit(model_batch, y0_batch, schedule, config, mesh=None):
    def solve(models, y0s, sched):
        lanes = config.lanes
        if lanes is None:  # CPU: per lane-step cost is flat from 32 lanes; an accelerator: all at once
            lanes = 32 if jax.default_backend() == "cpu" else jax.tree_util.tree_leaves(y0s)[0].shape[0]
        return queue.simulate_queue(models, y0s, sched, config, lanes)

    return per_device(solve, mesh, (model_batch, y0_batch), (schedule,))


# ---------------------------------------------------------------------------------------------
# Pre-treatment growth to the baseline diameter
# ---------------------------------------------------------------------------------------------
def untreated_seed_state(model: QSPModel, reference_state: State) -> State:
    """The state a pre-treatment growth starts from.

    Systemic T-cell, APC and MHC pools keep the reference (tumor-bearing QSP-IO) values, the
    lesions hold ``seed_cancer_cells`` cancer cells and nothing else, and the tumor-derived
    antigen, activated T cells and drugs are zero.
    """
    y = dict(reference_state)
    seed = model.patient["seed_cancer_cells"]
    n = model.n_lesions
    zeros_l = jnp.zeros(n)
    for k in ("C_x", "C_doomed", "C_doomed_icd", "T_exh", "T1_T", "T0_T", "mAPC_T", "pdl1_rt"):
        y[k] = zeros_l
    for k in ("ab_C", "ab_P", "ab_LN", "ab_T"):
        y[k] = jnp.zeros_like(reference_state[k])
    for k in ("P0_e", "p0_e", "P1_e", "p1_e", "M1p0_e", "M1p1_e", "M1p0_s", "M1p1_s", "aT1_LN", "aT0_LN"):
        y[k] = jnp.zeros_like(reference_state[k])
    y["C1"] = jnp.full((n,), 1.0) * seed
    volume = model.lesion_volume(y)
    y["APC_T"] = model.antigen.p["APC0_T"] * volume
    y["c_T"] = jnp.full((n,), 1.0) * model.antigen.p["c0"]
    return y


def grow_to_baseline(model: QSPModel, y_seed: State, target_diameter_cm, config: SolverConfig = SolverConfig()):
    """Integrate the untreated model until the largest lesion reaches ``target_diameter_cm``.

    Lesion sizes are set by their seeds' ratio; growth stops on a root-found event. Returns
    (state at baseline, status, days of growth). Differentiable in the model parameters.
    """
    system = _flat_system(model, y_seed, config.guard_cotangents)

    def cond_fn(t, y, args, **kwargs):
        y = system.unravel(y * system.scale)
        return jnp.max(diameter_from_volume(model.lesion_volume(y))) - target_diameter_cm

    event = dfx.Event(cond_fn, root_finder=optx.Newton(rtol=1e-8, atol=1e-8))
    z0 = ravel_pytree(y_seed)[0] / system.scale
    sol = dfx.diffeqsolve(
        system.term, config.make_solver(), 0.0, config.pretreatment_max_days, None, z0,
        stepsize_controller=config.controller(), max_steps=4 * config.max_steps, adjoint=config.adjoint(),
        saveat=dfx.SaveAt(t1=True), event=event, throw=False,
    )
    y = system.unravel(sol.ys[-1] * system.scale)
    reached = sol.result == dfx.RESULTS.event_occurred
    status = jnp.where(reached, STATUS_OK,
                       jnp.where(sol.result == dfx.RESULTS.max_steps_reached, STATUS_MAX_STEPS,
                                 STATUS_BASELINE_NOT_REACHED))
    status = jnp.where((status == STATUS_OK) & ~_all_finite(y), STATUS_NONFINITE, status)
    return y, status, sol.ts[-1]
