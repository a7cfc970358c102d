"""Tests for qspjax.outcomes (RECIST, endpoints, statistics, smooth versions) and qspjax.plots.

Diameter series are hand-made: values are given at the assessment days and linearly
interpolated on a daily grid, so every assessment reads an exact, known sum of diameters.
Kaplan–Meier and its intervals are checked against lifelines, binomial intervals against closed
forms and scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

import qspjax  # noqa: F401  (turns on float64 before jax is used)
import jax
import jax.numpy as jnp
from qspjax import outcomes as oc
from qspjax.errors import QSPValidationError
from qspjax import plots

DAYS = np.arange(0.0, 337.0)  # daily grid to day 336: assessments at 56, 112, ..., 336


def on_grid(values_at_assessments, assessment_days=None):
    """(P, T) daily series that pass exactly through the given values at day 0 and each assessment."""
    values = np.atleast_2d(np.asarray(values_at_assessments, dtype=float))
    if assessment_days is None:
        assessment_days = 56.0 * np.arange(1, values.shape[1])
    knots = np.concatenate([[0.0], assessment_days])
    return np.stack([np.interp(DAYS, knots, row) for row in values])


def categories(values, **kwargs):
    return oc.recist_assessments(DAYS, on_grid(values), **kwargs).category


def bor(values, assessment_days=None, **kwargs):
    a = oc.recist_assessments(DAYS, on_grid(values, assessment_days), assessment_days=assessment_days)
    return oc.best_overall_response(a, **kwargs)


# Sum of diameters at baseline and six assessments; every value is far from every threshold, so
# the smooth versions must converge to the hard ones.
COHORT = np.array([
    [60, 20, 0.2, 0.2, 0.2, 0.2, 0.2],  # CR
    [80, 50, 40, 40, 40, 40, 40],  # durable PR
    [100, 60, 50, 70, 70, 70, 70],  # PR, then PD from the 50 mm nadir
    [50, 47, 48, 50, 52, 51, 50],  # SD throughout
    [40, 60, 70, 80, 90, 100, 110],  # PD at the first assessment
    [100, 90, 95, 100, 115, 130, 140],  # SD, PD at day 224
    [12, 14, 15, 15, 15, 15, 15],  # +25 % but only +3 mm: SD
    [70, 65, 60, 55, 45, 40, 38],  # late PR
    [100, 80, 100, 60, 60, 60, 60],  # SD, PD, then shrinks: BOR stays SD
    [30, 15, 8, 0.3, 0.3, 0.3, 0.3],  # PR then CR (0.3 mm is below the 5 mm detection limit)
])
COHORT_BOR = [oc.CR, oc.PR, oc.PR, oc.SD, oc.PD, oc.SD, oc.SD, oc.PR, oc.SD, oc.CR]


# ---------------------------------------------------------------------------------------------
# RECIST per assessment
# ---------------------------------------------------------------------------------------------
def test_assessments_fall_every_8_weeks_on_the_nearest_grid_point():
    times = np.arange(0.0, 200.0, 3.0)  # 56 is not on this grid: 57 is nearest
    idx = oc.assessment_indices(times, 56.0)
    np.testing.assert_array_equal(times[idx], [57.0, 111.0, 168.0])
    np.testing.assert_array_equal(oc.assessment_indices(DAYS, 56.0), [56, 112, 168, 224, 280, 336])


def test_categories_cover_cr_pr_sd_pd():
    cat = categories([[100, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
                      [100, 60, 60, 60, 60, 60, 60],
                      [100, 90, 90, 90, 90, 90, 90],
                      [100, 130, 130, 130, 130, 130, 130]])
    np.testing.assert_array_equal(cat[:, 0], [oc.CR, oc.PR, oc.SD, oc.PD])


def test_a_lesion_below_the_detection_limit_reads_as_gone():
    values = [[100, 3, 3, 3, 3, 3, 3]]
    assert oc.DETECTION_LIMIT_MM == 5.0
    assert categories(values)[0, 0] == oc.CR  # 3 mm < 5 mm: the scan sees nothing
    assert categories(values, detection_limit_mm=2.0)[0, 0] == oc.PR  # a finer scan still sees it
    a = oc.recist_assessments(DAYS, on_grid(values))
    assert a.sum_diameters_mm[0, 0] == 0.0 and a.percent_change[0, 0] == -100.0
    assert categories([[100, 5, 5, 5, 5, 5, 5]])[0, 0] == oc.PR  # at the limit it is seen and measured


def test_cr_needs_every_target_lesion_below_the_detection_limit():
    gone = on_grid([100, 4, 4, 4, 4, 4, 4])
    seen = on_grid([50, 6, 6, 6, 6, 6, 6])
    both_gone = np.stack([gone, gone], axis=1)
    one_seen = np.stack([gone, seen], axis=1)
    assert oc.recist_assessments(DAYS, both_gone).category[0, 0] == oc.CR
    a = oc.recist_assessments(DAYS, one_seen)
    assert a.category[0, 0] == oc.PR and a.sum_diameters_mm[0, 0] == 6.0  # 4 mm reads 0, 6 mm is measured
    # a non-target lesion that is still seen does not stop the targets' CR
    assert oc.recist_assessments(DAYS, one_seen, target_mask=[True, False]).category[0, 0] == oc.CR


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, "five"])
def test_detection_limit_must_be_positive_and_finite(bad):
    with pytest.raises(QSPValidationError, match="detection_limit_mm"):
        categories([[100, 3, 3, 3, 3, 3, 3]], detection_limit_mm=bad)
    with pytest.raises(QSPValidationError, match="detection_limit_mm"):
        oc.soft_best_response_probabilities(DAYS, jnp.asarray(on_grid([100, 3, 3, 3, 3, 3, 3])),
                                            detection_limit_mm=bad)


def test_regrowth_after_a_complete_response_is_progression():
    # all gone at day 56, then a 4 mm lesion (still unseen), then 6 mm: reappearance is PD
    # (RECIST 1.1 update, Schwartz et al. 2016), although 6 mm is 94 % below baseline
    cat = categories([[100, 2, 4, 6, 6, 6, 6]])
    np.testing.assert_array_equal(cat[0, :3], [oc.CR, oc.CR, oc.PD])
    best = bor([[100, 2, 4, 6, 6, 6, 6]])
    assert best.category[0] == oc.CR and best.progression_day[0] == 168.0
    # with a 2 mm limit the 4 mm lesion is seen again: PD at day 112 although it grew by only 2 mm
    cat = categories([[100, 1, 4, 4, 4, 4, 4]], detection_limit_mm=2.0)
    np.testing.assert_array_equal(cat[0, :2], [oc.CR, oc.PD])
    # while a lesion is still seen the sum rule applies: 6 → 10 mm is +67 % but only +4 mm, a PR
    cat = categories([[100, 6, 10, 10, 10, 10, 10]])
    np.testing.assert_array_equal(cat[0, :2], [oc.PR, oc.PR])


def test_pd_is_measured_from_the_nadir_not_from_baseline():
    # 61 mm is still 39 % below baseline, but 22 % and 11 mm above the 50 mm nadir
    cat = categories([[100, 50, 61, 61, 61, 61, 61]])
    np.testing.assert_array_equal(cat[0, :2], [oc.PR, oc.PD])


def test_twenty_percent_growth_under_five_mm_is_not_progression():
    cat = categories([[20, 24, 24, 24, 24, 24, 24],  # +20 %, +4 mm
                      [20, 25, 25, 25, 25, 25, 25],  # +25 %, +5 mm: both limits met exactly
                      [100, 119, 119, 119, 119, 119, 119]])  # +19 mm but only +19 %
    np.testing.assert_array_equal(cat[:, 0], [oc.SD, oc.PD, oc.SD])


def test_thirty_percent_decrease_is_inclusive():
    cat = categories([[100, 70, 70, 70, 70, 70, 70], [100, 71, 71, 71, 71, 71, 71]])
    np.testing.assert_array_equal(cat[:, 0], [oc.PR, oc.SD])


def test_only_target_lesions_enter_the_sum():
    target = on_grid([100, 60, 60, 60, 60, 60, 60])
    other = on_grid([50, 200, 200, 200, 200, 200, 200])
    diameters = np.stack([target, other], axis=1)  # (1, 2 lesions, T)
    both = oc.recist_assessments(DAYS, diameters).category
    first = oc.recist_assessments(DAYS, diameters, target_mask=[True, False]).category
    assert both[0, 0] == oc.PD and first[0, 0] == oc.PR


# ---------------------------------------------------------------------------------------------
# Best overall response
# ---------------------------------------------------------------------------------------------
def test_best_response_of_the_reference_cohort():
    np.testing.assert_array_equal(bor(COHORT).category, COHORT_BOR)


def test_best_response_ignores_assessments_after_progression():
    # SD, then PD from the nadir, then a shrinkage that would be a PR: BOR is SD
    best = bor([[100, 90, 115, 60, 60, 60, 60]])
    assert best.category[0] == oc.SD
    assert best.progression_day[0] == 112.0
    # the waterfall value stops at the first PD: -10 %, not -40 %
    assert best.best_percent_change[0] == pytest.approx(-10.0)


def test_progression_at_first_assessment_gives_pd():
    best = bor([[40, 60, 70, 80, 90, 100, 110]])
    assert best.category[0] == oc.PD and best.best_percent_change[0] == pytest.approx(50.0)


@pytest.mark.parametrize(
    "values, confirmed",
    [
        ([100, 60, 90, 90, 90, 90, 90], oc.SD),  # a single PR is unconfirmed
        ([100, 60, 60, 90, 90, 90, 90], oc.PR),
        ([100, 0.9, 4, 4, 4, 4, 4], oc.CR),  # 4 mm is below the detection limit: CR confirmed
        ([100, 0.9, 6, 6, 6, 6, 6], oc.SD),  # CR, then a lesion seen again (PD) before confirmation
        ([100, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], oc.CR),
        ([100, 90, 90, 90, 90, 90, 60], oc.SD),  # PR at the last assessment cannot be confirmed
        ([100, 60, 71, 65, 71, 71, 71], oc.PR),  # PR, SD, PR: an intervening SD is allowed
        ([100, 60, 80, 80, 80, 80, 80], oc.SD),  # PD (80 vs nadir 60) before any confirmation
    ],
)
def test_confirmation_needs_a_later_response_before_progression(values, confirmed):
    unconfirmed = bor([values]).category[0]
    assert unconfirmed in (oc.CR, oc.PR)
    assert bor([values], confirm=True).category[0] == confirmed


def test_a_cr_confirmed_only_by_a_pr_is_a_confirmed_pr():
    # From diameters a CR can no longer be followed by a PR (a lesion seen again is PD), but the
    # confirmation rule still reads categories as RECIST states it.
    days = np.array([56.0, 112.0, 168.0])
    cat = np.array([[oc.CR, oc.PR, oc.SD]])
    a = oc.RecistAssessments(days, np.array([100.0]), np.zeros((1, 3)), np.zeros((1, 3)), cat, np.array([True]))
    assert oc.best_overall_response(a, confirm=True).category[0] == oc.PR
    assert oc.best_overall_response(a).category[0] == oc.CR


def test_confirmation_needs_at_least_four_weeks():
    values = [[100, 60, 60, 60]]
    assert bor(values, [28.0, 42.0, 300.0], confirm=True).response_day[0] == 28.0  # 28 → 300 confirms
    values = [[100, 60, 60, 90]]
    assert bor(values, [28.0, 42.0, 300.0], confirm=True).category[0] == oc.SD  # 14 days apart only
    assert bor(values, [28.0, 42.0, 300.0], confirm=True, confirm_min_days=14.0).category[0] == oc.PR


def test_stable_disease_counts_only_after_sd_min_days():
    early = [28.0, 84.0]
    assert bor([[100, 95, 130]], early).category[0] == oc.PD  # SD at day 28 only, then PD
    assert bor([[100, 95, 95]], early).category[0] == oc.SD  # SD again at day 84
    assert bor([[100, 95]], [28.0]).category[0] == oc.NE  # nothing qualifies
    assert bor([[100, 95]], [28.0], sd_min_days=28.0).category[0] == oc.SD


def test_disease_control_rate_uses_the_sd_timing():
    diameters = on_grid([[100, 95, 130], [100, 60, 60], [100, 95, 95]], [28.0, 84.0])
    s = oc.summarise(DAYS, diameters, assessment_days=[28.0, 84.0])
    assert s["dcr"] == pytest.approx(2 / 3) and s["pd"] == pytest.approx(1 / 3)
    s = oc.summarise(DAYS, diameters, assessment_days=[28.0, 84.0], sd_min_days=100.0)
    assert s["dcr"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# Rates with failed patients
# ---------------------------------------------------------------------------------------------
def test_orr_excludes_failed_patients_and_counts_them():
    diameters = on_grid(COHORT)
    diameters[[2, 7]] = np.nan  # two failed solves, both responders had they succeeded
    ok = np.ones(len(COHORT), bool)
    ok[[2, 7]] = False
    s = oc.summarise(DAYS, diameters, ok)
    assert (s["n_patients"], s["n_failed"], s["n_evaluated"]) == (10, 2, 8)
    assert s["orr"] == pytest.approx(3 / 8)  # CR, PR, CR among the 8 valid
    assert s["orr_ci"] == pytest.approx(oc.binomial_ci(3, 8))
    assert s["dcr"] == pytest.approx(7 / 8)
    assert s["cr"] + s["pr"] + s["sd"] + s["pd"] + s["ne"] == pytest.approx(1.0)
    assert sum(s["km"]["n_events"]) + sum(s["km"]["n_censored"]) == 8
    best = oc.best_overall_response(oc.recist_assessments(DAYS, diameters, status_ok=ok))
    assert np.all(best.category[[2, 7]] == oc.NE)


def test_binomial_ci_matches_closed_forms_and_scipy():
    assert oc.binomial_ci(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1), abs=1e-12)
    assert oc.binomial_ci(10, 10) == pytest.approx((0.025 ** 0.1, 1.0), abs=1e-12)
    ref = scipy.stats.binomtest(7, 20).proportion_ci(0.95, method="exact")
    assert oc.binomial_ci(7, 20) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert all(math.isnan(x) for x in oc.binomial_ci(0, 0))


# ---------------------------------------------------------------------------------------------
# Time-to-event endpoints
# ---------------------------------------------------------------------------------------------
def test_time_to_progression_is_first_pd_else_censored_at_last_assessment():
    ttp = oc.time_to_progression(bor(COHORT))
    np.testing.assert_array_equal(ttp.days, [336, 336, 168, 336, 56, 224, 336, 336, 112, 336])
    np.testing.assert_array_equal(ttp.event, [0, 0, 1, 0, 1, 1, 0, 0, 1, 0])


def test_duration_of_response_runs_from_first_response_to_progression():
    dor = oc.duration_of_response(bor(COHORT))
    responders = np.array(COHORT_BOR) <= oc.PR
    assert np.all(np.isnan(dor.days[~responders]))
    # CR (PR from 56), PR from 56, PR 56 → PD 168, PR from 224, PR from 56 (→ CR); censored at 336
    np.testing.assert_array_equal(dor.days[responders], [280, 280, 112, 112, 280])
    np.testing.assert_array_equal(dor.event[responders], [0, 0, 1, 0, 0])


def test_pfs_takes_the_earlier_of_progression_and_death():
    ttp = oc.time_to_progression(bor(COHORT))
    assert np.array_equal(oc.progression_free_survival(ttp).days, ttp.days)
    rate = 1 / 200.0
    pfs = oc.progression_free_survival(ttp, death_rate_per_day=rate, seed=3)
    death = oc.death_times(len(COHORT), rate, seed=3)
    np.testing.assert_array_equal(pfs.days, np.minimum(ttp.days, death))
    np.testing.assert_array_equal(pfs.event, ttp.event | (death < ttp.days))
    assert np.any(death < ttp.days)  # the seed gives some deaths, so the branch is exercised
    again = oc.progression_free_survival(ttp, death_rate_per_day=rate, seed=3)
    np.testing.assert_array_equal(again.days, pfs.days)


def test_death_times_are_exponential_with_the_given_rate():
    death = oc.death_times(20000, 1 / 300.0, seed=0)
    assert scipy.stats.kstest(death, "expon", args=(0, 300.0)).pvalue > 1e-3


def test_out_of_field_response_uses_that_lesion_alone():
    irradiated = on_grid([[50, 10, 10, 10, 10, 10, 10]] * 3)
    distant = on_grid([[40, 39, 38, 38, 38, 38, 38], [40, 30, 28, 28, 28, 28, 28], [40, 20, 20, 20, 20, 20, 20]])
    diameters = np.stack([irradiated, distant], axis=1)
    ok = np.array([True, True, False])
    flags = oc.out_of_field_response(DAYS, diameters, 1, ok)
    np.testing.assert_array_equal(flags, [False, True, False])
    assert oc.rate(flags, ok).estimate == 0.5


def test_pathological_response_thresholds():
    v = np.array([0.0, 5e-4, 0.05, 0.10, 0.2, np.nan])
    path = oc.pathological_response(v)
    np.testing.assert_array_equal(path.pcr, [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(path.mpr, [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(path.evaluable, [1, 1, 1, 1, 1, 0])
    per_lesion = oc.pathological_response(np.array([[0.0, 0.3], [0.0, np.nan]]))  # worst resected lesion
    np.testing.assert_array_equal(per_lesion.pcr, [False, True])


# ---------------------------------------------------------------------------------------------
# Kaplan–Meier against lifelines
# ---------------------------------------------------------------------------------------------
def random_censored(seed, n=80):
    rng = np.random.default_rng(seed)
    durations = np.round(rng.exponential(200.0, n) / 7.0) * 7.0 + 1.0  # weekly rounding: ties
    events = rng.random(n) < 0.7
    if seed == 2:
        events[np.argmax(durations)] = True  # curve ends at 0
    return durations, events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kaplan_meier_matches_lifelines(seed):
    lifelines = pytest.importorskip("lifelines")
    durations, events = random_censored(seed)
    km = oc.kaplan_meier(durations, events)
    ref = lifelines.KaplanMeierFitter().fit(durations, events)
    np.testing.assert_array_equal(km.time, ref.timeline)
    np.testing.assert_allclose(km.survival, ref.survival_function_.iloc[:, 0].to_numpy(), rtol=0, atol=1e-10)
    ci = ref.confidence_interval_.to_numpy()
    np.testing.assert_allclose(km.ci_lower, ci[:, 0], rtol=0, atol=1e-8)
    np.testing.assert_allclose(km.ci_upper, ci[:, 1], rtol=0, atol=1e-8)
    np.testing.assert_array_equal(km.n_at_risk, ref.event_table["at_risk"].to_numpy())
    median, (low, high) = oc.median_survival(km)
    assert median == ref.median_survival_time_
    ref_ci = lifelines.utils.median_survival_times(ref.confidence_interval_).to_numpy().ravel()
    assert (low, high) == (ref_ci[0], ref_ci[1])


def test_median_not_reached_is_inf():
    km = oc.kaplan_meier([10.0, 20.0, 30.0, 40.0], [True, False, False, False])
    assert oc.median_survival(km)[0] == math.inf
    assert oc.survival_at(km, [0.0, 10.0, 35.0]) == pytest.approx([1.0, 0.75, 0.75])


# ---------------------------------------------------------------------------------------------
# Smooth versions
# ---------------------------------------------------------------------------------------------
TEMPERATURES = [0.1, 0.03, 0.01, 0.003, 0.001]


def test_soft_best_response_converges_to_the_hard_one():
    diameters = on_grid(COHORT)
    hard = np.eye(5)[oc.best_overall_response(oc.recist_assessments(DAYS, diameters)).category]
    errors = []
    for temperature in TEMPERATURES:
        p = np.asarray(oc.soft_best_response_probabilities(DAYS, jnp.asarray(diameters), temperature=temperature))
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
        assert np.all(p >= 0)
        errors.append(np.max(np.abs(p - hard)))
    assert np.all(np.diff(errors) < 0), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-3, errors


def test_soft_progression_free_curve_converges_to_kaplan_meier():
    diameters = on_grid(COHORT)
    ttp = oc.time_to_progression(bor(COHORT))
    eval_days = np.array([0.0, 50.0, 56.0, 100.0, 112.0, 170.0, 224.0, 300.0, 336.0])
    hard = oc.survival_at(oc.kaplan_meier(ttp.days, ttp.event), eval_days)
    errors = []
    for temperature in TEMPERATURES:
        per_patient = oc.soft_progression_free_probability(DAYS, jnp.asarray(diameters), eval_days,
                                                           temperature=temperature)
        errors.append(np.max(np.abs(np.asarray(oc.soft_cohort_mean(per_patient)) - hard)))
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < 1e-3, errors


# Courses from the review of the smooth endpoints (issue 15), SOD at baseline and 6 scans.
REVIEW_COURSES = {
    "stable": [100, 100, 100, 100, 100, 100, 100],
    "plateau_-15%": [100, 85, 85, 85, 85, 85, 85],
    "responder_-40%": [100, 60, 60, 60, 60, 60, 60],
    "early_progressor": [40, 60, 70, 80, 90, 100, 110],
    "complete_response": [100, 30, 3, 2, 2, 2, 2],
    "regrowth_after_cr": [100, 30, 3, 9, 12, 15, 18],
}


def soft_and_hard(values, temperature, assessment_days=None):
    diameters = on_grid(values, assessment_days)
    a = oc.recist_assessments(DAYS, diameters, assessment_days=assessment_days)
    best = oc.best_overall_response(a)
    ttp = oc.time_to_progression(best)
    eval_days = np.array([0.0, 56.0, 112.0, 168.0, 224.0, 280.0, 336.0])
    hard_pf = oc.survival_at(oc.kaplan_meier(ttp.days, ttp.event), eval_days)
    p = oc.soft_best_response_probabilities(DAYS, jnp.asarray(diameters), temperature=temperature,
                                            assessment_days=assessment_days)
    pf = oc.soft_progression_free_probability(DAYS, jnp.asarray(diameters), eval_days, temperature=temperature,
                                              assessment_days=assessment_days)
    return np.asarray(p)[0], np.eye(5)[best.category[0]], np.asarray(pf)[0], hard_pf


@pytest.mark.parametrize("name", list(REVIEW_COURSES))
def test_soft_endpoints_of_review_courses_converge_to_the_hard_ones(name):
    errors = []
    for temperature in TEMPERATURES:
        p, hard, pf, hard_pf = soft_and_hard([REVIEW_COURSES[name]], temperature)
        errors.append(max(np.max(np.abs(p - hard)), np.max(np.abs(pf - hard_pf))))
    assert np.all(np.diff(errors) <= 1e-15), errors
    assert errors[-1] < 1e-6, errors


def test_a_stable_tumor_is_progression_free_under_the_soft_nadir():
    # exact running nadir: each scan's PD is σ(-log 1.2 / τ) σ(-5 mm / (5 mm τ)); the old soft-min
    # nadir sat τ log(k + 1) below 100 mm and gave ~0.52 at day 168
    tau = 0.1
    _, _, pf, _ = soft_and_hard([REVIEW_COURSES["stable"]], tau)
    per_scan = scipy.special.expit(-math.log(1.2) / tau) * scipy.special.expit(-1.0 / tau)
    assert pf[3] == pytest.approx((1 - per_scan) ** 3, rel=1e-12)  # day 168: three scans
    assert pf[3] > 0.99998


def test_soft_response_is_the_best_scan_whatever_the_number_of_scans():
    # held at -15 % for 3 or for 6 scans: P(PR) is the one scan's σ(log(0.70 / 0.85) / τ) either way
    three = [56.0, 112.0, 168.0]
    for tau, expected in ((0.1, scipy.special.expit(math.log(0.70 / 0.85) / 0.1)), (0.003, 0.0)):
        p3 = soft_and_hard([[100, 85, 85, 85]], tau, three)[0]
        p6 = soft_and_hard([REVIEW_COURSES["plateau_-15%"]], tau)[0]
        assert p3[oc.PR] == pytest.approx(expected, abs=1e-4)
        assert p6[oc.PR] == pytest.approx(p3[oc.PR], abs=1e-4)
    assert p3[oc.PR] < 1e-20  # tau = 0.003: the hard answer, SD (7.8e-29)
    # a hard progressor at the first scan keeps only its one scan's chance of control
    p = soft_and_hard([REVIEW_COURSES["early_progressor"]], 0.1)[0]
    no_pd_first = 1 - scipy.special.expit(math.log(1.5 / 1.2) / 0.1) * scipy.special.expit((20 - 5) / 0.5)
    assert p[oc.CR] + p[oc.PR] + p[oc.SD] == pytest.approx(no_pd_first, rel=1e-8)  # disease control
    assert p[oc.SD] < 0.1  # the noisy-OR over scans gave 0.61


def test_soft_detection_limit_and_reappearance():
    lesion_gone = on_grid([100, 4, 4, 4, 4, 4, 4])
    lesion_seen = on_grid([50, 6, 6, 6, 6, 6, 6])
    lesion_back = on_grid([50, 4, 4, 8, 8, 8, 8])
    cases = [(np.stack([lesion_gone, lesion_gone], axis=1), oc.CR),
             (np.stack([lesion_gone, lesion_seen], axis=1), oc.PR),
             (np.stack([lesion_gone, lesion_back], axis=1), oc.CR)]  # CR, then PD at day 168
    for diameters, expected in cases:
        hard = oc.best_overall_response(oc.recist_assessments(DAYS, diameters)).category[0]
        assert hard == expected
        p = np.asarray(oc.soft_best_response_probabilities(DAYS, jnp.asarray(diameters), temperature=0.001))[0]
        assert p[expected] > 1 - 1e-6
    pf = oc.soft_progression_free_probability(DAYS, jnp.asarray(cases[2][0]), [112.0, 168.0], temperature=0.001)
    np.testing.assert_allclose(np.asarray(pf)[0], [1.0, 0.0], atol=1e-6)
    # a 2 mm limit sees the 4 mm lesions: no CR, PR by the sum
    p = oc.soft_best_response_probabilities(DAYS, jnp.asarray(cases[0][0]), temperature=0.001, detection_limit_mm=2.0)
    assert float(p[0, oc.PR]) > 1 - 1e-6


def test_soft_pfs_death_hazard_scales_by_expected_survival():
    diameters = jnp.asarray(on_grid(COHORT))
    eval_days = np.array([0.0, 100.0, 300.0])
    base = oc.soft_progression_free_probability(DAYS, diameters, eval_days)
    with_death = oc.soft_progression_free_probability(DAYS, diameters, eval_days, death_rate_per_day=0.01)
    np.testing.assert_allclose(with_death, base * np.exp(-0.01 * eval_days), rtol=1e-12)


def cohort_with_a_failure(growth):
    """The reference cohort with each SOD multiplied by exp(growth · t / 336) and one failed solve."""
    diameters = jnp.asarray(on_grid(COHORT)) * jnp.exp(growth * DAYS / 336.0)[None, :]
    diameters = diameters.at[3].set(jnp.nan)
    return diameters, np.arange(len(COHORT)) != 3


@pytest.mark.parametrize("temperature", [0.05, 0.001])
def test_soft_endpoints_have_finite_gradients_that_match_finite_differences(temperature):
    def orr(growth):
        diameters, ok = cohort_with_a_failure(growth)
        p = oc.soft_best_response_probabilities(DAYS, diameters, status_ok=ok, temperature=temperature)
        return oc.soft_cohort_mean(p[:, oc.CR] + p[:, oc.PR], ok)

    def pfs_at_200(growth):
        diameters, ok = cohort_with_a_failure(growth)
        s = oc.soft_progression_free_probability(DAYS, diameters, [200.0], status_ok=ok, temperature=temperature)
        return oc.soft_cohort_mean(s, ok)[0]

    for f in (orr, pfs_at_200):
        g = float(jax.grad(f)(0.02))
        assert np.isfinite(g) and np.isfinite(float(f(0.02)))
        if temperature > 0.01:  # finite differences only resolve the smooth regime
            h = 1e-5
            assert g == pytest.approx(float(f(0.02 + h) - f(0.02 - h)) / (2 * h), rel=1e-5)
            assert g != 0.0


def test_soft_cohort_mean_ignores_failed_patients():
    values = jnp.array([0.2, jnp.nan, 0.6])
    assert float(oc.soft_cohort_mean(values, np.array([True, False, True]))) == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_each_plot_writes_a_png(tmp_path):
    diameters = on_grid(COHORT)
    a = oc.recist_assessments(DAYS, diameters)
    best = oc.best_overall_response(a)
    ttp = oc.time_to_progression(best)
    km = oc.kaplan_meier(ttp.days, ttp.event)
    written = [
        plots.waterfall(tmp_path / "waterfall.png", best.best_percent_change, best.category),
        plots.spider(tmp_path / "spider.png", a.days, a.percent_change, best.category),
        plots.kaplan_meier_curve(tmp_path / "km.png", km, observed_median_days=150.0,
                                 observed_median_ci_days=(100.0, 250.0), observed_landmarks={180.0: 0.6}),
        plots.response_rate_comparison(tmp_path / "orr.png", ["PEMBRO-RT", "PACIFIC"], [0.3, 0.25],
                                       [[0.2, 0.4], [0.2, 0.3]], [0.36, 0.28], [[0.2, 0.5], [np.nan, np.nan]]),
        plots.response_rate_comparison(tmp_path / "orr_sim_only.png", ["a"], [0.3]),
    ]
    for path in written:
        assert path.parent == tmp_path
        assert_png(path)
