"""Quasi-steady states of fast equilibria: a bracketed root with implicit-function gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def monotone_root(residual, lo, hi, iterations: int = 80, name: str | None = None):
    """Root of an increasing ``residual(x)`` on ``[lo, hi]`` (elementwise over arrays).

    ``name`` labels the root for the SBML export (a module solving several roots names each);
    it does not change the result.

    Bisection locates the root without gradients; one Newton step from it then carries the
    exact implicit-function derivative dx/dθ = -r_θ / r_x with respect to anything ``residual``
    closes over, at the cost of one extra evaluation.
    """
    lo0, hi0 = lax.stop_gradient(lo), lax.stop_gradient(hi)
    res_nograd = lambda x: lax.stop_gradient(residual(x))

    def body(_, bounds):
        a, b = bounds
        mid = 0.5 * (a + b)
        up = res_nograd(mid) > 0.0
        return jnp.where(up, a, mid), jnp.where(up, mid, b)

    a, b = lax.fori_loop(0, iterations, body, (lo0, hi0))
    x = lax.stop_gradient(0.5 * (a + b))
    r, dr = jax.jvp(residual, (x,), (jnp.ones_like(x),))
    step = jnp.where(dr > 0.0, r / jnp.where(dr > 0.0, dr, 1.0), 0.0)
    return x - step
