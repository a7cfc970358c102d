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
    elif args.arms == ["outcomes"]:
        arm_ids = _arms_with_outcomes(trials, selection.endpoints, args.horizon_cap)
    elif args.arms:
        arm_ids = tuple(args.arms)
    else:
        arm_ids = selection.fit
    arms = [trials.get_arm(a) for a in arm_ids]
    if args.calibrated:
        params, spec = load_parameters(DEFAULT_PARAMS, (CALIBRATED_PARAMS,)), load_population(CALIBRATED_POPULATION)
        record = {"params": [str(DEFAULT_PARAMS), str(CALIBRATED_PARAMS)], "population": str(CALIBRATED_POPULATION)}
    else:
        population = args.population or cfg.population
        params, spec = load_parameters(cfg.params, tuple(args.params_extra)), load_population(population)
        record = {"params": [str(cfg.params or DEFAULT_PARAMS)] + [str(x) for x in args.params_extra],
                  "population": str(population or DEFAULT_POPULATION)}
    priors = load_priors(args.priors, spec.names)
    settings = cfg.likelihood
    if args.rtol is not None:
        import dataclasses

        settings = dataclasses.replace(settings, rtol=args.rtol)
    return params, spec, priors, arms, settings, selection.endpoints, record


def _arms_with_outcomes(trials, endpoints, horizon_cap) -> tuple[str, ...]:
    """Every arm with a response count, responders of N, a PFS point inside its simulated days, or
    pCR and MPR rates (read at surgery)."""
    from qspjax.inference.library import arm_horizon, reports_pathology
    from qspjax.inference.likelihood import arm_data_from_trial

    out = []
    for arm in trials.arms:
        d = arm_data_from_trial(arm, arm_horizon(arm, horizon_cap), endpoints)
        if d.response_counts is not None or d.responders is not None or len(d.pfs_days) or reports_pathology(arm):
            out.append(arm.arm_id)
    return tuple(out)


def _proposal(args, arms, priors, params, spec, settings, endpoints):
    """None (the prior-based default) or, with ``--proposal-from``, one centred on that posterior, or
    the very proposal of that library (a folder with ``library.json``: to add arms to it or rebuild some)."""
    if not args.proposal_from:
        return None
    if (Path(args.proposal_from) / "library.json").is_file():
        from qspjax.inference.library import load_library

        return load_library(args.proposal_from, []).proposal()
    from qspjax.inference.library import arm_horizon, arm_template, default_proposal, posterior_proposal
    from qspjax.inference.predictive import load_posterior

    first = arm_template(arms[0], priors, params, spec, settings, arm_horizon(arms[0], args.horizon_cap), endpoints)
    return posterior_proposal(load_posterior(args.proposal_from).draws, default_proposal(first), args.proposal_inflate)


def build(args) -> dict:
    from qspjax.inference.library import build_library

    params, spec, priors, arms, settings, endpoints, record = _setup(args)
    proposal = _proposal(args, arms, priors, params, spec, settings, endpoints)
    if args.proposal_from:
        reused = (Path(args.proposal_from) / "library.json").is_file()  # a library's own proposal, as is
        record = record | {"proposal_from": str(args.proposal_from),
                           "proposal_inflate": None if reused else args.proposal_inflate}
    print(f"library: {len(arms)} arm(s) x {args.patients} patients, horizon cap {args.horizon_cap} d, "
          f"simulator {args.simulator}, seed {args.seed} -> {args.out}", flush=True)
    lib = build_library(args.out, arms, priors, params, spec, settings, args.patients, args.seed,
                        args.horizon_cap, args.simulator, args.chunk, endpoints=endpoints, record=record,
                        screen_factor=args.screen_factor, progress=not args.quiet, proposal=proposal)
    return lib.meta


