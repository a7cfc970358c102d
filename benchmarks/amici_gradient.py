"""AMICI (CVODES forward and adjoint sensitivities) beside qspjax's reverse mode on one problem.

The problem is the PEtab export (``qspjax export-petab``: the QSP-IO reference patient, one lesion,
nivolumab 210 mg every 14 days as SBML events) with its 4 estimated parameters ``PARAMS``
(natural scale), and the least-squares objective

    J(p) = sum over DAYS of (log D(t; p) - log D_ref(t))^2

of the tumor diameter D (cm) against the PEtab measurements (the SimBiology reference solution).
qspjax computes J and dJ/dp by ``jax.value_and_grad`` through ``simulate_patient`` (reverse mode,
diffrax recursive checkpointing); AMICI imports the exported SBML (observable ``log`` of the
diameter, Gaussian noise of sd 1, so that J = -2 (llh - const) and dJ/dp = -2 sllh) and computes
dJ/dp by forward sensitivities and by adjoint sensitivities. ``tests/test_amici.py`` checks the
agreement; this script times the three gradients (each after one warm-up call; qspjax's
compilation and AMICI's model compilation timed apart).

    python benchmarks/amici_gradient.py --json benchmarks/results_amici_gradient.json

Needs the ``amici`` extra (``pip install 'qspjax[amici]'``: a C++ compiler and CMake; AMICI builds
SUNDIALS, its SWIG wrapper and then one C++ extension per model).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np

PARAMS = ("k_C1_growth", "k_C_T1", "q_T1_T_in", "n_T1_clones")
DAYS = (7.0, 28.0, 56.0, 112.0, 196.0)
RTOL = 1e-10
ATOL_QSPJAX = 1e-13
OBS_ID = "log_diameter"
DIAMETER_ID = "tumor_diameter_cm_irradiated"
CACHE = Path(os.environ.get("QSPJAX_AMICI_CACHE", Path.home() / ".cache" / "qspjax" / "amici"))


def petab_dir(out: Path) -> Path:
    """The PEtab problem, written once into ``out``."""
    if not (out / "problem.yaml").is_file():
        from qspjax.interop import petab as qpetab

        qpetab.write_petab(out)
    return out


def measurements(problem_dir: Path) -> np.ndarray:
    import pandas as pd

    df = pd.read_csv(problem_dir / "measurements.tsv", sep="\t")
    df = df[df["observableId"] == "tumor_diameter"].set_index("time")
    return np.array([float(df.loc[d, "measurement"]) for d in DAYS])


def nominal(problem_dir: Path) -> np.ndarray:
    import pandas as pd

    df = pd.read_csv(problem_dir / "parameters.tsv", sep="\t").set_index("parameterId")
    return np.array([float(df.loc[p, "nominalValue"]) for p in PARAMS])


# ---------------------------------------------------------------------------------------------
# qspjax
# ---------------------------------------------------------------------------------------------
def qspjax_problem(problem_dir: Path, all_days: np.ndarray | None = None):
    """(value_and_grad of J, trajectory function) of qspjax on the exported problem.

    The initial state is the SBML's (the export's, at the nominal parameters), as in AMICI.
    """
    import jax
    import jax.numpy as jnp
    import libsbml

    import qspjax  # noqa: F401  (float64)
    from qspjax.interop import omex, sbml
    from qspjax.model.composer import QSPModel
    from qspjax.params import load_parameters
    from qspjax.regimen import compile_schedule, load_regimen
    from qspjax.solver.simulate import SolverConfig, simulate_patient

    params = load_parameters()
    base = dict(params.model_values())
    model0 = QSPModel.from_values(base, drugs=("nivolumab",), n_lesions=1)
    m = libsbml.readSBMLFromFile(str(problem_dir / "model.xml")).getModel()
    y0 = {k: jnp.asarray(np.vectorize(lambda sid: m.getParameter(str(sid)).getValue())(np.asarray(ids, object))
                         if np.ndim(ids) else m.getParameter(str(ids)).getValue(), dtype=float)
          for k, ids in sbml.state_names(model0).items()}
    regimen = load_regimen(omex.reference_regimen_path())
    days = np.asarray(DAYS if all_days is None else all_days, float)
    schedule = compile_schedule(regimen, ("nivolumab",), np.concatenate([[0.0], days]), n_lesions=1)
    config = SolverConfig(rtol=RTOL, atol=ATOL_QSPJAX, max_steps=200_000)
    d_ref = jnp.asarray(measurements(problem_dir))

    def solve(p):
        values = dict(base)
        values.update({k: p[i] for i, k in enumerate(PARAMS)})
        model = QSPModel.from_values(values, drugs=("nivolumab",), n_lesions=1)
        return model, simulate_patient(model, y0, schedule, config)

    def objective(p):
        model, traj = solve(p)
        diam = jax.vmap(model.observables)(traj.ys)["tumor_diameter_cm"][1:, 0]
        return jnp.sum((jnp.log(diam) - jnp.log(d_ref)) ** 2)

    def trajectory(p):
        model, traj = solve(jnp.asarray(p))
        return model, traj

    return jax.jit(jax.value_and_grad(objective)), trajectory, model0


# ---------------------------------------------------------------------------------------------
# AMICI
# ---------------------------------------------------------------------------------------------
def _floats_stay_floats(importer) -> None:
    """AMICI's MathML parser (sbmlmath) turns every float literal into an exact sympy Rational; a
    power with a fractional exponent of a product holding such rationals (the export's diameter and
    Hill terms) then makes sympy look for exact integer roots of their 16-20 digit numerators,
    which stalled the import for > 5 min in one rule. Floats stay floats."""
    if hasattr(getattr(importer, "_mathml_parser", None), "floats_as_rationals"):
        importer._mathml_parser.floats_as_rationals = False


def amici_model(problem_dir: Path, verbose: bool = False):
    """The compiled AMICI model of the exported SBML (cached by the SBML's hash), its 4 parameters
    free and every other parameter fixed; returns (module, seconds spent compiling, 0 if cached).
    AMICI >= 1.0 API (``amici.importers.sbml``, ``amici.sim.sundials``)."""
    import amici
    import libsbml
    from amici.importers.sbml import MeasurementChannel, SbmlImporter

    text = (problem_dir / "model.xml").read_bytes()
    digest = hashlib.sha256(text + repr((PARAMS, amici.__version__)).encode()).hexdigest()[:16]
    name = f"qspjax_ref_{digest}"
    out = CACHE / name
    t0 = time.perf_counter()
    compiled = 0.0
    if not (out / ".complete").is_file():
        m = libsbml.readSBMLFromString(text.decode()).getModel()
        ruled = {m.getRule(i).getVariable() for i in range(m.getNumRules())}
        assigned = {m.getInitialAssignment(i).getSymbol() for i in range(m.getNumInitialAssignments())}
        fixed = [p.getId() for p in m.getListOfParameters()
                 if p.getId() not in PARAMS and p.getId() not in ruled and p.getId() not in assigned and p.getConstant()]
        importer = SbmlImporter(str(problem_dir / "model.xml"))
        _floats_stay_floats(importer)
        importer.sbml2amici(
            name, str(out), verbose=verbose, fixed_parameters=fixed,
            observation_model=[MeasurementChannel(OBS_ID, name="log tumor diameter", formula=f"log({DIAMETER_ID})",
                                                  noise_distribution="normal", sigma=1.0)])
        (out / ".complete").write_text("ok\n")
        compiled = time.perf_counter() - t0
    import amici.sim.sundials  # noqa: F401  (the generated module checks its SWIG version against it)

    module = amici.import_model_module(name, str(out))
    return module, compiled


def pypesto_objective(problem_dir: Path, out: Path):
    """pyPESTO's objective of the exported PEtab problem (``pypesto.petab.PetabImporter``: AMICI
    inside, the PEtab noise model, no priors), at the tolerances of :data:`RTOL`; returns
    (objective, parameter ids in its order). The AMICI model is compiled into ``out`` (minutes)."""
    import petab.v1 as petab
    import pypesto.petab
    from amici.importers.sbml import SbmlImporter

    init = SbmlImporter.__init__

    def init_with_floats(self, *a, **k):  # pyPESTO creates the importer: the setting goes in its init
        init(self, *a, **k)
        _floats_stay_floats(self)

    SbmlImporter.__init__ = init_with_floats
    try:
        problem = petab.Problem.from_yaml(str(problem_dir / "problem.yaml"))
        importer = pypesto.petab.PetabImporter(problem, output_folder=str(out), model_name="qspjax_petab")
        objective = importer.create_objective_creator().create_objective()
    finally:
        SbmlImporter.__init__ = init
    solver = objective.amici_solver
    solver.set_relative_tolerance(RTOL)
    solver.set_absolute_tolerance(1e-14)
    solver.set_max_steps(1_000_000)
    return objective, list(objective.x_names)


def amici_run(module, p: np.ndarray, days, sensitivity: str | None, data: np.ndarray | None = None):
    """One AMICI simulation at ``p`` (natural scale) on ``days``; ``sensitivity``: None, "forward" or
    "adjoint" (first order, with the Gaussian llh of ``log D`` against ``data``)."""
    from amici import sim
    from amici.sim import sundials as S

    model = module.get_model()
    model.set_timepoints([float(d) for d in days])
    for name, value in zip(PARAMS, p):
        model.set_free_parameter_by_id(name, float(value))
    model.set_parameter_scale(S.ParameterScaling.none)
    ids = list(model.get_free_parameter_ids())
    model.set_parameter_list([ids.index(k) for k in PARAMS])
    solver = model.create_solver()
    solver.set_relative_tolerance(RTOL)
    solver.set_absolute_tolerance(1e-14)
    solver.set_max_steps(1_000_000)
    edata = None
    if sensitivity is not None:
        solver.set_sensitivity_order(S.SensitivityOrder.first)
        solver.set_sensitivity_method(S.SensitivityMethod.forward if sensitivity == "forward"
                                      else S.SensitivityMethod.adjoint)
        for setter in ("fsa", "b", "quadratures"):
            getattr(solver, f"set_relative_tolerance_{setter}")(RTOL)
            getattr(solver, f"set_absolute_tolerance_{setter}")(1e-14)
        solver.set_max_steps_backward_problem(1_000_000)
        edata = S.ExpData(model)
        edata.set_measurements(list(np.log(np.asarray(data, float))))
        edata.set_noise_scales([1.0] * len(days))
    del sim
    rdata = S.run_simulation(model, solver, edata)
    return model, rdata


def amici_gradient(module, p, data) -> dict:
    """J and dJ/dp by AMICI forward and adjoint sensitivities (J = -2 (llh - const))."""
    out = {}
    for method in ("forward", "adjoint"):
        _, rdata = amici_run(module, p, DAYS, method, data)
        if rdata.status != 0:
            raise RuntimeError(f"AMICI {method} sensitivities failed with status {rdata.status}")
        resid = np.asarray(rdata.y)[:, 0] - np.log(data)
        out[method] = {"J": float(np.sum(resid ** 2)), "grad": -2.0 * np.asarray(rdata.sllh, float)}
    return out


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(args) -> dict:
    import platform

    import jax

    from qspjax.io import atomic_write_json, provenance

    problem_dir = petab_dir(Path(args.work) / "petab")
    data = measurements(problem_dir)
    p = nominal(problem_dir) * np.array([1.1, 0.9, 1.05, 1.0])  # off the nominal values: non-zero gradient
    module, compile_s = amici_model(problem_dir)

    vg, _, _ = qspjax_problem(problem_dir)
    t0 = time.perf_counter()
    value, grad = vg(jax.numpy.asarray(p))
    jax.block_until_ready(grad)
    qspjax_first = time.perf_counter() - t0
    t_qspjax = _time(lambda: jax.block_until_ready(vg(jax.numpy.asarray(p))), args.repeats)

    ami = amici_gradient(module, p, data)
    t_fwd = _time(lambda: amici_run(module, p, DAYS, "forward", data), args.repeats)
    t_adj = _time(lambda: amici_run(module, p, DAYS, "adjoint", data), args.repeats)
    t_sim = _time(lambda: amici_run(module, p, DAYS, None), args.repeats)
    grad = np.asarray(grad, float)
    rel = {m: float(np.max(np.abs(ami[m]["grad"] - grad) / np.abs(grad))) for m in ami}
    result = {
        "problem": {"parameters": list(PARAMS), "p": p, "days": list(DAYS), "rtol": RTOL,
                    "objective": "sum (log D - log D_ref)^2, D tumor diameter (cm), PEtab measurements"},
        "J": {"qspjax": float(value), "amici_forward": ami["forward"]["J"], "amici_adjoint": ami["adjoint"]["J"]},
        "gradient": {"qspjax_reverse": grad, "amici_forward": ami["forward"]["grad"],
                     "amici_adjoint": ami["adjoint"]["grad"]},
        "max_relative_difference_to_qspjax": rel,
        "seconds": {"qspjax_reverse": t_qspjax, "qspjax_first_call_incl_compile": qspjax_first,
                    "amici_forward": t_fwd, "amici_adjoint": t_adj, "amici_simulation_only": t_sim,
                    "amici_model_compile": compile_s},
        "ratio_qspjax_over": {"amici_forward": t_qspjax / t_fwd, "amici_adjoint": t_qspjax / t_adj},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax_backend": jax.default_backend()},
        "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"),
        "amici_version": __import__("amici").__version__,
        "run": provenance(vars(args), None),
    }
    if args.json:
        atomic_write_json(args.json, result)
    print(f"gradient max rel. difference to qspjax: forward {rel['forward']:.2e}, adjoint {rel['adjoint']:.2e}")
    print(f"seconds: qspjax reverse {t_qspjax:.3f}, AMICI forward {t_fwd:.3f}, adjoint {t_adj:.3f}, "
          f"simulation only {t_sim:.3f} (AMICI model compile {compile_s:.0f} s, qspjax first call {qspjax_first:.0f} s)")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/qspjax_amici", help="folder for the PEtab export")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
