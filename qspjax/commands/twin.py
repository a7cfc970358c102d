"""``qspjax twin``: one patient's posterior from their lesion reads, and their predicted course under
each candidate regimen (:mod:`qspjax.analysis.twin`)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from qspjax.commands import _model_options as model_options
from qspjax.errors import QSPValidationError

EXIT_REFUSED = 4  # the fit ran but its diagnostics (or a data conflict) forbid predicting


def register(sub) -> None:
    p = sub.add_parser(
        "twin", help="patient digital twin: NUTS posterior of one patient, ranked candidate regimens",
        description="Fit one patient's parameters (the calibrated population as the prior) to their lesion "
                    "diameters by NUTS, then predict each lesion under the history regimen continued and under each "
                    "candidate (candidate day 0 = the last measurement day). Writes posterior.nc, summary.json, "
                    "ranking.csv, fitted_past.png, predicted_futures.png and run.json. Exit status 4 when the "
                    "diagnostics fail or the data contradict the model (no prediction is made).")
    p.add_argument("patient", help="patient file: CSV (day, lesion, diameter_mm[, lymphocytes_per_ul, pdl1_tps]) "
                                   "or YAML (see qspjax/analysis/twin.py)")
    p.add_argument("--history", required=True, help="regimen YAML of the treatment given so far (day 0 = first day)")
    p.add_argument("--candidates", nargs="*", default=[], metavar="REGIMEN",
                   help="candidate regimen YAMLs, each starting (its day 0) on the last measurement day")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--chains", type=int, default=2, help="NUTS chains, run one after another (default 2)")
    p.add_argument("--samples", type=int, default=80, help="kept draws per chain (default 80)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per chain (default: --samples)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-tree-depth", type=int, default=5, help="NUTS maximum tree depth (default 5)")
    p.add_argument("--horizon", type=float, default=365.0, help="prediction horizon, days from day 0 (default 365)")
    p.add_argument("--landmark", type=float, default=None,
                   help="day for progression-free and burden in the ranking (default: the horizon)")
    p.add_argument("--predictive-draws", type=int, default=48, help="posterior draws solved per regimen (default 48)")
    p.add_argument("--prior-draws", type=int, default=32, help="population draws of the prior-data check (default 32)")
    p.add_argument("--max-rhat", type=float, default=1.05, help="refuse predictions above this R-hat (default 1.05)")
    p.add_argument("--min-ess", type=float, default=50.0, help="refuse predictions below this bulk ESS (default 50)")
    model_options.add_arguments(p)
    p.set_defaults(func=run)


def _check(args) -> None:
    for path, flag in [(args.patient, "patient"), (args.history, "--history")] + [(c, "--candidates") for c in args.candidates]:
        if not Path(path).is_file():
            raise QSPValidationError("command line", flag, str(path), "the file does not exist")
    for path in (args.params, args.population, *(args.params_extra or [])):
        if path is not None and not Path(path).is_file():
            raise QSPValidationError("command line", "--params/--params-extra/--population", str(path),
                                     "the file does not exist")
    for flag, value in (("--chains", args.chains), ("--samples", args.samples), ("--predictive-draws", args.predictive_draws),
                        ("--prior-draws", args.prior_draws), ("--max-tree-depth", args.max_tree_depth)):
        if value < 1:
            raise QSPValidationError("command line", flag, value, "must be an integer >= 1")
    if args.warmup is not None and args.warmup < 1:
        raise QSPValidationError("command line", "--warmup", args.warmup, "must be an integer >= 1")
    if not (math.isfinite(args.horizon) and 0 < args.horizon <= 3650):
        raise QSPValidationError("command line", "--horizon", args.horizon, "must be in (0, 3650] days")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from qspjax.analysis.twin import TwinConfig, fit_twin, load_patient, write_twin
    from qspjax.io import prepare_out_dir, provenance
    from qspjax.params import load_parameters
    from qspjax.regimen import load_regimen
    from qspjax.vpop import load_population

    t0 = time.perf_counter()
    patient = load_patient(args.patient, args.horizon)
    history = load_regimen(args.history)
    candidates = [(load_regimen(c), str(c)) for c in args.candidates]
    config = TwinConfig(horizon_days=args.horizon, landmark_days=args.landmark, chains=args.chains,
                        warmup=args.warmup or args.samples, samples=args.samples, seed=args.seed,
                        max_tree_depth=args.max_tree_depth, predictive_draws=args.predictive_draws,
                        prior_draws=args.prior_draws, max_rhat=args.max_rhat, min_ess=args.min_ess)
    choice = model_options.resolve(args)
    params = load_parameters(choice.main, choice.extra)
    spec = load_population(choice.population)
    from qspjax.analysis.twin import check_inputs

    check_inputs(patient, history, [c for c, _ in candidates], config)
    out = prepare_out_dir(args.out, args.overwrite)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func", "argv")}
    prov = provenance(config=cfg | {"calibration": choice.record(), "twin": vars(config)}, seed=args.seed)
    result = fit_twin(patient, history, candidates, params=params, spec=spec, config=config,
                      progress=lambda s: print(s, flush=True))
    result.timing["total_s"] = time.perf_counter() - t0
    summary = write_twin(out, result, prov)
    d = summary["diagnostics"]
    print(f"R-hat max {d['rhat_max']:.3f}, bulk ESS min {d['ess_bulk_min']:.0f}, divergences {d['divergences']}; "
          f"{summary['prior_domination']['note']}")
    if result.refused:
        print("prediction refused:\n  " + "\n  ".join(result.refused))
        print(f"outputs in {out} ({result.timing['total_s']:.0f} s)")
        return EXIT_REFUSED
    print(f"{'rank':>4}  {'regimen':40s} {'P(response)':>11} {'P(PF@' + format(config.landmark, 'g') + ')':>11} {'burden mm':>10}")
    for r in result.ranking:
        print(f"{r['rank']:>4}  {r['regimen'][:40]:40s} {r['p_response']:>11.2f} {r['p_progression_free']:>11.2f} "
              f"{r['expected_burden']:>10.1f}")
    print(f"outputs in {out} ({result.timing['total_s']:.0f} s)")
    return 0
