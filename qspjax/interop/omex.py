"""SED-ML and COMBINE archive (OMEX) of a simulation of the SBML export, for other tools.

:func:`build_sedml` describes one uniform time course of the exported SBML (by default the
QSP-IO reference simulation: the reference patient under nivolumab 210 mg every 14 days, days 0
to 400, one output a day, as ``shared/reference/qspio/example1_treated_scenario.json``) with the
model's observables (:meth:`qspjax.model.composer.QSPModel.observables`) as SED-ML data
generators, a report of all of them and a plot of the tumor diameter. :func:`write_omex` packs the
SBML, the SED-ML and a manifest into a COMBINE archive that SED-ML tools (tellurium, COPASI,
BioSimulators, VCell) can run. :func:`simulate_omex` runs such an archive with libRoadRunner for
the subset of SED-ML written here (one uniform time course, data generators that are one
variable), so that the archive can be checked without a full SED-ML engine.

Requires ``python-libsedml`` and ``python-libcombine`` (the ``interop`` extra).

Output at the initial time: treatment events at day 0 fire after the initial state in
libRoadRunner's output, so its row at ``t = 0`` is the pre-dose state; SimBiology's reference
shows the post-dose state there. From the first step on, both are after the dose.

Tolerances: the SED-ML asks CVODE for relative tolerance 1e-8 and absolute tolerance 1e-10 (in the
exported internal units). With a tighter absolute tolerance (1e-12 or 1e-14) libRoadRunner 2.10's
CVODE stops with a convergence or "too much accuracy" failure between days 337 and 392, after
the lesion has died out; with 1e-10 it runs the 400 days and matches qspjax and the SimBiology
reference (``tests/test_omex.py``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np


SBML_FORMAT = "http://identifiers.org/combine.specifications/sbml.level-3.version-2"
SEDML_FORMAT = "http://identifiers.org/combine.specifications/sed-ml.level-1.version-4"
MANIFEST_FORMAT = "http://identifiers.org/combine.specifications/omex-manifest"
SBML_LANGUAGE = "urn:sedml:language:sbml.level-3.version-2"
SBML_L3V2_NS = "http://www.sbml.org/sbml/level3/version2/core"
TIME_SYMBOL = "urn:sedml:symbol:time"
KISAO_CVODE = "KISAO:0000019"
KISAO_RELATIVE_TOLERANCE = "KISAO:0000209"
KISAO_ABSOLUTE_TOLERANCE = "KISAO:0000211"
KISAO_MAXIMUM_STEPS = "KISAO:0000415"

MODEL_LOCATION = "model.xml"
SEDML_LOCATION = "simulation.sedml"
TASK_ID = "task_reference"
SIMULATION_ID = "sim_reference"

# The QSP-IO reference solution (shared/reference/qspio/example1_treated_scenario.json).
REFERENCE_DAYS = 400.0
REFERENCE_STEPS = 400
# Tolerances the SED-ML asks for (CVODE, on the exported internal units: cells, mol/L, L ...).
RELATIVE_TOLERANCE = 1e-8
ABSOLUTE_TOLERANCE = 1e-10  # tighter fails in libRoadRunner after day ~337 (module docstring)
MAXIMUM_STEPS = 1_000_000

# observable of QSPModel.observables -> (kind, SBML base id): "state" is a qspjax state key
# (exported as a rate-rule parameter per lesion/drug), "rule" a named assignment rule.
OBSERVABLE_TARGETS = {
    "tumor_volume_l": ("rule", "tumor_volume_l"),
    "tumor_diameter_cm": ("rule", "tumor_diameter_cm"),
    "cancer_cells": ("state", "C1"),
    "dead_cells": ("state", "C_x"),
    "t_cells_tumor": ("rule", "t_cells_tumor"),
    "cd8_tumor_cells": ("state", "T1_T"),
    "treg_tumor_cells": ("state", "T0_T"),
    "cd8_density_per_ul": ("rule", "cd8_density_per_ul"),
    "pd1_signal": ("rule", "pd1_signal"),
    "pd1_drug_occupancy": ("rule", "pd1_drug_occupancy"),
    "il2_ln_molar": ("rule", "IL2_LN"),
    "cd8_blood_cells": ("state", "T1_C"),
    "drug_plasma_molar": ("state", "ab_C"),
    "drug_tumor_molar": ("state", "ab_T"),
}


class OmexError(ValueError):
    """An archive or SED-ML file that cannot be written or run as asked, naming what and where."""


def _libs():
    try:
        import libcombine
        import libsedml
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise OmexError(f"SED-ML/OMEX export needs python-libsedml and python-libcombine "
                        f"(pip install 'qspjax[interop]'): {exc}") from None
    return libsedml, libcombine


def observable_ids(model, y0) -> dict[str, list[str]]:
    """{observable: [SBML id per element]} of the model's observables, lesion/drug order as in
    ``model.observables(y0)`` (flattened drug-major for drug x lesion arrays)."""
    from qspjax.interop import sbml

    obs = model.observables(y0)
    states = sbml.state_names(model)
    out: dict[str, list[str]] = {}
    for name, (kind, base) in OBSERVABLE_TARGETS.items():
        if name not in obs:
            continue
        if kind == "state":
            ids = np.asarray(states[base], dtype=object)
        else:
            ids = sbml._names_like(base, np.shape(obs[name]), model.drugs, model.n_lesions)
        if ids.shape != np.shape(obs[name]):
            raise OmexError(f"observable {name}: {ids.size} SBML ids for an array of shape {np.shape(obs[name])}")
        out[name] = [str(s) for s in np.ravel(ids)]
    return out


def _parameter_target(sid: str) -> str:
    return f"/sbml:sbml/sbml:model/sbml:listOfParameters/sbml:parameter[@id='{sid}']"


def sedml_problems(doc) -> list[str]:
    """What is wrong with a SED-ML document: libsedml's read errors (severity error or worse) and
    broken references (task -> model/simulation, variable -> task, data set/curve -> data
    generator). libsedml 2.0 has no full consistency check; these are the ones a runner trips on."""
    libsedml, _ = _libs()
    problems = [f"libsedml: {doc.getError(i).getMessage().strip()}" for i in range(doc.getNumErrors())
                if doc.getError(i).getSeverity() >= libsedml.LIBSEDML_SEV_ERROR]
    models = {doc.getModel(i).getId() for i in range(doc.getNumModels())}
    sims = {doc.getSimulation(i).getId() for i in range(doc.getNumSimulations())}
    tasks = {doc.getTask(i).getId() for i in range(doc.getNumTasks())}
    dgs = {doc.getDataGenerator(i).getId() for i in range(doc.getNumDataGenerators())}
    for i in range(doc.getNumTasks()):
        t = doc.getTask(i)
        if t.getModelReference() not in models:
            problems.append(f"task {t.getId()}: modelReference {t.getModelReference()!r} is not a model")
        if t.getSimulationReference() not in sims:
            problems.append(f"task {t.getId()}: simulationReference {t.getSimulationReference()!r} is not a simulation")
    for i in range(doc.getNumDataGenerators()):
        dg = doc.getDataGenerator(i)
        if not dg.isSetMath():
            problems.append(f"dataGenerator {dg.getId()}: no math")
        for j in range(dg.getNumVariables()):
            v = dg.getVariable(j)
            if v.getTaskReference() not in tasks:
                problems.append(f"dataGenerator {dg.getId()}: variable {v.getId()} references task "
                                f"{v.getTaskReference()!r}, not a task")
            if v.isSetSymbol() == v.isSetTarget():
                problems.append(f"dataGenerator {dg.getId()}: variable {v.getId()} needs one of symbol, target")
    for i in range(doc.getNumOutputs()):
        out = doc.getOutput(i)
        refs = []
        if out.isSedReport():
            refs = [(f"dataSet {out.getDataSet(j).getId()}", out.getDataSet(j).getDataReference())
                    for j in range(out.getNumDataSets())]
        elif out.isSedPlot2D():
            for j in range(out.getNumCurves()):
                c = out.getCurve(j)
                refs += [(f"curve {c.getId()}", c.getXDataReference()), (f"curve {c.getId()}", c.getYDataReference())]
        problems += [f"output {out.getId()}: {what} references {ref!r}, not a data generator"
                     for what, ref in refs if ref not in dgs]
    return problems


def _check_sedml(doc, what: str) -> None:
    problems = sedml_problems(doc)
    if problems:
        raise OmexError(f"{what}: {len(problems)} SED-ML problem(s): " + " | ".join(problems[:3]))


def build_sedml(
    ids: Mapping[str, list[str]],
    *,
    model_location: str = MODEL_LOCATION,
    days: float = REFERENCE_DAYS,
    steps: int = REFERENCE_STEPS,
    relative_tolerance: float = RELATIVE_TOLERANCE,
    absolute_tolerance: float = ABSOLUTE_TOLERANCE,
    sbml_ids: set[str] | None = None,
    description: str = "QSP-IO reference simulation",
) -> str:
    """SED-ML L1V4 text: the SBML at ``model_location``, a uniform time course 0..``days`` in
    ``steps`` steps (CVODE with the given tolerances), one data generator per element of ``ids``
    (:func:`observable_ids`) plus time, a report of all of them and a plot of the tumor diameter.

    ``sbml_ids``, when given, are the SBML's parameter ids: every target must be one of them.
    """
    libsedml, _ = _libs()
    if not (math.isfinite(days) and days > 0):
        raise OmexError(f"SED-ML time course: days must be a positive number, got {days!r}")
    if int(steps) != steps or steps < 1:
        raise OmexError(f"SED-ML time course: steps must be a positive integer, got {steps!r}")
    for tol_name, tol in (("relative_tolerance", relative_tolerance), ("absolute_tolerance", absolute_tolerance)):
        if not (math.isfinite(tol) and tol > 0):
            raise OmexError(f"SED-ML algorithm: {tol_name} must be positive, got {tol!r}")
    if sbml_ids is not None:
        missing = [sid for sids in ids.values() for sid in sids if sid not in sbml_ids]
        if missing:
            raise OmexError(f"SED-ML data generators: {len(missing)} target(s) are not parameters of the SBML, "
                            f"e.g. {missing[:3]}")
    doc = libsedml.SedDocument(1, 4)
    doc.getNamespaces().add(SBML_L3V2_NS, "sbml")
    model = doc.createModel()
    model.setId("model")
    model.setName("qspjax NSCLC QSP model, one patient (SBML export)")
    model.setLanguage(SBML_LANGUAGE)
    model.setSource(model_location)

    sim = doc.createUniformTimeCourse()
    sim.setId(SIMULATION_ID)
    sim.setName(f"{description}: days 0 to {days:g}, {int(steps)} steps")
    sim.setInitialTime(0.0)
    sim.setOutputStartTime(0.0)
    sim.setOutputEndTime(float(days))
    sim.setNumberOfSteps(int(steps))
    alg = sim.createAlgorithm()
    alg.setKisaoID(KISAO_CVODE)
    alg.setName("CVODE (BDF): the model is stiff")
    for kisao, value in ((KISAO_RELATIVE_TOLERANCE, relative_tolerance), (KISAO_ABSOLUTE_TOLERANCE, absolute_tolerance),
                         (KISAO_MAXIMUM_STEPS, MAXIMUM_STEPS)):
        p = alg.createAlgorithmParameter()
        p.setKisaoID(kisao)
        p.setValue(repr(value) if isinstance(value, float) else str(value))

    task = doc.createTask()
    task.setId(TASK_ID)
    task.setModelReference("model")
    task.setSimulationReference(SIMULATION_ID)

    def data_generator(dg_id: str, name: str, *, symbol: str | None = None, target: str | None = None):
        dg = doc.createDataGenerator()
        dg.setId(dg_id)
        dg.setName(name)
        var = dg.createVariable()
        var.setId(f"v_{dg_id}")
        var.setTaskReference(TASK_ID)
        if symbol is not None:
            var.setSymbol(symbol)
        else:
            var.setTarget(target)
        dg.setMath(libsedml.parseFormula(f"v_{dg_id}"))
        return dg

    data_generator("dg_time", "time (day)", symbol=TIME_SYMBOL)
    report = doc.createReport()
    report.setId("report_observables")
    report.setName("observables of the reference patient")
    ds = report.createDataSet()
    ds.setId("ds_time")
    ds.setLabel("time_days")
    ds.setDataReference("dg_time")
    diameter_dgs = []
    for name, sids in ids.items():
        for sid in sids:
            dg_id = f"dg_{sid}"
            data_generator(dg_id, f"{name} ({sid})", target=_parameter_target(sid))
            ds = report.createDataSet()
            ds.setId(f"ds_{sid}")
            ds.setLabel(sid)
            ds.setName(name)
            ds.setDataReference(dg_id)
            if name == "tumor_diameter_cm":
                diameter_dgs.append(dg_id)
    if diameter_dgs:
        plot = doc.createPlot2D()
        plot.setId("plot_tumor_diameter")
        plot.setName("tumor diameter (cm) over days")
        for k, dg_id in enumerate(diameter_dgs):
            curve = plot.createCurve()
            curve.setId(f"curve_{dg_id}")
            curve.setXDataReference("dg_time")
            curve.setYDataReference(dg_id)
            curve.setType(libsedml.SEDML_CURVETYPE_POINTS)
            curve.setOrder(k)
    text = libsedml.writeSedMLToString(doc)
    _check_sedml(libsedml.readSedMLFromString(text), "the written SED-ML")
    return text


def write_omex(path: str | os.PathLike, sbml_text: str, sedml_text: str, *,
               model_location: str = MODEL_LOCATION, sedml_location: str = SEDML_LOCATION,
               description: str = "qspjax: QSP-IO reference simulation of the NSCLC model") -> Path:
    """A COMBINE archive at ``path`` holding the SBML, the SED-ML (the master file) and a manifest
    with their formats; written atomically."""
    from qspjax.io import atomic_write

    _, libcombine = _libs()
    archive = libcombine.CombineArchive()
    try:
        ok = archive.addFileFromString(sbml_text, model_location, SBML_FORMAT, False)
        ok = archive.addFileFromString(sedml_text, sedml_location, SEDML_FORMAT, True) and ok
        if not ok:
            raise OmexError(f"{path}: libcombine refused to add {model_location} or {sedml_location}")
        meta = libcombine.OmexDescription()
        meta.setAbout(".")
        meta.setDescription(description)
        meta.setCreated(libcombine.OmexDescription.getCurrentDateAndTime())
        archive.addMetadata(".", meta)

        def write(tmp: Path) -> None:
            tmp.unlink(missing_ok=True)  # libcombine writes its own file (zip) at this name
            if not archive.writeToFile(str(tmp)):
                raise OmexError(f"{path}: libcombine could not write the archive")

        return atomic_write(path, write)
    finally:
        archive.cleanUp()


def _location(loc: str) -> str:
    """An archive location without its leading ``./`` (the manifest writes ``./model.xml``)."""
    return loc[2:] if loc.startswith("./") else loc.lstrip("/")


def read_omex(path: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """{location: (format, text)} of the archive's entries other than the manifest (text of XML
    entries; metadata too)."""
    _, libcombine = _libs()
    path = Path(path)
    if not path.is_file():
        raise OmexError(f"{path}: no such archive")
    archive = libcombine.CombineArchive()
    try:
        if not archive.initializeFromArchive(str(path)):
            raise OmexError(f"{path}: not a COMBINE archive that libcombine can open")
        out = {}
        for i in range(archive.getNumEntries()):
            entry = archive.getEntry(i)
            out[_location(entry.getLocation())] = (entry.getFormat(), archive.extractEntryToString(entry.getLocation()))
        return out
    finally:
        archive.cleanUp()


def simulate_omex(path: str | os.PathLike, until: float | None = None) -> dict[str, np.ndarray]:
    """Run the archive's SED-ML with libRoadRunner: {data generator id: values on the time course}
    (only its outputs up to day ``until`` when given).

    Supports what :func:`build_sedml` writes: one model (SBML, in the archive), uniform time
    courses with CVODE and its tolerance/step parameters, data generators whose math is one
    variable (time or a parameter/species id target). Anything else raises :class:`OmexError`.
    """
    import re

    import roadrunner

    libsedml, _ = _libs()
    entries = read_omex(path)
    sedml = [(loc, text) for loc, (fmt, text) in entries.items() if fmt.startswith(SEDML_FORMAT.rsplit(".level", 1)[0])]
    if len(sedml) != 1:
        raise OmexError(f"{path}: expected one SED-ML file, found {[loc for loc, _ in sedml]}")
    loc, text = sedml[0]
    doc = libsedml.readSedMLFromString(text)
    _check_sedml(doc, f"{path}:{loc}")
    if doc.getNumModels() != 1 or doc.getNumTasks() != 1:
        raise OmexError(f"{path}:{loc}: expected one model and one task, found {doc.getNumModels()} and {doc.getNumTasks()}")
    model = doc.getModel(0)
    source = _location(model.getSource())
    if source not in entries:
        raise OmexError(f"{path}:{loc}: model source {model.getSource()!r} is not in the archive ({sorted(entries)})")
    task = doc.getTask(0)
    sim = doc.getSimulation(task.getSimulationReference())
    if sim is None or not sim.isSedUniformTimeCourse():
        raise OmexError(f"{path}:{loc}: task {task.getId()} does not reference a uniform time course")
    alg = sim.getAlgorithm()
    if alg.getKisaoID() != KISAO_CVODE:
        raise OmexError(f"{path}:{loc}: algorithm {alg.getKisaoID()} is not CVODE ({KISAO_CVODE})")
    rr = roadrunner.RoadRunner(entries[source][1])
    rr.setIntegrator("cvode")
    for i in range(alg.getNumAlgorithmParameters()):
        p = alg.getAlgorithmParameter(i)
        value = float(p.getValue())
        if p.getKisaoID() == KISAO_RELATIVE_TOLERANCE:
            rr.integrator.relative_tolerance = value
        elif p.getKisaoID() == KISAO_ABSOLUTE_TOLERANCE:
            rr.integrator.absolute_tolerance = value
        elif p.getKisaoID() == KISAO_MAXIMUM_STEPS:
            rr.integrator.maximum_num_steps = int(value)
    if sim.getInitialTime() != 0.0 or sim.getOutputStartTime() != 0.0:
        raise OmexError(f"{path}:{loc}: only time courses from t = 0 with output from t = 0 are run here")
    n = sim.getNumberOfSteps()
    times = np.linspace(0.0, sim.getOutputEndTime(), n + 1)
    if until is not None:
        times = times[times <= until]
    columns: dict[str, str] = {}
    for i in range(doc.getNumDataGenerators()):
        dg = doc.getDataGenerator(i)
        if dg.getNumVariables() != 1 or libsedml.formulaToString(dg.getMath()) != dg.getVariable(0).getId():
            raise OmexError(f"{path}:{loc}: data generator {dg.getId()} is not a single variable")
        var = dg.getVariable(0)
        if var.isSetSymbol():
            if var.getSymbol() != TIME_SYMBOL:
                raise OmexError(f"{path}:{loc}: data generator {dg.getId()}: unsupported symbol {var.getSymbol()}")
            columns[dg.getId()] = "time"
        else:
            m = re.search(r"@id='([^']+)'", var.getTarget())
            if m is None:
                raise OmexError(f"{path}:{loc}: data generator {dg.getId()}: unsupported target {var.getTarget()}")
            columns[dg.getId()] = m.group(1)
    selections = list(dict.fromkeys(columns.values()))
    result = rr.simulate(times=list(times), selections=selections)
    values = {sel: np.asarray(result[:, j], float) for j, sel in enumerate(selections)}
    return {dg_id: values[sel] for dg_id, sel in columns.items()}


def reference_regimen_path() -> Path:
    """The regimen file of the QSP-IO reference dosing (nivolumab 210 mg q14d from day 0)."""
    from qspjax.params import CONFIG_DIR

    return CONFIG_DIR / "regimens" / "qspio_example1_nivolumab.yaml"
