"""NUTS effective samples per second on the calibration problem.

The problem is the one `qspjax infer` samples: the run file's arms, priors and fixed virtual cohort
(`configs/inference/fit_advanced.yaml` by default), with its likelihood over response counts and
PFS landmarks. ``--simulator qsp`` runs the QSP ODE under every likelihood evaluation;
``--simulator kinetics`` the closed-form tumor-kinetics surrogate of the tests (same schedules,
draws, smooth RECIST and likelihood). ``--max-arms``, ``--patients`` and ``--horizon`` shrink the
problem so that the ODE version fits a CPU budget; the table says which problem was run.

Timed apart: building the problem (cohort draws, schedules), the first log-posterior gradient
(compilation), and the sampling (warmup + draws, all chains). Reported per parameter: bulk and
tail ESS (ArviZ), R-hat, and ESS per second of sampling (warmup included); plus divergences and
the number of leapfrog steps (gradient evaluations) of the kept draws.

    python benchmarks/inference.py --simulator kinetics --chains 4 --warmup 300 --samples 300 --json inference.json
"""

from __future__ import annotations

import argparse

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C

import numpy as np


def main(args):
    import jax
    import jax.numpy as jnp

    from qspjax.inference.bayes import run_nuts, summarise
    from qspjax.inference.runs import load, problems, with_overrides

    cfg = with_overrides(load(args.config), likelihood={"patients": args.patients, "horizon_days": args.horizon})
    with C.Timer() as build:
        problem, _ = problems(cfg, args.simulator, args.max_arms)
    theta0 = jnp.asarray(problem.prior_means())
    with C.Timer() as compile_:
        C.block(problem.value_and_grad(theta0))
    with C.Timer() as one:
        C.block(problem.value_and_grad(theta0))
    with C.Timer() as sample:
        mcmc = run_nuts(problem, jax.random.PRNGKey(args.seed), chains=args.chains, warmup=args.warmup,
                        samples=args.samples, max_tree_depth=args.max_tree_depth, progress=not args.quiet)
    s = summarise(mcmc, problem)
    steps = int(np.sum(np.asarray(mcmc.get_extra_fields()["num_steps"])))  # leapfrog steps of the draws
    per_param = {pid: {"ess_bulk": v["ess_bulk"], "ess_tail": v["ess_tail"], "r_hat": v["r_hat"],
                       "ess_bulk_per_second": v["ess_bulk"] / sample.seconds}
                 for pid, v in s["parameters"].items()}
    out = {"machine": C.machine(), "config": str(args.config), "simulator": args.simulator,
           "arms": [a.arm_id for a in problem.arms], "n_parameters": len(problem.ids),
           "virtual_patients": cfg.likelihood.patients, "horizon_days": cfg.likelihood.horizon_days,
           "chains": args.chains, "warmup": args.warmup, "samples": args.samples,
           "chain_method": mcmc.chain_method, "build_seconds": build.seconds,
           "gradient_compile_seconds": max(compile_.seconds - one.seconds, 0.0),
           "gradient_seconds": one.seconds, "sampling_seconds": sample.seconds,
           "divergences": s["divergences"], "max_r_hat": s["max_r_hat"], "min_ess_bulk": s["min_ess_bulk"],
           "min_ess_bulk_per_second": s["min_ess_bulk"] / sample.seconds, "parameters": per_param,
           "leapfrog_steps_of_draws": steps}
    print(f"{args.simulator} simulator, {len(problem.arms)} arms, {len(problem.ids)} parameters, "
          f"{cfg.likelihood.patients} virtual patients, {cfg.likelihood.horizon_days:g} days; "
          f"{args.chains} chains ({mcmc.chain_method}) x ({args.warmup} warmup + {args.samples} draws); "
          f"gradient {one.seconds * 1e3:.1f} ms after {out['gradient_compile_seconds']:.1f} s compile; "
          f"sampling {sample.seconds:.1f} s; divergences {s['divergences']}; max R-hat {s['max_r_hat']:.3f}")
    rows = [(pid, f"{v['ess_bulk']:.0f}", f"{v['ess_tail']:.0f}", f"{v['r_hat']:.3f}", f"{v['ess_bulk_per_second']:.3g}")
            for pid, v in per_param.items()]
    C.print_table(rows, ("parameter", "ESS bulk", "ESS tail", "R-hat", "ESS bulk / s"))
    if args.json:
        C.write_json(args.json, out)
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(C.REPO / "configs/inference/fit_advanced.yaml"),
                   help="run file (default configs/inference/fit_advanced.yaml)")
    p.add_argument("--simulator", choices=("qsp", "kinetics"), default="kinetics",
                   help="the QSP ODE or the closed-form kinetics surrogate (default kinetics)")
    p.add_argument("--max-arms", type=int, default=None, help="fit only the first N arms of the selection")
    p.add_argument("--patients", type=int, default=None, help="virtual patients per arm (default: the run file's)")
    p.add_argument("--horizon", type=float, default=None, help="simulated days (default: the run file's)")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--max-tree-depth", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
