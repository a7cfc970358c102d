"""PEtab (v1) problem of the QSP-IO reference patient, and running such a problem with qspjax.

:func:`write_petab` writes the single-patient QSP-IO reference problem for pyPESTO, AMICI,
PEtab.jl or COPASI:

* ``model.xml``: the SBML export (:mod:`qspjax.interop.sbml`) of the reference patient under the
  reference dosing (nivolumab 210 mg every 14 days from day 0, doses as SBML events);
* ``conditions.tsv``: one condition, ``qspio_reference`` (the SBML as it is);
* ``observables.tsv``: tumor diameter, nivolumab in plasma and tumor, CD8 and Treg cells in the
  tumor, each an SBML parameter id, log-normal noise with a fixed sd of 0.1 on the log scale
  (about 10 % proportional error);
* ``measurements.tsv``: the SimBiology reference solution
  (``shared/reference/qspio/example1_treated_simbiology.csv``) weekly from day 7 to day 399;
* ``parameters.tsv``: the calibrated tumor/immune parameters of ``configs/inference/priors.yaml``
  that the reference run depends on (estimated, log10 scale, bounds 3 prior sds either side of
  the nominal value, the prior as ``parameterScaleNormal``);
* ``problem.yaml`` tying them together; the problem passes ``petab.v1.lint_problem``.

:func:`simulate_petab` runs a PEtab problem written for this model with qspjax: the parameter
table's values (or given ones) replace the model's, the initial state is read from the SBML, the
dosing from its treatment events (checked by re-exporting them), and each observable formula must
be an SBML id of a model observable. It returns PEtab's simulation table.

Requires ``petab`` (the ``interop`` extra).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

CONDITION_ID = "qspio_reference"
NOISE_SD_LOG = 0.1
# observableId -> (SBML id, reference CSV column, name)
OBSERVABLES = {
    "tumor_diameter": ("tumor_diameter_cm_irradiated", "tumour_diameter_cm", "tumor diameter (cm)"),
    "drug_plasma": ("ab_C_nivolumab", "drug_plasma_molar", "nivolumab in plasma (mol/L)"),
    "drug_tumor": ("ab_T_nivolumab_irradiated", "drug_tumor_molar", "nivolumab in tumor interstitium (mol/L)"),
    "cd8_tumor": ("T1_T_irradiated", "cd8_tumor_cells", "CD8 T cells in the tumor (cells)"),
    "treg_tumor": ("T0_T_irradiated", "treg_tumor_cells", "Treg cells in the tumor (cells)"),
}
MEASUREMENT_DAYS = np.arange(7.0, 400.0, 7.0)
# prior sds on the natural-log scale, from configs/inference/priors.yaml (the population medians)
ESTIMATED = {"k_C1_growth": 0.7, "k_C_T1": 1.0, "q_T1_T_in": 1.0, "n_T1_clones": 1.0}
BOUND_PRIOR_SDS = 3.0


class PetabError(ValueError):
    """A PEtab problem qspjax cannot write or run, naming the file, field and value."""


def _petab():
    try:
        import petab.v1 as petab
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PetabError(f"PEtab export needs the petab package (pip install 'qspjax[interop]'): {exc}") from None
    return petab


def reference_measurements(reference_csv: str | os.PathLike, days=MEASUREMENT_DAYS):
    """PEtab measurement rows from the SimBiology reference solution at ``days`` (positive values
    only, the noise model being log-normal)."""
    import pandas as pd

    ref = pd.read_csv(reference_csv)
    missing = [c for _, c, _ in OBSERVABLES.values() if c not in ref.columns] + (
        [] if "time_days" in ref.columns else ["time_days"])
    if missing:
        raise PetabError(f"{reference_csv}: missing column(s) {missing}")
    rows = []
    by_day = ref.set_index("time_days")
    for obs_id, (_, column, _) in OBSERVABLES.items():
        for day in days:
            if day not in by_day.index:
                raise PetabError(f"{reference_csv}: no row at time_days = {day:g}")
            value = float(by_day.loc[day, column])
            if value > 0 and math.isfinite(value):
                rows.append({"observableId": obs_id, "simulationConditionId": CONDITION_ID,
                             "measurement": value, "time": float(day)})
    return pd.DataFrame(rows)


def write_petab(out: str | os.PathLike, params=None, reference_csv: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the reference PEtab problem into folder ``out`` (see the module docstring) and lint it;
    returns {role: path}."""
    import pandas as pd

    from qspjax.interop import omex, sbml
    from qspjax.io import atomic_write_text
    from qspjax.params import load_parameters
    from qspjax.regimen import compile_schedule, load_regimen

    petab = _petab()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = params if params is not None else load_parameters()
    if reference_csv is None:
        reference_csv = default_reference_csv()
    if not Path(reference_csv).is_file():
        raise PetabError(f"{reference_csv}: the QSP-IO reference solution is not there (shared/reference/qspio)")
    regimen = load_regimen(omex.reference_regimen_path())
    model, y0 = sbml.reference_patient(params)
    schedule = compile_schedule(regimen, model.drugs, [0.0, 400.0], n_lesions=1)
    text = sbml.export_sbml(model, y0, schedule)

    conditions = pd.DataFrame({"conditionId": [CONDITION_ID],
                               "conditionName": ["QSP-IO reference: nivolumab 210 mg q2w from day 0"]})
    observables = pd.DataFrame([
        {"observableId": oid, "observableName": name, "observableFormula": sid,
         "observableTransformation": "log", "noiseFormula": repr(NOISE_SD_LOG), "noiseDistribution": "normal"}
        for oid, (sid, _, name) in OBSERVABLES.items()])
    measurements = reference_measurements(reference_csv)
    rows = []
    for pid, sd in ESTIMATED.items():
        nominal = float(params.values[pid])
        rows.append({
            "parameterId": pid, "parameterName": pid, "parameterScale": "log10",
            "lowerBound": nominal * math.exp(-BOUND_PRIOR_SDS * sd),
            "upperBound": nominal * math.exp(BOUND_PRIOR_SDS * sd),
            "nominalValue": nominal, "estimate": 1,
            "objectivePriorType": "parameterScaleNormal",
            "objectivePriorParameters": f"{math.log10(nominal)!r};{sd / math.log(10)!r}",
        })
    parameters = pd.DataFrame(rows)

    files = {"model": out / "model.xml", "conditions": out / "conditions.tsv", "observables": out / "observables.tsv",
             "measurements": out / "measurements.tsv", "parameters": out / "parameters.tsv",
             "problem": out / "problem.yaml"}
    atomic_write_text(files["model"], text)
    for role, df in (("conditions", conditions), ("observables", observables), ("measurements", measurements),
                     ("parameters", parameters)):
        atomic_write_text(files[role], df.to_csv(sep="\t", index=False))
    petab.create_problem_yaml(
        sbml_files=files["model"].name, condition_files=files["conditions"].name,
        measurement_files=files["measurements"].name, parameter_file=files["parameters"].name,
        observable_files=files["observables"].name, yaml_file=str(files["problem"]), relative_paths=False)
    problems = lint(files["problem"])
    if problems:
        raise PetabError(f"{files['problem']}: the written problem fails the PEtab linter: {problems}")
    return files


