"""Analyses built on the model: sensitivity of clinical endpoints and treatment decisions.

- :mod:`qspjax.analysis.sensitivity`: Sobol and Morris indices of trial endpoints (SALib as the
  engine) and local d log(endpoint) / d log(parameter) by reverse-mode autodiff;
- :mod:`qspjax.analysis.stop_time`: the earliest antibody dose after which therapy can stop with
  the tumor still controlled at the horizon;
- :mod:`qspjax.analysis.optimize`: gradient-based search of an RT + ICI regimen space under
  clinical constraints;
- :mod:`qspjax.analysis.twin`: a patient's digital twin (NUTS posterior from their lesion reads,
  candidate regimens ranked by posterior-predictive outcome).

The names below are imported on first use, so ``import qspjax.analysis`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "sobol_indices": "sensitivity", "morris_effects": "sensitivity", "local_sensitivities": "sensitivity",
    "finite_difference_sensitivities": "sensitivity", "check_problem": "sensitivity",
    "load_analysis": "sensitivity",
    "find_stop_times": "stop_time", "StopCriterion": "stop_time",
    "load_space": "optimize", "optimize": "optimize",
    "fit_twin": "twin", "TwinResult": "twin", "TwinConfig": "twin", "load_patient": "twin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"qspjax.analysis.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'qspjax.analysis' has no attribute {name!r}")
