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
    assert calibration["parameter_files"][-1] == "configs/params/calibrated/advanced_params.yaml"
    assert calibration["population_file"] == "configs/params/calibrated/advanced_population.yaml"


def test_trial_with_an_unknown_arm_exits_2_listing_known_ids(tmp_path, capsys):
    rc = main(["trial", "--arm", "NCT00000000:nope", "--patients", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "NCT00000000:nope" in err and "NCT02492568" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
