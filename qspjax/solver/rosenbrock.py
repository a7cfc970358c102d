"""Linearly-implicit (Rosenbrock) solvers for diffrax: RODAS4 (Hairer & Wanner) and Rodas5P
(Steinebach), the default.

Why a Rosenbrock method: the model's implicit Runge–Kutta solve (diffrax ``Kvaerno5``) spent most
of its steps on failed simplified-Newton iterations, not on accuracy (profiled over 400 days of
nivolumab Q2W + SBRT: accepted steps carried error estimates of 0.001–0.03 of the tolerance while
the next step was cut five-fold because the chord iteration did not converge; each antibody dose
then restarted the step size from ~1e-4 day). A Rosenbrock method solves its stages as linear
systems with the exact Jacobian at the step's start: no iteration, nothing to fail, so the step
size follows the error estimate alone.

Why Rodas5P over RODAS4: between doses RODAS4's embedded third-order estimate overstated the
local error of the solution it propagates by ~50x on this model (against a Radau solve at rtol
1e-12), holding its steps at ~0.1 day where the dynamics move on a scale of days; Rodas5P's
order-4 estimate is ~10x closer and its steps ~3x longer, for 8 stages instead of 6. Measured
over 400 days at rtol 1e-6: 1,691 steps per patient against 2,742, 1.66x less time
(``benchmarks/RESULTS.md``).

Method: stiffly accurate, L-stable RODAS-type methods in the transformed form where the stage
increments ``U_i`` solve ``(I / (h γ) - J) U_i = f(t0 + c_i h, y0 + Σ a_ij U_j) + Σ (C_ij / h) U_j
+ h d_i ∂f/∂t``; the solution is the last stage's argument plus the last increment, which is also
the error estimate, and dense output is each method's own continuous extension. Coefficients:
Hairer & Wanner, *Solving Ordinary Differential Equations II*, 2nd ed., Springer 1996, §IV.7 (RODAS
code, METH = 1); G. Steinebach, BIT Numer. Math. 63, 27 (2023) (Rodas5P).

The solvers take one :class:`diffrax.ODETerm`; its state may be any pytree (it is flattened to
one vector for the linear algebra). Gradients flow through the Jacobian and the LU factors, so
reverse-mode differentiation gives the exact derivative of the discrete solution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax.flatten_util import ravel_pytree

from qspjax.solver import sparse_lu
from qspjax.solver.sparsity import coloured_entries, coloured_jacobian, jacobian_sparsity

@dataclass(frozen=True)
class RodasTableau:
    """Coefficients of a stiffly accurate Rosenbrock method in Hairer & Wanner's transformed form.

    Stage ``i`` (from 0) is evaluated at ``y0 + Σ_j a[i][j] U_j`` for ``i < len(a)``; every later
    stage at the previous stage's argument plus the previous increment (the stiffly accurate
    chain of the RODAS family), and the solution is the last stage's argument plus the last
    increment, which is also the error estimate. ``h`` holds the dense-output vectors'
    coefficients over the increments: ``y(θ) = (1-θ) y0 + θ [y1 + (1-θ)(K_1 + θ (K_2 + θ K_3 ...))]``.
    """

    name: str
    order: int
    gamma: float
    a: tuple
    c: tuple
    nodes: tuple
    d: tuple
    h: tuple

    @property
    def stages(self) -> int:
        return len(self.c)


# RODAS (order 4, embedded 3): Hairer & Wanner 1996, RODAS code, METH = 1.
RODAS4 = RodasTableau(
    name="Rodas4", order=4, gamma=0.25,
    a=(
        (),
        (1.544,),
        (0.9466785280815826, 0.2557011698983284),
        (3.314825187068521, 2.896124015972201, 0.9986419139977817),
        (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950),
    ),
    c=(
        (),
        (-5.6688,),
        (-2.430093356833875, -0.2063599157091915),
        (-0.1073529058151375, -9.594562251023355, -20.47028614809616),
        (7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160),
        (8.083246795921522, -7.981132988064893, -31.52159432874371, 16.31930543123136, -6.058818238834054),
    ),
    nodes=(0.0, 0.386, 0.21, 0.63, 1.0, 1.0),
    d=(0.25, -0.1043, 0.1035, -0.0362, 0.0, 0.0),
    h=(
        (10.12623508344586, -7.487995877610167, -34.80091861555747, -7.992771707568823, 1.025137723295662),
        (-0.6762803392801253, 6.087714651680015, 16.43084320892478, 24.76722511418386, -6.594389125716872),
    ),
)

# Rodas5P (order 5, embedded 4, 8 stages, 4th-order dense output): G. Steinebach, "Construction
# of Rosenbrock-Wanner method Rodas5P and numerical benchmarks within the Julia Differential
# Equations package", BIT Numer. Math. 63, 27 (2023); coefficients as tabulated there.
RODAS5P = RodasTableau(
    name="Rodas5P", order=5, gamma=0.21193756319429014,
    a=(
        (),
        (3.0,),
        (2.849394379747939, 0.45842242204463923),
        (-6.954028509809101, 2.489845061869568, -10.358996098473584),
        (2.8029986275628964, 0.5072464736228206, -0.3988312541770524, -0.04721187230404641),
        (-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256, 0.030198172008377946),
    ),
    c=(
        (),
        (-14.155112264123755,),
        (-17.97296035885952, -2.859693295451294),
        (147.12150275711716, -1.41221402718213, 71.68940251302358),
        (165.43517024871676, -0.4592823456491126, 42.90938336958603, -5.961986721573306),
        (24.854864614690072, -3.0009227002832186, 47.4931110020768, 5.5814197821558125, -0.6610691825249471),
        (30.91273214028599, -3.1208243349937974, 77.79954646070892, 34.28646028294783, -19.097331116725623,
         -28.087943162872662),
        (37.80277123390563, -3.2571969029072276, 112.26918849496327, 66.9347231244047, -40.06618937091002,
         -54.66780262877968, -9.48861652309627),
    ),
    nodes=(0.0, 0.6358126895828704, 0.4095798393397535, 0.9769306725060716, 0.4288403609558664, 1.0, 1.0, 1.0),
    d=(0.21193756319429014, -0.42387512638858027, -0.3384627126235924, 1.8046452872882734, 2.325825639765069,
       0.0, 0.0, 0.0),
    h=(
        (25.948786856663858, -2.5579724845846235, 10.433815404888879, -2.3679251022685204, 0.524948541321073,
         1.1241088310450404, 0.4272876194431874, -0.17202221070155493),
        (-9.91568850695171, -0.9689944594115154, 3.0438037242978453, -24.495224566215796, 20.176138334709044,
         15.98066361424651, -6.789040303419874, -6.710236069923372),
        (11.419903575922262, 2.8879645146136994, 72.92137995996029, 80.12511834622643, -52.072871366152654,
         -59.78993625266729, -0.15582684282751913, 4.883087185713722),
    ),
)


class RodasInterpolation(dfx.AbstractLocalInterpolation):
    """A RODAS method's continuous extension over one step (third order for Rodas4, fourth for
    Rodas5P): ``(1-θ) y0 + θ [y1 + (1-θ)(K_1 + θ (K_2 + θ K_3 ...))]``."""

    t0: jax.Array
    t1: jax.Array
    y0: object
    y1: object
    k: tuple

    def evaluate(self, t0, t1=None, left: bool = True):
        del left
        if t1 is not None:
            return jax.tree_util.tree_map(lambda a, b: a - b, self.evaluate(t1), self.evaluate(t0))
        span = self.t1 - self.t0
        theta = (t0 - self.t0) / jnp.where(span == 0, 1.0, span)

        def at(y0, y1, *k):
            poly = k[-1]
            for kj in reversed(k[:-1]):
                poly = kj + theta * poly
            return (1.0 - theta) * y0 + theta * (y1 + (1.0 - theta) * poly)

        return jax.tree_util.tree_map(at, self.y0, self.y1, *self.k)


@jax.custom_vjp
def _finite_cotangent_leaves(x):
    return x


def _fcl_fwd(x):
    return x, None


def _fcl_bwd(_, ct):
    return (jax.tree_util.tree_map(lambda c: jnp.where(jnp.isfinite(c), c, jnp.zeros_like(c)), ct),)


_finite_cotangent_leaves.defvjp(_fcl_fwd, _fcl_bwd)


def finite_cotangents(tree):
    """Identity on ``tree``; in reverse mode, non-finite cotangents of its float arrays become 0.

    A step the controller rejects is computed and thrown away: its result gets a zero cotangent,
    but a trial step that overshoots into a region where the right-hand side is not finite
    (a negative concentration under a fractional power, an overflow) turns that zero into NaN on
    the way back (0 * inf), and the NaN reaches the parameters' gradient although the step never
    counted. The true contribution of a rejected step is exactly zero, so zeroing non-finite
    cotangents at the step's inputs restores it. An accepted step with a non-finite right-hand side
    is already non-finite in the forward pass and ends the solve with a failed status.
    """
    dynamic, static = eqx.partition(tree, eqx.is_inexact_array)
    return eqx.combine(_finite_cotangent_leaves(dynamic), static)


class _Rodas(dfx.AbstractAdaptiveSolver):
    """A stiffly accurate Rosenbrock method of the RODAS family (its :class:`RodasTableau`).

    ``autonomous=True`` skips the ∂f/∂t term (one Jacobian-vector product per step) for vector
    fields that do not depend on time; leave it ``False`` otherwise. ``sparse_jacobian=True`` (the
    default) forms the Jacobian from one JVP per colour of its structural sparsity pattern
    (:mod:`qspjax.solver.sparsity`, read from the vector field's jaxpr at trace time) instead of one per
    state; the result is the same matrix. Use it with a :class:`diffrax.PIDController`; it has no
    Newton iteration and no root-finder settings.

    ``nonnegative=True`` keeps every component of the solution >= 0 for systems whose exact
    solution stays in the non-negative orthant (amounts, concentrations): a step's negative
    components are set to zero and the size of that projection joins the error estimate, so a
    step that overshoots below zero by more than the tolerance is rejected and retried shorter,
    while an excursion within the tolerance is projected away (Shampine, Thompson, Kierzenka &
    Byrne, "Non-negative solutions of ODEs", Appl. Math. Comput. 170, 2005, the projection used by
    MATLAB's ``NonNegative`` option). Without it, states that decay to zero (an extinct lesion's
    immune cells, the doomed-cell pools) drift to small negative values where saturating rate laws
    x / (K + x) are no longer monotone, and the step-size controller chatters.
    """

    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar = RodasInterpolation
    tableau: ClassVar[RodasTableau] = RODAS4
    autonomous: bool = eqx.field(static=True, default=False)
    sparse_jacobian: bool = eqx.field(static=True, default=True)
    nonnegative: bool = eqx.field(static=True, default=False)
    linear_solver: str = eqx.field(static=True, default="auto")
    # Reverse-mode cotangent guard (:func:`finite_cotangents`); a custom VJP, which forward-mode
    # differentiation (``SolverConfig(autodiff="forward")``) cannot pass through, so it is off there.
    guard_cotangents: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.linear_solver not in ("auto", "sparse", "dense"):
            raise ValueError(f"linear_solver {self.linear_solver!r}: allowed 'auto', 'sparse', 'dense'")

    def _sparse_lu(self) -> bool:
        if self.linear_solver == "dense" or not self.sparse_jacobian:
            return False
        if self.linear_solver == "sparse":
            return True
        return sparse_lu.available()

    def order(self, terms):
        # diffrax's error order for an ODE follows (the order of the embedded estimate, one less
        # than the method's, plus one)
        return self.tableau.order

    def init(self, terms, t0, t1, y0, args):
        return None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        tab = self.tableau
        if self.guard_cotangents:
            terms, t0, t1, y0, args = finite_cotangents((terms, t0, t1, y0, args))
        z0, unravel = ravel_pytree(y0)
        dtype = z0.dtype
        span = t1 - t0
        # A zero-length step (a masked lane under vmap, or t0 == t1) must not divide by zero:
        # its result is discarded, but a NaN here would poison reverse-mode gradients.
        h = jnp.where(span == 0, jnp.ones_like(span), span).astype(dtype)

        def f(t, z):
            return ravel_pytree(terms.vf(t, unravel(z), args))[0]

        def f_at_t0(z):
            return f(t0, z)

        f0, jvp = jax.linearize(f_at_t0, z0)
        n = z0.shape[0]
        if self.autonomous:
            ft = jnp.zeros_like(z0)
        else:
            ft = jax.jvp(lambda t: f(t, z0), (t0,), (jnp.ones_like(t0),))[1].astype(dtype)
        shift = 1.0 / (h * tab.gamma)
        if self._sparse_lu():
            # The compiled sparse elimination (qspjax.solver.sparse_lu) on the Jacobian's structural entries.
            pattern = jacobian_sparsity(f_at_t0, z0)
            slu = sparse_lu.SparseLU.of(pattern)
            values = coloured_entries(jvp, pattern, slu.rows, slu.cols, dtype)
            factors = slu.factor(shift, values)

            def solve(r):
                return slu.solve(factors, shift, values, r)
        else:
            if self.sparse_jacobian:
                jac = coloured_jacobian(jvp, jacobian_sparsity(f_at_t0, z0), dtype)
            else:
                jac = jax.vmap(jvp, out_axes=1)(jnp.eye(n, dtype=dtype))
            lu = jsl.lu_factor(jnp.eye(n, dtype=dtype) * shift - jac)

            def solve(r):
                return jsl.lu_solve(lu, r)

        us = []
        arg = z0
        for i in range(tab.stages):
            if i == 0:
                fi = f0
            else:
                if i < len(tab.a):
                    arg = z0 + sum(a * u for a, u in zip(tab.a[i], us))
                else:  # the stiffly accurate chain: the previous argument plus its increment
                    arg = arg + us[i - 1]
                fi = f(t0 + tab.nodes[i] * h, arg)
            rhs = fi + sum((c / h) * u for c, u in zip(tab.c[i], us))
            if tab.d[i] != 0.0 and not self.autonomous:
                rhs = rhs + (h * tab.d[i]) * ft
            us.append(solve(rhs))
        z1 = arg + us[-1]
        err = us[-1]
        if self.nonnegative:
            below = z1 < 0
            # (sqrt of a safe argument: where() differentiates both branches)
            err = jnp.where(below, jnp.sqrt(jnp.where(below, err * err + z1 * z1, 1.0)), err)
            z1 = jnp.where(below, jnp.zeros_like(z1), z1)
        ks = tuple(unravel(sum(c * u for c, u in zip(row, us))) for row in tab.h)
        dense = dict(y0=y0, y1=unravel(z1), k=ks)
        return unravel(z1), unravel(err), dense, None, dfx.RESULTS.successful


class Rodas4(_Rodas):
    """RODAS: a 6-stage, order-4(3), L-stable, stiffly accurate Rosenbrock method (Hairer &
    Wanner 1996), with a third-order dense output. Options as :class:`_Rodas`."""

    tableau: ClassVar[RodasTableau] = RODAS4


class Rodas5P(_Rodas):
    """Rodas5P: an 8-stage, order-5(4), L-stable, stiffly accurate Rosenbrock method (Steinebach
    2023), with a fourth-order dense output. Options as :class:`_Rodas`.

    Why it is here: on the QSP model at rtol 1e-6, Rodas4's embedded third-order estimate
    overstates the local error of the fourth-order solution it propagates by ~50x in the smooth
    phases between doses (measured against a Radau solve at rtol 1e-12, ``benchmarks/RESULTS.md``),
    so its steps are held ~5x shorter than the accuracy asks. Rodas5P was built to keep its order
    (and its embedded method's) on stiff problems where the classical RODAS coefficients lose it.
    """

    tableau: ClassVar[RodasTableau] = RODAS5P
