"""Sparse LU of ``shift * I - J`` for a Jacobian ``J`` of fixed sparsity, as a compiled CPU kernel.

Why: every Rodas step factorises ``W = I / (h γ) - J`` and solves one system per stage with it.
Measured inside the step loop (``benchmarks/RESULTS.md``), LAPACK's dense 53 × 53 LU and the
triangular solves were two thirds of a step, yet the two-lesion model's ``J`` has 290 structural
non-zeros of 2,809. Ordered by minimum degree, its factors hold 408 entries and cost 665
multiply-adds (dense: ~50,000), a solve 355 (dense: 2,809). Emitted as JAX operations that saving
is lost (XLA runs each scalar operation as its own kernel on the CPU: slower than LAPACK and a
minute of compilation), so the elimination sequence is written out as C++ once per sparsity
pattern, compiled with the system's C++ compiler into an XLA FFI handler, and called over the whole
patient batch.

How: the pattern is known at trace time (:func:`qspjax.solver.sparsity.jacobian_sparsity`). The symbolic
work is done once in NumPy: a minimum-degree order of the symmetrised pattern (Tinney & Walker
1967; the greedy form of George & Liu 1989), the fill it causes, and the straight-line sequence of
divisions and multiply-adds of the factorisation and of the forward and backward solves (KLU's
refactorisation and ModelingToolkit's generated sparse code work the same way). The source goes to
a cache directory named by its hash, is compiled once (a few seconds) and loaded with ``ctypes``.

Pivots are static (the diagonal, in minimum-degree order), as in KLU's ``refactor``. For the
Rosenbrock matrix this is safe where it matters: ``W``'s diagonal is ``1 / (h γ) - J_ii`` and the
model's diagonal entries ``J_ii`` are decay rates (<= 0), so the diagonal is dominated by
``1 / (h γ)`` on short steps and stays positive on long ones. Should a pivot nevertheless vanish,
the step's result is not finite and the step-size controller retries a shorter step, where the
shift dominates. Agreement with LAPACK's partially pivoted LU is tested on the model's own
matrices (``tests/test_sparse_lu.py``).

Derivatives: :meth:`SparseLU.solve` is a :func:`jax.lax.custom_linear_solve` whose matrix is
given as a matrix-vector product over ``J``'s entries, so forward and reverse mode differentiate
it exactly (the kernel itself is only ever applied to values, never differentiated), with the
transposed system solved by the same factors.

Where the kernel cannot be built (no C++ compiler, no XLA FFI headers) or the backend is not the
CPU, :func:`available` is false and callers use the dense LAPACK path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SparseLU", "available", "minimum_degree_order"]


def minimum_degree_order(pattern: np.ndarray) -> np.ndarray:
    """A fill-reducing elimination order of the square ``pattern`` (booleans): at each step the
    remaining node with the fewest remaining neighbours in the graph of ``pattern | pattern.T``
    (ties to the lowest index), its neighbours then joined into a clique (the fill its elimination
    causes)."""
    s = np.asarray(pattern, dtype=bool)
    s = s | s.T
    n = s.shape[0]
    neighbours = [set(np.flatnonzero(s[i]).tolist()) - {i} for i in range(n)]
    remaining = set(range(n))
    order = []
    while remaining:
        v = min(remaining, key=lambda i: (len(neighbours[i] & remaining), i))
        near = neighbours[v] & remaining
        for a in near:
            neighbours[a] |= near - {a}
        order.append(v)
        remaining.remove(v)
    return np.asarray(order, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class SparseLU:
    """The symbolic LU of ``shift * I - J`` for ``J`` with structural non-zeros ``pattern``, and
    its compiled kernels. Build it with :meth:`of` (cached per pattern).

    ``perm[k]`` is the original index of the ``k``-th pivot; ``rows``/``cols`` list ``J``'s
    entries (original indices) in the order :meth:`factor` takes their values; ``slots`` maps a
    permuted ``(i, j)`` of the factors to its place in the packed factor array.
    """

    n: int
    perm: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    slots: dict
    lower: tuple
    upper: tuple

    @staticmethod
    def of(pattern: np.ndarray) -> "SparseLU":
        pattern = np.asarray(pattern, dtype=bool)
        if pattern.ndim != 2 or pattern.shape[0] != pattern.shape[1]:
            raise ValueError(f"SparseLU: the pattern must be square, got shape {pattern.shape}")
        return _structure(pattern.tobytes(), pattern.shape[0])

    @property
    def multiply_adds(self) -> int:
        """Multiply-adds of one factorisation (the divisions by pivots excluded)."""
        return sum(len(lo) * len(up) for lo, up in zip(self.lower, self.upper))

    @property
    def factor_entries(self) -> int:
        """Entries of L + U (the diagonal once)."""
        return len(self.slots)

    # -- the compiled kernels ---------------------------------------------------------------
    @functools.cached_property
    def kernels(self) -> "_Library":
        """The registered FFI targets of this pattern (compiled on first use, cached on disk)."""
        return _library(self)

    def factor(self, shift, values):
        """The packed factors of ``shift * I - J`` where ``values[..., e]`` is ``J`` at
        ``(rows[e], cols[e])``; ``shift`` has the leading shape of ``values``. Not differentiable
        (use :meth:`solve`, whose derivative does not go through the factors)."""
        import jax
        import jax.numpy as jnp

        shift = jnp.asarray(shift, dtype=jnp.float64)
        values = jnp.asarray(values, dtype=jnp.float64)
        out = jax.ShapeDtypeStruct(values.shape[:-1] + (self.factor_entries,), jnp.float64)
        return jax.ffi.ffi_call(self.kernels.factor_target, out, vmap_method="broadcast_all")(
            jax.lax.stop_gradient(shift), jax.lax.stop_gradient(values))

    def _apply(self, target: str, factors, b):
        import jax
        import jax.numpy as jnp

        out = jax.ShapeDtypeStruct(b.shape, jnp.float64)
        return jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")(jax.lax.stop_gradient(factors), b)

    def solve(self, factors, shift, values, b):
        """``x`` with ``(shift * I - J) x = b``, ``factors`` from :meth:`factor` of the same
        ``shift`` and ``values``; differentiable in ``shift``, ``values`` and ``b``."""
        import jax
        import jax.numpy as jnp

        lib = self.kernels
        rows, cols, n = self.rows, self.cols, self.n

        def matvec(v):
            jv = jax.ops.segment_sum(values * v[cols], rows, num_segments=n)
            return shift * v - jv

        return jax.lax.custom_linear_solve(
            matvec, jnp.asarray(b, dtype=jnp.float64),
            solve=lambda _, r: self._apply(lib.solve_target, factors, r),
            transpose_solve=lambda _, r: self._apply(lib.solve_t_target, factors, r))


@functools.lru_cache(maxsize=32)
def _structure(data: bytes, n: int) -> SparseLU:
    pattern = np.frombuffer(data, dtype=bool).reshape(n, n)
    eye = np.eye(n, dtype=bool)
    perm = minimum_degree_order(pattern | eye)
    m = (pattern | eye)[np.ix_(perm, perm)].copy()
    lower, upper = [], []
    for k in range(n):
        below = tuple(int(i) for i in np.flatnonzero(m[k + 1:, k]) + k + 1)
        right = tuple(int(j) for j in np.flatnonzero(m[k, k + 1:]) + k + 1)
        for i in below:
            m[i, list(right)] = True
        lower.append(below)
        upper.append(right)
    slots = {(int(i), int(j)): s for s, (i, j) in enumerate(zip(*np.nonzero(m)))}
    rows, cols = np.nonzero(pattern)
    return SparseLU(n, perm, rows.astype(np.int64), cols.astype(np.int64), slots, tuple(lower), tuple(upper))


# ---------------------------------------------------------------------------------------------
# Code generation and the compiled library
# ---------------------------------------------------------------------------------------------
def _source(s: SparseLU, tag: str) -> str:
    n, slot = s.n, s.slots
    inv_perm = np.argsort(s.perm)
    nf, nj = len(slot), len(s.rows)
    fac = [f"  for (int q = 0; q < {nf}; ++q) a[q] = 0.0;"]
    for e, (i, j) in enumerate(zip(s.rows, s.cols)):
        fac.append(f"  a[{slot[int(inv_perm[i]), int(inv_perm[j])]}] -= v[{e}];")
    for k in range(n):
        fac.append(f"  a[{slot[k, k]}] += h;")
    for k in range(n):
        fac.append(f"  {{ const double inv = 1.0 / a[{slot[k, k]}];")
        for i in s.lower[k]:
            fac.append(f"    {{ const double l = (a[{slot[i, k]}] *= inv);")
            for j in s.upper[k]:
                fac.append(f"      a[{slot[i, j]}] -= l * a[{slot[k, j]}];")
            fac.append("    }")
        fac.append("  }")

    def permuted(body: list[str]) -> list[str]:
        """A solve's body between gathering b into pivot order and scattering y back to x."""
        return ([f"  double y[{n}];"] + [f"  y[{k}] = b[{int(s.perm[k])}];" for k in range(n)] + body
                + [f"  x[{int(s.perm[k])}] = y[{k}];" for k in range(n)])

    def row(i: int, pairs, divide: bool) -> list[str]:
        """y[i] minus the products over ``pairs`` (factor slot, y index), divided by the pivot or not."""
        terms = "".join(f" - a[{slot[e]}] * y[{j}]" for e, j in pairs)
        if divide:
            return [f"  y[{i}] = (y[{i}]{terms}) / a[{slot[i, i]}];"]
        return [f"  y[{i}] = y[{i}]{terms};"] if terms else []

    sol, solt = [], []
    for i in range(n):  # W x = b, forward with the unit lower factor
        sol += row(i, [((i, j), j) for j in range(i) if (i, j) in slot], False)
    for i in reversed(range(n)):  # ... backward with the upper factor
        sol += row(i, [((i, j), j) for j in range(i + 1, n) if (i, j) in slot], True)
    for i in range(n):  # W^T x = b, forward with U^T
        solt += row(i, [((j, i), j) for j in range(i) if (j, i) in slot], True)
    for i in reversed(range(n)):  # ... backward with the unit L^T
        solt += row(i, [((j, i), j) for j in range(i + 1, n) if (j, i) in slot], False)
    sol, solt = permuted(sol), permuted(solt)
    nl = "\n"
    return f"""// Generated by qspjax.solver.sparse_lu for one sparsity pattern ({n} states, {nj} Jacobian entries,
// {nf} factor entries). Do not edit: regenerated from the pattern.
#include <cstddef>
#include <cstdint>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

static inline void factor_one(double h, const double* v, double* a) {{
{nl.join(fac)}
}}
static inline void solve_one(const double* a, const double* b, double* x) {{
{nl.join(sol)}
}}
static inline void solve_t_one(const double* a, const double* b, double* x) {{
{nl.join(solt)}
}}

static ffi::Error Factor(ffi::Buffer<ffi::F64> h, ffi::Buffer<ffi::F64> v, ffi::ResultBuffer<ffi::F64> a) {{
  const std::size_t batch = h.element_count();
  if (v.element_count() != batch * {nj} || a->element_count() != batch * {nf})
    return ffi::Error::InvalidArgument("qspjax sparse LU: unexpected shapes");
  for (std::size_t p = 0; p < batch; ++p) factor_one(h.typed_data()[p], v.typed_data() + p * {nj}, a->typed_data() + p * {nf});
  return ffi::Error::Success();
}}
template <void (*Kernel)(const double*, const double*, double*)>
static ffi::Error Apply(ffi::Buffer<ffi::F64> a, ffi::Buffer<ffi::F64> b, ffi::ResultBuffer<ffi::F64> x) {{
  const std::size_t batch = b.element_count() / {n};
  if (a.element_count() != batch * {nf}) return ffi::Error::InvalidArgument("qspjax sparse LU: unexpected shapes");
  for (std::size_t p = 0; p < batch; ++p) Kernel(a.typed_data() + p * {nf}, b.typed_data() + p * {n}, x->typed_data() + p * {n});
  return ffi::Error::Success();
}}

XLA_FFI_DEFINE_HANDLER_SYMBOL(factor_{tag}, Factor,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F64>>().Arg<ffi::Buffer<ffi::F64>>().Ret<ffi::Buffer<ffi::F64>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(solve_{tag}, Apply<solve_one>,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F64>>().Arg<ffi::Buffer<ffi::F64>>().Ret<ffi::Buffer<ffi::F64>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(solve_t_{tag}, Apply<solve_t_one>,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F64>>().Arg<ffi::Buffer<ffi::F64>>().Ret<ffi::Buffer<ffi::F64>>());
"""


