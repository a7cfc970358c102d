"""How much of the twin's prior cannot be simulated: draws z ~ N(0, I) of the twin's deviations,
each grown to its baseline and treated under the history (``twin.solve_draws``); a draw whose
growth to baseline or treatment fails has log density -inf in the twin's NUTS, i.e. it lies
beyond a wall. Reports the unsolvable fraction and where the wall lies on the growth axis, and
the population's smooth plausibility screen the twin's prior now carries
(:func:`qspjax.vpop.log_soft_plausibility`): the fraction of draws it keeps, and the largest
screen weight of a draw the solver cannot grow (the density just before the wall).

    python benchmarks/twin_prior_wall.py --calibration default --n 64 --json benchmarks/results_twin_prior_wall_default.json
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", choices=("default", "advanced"), default="default",
                   help="default: the shipped calibration; advanced: the first-point calibration of the twin example")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--history", default="configs/twins/history_pembro_rt.yaml")
    p.add_argument("--json", default=None)
    return p


def main(args) -> dict:
    from qspjax.analysis import twin
    from qspjax.commands import _model_options as mo
    from qspjax.io import atomic_write_json, provenance
    from qspjax.params import load_parameters
    from qspjax.regimen import compile_schedule, load_regimen, timeline_points
    from qspjax.vpop import load_population

    if args.calibration == "default":
        params = load_parameters(mo.DEFAULT_PARAMS, (mo.CALIBRATED_PARAMS,))
        spec = load_population(mo.CALIBRATED_POPULATION)
    else:
        params = load_parameters(mo.DEFAULT_PARAMS, ("configs/params/calibrated/advanced_params.yaml",))
        spec = load_population("configs/params/calibrated/advanced_population.yaml")
    history = load_regimen(args.history)
    sim = twin.QSPTwinSimulator(params, spec, history.drugs)
    grid = np.array([0.0, 42.0, 84.0, 126.0, 168.0])
    sched = compile_schedule(history, sim.drugs, grid, 2, timeline_points(history, grid))
    z = np.random.default_rng(args.seed).standard_normal((args.n, sim.dim))
    t0 = time.perf_counter()
    _, ok, screen = twin.solve_draws(sim, z, sched, sim.tps_multipliers[sim.default_tps_class], chunk=8)
    ok = np.asarray(ok, bool)
    weight = np.where(ok, np.exp(np.where(ok, screen, -np.inf)), 0.0)
    g = sim.names.index("k_C1_growth")
    out = {
        "calibration": args.calibration, "n": args.n, "solvable": int(ok.sum()),
        "fraction_unsolvable": float(1.0 - ok.mean()),
        "growth_median_per_day": float(sim.median["k_C1_growth"]), "growth_log_sd": float(sim.sd["k_C1_growth"]),
        "largest_growth_z_unsolvable": float(z[~ok, g].max()) if (~ok).any() else None,
        "smallest_growth_z_solvable": float(z[ok, g].min()) if ok.any() else None,
        "pretreatment_max_days": float(sim.config.pretreatment_max_days),
        "screen_acceptance_mean": float(weight.mean()),
        "screen_weight_below_0.5": int(np.sum(weight < 0.5)),
        "largest_growth_z_screened_out": float(z[weight < 0.5, g].max()) if (weight < 0.5).any() else None,
        "screen_log_weight_min_solvable": float(np.min(screen[ok])) if ok.any() else None,
        "seconds_incl_compile": time.perf_counter() - t0,
        "run": provenance(vars(args), args.seed),
    }
    if args.json:
        atomic_write_json(args.json, out)
    print({k: v for k, v in out.items() if k != "run"})
    return out


if __name__ == "__main__":
    sys.exit(0 if main(build_parser().parse_args()) else 1)