def _model(args):
    from qspjax.inference.library import LibraryModel, load_library

    params, spec, priors, arms, settings, endpoints, record = _setup(args)
    lib = load_library(args.library if len(args.library) > 1 else args.library[0], [a.arm_id for a in arms])
    fixed = _fixed_ess(args, lib, arms, priors, params, spec)
    return LibraryModel(lib, arms, priors, params, spec, mc_error=args.mc_error, fixed_ess=fixed,
                        min_ess=args.min_ess), record


def _fixed_ess(args, lib, arms, priors, params, spec):
    """With ``--mc-ess-from DIR``: each arm's median Kish ESS at that posterior's draws (None otherwise)."""
    if not args.mc_ess_from:
        return None
    import numpy as np

    from qspjax.errors import QSPValidationError
    from qspjax.inference.library import LibraryModel
    from qspjax.inference.predictive import load_posterior

    post = load_posterior(args.mc_ess_from)
    missing = [pid for pid in priors.ids if pid not in post.draws]
    if missing:
        raise QSPValidationError(post.path, f"posterior.{missing[0]}", None,
                                 f"--mc-ess-from needs a posterior over the run's quantities {list(priors.ids)}")
    pilot = LibraryModel(lib, arms, priors, params, spec, mc_error="none")
    return pilot.median_ess(np.stack([post.draws[pid] for pid in priors.ids], axis=1))


def infer(args) -> dict:
    import jax
    import numpy as np

    from qspjax.inference.library import run_nuts, write_posterior

    model, record = _model(args)
    out = prepare_out_dir(args.out, overwrite=True)
    t0 = time.perf_counter()
    if not args.quiet:
        print(f"NUTS: {args.chains} chains x ({args.warmup} warm-up + {args.samples} draws), target acceptance "
              f"{args.target_accept}, on {len(model.arms)} arms{'' if args.progress_bar else ' (one line when done)'}",
              flush=True)
    mcmc = run_nuts(model, jax.random.PRNGKey(args.seed), args.chains, args.warmup, args.samples,
                    args.target_accept, args.max_tree_depth, progress=args.progress_bar)
    wall = time.perf_counter() - t0
    prov = provenance(config=vars(args) | {"library_sidecar": model.library.meta.get("provenance"),
                                          "library_settings_key": model.library.meta.get("settings_key"),
                                          "model": record}, seed=args.seed)
    extra = {"nuts_wall_s": wall, "library": list(args.library), "library_settings_key": model.library.meta["settings_key"],
             "patients_per_arm": {a.arm_id: len(a) for a in model.library.arms},
             "mc_error": model.mc_error, "mc_error_fixed_ess_source": model.fixed_ess_source,
             "min_ess": model.min_ess,
             "mc_ess_from": args.mc_ess_from,
             "mc_error_fixed_ess": None if model.fixed_ess is None else dict(zip([a.arm_id for a in model.arms],
                                                                                 model.fixed_ess.tolist())),
             "route": "importance reweighting of a simulated library (fits/library.py)",
             "prior_predictive_min_weight_ess": float(np.min(model.ess(model.prior_means())))}
    summary = write_posterior(out, mcmc, model, prov, extra)
    _write_point_calibration(out, model, mcmc, args)
    print(f"R-hat max {summary['rhat_max']:.4f}, bulk ESS min {summary['ess_bulk_min']:.0f}, divergences "
          f"{summary['divergences']}, min weight ESS over arms at posterior draws "
          f"{summary['weight_ess']['min_over_arms']:.1f} (NUTS {wall:.0f} s)")
    for r in summary["predictive_orr"]:
        print(f"  {r['arm_id']:32s} ORR observed {r['observed_orr_pct']:5.1f} % "
              f"[{r['observed_ci'][0]:.1f}, {r['observed_ci'][1]:.1f}], predicted {r['predicted_orr_pct']:5.1f} % "
              f"[{r['predicted_interval'][0]:.1f}, {r['predicted_interval'][1]:.1f}]"
              f"{'' if r['predicted_inside_observed_ci'] else '  (outside the CI)'}")
    return summary


