"""A linearly-implicit (Rosenbrock) solver for diffrax: RODAS4 of Hairer & Wanner.

Why: the model's implicit Runge–Kutta solve (diffrax ``Kvaerno5``) spends most of its steps on
failed simplified-Newton iterations, not on accuracy. Profiled over 400 days of nivolumab Q2W +
SBRT, accepted steps carried error estimates of 0.001–0.03 of the tolerance while the next step
was cut five-fold because the chord iteration (one Jacobian per step) did not converge on a step
of ~0.7 day; each antibody dose then restarted the step size from ~1e-4 day. A Rosenbrock method
solves its stages as linear systems with the exact Jacobian at the step's start: no iteration,
nothing to fail, so the step size follows the error estimate alone. See ``benchmarks/RESULTS.md``
for the measured effect.

Method: RODAS (order 4, embedded order 3, L-stable, stiffly accurate) with the coefficients of
Hairer & Wanner, *Solving Ordinary Differential Equations II*, 2nd ed., Springer 1996, §IV.7
(Table 7.2 and the RODAS Fortran code's dense output), in the transformed form where the stage
increments ``U_i`` solve ``(I / (h γ) - J) U_i = f(t0 + c_i h, y0 + Σ a_ij U_j) + Σ (C_ij / h) U_j
+ h d_i ∂f/∂t``. The solution is the last stage's argument plus ``U_6``, and ``U_6`` is the error
estimate. Dense output is the method's own third-order continuous extension.

The solver takes one :class:`diffrax.ODETerm`; its state may be any pytree (it is flattened to
one vector for the linear algebra). Gradients flow through the Jacobian and the LU factors, so
reverse-mode differentiation gives the exact derivative of the discrete solution.
"""

from __future__ import annotations

from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax.flatten_util import ravel_pytree

from qspjax.sparsity import coloured_jacobian, jacobian_sparsity

# RODAS coefficients (Hairer & Wanner 1996, RODAS code, METH=1).
_GAMMA = 0.25
_A = (
    (),
    (1.544,),
    (0.9466785280815826, 0.2557011698983284),
    (3.314825187068521, 2.896124015972201, 0.9986419139977817),
    (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950),
)
_C = (
    (),
    (-5.6688,),
    (-2.430093356833875, -0.2063599157091915),
    (-0.1073529058151375, -9.594562251023355, -20.47028614809616),
    (7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160),
    (8.083246795921522, -7.981132988064893, -31.52159432874371, 16.31930543123136, -6.058818238834054),
)
_C_NODES = (0.0, 0.386, 0.21, 0.63, 1.0, 1.0)
_D = (0.25, -0.1043, 0.1035, -0.0362, 0.0, 0.0)
# Dense output: y(θ) = (1 - θ) y0 + θ [y1 + (1 - θ)(K1 + θ K2)], K = H @ (U1..U5).
_H1 = (10.12623508344586, -7.487995877610167, -34.80091861555747, -7.992771707568823, 1.025137723295662)
_H2 = (-0.6762803392801253, 6.087714651680015, 16.43084320892478, 24.76722511418386, -6.594389125716872)


class RodasInterpolation(dfx.AbstractLocalInterpolation):
    """RODAS's continuous extension over one step (third order)."""

    t0: jax.Array
    t1: jax.Array
    y0: object
    y1: object
    k1: object
    k2: object

    def evaluate(self, t0, t1=None, left: bool = True):
        del left
        if t1 is not None:
            return jax.tree_util.tree_map(lambda a, b: a - b, self.evaluate(t1), self.evaluate(t0))
        span = self.t1 - self.t0
        theta = (t0 - self.t0) / jnp.where(span == 0, 1.0, span)

        def at(y0, y1, k1, k2):
            return (1.0 - theta) * y0 + theta * (y1 + (1.0 - theta) * (k1 + theta * k2))

        return jax.tree_util.tree_map(at, self.y0, self.y1, self.k1, self.k2)


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


class Rodas4(dfx.AbstractAdaptiveSolver):
    """RODAS: a 6-stage, order-4(3), L-stable, stiffly accurate Rosenbrock method.

    ``autonomous=True`` skips the ∂f/∂t term (one Jacobian-vector product per step) for vector
    fields that do not depend on time; leave it ``False`` otherwise. ``sparse_jacobian=True`` (the
    default) forms the Jacobian from one JVP per colour of its structural sparsity pattern
    (:mod:`qspjax.sparsity`, read from the vector field's jaxpr at trace time) instead of one per
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
    autonomous: bool = eqx.field(static=True, default=False)
    sparse_jacobian: bool = eqx.field(static=True, default=True)
    nonnegative: bool = eqx.field(static=True, default=False)

    def order(self, terms):
        return 4  # diffrax's error order for an ODE follows: the embedded error estimate is O(h^4)

    def init(self, terms, t0, t1, y0, args):
        return None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
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
        if self.sparse_jacobian:
            jac = coloured_jacobian(jvp, jacobian_sparsity(f_at_t0, z0), dtype)
        else:
            jac = jax.vmap(jvp, out_axes=1)(jnp.eye(n, dtype=dtype))
        if self.autonomous:
            ft = jnp.zeros_like(z0)
        else:
            ft = jax.jvp(lambda t: f(t, z0), (t0,), (jnp.ones_like(t0),))[1].astype(dtype)
        w = jnp.eye(n, dtype=dtype) / (h * _GAMMA) - jac
        lu = jsl.lu_factor(w)

        us = []
        arg = z0
        for i in range(6):
            if i == 0:
                fi = f0
            else:
                if i < 5:
                    arg = z0 + sum(a * u for a, u in zip(_A[i], us))
                else:  # stage 6 is evaluated at stage 5's argument plus U5
                    arg = arg + us[4]
                fi = f(t0 + _C_NODES[i] * h, arg)
            rhs = fi + sum((c / h) * u for c, u in zip(_C[i], us))
            if _D[i] != 0.0:
                rhs = rhs + (h * _D[i]) * ft
            us.append(jsl.lu_solve(lu, rhs))
        z1 = arg + us[5]
        err = us[5]
        if self.nonnegative:
            below = z1 < 0
            # (sqrt of a safe argument: where() differentiates both branches)
            err = jnp.where(below, jnp.sqrt(jnp.where(below, err * err + z1 * z1, 1.0)), err)
            z1 = jnp.where(below, jnp.zeros_like(z1), z1)
        k1 = sum(c * u for c, u in zip(_H1, us[:5]))
        k2 = sum(c * u for c, u in zip(_H2, us[:5]))
        dense = dict(y0=y0, y1=unravel(z1), k1=unravel(k1), k2=unravel(k2))
        return unravel(z1), unravel(err), dense, None, dfx.RESULTS.successful
