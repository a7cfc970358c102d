"""Which entries of a Jacobian can be non-zero, read from the function's jaxpr, and a colouring of
its columns so that the Jacobian costs one JVP per colour instead of one per state.

Why: Rodas4 (:mod:`qspjax.solver.rosenbrock`) forms a fresh Jacobian at every step, and for the 53-state
model that was 53 JVPs, a third of a step (``benchmarks/RESULTS.md``). The two-lesion model's
Jacobian has 290 structural non-zeros of 2,809 and at most 16 per row, so 16 JVPs recover it exactly: columns that
never share a row are probed together (Curtis, Powell & Reid, 1974) and each entry is read back
from the probe of its column's colour.

The pattern is *structural*: :func:`jacobian_sparsity` propagates, through every equation of the
jaxpr, the set of inputs each array element can depend on. It does not evaluate the function, so
it holds for every parameter value and state, and it is found at trace time from shapes alone
(inside ``jit``, ``vmap`` or a gradient). Where a primitive has no rule here, every output element
is taken to depend on every input the primitive sees: the pattern can only grow (more colours, a
slower but still exact Jacobian), never miss an entry. Branches (``select_n``, ``cond``) count all
their cases; loops (``scan``, ``while``) are iterated to a fixed point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

__all__ = ["coloured_jacobian", "coloured_entries", "column_colouring", "jacobian_sparsity"]

# Primitives whose derivative is zero (or whose output is discrete): no dependency flows through.
_NO_DERIVATIVE = frozenset({
    "stop_gradient", "sign", "floor", "ceil", "round", "eq", "ne", "lt", "le", "gt", "ge", "and", "or",
    "not", "xor", "is_finite", "argmax", "argmin", "iota", "population_count", "clz", "shift_left",
    "shift_right_logical", "shift_right_arithmetic", "random_bits", "random_seed", "random_wrap",
    "random_unwrap", "threefry2x32", "eq_to", "le_to", "lt_to", "mulhi",
})
# Each output is its input, unchanged.
_IDENTITY = frozenset({"optimization_barrier", "sharding_constraint", "device_put"})
# Elementwise primitives (operands broadcast against each other): an output element depends on
# the same element of every operand.
_ELEMENTWISE = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "neg", "max", "min", "pow", "integer_pow", "sqrt", "rsqrt",
    "cbrt", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "abs", "sin", "cos", "tan", "asin",
    "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "erf", "erfc", "erf_inv", "lgamma",
    "digamma", "square", "copy", "copy_p", "convert_element_type", "reduce_precision", "clamp", "nextafter",
    "real", "imag", "conj", "logaddexp",
})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})


def jacobian_sparsity(fn, x) -> np.ndarray:
    """``(m, n)`` booleans: entry ``[i, j]`` is ``False`` only if output ``i`` of ``fn`` cannot
    depend on input ``j`` for any input value. ``fn`` maps a 1-D array of ``n`` to one of ``m``;
    ``x`` (an array, tracer or ``ShapeDtypeStruct``) gives the input's shape and dtype."""
    if len(x.shape) != 1:
        raise ValueError(f"jacobian_sparsity: the input must be 1-D, got shape {tuple(x.shape)}")
    n = int(x.shape[0])
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(x.shape, x.dtype))
    consts = [_zeros(v.aval.shape, n) for v in closed.jaxpr.constvars]
    outs = _propagate(closed.jaxpr, consts, [np.eye(n, dtype=bool)], n)
    if len(outs) != 1 or outs[0].ndim != 2:
        raise ValueError("jacobian_sparsity: the function must return one 1-D array")
    return outs[0]


def column_colouring(pattern: np.ndarray) -> np.ndarray:
    """A colour per column (``(n,)`` ints from 0) such that no two columns of one colour have a
    non-zero in the same row: greedy, columns with the most conflicts first. The number of colours
    is at least the largest number of non-zeros in a row."""
    pattern = np.asarray(pattern, dtype=bool)
    return _colouring(pattern.tobytes(), pattern.shape).copy()


