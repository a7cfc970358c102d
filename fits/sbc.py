"""Simulation-based calibration (SBC) of the Bayesian inference on a small calibration problem.

Does NUTS on the calibration likelihood return the right posterior? SBC (Talts et al. 2018) checks
it without knowing any posterior: draw parameters theta from the prior, simulate a trial data set
from the likelihood at theta, sample the posterior given that data set, and record the rank of
theta among L posterior draws. Averaged over the prior, the posterior is the prior, so with a
correct sampler (and a data simulator that matches the likelihood) the rank of each parameter is
uniform on {0, ..., L}. Too narrow posteriors pile ranks at both ends, too wide ones in the middle,
biased ones on one side.

The problem is a small version of the calibration: two population medians (``k_C1_growth``, tumor
growth rate, and ``alpha_tumor``, radiosensitivity; log scale, normal priors of sd 1 around the
nominal values), a virtual cohort of 16 patients, two arms (SBRT + pembrolizumab with CR/PR/SD/PD
counts; pembrolizumab alone with responders) of ``--patients`` trial patients each, PFS at days
28 and 56 in both, on the closed-form tumor-kinetics surrogate: the QSP ODE costs minutes per
gradient on CPU, and SBC needs hundreds of NUTS runs. Outputs: ``sbc.json`` (ranks, p-values,
settings, divergences, timings, provenance) and ``sbc_ranks.png`` (rank histograms with the 99 %
band of a uniform histogram).

    python fits/sbc.py --replicates 500 --warmup 200 --samples 396 --thin 4 --bins 20 --out docs/results/sbc
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

import qspjax  # noqa: F401  (float64)
from qspjax.io import atomic_write_json, prepare_out_dir, provenance

REPO = Path(__file__).resolve().parents[1]


def small_problem(patients: int, virtual_patients: int = 16, seed: int = 3):
    """Two medians, two arms, kinetics surrogate: the ``synthetic`` problem of the tests, with
    ``patients`` trial patients per arm. The arms' counts only fix the data's structure (which
    endpoints, N, PFS days): every SBC replicate replaces them by data simulated at its own draw."""
    from qspjax.inference.config import LikelihoodSettings, Prior, PriorSet
    from qspjax.inference.likelihood import ArmData, Problem
    from qspjax.params import load_parameters
    from qspjax.regimen import load_regimen
    from qspjax.vpop import load_population

    priors = PriorSet((Prior("k_C1_growth", "k_C1_growth", "median", None, 1.0),
                       Prior("alpha_tumor", "alpha_tumor", "median", None, 1.0)))
    rt_ici = load_regimen(REPO / "configs/regimens/pembro_rt_sbrt.yaml")
    ici = load_regimen(REPO / "configs/regimens/pembrolizumab_200mg_q3w.yaml")
    settings = LikelihoodSettings(patients=virtual_patients, seed=seed, horizon_days=56.0, output_every_days=7.0,
                                  temperature=0.1, assessment_interval_days=14.0)
    n = patients
    arms = [ArmData("rt_ici", rt_ici, n, (0, n // 2, n // 4, n - n // 2 - n // 4), None, (28.0, 56.0), (n // 2, n // 4)),
            ArmData("ici", ici, n, None, n // 4, (28.0, 56.0), (n // 2, n // 4))]
    return Problem(arms, priors, load_parameters(), load_population(), settings, simulator="kinetics")


def main(args: argparse.Namespace) -> dict:
    from qspjax.inference.sbc import (
        rank_histogram_plot,
        result_json,
        run_sbc,
        uniformity,
    )

    out = prepare_out_dir(args.out, overwrite=True)
    problem = small_problem(args.patients, args.virtual_patients)
    result = run_sbc(problem, args.replicates, jax.random.PRNGKey(args.seed), warmup=args.warmup,
                     samples=args.samples, thin=args.thin, progress=not args.quiet)
    tests = uniformity(result.ranks, result.n_draws, bins=args.bins, alpha=args.alpha, seed=args.seed)
    summary = result_json(result, tests)
    summary["problem"] = {"parameters": list(problem.ids), "prior_means": problem.prior_means().tolist(),
                          "prior_sds": problem.prior_sds().tolist(), "simulator": problem.simulator_name,
                          "virtual_patients": args.virtual_patients, "trial_patients_per_arm": args.patients,
                          "arms": [{"arm_id": a.arm_id, "n": a.n,
                                    "endpoints": (["response_counts"] if a.response_counts is not None else ["orr"])
                                    + ([f"pfs@{d:g}d" for d in a.pfs_days])} for a in problem.arms]}
    summary["provenance"] = provenance(config=vars(args) | {"out": str(args.out)}, seed=args.seed)
    atomic_write_json(out / "sbc.json", summary)
    rank_histogram_plot(result.ranks, result.n_draws, problem.ids, out / "sbc_ranks.png", bins=tests["bins"])
    for pid, p in zip(problem.ids, tests["parameters"]):
        print(f"{pid:>12s}: chi-square p = {p['chi2_pvalue']:.3f}, KS p = {p['ks_pvalue']:.3f}, "
              f"{'uniform' if p['passed'] else 'NOT uniform'}")
    print(f"{'PASSED' if tests['passed'] else 'FAILED'} ({tests['test']}); divergences "
          f"{summary['divergences_total']} in {summary['replicates_with_divergences']} replicates; "
          f"{result.seconds:.0f} s")
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicates", type=int, default=500, help="prior draws, one data set and one NUTS chain each")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--samples", type=int, default=396, help="post-warmup draws per replicate (before thinning)")
    p.add_argument("--thin", type=int, default=4, help="keep every thin-th draw: L = samples // thin")
    p.add_argument("--patients", type=int, default=80, help="trial patients per arm in the simulated data")
    p.add_argument("--virtual-patients", type=int, default=16, help="virtual cohort size of the likelihood")
    p.add_argument("--bins", type=int, default=20, help="bins of the rank histogram (chi-square test)")
    p.add_argument("--alpha", type=float, default=0.01, help="family-wise level (Bonferroni over 2 tests x D)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/sbc")
    p.add_argument("--quiet", action="store_true")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
