"""The shipped calibration: its parameter files load into the simulator, and fits/report.json is
consistent with the trial data, the arm selection and the fitted values it reports."""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO

CALIBRATED = REPO / "configs/params/calibrated"
REPORT = REPO / "fits/report.json"


@pytest.fixture(scope="module")
def report():
    return json.loads(REPORT.read_text())


def test_calibrated_files_load_and_carry_the_reported_medians(report):
    from qspjax.params import load_parameters
    from qspjax.vpop import load_population

    default = load_parameters()
    fitted = load_parameters(extra=[CALIBRATED / "advanced_params.yaml"])
    spec = load_population(CALIBRATED / "advanced_population.yaml")
    assert spec.names == load_population().names
    for pid, value in report["parameters"].items():
        if pid.endswith(".sd"):
            continue
        # the overlay holds the reported natural-scale median, in the model's internal units
        assert math.isclose(fitted.values[pid], value, rel_tol=1e-9), pid
        assert not math.isclose(fitted.values[pid], default.values[pid], rel_tol=1e-6), pid


def test_report_lists_every_selected_arm_with_consistent_numbers(report):
    from qspjax.data.trials import load_trials
    from qspjax.inference.config import load_arm_selection

    trials = load_trials()
    sel = load_arm_selection(REPO / "configs/inference/advanced_arms.yaml", tuple(a.arm_id for a in trials.arms))
    assert [r["id"] for r in report["arms"]] == list(sel.fit) + list(sel.held_out)
    assert [r["role"] for r in report["arms"]] == ["fitted"] * len(sel.fit) + ["held_out"] * len(sel.held_out)
    for r in report["arms"]:
        assert r["observed_orr_pct"] == pytest.approx(trials.get_arm(r["id"]).orr_pct)
        lo, hi = r["observed_orr_ci_pct"]
        assert lo <= r["observed_orr_pct"] <= hi
        assert r["inside_ci"] == (lo <= r["predicted_orr_pct"] <= hi)
        assert 0.0 <= r["predicted_orr_pct"] <= 100.0 and r["patients_solved_fraction"] == 1.0
    for role in ("fitted", "held_out"):
        rows = [r for r in report["arms"] if r["role"] == role]
        assert report["summary"][role]["inside_ci"] == sum(r["inside_ci"] for r in rows)


def test_default_calibration_is_the_posterior_median_of_the_library_fit():
    """The files every command runs by default hold the coordinate-wise posterior median of the
    committed library-route posterior (fits/posterior), medians in natural units and spreads as cv."""
    import numpy as np

    from qspjax.commands import _model_options as mo
    from qspjax.inference.predictive import load_posterior
    from qspjax.params import load_parameters
    from qspjax.vpop import load_population

    assert mo.CALIBRATED_PARAMS == CALIBRATED / "library_params.yaml"
    assert mo.CALIBRATED_POPULATION == CALIBRATED / "library_population.yaml"
    params = load_parameters(extra=[mo.CALIBRATED_PARAMS])
    spec = load_population(mo.CALIBRATED_POPULATION)
    post = load_posterior(REPO / "fits/posterior")
    assert {"blockade_emax_PD1", "blockade_emax_PDL1", "blockade_emax_CTLA4"} <= set(post.draws)
    for pid, draws in post.draws.items():
        med = float(np.median(draws))
        if pid.endswith(".sd"):
            sd = math.exp(med)
            assert spec.cv[pid[:-3]] == pytest.approx(math.sqrt(math.expm1(sd * sd)), rel=1e-5), pid
        else:
            logit = spec.distributions.get(pid) == "logitnormal"
            natural = 1.0 / (1.0 + math.exp(-med)) if logit else math.exp(med)
            assert params.values[pid] == pytest.approx(natural, rel=1e-9), pid


def test_report_library_route_is_consistent(report):
    from qspjax.data.trials import load_trials
    from qspjax.inference.crossval import trial_of

    trials = load_trials()
    lr = report["library_route"]
    for role in ("fitted", "cross_validated"):
        every = [r for r in lr["arms"] if r["role"] == role]
        for r in every:  # pCR / MPR where scored (an arm may carry them alone, without an ORR)
            for name, e in (r.get("pathology") or {}).items():
                assert e["inside_ci"] == (e["observed_ci"][0] <= e["predicted_pct"] <= e["observed_ci"][1]), name
        assert all(r.get("pathology") for r in every if r["observed_orr_pct"] is None)
        rows = [r for r in every if r["observed_orr_pct"] is not None]
        assert lr["summary"][role]["inside_ci"] == sum(r["inside_ci"] for r in rows)
        assert rows or role == "cross_validated"
        for r in rows:
            lo, hi = r["observed_orr_ci_pct"]
            assert lo <= r["observed_orr_pct"] <= hi
            assert r["inside_ci"] == (lo <= r["predicted_orr_pct"] <= hi)
            arm = trials.get_arm(r["id"])
            counts = (arm.cr_n, arm.pr_n, arm.sd_n, arm.pd_n)
            k, n = (arm.cr_n + arm.pr_n, sum(counts)) if None not in counts else (arm.responders, arm.n)
            assert r["observed_orr_pct"] == pytest.approx(100 * k / n)
            if role == "cross_validated":
                assert r["held_out_trial"] == trial_of(r["id"])
    fitted_ids = [r["id"] for r in lr["arms"] if r["role"] == "fitted"]
    assert set(r["id"] for r in lr["arms"] if r["role"] == "cross_validated") <= set(fitted_ids)