@functools.lru_cache(maxsize=64)
def _colouring(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    pattern = np.frombuffer(data, dtype=bool).reshape(shape)
    as_int = pattern.astype(np.int64)
    conflict = (as_int.T @ as_int) > 0
    np.fill_diagonal(conflict, False)
    colour = np.full(shape[1], -1, dtype=np.int64)
    for j in np.argsort(-conflict.sum(axis=1), kind="stable"):
        taken = set(colour[conflict[j]].tolist())
        c = 0
        while c in taken:
            c += 1
        colour[j] = c
    return colour


def coloured_jacobian(jvp, pattern: np.ndarray, dtype) -> jax.Array:
    """The dense ``(m, n)`` Jacobian from ``jvp`` (the linear map of :func:`jax.linearize`), one
    JVP per colour of :func:`column_colouring`; entries outside ``pattern`` are exactly zero."""
    pattern = np.asarray(pattern, dtype=bool)
    probes, colour = _probes(jvp, pattern, dtype)
    return jnp.where(pattern, probes[:, colour], jnp.zeros((), dtype))


def coloured_entries(jvp, pattern: np.ndarray, rows: np.ndarray, cols: np.ndarray, dtype) -> jax.Array:
    """The Jacobian's values at ``(rows[e], cols[e])`` (entries of ``pattern``) from ``jvp``, one
    JVP per colour of :func:`column_colouring`, without forming the dense matrix."""
    probes, colour = _probes(jvp, np.asarray(pattern, dtype=bool), dtype)
    return probes[np.asarray(rows), colour[np.asarray(cols)]]


def _probes(jvp, pattern: np.ndarray, dtype):
    """``jvp`` applied to one seed per colour: the ``(m, colours)`` compressed Jacobian, and the
    colour of each column."""
    n = pattern.shape[1]
    colour = column_colouring(pattern)
    k = int(colour.max()) + 1 if n else 0
    seeds = np.zeros((n, k))
    seeds[np.arange(n), colour] = 1.0
    return jax.vmap(jvp, in_axes=1, out_axes=1)(jnp.asarray(seeds, dtype=dtype)), colour


# ---------------------------------------------------------------------------------------------
# Dependency propagation. A dependency array has the value's shape plus a trailing axis of n
# booleans: which inputs that element can depend on.
# ---------------------------------------------------------------------------------------------
def _zeros(shape, n: int) -> np.ndarray:
    return np.zeros(tuple(shape) + (n,), dtype=bool)


def _differentiable(aval) -> bool:
    return hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.inexact)


def _propagate(jaxpr, const_deps, in_deps, n: int) -> list[np.ndarray]:
    env = {}

    def read(v):
        if isinstance(v, Literal):
            return _zeros(np.shape(v.val), n)
        return env[v]

    for var, dep in zip(jaxpr.constvars, const_deps):
        env[var] = dep
    for var, dep in zip(jaxpr.invars, in_deps):
        env[var] = dep
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = _rule(eqn, ins, n)
        if any(d.shape != tuple(v.aval.shape) + (n,) for d, v in zip(outs, eqn.outvars)):
            outs = _everything(ins, eqn, n)  # a rule that does not fit: fall back to the safe answer
        for var, dep in zip(eqn.outvars, outs):
            env[var] = dep if _differentiable(var.aval) else _zeros(var.aval.shape, n)
    return [read(v) for v in jaxpr.outvars]


def _union_broadcast(deps, shape, n: int) -> np.ndarray:
    out = _zeros(shape, n)
    for d in deps:
        out = out | np.broadcast_to(d, tuple(shape) + (n,))
    return out


def _everything(ins, eqn, n: int) -> list[np.ndarray]:
    """No rule: every output element depends on everything any input depends on."""
    seen = np.zeros(n, dtype=bool)
    for d in ins:
        if d.size:
            seen = seen | d.reshape(-1, n).any(axis=0)
    return [np.broadcast_to(seen, tuple(v.aval.shape) + (n,)) for v in eqn.outvars]


