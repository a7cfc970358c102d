"""``qspjax stop-time``: the earliest day the antibody can be stopped without losing tumor control."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from qspjax.commands import _model_options as model_options
from qspjax.errors import QSPValidationError

def add_model_arguments(p: argparse.ArgumentParser, default_rtol: float = 1e-5) -> None:
    """Model, population and solver flags shared by ``stop-time`` and ``optimize``: the calibrated
    model is the default, resolved as for every command (:mod:`qspjax.commands._model_options`)."""
    model_options.add_arguments(p)
    p.add_argument("--patients", type=int, default=32, help="virtual patients (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the virtual population (default 0)")
    p.add_argument("--chunk", type=int, default=32, help="solves per compiled batch (default 32)")
    p.add_argument("--rtol", type=float, default=default_rtol, help=f"solver relative tolerance (default {default_rtol:g})")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")


def model_files(args) -> model_options.ModelChoice:
    """The parameter and population files the flags select (see :mod:`qspjax.commands._model_options`)."""
    return model_options.resolve(args)


def check_model_arguments(args) -> None:
    model_options.check_cohort_flags(args)
    for path in (args.params, args.population, *(args.params_extra or [])):
        if path is not None and not Path(path).is_file():
            raise QSPValidationError("command line", "--params/--params-extra/--population", str(path),
                                     "the file does not exist")


def config_of(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func", "argv")}


def register(sub) -> None:
    p = sub.add_parser(
        "stop-time", help="earliest safe stop of the antibody, per patient of a virtual cohort",
        description="For each patient of a screened virtual cohort under a regimen: the earliest antibody dose "
                    "after which no further doses (RT as scheduled) still leaves the tumor eliminated or below a "
                    "burden threshold and not regrowing at the horizon. Bisection on the stop dose, confirmed on a "
                    "longer horizon. Writes summary.json, stop_time.png and run.json.")
    p.add_argument("--regimen", required=True, help="regimen YAML file with at least one antibody course")
    p.add_argument("--days", type=float, default=400.0, help="horizon in days from the start of treatment (default 400)")
    p.add_argument("--output-every", type=float, default=7.0, help="days between saved time points (default 7)")
    p.add_argument("--burden-threshold-mm", type=float, default=5.0,
                   help="sum of lesion diameters at the horizon that still counts as controlled when the viable "
                        "cells are not rising (default 5 mm)")
    p.add_argument("--trend-window", type=float, default=28.0,
                   help="days over which viable cells must not rise at the horizon (default 28)")
    p.add_argument("--min-follow-up", type=float, default=84.0,
                   help="candidate stops leave at least this many days before the horizon (default 84)")
    p.add_argument("--confirm-days", type=float, default=182.0,
                   help="the answer is re-solved to the horizon plus this many days (default 182)")
    add_model_arguments(p)
    p.set_defaults(func=run)


def _check(args) -> None:
    check_model_arguments(args)
    for flag, value, low, strict in (("--days", args.days, 0.0, True), ("--output-every", args.output_every, 0.0, True),
                                     ("--burden-threshold-mm", args.burden_threshold_mm, 0.0, False),
                                     ("--trend-window", args.trend_window, 0.0, True),
                                     ("--min-follow-up", args.min_follow_up, 0.0, False),
                                     ("--confirm-days", args.confirm_days, 0.0, False)):
        if not math.isfinite(value) or value < low or (strict and value <= low):
            raise QSPValidationError("command line", flag, value, f"must be a finite number {'>' if strict else '>='} {low:g}")
    if args.days > 36525:
        raise QSPValidationError("command line", "--days", args.days, "must be at most 36525 (a century)")
    if args.output_every > args.trend_window:
        raise QSPValidationError("command line", "--output-every", args.output_every,
                                 f"must be at most --trend-window ({args.trend_window:g})")
    if args.days <= args.min_follow_up:
        raise QSPValidationError("command line", "--days", args.days,
                                 f"must exceed --min-follow-up ({args.min_follow_up:g} days)")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from qspjax.analysis.stop_time import StopCriterion, antibody_dose_days, find_stop_times, stop_time_table, write_stop_time
    from qspjax.io import prepare_out_dir, provenance
    from qspjax.params import load_parameters
    from qspjax.regimen import load_regimen
    from qspjax.runner import build_population
    from qspjax.solver.simulate import SolverConfig
    from qspjax.vpop import load_population

    regimen = load_regimen(args.regimen)
    if antibody_dose_days(regimen).size == 0:
        raise QSPValidationError(args.regimen, "ici", None, "the regimen has no antibody course: nothing to stop")
    if float(antibody_dose_days(regimen)[0]) > args.days - args.min_follow_up:
        raise QSPValidationError(args.regimen, "ici[].start_day", float(antibody_dose_days(regimen)[0]),
                                 f"the first antibody dose must fall at least --min-follow-up ({args.min_follow_up:g}) "
                                 f"days before the horizon ({args.days:g})")
    criterion = StopCriterion(args.burden_threshold_mm, args.trend_window, args.min_follow_up, args.confirm_days)
    choice = model_files(args)
    params = load_parameters(choice.main, choice.extra)
    spec = load_population(choice.population)
    out = prepare_out_dir(args.out, args.overwrite)
    prov = provenance(config=config_of(args) | {"calibration": choice.record()}, seed=args.seed)
    config = SolverConfig(rtol=args.rtol, atol=args.rtol * 1e-3)
    t0 = time.perf_counter()
    population = build_population(params, args.patients, args.seed, regimen.drugs, spec=spec, config=config,
                                  chunk=min(args.chunk, args.patients))
    t_pop = time.perf_counter() - t0
    result = find_stop_times(population, regimen, days=args.days, output_every=args.output_every, criterion=criterion,
                             config=config, chunk=args.chunk)
    wall = time.perf_counter() - t0
    summary = write_stop_time(out, result, prov, {"screening": population.screening,
                                                  "wall_time_s": {"population": t_pop, "total": wall}})
    print(stop_time_table(summary), end="")
    print(f"outputs in {out} ({wall:.0f} s)")
    return 0
