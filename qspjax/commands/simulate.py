"""``qspjax simulate``: a cohort of virtual patients under one regimen."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from qspjax.commands import _model_options as model_options
from qspjax.errors import QSPValidationError

# Bounds that catch a mistyped flag before it becomes an out-of-memory grid: a century of
# follow-up, and a saved grid of at most a million time points per patient.
MAX_DAYS = 36525.0
MAX_OUTPUT_DAYS = 1_000_000


def register(sub) -> None:
    p = sub.add_parser("simulate", help="simulate virtual patients under a regimen",
                       description="Simulate a cohort under a regimen; write trajectories (netCDF) and summary.json.")
    p.add_argument("--regimen", required=True, help="regimen YAML file (configs/regimens/README.md)")
    model_options.add_arguments(p)
    p.add_argument("--patients", type=int, default=10, help="number of virtual patients (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the cohort (default 0)")
    p.add_argument("--days", type=float, default=400.0, help="simulated days after the start of treatment")
    p.add_argument("--output-every", type=float, default=1.0, help="days between saved time points (default 1)")
    p.add_argument("--no-variability", action="store_true",
                   help="nominal parameters for every patient; start from the parameter file's exported "
                        "initial state when it has one (one lesion, as QSP-IO)")
    p.add_argument("--chunk", type=int, default=64, help="patients solved per compiled batch (default 64)")
    p.add_argument("--rtol", type=float, default=1e-6, help="solver relative tolerance (default 1e-6)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if args.patients <= 0:
        raise QSPValidationError("command line", "--patients", args.patients, "must be a positive integer")
    if not (math.isfinite(args.days) and 0 < args.days <= MAX_DAYS):
        raise QSPValidationError("command line", "--days", args.days, f"must be a number of days in (0, {MAX_DAYS}]")
    if not (math.isfinite(args.output_every) and 0 < args.output_every <= args.days):
        raise QSPValidationError("command line", "--output-every", args.output_every, "must be in (0, --days]")
    if args.days / args.output_every + 1 > MAX_OUTPUT_DAYS:
        raise QSPValidationError("command line", "--output-every", args.output_every,
                                 f"gives more than {MAX_OUTPUT_DAYS} saved time points over --days {args.days:g}")
    if args.chunk <= 0:
        raise QSPValidationError("command line", "--chunk", args.chunk, "must be a positive integer")
    if not (0 < args.rtol < 1e-2):
        raise QSPValidationError("command line", "--rtol", args.rtol, "must be in (0, 1e-2)")
    if args.seed < 0:  # numpy's generators refuse negative seeds, and only once the cohort is drawn
        raise QSPValidationError("command line", "--seed", args.seed, "must be a non-negative integer")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise QSPValidationError("command line", "--out", str(out), "must be a folder (this is an existing file)")


def _check_regimen_fits_model(regimen, n_lesions: int, source: str) -> None:
    """Refuse, naming the file, what compile_schedule would refuse only after the cohort is built."""
    from qspjax.regimen import LESIONS

    for i, course in enumerate(regimen.rt):
        if course.lesion not in LESIONS[:n_lesions]:
            raise QSPValidationError(source, f"rt[{i}].lesion", course.lesion,
                                     f"this run's model has {n_lesions} lesion(s): {list(LESIONS[:n_lesions])}")
    for i, s in enumerate(regimen.surgery):
        if s.lesion not in LESIONS[:n_lesions]:
            raise QSPValidationError(source, f"surgery[{i}].lesion", s.lesion,
                                     f"this run's model has {n_lesions} lesion(s): {list(LESIONS[:n_lesions])}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from qspjax.io import prepare_out_dir, provenance
    from qspjax.params import load_parameters
    from qspjax.regimen import load_regimen
    from qspjax.runner import run_cohort, write_outputs
    from qspjax.vpop import load_population

    choice = model_options.resolve(args)
    params = load_parameters(choice.main, choice.extra)
    regimen = load_regimen(args.regimen)
    load_population(choice.population)  # validated here so that a bad file leaves no output folder behind
    _check_regimen_fits_model(regimen, 1 if args.no_variability and params.initial_state else 2, args.regimen)
    out = prepare_out_dir(args.out, args.overwrite)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config["calibration"] = choice.record()
    prov = provenance(config=config, seed=args.seed)  # the revision that runs, read before the run
    result = run_cohort(
        params, regimen, n_patients=args.patients, seed=args.seed, days=args.days,
        output_every=args.output_every, variability=not args.no_variability,
        exported_initial_state=args.no_variability and bool(params.initial_state),
        population_file=str(choice.population), chunk=args.chunk, rtol=args.rtol, progress=True,
    )
    write_outputs(result, out, prov)
    n_bad = int(np.sum(result.status != 0))
    model = "calibrated" if choice.calibrated else "uncalibrated"
    print(f"{args.patients - n_bad}/{args.patients} patients solved ({model} model); outputs in {out}")
    return 0
