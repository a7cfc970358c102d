"""Bad user input, by category: every file and flag of ``qspjax simulate`` and ``qspjax trials`` is
refused before any compute with one line naming the file, the field, the value and what is
allowed, and exit status 2 without a traceback.

Loader-level details of regimens, parameter entries and trial arms are in ``test_regimen.py``,
``test_params.py`` and ``test_data.py``; this file checks each category end to end through the
CLI and the loaders' handling of files that are not YAML documents at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qspjax.cli import main
from qspjax.errors import QSPValidationError
from qspjax.data.trials import load_trial_file
from qspjax.params import load_parameter_file
from qspjax.regimen import MAX_CYCLES, load_regimen, parse_regimen
from qspjax.vpop import load_population

from conftest import REPO

REGIMEN = REPO / "configs" / "regimens" / "nivolumab_240mg_q2w.yaml"
POPULATION = REPO / "configs" / "params" / "population.yaml"
TRIAL = REPO / "configs" / "trials" / "NCT02492568.yaml"
ICI = {"drug": "nivolumab", "dose": 240, "unit": "mg", "interval_days": 14, "cycles": 3}
RT = {"dose_per_fraction_gy": 8, "fractions": 3, "days": [0, 2, 4]}


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with a single line on stderr and no traceback. Returns the line."""
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and "Traceback" not in captured.out
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


def simulate(tmp_path: Path, *extra: str, regimen: Path = REGIMEN) -> list[str]:
    return ["simulate", "--regimen", str(regimen), "--patients", "2", "--days", "5",
            "--out", str(tmp_path / "out"), *extra]


def write_yaml(path: Path, doc) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def regimen_file(tmp_path: Path, **top) -> Path:
    return write_yaml(tmp_path / "regimen.yaml", {"name": "test", **top})


# ---------------------------------------------------------------------------------------------
# Regimen files, one category per case, through `qspjax simulate`
# ---------------------------------------------------------------------------------------------
REGIMEN_CASES = {
    "unknown_drug": ({"ici": [dict(ICI, drug="nivolumabb")]}, "ici[0].drug", "'nivolumabb'", "pembrolizumab"),
    "unknown_unit": ({"ici": [dict(ICI, unit="mg/m2")]}, "ici[0].unit", "'mg/m2'", "'mg/kg'"),
    "negative_dose": ({"ici": [dict(ICI, dose=-240)]}, "ici[0].dose", "-240", "> 0"),
    "non_finite_dose": ({"ici": [dict(ICI, dose=float("inf"))]}, "ici[0].dose", "inf", "finite"),
    "dose_of_wrong_type": ({"ici": [dict(ICI, dose="240 mg")]}, "ici[0].dose", "'240 mg'", "a number"),
    "zero_interval": ({"ici": [dict(ICI, interval_days=0)]}, "ici[0].interval_days", "0", "> 0"),
    "cycles_without_end": ({"ici": [{k: v for k, v in ICI.items() if k != "cycles"}]}, "ici[0].cycles", "None",
                           "exactly one of 'cycles' or 'end_day'"),
    "course_without_a_real_end": ({"ici": [dict({k: v for k, v in ICI.items() if k != "cycles"}, end_day=1e9)]},
                                  "ici[0].end_day", "1000000000", f"at most {MAX_CYCLES}"),
    "too_many_cycles": ({"ici": [dict(ICI, cycles=10**7)]}, "ici[0].cycles", "10000000", f"<= {MAX_CYCLES}"),
    "rt_fraction_before_day_0": ({"rt": [dict(RT, days=[-2, 0, 2])]}, "rt[0].days[0]", "-2", ">= 0"),
    "rt_fractions_overlap": ({"rt": [RT, {"dose_per_fraction_gy": 2, "fractions": 1, "days": [4]}]},
                             "rt[1].days", "[4.0]", "overlaps"),
    "rt_fraction_count_unbounded": ({"rt": [{"dose_per_fraction_gy": 2, "fractions": 10**6}]},
                                    "rt[0].fractions", "1000000", "<= 200"),
    "chemo_kill_above_one": ({"chemo": [{"name": "cis", "kill_fraction": 50, "interval_days": 21, "cycles": 2}]},
                             "chemo[0].kill_fraction", "50", "<= 1"),
    "missing_required_field": ({"ici": [{k: v for k, v in ICI.items() if k != "unit"}]}, "ici[0].unit", "None",
                               "required"),
    "unknown_key": ({"ici": [dict(ICI, intervall_days=14)]}, "ici[0].intervall_days", "14", "misspelt"),
    "list_of_wrong_type": ({"rt": {"dose_per_fraction_gy": 8}}, "rt", "{'dose_per_fraction_gy': 8}", "a list"),
    "description_of_wrong_type": ({"description": ["a", "b"]}, "description", "['a', 'b']", "a string"),
}


