"""Virtual patients per second: qspjax against a SciPy LSODA loop and a libRoadRunner CVODE loop.

Every patient of a default-population cohort (two lesions, grown to its baseline tumor) is treated
with nivolumab 240 mg every 2 weeks plus SBRT 5 x 8 Gy on days 0-4 to the index lesion, for
``--days`` days (400 by default), with the state saved daily. Three solvers run the same model at
the same tolerances (rtol on every state divided by its typical magnitude, atol on that scaled
state):

* qspjax: ``qspjax.solver.simulate.simulate_batch`` (Rodas5P with the compiled sparse LU; by default
  the lane queue of ``qspjax.solver.queue``: ``--lanes`` patients step together and a lane whose
  patient is done takes the next of the chunk; ``--batching lockstep`` for ``vmap`` over the chunk);
  compilation is timed apart from the solves;
* SciPy: ``scipy.integrate.solve_ivp(method="LSODA")`` one patient after another on the same
  flat scaled vector field (``qspjax.solver.simulate._flat_system``) with a jitted right-hand side and
  Jacobian, the treatment jumps applied between segments by ``qspjax.solver.simulate.apply_events`` (as
  ``tests/test_simulate.py`` does) and lesion extinction as a terminal root-found event;
* libRoadRunner: the SBML export (``qspjax.interop.sbml``) loaded once, then per patient its parameters
  and initial state set and CVODE (BDF) run, with per-state absolute tolerances atol * typical.

The references are slow, so they run on the first ``--reference-n`` patients and their rate is
extrapolated per patient (the table says so). Agreement is the largest relative difference of the
final tumor diameters (every patient of the subsample, every lesion) from qspjax's.

    python benchmarks/throughput.py --n 100 --reference-n 10 --json throughput.json
"""

from __future__ import annotations

import argparse

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C

import numpy as np
from tqdm import tqdm  # progress on stderr; the table goes to stdout