def _write_point_calibration(out, model, mcmc, args) -> None:
    """``params_calibrated.yaml`` (population medians in internal units) and
    ``population_calibrated.yaml`` (spreads) at the coordinate-wise posterior median: the files a
    command's default (calibrated) model reads, ``qspjax.commands._model_options``."""
    import numpy as np
    import yaml

    from qspjax.inference.calibrate import parameter_overlay, population_document
    from qspjax.inference.library import posterior_matrix
    from qspjax.io import atomic_write_text

    theta = np.median(posterior_matrix(mcmc, model), axis=0)
    source = (f"posterior median of fits/library.py, {len(model.arms)} arm(s), library "
              f"{model.library.meta.get('settings_key')}")
    atomic_write_text(out / "params_calibrated.yaml",
                      yaml.safe_dump(parameter_overlay(model.ref, theta, source), sort_keys=False))
    atomic_write_text(out / "population_calibrated.yaml",
                      yaml.safe_dump(population_document(model.ref, theta, source), sort_keys=False))


def sbc(args) -> dict:
    import jax

    from qspjax.inference.library import run_sbc
    from qspjax.inference.sbc import rank_histogram_plot, result_json, uniformity

    model, record = _model(args)
    out = prepare_out_dir(args.out, overwrite=True)
    init = None
    if model.min_ess is not None and (Path(args.posterior_dir) / "posterior.nc").is_file():
        # the walled prior's chain starts inside the support: at the shipped posterior's mean
        from qspjax.inference.predictive import load_posterior

        draws = load_posterior(args.posterior_dir).draws
        if set(model.ids) <= set(draws):
            init = [float(draws[k].mean()) for k in model.ids]
    result = run_sbc(model, args.sbc, jax.random.PRNGKey(args.seed), warmup=args.warmup, samples=args.samples,
                     thin=args.thin, target_accept=args.target_accept, max_tree_depth=args.max_tree_depth,
                     progress=not args.quiet, init=init)
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
    partial = Path(args.out) / "crossval.partial.json"
    done = []
    if partial.is_file():  # resume an interrupted run: its finished folds are kept
        import json

        saved = json.loads(partial.read_text())
        done = saved.get("arms", [])
        print(f"resuming {partial}: {saved.get('folds_done')} fold(s) done", flush=True)
    out = Path(args.out) if done else prepare_out_dir(args.out, overwrite=True)
    t0 = time.perf_counter()
    fixed = _fixed_ess(args, lib, arms, priors, params, spec)
    fixed = None if fixed is None else dict(zip([a.arm_id for a in arms], fixed.tolist()))
    rows = cross_validate(lib, arms, priors, params, spec, jax.random.PRNGKey(args.seed), chains=args.chains,
                          warmup=args.warmup, samples=args.samples, max_tree_depth=args.max_tree_depth,
                          progress=None if args.quiet else (lambda m: print(m, flush=True)), fixed_ess=fixed,
                          min_ess=args.min_ess, done=done, trials=args.crossval_trials,
                          on_fold=lambda rows, n_done, total: atomic_write_json(
                              out / "crossval.partial.json",
                              {"folds_done": len({r["held_out_trial"] for r in rows}), "folds": total,
                               "summary": tally(rows), "arms": rows, "wall_s": time.perf_counter() - t0}))
    (out / "crossval.partial.json").unlink(missing_ok=True)
    doc = {"route": "leave-one-trial-out on the importance-reweighted library (qspjax/inference/crossval.py)",
           "summary": tally(rows), "arms": rows, "wall_s": time.perf_counter() - t0, "rows_resumed": len(done),
           "provenance": provenance(config=vars(args) | {"model": record}, seed=args.seed)}
    atomic_write_json(out / "crossval.json", doc)
    for r in rows:
        print(f"  {r['id']:32s} held out with {r['held_out_trial']}: observed {r['observed_orr_pct']:5.1f} % "
              f"[{r['observed_orr_ci_pct'][0]:.1f}, {r['observed_orr_ci_pct'][1]:.1f}], predicted "
              f"{r['predicted_orr_pct']:5.1f} %{'' if r['inside_ci'] else '  (outside the CI)'}")
    s = doc["summary"]
    print(f"cross-validated: {s['inside_ci']} of {s['arms']} arms inside their CI ({doc['wall_s']:.0f} s)")
    return doc


