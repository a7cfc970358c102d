"""The twin's NUTS gradient: forward mode against reverse mode through the QSP model, one process.

One value-and-gradient of the twin's log density (``qspjax.analysis.twin._log_density``: growth to
baseline, the history regimen to the last read, the reads' likelihood, prior and screen) for the
shipped example patient (``configs/twins/example_patient.csv``) at its fit tolerance, three ways:
the value alone, reverse mode (``jax.value_and_grad`` through diffrax's checkpointed adjoint) and
forward mode (``SolverConfig(autodiff="forward")``: ``jax.jvp`` along every unit vector at once,
:func:`qspjax.analysis.twin.forward_mode_gradient`). The gradients must agree; the figures are the
median over ``--repeats`` evaluations at nearby points after the first (compiling) call.
``--batch B ...`` adds the forward-mode gradient vectorised over B points at once (``jax.vmap``, as
:func:`qspjax.analysis.twin.run_nuts_batch` runs many patients' chains): its time per point against
one point alone.

    taskset -c 1 python benchmarks/twin_gradient.py --json benchmarks/results_twin_gradient.json
    taskset -c 1 python benchmarks/twin_gradient.py --modes forward --batch 8 40 \
        --json benchmarks/results_twin_gradient_batched.json
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from _common import machine, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patient", default="configs/twins/example_patient.csv")
    p.add_argument("--history", default="configs/twins/history_pembro_rt.yaml")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--modes", nargs="+", choices=("value", "reverse", "forward"), default=["value", "reverse", "forward"])
    p.add_argument("--batch", type=int, nargs="*", default=[],
                   help="also time the forward-mode gradient vectorised over this many points (per point)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p


def main(args) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from qspjax.analysis import twin
    from qspjax.commands import _model_options as mo
    from qspjax.io import provenance
    from qspjax.params import load_parameters
    from qspjax.regimen import load_regimen
    from qspjax.vpop import load_population

    history = load_regimen(args.history)
    params = load_parameters(mo.DEFAULT_PARAMS, (mo.CALIBRATED_PARAMS,))
    spec = load_population(mo.CALIBRATED_POPULATION)
    patient = twin.load_patient(args.patient)
    forward = twin.QSPTwinSimulator(params, spec, history.drugs)
    reverse = twin.QSPTwinSimulator(params, spec, history.drugs, dataclasses.replace(forward.config, autodiff="reverse"))
    pdl1 = forward.tps_multipliers[forward.default_tps_class]
    data = twin.fit_data(patient, history, forward.drugs, pdl1).tree()
    density = lambda sim: (lambda z: twin._log_density(sim, z, data))
    fns = {
        "value": jax.jit(density(forward)),
        "reverse": jax.jit(jax.value_and_grad(density(reverse))),
        "forward": jax.jit(jax.value_and_grad(twin.forward_mode_gradient(density(forward)))),
    }
    fns = {k: v for k, v in fns.items() if k in args.modes}
    rng = np.random.default_rng(args.seed)
    z0 = 0.1 * rng.standard_normal(forward.dim)
    points = [z0 + 0.1 * rng.standard_normal(forward.dim) for _ in range(args.repeats)]
    out = {"patient": args.patient, "history": args.history, "parameters": list(forward.names),
           "rtol": forward.config.rtol, "modes": {}}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        first = jax.block_until_ready(fn(jnp.asarray(z0)))
        t_first = time.perf_counter() - t0
        times = []
        for z in points:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(jnp.asarray(z)))
            times.append(time.perf_counter() - t0)
        value, grad = (first, None) if name == "value" else first
        out["modes"][name] = {"first_call_s": t_first, "median_s": float(np.median(times)),
                              "value": float(value), "gradient": None if grad is None else np.asarray(grad).tolist()}
        print(f"{name}: first call {t_first:.1f} s, then {np.median(times):.3f} s", flush=True)
    if args.batch:
        one = jax.value_and_grad(twin.forward_mode_gradient(density(forward)))
        batched = jax.jit(jax.vmap(one))
        one_jit = fns.get("forward") or jax.jit(one)  # compiled above when the forward mode was timed
        out["batched_forward"] = {}
        for b in args.batch:
            zs = np.stack([z0 + 0.1 * rng.standard_normal(forward.dim) for _ in range(b)])
            t0 = time.perf_counter()
            _, grads = jax.block_until_ready(batched(jnp.asarray(zs)))
            t_first = time.perf_counter() - t0
            times = []
            for r in range(max(args.repeats // 4, 2)):
                t0 = time.perf_counter()
                jax.block_until_ready(batched(jnp.asarray(zs + 0.01 * (r + 1))))
                times.append(time.perf_counter() - t0)
            # the batch's first row against the same point alone (the lanes must not mix)
            _, g1 = jax.block_until_ready(one_jit(jnp.asarray(zs[0])))
            rec = {"first_call_s": t_first, "median_s": float(np.median(times)),
                   "per_point_s": float(np.median(times)) / b,
                   "row0_max_relative_difference": float(np.max(np.abs(np.asarray(grads[0]) - np.asarray(g1))
                                                                / np.maximum(np.abs(np.asarray(g1)), 1e-300)))}
            if "forward" in out["modes"]:
                rec["speedup_per_point_vs_one"] = out["modes"]["forward"]["median_s"] / rec["per_point_s"]
            out["batched_forward"][str(b)] = rec
            print(f"forward x{b} (vmap): first call {t_first:.1f} s, then {rec['median_s']:.3f} s = "
                  f"{rec['per_point_s']:.3f} s per point", flush=True)
    modes = out["modes"]
    if "reverse" in modes and "forward" in modes:
        g_r, g_f = (np.asarray(modes[m]["gradient"]) for m in ("reverse", "forward"))
        out["gradient_max_relative_difference"] = float(np.max(np.abs(g_f - g_r) / np.maximum(np.abs(g_r), 1e-300)))
        out["reverse_over_forward"] = modes["reverse"]["median_s"] / modes["forward"]["median_s"]
        print(f"reverse / forward {out['reverse_over_forward']:.2f}x, gradients agree to "
              f"{out['gradient_max_relative_difference']:.1e}")
    if "value" in modes and "forward" in modes:
        out["forward_over_value"] = modes["forward"]["median_s"] / modes["value"]["median_s"]
    out["machine"] = machine()
    out["run"] = provenance(vars(args), args.seed)
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    sys.exit(0 if main(build_parser().parse_args()) else 1)
