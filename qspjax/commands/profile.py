"""``qspjax profile FIT_DIR --out DIR``: profile likelihood of a fit's parameters (:mod:`qspjax.inference.profile`)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("profile", help="profile likelihood and identifiability of a fit's parameters",
                       description="Re-optimises the other parameters at fixed values of each parameter of a "
                                   "`qspjax fit` output folder (the objective rebuilt from its run.json); writes "
                                   "profiles.csv, profile_<parameter>.png and profiles.json (95 % intervals, "
                                   "identifiability reading).")
    p.add_argument("fit_dir", metavar="FIT_DIR", help="output folder of `qspjax fit` (run.json, loss_history.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--parameters", default=None,
                   help="comma-separated parameter ids to profile (default: all the fit estimated)")
    p.add_argument("--objective", default="likelihood",
                   help="likelihood (default: the fit's negative log likelihood) or posterior (with its priors)")
    p.add_argument("--step", type=float, default=0.1, help="profile step in prior sds (default 0.1)")
    p.add_argument("--max-points", type=int, default=30, help="profile points per side at most (default 30)")
    p.add_argument("--max-delta", type=float, default=3.84,
                   help="stop a side once the objective rose this many nats (default 3.84; must exceed 1.92)")
    p.add_argument("--box-sds", type=float, default=None,
                   help="profile range: prior centre +- this many prior sds (default: the fit's optimizer.box_sds)")
    p.set_defaults(func=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    from qspjax.inference.profile import check_arguments, problem_from_fit, profile_fit, write_profiles
    from qspjax.io import prepare_out_dir

    names = None if args.parameters is None else [s.strip() for s in args.parameters.split(",") if s.strip()]
    problem, _, _ = problem_from_fit(args.fit_dir)  # refuse a bad folder or argument before any work
    check_arguments(list(problem.ids), names, args.objective, args.step, args.max_points, args.max_delta, args.box_sds)
    out = prepare_out_dir(args.out, args.overwrite)
    profiles, info = profile_fit(args.fit_dir, names, args.objective, args.step, args.max_points, args.max_delta,
                                 args.box_sds)
    write_profiles(out, profiles, info)
    for p in profiles:
        lo = "-" if p.lower is None else f"{p.lower:.4g}"
        hi = "-" if p.upper is None else f"{p.upper:.4g}"
        print(f"  {p.parameter:>20s}: 95 % [{lo}, {hi}] {p.reading}")
    print(f"wrote {out}/profiles.csv, profiles.json and {len(profiles)} PNG(s)")
    return 0