def write_report(args) -> dict:
    """``fits/report.json``'s ``library_route``: per arm, the in-sample rows of ``POSTERIOR/summary.json``
    (role ``fitted``: ORR, CR, PFS points) and the leave-one-trial-out rows of
    ``CROSSVAL/crossval.json`` (role ``cross_validated``: ORR), with the goals' tallies. Other keys
    of the report (the point calibration's) are kept."""
    import json

    post = Path(args.posterior_dir)
    summary = json.loads((post / "summary.json").read_text())
    cv_path = Path(args.crossval_dir) / "crossval.json" if args.crossval_dir else None
    cv = json.loads(cv_path.read_text()) if cv_path is not None else {
        "arms": [], "summary": {"arms": 0, "inside_ci": 0, "fraction_inside": None,
                                "note": "not run for this posterior (no --crossval-dir)"}}
    endpoints = {r["arm_id"]: r for r in summary.get("predictive_endpoints", [])}
    rows = []
    for r in summary["predictive_orr"]:
        e = endpoints.get(r["arm_id"], {})
        rows.append({"id": r["arm_id"], "role": "fitted", "observed_orr_pct": r["observed_orr_pct"],
                     "observed_orr_ci_pct": r["observed_ci"], "predicted_orr_pct": r["predicted_orr_pct"],
                     "predicted_interval_pct": r["predicted_interval"], "inside_ci": r["predicted_inside_observed_ci"],
                     "cr": e.get("cr"), "pfs": e.get("pfs", []), "pathology": e.get("pathology")})
    with_orr = {r["id"] for r in rows}
    for arm_id, e in endpoints.items():  # arms fitted on pathology alone (no ORR printed)
        if arm_id not in with_orr and e.get("pathology"):
            rows.append({"id": arm_id, "role": "fitted", "observed_orr_pct": None, "observed_orr_ci_pct": None,
                         "predicted_orr_pct": None, "predicted_interval_pct": None, "inside_ci": None,
                         "cr": e.get("cr"), "pfs": e.get("pfs", []), "pathology": e["pathology"]})
    rows += cv["arms"]
    fitted = [r for r in rows if r["role"] == "fitted" and r["inside_ci"] is not None]
    crossed = [r for r in rows if r["role"] == "cross_validated"]
    path = Path(args.report)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["library_route"] = {
        "what": (f"posterior by NUTS on the importance-reweighted ODE library ({post}, fits/library.py): in-sample "
                 f"('fitted') ORR, CR, PFS and pCR/MPR per arm, and leave-one-trial-out ('cross_validated', "
                 f"{args.crossval_dir}/crossval.json) ORR; observed intervals exact binomial at 95 %; predicted: "
                 "posterior median of the reweighted cohort mean"),
        "summary": {"fitted": {"arms": len(fitted), "inside_ci": int(sum(r["inside_ci"] for r in fitted))},
                    "cross_validated": cv["summary"],
                    "endpoints_fitted": summary.get("endpoints_inside_observed_ci"),
                    "nuts": {k: summary.get(k) for k in ("rhat_max", "ess_bulk_min", "ess_tail_min", "divergences",
                                                         "chains", "samples_per_chain")}},
        "arms": rows}
    atomic_write_json(path, doc)
    print(f"{path}: fitted {doc['library_route']['summary']['fitted']}, cross-validated {cv['summary']}")
    if args.table:
        from qspjax.io import atomic_write_text

        atomic_write_text(args.table, arm_table(doc["library_route"]["arms"], summary))
        print(f"per-arm table (markdown) in {args.table}")
    return doc


