"""``qspjax trial`` and ``qspjax compare``: virtual clinical trials and protocol comparisons."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from qspjax.commands import _model_options as model_options
from qspjax.errors import QSPValidationError


# RECIST target-lesion choices: qspjax.virtual_trial.TARGET_LESIONS (not imported here, to keep the
# CLI's start-up free of the numerical stack; tests/test_virtual_trial.py checks they agree).
_TARGETS = ("all", "irradiated", "non_irradiated")


def _common(p: argparse.ArgumentParser, default_rtol: float = 1e-5) -> None:
    model_options.add_arguments(p)
    p.add_argument("--patients", type=int, default=100, help="virtual patients per arm (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the virtual population (default 0)")
    p.add_argument("--output-every", type=float, default=1.0, help="days between saved time points (default 1)")
    p.add_argument("--chunk", type=int, default=64, help="patients solved per compiled batch (default 64)")
    p.add_argument("--rtol", type=float, default=default_rtol,
                   help=f"solver relative tolerance (default {default_rtol:g}; RECIST reads diameters to ~1 %%)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    from qspjax.solver.distributed import add_arguments

    add_arguments(p)


def register(sub) -> None:
    p = sub.add_parser("trial", help="run a virtual clinical trial of one arm or regimen",
                       description="Simulate a screened virtual cohort under a dataset arm's regimen (matched to "
                                   "its baseline) or a regimen file; write RECIST 1.1 endpoints, a per-patient "
                                   "table and plots, with the arm's published values beside.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arm", help="dataset arm id NCT…:ARM (see `qspjax trials show NCT…`)")
    which.add_argument("--regimen", help="regimen YAML file (configs/regimens/README.md)")
    p.add_argument("--days", type=float, default=None,
                   help="simulated days (default: the arm's follow-up, else 400)")
    p.add_argument("--assessment-interval", type=float, default=56.0,
                   help="days between RECIST assessments (default 56 = 8 weeks)")
    p.add_argument("--target", choices=_TARGETS, default="all",
                   help="RECIST target lesions (default all; PEMBRO-RT-like trials: non_irradiated; "
                        "the seed's one-tumor QSP-IO setting: irradiated)")
    p.add_argument("--death-rate-per-day", type=float, default=0.0,
                   help="constant competing death hazard for PFS (default 0)")
    p.add_argument("--no-match", action="store_true", help="do not match the arm's baseline mix")
    p.add_argument("--posterior", default=None, metavar="DIR",
                   help="a calibration's posterior (DIR/posterior.nc, ArviZ): also run the cohort under "
                        "--posterior-draws draws and report each rate with a credible interval that carries "
                        "parameter uncertainty and the cohort's binomial noise (summary.json: posterior_predictive)")
    p.add_argument("--posterior-draws", type=int, default=16,
                   help="posterior draws simulated with --posterior (default 16, evenly spaced over chains)")
    _common(p)
    p.set_defaults(func=run_trial)

    c = sub.add_parser("compare", help="compare protocols on one virtual population",
                       description="Simulate every protocol of an experiment file on the same screened virtual "
                                   "population; write a table, a bar plot of ORR beside the reported values and "
                                   "summary.json.")
    c.add_argument("experiment", help="experiment YAML file (configs/experiments/README.md)")
    c.add_argument("--posterior", default=None, metavar="DIR",
                   help="a calibration's posterior (DIR/posterior.nc): every protocol's rates also as "
                        "posterior-predictive credible intervals (summary.json: protocols[].posterior_predictive)")
    c.add_argument("--posterior-draws", type=int, default=16, help="posterior draws simulated (default 16)")
    c.add_argument("--target", choices=_TARGETS, default=None,
                   help="RECIST target lesions, replacing the experiment file's assessment.target "
                        "(irradiated: the seed's one-tumor setting, the irradiated lesion alone)")
    _common(c)
    c.set_defaults(func=run_compare)


def _check(args) -> None:
    model_options.check_cohort_flags(args)
    if not (math.isfinite(args.output_every) and args.output_every > 0):
        raise QSPValidationError("command line", "--output-every", args.output_every, "must be a positive number of days")
    for name in ("days", "assessment_interval"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise QSPValidationError("command line", f"--{name.replace('_', '-')}", value, "must be a positive number of days")
    rate = getattr(args, "death_rate_per_day", 0.0)
    if not (math.isfinite(rate) and rate >= 0):
        raise QSPValidationError("command line", "--death-rate-per-day", rate, "must be a non-negative rate")


def _config(args, choice: model_options.ModelChoice) -> dict:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config["calibration"] = choice.record()
    return config


def run_trial(args: argparse.Namespace) -> int:
    _check(args)
    from qspjax.solver.distributed import from_arguments, is_writer, relaunch_locally

    status = relaunch_locally(args)
    if status is not None:
        return status
    from_arguments(args)
    from qspjax.io import prepare_out_dir, provenance
    from qspjax.params import load_parameters
    from qspjax.regimen import load_regimen, parse_regimen
    from qspjax.runner import run_cohort
    from qspjax.virtual_trial import Assessment, evaluate, published_endpoints, write_trial
    from qspjax.vpop import load_population, target_from_arm

    published = target = None
    origin, orr_day = 0.0, None
    if args.arm:
        from qspjax.data import load_trials

        arm = load_trials().get_arm(args.arm)  # an unknown id is refused with the known ones listed
        regimen = parse_regimen(arm.regimen, source=f"configs/trials/{arm.nct_id}.yaml: arm {arm.arm_id}.regimen")
        days = args.days or float(arm.follow_up_days)
        published = published_endpoints(arm)
        target = None if args.no_match else target_from_arm(arm)
        origin, orr_day = float(arm.outcome_origin_day), published["orr_assessment_day"]
    else:
        regimen = load_regimen(args.regimen)
        days = args.days or 400.0
    if args.output_every > days:
        raise QSPValidationError("command line", "--output-every", args.output_every, f"must be at most --days ({days:g})")
    if days <= origin + (orr_day or 0.0):
        raise QSPValidationError("command line", "--days", days,
                                 f"must be later than the arm's outcome origin (day {origin:g})"
                                 + (f" + its response read ({orr_day:g} days)" if orr_day else ""))
    assessment = Assessment(args.assessment_interval, args.target, death_rate_per_day=args.death_rate_per_day,
                            origin_day=origin, orr_assessment_day=orr_day)
    choice = model_options.resolve(args)
    params = load_parameters(choice.main, choice.extra)
    spec = load_population(choice.population)  # validated before the output folder is made
    draws = _posterior_models(args, params, spec)  # a bad posterior is refused before any compute
    writer = is_writer()  # process 0 of a multi-process run writes; the others only solve their share
    out = prepare_out_dir(args.out, args.overwrite) if writer else None
    prov = provenance(config=_config(args, choice), seed=args.seed)  # the revision that runs, read before the run
    result = run_cohort(params, regimen, n_patients=args.patients, seed=args.seed, days=days,
                        output_every=args.output_every, population_file=str(choice.population), chunk=args.chunk,
                        rtol=args.rtol, progress=writer, target=target)
    if not writer:
        return 0
    outcome = evaluate(result, assessment, seed=args.seed)
    extra = per_draw = None
    if draws:
        from tqdm import tqdm

        from qspjax.inference.predictive import summarise_draws

        per_draw = []
        for draw_params, draw_spec in tqdm(draws, desc="posterior draws", unit="draw"):
            r = run_cohort(draw_params, regimen, n_patients=args.patients, seed=args.seed, days=days,
                           output_every=args.output_every, spec=draw_spec, chunk=args.chunk, rtol=args.rtol,
                           target=target)
            per_draw.append(evaluate(r, assessment, seed=args.seed).summary)
        extra = {"posterior_predictive": dict(summarise_draws(per_draw, seed=args.seed),
                                              posterior=args.posterior, draws=len(draws),
                                              method="mixture over draws of Beta(x + 1/2, n - x + 1/2), "
                                                     "same virtual patients under every draw")}
    summary = write_trial(out, result, outcome, prov, published, extra=extra, draws=per_draw)
    model = "calibrated" if choice.calibrated else "uncalibrated"
    line = (f"{model} model: ORR {100 * summary['orr']:.1f} % "
            f"(95 % CI {100 * summary['orr_ci'][0]:.1f}–{100 * summary['orr_ci'][1]:.1f})")
    if extra:
        pp = extra["posterior_predictive"]["orr"]
        line += (f"; posterior predictive {100 * pp['mean']:.1f} % "
                 f"(95 % CrI {100 * pp['lower']:.1f}–{100 * pp['upper']:.1f}, {pp['draws']} draws)")
    if published and published.get("orr") is not None:
        line += f"; published {100 * published['orr']:.1f} %"
        check = summary["comparison"]["orr"]
        if "predictive_interval" in check:
            lo, hi = check["predictive_interval"]
            line += (f" ({'inside' if check['inside_predictive_interval'] else 'outside'} the "
                     f"{100 * check['predictive_level']:g} % predictive interval {100 * lo:.1f}–{100 * hi:.1f} "
                     f"of a {check['predictive_n_trial']}-patient trial)")
    print(f"{regimen.name}: {summary['n_evaluated']}/{args.patients} patients evaluated; {line}; outputs in {out}")
    return 0


def _posterior_models(args, params, spec) -> list:
    """(ParameterSet, PopulationSpec) per selected posterior draw; [] without --posterior."""
    if not getattr(args, "posterior", None):
        return []
    from qspjax.inference.predictive import apply_draw, load_posterior, posterior_draws

    posterior = load_posterior(args.posterior)
    return [apply_draw(d, params, spec, source=posterior.path) for d in posterior_draws(posterior, args.posterior_draws)]


def run_compare(args: argparse.Namespace) -> int:
    _check(args)
    from qspjax.solver.distributed import from_arguments, is_writer, relaunch_locally

    status = relaunch_locally(args)
    if status is not None:
        return status
    from_arguments(args)
    from qspjax.io import prepare_out_dir, provenance
    from qspjax.params import load_parameters
    from qspjax.runner import build_population, treat_population
    from qspjax.solver.simulate import SolverConfig
    from qspjax.virtual_trial import comparison_table, evaluate, load_experiment, write_comparison
    from qspjax.vpop import load_population

    experiment = load_experiment(args.experiment)
    if args.target is not None:
        experiment = dataclasses.replace(experiment, assessment=dataclasses.replace(experiment.assessment,
                                                                                    target=args.target))
    if args.output_every > experiment.days:
        raise QSPValidationError("command line", "--output-every", args.output_every,
                                 f"must be at most the experiment's days ({experiment.days:g})")
    choice = model_options.resolve(args)
    spec = load_population(choice.population)
    params = load_parameters(choice.main, choice.extra)
    draws = _posterior_models(args, params, spec)  # a bad posterior is refused before any compute
    writer = is_writer()  # process 0 of a multi-process run writes; the others only solve their share
    out = prepare_out_dir(args.out, args.overwrite) if writer else None
    prov = provenance(config=_config(args, choice), seed=args.seed)  # the revision that runs, read before the run
    drugs = tuple(dict.fromkeys(d for p in experiment.protocols for d in p.regimen.drugs)) or ("nivolumab",)
    config = SolverConfig(rtol=args.rtol, atol=args.rtol * 1e-3)
    population = build_population(params, args.patients, args.seed, drugs, spec=spec, config=config,
                                  chunk=args.chunk, progress=writer)
    results = treat_population(population, [p.regimen for p in experiment.protocols], days=experiment.days,
                               output_every=args.output_every, config=config, chunk=args.chunk, progress=writer)
    if not writer:
        return 0
    outcomes = [evaluate(r, experiment.assessment, seed=args.seed) for r in results]
    predictive = None
    if draws:
        from tqdm import tqdm

        from qspjax.inference.predictive import summarise_draws

        per_draw = [[] for _ in experiment.protocols]  # per protocol, one summary per draw
        for draw_params, draw_spec in tqdm(draws, desc="posterior draws", unit="draw"):
            pop = build_population(draw_params, args.patients, args.seed, drugs, spec=draw_spec, config=config,
                                   chunk=args.chunk)
            treated = treat_population(pop, [p.regimen for p in experiment.protocols], days=experiment.days,
                                       output_every=args.output_every, config=config, chunk=args.chunk)
            for i, r in enumerate(treated):
                per_draw[i].append(evaluate(r, experiment.assessment, seed=args.seed).summary)
        predictive = [dict(summarise_draws(s, seed=args.seed), posterior=args.posterior, draws=len(draws))
                      for s in per_draw]
    rows = write_comparison(out, experiment, results, outcomes, prov, posterior_predictive=predictive)
    print(comparison_table(rows))
    print(f"outputs in {out}")
    return 0
