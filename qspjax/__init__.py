"""qspjax: a differentiable QSP model of NSCLC under radiotherapy and checkpoint inhibitors.

Importing the package turns on float64 in JAX; every number in the model is double precision.

The flat API (imported on first use, so ``import qspjax`` stays cheap)::

    import qspjax as qj

    params = qj.load_parameters()                       # configs/params/qspio_example1.yaml
    regimen = qj.load_regimen("configs/regimens/pembro_rt_sbrt.yaml")
    result = qj.run_cohort(params, regimen, n_patients=16, seed=0, days=168)
    outcome = qj.evaluate(result, qj.Assessment(56.0, "non_irradiated"))

Sub-packages: :mod:`qspjax.model` (the ODE as Equinox modules), :mod:`qspjax.solver` (Rosenbrock
methods, sparse LU, one patient's timeline, batches: the lane queue and lock-step vmap),
:mod:`qspjax.inference`
(likelihood, calibration, NUTS, posterior predictive), :mod:`qspjax.analysis` (sensitivity,
stop time, regimen optimisation), :mod:`qspjax.data` (the trial arms).
"""

import importlib

import jax

jax.config.update("jax_enable_x64", True)

from qspjax.errors import QSPValidationError  # noqa: E402

__version__ = "0.1.0"

_EXPORTS = {
    # parameters, populations, regimens
    "load_parameters": "qspjax.params", "ParameterSet": "qspjax.params",
    "load_population": "qspjax.vpop", "PopulationSpec": "qspjax.vpop",
    "load_regimen": "qspjax.regimen", "parse_regimen": "qspjax.regimen", "compile_schedule": "qspjax.regimen",
    # the model and its solver
    "QSPModel": "qspjax.model", "SolverConfig": "qspjax.solver.simulate", "simulate_patient": "qspjax.solver.simulate",
    "simulate_batch": "qspjax.solver.simulate", "grow_to_baseline": "qspjax.solver.simulate",
    # cohorts and virtual trials
    "build_population": "qspjax.runner", "treat_population": "qspjax.runner", "run_cohort": "qspjax.runner",
    "Assessment": "qspjax.virtual_trial", "evaluate": "qspjax.virtual_trial",
    "load_experiment": "qspjax.virtual_trial", "load_trials": "qspjax.data",
    # the patient digital twin
    "fit_twin": "qspjax.analysis.twin", "load_patient": "qspjax.analysis.twin",
}

__all__ = sorted(["QSPValidationError", "__version__", *_EXPORTS])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qspjax' has no attribute {name!r}")


def __dir__():
    return __all__