def _qspjax(cohort, schedule, config, chunk: int):
    from qspjax.solver.simulate import simulate_batch

    n = int(cohort.status.shape[0])
    chunk = min(chunk, n)
    first = next(C.chunks(n, chunk))[0]
    with C.Timer() as warm:
        C.block(simulate_batch(C.take(cohort.model, first), C.take(cohort.y0, first), schedule, config))
    diam, steps, status = [], [], []
    with C.Timer() as run:
        for idx, real in tqdm(C.chunks(n, chunk), total=-(-n // chunk), desc="qspjax", unit="chunk"):
            traj = C.block(simulate_batch(C.take(cohort.model, idx), C.take(cohort.y0, idx), schedule, config))
            models = C.take(cohort.model, idx)
            final = C.take(traj.ys, (slice(None), -1))
            d = _diameters(models, final)
            diam.append(np.asarray(d)[:real])
            steps.append(np.asarray(traj.num_steps)[:real])
            status.append(np.asarray(traj.status)[:real])
    per_chunk = run.seconds / max(1, -(-n // chunk))
    return {
        "seconds": run.seconds, "compile_seconds": max(warm.seconds - per_chunk, 0.0), "chunk": chunk,
        "patients_per_second": n / run.seconds, "final_diameter_cm": np.concatenate(diam),
        "steps_per_patient": float(np.mean(np.concatenate(steps))),
        "n_failed": int(np.sum(np.concatenate(status) != 0))
    }


def _diameters(models, ys):
    """Final diameter (cm) per patient and lesion of a batch."""
    import jax

    from qspjax.model.cancer import diameter_from_volume

    return jax.vmap(lambda m, y: diameter_from_volume(m.lesion_volume(y)))(models, ys)


def _scipy_loop(cohort, schedule, config, patients):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree
    from scipy.integrate import solve_ivp

    from qspjax.solver.simulate import _flat_system, apply_events

    like = C.take(cohort.y0, 0)

    def vf(m, z):
        return _flat_system(m, like).term.vf(0.0, z, None)

    f = jax.jit(vf)
    jac = jax.jit(jax.jacfwd(vf, argnums=1))
    jump = jax.jit(lambda m, y, e: apply_events(m, y, e)[0])
    events = schedule.events
    times = np.asarray(schedule.times)
    m0, y00 = C.take(cohort.model, 0), C.take(cohort.y0, 0)
    with C.Timer() as warm:  # compile the jitted functions once
        z = ravel_pytree(y00)[0]
        C.block((f(m0, z), jac(m0, z), jump(m0, y00, tuple(e[0] for e in events))))
    diam, rhs_calls, jac_calls, steps = [], 0, 0, 0
    with C.Timer() as run:
        for i in tqdm(patients, desc="scipy LSODA", unit="patient"):
            model, y = C.take(cohort.model, i), C.take(cohort.y0, i)
            system = _flat_system(model, y)
            scale = np.asarray(system.scale)
            threshold = float(model.patient["extinction_threshold_cells"])
            c1_index = np.flatnonzero(np.asarray(ravel_pytree(
                {k: (jnp.ones_like(v) if k == "C1" else jnp.zeros_like(v)) for k, v in y.items()})[0]))
            fun = lambda t, z: np.asarray(f(model, jnp.asarray(z)))  # noqa: E731
            jfun = lambda t, z: np.asarray(jac(model, jnp.asarray(z)))  # noqa: E731
            for k in range(len(times)):
                y = jump(model, y, tuple(e[k] for e in events))
                t0, t1 = times[k], times[k + 1] if k + 1 < len(times) else times[k]
                z = np.asarray(ravel_pytree(y)[0]) / scale
                while t1 > t0:
                    alive = [j for j in c1_index if z[j] * scale[j] > threshold]
                    evs = [_extinction_event(j, scale[j], threshold) for j in alive]
                    sol = solve_ivp(fun, (t0, t1), z, method="LSODA", jac=jfun, rtol=config.rtol,
                                    atol=config.atol, events=evs or None)
                    if sol.status < 0:
                        raise RuntimeError(f"LSODA failed for patient {i}: {sol.message}")
                    rhs_calls, jac_calls, steps = rhs_calls + sol.nfev, jac_calls + sol.njev, steps + sol.t.size - 1
                    z, t0 = sol.y[:, -1].copy(), sol.t[-1]
                    if sol.status == 1:  # a lesion fell below the threshold: it has no cells left
                        for j, te in zip(alive, sol.t_events):
                            if te.size:
                                z[j] = 0.0
                y = system.unravel(jnp.asarray(z) * system.scale)
            diam.append(np.asarray(_diameters(jax.tree_util.tree_map(lambda x: x[None], model),
                                              jax.tree_util.tree_map(lambda x: x[None], y)))[0])
    n = len(patients)
    return {"seconds": run.seconds, "compile_seconds": warm.seconds, "patients_per_second": n / run.seconds,
            "final_diameter_cm": np.array(diam), "rhs_calls_per_patient": rhs_calls / n,
            "jacobian_calls_per_patient": jac_calls / n, "steps_per_patient": steps / n}


def _extinction_event(j, scale, threshold):
    def event(t, z):
        return z[j] * scale - threshold

    event.terminal = True
    event.direction = -1
    return event


def _roadrunner_loop(cohort, schedule, config, patients, days: float):
    import roadrunner

    from qspjax.interop import sbml
    from qspjax.solver.simulate import apply_events

    roadrunner.Logger.setLevel(roadrunner.Logger.LOG_ERROR)  # CVODE's step-size notes at event times
    model0, y0 = C.take(cohort.model, 0), C.take(cohort.y0, 0)
    with C.Timer() as setup:
        rr = roadrunner.RoadRunner(sbml.export_sbml(model0, y0, schedule))
    ids = list(rr.getRateRuleIds())
    typical = {}
    for key, v in model0.scales().items():
        for sid, s in zip(np.asarray(sbml.state_names(model0)[key]).ravel(), np.asarray(v).ravel()):
            typical[str(sid)] = float(s)
    rr.integrator.relative_tolerance = config.rtol
    # The relaxation states are logarithms (ln_PD1_free..., ln_IL2_LN): atol on them is relative.
    rr.integrator.absolute_tolerance = [config.atol * typical.get(i, 1.0) for i in ids]
    rr.integrator.maximum_num_steps = 100_000
    lesions = [f"tumor_diameter_cm_{les}" for les in model0.LESION_NAMES[:model0.n_lesions]]
    n_points = int(round(days)) + 1
    day0 = [row for d, row in sbml.schedule_events(schedule) if d == 0.0]

    def patient_values(i):
        """Patient ``i``'s SBML values, its state taken after the day-0 jumps."""
        model, y = C.take(cohort.model, i), C.take(cohort.y0, i)
        if day0:
            y = apply_events(model, y, day0[0])[0]
        return sbml.patient_values(model, y)

    # Prepared before the clock starts: the loop times libRoadRunner's own work only.
    prepared = {i: patient_values(i) for i in patients}
    diam, failures = [], []
    with C.Timer() as run:
        for i in tqdm(patients, desc="libRoadRunner", unit="patient"):
            # reset() restores the exported (first) patient and fires its day-0 treatment event;
            # this patient's parameters and its state *after* the day-0 jumps (the same jump map,
            # applied by qspjax.solver.simulate.apply_events) are then set as current values. Setting
            # ``init(...)`` values instead and resetting made CVODE fail at once whenever per-state
            # absolute tolerances were in use (measured: CV_CONV_FAILURE at t ~ 3e-5 day for the
            # very values of the export), and hang after re-applying the tolerances.
            rr.reset()
            for sid, v in prepared[i].items():
                rr.setValue(sid, v)
            try:
                out = rr.simulate(0.0, days, n_points, selections=["time"] + lesions)
                diam.append(np.asarray(out[-1, 1:]))
            except RuntimeError as exc:  # a CVODE failure is recorded, not fatal
                failures.append(f"patient {i}: {str(exc)[:160]}")
                diam.append(np.full(len(lesions), np.nan))
    n = len(patients)
    return {"seconds": run.seconds, "setup_seconds": setup.seconds, "patients_per_second": n / run.seconds,
            "final_diameter_cm": np.array(diam), "n_failed": len(failures), "failures": failures}


def _agreement(ours, theirs):
    ours = np.asarray(ours)[: len(theirs)]
    ok = np.all(np.isfinite(np.asarray(theirs)), axis=-1)
    if not np.any(ok):
        return float("nan")
    ours, theirs = ours[ok], np.asarray(theirs)[ok]
    return float(np.max(np.abs(np.asarray(theirs) - ours) / np.maximum(np.abs(ours), 1e-12)))


def main(args, argv: list[str] | None = None):
    """Run the benchmark; ``argv`` (default ``sys.argv[1:]``) is the command line that
    ``--local-processes`` starts again in each process."""
    from qspjax.solver import distributed
    from qspjax.regimen import compile_schedule
    from qspjax.solver.simulate import SolverConfig

    status = C.join_processes(args, argv, __file__)
    if status is not None:  # --local-processes: the run happened in the processes it started
        return status

    config = SolverConfig(solver=args.solver, rtol=args.rtol, atol=args.atol, sparse_jacobian=not args.dense_jacobian,
                          batching=args.batching, lanes=args.lanes)
    with C.Timer() as grow:
        _, cohort = C.cohort(args.n, args.seed, config)
    schedule = compile_schedule(C.benchmark_regimen(args.days), ("nivolumab",), np.arange(0.0, args.days + 1.0),
                                n_lesions=2)
    ours = _qspjax(cohort, schedule, config, args.chunk)
    if not distributed.is_writer():  # the other processes of a multi-process run only solve their share
        return None
    import jax

    ours["processes"] = jax.process_count()
    # One CPU device per process (``--local-processes``), about one core each; a single process
    # also uses about one core (measured: 48 s of user time in 38 s of wall time, RESULTS.md).
    ours["patients_per_second_per_core"] = ours["patients_per_second"] / ours["processes"]
    ref_n = min(args.reference_n, args.n)
    patients = list(range(ref_n))
    from qspjax.io import provenance

    result = {"machine": C.machine(), "run": provenance(vars(args), args.seed), "n": args.n, "days": args.days, "rtol": args.rtol, "atol": args.atol,
              "reference_n": ref_n, "cohort_growth_seconds": grow.seconds, "sparse_jacobian": config.sparse_jacobian,
              "solver": config.solver,
              "qspjax": {k: v for k, v in ours.items() if k != "final_diameter_cm"}}
    ours["batching"], ours["lanes"] = args.batching, args.lanes
    rows = [("qspjax (%s, chunk %d, %d process%s)" % (args.batching, ours["chunk"], ours["processes"],
                                                     "es" if ours["processes"] > 1 else ""), args.n, f"{ours['seconds']:.2f}",
             f"{ours['patients_per_second']:.3g}", "1", "-", f"{ours['compile_seconds']:.1f} compile")]
    if not args.skip_scipy:
        sp = _scipy_loop(cohort, schedule, config, patients)
        result["scipy"] = {k: v for k, v in sp.items() if k != "final_diameter_cm"}
        # per core: qspjax ran in ``processes`` processes of one core each, the reference loop in one
        result["scipy"]["speedup"] = ours["patients_per_second_per_core"] / sp["patients_per_second"]
        result["scipy"]["speedup_wall"] = ours["patients_per_second"] / sp["patients_per_second"]
        result["scipy"]["max_rel_diff_final_diameter"] = _agreement(ours["final_diameter_cm"], sp["final_diameter_cm"])
        rows.append((f"SciPy LSODA loop ({ref_n} pts, extrapolated)", ref_n, f"{sp['seconds']:.2f}",
                     f"{sp['patients_per_second']:.3g}", f"{result['scipy']['speedup']:.3g}",
                     f"{result['scipy']['max_rel_diff_final_diameter']:.2e}", f"{sp['compile_seconds']:.1f} jit"))
    if not args.skip_roadrunner:
        rr = _roadrunner_loop(cohort, schedule, config, patients, args.days)
        result["roadrunner"] = {k: v for k, v in rr.items() if k != "final_diameter_cm"}
        # per core: qspjax ran in ``processes`` processes of one core each, the reference loop in one
        result["roadrunner"]["speedup"] = ours["patients_per_second_per_core"] / rr["patients_per_second"]
        result["roadrunner"]["speedup_wall"] = ours["patients_per_second"] / rr["patients_per_second"]
        result["roadrunner"]["max_rel_diff_final_diameter"] = _agreement(ours["final_diameter_cm"],
                                                                         rr["final_diameter_cm"])
        rows.append((f"libRoadRunner CVODE loop ({ref_n} pts, extrapolated)", ref_n, f"{rr['seconds']:.2f}",
                     f"{rr['patients_per_second']:.3g}", f"{result['roadrunner']['speedup']:.3g}",
                     f"{result['roadrunner']['max_rel_diff_final_diameter']:.2e}",
                     f"{rr['setup_seconds']:.1f} export+load"))
    if args.profile:
        result["profile"] = profile(cohort, config, args.chunk)
    print(f"{args.days:g}-day regimen, rtol {args.rtol:g}, atol {args.atol:g}; cohort growth "
          f"{grow.seconds:.1f} s (not counted); qspjax {ours['steps_per_patient']:.0f} steps/patient, "
          f"{ours['n_failed']} failed")
    C.print_table(rows, ("solver", "patients", "seconds", "patients/s", "qspjax speed-up per core", "max rel diff final diam",
                         "one-off"))
    if "profile" in result:
        print("profile (seconds per call):", result["profile"])
    if args.json:
        C.write_json(args.json, result)
    return result


def profile(cohort, config, chunk: int) -> dict:
    """What one implicit step costs: RHS, Jacobian and LU, for one patient and a vmapped chunk."""
    import timeit

    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from qspjax.solver.simulate import _flat_system

    n = int(cohort.status.shape[0])
    idx = np.arange(min(chunk, n))
    models, ys = C.take(cohort.model, idx), C.take(cohort.y0, idx)
    like = C.take(cohort.y0, 0)

    def vf(m, z):
        return _flat_system(m, like).term.vf(0.0, z, None)

    z = jax.vmap(lambda m, y: ravel_pytree(y)[0] / _flat_system(m, like).scale)(models, ys)
    one_m, one_z = C.take(models, 0), z[0]
    f1, j1 = jax.jit(vf), jax.jit(jax.jacfwd(vf, argnums=1))
    fb, jb = jax.jit(jax.vmap(vf)), jax.jit(jax.vmap(jax.jacfwd(vf, argnums=1)))
    lu = jax.jit(jax.vmap(lambda a: jax.scipy.linalg.lu_factor(jnp.eye(a.shape[0]) - 0.1 * a)))
    a = jb(models, z)
    out = {"state_size": int(one_z.shape[0]), "batch": int(len(idx))}
    for name, fn in (("rhs_one", lambda: f1(one_m, one_z)), ("jacobian_one", lambda: j1(one_m, one_z)),
                     ("rhs_batch", lambda: fb(models, z)), ("jacobian_batch", lambda: jb(models, z)),
                     ("lu_batch", lambda: lu(a))):
        C.block(fn())
        reps = 20
        out[name + "_seconds"] = min(timeit.repeat(lambda: C.block(fn()), number=reps, repeat=3)) / reps
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="cohort size solved by qspjax (default 100)")
    p.add_argument("--reference-n", type=int, default=10, help="patients solved by each reference loop (default 10)")
    p.add_argument("--days", type=float, default=400.0, help="treatment horizon in days (default 400)")
    p.add_argument("--chunk", type=int, default=256, help="patients per qspjax call (default 256)")
    p.add_argument("--batching", default="auto", choices=("auto", "queue", "lockstep"),
                   help="qspjax's batch solver (SolverConfig.batching; auto = the lane queue here)")
    p.add_argument("--lanes", type=int, default=None,
                   help="patients stepped together by the lane queue (default: SolverConfig's, 32 on a CPU, the chunk on a GPU)")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-jacobian", action="store_true",
                   help="qspjax's Rosenbrock solver forms its Jacobian from one JVP per state, not per colour (for comparison)")
    p.add_argument("--solver", default="rodas5p", choices=("rodas5p", "rodas4"),
                   help="qspjax's solver (default rodas5p, the package default; rodas4 for comparison)")
    p.add_argument("--skip-scipy", action="store_true")
    p.add_argument("--skip-roadrunner", action="store_true")
    p.add_argument("--profile", action="store_true", help="also time RHS, Jacobian and LU calls")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    # --local-processes K: qspjax's part as K cooperating processes of this machine, one CPU device
    # (about one core) each, every chunk split between them; the reference loops run in process 0.
    from qspjax.solver.distributed import add_arguments

    add_arguments(p)
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
