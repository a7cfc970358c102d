"""SED-ML + COMBINE archive (OMEX) beside the SBML export: what the archive holds, that the SED-ML
parses and references the SBML, and that running it (libRoadRunner) reproduces qspjax's own
simulation and the QSP-IO SimBiology reference."""

from __future__ import annotations

import csv
import zipfile

import numpy as np
import pytest

libsedml = pytest.importorskip("libsedml", reason="python-libsedml (interop/test extra) is not installed")
libcombine = pytest.importorskip("libcombine", reason="python-libcombine (interop/test extra) is not installed")
libsbml = pytest.importorskip("libsbml", reason="python-libsbml (test extra) is not installed")

from qspjax.interop import omex  # noqa: E402

from conftest import REFERENCE  # noqa: E402


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The default archive of `qspjax export-sbml --omex`: the QSP-IO reference simulation."""
    from qspjax.cli import main

    out = tmp_path_factory.mktemp("omex")
    rc = main(["export-sbml", "--out", str(out / "model.xml"), "--omex", str(out / "reference.omex")])
    assert rc == 0
    return out / "reference.omex", (out / "model.xml").read_text()


def test_the_archive_lists_the_sbml_and_the_sedml_with_their_formats(archive):
    path, sbml_text = archive
    arc = libcombine.CombineArchive()
    assert arc.initializeFromArchive(str(path))
    try:
        entries = {arc.getEntry(i).getLocation(): arc.getEntry(i) for i in range(arc.getNumEntries())}
        formats = {loc.removeprefix("./"): e.getFormat() for loc, e in entries.items()}
        assert formats["model.xml"] == "http://identifiers.org/combine.specifications/sbml.level-3.version-2"
        assert formats["simulation.sedml"] == "http://identifiers.org/combine.specifications/sed-ml.level-1.version-4"
        master = arc.getMasterFile()
        assert master is not None and master.getLocation().removeprefix("./") == "simulation.sedml"
        # the SBML in the archive is the file written beside it, byte for byte
        assert arc.extractEntryToString(next(loc for loc in entries if loc.endswith("model.xml"))) == sbml_text
    finally:
        arc.cleanUp()
    with zipfile.ZipFile(path) as z:
        assert "manifest.xml" in z.namelist()
        manifest = z.read("manifest.xml").decode()
    assert 'location="model.xml"' in manifest and 'location="simulation.sedml"' in manifest


def test_the_sedml_parses_and_describes_the_reference_time_course_of_the_sbml(archive):
    path, sbml_text = archive
    entries = omex.read_omex(path)
    doc = libsedml.readSedMLFromString(entries["simulation.sedml"][1])
    assert doc.getNumErrors(libsedml.LIBSEDML_SEV_ERROR) == 0 and omex.sedml_problems(doc) == []
    assert (doc.getLevel(), doc.getVersion()) == (1, 4)
    model = doc.getModel(0)
    assert model.getSource() == "model.xml" and model.getLanguage() == "urn:sedml:language:sbml.level-3.version-2"
    sim = doc.getSimulation(0)
    # shared/reference/qspio/example1_treated_scenario.json: 400 days, daily samples
    assert sim.isSedUniformTimeCourse()
    assert (sim.getInitialTime(), sim.getOutputStartTime(), sim.getOutputEndTime(), sim.getNumberOfSteps()) == (
        0.0, 0.0, 400.0, 400)
    assert sim.getAlgorithm().getKisaoID() == "KISAO:0000019"
    # every data generator but time reads one SBML parameter that exists, each observable element once
    sbml_model = libsbml.readSBMLFromString(sbml_text).getModel()
    targets = []
    for i in range(doc.getNumDataGenerators()):
        var = doc.getDataGenerator(i).getVariable(0)
        if var.isSetSymbol():
            assert var.getSymbol() == "urn:sedml:symbol:time"
            continue
        sid = var.getTarget().split("@id='")[1].rstrip("']")
        assert sbml_model.getParameter(sid) is not None, sid
        targets.append(sid)
    assert len(targets) == len(set(targets)) == 14  # the model's 14 observables, one lesion, one drug
    assert {"tumor_diameter_cm_irradiated", "C1_irradiated", "ab_C_nivolumab", "ab_T_nivolumab_irradiated",
            "pd1_signal_irradiated", "IL2_LN"} <= set(targets)
    # 29 doses (days 0, 14, ..., 392) are SBML events of the model the SED-ML runs
    assert sum(sbml_model.getEvent(i).getId().startswith("treatment_day_") for i in range(sbml_model.getNumEvents())) == 29
    report = doc.getOutput(0)
    assert report.isSedReport() and report.getNumDataSets() == 15


@pytest.mark.slow  # ~40 s; the SBML export is checked against libRoadRunner by a default test (test_sbml.py)
def test_the_archive_run_in_roadrunner_matches_qspjax_on_every_observable(archive, params):
    pytest.importorskip("roadrunner", reason="libroadrunner (test extra) is not installed")
    import jax

    from qspjax.interop import sbml
    from qspjax.regimen import compile_schedule, load_regimen
    from qspjax.solver.simulate import STATUS_OK, SolverConfig, simulate_patient

    days = 30.0
    got = omex.simulate_omex(archive[0], until=days)
    assert np.array_equal(got["dg_time"], np.arange(0.0, days + 1))
    model, y0 = sbml.reference_patient(params)
    schedule = compile_schedule(load_regimen(omex.reference_regimen_path()), model.drugs, np.arange(0.0, days + 1),
                                n_lesions=1)
    traj = simulate_patient(model, y0, schedule, SolverConfig(rtol=1e-10, atol=1e-13, max_steps=100_000))
    assert int(traj.status) == STATUS_OK
    obs = jax.vmap(model.observables)(traj.ys)
    worst = {}
    for name, sids in omex.observable_ids(model, y0).items():
        ours = np.asarray(obs[name]).reshape(len(got["dg_time"]), -1)
        for j, sid in enumerate(sids):
            theirs = got[f"dg_{sid}"]
            # day 0 is the pre-dose state in RoadRunner's output; from day 1 both are after doses
            scale = np.maximum(np.abs(ours[1:, j]), 1e-8 * np.max(np.abs(ours[:, j])) + 1e-300)
            worst[sid] = float(np.max(np.abs(theirs[1:] - ours[1:, j]) / scale))
    assert len(worst) == 14
    assert max(worst.values()) < 1e-4, worst
    # the dose reached the blood: the archive's simulation is the treated one
    assert got["dg_ab_C_nivolumab"][1] > 1e-7


def test_the_archive_run_reproduces_the_simbiology_reference_solution_over_400_days(archive):
    pytest.importorskip("roadrunner", reason="libroadrunner (test extra) is not installed")
    got = omex.simulate_omex(archive[0])
    assert np.array_equal(got["dg_time"], np.arange(401.0))  # the whole reference course ran
    with open(REFERENCE / "example1_treated_simbiology.csv") as f:
        ref = list(csv.DictReader(f))
    assert len(ref) == 401
    columns = {"tumour_diameter_cm": "tumor_diameter_cm_irradiated", "tumour_volume_l": "tumor_volume_l_irradiated",
               "cd8_tumor_cells": "T1_T_irradiated", "treg_tumor_cells": "T0_T_irradiated",
               "t_cells": "t_cells_tumor_irradiated", "dead_cells": "C_x_irradiated",
               "drug_plasma_molar": "ab_C_nivolumab", "drug_tumor_molar": "ab_T_nivolumab_irradiated",
               "tcell_density_per_ul": "cd8_density_per_ul_irradiated", "pd1_occupancy": "pd1_signal_irradiated"}
    # the rules of tests/test_model_reference.py: 1 % every day (floored at 1e-6 of the scale),
    # from day 1 (day 0 is pre-dose here, post-dose in SimBiology's output)
    for column, sid in columns.items():
        expected = np.array([float(r[column]) for r in ref])
        scale = abs(expected[0]) if expected[0] != 0 else np.max(np.abs(expected))
        err = np.abs(got[f"dg_{sid}"][1:] - expected[1:])
        tol = np.maximum(0.01 * np.abs(expected[1:]), 1e-6 * scale)
        assert np.all(err <= tol), (column, int(np.argmax(err / tol)) + 1, float(np.max(err / tol)))
    # cancer cells: 1 %, except during the collapse to extinction (< 2e7 cells), where a shift of
    # hours is allowed as long as the absolute error stays below 3e-5 of the initial count
    expected = np.array([float(r["cancer_cells"]) for r in ref])
    actual = got["dg_C1_irradiated"]
    collapse = (expected < 2e7) & (expected > 0)
    ok = np.abs(actual - expected) <= np.maximum(0.01 * np.abs(expected), 1e-6 * expected[0])
    assert np.all((ok | collapse)[1:])
    assert np.max(np.abs(actual - expected)[collapse]) < 3e-5 * expected[0]
    # the lesion dies out, as in SimBiology, within a day of it
    assert abs(int(np.argmax(actual == 0)) - int(np.argmax(expected == 0))) <= 1 and actual[-1] == 0


def test_broken_sedml_references_are_named():
    ids = {"tumor_diameter_cm": ["tumor_diameter_cm_irradiated"]}
    doc = libsedml.readSedMLFromString(omex.build_sedml(ids, days=10, steps=10))
    assert omex.sedml_problems(doc) == []
    doc.getOutput(0).getDataSet(1).setDataReference("dg_missing")
    doc.getTask(0).setSimulationReference("sim_missing")
    problems = omex.sedml_problems(doc)
    assert any("ds_tumor_diameter_cm_irradiated" in p and "'dg_missing'" in p for p in problems)
    assert any("task_reference" in p and "'sim_missing'" in p for p in problems)
    with pytest.raises(omex.OmexError, match="not parameters of the SBML.*tumor_diameter_cm_irradiated"):
        omex.build_sedml(ids, sbml_ids={"C1_irradiated"})
    with pytest.raises(omex.OmexError, match="steps must be a positive integer, got 2.5"):
        omex.build_sedml(ids, steps=2.5)


def test_a_file_that_is_not_an_archive_is_refused_naming_it(tmp_path):
    bad = tmp_path / "not.omex"
    bad.write_text("hello")
    with pytest.raises(omex.OmexError, match="not.omex"):
        omex.read_omex(bad)
    with pytest.raises(omex.OmexError, match="no such archive"):
        omex.read_omex(tmp_path / "missing.omex")


def test_cli_refuses_an_archive_path_equal_to_the_sbml_path(tmp_path, capsys):
    from qspjax.cli import main

    rc = main(["export-sbml", "--out", str(tmp_path / "m.xml"), "--omex", str(tmp_path / "m.xml")])
    assert rc == 2 and "--omex" in capsys.readouterr().err
    assert not (tmp_path / "m.xml").exists()
