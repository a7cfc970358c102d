"""Bayesian inference: a numpyro model that is a thin function over the likelihood, run by NUTS.

:func:`model` samples each unconstrained parameter from its prior (``numpyro.sample``) and adds the
problem's log-likelihood as a ``numpyro.factor``: nothing else, so the same
:class:`~qspjax.inference.likelihood.Problem` serves the optimiser, NUTS, or any other sampler.
:func:`run_nuts` picks the chain method from the devices; :func:`summarise` gives R-hat, ESS and
divergences; :func:`posterior_predictive` predicts ORR and PFS per arm from posterior draws
(fitted arms as a check, held-out arms as a test, scored by log predictive density and interval
coverage); :func:`write_inference` writes the netCDF, JSON, CSV and PNG outputs atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS

from qspjax.inference.likelihood import Problem
from qspjax.io import atomic_write, atomic_write_json, atomic_write_text
from qspjax.outcomes import binomial_ci


def model(problem: Problem) -> None:
    """Priors on the unconstrained parameters, plus the arms' log-likelihood as a factor."""
    mu, sd = problem.prior_means(), problem.prior_sds()
    theta = jnp.stack([numpyro.sample(pid, dist.Normal(float(m), float(s)))
                       for pid, m, s in zip(problem.ids, mu, sd)])
    numpyro.factor("log_likelihood", problem.log_likelihood(theta))


def chain_method(chains: int, simulator: str = "qsp") -> str:
    """'parallel' when there is a device per chain; otherwise 'vectorized' for the cheap closed-form
    surrogate and 'sequential' for the ODE (a vmap over chains would run every chain's adaptive
    solve as long as the slowest one, and compile a second, batched objective)."""
    if jax.local_device_count() >= chains:
        return "parallel"
    return "vectorized" if simulator == "kinetics" else "sequential"


def run_nuts(problem: Problem, key: jax.Array, chains: int = 4, warmup: int = 200, samples: int = 200,
             target_accept: float = 0.8, max_tree_depth: int = 6, init: np.ndarray | None = None,
             progress: bool = True) -> MCMC:
    """NUTS on :func:`model`; ``init`` (D,) starts every chain there (e.g. at the MAP estimate)."""
    from numpyro.infer.initialization import init_to_median, init_to_value

    strategy = init_to_median() if init is None else init_to_value(
        values={pid: float(v) for pid, v in zip(problem.ids, np.asarray(init))})
    kernel = NUTS(model, target_accept_prob=target_accept, max_tree_depth=max_tree_depth, init_strategy=strategy)
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=samples, num_chains=chains,
                chain_method=chain_method(chains, problem.simulator_name), progress_bar=progress)
    mcmc.run(key, problem, extra_fields=("diverging", "num_steps"))
    return mcmc


def to_inference_data(mcmc: MCMC, problem: Problem):
    import arviz as az

    idata = az.from_numpyro(mcmc)
    idata.posterior.attrs["scale"] = "unconstrained: log/logit of medians, log of between-patient sds"
    return idata


def summarise(mcmc: MCMC, problem: Problem) -> dict:
    """R-hat, bulk/tail ESS per parameter, divergences, and posterior medians in natural units."""
    import arviz as az

    idata = az.from_numpyro(mcmc)
    table = az.summary(idata, var_names=list(problem.ids), kind="all", round_to="none")  # R-hat unrounded
    draws = posterior_matrix(mcmc, problem)
    diverging = np.asarray(mcmc.get_extra_fields(group_by_chain=True)["diverging"])
    natural_median = problem.natural(np.median(draws, axis=0))
    out = {"parameters": {}, "divergences": int(diverging.sum()), "divergences_per_chain": diverging.sum(axis=1).tolist(),
           "chains": int(diverging.shape[0]), "samples_per_chain": int(diverging.shape[1])}
    for pid in problem.ids:
        row = table.loc[pid]
        out["parameters"][pid] = {"mean": float(row["mean"]), "sd": float(row["sd"]),
                                  "hdi_3%": float(row["hdi_3%"]), "hdi_97%": float(row["hdi_97%"]),
                                  "r_hat": float(row["r_hat"]), "ess_bulk": float(row["ess_bulk"]),
                                  "ess_tail": float(row["ess_tail"]), "natural_median": natural_median[pid]}
    out["max_r_hat"] = max(v["r_hat"] for v in out["parameters"].values())
    out["min_ess_bulk"] = min(v["ess_bulk"] for v in out["parameters"].values())
    return out


def posterior_matrix(mcmc: MCMC, problem: Problem) -> np.ndarray:
    """Posterior draws (chains * samples, D) in the problem's parameter order."""
    s = mcmc.get_samples()
    return np.stack([np.asarray(s[pid]) for pid in problem.ids], axis=1)


