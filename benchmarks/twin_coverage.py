"""Coverage of the patient digital twin on synthetic patients drawn from the model.

Each patient: deviations z from the twin's prior (standard normal, kept with the probability of
the population's smooth plausibility screen: :func:`qspjax.analysis.twin.prior_draws`), solved under the history regimen,
read at ``--fit-days`` (fitted) and ``--future-days`` (held back) with the stated measurement
error (:data:`qspjax.analysis.twin.MEASUREMENT_ERROR_SOURCE`). The twin is fitted to the fitted
reads only and its posterior-predictive 90 % intervals (measurement noise included) of the held-back
reads, its 90 % credible bands of the held-back true diameters, and the 90 % intervals of the
true deviations are checked for coverage. Every patient uses the same design, so the NUTS chain
and the forward solve compile once.

Writes strict JSON after every patient (``--json``), so a run stopped early leaves a valid partial
result. Shard a long run with ``--start``/``--count`` (same ``--seed``: patient i is the same draw)
and merge the files with ``--merge``.

    taskset -c 1 python benchmarks/twin_coverage.py --patients 20 --json benchmarks/results_twin_coverage.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=20)
    p.add_argument("--start", type=int, default=0, help="first patient index (sharding)")
    p.add_argument("--count", type=int, default=None, help="patients in this shard (default: all from --start)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--max-tree-depth", type=int, default=5)
    p.add_argument("--predictive-draws", type=int, default=40)
    p.add_argument("--start-candidates", type=int, default=32,
                   help="prior draws the chains' starting points are resampled from (by likelihood)")
    p.add_argument("--fit-days", type=float, nargs="+", default=[0.0, 42.0, 84.0])
    p.add_argument("--future-days", type=float, nargs="+", default=[126.0, 168.0])
    p.add_argument("--history", default="configs/regimens/pembrolizumab_200mg_q3w.yaml")
    p.add_argument("--report-every", type=int, default=0, help="print NUTS progress every this many iterations")
    p.add_argument("--batch", type=int, default=1,
                   help="patients fitted together in one vectorised NUTS run (twin.run_nuts_batch); 1: one by one")
    p.add_argument("--toy", action="store_true", help="the closed-form toy simulator (tests)")
    p.add_argument("--json", required=False, default=None)
    p.add_argument("--merge", nargs="+", default=None, help="merge shard JSON files into --json and exit")
    return p


def summarise(patients: list[dict]) -> dict:
    ok = [p for p in patients if p.get("status") == "fitted"]
    fut = [c for p in ok for c in p["future_read_in_90"]]
    lat = [c for p in ok for c in p["future_true_in_90"]]
    par = [c for p in ok for c in p["theta_in_90"].values()]
    conv = [p for p in ok if not p["refused"]]
    return {
        "patients_done": len(patients), "patients_fitted": len(ok),
        "patients_passing_diagnostics": len(conv),
        "coverage_future_reads_90": float(np.mean(fut)) if fut else None,
        "coverage_future_true_diameters_90": float(np.mean(lat)) if lat else None,
        "coverage_parameters_90": float(np.mean(par)) if par else None,
        "future_reads": len(fut), "parameter_checks": len(par),
        "coverage_future_reads_90_passing_diagnostics": float(np.mean([c for p in conv for c in p["future_read_in_90"]]))
        if conv else None,
        "coverage_parameters_90_passing_diagnostics": float(np.mean([c for p in conv for c in p["theta_in_90"].values()]))
        if conv else None,
        "target": "0.80-0.97",
    }


def score_patient(sim, chains, i, z, prng, full, true_d, fit_mask, grid, sched, pdl1, all_days, args) -> dict:
    """One fitted synthetic patient's coverage record: posterior-predictive 90 % intervals of the
    held-back reads (noise included), 90 % bands of the held-back true diameters, and the true
    deviations against their 90 % posterior intervals."""
    from qspjax.analysis import twin

    diag = twin.diagnostics(chains, sim)
    flat = chains.z.reshape(-1, sim.dim)
    take = np.unique(np.linspace(0, flat.shape[0] - 1, min(args.predictive_draws, flat.shape[0])).round().astype(int))
    d, okp, _ = twin.solve_draws(sim, flat[take], sched, pdl1, chunk=8)
    d = d[okp]
    fut_mask = ~fit_mask
    idx = np.searchsorted(grid, full.day[fut_mask])
    les = full.lesion[fut_mask]
    pred_true = d[:, idx, les]  # (draws, reads)
    noisy = np.maximum(pred_true + np.asarray(twin.measurement_sd(pred_true)) * prng.standard_normal(pred_true.shape), 0)
    noisy = np.where(noisy < twin.DETECTION_LIMIT_MM, 0.0, noisy)
    y = full.diameter_mm[fut_mask]
    lo, hi = np.quantile(noisy, [0.05, 0.95], axis=0)
    read_in = ((y >= lo - 1e-9) & (y <= hi + 1e-9)).tolist()
    truth = true_d[np.searchsorted(np.asarray(all_days), full.day[fut_mask]), les]
    tlo, thi = np.quantile(pred_true, [0.05, 0.95], axis=0)
    true_in = ((truth >= tlo) & (truth <= thi)).tolist()
    zq = np.quantile(flat, [0.05, 0.95], axis=0)
    theta_in = {n: bool(zq[0, j] <= z[j] <= zq[1, j]) for j, n in enumerate(sim.names)}
    refused = twin.diagnose(diag)
    return {"index": i, "z_true": np.asarray(z).tolist(), "status": "fitted", "rhat_max": diag["rhat_max"],
            "ess_bulk_min": diag["ess_bulk_min"], "divergences": diag["divergences"], "refused": bool(refused),
            "refusal_reasons": refused, "future_read_in_90": read_in, "future_true_in_90": true_in,
            "theta_in_90": theta_in, "future_reads_mm": y.tolist(), "future_true_mm": truth.tolist(),
            "future_read_interval_mm": [lo.tolist(), hi.tolist()],
            "z_posterior_q05": zq[0].tolist(), "z_posterior_q95": zq[1].tolist(),
            "mean_leapfrog_steps": diag["mean_leapfrog_steps"]}


def main(args) -> dict:
    from qspjax.io import atomic_write_json, provenance, strict_json_dumps

    if args.merge:
        patients = []
        for f in args.merge:
            patients += json.loads(Path(f).read_text())["patients"]
        patients.sort(key=lambda p: p["index"])
        first = json.loads(Path(args.merge[0]).read_text())
        res = {"design": first["design"], "patients": patients, "summary": summarise(patients),
               "merged_from": list(args.merge)}
        atomic_write_json(args.json, res)
        print(strict_json_dumps(res["summary"]))
        return res

    if args.batch > 1:
        # In a vmapped adaptive solve, members that have finished keep stepping on stale values; a
        # NaN there trips Equinox's runtime checks (lineax's "non-finite input") for the whole batch.
        # As NaN instead, the member's own result is masked out and a truly failed solve reads -inf.
        import os

        if "equinox" in sys.modules and os.environ.get("EQX_ON_ERROR", "raise") != "nan":
            raise RuntimeError("--batch needs EQX_ON_ERROR=nan set before Equinox is imported")
        os.environ["EQX_ON_ERROR"] = "nan"
    from qspjax.analysis import twin
    from qspjax.commands import _model_options as mo
    from qspjax.params import load_parameters
    from qspjax.regimen import compile_schedule, load_regimen, timeline_points
    from qspjax.vpop import load_population

    history = load_regimen(args.history)
    if args.toy:
        sim = twin.ToyTwinSimulator()
    else:
        params = load_parameters(mo.DEFAULT_PARAMS, (mo.CALIBRATED_PARAMS,))
        spec = load_population(mo.CALIBRATED_POPULATION)
        sim = twin.QSPTwinSimulator(params, spec, history.drugs)
    fit_days, fut_days = list(args.fit_days), list(args.future_days)
    all_days = fit_days + fut_days
    horizon = max(all_days)
    cfg = twin.TwinConfig(horizon_days=horizon + 1.0, chains=args.chains, warmup=args.warmup, samples=args.samples,
                          max_tree_depth=args.max_tree_depth, predictive_draws=args.predictive_draws)
    rng = np.random.default_rng(args.seed)
    pdl1 = sim.tps_multipliers[sim.default_tps_class]
    grid = np.unique(np.concatenate([[0.0], all_days]))
    sched = compile_schedule(history, sim.drugs, grid, 2, timeline_points(history, grid))
    t_prior = time.perf_counter()
    # The truths and the chains' candidate starting points: draws of the twin's own prior.
    z_all, _, truth_screening = twin.prior_draws(sim, args.patients, rng, sched, pdl1)
    z_start, d_start, _ = twin.prior_draws(sim, args.start_candidates, rng, sched, pdl1)
    print(f"prior draws: {truth_screening} ({time.perf_counter() - t_prior:.0f} s incl. compile)", flush=True)
    count = args.patients - args.start if args.count is None else args.count
    design = {"simulator": type(sim).__name__, "parameters": list(sim.names), "fit_days": fit_days,
              "future_days": fut_days, "lesions": list(twin.LESIONS), "history": args.history,
              "chains": args.chains, "warmup": args.warmup, "samples": args.samples,
              "max_tree_depth": args.max_tree_depth, "predictive_draws": args.predictive_draws,
              "measurement_error_model": twin.MEASUREMENT_ERROR_SOURCE, "seed": args.seed,
              "interval": "central 90 % (5th-95th percentiles)", "truth_screening": truth_screening,
              "start_candidates": args.start_candidates, "batch": args.batch,
              "autodiff": getattr(getattr(sim, "config", None), "autodiff", "reverse")}
    out = {"design": design, "provenance": provenance(vars(args), args.seed), "patients": [], "summary": {}}
    t_start = time.perf_counter()
    indices = list(range(args.start, args.start + count))
    for b in range(0, len(indices), max(args.batch, 1)):
        t0 = time.perf_counter()
        todo = []  # (index, rng, all reads, true diameters, fit mask, fit data, chain starts)
        for i in indices[b:b + max(args.batch, 1)]:
            prng = np.random.default_rng([args.seed, i])
            full, true_d, ok = twin.synthetic_patient(sim, z_all[i], history, all_days, (0, 1), prng, pdl1)
            if not ok:
                out["patients"].append({"index": i, "z_true": z_all[i].tolist(), "status": "truth failed to solve"})
                continue
            fit_mask = full.day <= max(fit_days) + 1e-9
            patient = twin.PatientData(f"synthetic-{i}", full.day[fit_mask], full.lesion[fit_mask],
                                       full.diameter_mm[fit_mask])
            data = twin.fit_data(patient, history, sim.drugs, pdl1)
            inits = twin.starting_points(z_start, d_start[:, np.searchsorted(grid, patient.day), patient.lesion],
                                         patient, args.chains, np.random.default_rng([args.seed, i, 1]))
            todo.append((i, prng, full, true_d, fit_mask, data, inits))
        if not todo:
            continue
        nuts = dict(chains=args.chains, warmup=args.warmup, samples=args.samples, max_tree_depth=args.max_tree_depth)
        if args.batch > 1:
            fits = twin.run_nuts_batch(sim, [t[5] for t in todo], [args.seed * 1000 + t[0] for t in todo],
                                       inits=[t[6] for t in todo], **nuts)
        else:
            fits = [twin.run_nuts(sim, t[5], seed=args.seed * 1000 + t[0], report_every=args.report_every,
                                  inits=t[6], **nuts) for t in todo]
        for (i, prng, full, true_d, fit_mask, _, _), chains in zip(todo, fits):
            rec = score_patient(sim, chains, i, z_all[i], prng, full, true_d, fit_mask, grid, sched, pdl1, all_days, args)
            rec["seconds"] = (time.perf_counter() - t0) / len(todo)
            out["patients"].append(rec)
            out["summary"] = summarise(out["patients"])
            out["summary"]["elapsed_s"] = time.perf_counter() - t_start
            if args.json:
                atomic_write_json(args.json, out)
            s = out["summary"]
            print(f"patient {i}: {rec['seconds']:.0f} s, R-hat {rec['rhat_max']:.3f}, ESS {rec['ess_bulk_min']:.0f}, "
                  f"div {rec['divergences']}; running coverage reads {s['coverage_future_reads_90']:.2f} "
                  f"true {s['coverage_future_true_diameters_90']:.2f} params {s['coverage_parameters_90']:.2f}", flush=True)
    out["summary"] = summarise(out["patients"])
    out["summary"]["elapsed_s"] = time.perf_counter() - t_start
    out["summary"]["complete"] = True
    if args.json:
        atomic_write_json(args.json, out)
    return out


if __name__ == "__main__":
    sys.exit(0 if main(build_parser().parse_args()) else 1)
