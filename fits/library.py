"""Bayesian inference through the ODE model: NUTS on an importance-reweighted library of simulated patients.

NUTS needs thousands of gradients of the log posterior; through the QSP ODE each one costs about a
minute here, so ``fits/infer.py`` cannot reach converged chains. But a trial arm's predicted
response and progression-free rates are *means over virtual patients*, and a virtual patient's
trajectory does not depend on the population it was drawn from. So the ODE is solved once per
(patient, arm): every arm gets L patients drawn from a broad proposal q(x) over the per-patient
parameters (the log values of the parameters whose population medians and between-patient
spreads are estimated), grown to the arm's baseline, screened for plausibility, treated with the
arm's regimen over its follow-up (capped), and scored by smooth RECIST. For population
hyperparameters theta (log medians and log between-patient sds, ``configs/inference/priors_library.yaml``),
the arm's predicted probabilities are the stored per-patient ones averaged with self-normalised
importance weights w_i ∝ p(x_i | theta) / q(x_i): a closed-form, differentiable function of theta,
so NUTS runs as many chains and draws as it needs. The printed counts enter through the terms of
``qspjax/inference/likelihood.py``, with the Monte-Carlo error of the reweighted cohort (its Kish
effective sample size) widening every term: where the library is thin the data say less.

Only between-patient quantities can be reweighted: a global parameter moves every stored
trajectory. ``qspjax/inference/library.py`` states the method in full.

    # 1. the library (resumable per arm; progress per chunk); another seed adds patients
    python fits/library.py --build --patients 64 --seed 0 --out fits/library_seed0
    python fits/library.py --build --patients 64 --seed 1 --out fits/library_seed1
    # 2. NUTS on both (merged): posterior.nc (ArviZ), summary.json, run.json
    python fits/library.py --library fits/library_seed0 fits/library_seed1 --out fits/posterior
    # 3. SBC of the route on the same library
    python fits/library.py --library fits/library_seed0 fits/library_seed1 --sbc 500 --warmup 150 \
        --samples 200 --thin 2 --max-tree-depth 6 --target-accept 0.8 --out docs/results/sbc_library

``--arms all`` builds every arm of ``configs/trials``; ``--simulator kinetics`` swaps the ODE for
the closed-form surrogate (tests, smoke runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qspjax  # noqa: E402,F401  (float64)
from qspjax.io import atomic_write_json, prepare_out_dir, provenance  # noqa: E402

DEFAULT_PRIORS = "configs/inference/priors_library.yaml"
DEFAULT_CONFIG = "configs/inference/fit_advanced.yaml"


def _setup(args):
    """Parameters, population, priors, trial arms and likelihood settings of the run."""
    from qspjax.commands._model_options import CALIBRATED_PARAMS, CALIBRATED_POPULATION, DEFAULT_PARAMS, DEFAULT_POPULATION
    from qspjax.data import load_trials
    from qspjax.inference.config import load_arm_selection, load_priors, load_run_config
    from qspjax.params import load_parameters
    from qspjax.vpop import load_population

    cfg = load_run_config(args.config)
    trials = load_trials(cfg.trials)
    known = tuple(a.arm_id for a in trials.arms)
    selection = load_arm_selection(cfg.arms, known)
    if args.arms == ["all"]:
        arm_ids = known
    elif args.arms:
        arm_ids = tuple(args.arms)
    else:
        arm_ids = selection.fit
    arms = [trials.get_arm(a) for a in arm_ids]
    if args.calibrated:
        params, spec = load_parameters(DEFAULT_PARAMS, (CALIBRATED_PARAMS,)), load_population(CALIBRATED_POPULATION)
        record = {"params": [str(DEFAULT_PARAMS), str(CALIBRATED_PARAMS)], "population": str(CALIBRATED_POPULATION)}
    else:
        params, spec = load_parameters(cfg.params), load_population(cfg.population)
        record = {"params": [str(cfg.params or DEFAULT_PARAMS)], "population": str(cfg.population or DEFAULT_POPULATION)}
    priors = load_priors(args.priors, spec.names)
    settings = cfg.likelihood
    if args.rtol is not None:
        import dataclasses

        settings = dataclasses.replace(settings, rtol=args.rtol)
    return params, spec, priors, arms, settings, selection.endpoints, record


def build(args) -> dict:
    from qspjax.inference.library import build_library

    params, spec, priors, arms, settings, endpoints, record = _setup(args)
    print(f"library: {len(arms)} arm(s) x {args.patients} patients, horizon cap {args.horizon_cap} d, "
          f"simulator {args.simulator}, seed {args.seed} -> {args.out}", flush=True)
    lib = build_library(args.out, arms, priors, params, spec, settings, args.patients, args.seed,
                        args.horizon_cap, args.simulator, args.chunk, endpoints=endpoints, record=record,
                        screen_factor=args.screen_factor, progress=not args.quiet)
    return lib.meta


def _model(args):
    from qspjax.inference.library import LibraryModel, load_library

    params, spec, priors, arms, settings, endpoints, record = _setup(args)
    lib = load_library(args.library if len(args.library) > 1 else args.library[0], [a.arm_id for a in arms])
    return LibraryModel(lib, arms, priors, params, spec, mc_error=args.mc_error), record


def infer(args) -> dict:
    import jax
    import numpy as np

    from qspjax.inference.library import run_nuts, write_posterior

    model, record = _model(args)
    out = prepare_out_dir(args.out, overwrite=True)
    t0 = time.perf_counter()
    mcmc = run_nuts(model, jax.random.PRNGKey(args.seed), args.chains, args.warmup, args.samples,
                    args.target_accept, args.max_tree_depth, progress=not args.quiet)
    wall = time.perf_counter() - t0
    prov = provenance(config=vars(args) | {"library_sidecar": model.library.meta.get("provenance"),
                                          "library_settings_key": model.library.meta.get("settings_key"),
                                          "model": record}, seed=args.seed)
    extra = {"nuts_wall_s": wall, "library": list(args.library), "library_settings_key": model.library.meta["settings_key"],
             "patients_per_arm": {a.arm_id: len(a) for a in model.library.arms},
             "mc_error": model.mc_error,
             "mc_error_fixed_ess": None if model.fixed_ess is None else dict(zip([a.arm_id for a in model.arms],
                                                                                 model.fixed_ess.tolist())),
             "route": "importance reweighting of a simulated library (fits/library.py)",
             "prior_predictive_min_weight_ess": float(np.min(model.ess(model.prior_means())))}
    summary = write_posterior(out, mcmc, model, prov, extra)
    print(f"R-hat max {summary['rhat_max']:.4f}, bulk ESS min {summary['ess_bulk_min']:.0f}, divergences "
          f"{summary['divergences']}, min weight ESS over arms at posterior draws "
          f"{summary['weight_ess']['min_over_arms']:.1f} (NUTS {wall:.0f} s)")
    for r in summary["predictive_orr"]:
        print(f"  {r['arm_id']:32s} ORR observed {r['observed_orr_pct']:5.1f} % "
              f"[{r['observed_ci'][0]:.1f}, {r['observed_ci'][1]:.1f}], predicted {r['predicted_orr_pct']:5.1f} % "
              f"[{r['predicted_interval'][0]:.1f}, {r['predicted_interval'][1]:.1f}]"
              f"{'' if r['predicted_inside_observed_ci'] else '  (outside the CI)'}")
    return summary


def sbc(args) -> dict:
    import jax

    from qspjax.inference.library import run_sbc
    from qspjax.inference.sbc import rank_histogram_plot, result_json, uniformity

    model, record = _model(args)
    out = prepare_out_dir(args.out, overwrite=True)
    result = run_sbc(model, args.sbc, jax.random.PRNGKey(args.seed), warmup=args.warmup, samples=args.samples,
                     thin=args.thin, target_accept=args.target_accept, max_tree_depth=args.max_tree_depth,
                     progress=not args.quiet)
    tests = uniformity(result.ranks, result.n_draws, bins=args.bins, alpha=0.01, seed=args.seed)
    summary = result_json(result, tests)
    summary["route"] = "importance reweighting of a simulated library (qspjax.inference.library)"
    summary["library"] = {"path": list(args.library), "settings_key": model.library.meta["settings_key"],
                          "simulator": model.library.meta.get("simulator"),
                          "patients_per_arm": {a.arm_id: len(a) for a in model.library.arms}}
    summary["provenance"] = provenance(config=vars(args) | {"model": record}, seed=args.seed)
    atomic_write_json(out / "sbc.json", summary)
    rank_histogram_plot(result.ranks, result.n_draws, model.ids, out / "sbc_ranks.png", bins=tests["bins"])
    for pid, p in zip(model.ids, tests["parameters"]):
        print(f"{pid:>16s}: chi-square p = {p['chi2_pvalue']:.3f}, KS p = {p['ks_pvalue']:.3f}, "
              f"{'uniform' if p['passed'] else 'NOT uniform'}")
    print(f"{'PASSED' if tests['passed'] else 'FAILED'} ({tests['test']}); divergences "
          f"{summary['divergences_total']} in {summary['replicates_with_divergences']} replicates; {result.seconds:.0f} s")
    return summary


def crossval(args) -> dict:
    """Leave-one-trial-out predictions of every library arm (qspjax.inference.crossval): ``OUT/crossval.json``."""
    import jax

    from qspjax.inference.crossval import cross_validate, tally
    from qspjax.inference.library import load_library

    params, spec, priors, arms, settings, endpoints, record = _setup(args)
    lib = load_library(args.library if len(args.library) > 1 else args.library[0], [a.arm_id for a in arms])
    out = prepare_out_dir(args.out, overwrite=True)
    t0 = time.perf_counter()
    rows = cross_validate(lib, arms, priors, params, spec, jax.random.PRNGKey(args.seed), chains=args.chains,
                          warmup=args.warmup, samples=args.samples, max_tree_depth=args.max_tree_depth,
                          progress=None if args.quiet else (lambda m: print(m, flush=True)))
    doc = {"route": "leave-one-trial-out on the importance-reweighted library (qspjax/inference/crossval.py)",
           "summary": tally(rows), "arms": rows, "wall_s": time.perf_counter() - t0,
           "provenance": provenance(config=vars(args) | {"model": record}, seed=args.seed)}
    atomic_write_json(out / "crossval.json", doc)
    for r in rows:
        print(f"  {r['id']:32s} held out with {r['held_out_trial']}: observed {r['observed_orr_pct']:5.1f} % "
              f"[{r['observed_orr_ci_pct'][0]:.1f}, {r['observed_orr_ci_pct'][1]:.1f}], predicted "
              f"{r['predicted_orr_pct']:5.1f} %{'' if r['inside_ci'] else '  (outside the CI)'}")
    s = doc["summary"]
    print(f"cross-validated: {s['inside_ci']} of {s['arms']} arms inside their CI ({doc['wall_s']:.0f} s)")
    return doc


def main(args: argparse.Namespace) -> dict:
    if args.build:
        return build(args)
    if args.library is None:
        from qspjax.errors import QSPValidationError

        raise QSPValidationError("command line", "--library", None, "a library folder (or --build to make one)")
    if args.crossval:
        return crossval(args)
    return sbc(args) if args.sbc else infer(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", action="store_true", help="simulate the library into --out")
    p.add_argument("--library", nargs="+", default=None,
                   help="library folder(s) (library.json + arms/*.npz) to infer from; several (other seeds) are merged")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="run file: arms, likelihood settings (rtol, scans)")
    p.add_argument("--priors", default=DEFAULT_PRIORS)
    p.add_argument("--arms", nargs="*", default=None, help="arm ids (default: the run file's fitted arms; 'all': every arm)")
    p.add_argument("--calibrated", action="store_true",
                   help="build on the shipped calibration instead of the run file's parameters (priors centre on it)")
    p.add_argument("--patients", type=int, default=64, help="library patients per arm (plausible ones)")
    p.add_argument("--horizon-cap", type=float, default=400.0, help="simulated days: the arm's follow-up, at most this")
    p.add_argument("--screen-factor", type=int, default=4, help="candidates drawn per patient kept, at most")
    p.add_argument("--chunk", type=int, default=8, help="patients per compiled batch")
    p.add_argument("--rtol", type=float, default=None, help="solver rtol (default: the run file's, 1e-4)")
    p.add_argument("--simulator", choices=("qsp", "kinetics"), default="qsp")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--samples", type=int, default=1000, help="post-warmup draws per chain")
    p.add_argument("--target-accept", type=float, default=0.9)
    p.add_argument("--max-tree-depth", type=int, default=8)
    p.add_argument("--mc-error", choices=("fixed", "ess", "none"), default="fixed",
                   help="Monte-Carlo term 1/n + 1/M: M = each arm's median Kish ESS over prior draws (fixed), "
                        "the ESS at theta (ess), or no term (none)")
    p.add_argument("--sbc", type=int, default=0, help="SBC replicates (instead of inference)")
    p.add_argument("--crossval", action="store_true",
                   help="leave-one-trial-out cross-validation of the library's arms (instead of inference)")
    p.add_argument("--thin", type=int, default=2, help="SBC: keep every thin-th draw")
    p.add_argument("--bins", type=int, default=10, help="SBC: rank histogram bins")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/library")
    p.add_argument("--quiet", action="store_true")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