def _inner(eqn):
    """The sub-jaxpr (closed or not) of a call-like equation whose inputs are the equation's
    inputs, if any."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        jaxpr, _ = _closed(sub)
        if hasattr(jaxpr, "eqns") and len(jaxpr.invars) == len(eqn.invars):
            return sub
    return None


def _closed(sub):
    return (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())


def _run(sub, deps, n: int):
    jaxpr, consts = _closed(sub)
    return _propagate(jaxpr, [_zeros(np.shape(c), n) for c in consts], deps, n)


def _fixed_point(body, fixed, carry, n: int, extra=()):
    """Iterate ``carry -> carry | body(fixed, carry, extra)`` until it stops growing."""
    carry = [c.copy() for c in carry]
    while True:
        outs = _run(body, list(fixed) + carry + list(extra), n)
        grown = [c | o for c, o in zip(carry, outs[:len(carry)])]
        if all(np.array_equal(g, c) for g, c in zip(grown, carry)):
            return carry, outs[len(carry):]
        carry = grown


def _rule(eqn, ins, n: int) -> list[np.ndarray]:
    name = eqn.primitive.name
    params = eqn.params
    out_shapes = [tuple(v.aval.shape) for v in eqn.outvars]
    if name in _NO_DERIVATIVE:
        return [_zeros(s, n) for s in out_shapes]
    if name == "select_n":  # the predicate carries no derivative; every case may be chosen
        return [_union_broadcast(ins[1:], out_shapes[0], n)]
    if name in _ELEMENTWISE:
        return [_union_broadcast(ins, out_shapes[0], n)]
    if name == "reshape":
        return [ins[0].reshape(out_shapes[0] + (n,))]
    if name == "squeeze":
        return [np.squeeze(ins[0], axis=tuple(params["dimensions"]))]
    if name == "broadcast_in_dim":
        operand = ins[0]
        target = [1] * len(out_shapes[0])
        for i, dim in enumerate(params["broadcast_dimensions"]):
            target[dim] = operand.shape[i]
        return [np.broadcast_to(operand.reshape(tuple(target) + (n,)), out_shapes[0] + (n,))]
    if name in _REDUCTIONS:
        return [ins[0].any(axis=tuple(params["axes"]))]
    if name in _CUMULATIVE:
        axis, dep = params["axis"], ins[0]
        if params.get("reverse", False):
            return [np.flip(np.logical_or.accumulate(np.flip(dep, axis), axis=axis), axis)]
        return [np.logical_or.accumulate(dep, axis=axis)]
    if name == "transpose":
        perm = tuple(params["permutation"])
        return [np.transpose(ins[0], perm + (len(perm),))]
    if name == "rev":
        return [np.flip(ins[0], axis=tuple(params["dimensions"]))]
    if name == "slice":
        strides = params["strides"] or (1,) * len(params["start_indices"])
        index = tuple(slice(a, b, s) for a, b, s in zip(params["start_indices"], params["limit_indices"], strides))
        return [ins[0][index]]
    if name in _IDENTITY:
        return list(ins)
    if name == "stack":
        return [np.stack(ins, axis=params["axis"])]
    if name == "unstack":
        return list(np.moveaxis(ins[0], params["axis"], 0))
    if name == "tile":
        return [np.tile(ins[0], tuple(params["reps"]) + (1,))]
    if name == "concatenate":
        return [np.concatenate(ins, axis=params["dimension"])]
    if name == "split":
        cuts = np.cumsum(params["sizes"])[:-1]
        return list(np.split(ins[0], cuts, axis=params["axis"]))
    if name == "scan":
        c, k = params["num_consts"], params["num_carry"]
        consts, init, xs = ins[:c], ins[c:c + k], ins[c + k:]
        per_step = [x.any(axis=0) for x in xs]  # every iteration sees any slice
        carry, ys = _fixed_point(params["jaxpr"], consts, init, n, per_step)
        return carry + [np.broadcast_to(y[None], (params["length"],) + y.shape) for y in ys]
    if name == "while":
        cc, bc = params["cond_nconsts"], params["body_nconsts"]
        carry, _ = _fixed_point(params["body_jaxpr"], ins[cc:cc + bc], ins[cc + bc:], n)
        return carry
    if name == "cond":
        outs = None
        for branch in params["branches"]:
            got = _run(branch, ins[1:], n)
            outs = got if outs is None else [a | b for a, b in zip(outs, got)]
        return outs
    inner = _inner(eqn)
    if inner is not None:  # jit, custom_jvp_call, custom_vjp_call, checkpoint, ...
        return _run(inner, ins, n)
    return _everything(ins, eqn, n)