@pytest.mark.parametrize("case", sorted(REGIMEN_CASES))
def test_bad_regimen_file_is_refused_naming_file_field_value_and_allowed(tmp_path, capsys, case):
    doc, field, value, allowed = REGIMEN_CASES[case]
    path = regimen_file(tmp_path, **doc)
    err = cli_error(simulate(tmp_path, regimen=path), capsys)
    assert err.startswith(f"qspjax: error: {path}: {field} = {value}"), err
    assert allowed in err
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_rt_on_a_lesion_the_run_does_not_model_is_refused_naming_the_file(tmp_path, capsys):
    # --no-variability starts from the exported one-lesion QSP-IO state: there is no second lesion.
    path = regimen_file(tmp_path, rt=[dict(RT, lesion="non_irradiated")])
    err = cli_error(simulate(tmp_path, "--no-variability", regimen=path), capsys)
    assert f"{path}: rt[0].lesion = 'non_irradiated'" in err and "1 lesion(s)" in err


def test_surgery_on_a_lesion_the_run_does_not_model_is_refused_not_dropped():
    from qspjax.commands.simulate import _check_regimen_fits_model

    reg = parse_regimen({"name": "x", "surgery": [{"day": 3, "lesion": "non_irradiated"}]})
    _check_regimen_fits_model(reg, 2, "r.yaml")  # two lesions: fine
    with pytest.raises(QSPValidationError) as exc:
        _check_regimen_fits_model(reg, 1, "r.yaml")
    assert exc.value.field == "surgery[0].lesion" and exc.value.source == "r.yaml"


# ---------------------------------------------------------------------------------------------
# Files that are not YAML documents: missing, a folder, binary, truncated, empty — every loader
# ---------------------------------------------------------------------------------------------
def _missing(tmp_path):
    return tmp_path / "missing.yaml", "cannot be read"


