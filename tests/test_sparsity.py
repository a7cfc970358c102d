"""Structural Jacobian sparsity (qspjax.solver.sparsity) and the coloured Jacobian Rodas4 uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from qspjax.solver.sparsity import coloured_jacobian, column_colouring, jacobian_sparsity


def _coloured(f, x):
    _, jvp = jax.linearize(f, x)
    return coloured_jacobian(jvp, jacobian_sparsity(f, x), x.dtype)


def test_tridiagonal_pattern_needs_three_colours():
    def f(x):
        inner = x[:-2] - 2.0 * x[1:-1] ** 2 + jnp.sin(x[2:])
        return jnp.concatenate([x[:1] * x[1:2], inner, x[-1:] ** 3])

    x = jnp.linspace(0.1, 1.0, 9)
    pattern = jacobian_sparsity(f, x)
    expected = np.zeros((9, 9), bool)
    expected[0, :2] = True
    for i in range(1, 8):
        expected[i, i - 1:i + 2] = True
    expected[8, 8] = True
    np.testing.assert_array_equal(pattern, expected)
    assert column_colouring(pattern).max() + 1 == 3
    np.testing.assert_allclose(_coloured(f, x), jax.jacfwd(f)(x), rtol=1e-14, atol=0)


def test_branches_count_every_case_but_not_the_predicate_and_stop_gradient_cuts():
    def f(x):
        pick = jnp.where(x[0] > 0.0, x[1], x[2])
        frozen = jax.lax.stop_gradient(x[3]) * x[4]
        return jnp.stack([pick, frozen, x[0] * 0.0])

    pattern = jacobian_sparsity(f, jnp.ones(5))
    np.testing.assert_array_equal(pattern, [[0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]])


def test_loops_reach_a_fixed_point():
    def running_sum(x):
        def body(acc, xi):
            acc = acc + xi
            return acc, acc
        return jax.lax.scan(body, jnp.zeros(()), x)[1]

    x = jnp.arange(1.0, 6.0)
    # Iterations are not told apart: every output may depend on every slice (a superset).
    assert jacobian_sparsity(running_sum, x).all()

    def shift_three_times(x):
        return jax.lax.fori_loop(0, 3, lambda _, v: v + jnp.roll(v, 1), x)

    pattern = jacobian_sparsity(shift_three_times, jnp.ones(6))
    assert pattern.all()  # the dependency spreads around the ring until it covers every input
    y = jnp.arange(1.0, 7.0)
    np.testing.assert_allclose(_coloured(shift_three_times, y), jax.jacfwd(shift_three_times)(y), rtol=1e-14)


_EXACT = {
    "tile": lambda x: jnp.tile(x[:2], 2) * x[2:6],
    "stack_unstack": lambda x: jnp.stack([x[2] * x[0], x[1] ** 2])[::-1],
    "reshape_transpose": lambda x: (x.reshape(2, 3).T * jnp.arange(1.0, 4.0)[:, None]).reshape(-1),
    "reduce_broadcast": lambda x: (x.reshape(2, 3).sum(axis=1)[:, None] * jnp.ones((2, 2))).reshape(-1),
    "cumsum_rev": lambda x: jnp.cumsum(x[::-1][:4])[1:],
    "barrier": lambda x: jnp.concatenate(jax.lax.optimization_barrier((x[:2], x[3:] * 2.0))),
    "cond": lambda x: jax.lax.cond(x[0] > 0, lambda v: v[1:3] * 2.0, lambda v: v[2:4] ** 2, x),
}


@pytest.mark.parametrize("name", sorted(_EXACT))
def test_structural_rules_match_the_dense_jacobian(name):
    """For these functions the pattern is exact: it equals the dense Jacobian's non-zeros at a
    generic point (except 'cond', whose pattern is both branches' union)."""
    f = _EXACT[name]
    x = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, 6))
    pattern = jacobian_sparsity(f, x)
    dense = np.asarray(jax.jacfwd(f)(x))
    if name == "cond":
        assert pattern.sum() == 4 and (dense != 0).sum() == 2 and not (dense != 0)[~pattern].any()
    else:
        np.testing.assert_array_equal(pattern, dense != 0)
    np.testing.assert_allclose(_coloured(f, x), dense, rtol=1e-14)


def test_primitive_without_a_rule_is_taken_as_dense():
    f = lambda x: jnp.sort(x) * 2.0  # 'sort' has no rule here
    x = jnp.array([3.0, 1.0, 2.0])
    assert jacobian_sparsity(f, x).all()
    np.testing.assert_allclose(_coloured(f, x), jax.jacfwd(f)(x), rtol=1e-14)


def test_input_must_be_one_dimensional():
    with pytest.raises(ValueError, match="1-D"):
        jacobian_sparsity(lambda x: x.sum(0), jnp.ones((2, 2)))


def test_model_jacobian_is_exact_and_sparse(params, drugs=("nivolumab", "ipilimumab"), n_lesions=2):
    """The QSP model's structural pattern (two lesions, both antibodies) covers every non-zero of
    its dense Jacobian at random states (drugs present), and the coloured Jacobian equals the
    dense one. (Every solve of the other tests also runs through the coloured Jacobian.)"""
    from qspjax.model import QSPModel
    from qspjax.model.reference import state_from_species
    from qspjax.solver.simulate import _flat_system

    model = QSPModel.from_values(params.model_values(), drugs=drugs, n_lesions=n_lesions)
    y_ref = state_from_species(model, params.initial_state)
    system = _flat_system(model, y_ref)
    scale = system.scale
    z_ref = ravel_pytree(y_ref)[0] / scale
    f = lambda z: system.term.vf(0.0, z, None)
    pattern = jacobian_sparsity(f, z_ref)
    n = z_ref.shape[0]
    colours = int(column_colouring(pattern).max()) + 1
    # Greedy colouring: at least the densest row's count (16 here), at most a colour or two more.
    assert pattern.sum(axis=1).max() <= colours <= pattern.sum(axis=1).max() + 2
    assert colours <= 20, f"{colours} colours for {n} states: the pattern has become denser"
    rng = np.random.default_rng(0)
    dense_jac, coloured_jac = jax.jit(jax.jacfwd(f)), jax.jit(lambda z: _coloured(f, z))
    for _ in range(3):
        z = z_ref * np.exp(rng.normal(0.0, 1.0, n)) + rng.uniform(0.0, 0.1, n)  # every state > 0
        dense = np.asarray(dense_jac(z))
        assert np.isfinite(dense).all()
        assert not (dense != 0)[~pattern].any(), "a non-zero Jacobian entry outside the structural pattern"
        got = np.asarray(coloured_jac(z))
        np.testing.assert_allclose(got, dense, rtol=1e-11, atol=1e-13 * np.abs(dense).max())


def test_rodas4_sparse_and_dense_jacobians_give_the_same_solution():
    import diffrax as dfx

    from qspjax.solver.rosenbrock import Rodas4

    def robertson(t, y, args):
        a, b, c = y
        return jnp.stack([-0.04 * a + 1e4 * b * c, 0.04 * a - 1e4 * b * c - 3e7 * b**2, 3e7 * b**2])

    def solve(sparse):
        return dfx.diffeqsolve(dfx.ODETerm(robertson), Rodas4(sparse_jacobian=sparse), 0.0, 100.0, 1e-4,
                               jnp.array([1.0, 0.0, 0.0]), stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-12),
                               saveat=dfx.SaveAt(t1=True)).ys[-1]

    np.testing.assert_allclose(solve(True), solve(False), rtol=1e-13, atol=1e-20)
