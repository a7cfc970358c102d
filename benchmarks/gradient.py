"""Cost of a calibration gradient relative to the forward solve.

A calibration fits the virtual population's parameters (``qspjax.vpop.PopulationParams``: the
median ``loc`` and spread ``log_sd`` of every varied parameter; 16 numbers for the default
population) to trial outcomes. This script times, for a cohort of ``--n`` patients on the
benchmark regimen (nivolumab 240 mg Q2W plus SBRT 5 x 8 Gy, two lesions), the forward objective

    J(pop) = mean over patients of log(sum of lesion diameters at day ``--days``, cm)

and ``jax.value_and_grad(J)`` (reverse mode through diffrax: recursive checkpointing), both
jitted, compilation timed apart. The patients' standard-normal draws are fixed (common random
numbers) and their baseline states are grown once at the nominal population and held fixed, so J
is a smooth function of ``pop`` through the treatment phase.

    python benchmarks/gradient.py --n 8 --days 400 --json gradient.json
"""

from __future__ import annotations

import argparse

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C

import numpy as np


def main(args):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from qspjax.model.cancer import diameter_from_volume
    from qspjax.regimen import compile_schedule
    from qspjax.solver.simulate import SolverConfig, simulate_batch
    from qspjax.vpop import baseline, build_models, draw, load_population, patient_values, population_params

    config = SolverConfig(rtol=args.rtol, atol=args.atol, checkpoint_segments=not args.no_checkpoint)
    params, cohort = C.cohort(args.n, args.seed, config)
    spec = load_population()
    pop = population_params(spec, params)
    draws = draw(spec, args.n, args.seed)
    multiplier = baseline(spec, draws)["pdl1_multiplier"]
    schedule = compile_schedule(C.benchmark_regimen(args.days), ("nivolumab",), np.array([0.0, args.days]),
                                n_lesions=2)
    y0 = cohort.y0

    def objective(pop):
        models = build_models(params, patient_values(spec, pop, draws), args.n, ("nivolumab",), 2, multiplier)
        traj = simulate_batch(models, y0, schedule, config)
        final = jax.tree_util.tree_map(lambda x: x[:, -1], traj.ys)
        diam = jax.vmap(lambda m, y: diameter_from_volume(m.lesion_volume(y)))(models, final)
        return jnp.mean(jnp.log(jnp.sum(diam, axis=-1)))

    forward = eqx.filter_jit(objective)
    gradient = eqx.filter_jit(jax.value_and_grad(objective))
    n_params = len(jax.tree_util.tree_leaves(pop))
    out = {"machine": C.machine(), "n": args.n, "days": args.days, "rtol": args.rtol, "atol": args.atol,
           "n_population_params": n_params, "checkpoint_segments": config.checkpoint_segments}
    from qspjax.io import provenance

    out["run"] = provenance(vars(args), args.seed)
    for name, fn in (("forward", forward), ("gradient", gradient)):
        value, record = C.time_compiled(fn, pop, repeats=args.repeats)
        out[name] = {k: record[k] for k in ("seconds", "compile_seconds")}
    value, grad = value
    flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grad)])
    out["objective"] = float(value)
    out["gradient_finite"] = bool(np.all(np.isfinite(flat)))
    out["gradient_norm"] = float(np.linalg.norm(flat))
    out["ratio_gradient_to_forward"] = out["gradient"]["seconds"] / out["forward"]["seconds"]
    print(f"cohort {args.n}, {args.days:g} days, {n_params} population parameters; J = {value:.6g}, "
          f"|grad J| = {out['gradient_norm']:.3g} (finite: {out['gradient_finite']})")
    C.print_table([("forward J", f"{out['forward']['seconds']:.2f}", f"{out['forward']['compile_seconds']:.1f}", "1"),
                   ("value_and_grad J", f"{out['gradient']['seconds']:.2f}",
                    f"{out['gradient']['compile_seconds']:.1f}", f"{out['ratio_gradient_to_forward']:.2f}")],
                  ("computation", "seconds", "compile s", "x forward"))
    if args.json:
        C.write_json(args.json, out)
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="cohort size (default 8)")
    p.add_argument("--days", type=float, default=400.0, help="treatment horizon in days (default 400)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after the compiling call (default 2)")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-checkpoint", action="store_true",
                   help="store every event segment's residuals instead of rematerialising them (SolverConfig.checkpoint_segments)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
