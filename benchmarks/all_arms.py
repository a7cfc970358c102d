"""Every dataset arm over its whole follow-up: how many screened patients fail to solve, per arm.

For each of the 36 arms of ``configs/trials`` a cohort matched to the arm's baseline (PD-L1 mix,
tumor size) is grown, screened and treated with the arm's own regimen for the arm's
``follow_up_days`` (1,848 days for PACIFIC), exactly as ``qspjax trial --arm`` does, on the
calibrated model by default. The table counts, per arm, the candidates lost before treatment
(growth to baseline or plausibility screening: a property of the sampled patient, reported) and
the screened patients whose treated solve failed (a solver defect: the goal is zero).

    python benchmarks/all_arms.py --patients 16 --json benchmarks/results_all_arms.json
"""

from __future__ import annotations

import argparse
import sys
import time

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=16, help="screened patients per arm (default 16)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--arms", nargs="*", default=None, help="arm ids NCT…:ARM (default: every arm)")
    ap.add_argument("--output-every", type=float, default=7.0)
    ap.add_argument("--rtol", type=float, default=1e-5, help="as `qspjax trial` (default 1e-5)")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--uncalibrated", action="store_true", help="QSP-IO's published values, default population")
    ap.add_argument("--json", default=None, help="write the per-arm table here (strict JSON)")
    args = ap.parse_args(argv)

    import jax

    from qspjax.commands._model_options import add_arguments, resolve
    from qspjax.data import load_trials
    from qspjax.io import atomic_write_json, provenance
    from qspjax.params import load_parameters
    from qspjax.regimen import parse_regimen
    from qspjax.runner import run_cohort, status_counts
    from qspjax.solver.simulate import STATUS_OK
    from qspjax.vpop import target_from_arm

    opts = argparse.ArgumentParser()
    add_arguments(opts)
    choice = resolve(opts.parse_args(["--uncalibrated"] if args.uncalibrated else []))
    params = load_parameters(choice.main, choice.extra)
    trials = load_trials()
    arms = [trials.get_arm(a) for a in args.arms] if args.arms else list(trials.arms)
    rows = []
    for arm in arms:
        regimen = parse_regimen(arm.regimen, source=f"configs/trials/{arm.nct_id}.yaml: arm {arm.arm_id}.regimen")
        start = time.perf_counter()
        result = run_cohort(params, regimen, n_patients=args.patients, seed=args.seed,
                            days=float(arm.follow_up_days), output_every=args.output_every,
                            population_file=str(choice.population), chunk=args.chunk, rtol=args.rtol,
                            max_failed_fraction=1.0, target=target_from_arm(arm))
        wall = time.perf_counter() - start
        screening = result.meta.get("screening") or {}
        failed = int(np.sum(result.status != STATUS_OK))
        row = {"arm": arm.arm_id, "follow_up_days": int(arm.follow_up_days), "patients": args.patients,
               "failed": failed, "statuses": status_counts(result.status),
               "solver_steps_median": result.meta["solver_steps_median"],
               "screening": {k: v for k, v in screening.items() if isinstance(v, (int, float, str))},
               "wall_s": round(wall, 1)}
        rows.append(row)
        print(f"{arm.arm_id:32s} {arm.follow_up_days:5d} d  failed {failed:3d}/{args.patients}  "
              f"median steps {row['solver_steps_median']:8.0f}  {wall:6.1f} s", flush=True)
        # Every arm compiles its own solver shapes; dropping them keeps one long process within the
        # kernel's limit on memory mappings (vm.max_map_count, 65,530 here): twice a whole run
        # died after 18-22 arms with "LLVM compilation error: Cannot allocate memory" while
        # 19 GB of memory were free.
        jax.clear_caches()
        if args.json:  # progress: the table so far, rewritten after every arm
            atomic_write_json(args.json, {"arms": rows, "run": provenance(vars(args), args.seed),
                                          "calibration": choice.record(), "machine": C.machine()})
    total = sum(r["failed"] for r in rows)
    print(f"{total} failed patient(s) over {len(rows)} arm(s) of {args.patients} screened patients each")
    return 0 if total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