@dataclass(frozen=True)
class _Library:
    factor_target: str
    solve_target: str
    solve_t_target: str


def _cache_dir() -> Path:
    root = os.environ.get("QSPJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qspjax")
    return Path(root) / "sparse_lu"


_LIBRARIES: dict[str, _Library] = {}


def _library(s: SparseLU) -> _Library:
    """Compile (once per pattern, cached on disk) and register the kernels of ``s``."""
    import jax

    tag = hashlib.sha256(s.perm.tobytes() + s.rows.tobytes() + s.cols.tobytes()).hexdigest()[:16]
    if tag in _LIBRARIES:
        return _LIBRARIES[tag]
    source = _source(s, tag)
    digest = hashlib.sha256((source + jax.__version__).encode()).hexdigest()[:16]
    folder = _cache_dir() / digest
    so = folder / "kernels.so"
    if not so.exists():
        # Each process compiles in its own temporary folder and moves the result into place
        # atomically, so that concurrent first uses (pytest-xdist workers, local processes) never
        # read a half-written source or library.
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src, out = Path(tmp) / "kernels.cc", Path(tmp) / "kernels.so"
            src.write_text(source)
            cmd = [os.environ.get("CXX", "c++"), "-O2", "-std=c++17", "-shared", "-fPIC",
                   "-I", jax.ffi.include_dir(), str(src), "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"qspjax.solver.sparse_lu: compiling the kernels for {folder} failed: {done.stderr[-2000:]}")
            os.replace(src, folder / "kernels.cc")
            os.replace(out, so)
    lib = ctypes.cdll.LoadLibrary(str(so))
    names = _Library(f"qspjax_lu_factor_{tag}", f"qspjax_lu_solve_{tag}", f"qspjax_lu_solve_t_{tag}")
    for target, symbol in ((names.factor_target, f"factor_{tag}"), (names.solve_target, f"solve_{tag}"),
                           (names.solve_t_target, f"solve_t_{tag}")):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    _LIBRARIES[tag] = names
    return names


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the compiled kernels can be used here: the default backend is the CPU and a tiny
    pattern's kernels compile, load and solve correctly. Set ``QSPJAX_SPARSE_LU=0`` to refuse them."""
    if os.environ.get("QSPJAX_SPARSE_LU", "1") == "0":
        return False
    try:
        import jax

        if jax.default_backend() != "cpu":
            return False
        with jax.ensure_compile_time_eval():  # may be asked while a solver step is being traced
            return _self_check()
    except Exception as exc:  # no compiler, no headers, an FFI change: the dense path serves
        print(f"qspjax: the compiled sparse LU is not available ({type(exc).__name__}: {exc}); "
              "using dense LAPACK", file=sys.stderr)
        return False


def _self_check() -> bool:
    import jax.numpy as jnp

    pattern = np.array([[1, 1], [0, 1]], dtype=bool)
    s = SparseLU.of(pattern)
    vals = jnp.asarray([-1.0, 0.5, -2.0])
    f = s.factor(jnp.asarray(1.0), vals)
    x = np.asarray(s.solve(f, 1.0, vals, jnp.asarray([1.0, 1.0])))
    w = np.eye(2) - np.asarray(jnp.zeros((2, 2)).at[s.rows, s.cols].set(vals))
    return bool(np.allclose(w @ x, 1.0))
