"""The likelihood's terms (qspjax.inference.likelihood), checked on small cases computed by hand.

Effective numbers at risk against a numerical integral of Greenwood's variance, the Monte-Carlo
term of the virtual cohort, the PFS intervals conditioned on the scan the PD count belongs to,
a median read between scans, and the scan grid taken from the assessment indices. The whole
log-likelihood of a three-arm problem is evaluated on a hand-made prediction and compared with
scipy.stats.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy.stats import binom, multinomial

import qspjax  # noqa: F401
from qspjax import outcomes as oc
from qspjax.inference.config import LikelihoodSettings, Prior, PriorSet
from qspjax.inference.likelihood import (ArmData, Prediction, Problem, arm_data_from_trial, arm_terms,
                                         effective_at_risk, with_virtual_cohort)

REPO = Path(__file__).resolve().parents[1]
M = 20  # virtual patients


def greenwood_at_risk(n, s_start, s_end, start, end, follow_up):
    """m with q (1 - q) / m = Var(q̂) of Greenwood: q² ∫ dΛ / (n S G), by quadrature (constant hazard)."""
    q = s_end / s_start
    lam = -math.log(q) / (end - start)
    gamma = 0.0 if follow_up is None else math.log(2) / follow_up
    integral = integrate.quad(lambda u: lam / (n * s_start * math.exp(-lam * (u - start)) * math.exp(-gamma * u)),
                              start, end, epsabs=0, epsrel=1e-12)[0]
    return (1 - q) / (q * integral)


def rounded(x):
    return int(math.floor(x + 0.5))


@pytest.fixture(scope="module")
def problem(params):
    from qspjax.regimen import load_regimen
    from qspjax.vpop import load_population

    ici = load_regimen(REPO / "configs/regimens/pembrolizumab_200mg_q3w.yaml")
    # scans every 60 days on a 7-day grid land on days 63, 119, 182 and 238, not 60, 120, 180, 240
    settings = LikelihoodSettings(patients=M, seed=3, horizon_days=250.0, output_every_days=7.0,
                                  temperature=0.1, assessment_interval_days=60.0)
    arms = [ArmData("counts", ici, 40, (2, 10, 18, 10), None, (125.0, 200.0), (24, 14), median_follow_up_days=300.0),
            ArmData("median", ici, 50, None, 15, (150.0,), (25,), pfs_is_median=(True,)),
            ArmData("late", ici, 30, None, 9, (181.0,), (12,))]
    priors = PriorSet((Prior("k_C1_growth", "k_C1_growth", "median", None, 1.0),))
    return Problem(arms, priors, params, load_population(), settings, simulator="kinetics")


PREDICTION = Prediction(
    response=jnp.array([[0.05, 0.25, 0.40, 0.30, 0.0], [0.1, 0.2, 0.5, 0.2, 0.0], [0.1, 0.2, 0.5, 0.2, 0.0]]),
    pfs=jnp.array([[1.0, 0.8, 0.6, 0.45, 0.4], [1.0, 0.85, 0.7, 0.5, 0.4], [1.0, 0.9, 0.75, 0.55, 0.5]]),
    ok_fraction=jnp.ones(3),
)


def test_effective_at_risk_matches_greenwood():
    assert effective_at_risk(100, 1.0, 0.5, 0.0, 180.0, None) == 100.0  # no censoring: those at risk
    assert effective_at_risk(40, 0.75, 0.6, 63.0, 125.0, None) == 30.0
    for case in [(100, 1.0, 0.5, 0.0, 180.0, 360.0), (40, 0.75, 0.6, 63.0, 125.0, 300.0),
                 (476, 0.559, 0.45, 365.25, 730.5, 1044.0), (30, 0.9, 0.899, 10.0, 400.0, 50.0)]:
        assert effective_at_risk(*case) == pytest.approx(greenwood_at_risk(*case), rel=1e-9)
    # closed form of the first case: 100 h(1.5 log 2) / h(log 2), h(x) = x / (e^x - 1)
    assert effective_at_risk(100, 1.0, 0.5, 0.0, 180.0, 360.0) == pytest.approx(82.03772410170409, rel=1e-12)
    # nobody left at the end: the limit n S G(start) e^(-γ Δ)
    assert effective_at_risk(10, 1.0, 0.0, 0.0, 100.0, 100.0) == pytest.approx(10 * 0.5, rel=1e-9)
    with pytest.raises(ValueError):
        effective_at_risk(10, 0.5, 0.6, 0.0, 100.0, None)  # survival cannot rise


def test_virtual_cohort_adds_its_variance():
    assert with_virtual_cohort(40, 20) == pytest.approx(40 / 3)
    assert with_virtual_cohort(40, None) == 40.0
    assert with_virtual_cohort(40, 0.0) == 0.0


def test_scan_days_come_from_the_assessment_indices(problem):
    np.testing.assert_array_equal(problem.assessment_days, [0.0, 63.0, 119.0, 182.0, 238.0])
    idx = oc.assessment_indices(problem.output_days, 60.0)
    np.testing.assert_array_equal(problem.assessment_days[1:], problem.output_days[idx])


def test_log_likelihood_of_a_hand_computed_case(problem):
    expected = []
    # "counts": N_eff = round(1 / (1/40 + 1/20)) = 13, counts scaled and rounded: (1, 3, 6, 3)
    p4 = np.array([0.05, 0.25, 0.40, 0.30])
    ll = multinomial.logpmf([1, 3, 6, 3], 13, p4 / p4.sum())
    # PFS from the day-63 scan (first that can read SD), at risk 40 - 10 PD = 30 (S = 0.75)
    s_hat = [0.75, 24 / 40, 14 / 40]
    days = [63.0, 125.0, 200.0]
    predicted = [0.6 / 0.8, 0.45 / 0.6]  # steps: 125 reads the day-119 scan, 200 the day-182 scan
    for j in range(2):
        m = greenwood_at_risk(40, s_hat[j], s_hat[j + 1], days[j], days[j + 1], 300.0)
        m_eff = rounded(1 / (1 / m + 1 / (M * s_hat[j])))
        ll += binom.logpmf(rounded(s_hat[j + 1] / s_hat[j] * m_eff), m_eff, predicted[j])
    expected.append(ll)
    # "median": responders 15 of 50 -> 4 of 14; n/2 at the 150-day median, read between the
    # day-119 (0.7) and day-182 (0.5) scans; 50 at risk, no censoring -> 14 effective, 7 free
    s_median = 0.7 + (150 - 119) / (182 - 119) * (0.5 - 0.7)
    expected.append(binom.logpmf(4, 14, 0.3) + binom.logpmf(7, 14, s_median))
    # "late": 9 of 30 -> 4 of 12; the 181-day landmark reads the day-119 scan (the day-182 one is
    # later), 12 of 30 progression-free -> 5 of 12
    expected.append(binom.logpmf(4, 12, 0.3) + binom.logpmf(5, 12, 0.75))
    np.testing.assert_allclose(np.asarray(problem.arm_log_likelihoods(PREDICTION)), expected, rtol=1e-10)
    landmarks = np.asarray(problem.landmark_pfs(PREDICTION, 1))
    assert landmarks == pytest.approx([s_median], rel=1e-12)


def test_pfs_points_that_repeat_the_pd_count_are_dropped(problem):
    arm = ArmData("early", problem.arms[0].regimen, 40, (2, 10, 18, 10), None, (30.0, 63.0, 125.0), (30, 30, 24))
    t = arm_terms(arm, problem.assessment_days, None)
    assert t.first_scan == 1 and t.pfs_points == (2,) and t.pfs_from == (-1,)
    assert t.pfs_at_risk == (30,) and t.pfs_free == (24,)  # 40 - 10 at risk, no censoring, no MC term
    assert any("first scan" in note for note in t.notes)
    # an outcome clock that starts on day 53 (randomisation after induction): the PD count belongs
    # to the first scan 42 days or more after it, day 119, 66 days after the origin
    late = ArmData("late_origin", problem.arms[0].regimen, 40, (2, 10, 18, 10), None, (60.0, 125.0), (30, 24),
                   origin_day=53.0)
    t = arm_terms(late, problem.assessment_days, None)
    assert t.origin == 0 and t.first_scan == 2 and t.pfs_points == (1,)
    # without response counts the intervals start at the origin and keep every point
    arm = ArmData("orr", problem.arms[0].regimen, 40, None, 12, (30.0, 63.0, 125.0), (30, 30, 24))
    t = arm_terms(arm, problem.assessment_days, None)
    assert t.first_scan is None and t.pfs_points == (0, 1, 2) and t.pfs_from == (-1, 0, 1)
    assert t.pfs_at_risk == (40, 30, 30) and t.pfs_free == (30, 30, 24) and t.response_n == 40


def test_without_the_virtual_cohort_term_the_printed_counts_stay(params, problem):
    exact = Problem(problem.arms, problem.priors, params, problem.spec, problem.settings, simulator="kinetics",
                    virtual_cohort_error=False)
    data = exact.observed_data()
    assert data[0]["counts"] == (2, 10, 18, 10) and data[1]["responders"] == 15 and data[2]["responders"] == 9
    assert exact.terms[1].pfs_at_risk == (50,) and exact.terms[1].pfs_free == (25,)


def test_trial_arm_median_and_follow_up():
    from qspjax.data.trials import load_trials

    d = arm_data_from_trial(load_trials().get_arm("NCT02888743:durva_treme"), horizon_days=400.0)
    assert d.pfs_is_median == (True,) and d.pfs_progression_free == (13,)
    assert d.median_follow_up_days == pytest.approx(12.4 * 30.4375)
    assert d.pfs_days == pytest.approx((3.3 * 30.4375,))
