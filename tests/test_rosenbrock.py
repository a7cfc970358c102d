"""Rodas4 and Rodas5P (qspjax.solver.rosenbrock) on problems with known or independently computed solutions."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from qspjax.solver.rosenbrock import Rodas4, Rodas5P


def robertson(t, y, args):
    """Robertson's stiff kinetics, made time-dependent so the ∂f/∂t term is exercised."""
    y1, y2, y3 = y[0], y[1], y[2]
    rates = jnp.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2])
    return rates * (1.0 + 0.1 * jnp.sin(t))


def forced_oscillator(t, y, args):
    return jnp.stack([y[1], -y[0] + 0.3 * jnp.cos(t)])


@pytest.fixture(scope="module")
def oscillator_exact():
    sol = solve_ivp(lambda t, y: np.asarray(forced_oscillator(t, y, None)), (0.0, 2.0), [1.0, 0.0],
                    method="DOP853", rtol=1e-13, atol=1e-14, dense_output=True)
    return sol.sol


def _fixed(n, y0=(1.0, 0.0), autonomous=False, saveat=None, solver=Rodas4):
    return dfx.diffeqsolve(dfx.ODETerm(forced_oscillator), solver(autonomous=autonomous), 0.0, 2.0, 2.0 / n,
                           jnp.asarray(y0), max_steps=1000, saveat=saveat or dfx.SaveAt(t1=True))


def test_fourth_order_convergence(oscillator_exact):
    errors = [float(np.max(np.abs(np.asarray(_fixed(n).ys[-1]) - oscillator_exact(2.0)))) for n in (10, 20, 40, 80)]
    orders = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
    assert np.all(orders > 3.8) and np.all(orders < 4.3), orders


def test_rodas5p_fifth_order_with_a_fourth_order_dense_output(oscillator_exact):
    # The tableau (Steinebach 2023) is checked by its convergence: a wrong coefficient drops the
    # order of the solution or of the continuous extension.
    errors = [float(np.max(np.abs(np.asarray(_fixed(n, solver=Rodas5P).ys[-1]) - oscillator_exact(2.0))))
              for n in (5, 10, 20, 40)]
    orders = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
    assert np.all(orders > 4.7) and np.all(orders < 5.6), orders
    tt = np.linspace(0.0, 2.0, 33)[1:-1] - 0.013
    dense = []
    for n in (8, 16, 32):
        sol = _fixed(n, saveat=dfx.SaveAt(dense=True), solver=Rodas5P)
        dense.append(np.max(np.abs(np.asarray(jax.vmap(sol.evaluate)(jnp.asarray(tt))).T - oscillator_exact(tt))))
    assert np.all(np.log2(np.asarray(dense[:-1]) / np.asarray(dense[1:])) > 3.8), dense
    # Dropping ∂f/∂t of this time-dependent field costs Rodas5P its order too.
    right = float(np.max(np.abs(np.asarray(_fixed(20, solver=Rodas5P).ys[-1]) - oscillator_exact(2.0))))
    wrong = float(np.max(np.abs(np.asarray(_fixed(20, autonomous=True, solver=Rodas5P).ys[-1]) - oscillator_exact(2.0))))
    assert wrong > 100 * right


def test_time_dependence_needs_the_time_derivative(oscillator_exact):
    # Declaring this non-autonomous field autonomous drops ∂f/∂t: the method loses its order.
    right = float(np.max(np.abs(np.asarray(_fixed(40).ys[-1]) - oscillator_exact(2.0))))
    wrong = float(np.max(np.abs(np.asarray(_fixed(40, autonomous=True).ys[-1]) - oscillator_exact(2.0))))
    assert wrong > 100 * right


def test_dense_output_third_order(oscillator_exact):
    tt = np.linspace(0.0, 2.0, 33)
    errs = []
    for n in (8, 16):
        sol = _fixed(n, saveat=dfx.SaveAt(dense=True))
        errs.append(np.max(np.abs(np.asarray(jax.vmap(sol.evaluate)(jnp.asarray(tt))).T - oscillator_exact(tt))))
    assert np.log2(errs[0] / errs[1]) > 2.7  # the continuous extension is third order
    assert errs[1] < 2e-5