def arm_table(rows: list[dict], summary: dict) -> str:
    """The per-arm Markdown table of ``fits/README.md`` from the report's library rows and the
    posterior's summary (Monte-Carlo size M, weight ESS, Monte-Carlo sd against the CI's half-width)."""
    import math

    fitted = {r["id"]: r for r in rows if r["role"] == "fitted"}
    crossed = {r["id"]: r for r in rows if r["role"] == "cross_validated"}
    m_fixed = summary.get("mc_error_fixed_ess") or {}
    w_ess = (summary.get("weight_ess") or {}).get("per_arm", {})
    pct = lambda v: f"{v:.1f}" if v is not None else "–"
    verdict = lambda inside: "in" if inside else "**out**"

    def orr(r):
        if r is None or r.get("predicted_orr_pct") is None:
            return "–"
        lo, hi = r["predicted_interval_pct"]
        return f"{r['predicted_orr_pct']:.1f} [{lo:.0f}, {hi:.0f}] {verdict(r['inside_ci'])}"

    lines = ["| arm | observed ORR % [95 % CI] | in sample | cross-validated | CR % observed / predicted | "
             "PFS 6 or 12 mo % observed / predicted | pCR / MPR % observed / predicted | M | weight ESS | "
             "MC sd / CI half-width |", "|" + "---|" * 10]
    for arm_id in sorted(fitted):
        r = fitted[arm_id]
        obs = "–" if r["observed_orr_pct"] is None else (
            f"{r['observed_orr_pct']:.1f} [{r['observed_orr_ci_pct'][0]:.1f}, {r['observed_orr_ci_pct'][1]:.1f}]")
        cr = r.get("cr")
        cr_txt = "–" if not cr else f"{cr['observed_pct']:.1f} / {cr['predicted_pct']:.1f}" + (
            "" if cr["inside_ci"] else " **out**")
        pfs = "; ".join(f"{p['months']:g} mo {p['observed_pct']:.0f} / {p['predicted_pct']:.0f}" +
                        ("" if p["inside_ci"] else " **out**") for p in r.get("pfs") or []) or "–"
        path = r.get("pathology")
        path_txt = "; ".join(f"{label} {path[k]['observed_pct']:.0f} / {path[k]['predicted_pct']:.0f}" +
                             ("" if path[k]["inside_ci"] else " **out**")
                             for k, label in (("pcr", "pCR"), ("mpr", "MPR")) if k in path) \
            if path else "–"
        w = w_ess.get(arm_id, {})
        ess = f"{w['median']:.1f} ({w['min']:.1f})" if w else "–"
        mc = "–"
        if r["observed_orr_pct"] is not None and w:
            p = r["predicted_orr_pct"] / 100.0
            half = (r["observed_orr_ci_pct"][1] - r["observed_orr_ci_pct"][0]) / 2.0
            mc = f"{100.0 * math.sqrt(p * (1.0 - p) / w['median']):.1f} / {half:.1f}"
        m = f"{m_fixed[arm_id]:.1f}" if arm_id in m_fixed else "–"
        lines.append(f"| `{arm_id}` | {obs} | {orr(r)} | {orr(crossed.get(arm_id))} | {cr_txt} | {pfs} | {path_txt} | "
                     f"{m} | {ess} | {mc} |")
    return "\n".join(lines) + "\n"


