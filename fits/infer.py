"""Bayesian inference of the virtual NSCLC population from RT + checkpoint-inhibitor trial arms.

The same likelihood as ``fits/calibrate.py`` (a fixed virtual cohort per arm, smooth RECIST,
binomial/multinomial counts of responses and progression-free patients) becomes a numpyro model:
each population median or spread is a ``numpyro.sample`` from its prior on the log/logit scale,
and the arms' log-likelihood a ``numpyro.factor``. NUTS samples several chains; the posterior is
saved as ArviZ InferenceData (netCDF) with R-hat, ESS and divergences in ``summary.json``, trace
and pair plots, and a posterior predictive check per arm: predicted ORR and PFS intervals
against the observed values and their exact binomial intervals, for the fitted arms and for
held-out arms never seen by the fit (scored by their log predictive density).

    python fits/infer.py --config configs/inference/fit_advanced.yaml --out runs/infer

``--simulator kinetics`` swaps the ODE for the closed-form surrogate used in the tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qspjax  # noqa: E402,F401  (float64)
from qspjax.inference.runs import load, run_infer, with_overrides  # noqa: E402
from qspjax.io import prepare_out_dir  # noqa: E402


def main(args: argparse.Namespace) -> dict:
    cfg = with_overrides(load(args.config),
                         likelihood={"patients": args.patients, "horizon_days": args.horizon_days},
                         nuts={"chains": args.chains, "warmup": args.warmup, "samples": args.samples,
                               "seed": args.seed})
    out = prepare_out_dir(args.out, overwrite=True)
    summary = run_infer(cfg, out, args.simulator, args.max_arms, args.predictive_draws, progress=not args.quiet)
    print(f"max R-hat {summary['max_r_hat']:.3f}, min bulk ESS {summary['min_ess_bulk']:.0f}, "
          f"divergences {summary['divergences']} ({summary['seconds']:.0f} s)")
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/inference/fit_advanced.yaml")
    p.add_argument("--out", default="runs/infer")
    p.add_argument("--simulator", choices=("qsp", "kinetics"), default="qsp")
    p.add_argument("--patients", type=int, default=None, help="virtual patients per arm")
    p.add_argument("--horizon-days", type=float, default=None)
    p.add_argument("--chains", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--max-arms", type=int, default=None, help="only the first N fitted and held-out arms")
    p.add_argument("--predictive-draws", type=int, default=50)
    p.add_argument("--seed", type=int, default=None, help="seed of NUTS")
    p.add_argument("--quiet", action="store_true")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
