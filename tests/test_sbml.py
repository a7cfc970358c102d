"""The SBML export against the model: right-hand side, units, and a libRoadRunner simulation."""

from __future__ import annotations

import numpy as np
import pytest

libsbml = pytest.importorskip("libsbml")
roadrunner = pytest.importorskip("roadrunner")

from qspjax.interop import sbml  # noqa: E402
from qspjax.regimen import compile_schedule, parse_regimen  # noqa: E402
from qspjax.solver.simulate import STATUS_OK, SolverConfig, simulate_patient  # noqa: E402

OUTPUT_DAYS = np.array([0.0, 0.5, 2.0, 7.0, 13.5, 14.5, 21.0, 30.0])
COMPARED = ("C1", "C_x", "C_doomed", "T1_T", "T0_T", "T1_C", "T1_LN", "ab_C", "ab_T", "mAPC_LN", "M1p1_s",
            "pdl1_rt")


def _regimen():
    return parse_regimen({
        "name": "sbml-test",
        "ici": [{"drug": "nivolumab", "dose": 240, "unit": "mg", "interval_days": 14, "cycles": 2, "start_day": 0}],
        "rt": [{"dose_per_fraction_gy": 8, "fractions": 1, "days": [1], "lesion": "irradiated"}],
    })


@pytest.fixture(scope="module")
def patient(params):
    return sbml.reference_patient(params, n_lesions=2)


@pytest.fixture(scope="module")
def schedule(patient):
    return compile_schedule(_regimen(), ("nivolumab",), OUTPUT_DAYS, n_lesions=2)


@pytest.fixture(scope="module")
def sbml_text(patient, schedule):
    model, y0 = patient
    return sbml.export_sbml(model, y0, schedule)


@pytest.fixture(scope="module")
def runner(sbml_text):
    return roadrunner.RoadRunner(sbml_text)


def test_exported_rates_match_model_rates_to_1e_10(patient):
    # Without events: the treatment events would fire at t = 0 and move the state.
    model, y0 = patient
    runner = roadrunner.RoadRunner(sbml.export_sbml(model, y0))
    rates = dict(zip((c.rstrip("'") for c in runner.getRatesOfChangeNamedArray().colnames),
                     runner.getRatesOfChange()))
    ours = model.rates(y0)
    checked = 0
    for key, ids in sbml.state_names(model).items():
        for i, sid in np.ndenumerate(ids):
            want = float(np.asarray(ours[key])[i])
            assert rates[sid] == pytest.approx(want, rel=1e-10, abs=1e-300), sid
            checked += 1
    assert checked == 53
    # At the quasi-steady roots the (log) relaxation states do not move, relative to k_relax.
    for tag, vals in sbml.qss_values(model, y0).items():
        for sid, x in zip(np.atleast_1d(sbml._names_like(tag, np.shape(vals), model.drugs, 2)),
                          np.atleast_1d(np.asarray(vals))):
            assert runner[str(sid)] == pytest.approx(float(x), rel=1e-12), sid
            assert abs(rates[sbml.log_qss_name(str(sid))]) <= 1e-6 * sbml.K_RELAX_QSS_PER_DAY, sid


def test_document_is_consistent_and_states_units(sbml_text):
    doc = libsbml.readSBMLFromString(sbml_text)
    doc.setConsistencyChecks(libsbml.LIBSBML_CAT_UNITS_CONSISTENCY, False)
    doc.checkConsistency()
    errors = [doc.getError(i).getMessage() for i in range(doc.getNumErrors())
              if doc.getError(i).getSeverity() >= libsbml.LIBSBML_SEV_ERROR]
    assert errors == []
    m = doc.getModel()
    assert m.getTimeUnits() == "u_day"
    day = m.getUnitDefinition("u_day").getUnit(0)
    assert (libsbml.UnitKind_toString(day.getKind()), day.getMultiplier()) == ("second", 86400.0)
    assert m.getParameter("C1_irradiated").getUnits() == "u_cell"
    assert m.getParameter("ab_C_nivolumab").getUnits() == "u_molarity"
    assert m.getParameter("k_relax_qss").getValue() == sbml.K_RELAX_QSS_PER_DAY
    # Two dosing days, one RT day, two extinction events.
    assert m.getNumEvents() == 5


def test_no_comparison_holds_a_piecewise(sbml_text):
    """A piecewise inside a comparison (e.g. an extinction test on the cells an LQ-L fraction leaves)
    is a boolean-valued if-then-else that AMICI 1.0 refuses in an event or a piecewise condition;
    the export writes such branches with min/max instead."""
    import xml.etree.ElementTree as ET

    ns = "{http://www.w3.org/1998/Math/MathML}"
    relations = {f"{ns}{r}" for r in ("lt", "gt", "leq", "geq", "eq", "neq")}
    root = ET.fromstring(sbml_text)
    comparisons = [a for a in root.iter(f"{ns}apply") if len(a) and a[0].tag in relations]
    assert comparisons, "the export has comparisons (extinction tests, LQ-L) to check"
    bad = [a for a in comparisons if any(x.tag == f"{ns}piecewise" for x in a.iter())]
    assert bad == []
    assert "<min/>" in sbml_text  # the LQ-L transition, written as min(d, d_T)


