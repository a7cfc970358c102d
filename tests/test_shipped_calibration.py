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