def diagnostics(args) -> dict:
    """Fitting diagnostics of the reweighted posterior (closed-form, so cheap): ``--multistart N``
    Sobol starts over the prior box (centre +- ``--box-sds`` prior sds), each minimised by L-BFGS-B
    (``starts.csv``, ``waterfall.png``, ``best_starts.png``), and the profile likelihood of every
    quantity from the best start (``profiles.csv``, ``profile_<id>.png``, ``profiles.json`` with the
    95 % intervals and the identifiability reading; :mod:`qspjax.inference.profile`)."""
    import math

    import numpy as np
    from scipy.stats import qmc

    from qspjax.inference.multistart import _csv_text, plot_best_starts, plot_waterfall
    from qspjax.inference.profile import minimise, objective_of, profile_parameter, write_profiles
    from qspjax.io import atomic_write_text

    model, record = _model(args)
    out = prepare_out_dir(args.out, overwrite=True)
    ids = list(model.ids)
    mu, sd = model.prior_means(), model.prior_sds()
    bounds = [(float(m - args.box_sds * s), float(m + args.box_sds * s)) for m, s in zip(mu, sd)]
    post = objective_of(model, "posterior")
    t0 = time.perf_counter()
    design = qmc.Sobol(len(ids), scramble=True, seed=args.seed).random(max(args.multistart, 1))
    starts = np.asarray(mu) + args.box_sds * np.asarray(sd) * (2 * design - 1)
    starts[0] = mu  # the prior centre first
    finals = []
    for j, x0 in enumerate(starts):
        theta, f = minimise(post, x0, bounds)
        finals.append((float(post(x0)[0]), theta, f))
        if not args.quiet:
            print(f"start {j + 1}/{len(starts)}: {finals[-1][0]:.3f} -> {f:.3f} nats", flush=True)
    best = min(f for _, _, f in finals if math.isfinite(f))
    order = sorted(range(len(finals)), key=lambda j: finals[j][2])
    rank = {j: r + 1 for r, j in enumerate(order)}
    rows = []
    for j, (f0, theta, f) in enumerate(finals):
        rows.append({"start": j, "initial_objective": f0, "optimized": True, "final_objective": f,
                     "converged": True, "stop_reason": "L-BFGS-B", "rank": rank[j],
                     "best_cluster": bool(f <= best + args.cluster_tolerance)}
                    | {f"theta:{k}": float(x) for k, x in zip(ids, theta)})
    atomic_write_text(out / "starts.csv", _csv_text(rows))
    plot_waterfall(rows, args.cluster_tolerance, out / "waterfall.png")
    plot_best_starts(rows, model, args.box_sds, out / "best_starts.png")
    t_multi = time.perf_counter() - t0
    # profiles of the likelihood (what the data say, inside the library's support) from the best start
    import jax
    import jax.numpy as jnp

    vg = jax.jit(jax.value_and_grad(lambda th: -(model._log_likelihood(th) + model.support_log_penalty(th))))

    def like(theta):
        value, grad = vg(jnp.asarray(theta, float))
        return float(value), np.asarray(grad, float)

    theta_best = finals[order[0]][1]
    theta_hat, f_min = minimise(like, theta_best, bounds)
    profiles = [profile_parameter(like, theta_hat, i, bounds, args.profile_step * float(sd[i]), args.profile_points,
                                  name=pid, f_min=f_min) for i, pid in enumerate(ids)]
    info = {"objective": "likelihood", "minimum": f_min, "theta_at_minimum": dict(zip(ids, map(float, theta_hat))),
            "fit_theta": dict(zip(ids, map(float, theta_best))), "box_sds": args.box_sds,
            "step_prior_sds": args.profile_step, "threshold_nats": 0.5 * 3.841458820694124,
            "simulator": model.library.meta.get("simulator"),
            "route": "reweighted library likelihood (fits/library.py --diagnostics)"}
    write_profiles(out, profiles, info)
    doc = {"multistart": {"starts": len(starts), "best_objective": best,
                          "best_cluster": int(sum(r["best_cluster"] for r in rows)),
                          "cluster_tolerance": args.cluster_tolerance, "wall_s": t_multi},
           "profiles": {p.parameter: {"reading": p.reading, "interval_95": [p.lower, p.upper]} for p in profiles},
           "wall_s": time.perf_counter() - t0,
           "provenance": provenance(config=vars(args) | {"model": record}, seed=args.seed)}
    atomic_write_json(out / "diagnostics.json", doc)
    for p in profiles:
        print(f"  {p.parameter:22s} {p.reading}; 95 % interval {p.lower} .. {p.upper}")
    return doc


