"""``qspjax optimize``: the best regimen of a declared RT + antibody schedule space, by gradients
through the solver, checked against the standard protocols on patients it never saw."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

from qspjax.commands.stop_time import add_model_arguments, check_model_arguments, config_of, model_files
from qspjax.errors import QSPValidationError

DEFAULT_EXPERIMENT = "configs/experiments/rt_nivolumab_protocols.yaml"


def register(sub) -> None:
    p = sub.add_parser(
        "optimize", help="optimise an RT + antibody regimen over a declared space (gradients through the solver)",
        description="Search the regimen space of a space file (configs/optimize/) for the best regimen of a virtual "
                    "cohort: Adam on the smooth objective with constraint penalties, integers rounded and every "
                    "constraint checked. Writes best_regimen.yaml (runnable by `qspjax trial --regimen`), "
                    "summary.json with the standard protocols evaluated on a held-out cohort, convergence.png "
                    "and run.json.")
    p.add_argument("space", help="regimen space YAML file (configs/optimize/rt_nivolumab_space.yaml)")
    p.add_argument("--holdout-patients", type=int, default=None,
                   help="patients of the held-out cohort the standard protocols and the answer are compared on "
                        "(default: --patients)")
    p.add_argument("--holdout-seed", type=int, default=None, help="seed of the held-out cohort (default --seed + 1)")
    p.add_argument("--experiment", default=None, help=f"standard protocols (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--steps", type=int, default=None, help="ascent iterations (default: the space file's optimizer.steps)")
    p.add_argument("--posterior", default=None, metavar="DIR",
                   help="a calibration's posterior (DIR/posterior.nc): the training and held-out cohorts are the "
                        "patients of --posterior-draws draws pooled (--patients split evenly), so the objective is "
                        "the posterior expectation (statistic mean) or a lower quantile over the posterior-predictive "
                        "patients (lower_quantile)")
    p.add_argument("--posterior-draws", type=int, default=4,
                   help="posterior draws pooled with --posterior (default 4, evenly spaced over chains)")
    add_model_arguments(p, default_rtol=1e-5)
    p.set_defaults(func=run)


def _check(args) -> None:
    check_model_arguments(args)
    if args.holdout_patients is not None and args.holdout_patients <= 0:
        raise QSPValidationError("command line", "--holdout-patients", args.holdout_patients, "must be a positive integer")
    if args.steps is not None and not (0 <= args.steps <= 500):
        raise QSPValidationError("command line", "--steps", args.steps, "must be an integer in [0, 500]")
    if args.posterior is not None:
        if not (1 <= args.posterior_draws <= args.patients):
            raise QSPValidationError("command line", "--posterior-draws", args.posterior_draws,
                                     f"an integer in [1, --patients = {args.patients}]")
        if args.holdout_patients is not None and args.holdout_patients < args.posterior_draws:
            raise QSPValidationError("command line", "--holdout-patients", args.holdout_patients,
                                     f"at least --posterior-draws = {args.posterior_draws}")
    if args.holdout_seed is not None and args.holdout_seed == args.seed:
        raise QSPValidationError("command line", "--holdout-seed", args.holdout_seed,
                                 "must differ from --seed (the held-out cohort must be other patients)")


def heldout_endpoints(space, result, outcome) -> dict[str, Any]:
    """Hard RECIST endpoints, the smooth objective and the median burden ratio of one cohort result."""
    import jax.numpy as jnp

    from qspjax import outcomes as oc
    from qspjax.analysis.optimize import per_patient_score, reduce_cohort

    ok = result.status == 0
    diam = 10.0 * np.moveaxis(result.observables["tumor_diameter_cm"], 2, 1)  # (P, L, T)
    score = per_patient_score(space, np.asarray(result.days), jnp.asarray(diam), jnp.asarray(ok))
    value = float(reduce_cohort(space, score, jnp.asarray(ok)))
    sod = diam.sum(axis=1)
    s = outcome.summary
    return {
        "objective": value,
        "orr": s["orr"], "orr_ci": list(s["orr_ci"]), "dcr": s["dcr"], "cr": s["cr"],
        "pfs_at_landmark": float(oc.survival_at(outcome.km, [space.objective.landmark_days])[0]),
        "landmark_days": space.objective.landmark_days,
        "median_pfs_days": s["median_pfs_days"],
        "median_burden_ratio_at_horizon": float(np.median(sod[ok, -1] / sod[ok, 0])) if ok.any() else None,
        "n_evaluated": s["n_evaluated"], "n_failed": s["n_failed"],
    }


def run(args: argparse.Namespace) -> int:
    _check(args)
    from qspjax.analysis.optimize import (CohortObjective, free_numeric, load_space, optimize, plot_convergence,
                                          regimen_document, values_of, write_regimen)
    from qspjax.io import atomic_write_json
    from qspjax.io import prepare_out_dir, provenance
    from qspjax.params import CONFIG_DIR, load_parameters
    from qspjax.regimen import load_regimen
    from qspjax.runner import build_population, concat_populations, treat_population
    from qspjax.solver.simulate import SolverConfig
    from qspjax.virtual_trial import Assessment, evaluate, load_experiment
    from qspjax.vpop import load_population

    space = load_space(args.space)  # refused here, before anything is computed
    experiment = load_experiment(args.experiment or CONFIG_DIR.parent / DEFAULT_EXPERIMENT)
    drugs = tuple(dict.fromkeys([space.drug] + [d for p in experiment.protocols for d in p.regimen.drugs]))
    choice = model_files(args)
    params = load_parameters(choice.main, choice.extra)
    spec = load_population(choice.population)
    from qspjax.commands.trial import _posterior_models

    draws = _posterior_models(args, params, spec)  # a bad posterior is refused before any compute
    out = prepare_out_dir(args.out, args.overwrite)
    holdout_seed = args.seed + 1 if args.holdout_seed is None else args.holdout_seed
    n_holdout = args.holdout_patients or args.patients
    prov = provenance(config=config_of(args) | {"calibration": choice.record(),
                                                "holdout_seed_used": holdout_seed}, seed=args.seed)
    config = SolverConfig(rtol=args.rtol, atol=args.rtol * 1e-3)
    t0 = time.perf_counter()
    # one growth chunk for both cohorts: one compilation of the pre-treatment growth
    grow_chunk = min(args.chunk, math.ceil(1.25 * min(args.patients, n_holdout)))

    def cohort(n, seed):
        """The cohort of the model, or the pooled cohorts of the posterior draws (n split evenly)."""
        if not draws:
            return build_population(params, n, seed, drugs, spec=spec, config=config, chunk=grow_chunk)
        sizes = [len(part) for part in np.array_split(np.arange(n), len(draws))]
        return concat_populations([build_population(p, k, seed, drugs, spec=s, config=config,
                                                    chunk=min(grow_chunk, math.ceil(1.25 * k)))
                                   for (p, s), k in zip(draws, sizes)])

    train = cohort(args.patients, args.seed)
    objective = CohortObjective(space, train, config)
    result = optimize(objective, steps=args.steps, progress=True)
    t_opt = time.perf_counter() - t0
    best = result.best
    doc = regimen_document(space, best.x, best.lesion_index)
    write_regimen(out / "best_regimen.yaml", doc)
    regimen = load_regimen(out / "best_regimen.yaml")  # what `qspjax trial --regimen` will read

    t1 = time.perf_counter()
    held = cohort(n_holdout, holdout_seed)
    assessment = Assessment(space.objective.assessment_interval_days, "all")
    regimens = [regimen] + [p.regimen for p in experiment.protocols]
    results = treat_population(held, regimens, days=space.horizon_days, output_every=space.output_every,
                               config=config, chunk=args.chunk)
    endpoints = [heldout_endpoints(space, r, evaluate(r, assessment, seed=holdout_seed)) for r in results]
    t_held = time.perf_counter() - t1

    free = free_numeric(space)
    values = {k: float(v) for k, v in values_of(space, np.asarray(best.x, dtype=float)).items()}
    standard = [{"id": p.protocol_id, "label": p.label, "regimen": p.regimen.name, "heldout": e}
                for p, e in zip(experiment.protocols, endpoints[1:])]
    top = max(standard, key=lambda s: s["heldout"]["objective"])
    diff = endpoints[0]["objective"] - top["heldout"]["objective"]
    constraints = {}
    for cname, limit in space.constraints:
        value = best.constraints[cname]
        kind = "min" if cname == "lymphocyte_nadir_fraction" else "max"
        constraints[cname] = {"value": value, kind: limit, "limit": limit,
                              "satisfied": bool(value >= limit if kind == "min" else value <= limit)}
    summary = {
        "space": str(args.space), "name": space.name,
        "objective": {"endpoint": space.objective.endpoint, "statistic": space.objective.statistic,
                      "quantile": space.objective.quantile if space.objective.statistic == "lower_quantile" else None,
                      "landmark_days": space.objective.landmark_days, "horizon_days": space.horizon_days,
                      "temperature": space.objective.temperature, "value_training": best.value,
                      "value_heldout": endpoints[0]["objective"], "maximised": True},
        "best": {"variables": {k: values[k] for k in values} | {"lesion": space.lesion.choices[best.lesion_index]},
                 "free_variables": [v.name for v in free] + (["lesion"] if space.lesion.free else []),
                 "regimen": doc, "training": {"objective": best.value, "constraints": best.constraints},
                 "heldout": endpoints[0]},
        "standard": standard,
        "comparison": {"best_standard": top["id"], "best_standard_objective": top["heldout"]["objective"],
                       "optimised_objective": endpoints[0]["objective"], "difference": diff,
                       "optimised_beats_best_standard": bool(diff > 0)},
        "constraints": constraints,
        "cohorts": {"training": {"patients": args.patients, "seed": args.seed, "screening": train.screening},
                    "heldout": {"patients": n_holdout, "seed": holdout_seed, "screening": held.screening},
                    "posterior": None if not draws else {"path": args.posterior, "draws": len(draws),
                                                         "note": "each cohort pools the patients of the draws"}},
        "history": result.history,
        "candidates": [{"variables": dict(zip([v.name for v in free], c.x.tolist())),
                        "lesion": space.lesion.choices[c.lesion_index], "objective": c.value,
                        "constraints": c.constraints, "feasible": c.feasible} for c in result.candidates],
        "evaluations": result.evaluations,
        "wall_time_s": {"optimisation": t_opt, "heldout": t_held, "total": time.perf_counter() - t0} | result.timing,
    }
    plot_convergence(out / "convergence.png", result)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "run.json", prov)
    print(comparison_table(summary), end="")
    print(f"outputs in {out} ({summary['wall_time_s']['total']:.0f} s)")
    return 0


def comparison_table(summary: dict[str, Any]) -> str:
    """Markdown: the optimised regimen beside the standard protocols on the held-out cohort."""
    def pct(x):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"

    ob = summary["objective"]
    rows = [("optimised (best_regimen.yaml)", summary["best"]["heldout"])] + \
           [(s["label"], s["heldout"]) for s in summary["standard"]]
    lines = [f"| regimen (held-out cohort) | objective ({ob['statistic']} {ob['endpoint']}) | ORR | "
             f"PFS at day {ob['landmark_days']:g} | median SOD ratio at day {ob['horizon_days']:g} |",
             "|---|---|---|---|---|"]
    for label, e in rows:
        ratio = e["median_burden_ratio_at_horizon"]
        lines.append(f"| {label} | {e['objective']:.4f} | {pct(e['orr'])} | {pct(e['pfs_at_landmark'])} | "
                     f"{'–' if ratio is None else f'{ratio:.3f}'} |")
    return "\n".join(lines) + "\n"
