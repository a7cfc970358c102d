"""The compiled sparse LU (qspjax.solver.sparse_lu) against dense LAPACK, on the model's own matrices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from qspjax.solver import sparse_lu
from qspjax.solver.sparse_lu import SparseLU, minimum_degree_order

pytestmark = pytest.mark.skipif(not sparse_lu.available(), reason="no C++ compiler / XLA FFI headers here")


def test_minimum_degree_eliminates_an_arrowhead_without_fill():
    # A hub (state 0) coupled to every other state: eliminated first it fills the whole matrix,
    # eliminated last it fills nothing. Minimum degree keeps it to the end (the last two left
    # tie at one neighbour each).
    n = 12
    pattern = np.eye(n, dtype=bool)
    pattern[0, :] = pattern[:, 0] = True
    assert 0 in minimum_degree_order(pattern)[-2:]
    s = SparseLU.of(pattern)
    assert s.factor_entries == int(pattern.sum())
    assert s.multiply_adds == n - 1


@pytest.fixture(scope="module")
def model_matrices(params):
    """The two-lesion model's structural pattern and its Jacobian at three states."""
    from qspjax.model import QSPModel
    from qspjax.model.reference import state_from_species
    from qspjax.solver.simulate import _flat_system
    from qspjax.solver.sparsity import jacobian_sparsity

    model = QSPModel.from_values(params.model_values(), drugs=("nivolumab",), n_lesions=2)
    y_ref = state_from_species(model, params.initial_state)
    system = _flat_system(model, y_ref)
    z_ref = ravel_pytree(y_ref)[0] / system.scale
    f = lambda z: system.term.vf(0.0, z, None)  # noqa: E731
    pattern = jacobian_sparsity(f, z_ref)
    rng = np.random.default_rng(1)
    jac = jax.jit(jax.jacfwd(f))
    mats = [np.asarray(jac(z_ref * np.exp(rng.normal(0.0, 1.0, z_ref.shape[0])) + 0.01)) for _ in range(3)]
    return pattern, mats


@pytest.mark.parametrize("h", [1e-5, 0.05, 1.0, 50.0])
def test_solves_match_lapack_on_the_model_matrices(model_matrices, h):
    pattern, mats = model_matrices
    s = SparseLU.of(pattern)
    assert s.factor_entries < 0.2 * pattern.size  # 408 of 2,809 at the time of writing
    shift = 1.0 / (h * 0.21193756319429014)
    rng = np.random.default_rng(2)
    for j in mats:
        values = jnp.asarray(j[s.rows, s.cols])
        w = shift * np.eye(s.n) - j * pattern
        b = rng.normal(size=s.n)
        factors = s.factor(shift, values)
        x = np.asarray(s.solve(factors, shift, values, jnp.asarray(b)))
        # backward stable: the residual is round-off against |W| |x|
        assert np.max(np.abs(w @ x - b)) <= 1e-12 * np.max(np.abs(w) @ np.abs(x))
        xt = np.asarray(s._apply(s.kernels.solve_t_target, factors, jnp.asarray(b)))
        assert np.max(np.abs(w.T @ xt - b)) <= 1e-12 * np.max(np.abs(w.T) @ np.abs(xt))


def test_batched_and_differentiated_like_a_dense_solve(model_matrices):
    pattern, mats = model_matrices
    s = SparseLU.of(pattern)
    j = mats[0]
    values = jnp.asarray(j[s.rows, s.cols])
    b = jnp.asarray(np.random.default_rng(3).normal(size=s.n))
    weights = jnp.cos(jnp.arange(s.n))

    def sparse_loss(shift, values, b):
        return jnp.sum(weights * s.solve(s.factor(shift, values), shift, values, b))

    def dense_loss(shift, values, b):
        w = shift * jnp.eye(s.n) - jnp.zeros((s.n, s.n)).at[s.rows, s.cols].set(values)
        return jnp.sum(weights * jnp.linalg.solve(w, b))

    args = (jnp.asarray(4000.0), values, b)
    for got, want in zip(jax.grad(sparse_loss, (0, 1, 2))(*args), jax.grad(dense_loss, (0, 1, 2))(*args)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(want))))
    tangents = (jnp.asarray(1.0), 0.1 * values, b)
    np.testing.assert_allclose(jax.jvp(sparse_loss, args, tangents)[1], jax.jvp(dense_loss, args, tangents)[1],
                               rtol=1e-9)
    # vmap over a batch of shifts and right-hand sides: one kernel call over the batch
    shifts = jnp.asarray([10.0, 100.0, 4000.0])
    bs = jnp.stack([b, 2 * b, -b])
    xs = jax.vmap(lambda h, r: s.solve(s.factor(h, values), h, values, r))(shifts, bs)
    for h, r, x in zip(shifts, bs, xs):
        w = float(h) * np.eye(s.n) - j * pattern
        np.testing.assert_allclose(w @ np.asarray(x), np.asarray(r), atol=1e-9 * np.abs(np.asarray(r)).max())


# opt-in: two Rodas5P compilations (~50 s); the kernel is checked against LAPACK on the model's own
# matrices at four step sizes, batched and differentiated, by the default tests above
@pytest.mark.slow
def test_rodas_with_the_sparse_kernel_matches_lapack(reference_model, reference_state):
    """The QSP-IO reference patient just after a nivolumab dose, 5 days: the same steps and the
    same solution (to round-off amplified by the steps) with the compiled sparse LU as with
    LAPACK. (Every other solve of the suite runs through the sparse kernel, the default.)"""
    import diffrax as dfx

    from qspjax.solver.rosenbrock import Rodas5P
    from qspjax.solver.simulate import _flat_system

    y = reference_model.dose(dict(reference_state), 240.0)
    system = _flat_system(reference_model, y)
    z0 = ravel_pytree(y)[0] / system.scale
    out = {}
    for solver in ("sparse", "dense"):
        sol = dfx.diffeqsolve(system.term, Rodas5P(autonomous=True, nonnegative=True, linear_solver=solver), 0.0, 5.0,
                              1e-3, z0, stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-9, pcoeff=0.0, icoeff=1.0),
                              saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 5.0, 6)), max_steps=4096)
        out[solver] = (np.asarray(sol.ys), int(sol.stats["num_steps"]))
    assert abs(out["sparse"][1] - out["dense"][1]) <= 2 and out["sparse"][1] > 10
    np.testing.assert_allclose(out["sparse"][0], out["dense"][0], rtol=1e-7, atol=1e-10)


def test_an_unknown_linear_solver_is_refused():
    from qspjax.solver.rosenbrock import Rodas5P

    with pytest.raises(ValueError, match="linear_solver"):
        Rodas5P(linear_solver="klu")