def main(args: argparse.Namespace) -> dict:
    if args.build:
        return build(args)
    if args.write_report:
        return write_report(args)
    if args.diagnostics:
        return diagnostics(args)
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
    p.add_argument("--arms", nargs="*", default=None,
                   help="arm ids (default: the run file's fitted arms; 'all': every arm; 'outcomes': every arm with a "
                        "response or PFS point inside its simulated days, or pCR and MPR)")
    p.add_argument("--params-extra", nargs="*", default=[],
                   help="parameter files applied over the run file's (e.g. configs/params/potency_nominal.yaml)")
    p.add_argument("--population", default=None, help="population file (default: the run file's)")
    p.add_argument("--proposal-from", default=None,
                   help="build: centre the proposal on this posterior folder's draws (posterior.nc), or reuse "
                        "this library folder's proposal as is (library.json: to add or rebuild arms)")
    p.add_argument("--proposal-inflate", type=float, default=1.3,
                   help="build: widen the posterior-centred proposal's sds by this factor")
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
    p.add_argument("--mc-ess-from", default=None, metavar="DIR",
                   help="fixed Monte-Carlo term: M = each arm's median Kish ESS at this (pilot) posterior's draws "
                        "instead of at prior draws (a wide prior puts M at a few patients and the data count for little)")
    p.add_argument("--min-ess", type=float, default=None,
                   help="restrict the posterior to where every arm's importance weights keep at least this Kish ESS "
                        "(a steep wall below it; use with --mc-ess-from, whose M is only valid there)")
    p.add_argument("--sbc", type=int, default=0, help="SBC replicates (instead of inference)")
    p.add_argument("--crossval", action="store_true",
                   help="leave-one-trial-out cross-validation of the library's arms (instead of inference)")
    p.add_argument("--diagnostics", action="store_true",
                   help="multistart waterfall and profile likelihoods of the reweighted posterior (instead of NUTS)")
    p.add_argument("--multistart", type=int, default=64, help="diagnostics: Sobol starts")
    p.add_argument("--box-sds", type=float, default=3.0, help="diagnostics: start box, prior centre +- this many sds")
    p.add_argument("--cluster-tolerance", type=float, default=0.1, help="diagnostics: best-cluster width (nats)")
    p.add_argument("--profile-step", type=float, default=0.2, help="diagnostics: profile step (prior sds)")
    p.add_argument("--profile-points", type=int, default=15, help="diagnostics: profile points per side, at most")
    p.add_argument("--write-report", action="store_true",
                   help="write --report's library_route from --posterior-dir and --crossval-dir (no sampling)")
    p.add_argument("--posterior-dir", default="fits/posterior",
                   help="--write-report: the posterior to report; --sbc with --min-ess: its mean starts the chain "
                        "of the walled prior")
    p.add_argument("--crossval-dir", default="fits/crossval", help="'' when no cross-validation was run")
    p.add_argument("--report", default="fits/report.json")
    p.add_argument("--crossval-trials", nargs="+", default=None,
                   help="--crossval: hold out only these trials (split the folds over processes, then merge the "
                        "rows of their crossval.partial.json files into one and resume)")
    p.add_argument("--table", default=None, help="--write-report: also write the per-arm Markdown table here")
    p.add_argument("--thin", type=int, default=2, help="SBC: keep every thin-th draw")
    p.add_argument("--bins", type=int, default=10, help="SBC: rank histogram bins")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/library")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--progress-bar", action="store_true",
                   help="numpyro's per-iteration progress bar for NUTS (it steps the chains from Python: ~5x slower "
                        "than the default, which runs them in one compiled loop and prints when done)")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