def _directory(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    return tmp_path / "folder.yaml", "cannot be read"


def _binary(tmp_path):
    p = tmp_path / "binary.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    return p, "not a UTF-8 text file"


def _truncated(tmp_path):
    p = tmp_path / "truncated.yaml"
    p.write_text("name: x\nici:\n  - {drug: nivolumab, dose: 240, unit: mg, interval", encoding="utf-8")
    return p, "not valid YAML"


def _empty(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("", encoding="utf-8")
    return p, "the file is empty"


FILE_PROBLEMS = {"missing": _missing, "directory": _directory, "binary": _binary, "truncated": _truncated,
                 "empty": _empty}
LOADERS = {"regimen": load_regimen, "parameters": load_parameter_file, "population": load_population,
           "trial": load_trial_file}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("problem", sorted(FILE_PROBLEMS))
def test_unreadable_files_raise_validation_errors_naming_the_file(tmp_path, loader, problem):
    path, allowed = FILE_PROBLEMS[problem](tmp_path)
    if loader == "trial" and problem == "empty":
        allowed = "a mapping is required"  # the trial reader names no field for an empty document
    with pytest.raises(QSPValidationError) as exc:
        LOADERS[loader](path)
    assert exc.value.source == str(path)
    assert allowed in exc.value.allowed
    assert "\n" not in str(exc.value)  # the CLI prints it as one line


@pytest.mark.parametrize("flag", ["--regimen", "--params", "--population"])
@pytest.mark.parametrize("problem", ["missing", "directory", "binary", "truncated"])
def test_cli_refuses_each_unreadable_input_file_with_one_line(tmp_path, capsys, flag, problem):
    path, allowed = FILE_PROBLEMS[problem](tmp_path)
    argv = simulate(tmp_path, *([] if flag == "--regimen" else [flag, str(path)]),
                    regimen=path if flag == "--regimen" else REGIMEN)
    err = cli_error(argv, capsys)
    assert str(path) in err and "(file)" in err and allowed in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Parameter files
# ---------------------------------------------------------------------------------------------
PARAMETER_CASES = {
    "parameters_of_wrong_type": ("parameters:\n  - k_C1_growth\n", "parameters", "a mapping"),
    "drugs_of_wrong_type": ("drugs: nivolumab\n", "drugs", "a mapping"),
    "initial_state_of_wrong_type": ("initial_state: {V_T.C1: 1}\n", "initial_state", "a list"),
    "initial_value_of_wrong_type": ("initial_state:\n  - {id: V_T.C1, value: lots, unit: cell}\n",
                                    "initial_state[0].value", "non-negative"),
    "initial_value_negative": ("initial_state:\n  - {id: V_T.C1, value: -5, unit: cell}\n",
                               "initial_state[0].value", "non-negative"),
    "initial_value_not_finite": ("initial_state:\n  - {id: V_T.C1, value: .inf, unit: cell}\n",
                                 "initial_state[0].value", "finite"),
    "initial_state_unknown_key": ("initial_state:\n  - {id: V_T.C1, value: 5, unti: cell}\n",
                                  "initial_state[0].unti", "unknown key"),
    "initial_state_missing_id": ("initial_state:\n  - {value: 5, unit: cell}\n", "initial_state[0]", "'id'"),
    "top_level_typo": ("parameter:\n  k_C1_growth: {value: 0.01, unit: 1/day}\n", "parameter", "unknown top-level"),
    "unknown_unit": ("parameters:\n  k_C1_growth: {value: 0.01, unit: furlongs}\n", "parameters.k_C1_growth.unit",
                     "convertible"),
}


@pytest.mark.parametrize("case", sorted(PARAMETER_CASES))
def test_bad_parameter_file_is_refused_by_the_cli_naming_file_and_field(tmp_path, capsys, case):
    text, field, allowed = PARAMETER_CASES[case]
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    err = cli_error(simulate(tmp_path, "--params", str(path)), capsys)
    assert err.startswith(f"qspjax: error: {path}: {field} = "), err
    assert allowed in err
    with pytest.raises(QSPValidationError) as exc:  # and the loader says the same without the CLI
        load_parameter_file(path)
    assert exc.value.field == field


# ---------------------------------------------------------------------------------------------
# Population files
# ---------------------------------------------------------------------------------------------
def _population(edit) -> dict:
    doc = yaml.safe_load(POPULATION.read_text(encoding="utf-8"))
    edit(doc)
    return doc


POPULATION_CASES = {
    "unknown_top_level_key": (lambda d: d.update(variabilty={}), "variabilty", "unknown key"),
    "unknown_parameter": (lambda d: d["variability"].update(k_C1_growht={"cv": 0.5}), "variability.k_C1_growht",
                          "not a model parameter"),
    "unknown_key_in_an_entry": (lambda d: d["variability"]["k_T1"].update(sd=0.5), "variability.k_T1.sd",
                                "unknown key"),
    "missing_cv": (lambda d: d["variability"]["k_T1"].pop("cv"), "variability.k_T1.cv", "required"),
    "cv_of_wrong_type": (lambda d: d["variability"]["k_T1"].update(cv="high"), "variability.k_T1.cv", "a number"),
    "cv_negative": (lambda d: d["variability"]["k_T1"].update(cv=-0.1), "variability.k_T1.cv", "[0, 1000)"),
    "unknown_distribution": (lambda d: d["variability"]["k_T1"].update(distribution="normal"),
                             "variability.k_T1.distribution", "lognormal"),
    "baseline_key_typo": (lambda d: d["baseline"].update(diameter_mm=d["baseline"].pop("diameter_cm")),
                          "baseline.diameter_mm", "unknown key"),
    "median_diameter_of_wrong_type": (lambda d: d["baseline"]["diameter_cm"].update(median="3 cm"),
                                      "baseline.diameter_cm.median", "a number"),
    "median_diameter_not_positive": (lambda d: d["baseline"]["diameter_cm"].update(median=0),
                                     "baseline.diameter_cm.median", "(0, inf)"),
    "diameter_max_below_min": (lambda d: d["baseline"]["diameter_cm"].update(min=5, max=2),
                               "baseline.diameter_cm.max", "[5, inf)"),
    "tps_probability_above_one": (lambda d: d["baseline"]["pdl1_tps"]["probabilities"].update(lt1=33),
                                  "baseline.pdl1_tps.probabilities.lt1", "[0, 1)"),
    "tps_multiplier_negative": (lambda d: d["baseline"]["pdl1_tps"]["pdl1_multiplier"].update(ge50=-3),
                                "baseline.pdl1_tps.pdl1_multiplier.ge50", "[0, inf)"),
    "tps_class_missing": (lambda d: d["baseline"]["pdl1_tps"]["probabilities"].pop("ge50"),
                          "baseline.pdl1_tps.probabilities", "exactly the keys"),
    "variability_of_wrong_type": (lambda d: d.update(variability=["k_T1"]), "variability", "a mapping"),
}


def test_the_shipped_population_file_passes_the_stricter_checks():
    spec = load_population(POPULATION)
    assert spec.diameter_median_cm == 3.0 and spec.tps_probabilities == (0.33, 0.37, 0.30)
    assert spec.cv["k_C1_growth"] == 0.5 and len(spec.names) == 8


@pytest.mark.parametrize("case", sorted(POPULATION_CASES))
def test_bad_population_file_is_refused_by_the_cli_naming_file_and_field(tmp_path, capsys, case):
    edit, field, allowed = POPULATION_CASES[case]
    path = write_yaml(tmp_path / "population.yaml", _population(edit))
    err = cli_error(simulate(tmp_path, "--population", str(path)), capsys)
    assert err.startswith(f"qspjax: error: {path}: {field} = "), err
    assert allowed in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Trial files, through `qspjax trials`
# ---------------------------------------------------------------------------------------------
def _trial_dir(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(TRIAL.read_text(encoding="utf-8"))
    edit(doc)
    directory = tmp_path / "trials"
    directory.mkdir()
    (directory / TRIAL.name).write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return directory


TRIAL_CASES = {
    "percentage_below_0": (lambda d: d["arms"][0].update(dcr_pct=-5), "arms[0].dcr_pct", "0–100"),
    "percentage_above_100": (lambda d: d["arms"][1].update(male_pct=140), "arms[1].male_pct", "0–100"),
    "empty_cohort": (lambda d: d["arms"][0].update(n=0), "arms[0].n", "integer >= 1"),
    "no_arms": (lambda d: d.update(arms=[]), "arms", "at least one arm"),
    "n_of_wrong_type": (lambda d: d["arms"][0].update(n="24"), "arms[0].n", "integer"),
    "missing_required_field": (lambda d: d["arms"][1].pop("follow_up_days"), "arms[1].follow_up_days", "required"),
    "unknown_key": (lambda d: d["arms"][0].update(medain_pfs_months=3.0), "arms[0].medain_pfs_months",
                    "unknown key"),
    "non_finite_number": (lambda d: d["arms"][0].update(median_age_years=float("nan")), "arms[0].median_age_years",
                          "an age in years"),
}


@pytest.mark.parametrize("case", sorted(TRIAL_CASES))
def test_bad_trial_file_is_refused_by_the_cli_naming_file_and_field(tmp_path, capsys, case):
    edit, field, allowed = TRIAL_CASES[case]
    directory = _trial_dir(tmp_path, edit)
    err = cli_error(["trials", "list", "--dir", str(directory)], capsys)
    assert err.startswith(f"qspjax: error: {directory / TRIAL.name}: {field} = "), err
    assert allowed in err


@pytest.mark.parametrize("problem", ["binary", "truncated"])
def test_cli_trials_refuses_an_unreadable_trial_file(tmp_path, capsys, problem):
    directory = tmp_path / "trials"
    directory.mkdir()
    path, allowed = FILE_PROBLEMS[problem](directory)
    path.rename(directory / TRIAL.name)
    err = cli_error(["trials", "show", "NCT02492568", "--dir", str(directory)], capsys)
    assert str(directory / TRIAL.name) in err and allowed in err


def test_cli_trials_refuses_a_file_given_as_the_directory(tmp_path, capsys):
    err = cli_error(["trials", "list", "--dir", str(TRIAL)], capsys)
    assert str(TRIAL) in err and "a directory" in err


# ---------------------------------------------------------------------------------------------
# Command-line options
# ---------------------------------------------------------------------------------------------
FLAG_CASES = {
    "patients_zero": (["--patients", "0"], "--patients = 0", "positive"),
    "patients_negative": (["--patients", "-4"], "--patients = -4", "positive"),
    "patients_not_an_integer": (["--patients", "2.5"], "--patients", "invalid int value: '2.5'"),
    "days_not_finite": (["--days", "nan"], "--days = nan", "number of days in (0, 36525"),
    "days_infinite": (["--days", "inf"], "--days = inf", "(0, 36525"),
    "days_beyond_a_century": (["--days", "1e6"], "--days = 1000000.0", "(0, 36525"),
    "output_grid_too_fine": (["--days", "400", "--output-every", "1e-6"], "--output-every = 1e-06",
                             "more than 1000000 saved time points"),
    "output_every_beyond_days": (["--output-every", "50"], "--output-every = 50.0", "(0, --days]"),
    "chunk_zero": (["--chunk", "0"], "--chunk = 0", "positive"),
    "rtol_too_loose": (["--rtol", "0.5"], "--rtol = 0.5", "(0, 1e-2)"),
    "seed_negative": (["--seed", "-1"], "--seed = -1", "non-negative"),
    "unknown_flag": (["--patinets", "3"], "unrecognized arguments: --patinets", "--help"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_simulate_flags_exit_2_with_one_line_naming_the_flag(tmp_path, capsys, case):
    argv, field, allowed = FLAG_CASES[case]
    err = cli_error(simulate(tmp_path, *argv), capsys)
    assert field in err and allowed in err
    assert not (tmp_path / "out").exists()


def test_missing_required_flag_exits_2_with_one_line(tmp_path, capsys):
    err = cli_error(["simulate", "--out", str(tmp_path / "out")], capsys)
    assert "--regimen" in err and "required" in err


def test_out_that_is_an_existing_file_is_refused(tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("keep me", encoding="utf-8")
    err = cli_error(simulate(tmp_path, "--overwrite"), capsys)
    assert f"--out = '{target}'" in err and "must be a folder" in err
    assert target.read_text(encoding="utf-8") == "keep me"


def test_unknown_trial_sub_command_exits_2_with_one_line(capsys):
    err = cli_error(["trials", "lst"], capsys)
    assert "invalid choice: 'lst'" in err
