"""Trial-grouped cross-validation on the library route (qspjax.inference.crossval)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from qspjax.errors import QSPValidationError
from qspjax.inference import crossval as CV

from test_library import ARMS, SETTINGS, fake_library, setup  # noqa: F401  (fixture)


def test_folds_hold_out_whole_trials_once_each():
    arms = ["NCT1:a", "NCT2:a", "NCT1:b", "NCT3:x"]
    folds = CV.trial_folds(arms)
    assert [f[0] for f in folds] == ["NCT1", "NCT2", "NCT3"]
    assert folds[0] == ("NCT1", ["NCT2:a", "NCT3:x"], ["NCT1:a", "NCT1:b"])
    held = [a for _, _, test in folds for a in test]
    assert sorted(held) == sorted(arms)  # every arm held out exactly once
    for _, train, test in folds:  # never fitted on an arm of the trial it predicts
        assert not {CV.trial_of(a) for a in train} & {CV.trial_of(a) for a in test}
    with pytest.raises(QSPValidationError, match="two trials"):
        CV.trial_folds(["NCT1:a", "NCT1:b"])


def test_subset_library_keeps_the_asked_arms_in_order(setup):  # noqa: F811
    lib = fake_library(setup, n=12)
    sub = CV.subset_library(lib, [ARMS[1]])
    assert sub.arm_ids == (ARMS[1],) and sub.arms[0] is lib.arms[1] and sub.meta["arm_ids"] == [ARMS[1]]
    with pytest.raises(QSPValidationError, match="NCT0000"):
        CV.subset_library(lib, ["NCT0000:none"])


@pytest.mark.slow  # ~35 s: two NUTS folds
def test_cross_validation_predicts_each_trial_from_the_others(setup):  # noqa: F811
    params, spec, priors, arms = setup
    lib = fake_library(setup, n=30)
    seen = []  # the per-fold hook sees the rows so far (fits/library.py saves them as it goes)
    rows = CV.cross_validate(lib, arms, priors, params, spec, jax.random.PRNGKey(0), settings=SETTINGS,
                             chains=2, warmup=25, samples=25, max_tree_depth=3, n_draws=10,
                             on_fold=lambda so_far, done, total: seen.append((len(so_far), done, total)))
    assert seen == [(1, 1, 2), (2, 2, 2)]
    assert [r["id"] for r in rows] == list(ARMS)  # two trials: each arm predicted once
    assert [r["held_out_trial"] for r in rows] == [CV.trial_of(a) for a in ARMS]
    for r in rows:
        assert r["role"] == "cross_validated" and r["fitted_arms"] == 1
        lo, hi = r["predicted_interval_pct"]
        assert 0.0 <= lo <= r["predicted_orr_pct"] <= hi <= 100.0
        assert r["inside_ci"] == (r["observed_orr_ci_pct"][0] <= r["predicted_orr_pct"] <= r["observed_orr_ci_pct"][1])
        assert np.isfinite(r["fold_rhat_max"]) and r["fold_divergences"] >= 0
    t = CV.tally(rows)
    assert t["arms"] == 2 and t["inside_ci"] == sum(r["inside_ci"] for r in rows)
    # one trial's fold alone (split over processes) gives that fold's row of the whole run
    second = CV.cross_validate(lib, arms, priors, params, spec, jax.random.PRNGKey(0), settings=SETTINGS,
                               chains=2, warmup=25, samples=25, max_tree_depth=3, n_draws=10,
                               trials=[CV.trial_of(ARMS[1])])
    assert second == rows[1:]


def test_an_interrupted_cross_validation_resumes_without_rerunning_its_folds(setup):  # noqa: F811
    """Folds whose trial already has rows (saved by the per-fold hook) are not run again; with all
    of them done nothing is sampled and the saved rows come back as they were."""
    params, spec, priors, arms = setup
    lib = fake_library(setup, n=12)
    saved = [{"id": a, "held_out_trial": CV.trial_of(a), "inside_ci": True} for a in ARMS]
    calls = []
    rows = CV.cross_validate(lib, arms, priors, params, spec, jax.random.PRNGKey(0), settings=SETTINGS,
                             done=saved, on_fold=lambda *a: calls.append(a))
    assert rows == saved and calls == []


def test_a_fold_with_nothing_to_predict_is_skipped():
    from qspjax.data import load_trials

    trials = load_trials()
    assert not CV._has_orr(trials.get_arm("NCT04271384:sbrt_nivo"))  # pCR/MPR only
    assert CV._has_orr(trials.get_arm("NCT02492568:pembro"))


def test_a_fold_weighting_the_held_out_arms_zero_is_the_model_of_the_training_arms(setup):  # noqa: F811
    """The single-compile folds: the whole library's log-likelihood and support wall with the held-out
    trial's arms weighted 0 equal those of a model built on the training arms alone (so the folds
    sample the same posteriors as before); all ones give the unweighted model."""
    import jax.numpy as jnp

    from qspjax.inference import library as L
    from test_library import theta_at_proposal

    params, spec, priors, arms = setup
    lib = fake_library(setup, n=40, seed=3)
    full = L.LibraryModel(lib, arms, priors, params, spec, SETTINGS, fixed_ess=[20.0, 12.0], min_ess=6.0)
    alone = L.LibraryModel(CV.subset_library(lib, [ARMS[1]]), arms[1:], priors, params, spec, SETTINGS,
                           fixed_ess=[12.0], min_ess=6.0)
    w = CV.fold_weights(lib.arm_ids, [ARMS[1]])
    assert w.tolist() == [0.0, 1.0]
    theta = jnp.asarray(theta_at_proposal(full))
    for t in (theta, theta + 1.5, theta - 2.0):  # the last two lie outside the wall for some arm
        assert float(full._log_likelihood(t, w)) == pytest.approx(float(alone._log_likelihood(t)), rel=1e-12)
        assert float(full.support_log_penalty(t, w)) == pytest.approx(float(alone.support_log_penalty(t)), abs=1e-12)
        assert float(full._log_likelihood(t, np.ones(2))) == pytest.approx(float(full._log_likelihood(t)), rel=1e-12)
    assert float(full.support_log_penalty(theta - 2.0)) < float(full.support_log_penalty(theta - 2.0, w)) <= 0.0