def default_reference_csv() -> Path:
    from qspjax.params import CONFIG_DIR

    return CONFIG_DIR.parent.parent / "shared" / "reference" / "qspio" / "example1_treated_simbiology.csv"


def lint(problem_yaml: str | os.PathLike) -> list[str]:
    """The PEtab linter's error messages for ``problem_yaml`` (empty when it passes)."""
    import logging

    petab = _petab()
    petab.validate(str(problem_yaml))  # the YAML schema; raises on a bad file
    problem = petab.Problem.from_yaml(str(problem_yaml))
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                records.append(record.getMessage())

    handler = _Collect()
    logger = logging.getLogger("petab")
    logger.addHandler(handler)
    try:
        failed = petab.lint_problem(problem)
    finally:
        logger.removeHandler(handler)
    return records or (["petab.v1.lint_problem reported errors"] if failed else [])


# ---------------------------------------------------------------------------------------------
# Running a PEtab problem with qspjax
# ---------------------------------------------------------------------------------------------
_DOSE = re.compile(r"^ab_C_(?P<drug>\w+) \+ (?P<mg>[0-9.eE+-]+) \* 0\.001 / molecular_weight_(?P=drug) / V_C$")


def _regimen_from_events(sbml_model, where: str):
    """The ICI regimen whose doses are the SBML's treatment events ({drug, dose mg, day} each)."""
    import libsbml

    from qspjax.regimen import parse_regimen

    ici = []
    for i in range(sbml_model.getNumEvents()):
        ev = sbml_model.getEvent(i)
        if not ev.getId().startswith("treatment_day_"):
            continue
        trig = libsbml.formulaToL3String(ev.getTrigger().getMath())
        m = re.fullmatch(r"time >= ([0-9.eE+-]+)", trig)
        if m is None:
            raise PetabError(f"{where}: event {ev.getId()}: trigger {trig!r} is not 'time >= day'")
        day = float(m.group(1))
        doses = []
        for j in range(ev.getNumEventAssignments()):
            ea = ev.getEventAssignment(j)
            dm = _DOSE.match(libsbml.formulaToL3String(ea.getMath()))
            if dm is not None and ea.getVariable() == f"ab_C_{dm['drug']}":
                doses.append({"drug": dm["drug"], "dose": float(dm["mg"]), "unit": "mg", "interval_days": 1,
                              "cycles": 1, "start_day": day})
        if not doses:
            raise PetabError(f"{where}: event {ev.getId()} on day {day:g} gives no antibody dose qspjax can read "
                             f"(only ICI doses are imported)")
        ici.extend(doses)
    return parse_regimen({"name": "from-sbml-events", "ici": ici}, source=where) if ici else None


