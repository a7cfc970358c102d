"""``qspjax fit CONFIG`` (MAP calibration) and ``qspjax infer CONFIG`` (NUTS) on trial arms."""

from __future__ import annotations

import argparse

from qspjax.errors import QSPValidationError


def _common(p) -> None:
    p.add_argument("config", help="run file, e.g. configs/inference/fit_advanced.yaml")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--simulator", choices=("qsp", "kinetics"), default="qsp",
                   help="qsp: the model (default); kinetics: the closed-form surrogate (smoke runs)")
    p.add_argument("--patients", type=int, default=None, help="virtual patients per arm (overrides the run file)")
    p.add_argument("--horizon-days", type=float, default=None, help="simulated days (overrides the run file)")
    p.add_argument("--max-arms", type=int, default=None, help="use only the first N fitted and held-out arms")


def register(sub) -> None:
    p = sub.add_parser("fit", help="calibrate population parameters to trial arms (multi-start Adam/L-BFGS)",
                       description="MAP calibration: writes population_fitted.yaml, params_fitted.yaml, "
                                   "loss_history.json, fit_<arm>.png, run.json, and the multistart diagnostics "
                                   "starts.csv, waterfall.png, best_starts.png.")
    _common(p)
    p.add_argument("--starts", type=int, default=None,
                   help="points of the start design, each scored by one forward evaluation (overrides the run file)")
    p.add_argument("--optimize", type=int, default=None,
                   help="how many of the best-scoring starts are optimised (overrides the run file; at most --starts)")
    p.add_argument("--steps", type=int, default=None)
    p.set_defaults(func=run_fit)
    q = sub.add_parser("infer", help="Bayesian inference of population parameters (NUTS)",
                       description="NUTS: writes posterior.nc, summary.json, trace.png, pair.png, "
                                   "predictive.csv, forest.png, run.json.")
    _common(q)
    q.add_argument("--chains", type=int, default=None)
    q.add_argument("--warmup", type=int, default=None)
    q.add_argument("--samples", type=int, default=None)
    q.add_argument("--predictive-draws", type=int, default=50, help="posterior draws for the predictive checks")
    q.set_defaults(func=run_infer)


def _check(args) -> None:
    for name in ("patients", "starts", "optimize", "steps", "chains", "warmup", "samples", "max_arms", "predictive_draws"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise QSPValidationError("command line", "--" + name.replace("_", "-"), value, "must be a positive integer")
    if args.horizon_days is not None and not args.horizon_days > 0:
        raise QSPValidationError("command line", "--horizon-days", args.horizon_days, "must be positive")


def _config(args):
    from qspjax.inference.runs import load, with_overrides

    cfg = load(args.config)
    return with_overrides(cfg, likelihood={"patients": args.patients, "horizon_days": args.horizon_days},
                          optimizer={"starts": getattr(args, "starts", None), "steps": getattr(args, "steps", None),
                                     "optimize": getattr(args, "optimize", None)},
                          nuts={"chains": getattr(args, "chains", None), "warmup": getattr(args, "warmup", None),
                                "samples": getattr(args, "samples", None)})


def run_fit(args: argparse.Namespace) -> int:
    _check(args)
    from qspjax.io import prepare_out_dir
    from qspjax.inference.runs import run_fit as fit

    cfg = _config(args)
    out = prepare_out_dir(args.out, args.overwrite)
    res = fit(cfg, out, args.simulator, args.max_arms)
    print(f"best loss {res['loss']:.3f} in {res['seconds']:.0f} s; outputs in {out}")
    return 0


def run_infer(args: argparse.Namespace) -> int:
    _check(args)
    from qspjax.io import prepare_out_dir
    from qspjax.inference.runs import run_infer as infer

    cfg = _config(args)
    out = prepare_out_dir(args.out, args.overwrite)
    s = infer(cfg, out, args.simulator, args.max_arms, args.predictive_draws)
    print(f"max R-hat {s['max_r_hat']:.3f}, divergences {s['divergences']}, {s['seconds']:.0f} s; outputs in {out}")
    return 0
