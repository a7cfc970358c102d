"""Honest prediction: cross-validation grouped by trial on the library route.

A calibration scored on the arms it was fitted to says how well it can *fit*; to say how well it
*predicts* a trial it has not seen, each trial's arms are predicted by a posterior that never saw
that trial (leave-one-trial-out: arms of one trial share patients' selection, centre and
protocol, so leaving out single arms would leak). On the library route
(:mod:`qspjax.inference.library`) this is cheap: the per-patient outcomes of every arm are already
simulated, so each fold is one NUTS run on the reweighted likelihood of the remaining arms, and
the held-out arms are predicted by reweighting their own library patients at the fold's
posterior draws (:func:`qspjax.inference.library.predictive_table`). The folds share one compiled
sampler (:func:`qspjax.inference.library.subset_sampler`): each samples the whole library's model
with the held-out trial's arms weighted 0, which is the model of the training arms exactly (a
test checks the log density), so a fold costs its sampling, not a compilation.

Each row says which trial was held out, the observed ORR and its exact interval, the predicted ORR
(posterior median of the reweighted cohort mean) and its interval over draws, whether the
prediction lies inside the observed interval (``inside_ci``), and the fold's sampler diagnostics.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from qspjax.errors import QSPValidationError


def trial_of(arm_id: str) -> str:
    """The trial (registry id) an arm id ``NCT…:ARM`` belongs to."""
    return arm_id.split(":", 1)[0]


def trial_folds(arm_ids: Sequence[str]) -> list[tuple[str, list[str], list[str]]]:
    """``(trial, training arm ids, held-out arm ids)`` for each trial of ``arm_ids``, in order of
    first appearance; every arm is held out exactly once, always together with its trial's other
    arms. Refused when fewer than two trials are given (nothing would be left to fit)."""
    trials = list(dict.fromkeys(trial_of(a) for a in arm_ids))
    if len(trials) < 2:
        raise QSPValidationError("cross-validation", "arms", list(arm_ids),
                                 "arms of at least two trials (each fold fits the others)")
    return [(t, [a for a in arm_ids if trial_of(a) != t], [a for a in arm_ids if trial_of(a) == t]) for t in trials]


def fold_weights(arm_ids: Sequence[str], train: Sequence[str]) -> np.ndarray:
    """1 for each arm of ``arm_ids`` that a fold fits (``train``), 0 for the held-out ones."""
    keep = set(train)
    return np.array([1.0 if a in keep else 0.0 for a in arm_ids])


def subset_library(library, arm_ids: Sequence[str]):
    """The library restricted to ``arm_ids`` (in that order)."""
    import dataclasses

    by_id = {a.arm_id: a for a in library.arms}
    missing = [a for a in arm_ids if a not in by_id]
    if missing:
        raise QSPValidationError(library.path or "library", "arm_ids", list(by_id), f"the arms {missing}")
    meta = dict(library.meta, arm_ids=list(arm_ids))
    return dataclasses.replace(library, arms=tuple(by_id[a] for a in arm_ids), meta=meta)


def cross_validate(library, arms: Sequence, priors, params, spec, key, *, settings=None, chains: int = 4,
                   warmup: int = 300, samples: int = 300, max_tree_depth: int = 8, n_draws: int = 200,
                   progress=None, fixed_ess: dict | None = None, min_ess: float | None = None,
                   on_fold=None, done: Sequence[dict] = (), trials: Sequence[str] | None = None) -> list[dict]:
    """Leave-one-trial-out predictions of every arm of ``library`` (rows, one per held-out arm
    with an ORR; role ``cross_validated``). ``arms``: the trial arms of the library, same order.
    ``fixed_ess``: arm id -> the Monte-Carlo size of the fixed term (default: each fold's prior-draw median).
    ``on_fold(rows, done, total)``: called after each fold with the rows so far (e.g. to save them);
    ``done``: rows of an interrupted run (what ``on_fold`` saved): their trials' folds are not rerun.
    ``trials``: hold out only these trials (to split the folds over processes: fold k's random key
    depends on k alone, so the rows are those of one run; merge the saved rows and resume)."""
    import jax

    from qspjax.inference import library as L

    by_id = {a.arm_id: a for a in arms}
    rows: list[dict] = list(done)
    finished = {r["held_out_trial"] for r in done}
    folds = trial_folds(library.arm_ids)
    # every fold samples the whole library's model with the held-out trial's arms weighted 0: the
    # same posterior as a model of the training arms alone, from one compiled program
    full = None
    for k, (trial, train, test) in enumerate(folds):
        if trial in finished or (trials is not None and trial not in trials) or not any(_has_orr(by_id[a]) for a in test):
            continue  # done in an interrupted run, or nothing to predict (e.g. a pathology-only arm)
        if full is None:
            m = None if fixed_ess is None else [fixed_ess[a] for a in library.arm_ids]
            full = L.LibraryModel(library, [by_id[a] for a in library.arm_ids], priors, params, spec, settings,
                                  fixed_ess=m, min_ess=min_ess)
            sample = L.subset_sampler(full, chains=chains, warmup=warmup, samples=samples,
                                      max_tree_depth=max_tree_depth)
        mcmc = sample(jax.random.fold_in(key, k), fold_weights(library.arm_ids, train))
        draws = L.posterior_matrix(mcmc, full)
        diag = _diagnostics(mcmc, full)
        held = L.LibraryModel(subset_library(library, test), [by_id[a] for a in test], priors, params, spec, settings)
        for r in L.predictive_table(held, draws, n_draws=n_draws):
            rows.append({"id": r["arm_id"], "role": "cross_validated", "held_out_trial": trial,
                         "fitted_arms": len(train), "observed_orr_pct": r["observed_orr_pct"],
                         "observed_orr_ci_pct": r["observed_ci"], "predicted_orr_pct": r["predicted_orr_pct"],
                         "predicted_interval_pct": r["predicted_interval"],
                         "inside_ci": r["predicted_inside_observed_ci"],
                         "observed_inside_predicted_interval": r["observed_inside_interval"], **diag})
        if progress is not None:
            progress(f"fold {k + 1}/{len(folds)}: {trial} held out ({len(test)} arm(s)), "
                     f"R-hat max {diag['fold_rhat_max']:.3f}, divergences {diag['fold_divergences']}")
        if on_fold is not None:
            on_fold(rows, k + 1, len(folds))
    return rows


def _has_orr(arm) -> bool:
    """Whether a trial arm prints a response count or responders of N (what a fold predicts)."""
    from qspjax.inference.likelihood import arm_data_from_trial

    d = arm_data_from_trial(arm, math.inf)
    return d.response_counts is not None or d.responders is not None


def _diagnostics(mcmc, model) -> dict:
    import arviz as az

    idata = az.from_numpyro(mcmc)
    table = az.summary(idata, var_names=list(model.ids), kind="diagnostics", round_to="none")
    diverging = np.asarray(mcmc.get_extra_fields()["diverging"])
    return {"fold_rhat_max": float(table["r_hat"].max()), "fold_ess_bulk_min": float(table["ess_bulk"].min()),
            "fold_divergences": int(diverging.sum())}


def tally(rows: Sequence[dict]) -> dict:
    """How many held-out arms were predicted inside their observed interval."""
    scored = [r for r in rows if r.get("inside_ci") is not None]
    return {"arms": len(rows), "inside_ci": int(sum(bool(r["inside_ci"]) for r in scored)),
            "fraction_inside": (sum(bool(r["inside_ci"]) for r in scored) / len(scored)) if scored else None}