def test_unit_strings_map_to_sbml_terms():
    assert sbml.unit_id("1/day/cell") == "u_per_day_per_cell"
    assert sbml.unit_factors("micrometer^2/molecule/day") == [
        ("metre", 2, -6, 1.0), ("item", -1, 0, 1.0), ("second", -1, 0, 86400.0)]
    assert sbml.unit_factors("molarity") == [("mole", 1, 0, 1.0), ("litre", -1, 0, 1.0)]
    with pytest.raises(ValueError):
        sbml.unit_factors("furlong")


def test_roadrunner_simulation_matches_simulate_patient_to_1e_4(patient, schedule, runner):
    model, y0 = patient
    traj = simulate_patient(model, y0, schedule, SolverConfig(rtol=1e-10, atol=1e-13, max_steps=100_000))
    assert int(traj.status) == STATUS_OK
    names = sbml.state_names(model)
    selected = [str(sid) for k in COMPARED for sid in np.asarray(names[k]).ravel()] + [
        "tumor_diameter_cm_irradiated", "tumor_diameter_cm_non_irradiated"]
    runner.reset()
    runner.integrator.relative_tolerance = 1e-10
    runner.integrator.absolute_tolerance = 1e-30
    runner.integrator.maximum_num_steps = 100_000
    out = runner.simulate(times=list(OUTPUT_DAYS), selections=["time"] + selected)
    assert np.allclose(out[:, 0], OUTPUT_DAYS)
    from qspjax.model.cancer import diameter_from_volume
    import jax

    diam = np.asarray(jax.vmap(lambda y: diameter_from_volume(model.lesion_volume(y)))(traj.ys))
    typical = {str(sid): float(np.asarray(v).ravel()[i]) for k, v in model.scales().items()
               for i, sid in enumerate(np.asarray(names[k]).ravel())}
    worst = {}
    for j, sid in enumerate(selected):
        if sid.startswith("tumor_diameter_cm"):
            ours = diam[:, QSPModelLesions.index(sid.split("tumor_diameter_cm_")[1])]
        else:
            key = next(k for k in COMPARED if sid in np.asarray(names[k]).ravel())
            idx = list(np.asarray(names[key]).ravel()).index(sid)
            ours = np.asarray(traj.ys[key]).reshape(len(OUTPUT_DAYS), -1)[:, idx]
        theirs = out[1:, j + 1]  # day 0 is the pre-event state in RoadRunner's output
        # relative error, floored at 1e-8 of the state's typical size for states at ~0
        scale = np.maximum(np.abs(ours[1:]), 1e-8 * typical.get(sid, 1.0))
        worst[sid] = float(np.max(np.abs(theirs - ours[1:]) / scale))
    print("worst relative deviation per state:", worst)
    assert max(worst.values()) < 1e-4, worst
    # The treatment moved the irradiated lesion: RT killed cells, the dose reached the blood.
    c1 = names["C1"][0]
    assert out[-1, 1 + selected.index(str(c1))] < 0.9 * float(y0["C1"][0])


QSPModelLesions = ["irradiated", "non_irradiated"]


def test_cli_export_sbml_writes_a_loadable_file_with_the_regimen_events(tmp_path):
    from qspjax.cli import main

    from conftest import REPO

    out = tmp_path / "model.xml"
    rc = main(["export-sbml", "--out", str(out), "--regimen", str(REPO / "configs/regimens/pembro_rt_sbrt.yaml"),
               "--lesions", "2", "--days", "30"])
    assert rc == 0
    m = libsbml.readSBMLFromFile(str(out)).getModel()
    # SBRT on days 0, 2, 4 and pembrolizumab on days 7 and 28: five treatment days + two extinction events.
    assert m.getNumEvents() == 7
    assert m.getParameter("ab_C_pembrolizumab") is not None
    assert m.getParameter("C1_non_irradiated") is not None


@pytest.mark.parametrize("argv, field", [(["--lesions", "3"], "--lesions"), (["--drugs", "aspirin"], "--drugs"),
                                         (["--k-relax", "-1"], "--k-relax")])
def test_cli_export_sbml_rejects_bad_input_with_exit_2(tmp_path, capsys, argv, field):
    from qspjax.cli import main

    rc = main(["export-sbml", "--out", str(tmp_path / "m.xml")] + argv)
    assert rc == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "m.xml").exists()


def test_the_interop_package_is_cheap_to_import_and_exposes_its_api():
    """``import qspjax.interop`` loads none of its submodules (libsbml, petab, the tracer); the
    public names resolve lazily to the submodules' objects."""
    import subprocess
    import sys

    code = ("import sys, qspjax.interop as i; "
            "print(sorted(m for m in sys.modules if m.startswith('qspjax.interop.') or m in ('libsbml', 'petab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import qspjax.interop as interop
    from qspjax.interop import omex as omex_mod

    assert interop.export_sbml is sbml.export_sbml
    assert interop.simulate_omex is omex_mod.simulate_omex
    with pytest.raises(AttributeError, match="no_such_name"):
        interop.no_such_name