@pytest.mark.parametrize("solver", [Rodas4, Rodas5P])
@pytest.mark.parametrize("rtol", [1e-5, 1e-8])
def test_stiff_robertson_against_radau(rtol, solver):
    y0 = np.array([1.0, 0.0, 0.0])
    ref = solve_ivp(lambda t, y: np.asarray(robertson(t, y, None)), (0.0, 40.0), y0, method="Radau",
                    rtol=1e-12, atol=1e-16, dense_output=True)
    ts = np.linspace(0.0, 40.0, 9)
    sol = dfx.diffeqsolve(dfx.ODETerm(robertson), solver(), 0.0, 40.0, 1e-6, jnp.asarray(y0),
                          saveat=dfx.SaveAt(ts=jnp.asarray(ts)), max_steps=100_000,
                          stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol * 1e-4))
    want = ref.sol(ts).T
    rel = np.abs(np.asarray(sol.ys) - want) / (np.abs(want) + 1e-9)
    assert rel.max() < 20 * rtol
    # Mass is conserved by the method (linear invariants are kept by Rosenbrock methods).
    assert np.allclose(np.asarray(sol.ys).sum(axis=1), 1.0, atol=1e-12)
    assert int(sol.stats["num_steps"]) < (200 if rtol == 1e-5 else 800)


def test_pytree_state_and_gradient_against_finite_differences():
    def field(t, y, k):
        return {"a": -k * y["a"] * y["b"], "b": k * y["a"] - 50.0 * y["b"]}

    def final(k):
        sol = dfx.diffeqsolve(dfx.ODETerm(field), Rodas4(autonomous=True), 0.0, 3.0, 1e-3,
                              {"a": jnp.asarray(1.0), "b": jnp.asarray(0.0)}, args=k,
                              stepsize_controller=dfx.PIDController(rtol=1e-9, atol=1e-12), max_steps=10_000)
        return sol.ys["a"][-1] + 2.0 * sol.ys["b"][-1]

    k = 7.0
    grad = float(jax.grad(final)(k))
    eps = 1e-5
    fd = float((final(k + eps) - final(k - eps)) / (2 * eps))
    assert grad == pytest.approx(fd, rel=1e-5)


def test_forward_mode_derivative_through_a_stiff_solve_equals_reverse_mode():
    """SolverConfig(autodiff="forward") runs the solve under diffrax.ForwardMode with the reverse-mode
    cotangent guard (a custom VJP) off; jax.jacfwd through it must equal jax.grad through the
    default checkpointed reverse mode, for Rodas5P with the non-negative projection."""
    from qspjax.solver.core import SolverConfig

    def field(t, y, k):
        return jnp.stack([-k[0] * y[0] * y[1], k[0] * y[0] - k[1] * y[1], k[1] * y[1]])

    def final(k, config):
        sol = dfx.diffeqsolve(dfx.ODETerm(field), config.make_solver(), 0.0, 3.0, 1e-3, jnp.asarray([1.0, 0.0, 0.0]),
                              args=k, stepsize_controller=config.controller(), max_steps=10_000,
                              adjoint=config.adjoint())
        return sol.ys[-1, 0] + 2.0 * sol.ys[-1, 1]

    k = jnp.asarray([7.0, 50.0])
    forward = SolverConfig(rtol=1e-9, atol=1e-12, linear_solver="dense", autodiff="forward")
    reverse = SolverConfig(rtol=1e-9, atol=1e-12, linear_solver="dense")
    assert not forward.make_solver().guard_cotangents and reverse.make_solver().guard_cotangents
    g_fwd = np.asarray(jax.jit(jax.jacfwd(lambda kk: final(kk, forward)))(k))
    g_rev = np.asarray(jax.jit(jax.grad(lambda kk: final(kk, reverse)))(k))
    assert np.all(np.abs(g_rev) > 1e-4)
    np.testing.assert_allclose(g_fwd, g_rev, rtol=1e-8)  # measured 5.6e-10 (the solve's rtol is 1e-9)
    with pytest.raises(ValueError, match="autodiff"):
        SolverConfig(autodiff="adjoint")


