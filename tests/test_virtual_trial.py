"""Virtual trials: experiment files, arm matching, published endpoints, and the trial/compare
commands end to end on a tiny cohort (same seed reproduces, another seed differs)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import yaml

from qspjax.cli import main
from qspjax.data import load_trials
from qspjax.errors import QSPValidationError
from qspjax.virtual_trial import load_experiment, published_endpoints
from qspjax.vpop import PopulationSpec, _median_diameter_cm, load_population, matched_spec, target_from_arm

from conftest import REPO, SHARED

EXPERIMENT = REPO / "configs/experiments/rt_nivolumab_protocols.yaml"
SEED_REVIEW = SHARED / "seeds/000_a842a0d63471a240.txt"


def test_shipped_protocol_comparison_has_the_seeds_six_protocols_and_orrs():
    exp = load_experiment(EXPERIMENT)
    assert len(exp.protocols) == 6 and exp.days == 400
    reported = [p.reported.get("orr") for p in exp.protocols]
    # the ORRs as the seed prints them, parsed from its text, not copied
    text = SEED_REVIEW.read_text()
    section = text[text.index("The case of the QSP-IO platform"):text.index("Conclusion", text.index("The case of the QSP-IO platform"))]
    printed = {int(x) / 100 for x in re.findall(r"(\d+)%", section)}
    assert {r for r in reported if r is not None} == {0.21, 0.37, 0.26, 0.51, 0.56} <= printed
    assert reported.count(None) == 1  # RT alone: simulated in the review, no value printed
    by_id = {p.protocol_id: p for p in exp.protocols}
    assert by_id["conc_60gy_nivo"].regimen.rt[0].fractions == 30
    assert by_id["seq_30gy_nivo"].regimen.rt[0].dose_per_fraction_gy == 30
    assert min(c.start_day for c in by_id["seq_3x8_nivo"].regimen.ici) > max(by_id["seq_3x8_nivo"].regimen.rt[0].days)


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(dayz=400), "dayz"),
    (lambda d: d["protocols"][0].update(reported={"orr": 1.5}), "protocols[0].reported.orr"),
    (lambda d: d["protocols"][1].update(id=d["protocols"][0]["id"]), "protocols[1].id"),
    (lambda d: d["protocols"][0].pop("regimen"), "protocols[0].regimen"),
    (lambda d: d.update(assessment={"target": "liver"}), "assessment.target"),
    (lambda d: d["protocols"][0]["regimen"]["ici"][0].update(unit="mg/m2"), "ici[0].unit"),
])
def test_bad_experiment_files_are_refused_naming_the_field(tmp_path, mutate, field):
    doc = yaml.safe_load(EXPERIMENT.read_text())
    mutate(doc)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(QSPValidationError) as err:
        load_experiment(bad)
    assert field in str(err.value) and "bad.yaml" in str(err.value)


def test_arm_baseline_target_reads_pdl1_classes_and_diameters():
    assert _median_diameter_cm("Diam: 2 cm (1.4–2.6)") == 2.0
    assert _median_diameter_cm("45 mm (31.0–59.8)") == 4.5
    assert _median_diameter_cm("median 24.5 mm") == 2.45
    assert _median_diameter_cm("GTV: 7.9 mL (0.6–270)") is None
    arm = next(a for a in load_trials().arms if a.pdl1_lt1_pct is not None and a.pdl1_ge50_pct is not None)
    target = target_from_arm(arm)
    lt1, mid, ge50 = target.tps_probabilities
    assert lt1 == pytest.approx(arm.pdl1_lt1_pct / 100) and ge50 == pytest.approx(arm.pdl1_ge50_pct / 100)
    assert lt1 + mid + ge50 == pytest.approx(1.0)
    spec = matched_spec(load_population(), target)
    assert isinstance(spec, PopulationSpec) and spec.tps_probabilities == target.tps_probabilities


def test_early_stage_arms_have_one_lesion_and_resectable_arms_resect_both_reading_the_primary():
    """Stage I-II patients have no second tumour: an early-stage arm's cohort seeds the model's
    second lesion empty. A resectable arm's operation removes both lesions and pathology reads
    the primary only (configs/trials: NCT02904954, NCT03694236, NCT04271384)."""
    trials = load_trials()
    early = [a for a in trials.arms if a.setting == "early_stage"]
    assert early and all(not target_from_arm(a).second_lesion for a in early)
    assert matched_spec(load_population(), target_from_arm(early[0])).second_lesion_median == 0.0
    advanced = next(a for a in trials.arms if a.setting == "advanced")
    assert target_from_arm(advanced).second_lesion
    assert matched_spec(load_population(), target_from_arm(advanced)).second_lesion_median > 0.0
    resectable = [a for a in trials.arms if a.setting == "resectable"]
    assert len(resectable) == 4
    for arm in resectable:
        regimen = parse_regimen(arm.regimen, arm.arm_id)
        assert {s.lesion for s in regimen.surgery} == {"irradiated", "non_irradiated"}, arm.arm_id
        assert regimen.pathology_lesions(2).tolist() == [True, False], arm.arm_id


def test_published_endpoints_of_pembro_rt_in_simulator_units():
    arm = next(a for a in load_trials().arms if a.nct_id == "NCT02492568" and a.role == "experimental")
    pub = published_endpoints(arm)
    assert pub["orr"] == pytest.approx(arm.orr_pct / 100)
    lo, hi = pub["orr_ci"]
    assert lo < pub["orr"] < hi
    if isinstance(arm.median_pfs_months, float):
        assert pub["median_pfs_days"] == pytest.approx(arm.median_pfs_months * 30.4375)


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    doc = yaml.safe_load(EXPERIMENT.read_text())
    doc["days"] = 60
    keep = {"nivolumab", "conc_3x8_nivo"}
    doc["protocols"] = [p for p in doc["protocols"] if p["id"] in keep]
    path = tmp_path_factory.mktemp("exp") / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _compare(path, out, seed):
    rc = main(["compare", str(path), "--patients", "3", "--seed", str(seed), "--output-every", "7",
               "--out", str(out)])
    assert rc == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_compare_runs_end_to_end_and_reproduces_with_its_seed(tiny_experiment, tmp_path):
    first = _compare(tiny_experiment, tmp_path / "a", 0)
    assert [p["id"] for p in first["protocols"]] == ["nivolumab", "conc_3x8_nivo"]
    for p in first["protocols"]:
        assert 0.0 <= p["orr"] <= 1.0 and p["n_evaluated"] + p["n_failed"] == 3
        assert p["orr_ci"][0] <= p["orr"] <= p["orr_ci"][1]
        assert p["cr"] + p["pr"] + p["sd"] + p["pd"] + p["summary"]["ne"] == pytest.approx(1.0)
    assert first["protocols"][0]["reported_orr"] == 0.21
    for name in ("orr_comparison.png", "comparison.md", "comparison.csv", "km_pfs_nivolumab.png", "run.json"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    again = _compare(tiny_experiment, tmp_path / "b", 0)
    assert again["protocols"] == first["protocols"]
    assert _patients(tmp_path / "b") == _patients(tmp_path / "a")
    _compare(tiny_experiment, tmp_path / "c", 1)
    baseline = lambda rows: [r["baseline_diameter_irradiated_mm"] for r in rows]
    assert baseline(_patients(tmp_path / "c")) != baseline(_patients(tmp_path / "a"))


def _patients(out):
    with open(out / "patients_nivolumab.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_trial_of_a_dataset_arm_writes_table_plots_and_published_values(tmp_path):
    arm = next(a for a in load_trials().arms if a.nct_id == "NCT02492568" and a.role == "experimental")
    out = tmp_path / "trial"
    rc = main(["trial", "--arm", arm.arm_id, "--patients", "3", "--days", "60", "--output-every", "7",
               "--target", "non_irradiated", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["published"]["orr"] == pytest.approx(arm.orr_pct / 100)
    assert summary["comparison"]["orr"]["simulated"] == summary["orr"]
    assert summary["assessment"]["target"] == "non_irradiated"
    rows = (out / "patients.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("patient,status,pdl1_tps_class")
    for name in ("waterfall.png", "spider.png", "km_pfs.png", "trajectories.nc", "run.json"):
        assert (out / name).stat().st_size > 0
    calibration = json.loads((out / "run.json").read_text())["config"]["calibration"]
    assert calibration["calibrated"] is True  # the default is the shipped calibration
    assert calibration["parameter_files"][-1] == "configs/params/calibrated/library_params.yaml"
    assert calibration["population_file"] == "configs/params/calibrated/library_population.yaml"


def test_trial_with_an_unknown_arm_exits_2_listing_known_ids(tmp_path, capsys):
    rc = main(["trial", "--arm", "NCT00000000:nope", "--patients", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "NCT00000000:nope" in err and "NCT02492568" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Issue 15, virtual_trial.py defects: outcome origin, predictive check, CI levels, fixed-time ORR
# ---------------------------------------------------------------------------------------------
import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import scipy.integrate  # noqa: E402
import scipy.stats  # noqa: E402

from qspjax import outcomes as oc  # noqa: E402
from qspjax.data.trials import load_trial_file  # noqa: E402
from qspjax.regimen import parse_regimen  # noqa: E402
from qspjax.runner import CohortResult  # noqa: E402
from qspjax.virtual_trial import (  # noqa: E402
    Assessment,
    compare_with_published,
    evaluate,
    trial_predictive_interval,
)

PACIFIC = "NCT02125461:crt_placebo"


def _cohort(days, diameters_mm, regimen=None):
    """A CohortResult of one-lesion patients with the given diameters (P, T) in mm."""
    d = np.asarray(diameters_mm, float)
    regimen = regimen or parse_regimen({"name": "synthetic"})
    return CohortResult(regimen=regimen, days=np.asarray(days, float),
                        observables={"tumor_diameter_cm": d[:, :, None] / 10.0},
                        status=np.zeros(len(d), int), baseline_diameter_cm=d[:, 0] / 10.0,
                        tps_class=np.zeros(len(d), int), drugs=(), lesions=("irradiated",),
                        viable_fraction_at_surgery=np.full(len(d), np.nan))


def _piecewise(days, knots):
    """Diameter (mm) linear between (day, mm) knots, constant after the last."""
    x, y = zip(*knots)
    return np.interp(days, x, y)


def _pacific_like(days):
    """A: 100 -> 60 mm during chemoradiation (days 0-53), then stable. B: the same to day 53, then
    +30 mm over 112 days (75 mm at 56 days after the origin, +25 % and +15 mm)."""
    a = _piecewise(days, [(0, 100), (53, 60)])
    b = _piecewise(days, [(0, 100), (53, 60), (165, 90)])
    return np.stack([a, b])


def test_evaluate_reads_recist_and_pfs_from_the_outcome_origin():
    days = np.arange(0.0, 401.0)
    result = _cohort(days, _pacific_like(days))
    out = evaluate(result, Assessment(origin_day=53.0))
    # baseline at the origin (60 mm): A is stable disease, B progresses at the first scan after it
    assert out.best.category.tolist() == [oc.SD, oc.PD]
    assert out.assessments.baseline_mm.tolist() == [60.0, 60.0]
    assert out.assessments.days[:3].tolist() == [56.0, 112.0, 168.0]  # counted from the origin
    assert [r["pfs_days"] for r in out.patients] == [336.0, 56.0]  # A censored at the last scan (53 + 336 = 389)
    assert [r["recist_baseline_sum_mm"] for r in out.patients] == [60.0, 60.0]
    assert out.summary["orr"] == 0.0 and out.summary["sd"] == 0.5 and out.summary["pd"] == 0.5
    assert out.summary["assessment"]["baseline_day"] == 53.0 and out.summary["assessment"]["origin_day"] == 53.0
    # regimen day 0 read (the defect): the chemoradiation shrinkage counts as a PR for both, and
    # B's PD comes at regimen day 112 (the day-56 scan is its nadir)
    from_day0 = evaluate(result, Assessment())
    assert from_day0.best.category.tolist() == [oc.PR, oc.PR]
    assert [r["pfs_days"] for r in from_day0.patients] == [392.0, 112.0]


def test_origin_between_grid_points_takes_the_nearest_and_is_refused_after_the_end():
    days = np.arange(0.0, 401.0, 7.0)  # 49, 56: day 53 reads at 56
    out = evaluate(_cohort(days, _pacific_like(days)), Assessment(origin_day=53.0))
    assert out.summary["assessment"]["baseline_day"] == 56.0
    assert out.assessments.baseline_mm.tolist() == pytest.approx([60.0, 60.0 + 30.0 * 3 / 112])
    with pytest.raises(QSPValidationError, match="origin_day"):
        evaluate(_cohort(days, _pacific_like(days)), Assessment(origin_day=399.0))


@pytest.mark.parametrize("field,value", [("origin_day", -1.0), ("origin_day", float("nan")),
                                         ("detection_limit_mm", 0.0), ("orr_assessment_day", 0.0),
                                         ("interval_days", -56.0), ("target", "liver"),
                                         ("death_rate_per_day", -0.1)])
def test_bad_assessment_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(QSPValidationError) as err:
        Assessment(**{field: value})
    assert err.value.field == field and "assessment" in str(err.value)


def test_assessment_detection_limit_defaults_to_recist_and_decides_cr():
    assert Assessment().detection_limit_mm == oc.DETECTION_LIMIT_MM == 5.0
    days = np.arange(0.0, 121.0)
    shrinks_to_4mm = _piecewise(days, [(0, 40), (50, 4)])[None, :]
    assert evaluate(_cohort(days, shrinks_to_4mm)).best.category.tolist() == [oc.CR]
    finer = evaluate(_cohort(days, shrinks_to_4mm), Assessment(detection_limit_mm=3.0))
    assert finer.best.category.tolist() == [oc.PR]


def test_trial_arm_runs_from_its_outcome_origin(tmp_path, monkeypatch):
    """`qspjax trial --arm PACIFIC` hands the arm's origin (day 53) to the evaluation: the cohort
    solver is replaced by the synthetic two-patient course above."""
    import qspjax.runner

    seen = {}

    def fake_run_cohort(params, regimen, *, n_patients, days, output_every, **kw):
        grid = np.arange(0.0, days + 1e-9, output_every)
        seen["days"] = days
        return _cohort(grid, _pacific_like(grid), regimen)

    monkeypatch.setattr(qspjax.runner, "run_cohort", fake_run_cohort)
    out = tmp_path / "pacific"
    rc = main(["trial", "--arm", PACIFIC, "--patients", "2", "--days", "400", "--out", str(out)])
    assert rc == 0 and seen["days"] == 400.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["assessment"]["origin_day"] == 53.0 and summary["assessment"]["baseline_day"] == 53.0
    assert summary["sd"] == 0.5 and summary["pd"] == 0.5 and summary["orr"] == 0.0
    assert summary["published"]["outcome_origin_day"] == 53.0
    assert summary["comparison"]["orr"]["predictive_n_trial"] == 237
    with open(out / "patients.csv") as f:
        assert [float(r["pfs_days"]) for r in csv.DictReader(f)] == [336.0, 56.0]
    # a horizon that ends before the origin is refused before anything runs
    rc = main(["trial", "--arm", PACIFIC, "--patients", "2", "--days", "50", "--out", str(tmp_path / "early")])
    assert rc == 2 and not (tmp_path / "early").exists()


def _beta_binomial_by_quadrature(x, m, n):
    """P(K = k) = ∫ Bin(k; n, p) Beta(p; x + 1/2, m - x + 1/2) dp, by quadrature."""
    prior = scipy.stats.beta(x + 0.5, m - x + 0.5)
    return np.array([scipy.integrate.quad(lambda p: scipy.stats.binom.pmf(k, n, p) * prior.pdf(p), 0, 1,
                                          points=[x / m], limit=200)[0] for k in range(n + 1)])


def test_predictive_interval_is_the_beta_binomial_of_the_trial_size():
    pmf = _beta_binomial_by_quadrature(6, 20, 15)
    cdf = np.cumsum(pmf)
    lo = int(np.flatnonzero(cdf >= 0.025)[0])
    hi = int(np.flatnonzero(cdf >= 0.975)[0])
    pi = trial_predictive_interval(6, 20, 15)
    assert (pi["lower"], pi["upper"]) == (lo / 15, hi / 15) == (1 / 15, 9 / 15)
    assert pi["cdf"] == pytest.approx(cdf, abs=1e-8)
    # a huge virtual cohort does not shrink it below the trial's own binomial spread
    big = trial_predictive_interval(300_000, 1_000_000, 20)
    assert (big["lower"], big["upper"]) == (scipy.stats.binom.ppf(0.025, 20, 0.3) / 20,
                                           scipy.stats.binom.ppf(0.975, 20, 0.3) / 20) == (0.1, 0.5)
    # posterior draws mix: the interval of two cohorts spans both
    mixed = trial_predictive_interval([2_000, 6_000], [10_000, 10_000], 20)
    assert mixed["lower"] == scipy.stats.binom.ppf(0.05, 20, 0.2) / 20
    assert mixed["upper"] == scipy.stats.binom.ppf(0.95, 20, 0.6) / 20
    with pytest.raises(QSPValidationError, match="n_trial|n ="):
        trial_predictive_interval(3, 10, 0)


def test_published_rate_is_checked_against_the_trials_sampling_error_not_the_cohorts_ci():
    # 10 000 virtual patients at 30 %: their CI is about ±0.9 points; a 20-patient trial printing
    # 45 % (9/20) is well within its sampling error, 55 % (11/20) is not
    summary = {"orr": 0.3, "orr_ci": oc.binomial_ci(3000, 10_000), "n_evaluated": 10_000, "cr": 0.1, "pr": 0.2,
               "sd": 0.4, "pd": 0.3, "dcr": 0.7, "median_pfs_days": 150.0}
    assert not summary["orr_ci"][0] <= 0.45 <= summary["orr_ci"][1]
    inside = compare_with_published(summary, {"n": 20, "orr": 0.45, "cr": 0.05})["orr"]
    assert inside["inside_predictive_interval"] is True and inside["predictive_interval"] == (0.1, 0.5)
    assert inside["predictive_level"] == 0.95 and "published_inside_simulated_ci" not in inside
    binom = scipy.stats.binom(20, 0.3)  # the cohort's posterior is all but a point at 10 000 patients
    assert inside["predictive_p_value"] == pytest.approx(2 * binom.sf(8), rel=0.02)
    outside = compare_with_published(summary, {"n": 20, "orr": 0.55})["orr"]
    assert outside["inside_predictive_interval"] is False
    assert outside["predictive_p_value"] == pytest.approx(2 * binom.sf(10), rel=0.02) and outside["predictive_p_value"] < 0.05
    rows = compare_with_published(summary, {"n": 20, "orr": 0.45, "cr": 0.05})
    assert rows["cr"]["inside_predictive_interval"] is True and "predictive_interval" not in rows["sd"]
    # with posterior draws the interval mixes over their cohorts: a draw at 60 % widens it to 55 %
    draws = [dict(summary), dict(summary, orr=0.6, n_evaluated=10_000)]
    mixed = compare_with_published(summary, {"n": 20, "orr": 0.55}, draws=draws)["orr"]
    assert mixed["predictive_over"] == "2 posterior draws" and mixed["inside_predictive_interval"] is True
    assert mixed["predictive_interval"] == (scipy.stats.binom.ppf(0.05, 20, 0.3) / 20,
                                           scipy.stats.binom.ppf(0.95, 20, 0.6) / 20)


def test_ninety_percent_cis_stay_ninety_percent():
    arms = {a.arm_id: a for a in load_trials().arms if a.nct_id == "NCT02888743"}
    assert arms and all(a.ci_level_pct == 90 for a in arms.values())
    arm = arms["NCT02888743:durva_treme"]
    pub = published_endpoints(arm)
    assert pub["ci_level"] == 0.90 and pub["orr_ci"] == (0.012, 0.218) and pub["dcr_ci"] == (0.159, 0.457)
    # without a printed ORR interval the exact one is computed at the arm's 90 %, not at 95 %
    no_ci = published_endpoints(dataclasses.replace(arm, orr_ci=None))
    assert no_ci["orr_ci"] == pytest.approx(oc.binomial_ci(3, 26, 0.90))
    assert no_ci["orr_ci"][1] == pytest.approx(scipy.stats.beta.ppf(0.95, 4, 23))
    assert no_ci["orr_ci"][1] < oc.binomial_ci(3, 26)[1]
    summary = {"orr": 0.25, "n_evaluated": 100, "dcr": 0.5, "median_pfs_days": 60.0}
    rows = compare_with_published(summary, pub)
    assert rows["orr"]["published_ci_level"] == 0.90 and rows["orr"]["simulated_inside_published_ci"] is False
    assert rows["dcr"]["simulated_inside_published_ci"] is False  # 0.5 > 0.457
    assert rows["median_pfs_days"]["simulated_inside_published_ci"] is True  # 60 d in 1.8-5.5 months
    # a 95 % arm says so
    pembro = next(a for a in load_trials().arms if a.nct_id == "NCT02492568" and a.role == "experimental")
    assert published_endpoints(pembro)["ci_level"] == 0.95


def test_response_at_a_fixed_time_is_the_read_then_not_the_best_response():
    days = np.arange(0.0, 401.0)
    courses = np.stack([
        _piecewise(days, [(0, 100), (150, 50)]),             # late responder: -50 % only after day 88
        _piecewise(days, [(0, 100), (56, 65), (88, 76)]),    # PR at day 56, regrown to -24 % (SD) at 88
        _piecewise(days, [(0, 100), (56, 125)]),             # PD at day 56
        _piecewise(days, [(0, 100), (80, 60)]),              # PR at the fixed read
    ])
    at_88 = oc.response_at_day(days, courses, 88.0)
    assert at_88.tolist() == [oc.SD, oc.SD, oc.PD, oc.PR]
    assert oc.response_at_day(days, courses, 30.0).tolist() == [oc.NE, oc.NE, oc.NE, oc.NE]  # SD needs 42 days
    with pytest.raises(QSPValidationError, match="day"):
        oc.response_at_day(days, courses, 500.0)
    result = _cohort(days, courses)
    best = evaluate(result, Assessment())
    assert best.best.category.tolist() == [oc.PR, oc.PR, oc.PD, oc.PR] and best.summary["orr"] == 0.75
    fixed = evaluate(result, Assessment(orr_assessment_day=88.0))
    assert fixed.summary["orr"] == 0.25 and fixed.summary["sd"] == 0.5 and fixed.summary["pd"] == 0.25
    assert fixed.summary["orr_ci"] == pytest.approx(oc.binomial_ci(1, 4))
    assert fixed.summary["best_overall_response_rates"]["orr"] == 0.75
    assert [r["response_at_orr_assessment"] for r in fixed.patients] == ["SD", "SD", "PD", "PR"]
    assert "day 88" in fixed.summary["response_read"]


def test_fixed_time_response_arms_carry_their_read_time():
    arms = {a.arm_id: a for a in load_trials().arms}
    assert arms["NCT02221739:rt_ipi"].orr_assessment_months == 2.9
    assert arms["NCT03168464:rt_ipi_nivo"].orr_assessment_months == 2.3
    assert {a.arm_id for a in arms.values() if a.orr_assessment_months is not None} == {
        "NCT02221739:rt_ipi", "NCT03168464:rt_ipi_nivo"}
    pub = published_endpoints(arms["NCT02221739:rt_ipi"])
    assert pub["orr_assessment_day"] == pytest.approx(2.9 * 30.4375)
    assert published_endpoints(arms[PACIFIC])["orr_assessment_day"] is None


@pytest.mark.parametrize("value,allowed", [(-1, ">= 0"), ("2.9 months", "a time in months"),
                                           (0, "> 0"), (60, "within follow_up_days")])
def test_bad_orr_assessment_months_is_refused_naming_file_and_field(tmp_path, value, allowed):
    src = REPO / "configs/trials/NCT02221739.yaml"
    doc = yaml.safe_load(src.read_text())
    doc["arms"][0]["orr_assessment_months"] = value
    bad = tmp_path / src.name
    bad.write_text(yaml.safe_dump(doc, allow_unicode=True))
    with pytest.raises(QSPValidationError) as err:
        load_trial_file(bad)
    assert "orr_assessment_months" in err.value.field and str(bad) in str(err.value) and allowed in str(err.value)


def _two_lesions(days, d):
    return CohortResult(regimen=parse_regimen({"name": "synthetic"}), days=days,
                        observables={"tumor_diameter_cm": d / 10.0}, status=np.zeros(len(d), int),
                        baseline_diameter_cm=d[:, 0].sum(axis=1) / 10.0, tps_class=np.zeros(len(d), int), drugs=(),
                        lesions=("irradiated", "non_irradiated"), viable_fraction_at_surgery=np.full(len(d), np.nan))


def test_target_lesion_choice_scores_the_chosen_lesion():
    # Two lesions: the irradiated one (0) shrinks 100 -> 20 mm, the other (1) grows 50 -> 80 mm.
    days = np.arange(0.0, 401.0, 7.0)
    d = np.stack([_piecewise(days, [(0, 100), (56, 20)]), _piecewise(days, [(0, 50), (56, 80)])], axis=-1)[None]
    best = {t: evaluate(_two_lesions(days, d), Assessment(target=t)).best.category.tolist()[0]
            for t in ("all", "irradiated", "non_irradiated")}
    # sum 150 -> 100 mm is -33 %: PR; the irradiated lesion alone -80 %: PR; the other +60 %: PD
    assert best == {"all": oc.PR, "irradiated": oc.PR, "non_irradiated": oc.PD}
    d[0, 1:, 0] = 4.0  # the irradiated lesion below the 5 mm detection limit after day 0
    assert evaluate(_two_lesions(days, d), Assessment(target="irradiated")).best.category.tolist() == [oc.CR]
    assert evaluate(_two_lesions(days, d), Assessment(target="all")).best.category.tolist() == [oc.PR]
    with pytest.raises(QSPValidationError, match="target"):
        Assessment(target="lesion_3")
    from qspjax.commands.trial import _TARGETS
    from qspjax.virtual_trial import TARGET_LESIONS

    assert _TARGETS == TARGET_LESIONS  # the CLI offers exactly what evaluate accepts
