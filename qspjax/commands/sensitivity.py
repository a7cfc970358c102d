"""``qspjax sensitivity``: global (Sobol, Morris) and local (autodiff) sensitivity of clinical endpoints."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from qspjax.errors import QSPValidationError


def register(sub) -> None:
    p = sub.add_parser("sensitivity", help="sensitivity of trial endpoints to model parameters",
                       description="Sobol indices and Morris effects (SALib) of the trial endpoints of a fixed virtual "
                                   "cohort under each regimen of an analysis file, and local sensitivities "
                                   "d log(endpoint) / d log(parameter) by reverse-mode autodiff; writes "
                                   "indices.csv, local.csv, run.json and PNGs (configs/sensitivity/README.md).")
    p.add_argument("analysis", help="analysis YAML file (configs/sensitivity/README.md)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=None,
                   help="Sobol base sample size N (default: the file's global.n); the model runs 2N(d+2) times")
    p.add_argument("--seed", type=int, default=None, help="seed of the global samples and bootstrap (default: the file's)")
    p.add_argument("--no-local", action="store_true", help="skip the local (autodiff) analysis")
    p.add_argument("--no-global", action="store_true",
                   help="skip the global (Sobol, Morris) analysis: local sensitivities only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_sensitivity)


def run_sensitivity(args: argparse.Namespace) -> int:
    if args.n is not None and args.n < 2:
        raise QSPValidationError("command line", "--n", args.n, "a positive integer >= 2 (Sobol base sample size) is required")
    if args.seed is not None and args.seed < 0:
        raise QSPValidationError("command line", "--seed", args.seed, "a non-negative integer is required")
    if args.no_local and args.no_global:
        raise QSPValidationError("command line", "--no-global", True,
                                 "at most one of --no-local and --no-global (together they leave nothing to run)")
    from qspjax.analysis import sensitivity as sa
    from qspjax.io import atomic_write_json, atomic_write_text, prepare_out_dir, provenance

    analysis = sa.load_analysis(args.analysis, n=args.n, seed=args.seed)  # everything checked before compute
    if args.no_global and analysis.local is None:
        raise QSPValidationError(args.analysis, "local", None,
                                 "a 'local' section is required with --no-global (nothing else would run)")
    methods = () if args.no_global else analysis.methods
    out = prepare_out_dir(args.out, args.overwrite)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config["analysis_file"] = analysis.raw
    prov = provenance(config=config, seed=analysis.seed)  # the revision that runs, read before the run
    progress = not args.quiet
    model = sa.EndpointModel(analysis)
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    rows: list[dict] = []
    summary: dict = {"outputs": model.output_ids, "parameters": [f.id for f in analysis.factors]}
    sobol = None
    if "sobol" in methods:
        t = time.perf_counter()
        sobol = sa.sobol_indices(model.sampled(progress, "Sobol samples"), analysis.problem(), analysis.n,
                                 analysis.seed, num_resamples=analysis.num_resamples,
                                 conf_level=analysis.conf_level, output_names=model.output_ids)
        timing["sobol_s"] = time.perf_counter() - t
        rows += sobol.rows()
        summary["sobol"] = {"N": sobol.n, "evaluations": sobol.n_evaluations,
                            "max_change_N_2N": dict(zip(sobol.outputs, sobol.max_change.tolist())),
                            "constant_outputs": [o for o, c in zip(sobol.outputs, sobol.constant) if c]}
    if "morris" in methods:
        t = time.perf_counter()
        morris = sa.morris_effects(model.sampled(progress, "Morris trajectories"), analysis.morris_problem(),
                                   analysis.morris_trajectories, analysis.morris_levels, analysis.seed,
                                   num_resamples=analysis.num_resamples, conf_level=analysis.conf_level,
                                   output_names=model.output_ids)
        timing["morris_s"] = time.perf_counter() - t
        rows += morris.rows()
        summary["morris"] = {"trajectories": morris.trajectories, "levels": morris.levels,
                             "evaluations": morris.n_evaluations}
    if rows:
        atomic_write_text(out / "indices.csv", sa.csv_text(rows, sa.INDEX_COLUMNS))
    if sobol is not None:
        for o in model.output_ids:
            sa.sobol_plot(out / f"sobol_{_safe(o)}.png", sobol, o)
    summary["model_evaluations"] = model.n_evaluations
    summary["timing"] = timing
    prov["results"] = _strict(summary)
    atomic_write_json(out / "run.json", prov)  # the global part, kept if the local part fails
    local = None
    if analysis.local is not None and not args.no_local:
        t = time.perf_counter()
        if progress:
            print(f"local sensitivities: reverse mode over {len(model.local_names())} parameters "
                  f"(compiling the gradient takes a while)", flush=True)
        local = model.local()
        timing["local_s"] = time.perf_counter() - t
        atomic_write_text(out / "local.csv", sa.csv_text(local.rows(), sa.LOCAL_COLUMNS))
        summary["local"] = {"values": dict(zip(local.outputs, local.values.tolist())),
                            "top": {o: local.ranked(o)[:5] for o in local.outputs}}
        for o in model.output_ids:
            sa.tornado_plot(out / f"tornado_{_safe(o)}.png", local, o)
    timing["total_s"] = time.perf_counter() - t0
    summary["model_evaluations"] = model.n_evaluations
    summary["min_solved_fraction"] = getattr(model, "min_ok_fraction", None)
    summary["timing"] = timing
    prov["results"] = _strict(summary)
    atomic_write_json(out / "run.json", prov)
    if sobol is not None:
        for k, o in enumerate(sobol.outputs):
            order = sorted(range(len(sobol.names)), key=lambda j: -sobol.ST[k, j])[:3]
            top = ", ".join(f"{sobol.names[j]} ST {sobol.ST[k, j]:.2f}" for j in order)
            print(f"{o}: {top}")
    print(f"{model.n_evaluations} model evaluations in {timing['total_s']:.0f} s; outputs in {out}")
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _strict(obj):
    """``obj`` with non-finite floats as None (run.json is strict JSON)."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