def posterior_predictive(problem: Problem, draws: np.ndarray, key: jax.Array, n_draws: int = 50,
                         level: float = 0.95) -> list[dict]:
    """Predicted ORR and PFS per arm of ``problem`` over ``n_draws`` posterior draws, with the observed values.

    Each row: arm, endpoint (``orr`` or ``pfs@<days>``), observed % and its exact binomial CI,
    predicted median and ``level`` interval (%), and the arm's log predictive density
    (log mean over draws of the likelihood; the same for every row of an arm).
    """
    idx = np.asarray(jax.random.choice(key, draws.shape[0], (min(n_draws, draws.shape[0]),), replace=False))
    preds, lls = [], []
    for j in idx:
        pred = problem.predict(jnp.asarray(draws[j]))
        preds.append(jax.tree_util.tree_map(np.asarray, pred))
        lls.append(np.asarray(problem.arm_log_likelihoods(pred)))
    lls = np.stack(lls)  # (draws, arms)
    lpd = np.logaddexp.reduce(lls, axis=0) - math.log(len(idx))
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    rows = []
    for i, a in enumerate(problem.arms):
        orr = np.array([100 * (p.response[i, 0] + p.response[i, 1]) for p in preds])
        k = a.responders if a.responders is not None else (
            a.response_counts[0] + a.response_counts[1] if a.response_counts is not None else None)
        if k is not None:
            lo, hi = binomial_ci(int(k), int(a.n), level)
            rows.append(_row(a.arm_id, "orr", 100 * k / a.n, 100 * lo, 100 * hi, orr, lo_q, hi_q, lpd[i]))
        landmarks = np.array([np.asarray(problem.landmark_pfs(p, i)) for p in preds]).reshape(len(preds), -1)
        for j, (d, kk) in enumerate(zip(a.pfs_days, a.pfs_progression_free)):
            curve = 100 * landmarks[:, j]
            lo, hi = binomial_ci(int(kk), int(a.n), level)
            rows.append(_row(a.arm_id, f"pfs@{d:.0f}d", 100 * kk / a.n, 100 * lo, 100 * hi, curve, lo_q, hi_q, lpd[i]))
    return rows


def _row(arm, endpoint, obs, lo, hi, pred, lo_q, hi_q, lpd) -> dict:
    p_lo, p_med, p_hi = np.percentile(pred, [lo_q, 50, hi_q])
    return {"arm_id": arm, "endpoint": endpoint, "observed_pct": float(obs), "observed_ci_lo": float(lo),
            "observed_ci_hi": float(hi), "predicted_median_pct": float(p_med), "predicted_lo_pct": float(p_lo),
            "predicted_hi_pct": float(p_hi), "observed_inside_interval": bool(p_lo <= obs <= p_hi),
            "arm_log_predictive_density": float(lpd)}


def forest_plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    for y, r in enumerate(rows):
        ax.plot([r["predicted_lo_pct"], r["predicted_hi_pct"]], [y + 0.12] * 2, color="C0", lw=3, alpha=0.6)
        ax.plot(r["predicted_median_pct"], y + 0.12, "o", color="C0")
        ax.plot([r["observed_ci_lo"], r["observed_ci_hi"]], [y - 0.12] * 2, color="k", lw=1)
        ax.plot(r["observed_pct"], y - 0.12, "ks", ms=4)
    ax.set_yticks(range(len(rows)), [f"{r['arm_id']} {r['endpoint']}" for r in rows], fontsize=7)
    ax.set_xlabel("% of patients\n(blue: posterior predictive, 95 %; black: observed, exact 95 % CI)")
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)
    return path


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines) + "\n"


def write_inference(out: Path, mcmc: MCMC, problem: Problem, held_out: Problem | None, key: jax.Array,
                    prov: dict, predictive_draws: int = 50) -> dict:
    """posterior.nc (ArviZ), summary.json, trace.png, pair.png, predictive.csv, forest.png, run.json."""
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    idata = to_inference_data(mcmc, problem)
    atomic_write(out / "posterior.nc", lambda p: idata.to_netcdf(str(p), engine="h5netcdf"))
    summary = summarise(mcmc, problem)
    axes = az.plot_trace(idata, var_names=list(problem.ids), compact=False)
    atomic_write(out / "trace.png", lambda p: axes.ravel()[0].figure.savefig(p, dpi=80, format="png"))
    plt.close("all")
    if len(problem.ids) > 1:
        axes = az.plot_pair(idata, var_names=list(problem.ids), kind="scatter", divergences=True)
        fig = np.ravel(axes)[0].figure
        atomic_write(out / "pair.png", lambda p: fig.savefig(p, dpi=80, format="png"))
        plt.close("all")
    draws = posterior_matrix(mcmc, problem)
    k1, k2 = jax.random.split(key)
    rows = posterior_predictive(problem, draws, k1, predictive_draws)
    for r in rows:
        r["set"] = "fit"
    if held_out is not None:
        held = posterior_predictive(held_out, draws, k2, predictive_draws)
        for r in held:
            r["set"] = "held_out"
        rows += held
        arms = {r["arm_id"]: r["arm_log_predictive_density"] for r in held}
        summary["held_out"] = {"log_predictive_density": float(sum(arms.values())), "per_arm": arms,
                               "endpoints_inside_95pct_interval": int(sum(r["observed_inside_interval"] for r in held)),
                               "endpoints": len(held)}
    summary["fit_endpoints_inside_95pct_interval"] = int(sum(r["observed_inside_interval"] for r in rows if r["set"] == "fit"))
    atomic_write_text(out / "predictive.csv", _csv(rows))
    forest_plot(rows, out / "forest.png", "posterior predictive per arm")
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "run.json", prov)
    return summary
