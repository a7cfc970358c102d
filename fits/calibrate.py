"""Calibrating the virtual NSCLC population to RT + checkpoint-inhibitor trial arms.

The QSP model predicts one patient's tumor course; a trial arm reports a summary over patients
(objective response rate, the counts of complete/partial response, stable and progressive
disease, progression-free survival at landmarks or its median). To compare the two, every arm is
simulated on the same virtual cohort (quasi-random draws of between-patient variability from one
seed, grown to their baseline tumors, then treated with the arm's regimen), RECIST is applied in
a smooth form (sigmoids of the -30 %/+20 % margins) so the predicted rates are differentiable in
the population parameters, and the printed counts enter as binomial/multinomial likelihoods.
Priors on the population medians (log/logit scale) and spreads come from
``configs/inference/priors.yaml``. This script finds the posterior mode by Adam or L-BFGS from the
best points of a Sobol design over the prior box (each scored by a forward solve) and writes the
fitted population (a population file and a parameter overlay the simulator reads), the loss
history and one fit-vs-observed figure per arm.

    python fits/calibrate.py --config configs/inference/fit_advanced.yaml --out runs/fit

Every fit also writes its multistart diagnostics (``starts.csv``, ``waterfall.png``,
``best_starts.png``; :mod:`qspjax.inference.multistart`), and ``qspjax profile OUT --out DIR``
profiles its parameters (:mod:`qspjax.inference.profile`).

Sizes can be cut for a quick look (``--patients 8 --horizon-days 120 --steps 5``); a second stage
can start where a first ended (``--init-from runs/fit_advanced --method lbfgs``);
``--simulator kinetics`` swaps the ODE for the closed-form surrogate used in the tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qspjax  # noqa: E402,F401  (float64)
from qspjax.inference.config import OPTIMIZER_METHODS  # noqa: E402
from qspjax.inference.runs import load, run_fit, with_overrides  # noqa: E402
from qspjax.io import prepare_out_dir  # noqa: E402


def main(args: argparse.Namespace) -> dict:
    cfg = with_overrides(load(args.config),
                         likelihood={"patients": args.patients, "horizon_days": args.horizon_days},
                         optimizer={"starts": args.starts, "optimize": args.optimize, "steps": args.steps,
                                    "seed": args.seed,
                                    "method": args.method, "learning_rate": args.learning_rate})
    out = prepare_out_dir(args.out, overwrite=True)
    result = run_fit(cfg, out, args.simulator, args.max_arms, progress=not args.quiet,
                     init_from=Path(args.init_from) if args.init_from else None)
    print(f"best negative log posterior {result['loss']:.3f} ({result['seconds']:.0f} s)")
    for name, value in result["natural"].items():
        print(f"  {name:>20s} = {value:.4g}")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/inference/fit_advanced.yaml")
    p.add_argument("--out", default="runs/fit")
    p.add_argument("--simulator", choices=("qsp", "kinetics"), default="qsp")
    p.add_argument("--patients", type=int, default=None, help="virtual patients per arm")
    p.add_argument("--horizon-days", type=float, default=None)
    p.add_argument("--starts", type=int, default=None,
                   help="points of the Sobol start design over the prior box, each scored by a forward solve")
    p.add_argument("--optimize", type=int, default=None, help="how many of the best starts are optimised")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per start (at most)")
    p.add_argument("--max-arms", type=int, default=None, help="only the first N fitted arms")
    p.add_argument("--seed", type=int, default=None, help="seed of the starting points")
    p.add_argument("--method", choices=OPTIMIZER_METHODS, default=None, help="optimiser (default: the run file's)")
    p.add_argument("--learning-rate", type=float, default=None, help="Adam's step size (default: the run file's)")
    p.add_argument("--init-from", default=None, help="start from the best parameters of this earlier fit's folder")
    p.add_argument("--quiet", action="store_true")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
