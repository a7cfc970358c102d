"""Cost of the calibration objective: one log posterior and one value-and-gradient of a run file.

Issue 16's third figure: the objective of ``configs/inference/fit_advanced.yaml`` (12 advanced
arms) at 32 virtual patients per arm and 372 days, value-and-gradient <= 60 s on the 2 cores and
compile <= 60 s. The run file's other likelihood settings (rtol, scans, temperature) are kept;
``--patients`` and ``--horizon-days`` override its cohort and horizon. Times are wall seconds of
one process (about one core); the first call of each function is reported as its compile time
(tracing and XLA compilation plus one evaluation), the later calls as the evaluation.

    python benchmarks/objective.py --patients 32 --horizon-days 372 --json benchmarks/results_objective_n32_372d.json
"""

from __future__ import annotations

import argparse
import time

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C

import numpy as np


def main(args) -> dict:
    from qspjax.inference.runs import load, problems, with_overrides

    cfg = with_overrides(load(args.config), likelihood={"patients": args.patients, "horizon_days": args.horizon_days})
    with C.Timer() as setup:
        problem, _ = problems(cfg, "qsp", args.max_arms)
    theta = np.asarray(problem.prior_means(), dtype=float)
    out = {"machine": C.machine(), "config": args.config, "patients": args.patients,
           "horizon_days": args.horizon_days, "arms": len(problem.arms), "parameters": len(theta),
           "rtol": problem.settings.rtol, "solver": problem.config.solver,
           "linear_solver": problem.config.linear_solver, "setup_seconds": setup.seconds}
    for name, fn in (("forward", problem.log_posterior), ("value_and_grad", problem.value_and_grad)):
        start = time.perf_counter()
        try:
            value, out[name] = C.time_compiled(fn, theta, repeats=args.repeats)
        except Exception as exc:  # e.g. XLA's RESOURCE_EXHAUSTED: recorded as the measurement's outcome
            out[name] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                         "seconds_until_failure": time.perf_counter() - start}
            print(f"{name}: failed after {out[name]['seconds_until_failure']:.0f} s: {out[name]['failed']}", flush=True)
            continue
        if name == "value_and_grad":
            grad = np.asarray(value[1])
            out[name]["gradient_finite"] = bool(np.all(np.isfinite(grad)))
            out[name]["value"] = float(value[0])
        else:
            out[name]["value"] = float(value)
        print(f"{name}: {out[name]['seconds']:.2f} s (first call {out[name]['first_call_seconds']:.1f} s)", flush=True)
    done = [k for k in ("forward", "value_and_grad") if "seconds" in out[k]]
    if len(done) == 2:
        out["ratio_gradient_to_forward"] = out["value_and_grad"]["seconds"] / out["forward"]["seconds"]
    rows = [(k, f"{out[k]['seconds']:.2f}", "-" if out[k]["compile_seconds"] is None else f"{out[k]['compile_seconds']:.1f}")
            for k in done]
    print(f"{args.config}: {out['arms']} arms x {args.patients} patients x {args.horizon_days:g} days, "
          f"{out['parameters']} parameters, rtol {out['rtol']:g}")
    C.print_table(rows, ("computation", "seconds", "compile s"))
    if args.json:
        C.write_json(args.json, out)
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/inference/fit_advanced.yaml")
    p.add_argument("--patients", type=int, default=32, help="virtual patients per arm (default 32)")
    p.add_argument("--horizon-days", type=float, default=372.0, help="simulated days per arm (default 372)")
    p.add_argument("--max-arms", type=int, default=None, help="only the first N fitted arms")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed calls after the compiling one (default 1; 0: report the compiling call alone)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
