"""Fit and infer runs from a run file: what ``qspjax fit``/``qspjax infer`` and ``fits/*.py`` execute."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax

from qspjax.inference.config import RunConfig, load_arm_selection, load_priors, load_run_config
from qspjax.inference.likelihood import Problem, build_problem


def with_overrides(cfg: RunConfig, likelihood: dict | None = None, optimizer: dict | None = None,
                   nuts: dict | None = None) -> RunConfig:
    """A copy of ``cfg`` with size flags applied (None values are left as they are)."""
    clean = lambda d: {k: v for k, v in (d or {}).items() if v is not None}
    return dataclasses.replace(
        cfg, likelihood=dataclasses.replace(cfg.likelihood, **clean(likelihood)),
        optimizer=dataclasses.replace(cfg.optimizer, **clean(optimizer)),
        nuts=dataclasses.replace(cfg.nuts, **clean(nuts)))


def problems(cfg: RunConfig, simulator: str = "qsp", max_arms: int | None = None) -> tuple[Problem, Problem | None]:
    """The fit problem and the held-out problem (None without held-out arms) of a run file."""
    from qspjax.data.trials import load_trials
    from qspjax.params import load_parameters
    from qspjax.vpop import load_population

    params = load_parameters(cfg.params)
    spec = load_population(cfg.population)
    trials = load_trials(cfg.trials)
    priors = load_priors(cfg.priors, spec.names)
    selection = load_arm_selection(cfg.arms, tuple(a.arm_id for a in trials.arms))
    fit_ids = selection.fit[:max_arms] if max_arms else selection.fit
    held_ids = selection.held_out[:max_arms] if max_arms else selection.held_out
    fit = build_problem(fit_ids, trials, priors, params, spec, cfg.likelihood, selection.endpoints, simulator)
    held = (build_problem(held_ids, trials, priors, params, spec, cfg.likelihood, selection.endpoints, simulator)
            if held_ids else None)
    return fit, held


def _prov(cfg: RunConfig, extra: dict, seed: int) -> dict:
    from qspjax.io import provenance

    conf = dataclasses.asdict(cfg)
    conf.update(extra)
    return provenance(config=conf, seed=seed)


def run_fit(cfg: RunConfig, out: Path, simulator: str = "qsp", max_arms: int | None = None,
            progress: bool = True, init_from: Path | None = None) -> dict:
    """Calibrate and write the outputs of :func:`qspjax.inference.calibrate.write_calibration`.

    ``init_from``: a previous fit's output folder; its best parameters are the only start (a
    second stage, e.g. L-BFGS after Adam).
    """
    from qspjax.inference.calibrate import calibrate, write_calibration

    t0 = time.perf_counter()
    fit, _ = problems(cfg, simulator, max_arms)
    o = cfg.optimizer
    initial = None
    if init_from is not None:
        from qspjax.inference.report import load_fitted_theta

        initial = load_fitted_theta(init_from, fit)[None, :]
    k = o.optimized
    result = calibrate(fit, jax.random.PRNGKey(o.seed), k, o.steps, o.learning_rate, o.patience,
                       o.tolerance, initial=initial, progress=progress, screen=o.starts if k < o.starts else 0,
                       method=o.method, design=o.design, box_sds=o.box_sds)
    seconds = time.perf_counter() - t0
    prov = _prov(cfg, {"simulator": simulator, "max_arms": max_arms, "arm_file": str(cfg.arms),
                       "endpoints": list(load_arm_selection(cfg.arms).endpoints),
                       "arms": [a.arm_id for a in fit.arms],
                       "arm_notes": {a.arm_id: list(a.notes) for a in fit.arms}, "wall_seconds": seconds,
                       "init_from": None if init_from is None else str(init_from)},
                 o.seed)
    write_calibration(out, fit, result, prov)
    return {"loss": result.loss, "theta": result.theta, "natural": fit.natural(result.theta), "seconds": seconds}


def run_infer(cfg: RunConfig, out: Path, simulator: str = "qsp", max_arms: int | None = None,
              predictive_draws: int = 50, progress: bool = True) -> dict:
    """NUTS and the outputs of :func:`qspjax.inference.bayes.write_inference`."""
    from qspjax.inference.bayes import run_nuts, write_inference

    t0 = time.perf_counter()
    fit, held = problems(cfg, simulator, max_arms)
    n = cfg.nuts
    key_mcmc, key_pred = jax.random.split(jax.random.PRNGKey(n.seed))
    mcmc = run_nuts(fit, key_mcmc, n.chains, n.warmup, n.samples, n.target_accept, n.max_tree_depth,
                    progress=progress)
    prov = _prov(cfg, {"simulator": simulator, "max_arms": max_arms, "predictive_draws": predictive_draws,
                       "arms": [a.arm_id for a in fit.arms],
                       "held_out": [a.arm_id for a in held.arms] if held else []}, n.seed)
    summary = write_inference(out, mcmc, fit, held, key_pred, prov, predictive_draws)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def load(path) -> RunConfig:
    return load_run_config(path)
