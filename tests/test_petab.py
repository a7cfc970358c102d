"""`qspjax export-petab`: the QSP-IO reference problem as PEtab v1 that petab's linter accepts, and
qspjax's own simulation of the exported problem reproduces its measurements."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest

petab = pytest.importorskip("petab.v1", reason="petab (interop/test extra) is not installed")
pytest.importorskip("libsbml", reason="python-libsbml (test extra) is not installed")

from qspjax.interop import petab as qpetab  # noqa: E402

from conftest import REFERENCE  # noqa: E402


@pytest.fixture(scope="module")
def problem_dir(tmp_path_factory):
    from qspjax.cli import main

    out = tmp_path_factory.mktemp("petab") / "problem"
    assert main(["export-petab", "--out", str(out)]) == 0
    return out


def test_the_exported_problem_passes_the_petab_linter(problem_dir):
    assert sorted(p.name for p in problem_dir.iterdir()) == [
        "conditions.tsv", "measurements.tsv", "model.xml", "observables.tsv", "parameters.tsv", "problem.yaml"]
    assert qpetab.lint(problem_dir / "problem.yaml") == []
    problem = petab.Problem.from_yaml(str(problem_dir / "problem.yaml"))
    assert problem.sbml_model.getParameter("tumor_diameter_cm_irradiated") is not None
    assert list(problem.condition_df.index) == ["qspio_reference"]


def test_the_linter_is_not_a_rubber_stamp(problem_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(problem_dir, bad)
    rows = (bad / "parameters.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    first = rows[1].split("\t")
    first[header.index("lowerBound")] = "-1"  # a log10-scaled parameter with a negative bound
    (bad / "parameters.tsv").write_text("\n".join([rows[0], "\t".join(first)] + rows[2:]) + "\n")
    problems = qpetab.lint(bad / "problem.yaml")
    assert any("k_C1_growth" in p and "positive" in p for p in problems), problems


def test_parameters_have_bounds_scales_and_priors_around_the_nominal_values(problem_dir, params):
    problem = petab.Problem.from_yaml(str(problem_dir / "problem.yaml"))
    df = problem.parameter_df
    assert set(df.index) == set(qpetab.ESTIMATED)
    for pid, row in df.iterrows():
        nominal = params.values[pid]
        assert row["nominalValue"] == pytest.approx(nominal, rel=1e-15)
        assert row["parameterScale"] == "log10" and row["estimate"] == 1
        sd = qpetab.ESTIMATED[pid]
        assert row["lowerBound"] == pytest.approx(nominal * math.exp(-3 * sd))
        assert row["upperBound"] == pytest.approx(nominal * math.exp(3 * sd))
        mean, sd10 = (float(x) for x in row["objectivePriorParameters"].split(";"))
        assert mean == pytest.approx(math.log10(nominal)) and sd10 == pytest.approx(sd / math.log(10))
        # the SBML holds the same value: the table describes the exported model
        assert problem.sbml_model.getParameter(pid).getValue() == pytest.approx(nominal, rel=1e-15)


def test_measurements_are_the_simbiology_reference_solution(problem_dir):
    problem = petab.Problem.from_yaml(str(problem_dir / "problem.yaml"))
    m = problem.measurement_df
    assert len(m) == 5 * 57  # five observables, weekly days 7..399
    with open(REFERENCE / "example1_treated_simbiology.csv") as f:
        ref = {float(r["time_days"]): r for r in csv.DictReader(f)}
    for _, row in m.iterrows():
        sid, column, _ = qpetab.OBSERVABLES[row["observableId"]]
        assert row["measurement"] == float(ref[row["time"]][column])


@pytest.mark.slow
def test_qspjax_simulating_the_exported_problem_reproduces_its_measurements(problem_dir):
    yaml_path = problem_dir / "problem.yaml"
    problem = petab.Problem.from_yaml(str(yaml_path))
    sim = qpetab.simulate_petab(yaml_path)
    m = problem.measurement_df
    assert list(sim["observableId"]) == list(m["observableId"]) and list(sim["time"]) == list(m["time"])
    rel = np.abs(sim["simulation"].to_numpy() - m["measurement"].to_numpy()) / m["measurement"].to_numpy()
    # the 1 % of tests/test_model_reference.py; measured: below 0.1 % for every row
    assert rel.max() < 0.01, m.assign(rel=rel).sort_values("rel").tail(3)
    llh = petab.calculate_llh(m, sim, problem.observable_df, problem.parameter_df)
    # every residual is below 1 % on a log-scale sd of 0.1: llh is within 0.5 * n * 0.1^2 of its maximum
    n = len(m)
    best = -float(np.sum(np.log(np.sqrt(2 * np.pi) * 0.1 * m["measurement"].to_numpy())))
    assert best - 0.5 * n * 0.1 ** 2 <= llh <= best
    # the parameter table's values reach the model: a doubled growth rate no longer fits
    faster = qpetab.simulate_petab(yaml_path, {"k_C1_growth": 2 * problem.parameter_df.loc[
        "k_C1_growth", "nominalValue"]}, check_events=False)
    diam = (m["observableId"] == "tumor_diameter").to_numpy()
    assert np.max(faster["simulation"].to_numpy()[diam] / m["measurement"].to_numpy()[diam]) > 1.05


def test_a_problem_qspjax_cannot_run_is_refused_naming_what(problem_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(problem_dir, bad)
    text = (bad / "observables.tsv").read_text().replace("T0_T_irradiated", "k_C1_growth")
    (bad / "observables.tsv").write_text(text)
    with pytest.raises(qpetab.PetabError, match="treg_tumor.*'k_C1_growth' is not the SBML id"):
        qpetab.simulate_petab(bad / "problem.yaml")
    with pytest.raises(qpetab.PetabError, match=r"\['no_such_parameter'\]"):
        qpetab.simulate_petab(problem_dir / "problem.yaml", {"no_such_parameter": 1.0})


def test_cli_refuses_a_non_empty_folder_without_overwrite(problem_dir, capsys):
    from qspjax.cli import main

    assert main(["export-petab", "--out", str(problem_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err
