"""Solving the model: the Rosenbrock methods, the Jacobian's sparsity and its compiled LU, one
patient's event timeline, batches of patients, and runs split over devices and processes.

- :mod:`qspjax.solver.simulate`: :class:`SolverConfig`, :func:`simulate_patient`,
  :func:`simulate_batch` (a batch of patients, every array with a leading patient axis),
  :func:`grow_to_baseline`.
- :mod:`qspjax.solver.queue`: the forward batch solver that keeps every lane busy (a lane whose
  patient is done takes the next one); :func:`simulate_batch` uses it outside differentiation.
- :mod:`qspjax.solver.rosenbrock`: Rodas4 and Rodas5P as diffrax solvers.
- :mod:`qspjax.solver.sparsity`, :mod:`qspjax.solver.sparse_lu`: the Jacobian's structural
  pattern, its colouring, and its minimum-degree LU compiled to XLA custom calls.
- :mod:`qspjax.solver.distributed`: multi-process runs (``jax.distributed``).
"""
