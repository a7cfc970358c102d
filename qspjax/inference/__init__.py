"""Calibration and Bayesian inference of the virtual population against trial arms.

``config`` (priors, arm selection, run files), ``simulators`` (QSP model, kinetics surrogate),
``likelihood`` (:class:`Problem`: the compiled log posterior), ``calibrate`` (multi-start Adam),
``bayes`` (numpyro model, NUTS, posterior predictive), ``runs`` (what the CLI and fits/ run).
"""

from qspjax.inference.config import (ArmSelection, LikelihoodSettings, Prior, PriorSet, RunConfig, load_arm_selection,
                                     load_priors, load_run_config)
from qspjax.inference.likelihood import ArmData, Prediction, Problem, arm_data_from_trial, build_problem

__all__ = ["ArmData", "ArmSelection", "LikelihoodSettings", "Prediction", "Prior", "PriorSet", "Problem", "RunConfig",
           "arm_data_from_trial", "build_problem", "load_arm_selection", "load_priors", "load_run_config"]