def test_zero_length_step_is_finite():
    solver = Rodas4()
    term = dfx.ODETerm(forced_oscillator)
    y1, err, _, _, result = solver.step(term, 1.0, 1.0, jnp.asarray([1.0, 0.5]), None, None, False)
    assert np.all(np.isfinite(np.asarray(y1))) and np.all(np.isfinite(np.asarray(err)))


def _overshooting_solve(k, closed_over: bool):
    """dy/dt = -k y^1.5 from y = 1 with a first step of 1 day: the trial step overshoots to y < 0,
    where y^1.5 is NaN, and is rejected; y(T) = (1 + k T / 2)^-2."""
    from qspjax.solver.rosenbrock import finite_cotangents

    if closed_over:  # the parameter reaches the rates as a closed-over array, as the QSP model does
        field = lambda t, y, args: -finite_cotangents(k) * y**1.5
        args = None
    else:
        field = lambda t, y, kk: -kk * y**1.5
        args = k
    sol = dfx.diffeqsolve(dfx.ODETerm(field), Rodas4(autonomous=True), 0.0, 2.0, 1.0, jnp.asarray(1.0), args=args,
                          stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-10), max_steps=10_000)
    return sol.ys[-1], sol.stats["num_rejected_steps"]


@pytest.mark.parametrize("closed_over", [False, True])
def test_rejected_non_finite_trial_step_leaves_the_gradient_finite(closed_over):
    k = 30.0
    y, rejected = _overshooting_solve(k, closed_over)
    assert int(rejected) >= 1  # the NaN trial step happened and was thrown away
    assert float(y) == pytest.approx((1 + k) ** -2, rel=1e-6)
    grad = float(jax.grad(lambda kk: _overshooting_solve(kk, closed_over)[0])(k))
    assert grad == pytest.approx(-2 * (1 + k) ** -3, rel=1e-5)  # d/dk (1 + k T/2)^-2, T = 2


def _michaelis_menten(t, y, args):
    # A pool eliminated by saturable (zero-order) kinetics, K = 1e-4, feeding a second pool: the
    # exact solution stays >= 0; below -K the first rate law has passed its pole.
    k_m = 1e-4
    rate = y[0] / (k_m + y[0])
    return jnp.stack([-rate, 0.5 * rate - 0.1 * y[1]])


def test_nonnegative_projection_keeps_a_saturable_elimination_in_its_orthant():
    # At a loose tolerance the plain method steps across zero into the pole of y / (K + y) and
    # ends far below zero; with the projection (and the projection counted as error) every step
    # ends >= 0 and the fed pool matches Radau.
    ref = solve_ivp(lambda t, y: np.asarray(_michaelis_menten(t, jnp.asarray(y), None)), (0.0, 5.0),
                    [1.0, 0.0], method="Radau", rtol=1e-11, atol=1e-13)
    out = {}
    for nonneg in (False, True):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_michaelis_menten), Rodas4(autonomous=True, sparse_jacobian=False, nonnegative=nonneg),
            0.0, 5.0, 1e-3, jnp.array([1.0, 0.0]),
            stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3, pcoeff=0.0, icoeff=1.0),
            saveat=dfx.SaveAt(steps=True), max_steps=1000, throw=False)
        ys = np.asarray(sol.ys)
        out[nonneg] = ys[np.isfinite(ys[:, 0])]
    assert out[False][:, 0].min() < -1.0
    assert out[True].min() >= 0.0
    assert abs(out[True][-1, 1] - ref.y[1, -1]) < 2e-3 * ref.y[1, -1]
