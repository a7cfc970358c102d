"""What every solver path shares: the solver settings, the solved trajectory, the patient status
codes, the flat scaled form of the ODE and the treatment jumps applied at an event.

:mod:`qspjax.solver.simulate` (one patient's event timeline, lock-step batches) and
:mod:`qspjax.solver.queue` (the lane-refilling forward batch solver) both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import diffrax as dfx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from qspjax.model._base import State
from qspjax.model.composer import QSPModel
from qspjax.solver.rosenbrock import Rodas4, Rodas5P, _Rodas, finite_cotangents

STATUS_OK = 0
STATUS_MAX_STEPS = 1
STATUS_NONFINITE = 2
STATUS_SOLVER_FAILED = 3
STATUS_BASELINE_NOT_REACHED = 4
STATUS_NAMES = {
    STATUS_OK: "ok",
    STATUS_MAX_STEPS: "max_steps_reached",
    STATUS_NONFINITE: "non_finite_state",
    STATUS_SOLVER_FAILED: "solver_failed",
    STATUS_BASELINE_NOT_REACHED: "baseline_diameter_not_reached",
}

_SOLVERS = {"rodas4": Rodas4, "rodas5p": Rodas5P, "kvaerno5": dfx.Kvaerno5, "kvaerno3": dfx.Kvaerno3, "tsit5": dfx.Tsit5, "kencarp4": dfx.KenCarp4}


@dataclass(frozen=True)
class SolverConfig:
    """Solver settings. Tolerances act on states divided by their typical magnitude.

    ``solver`` is ``"rodas5p"`` (default; :class:`qspjax.solver.rosenbrock.Rodas5P`, a Rosenbrock method
    with no Newton iteration), ``"rodas4"`` (:class:`qspjax.solver.rosenbrock.Rodas4`) or one of diffrax's ``"kvaerno5"``, ``"kvaerno3"``,
    ``"kencarp4"`` (implicit Runge–Kutta; their stage equations are solved to
    ``newton_tol_factor`` times the step tolerances) and ``"tsit5"`` (explicit, for non-stiff
    checks). ``pcoeff``/``icoeff`` are the step-size controller's coefficients
    (:class:`diffrax.PIDController`); the default pure integral controller suits the Rodas methods, whose
    steps fail only on accuracy (measured over 400 days of nivolumab Q2W + SBRT, 8 patients,
    rtol 1e-5: 2,392 steps with PI coefficients 0.3/0.4, 1,674 with 0/1; final cancer cells
    within 4e-5 and 1.3e-4 of a 1e-8 solve). ``sparse_jacobian`` (Rodas only) forms each step's
    Jacobian from one JVP per colour of its structural sparsity pattern (16 for the two-lesion
    model, against 53 states; :mod:`qspjax.solver.sparsity`) rather than one per state: the same matrix.
    ``linear_solver`` (Rodas only): ``"auto"`` (default) factorises each step's matrix with the
    compiled sparse LU of :mod:`qspjax.solver.sparse_lu` where it can be built (CPU backend, a C++
    compiler), else with dense LAPACK; ``"sparse"`` or ``"dense"`` force one.
    ``batching`` says how :func:`qspjax.solver.simulate.simulate_batch` runs a batch:
    ``"queue"`` (:mod:`qspjax.solver.queue`: ``lanes`` patients step at once and a lane whose
    patient is done takes the next, forward only, Rosenbrock methods only), ``"lockstep"``
    (``jax.vmap`` of :func:`qspjax.solver.simulate.simulate_patient`: differentiable), or
    ``"auto"`` (default): the queue for concrete inputs with a Rosenbrock solver, lock-step when the
    inputs are traced (under ``jax.grad``, ``jit`` or ``vmap``) or the solver is another.
    ``lanes=None`` (default) takes 32 on a CPU (per lane-step cost flat from 32 lanes up, measured)
    and the whole batch on an accelerator. Measured (400 days, 256 patients, one core): the queue
    at 32 lanes solves 1.9x faster than lock-step chunks of 32 (``benchmarks/RESULTS.md``).
    ``checkpoint_segments`` (lock-step path, reverse mode): rematerialise each event segment's
    solve in the backward pass (``jax.checkpoint``) instead of storing every solve's residuals.
    ``autodiff``: ``"reverse"`` (default) or ``"forward"``, the mode the solves are differentiated
    in (:meth:`adjoint`); forward mode cannot be reverse-differentiated and vice versa.
    ``max_steps`` bounds one diffrax solve; a segment between two events may take up to
    ``max_restarts`` further solves of that budget (each continuing where the last stopped), so
    the total budget grows with the horizon instead of failing long follow-ups.
    """

    solver: str = "rodas5p"
    rtol: float = 1e-6
    atol: float = 1e-9
    max_steps: int = 4096
    max_restarts: int = 12
    pretreatment_max_days: float = 3650.0
    newton_tol_factor: float = 100.0
    first_step_days: float = 1e-3
    pcoeff: float = 0.0
    icoeff: float = 1.0
    sparse_jacobian: bool = True
    nonnegative: bool = True
    linear_solver: str = "auto"
    batching: str = "auto"
    lanes: int | None = None
    checkpoint_segments: bool = True
    autodiff: str = "reverse"

    def __post_init__(self):
        if self.autodiff not in ("reverse", "forward"):
            raise ValueError(f"autodiff {self.autodiff!r}: allowed 'reverse', 'forward'")
        if self.batching not in ("auto", "queue", "lockstep"):
            raise ValueError(f"batching {self.batching!r}: allowed 'auto', 'queue', 'lockstep'")
        if self.lanes is not None and int(self.lanes) < 1:
            raise ValueError(f"lanes {self.lanes!r}: allowed an integer >= 1, or None")

    def make_solver(self):
        try:
            cls = _SOLVERS[self.solver]
        except KeyError:
            raise ValueError(f"solver {self.solver!r}: allowed {sorted(_SOLVERS)}") from None
        if cls is dfx.Tsit5:
            return cls()
        if issubclass(cls, _Rodas):
            # The model's vector field does not depend on time.
            return cls(autonomous=True, sparse_jacobian=self.sparse_jacobian, nonnegative=self.nonnegative,
                       linear_solver=self.linear_solver, guard_cotangents=self.guard_cotangents)
        # The stage equations need to be solved only well inside the local error the controller
        # accepts (Hairer & Wanner's Radau5 stops Newton at ~0.03 of it). Solving them to the
        # controller's own tolerance made ~40 % of the steps fail on Newton, not on accuracy
        # (measured: 6,488 -> 3,760 steps over the 400-day reference at a factor of 100).
        f = self.newton_tol_factor
        return cls(root_finder=dfx.VeryChord(rtol=self.rtol * f, atol=self.atol * f))

    @property
    def guard_cotangents(self) -> bool:
        """Whether solves carry the reverse-mode guard against non-finite cotangents
        (:func:`qspjax.solver.rosenbrock.finite_cotangents`, a custom VJP): not in forward mode."""
        return self.autodiff == "reverse"

    def adjoint(self):
        """diffrax's differentiation rule for the solves: checkpointed reverse mode (default), or
        forward mode (:class:`diffrax.ForwardMode`: ``jax.jvp``/``jax.jacfwd`` through the solve,
        cheaper than reverse mode when the parameters are few)."""
        return dfx.ForwardMode() if self.autodiff == "forward" else dfx.RecursiveCheckpointAdjoint()

    def controller(self):
        # With Kvaerno5 a PI controller (pcoeff 0.3, icoeff 0.4) halved the rejected steps
        # (measured: 609 -> 317 steps over 14 days of nivolumab): most rejections there came from
        # the Newton iteration. Rodas4 has none; its default is the integral controller.
        return dfx.PIDController(rtol=self.rtol, atol=self.atol, pcoeff=self.pcoeff, icoeff=self.icoeff)


class Trajectory(NamedTuple):
    """A solved patient (or batch: leading patient axis on every array).

    ``ys`` holds every state on the schedule's output grid ``times`` (G, ...); at a grid day that
    is also an event day the state is the one after that day's jumps. ``status`` is one of
    ``STATUS_*``; ``viable_fraction_at_surgery`` (L,) is NaN for lesions not resected;
    ``num_steps`` counts solver steps (accepted and rejected) over the whole schedule.
    """

    times: jax.Array
    ys: State
    status: jax.Array
    viable_fraction_at_surgery: jax.Array
    num_steps: jax.Array


class _FlatSystem(NamedTuple):
    """The ODE on one flat vector z = ravel(y) / scale: implicit solvers then see one array
    rather than dozens of small leaves, which keeps compilation small and Newton steps cheap."""

    term: dfx.ODETerm
    scale: jax.Array
    unravel: object


def _flat_system(model: QSPModel, like: State, guard_cotangents: bool = True) -> _FlatSystem:
    flat_scale, unravel = ravel_pytree(model.scales())
    _, unravel_y = ravel_pytree(like)

    def vector_field(t, z, args):
        # A rejected trial step can evaluate the rates where they are not finite; its zero
        # cotangent must not turn into NaN on the parameters (see rosenbrock.finite_cotangents).
        # (Not under forward-mode differentiation, which cannot pass a custom VJP.)
        dy = (finite_cotangents(model) if guard_cotangents else model).rates(unravel_y(z * flat_scale))
        return ravel_pytree(dy)[0] / flat_scale

    return _FlatSystem(dfx.ODETerm(vector_field), flat_scale, unravel_y)


def _status_of(result):
    done = (result == dfx.RESULTS.successful) | (result == dfx.RESULTS.event_occurred)
    return jnp.where(
        done, STATUS_OK,
        jnp.where(result == dfx.RESULTS.max_steps_reached, STATUS_MAX_STEPS, STATUS_SOLVER_FAILED),
    )


def _all_finite(y: State):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(y)]))


def apply_events(model: QSPModel, y: State, event) -> tuple[State, jax.Array]:
    """Apply the treatment effects scheduled at one timeline point; returns (state, viable fraction)."""
    dose_mg, dose_kg, rt_gy, rt_sbrt, chemo_kill, resect = event
    p_rt = model.rt.p
    viable = y["C1"] / (y["C1"] + y["C_x"] + y["C_doomed"] + 1e-300)
    y = model.rt.surgery(y, resect)
    prescribed = jnp.max(rt_gy)
    blood = prescribed * (rt_sbrt * p_rt["blood_dose_fraction_sbrt"]
                          + (1.0 - rt_sbrt) * p_rt["blood_dose_fraction_conventional"])
    nodal = prescribed * (rt_sbrt * p_rt["ln_dose_fraction_sbrt"]
                          + (1.0 - rt_sbrt) * p_rt["ln_dose_fraction_conventional"])
    y = model.rt.fraction(y, rt_gy, blood, nodal)
    y = model.rt.chemotherapy(y, chemo_kill)
    y = model.dose(y, dose_mg + dose_kg * model.patient["body_weight_kg"])
    y = model.apply_extinction(y)
    return y, viable
