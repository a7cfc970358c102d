"""The command line: a small simulate run end to end, and user errors as one line with exit 2."""

from __future__ import annotations

import csv
import json

import pytest

from qspjax.cli import main

from conftest import REFERENCE, REPO


def test_simulate_reference_patient_writes_trajectory_with_simbiology_columns(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["simulate", "--regimen", str(REPO / "configs/regimens/qspio_example1_nivolumab.yaml"),
               "--patients", "1", "--no-variability", "--uncalibrated", "--days", "3", "--out", str(out)])
    assert rc == 0
    header = next(csv.reader(open(out / "trajectory.csv")))
    ref_header = next(csv.reader(open(REFERENCE / "example1_treated_simbiology.csv")))
    assert header == ref_header
    rows = list(csv.DictReader(open(out / "trajectory.csv")))
    ref = list(csv.DictReader(open(REFERENCE / "example1_treated_simbiology.csv")))
    assert len(rows) == 4
    for col in ("tumour_diameter_cm", "drug_plasma_molar", "cd8_tumor_cells"):
        assert float(rows[3][col]) == pytest.approx(float(ref[3][col]), rel=0.01)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 0 and summary["patients"][0]["status"] == "ok"
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 0 and "jax" in run["versions"] and "git_revision" in run
    assert run["config"]["calibration"] == {
        "calibrated": False, "source": "not calibrated",
        "parameter_files": ["configs/params/qspio_example1.yaml"], "population_file": "configs/params/population.yaml"}
    assert (out / "trajectories.nc").stat().st_size > 0
    # a second run into the same folder is refused without --overwrite
    rc = main(["simulate", "--regimen", str(REPO / "configs/regimens/qspio_example1_nivolumab.yaml"),
               "--patients", "1", "--no-variability", "--uncalibrated", "--days", "3", "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv,field", [
    (["--patients", "0"], "--patients"),
    (["--patients", "-3"], "--patients"),
    (["--days", "-1"], "--days"),
    (["--output-every", "0"], "--output-every"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, argv, field):
    rc = main(["simulate", "--regimen", str(REPO / "configs/regimens/nivolumab_240mg_q2w.yaml"),
               "--out", str(tmp_path / "o")] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and field in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_regimen_file_exits_2_naming_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nici:\n  - {drug: nivolumab, dose: 240, unit: mg/m2, interval_days: 14, cycles: 2}\n")
    rc = main(["simulate", "--regimen", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.yaml" in err and "ici[0].unit" in err and "mg/kg" in err