def simulate_petab(problem_yaml: str | os.PathLike, parameters: Mapping[str, float] | None = None,
                   params=None, check_events: bool = True):
    """qspjax's simulation of a PEtab problem written for this model (one lesion): PEtab's
    simulation table (``observableId, simulationConditionId, time, simulation``), one row per
    measurement row. ``parameters`` (natural scale) override the parameter table's nominal values.
    """
    import jax
    import libsbml
    import pandas as pd

    from qspjax.interop import omex, sbml
    from qspjax.model.composer import QSPModel
    from qspjax.params import load_parameters
    from qspjax.regimen import compile_schedule
    from qspjax.solver.simulate import STATUS_OK, SolverConfig, simulate_patient

    petab = _petab()
    problem_yaml = Path(problem_yaml)
    problem = petab.Problem.from_yaml(str(problem_yaml))
    where = str(problem_yaml)
    conditions = problem.measurement_df["simulationConditionId"].unique().tolist()
    if len(conditions) != 1:
        raise PetabError(f"{where}: {len(conditions)} simulation conditions {conditions}; qspjax's import runs one")
    if problem.condition_df is not None:
        overrides = [c for c in problem.condition_df.columns if c not in ("conditionName",)]
        if overrides:
            raise PetabError(f"{where}: condition table columns {overrides} (condition-specific overrides) "
                             f"are not supported by qspjax's import")
    if "preequilibrationConditionId" in problem.measurement_df and \
            problem.measurement_df["preequilibrationConditionId"].notna().any():
        raise PetabError(f"{where}: preequilibration is not supported by qspjax's import")

    params = params if params is not None else load_parameters()
    values = dict(problem.parameter_df["nominalValue"].astype(float)) if problem.parameter_df is not None else {}
    values.update(parameters or {})
    unknown = [p for p in values if p not in params.values]
    if unknown:
        raise PetabError(f"{where}: parameter(s) {unknown} are not scalar qspjax model parameters")
    params = params.with_values(**values)

    doc = libsbml.readSBMLFromString(libsbml.writeSBMLToString(problem.sbml_document))
    m = doc.getModel()
    drugs = tuple(sorted({p.getId()[len("ab_C_"):] for p in m.getListOfParameters() if p.getId().startswith("ab_C_")}))
    n_lesions = 2 if m.getParameter("C1_non_irradiated") is not None else 1
    if not drugs:
        raise PetabError(f"{where}: the SBML has no ab_C_<drug> state: not a qspjax export")
    model = QSPModel.from_values(params.model_values(), drugs=drugs, n_lesions=n_lesions)
    # the initial state is the SBML's
    y0 = {}
    for key, ids in sbml.state_names(model).items():
        vals = np.empty(np.shape(ids))
        for i, sid in np.ndenumerate(np.asarray(ids, dtype=object)):
            p = m.getParameter(str(sid))
            if p is None:
                raise PetabError(f"{where}: the SBML has no state parameter {sid}")
            vals[i] = p.getValue()
        y0[key] = jax.numpy.asarray(vals if np.ndim(ids) else float(vals))
    by_id = {sid: (name, j) for name, sids in omex.observable_ids(model, y0).items() for j, sid in enumerate(sids)}
    wanted = {}
    for _, row in problem.observable_df.reset_index().iterrows():
        formula = str(row["observableFormula"]).strip()
        if formula not in by_id:
            raise PetabError(f"{where}: observable {row['observableId']}: formula {formula!r} is not the SBML id "
                             f"of a model observable (e.g. {', '.join(sorted(by_id)[:4])})")
        wanted[row["observableId"]] = by_id[formula]
    regimen = _regimen_from_events(m, where)
    times = np.unique(problem.measurement_df["time"].astype(float).to_numpy())
    if times.min() < 0 or not np.isfinite(times).all():
        raise PetabError(f"{where}: measurement times must be finite and >= 0, got {times.min()}")
    output = np.unique(np.concatenate([[0.0], times]))
    schedule = compile_schedule(regimen, drugs, output, n_lesions=n_lesions) if regimen is not None else \
        compile_schedule(_empty_regimen(), drugs, output, n_lesions=n_lesions)
    if check_events and regimen is not None:
        exported = {ev.getId(): ev for ev in doc.getModel().getListOfEvents()}
        mine = libsbml.readSBMLFromString(sbml.export_sbml(model, y0, compile_schedule(
            regimen, drugs, [0.0, float(output[-1])], n_lesions=n_lesions))).getModel()
        for ev in mine.getListOfEvents():
            theirs = exported.get(ev.getId())
            same = theirs is not None and all(
                libsbml.formulaToL3String(ev.getEventAssignment(j).getMath())
                == libsbml.formulaToL3String(theirs.getEventAssignment(ev.getEventAssignment(j).getVariable()).getMath())
                if theirs.getEventAssignment(ev.getEventAssignment(j).getVariable()) is not None else False
                for j in range(ev.getNumEventAssignments()))
            if not same:
                raise PetabError(f"{where}: event {ev.getId()} of the SBML is not the ICI dosing read from it "
                                 f"(other treatments in SBML events are not imported)")
    traj = simulate_patient(model, y0, schedule, SolverConfig(rtol=1e-8, atol=1e-12, max_steps=200_000))
    if int(traj.status) != STATUS_OK:
        raise PetabError(f"{where}: qspjax's solve failed with status {int(traj.status)}")
    obs = jax.vmap(model.observables)(traj.ys)
    series = {oid: np.asarray(obs[name]).reshape(len(output), -1)[:, j] for oid, (name, j) in wanted.items()}
    sim = problem.measurement_df.copy()
    index = np.searchsorted(output, sim["time"].astype(float).to_numpy())
    sim["simulation"] = [float(series[o][k]) for o, k in zip(sim["observableId"], index)]
    cols = ["observableId", "simulationConditionId", "time", "simulation"]
    return pd.DataFrame(sim[cols])


def _empty_regimen():
    from qspjax.regimen import parse_regimen

    return parse_regimen({"name": "untreated"})
