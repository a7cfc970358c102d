"""Simulation-based calibration (SBC) of the Bayesian inference (Talts et al. 2018, arXiv:1804.06788).

If data are simulated from the model's own prior predictive distribution, theta ~ p(theta),
y ~ p(y | theta), and the sampler returns exact posterior draws theta_1..theta_L ~ p(theta | y),
then the rank of theta among the L draws (the number of draws below it, per parameter) is
uniform on {0, ..., L}. A sampler, a likelihood or a data simulator that disagree with each other
show as non-uniform ranks: a U shape (posterior too narrow), a hump (too wide), or a slope (bias).

:func:`run_sbc` does this for a :class:`~qspjax.inference.likelihood.Problem`. The data of each
replicate are drawn from the same likelihood the problem scores (its arms' *structure* serves as a
template; their printed counts are ignored):

* response: CR/PR/SD/PD counts ~ Multinomial(N, p[:4] renormalised) when the arm has
  ``response_counts``, otherwise responders ~ Binomial(N, P(CR) + P(PR)) when it has ``responders``,
  N the effective size of :class:`~qspjax.inference.likelihood.ArmTerms` (``response_n``);
* PFS: for each scored interval, the number progression-free at its end ~ Binomial(m_j, q_j), with
  m_j the interval's effective number at risk (``pfs_at_risk``, fixed by the template's printed
  data: censoring and the virtual cohort's Monte-Carlo error) and q_j the predicted conditional
  progression-free probability (:meth:`Problem.pfs_conditionals`: from the first scan when the
  PD count conditions the intervals), independently across intervals, as the likelihood scores them.

The data enter NUTS as traced arguments of the potential (:func:`nuts_sampler`: numpyro's NUTS
kernel in one jitted ``lax.scan``): one compilation serves every replicate. One chain per replicate; the ``samples`` post-warmup draws are thinned by
``thin`` to L = samples // thin (roughly independent) draws.

Uniformity, per parameter: Pearson's chi-square test of the rank histogram in ``bins`` bins (expected
counts from the number of ranks each bin holds) and a Kolmogorov-Smirnov test of the jittered
normalised ranks u = (rank + U(0, 1)) / (L + 1), exactly uniform on (0, 1) under the null. The
verdict: every one of the 2 D p-values at least ``alpha / (2 D)`` (Bonferroni, family-wise ``alpha``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qspjax.inference.likelihood import Problem


# ---------------------------------------------------------------------------------------------
# Data as traced arrays, and the likelihood over them
# ---------------------------------------------------------------------------------------------
def simulate_data(problem: Problem, theta, rng: np.random.Generator) -> tuple[dict, ...]:
    """One data set per arm of ``problem`` at ``theta`` (D,), from the likelihood the problem scores.

    Per arm a dict of float arrays: ``counts`` (4,) or ``responders`` () and ``pfs`` (J,), with the
    same keys as the arm's template data has endpoints (:meth:`Problem.observed_data`).
    """
    pred = problem.predict(jnp.asarray(theta))
    data = []
    for i, (t, template) in enumerate(zip(problem.terms, problem.observed_data())):
        d = {}
        p = np.asarray(pred.response[i])
        if "counts" in template:
            q = np.clip(p[:4], 1e-9, None)
            d["counts"] = rng.multinomial(t.response_n, q / q.sum()).astype(float)
        elif "responders" in template:
            d["responders"] = np.asarray(float(rng.binomial(t.response_n, np.clip(p[0] + p[1], 0.0, 1.0))))
        if "pfs" in template:
            q = np.clip(np.asarray(problem.pfs_conditionals(pred, i)), 0.0, 1.0)
            d["pfs"] = rng.binomial(np.asarray(t.pfs_at_risk), q).astype(float)
        data.append(d)
    return tuple(data)


def observed_data(problem: Problem) -> tuple[dict, ...]:
    """The problem's own printed data in the layout of :func:`simulate_data`, as float arrays."""
    return tuple({k: np.asarray(v, float) for k, v in d.items()} for d in problem.observed_data())


def data_log_likelihood(problem: Problem, theta, data) -> jax.Array:
    """Log-likelihood of ``data`` (layout of :func:`simulate_data`, possibly traced) at ``theta``:
    :meth:`Problem.arm_log_likelihoods` with ``data`` in place of the printed counts."""
    return jnp.sum(problem.arm_log_likelihoods(problem.predict(theta), data))


# ---------------------------------------------------------------------------------------------
# Ranks and uniformity
# ---------------------------------------------------------------------------------------------
def ranks(theta_true, draws) -> np.ndarray:
    """Rank of ``theta_true`` (D,) among ``draws`` (L, D): the number of draws below it, 0..L, per parameter."""
    return np.sum(np.asarray(draws) < np.asarray(theta_true)[None, :], axis=0).astype(int)


def bin_edges(n_ranks: int, bins: int) -> np.ndarray:
    """Bin of each rank 0..n_ranks-1 when ``bins`` bins split them as evenly as possible."""
    return (np.arange(n_ranks) * bins) // n_ranks


def uniformity(rank_matrix, n_draws: int, bins: int = 10, alpha: float = 0.01, seed: int = 0) -> dict:
    """Chi-square and KS tests of uniform ranks on {0..n_draws}, per column of ``rank_matrix`` (R, D).

    Returns per parameter the histogram, its expected counts, both p-values and whether both exceed the
    Bonferroni threshold ``alpha / (2 D)``; ``passed`` when every parameter passes.
    """
    from scipy import stats

    r = np.asarray(rank_matrix, int)
    if r.ndim == 1:
        r = r[:, None]
    n_rep, n_par = r.shape
    n_ranks = n_draws + 1
    if r.min() < 0 or r.max() > n_draws:
        raise ValueError(f"ranks must lie in 0..{n_draws}")
    bins = min(bins, n_ranks)
    which = bin_edges(n_ranks, bins)
    expected = n_rep * np.bincount(which, minlength=bins) / n_ranks
    threshold = alpha / (2 * n_par)
    rng = np.random.default_rng(seed)
    out = {"test": (f"per parameter: Pearson chi-square of the rank histogram ({bins} bins, {bins - 1} dof) and "
                    f"two-sided KS of (rank + U(0,1)) / (L + 1) against U(0,1); pass when every p-value >= "
                    f"{alpha:g} / {2 * n_par} = {threshold:.4g} (Bonferroni over {2 * n_par} tests, family-wise {alpha:g})"),
           "bins": bins, "n_draws": n_draws, "replicates": n_rep, "alpha": alpha,
           "threshold_per_test": threshold, "expected": expected.tolist(), "parameters": []}
    for j in range(n_par):
        hist = np.bincount(which[r[:, j]], minlength=bins)
        chi2 = stats.chisquare(hist, expected)
        u = (r[:, j] + rng.uniform(size=n_rep)) / n_ranks
        ks = stats.kstest(u, "uniform")
        ok = bool(chi2.pvalue >= threshold and ks.pvalue >= threshold)
        out["parameters"].append({"histogram": hist.tolist(), "chi2": float(chi2.statistic),
                                  "chi2_pvalue": float(chi2.pvalue), "ks": float(ks.statistic),
                                  "ks_pvalue": float(ks.pvalue), "passed": ok})
    out["passed"] = all(p["passed"] for p in out["parameters"])
    return out


# ---------------------------------------------------------------------------------------------
# The SBC loop
# ---------------------------------------------------------------------------------------------
@dataclass
class SBCResult:
    ids: tuple[str, ...]
    ranks: np.ndarray  # (R, D), 0..n_draws
    n_draws: int  # L
    theta_true: np.ndarray  # (R, D)
    posterior_mean: np.ndarray  # (R, D)
    posterior_sd: np.ndarray  # (R, D)
    divergences: np.ndarray  # (R,)
    seconds: float
    compile_seconds: float
    settings: dict = field(default_factory=dict)


def log_support_prior(problem: Problem, theta) -> jax.Array:
    """The log prior, plus the support wall of a problem that restricts theta to where its
    likelihood is defined (:meth:`qspjax.inference.library.LibraryModel.support_log_penalty`):
    the prior the model really has, from which SBC must draw its truths."""
    wall = getattr(problem, "support_log_penalty", None)
    return problem._log_prior(theta) + (0.0 if wall is None else wall(theta))


def log_density(problem: Problem, theta, data) -> jax.Array:
    """Log prior (with any support wall) plus :func:`data_log_likelihood`: the log posterior density,
    up to a constant, of ``data``."""
    return log_support_prior(problem, theta) + data_log_likelihood(problem, theta, data)


def nuts_sampler(problem: Problem, warmup: int, samples: int, thin: int, target_accept: float = 0.8,
                 max_tree_depth: int = 6, init=None):
    """``sample(key, data)`` -> (draws (samples // thin, D), post-warmup divergences), jit-compiled once.

    numpyro's NUTS kernel (``numpyro.infer.hmc.hmc``: step size and diagonal mass matrix adapted
    during ``warmup``) driven by one ``lax.scan``, with the data a traced argument of the potential.
    Not :class:`numpyro.infer.MCMC`: with ``jit_model_args=True`` it still re-jits its sampling loop
    (``fori_collect``) on every ``run`` (measured: ~4.5 s of the ~5 s of each replicate here), while
    this compiles once. The priors are normal on the unconstrained scale, so theta is sampled as is.
    Chains start at ``init`` (default the prior means) plus 0.1 prior sd of jitter.
    """
    from numpyro.infer.hmc import hmc

    def potential_fn_gen(data):
        return lambda theta: -log_density(problem, theta, data)

    init_kernel, sample_kernel = hmc(potential_fn_gen=potential_fn_gen, algo="NUTS")
    init = jnp.asarray(problem.prior_means() if init is None else init, float)

    @jax.jit
    def sample(key, data):
        k_init, k_jitter = jax.random.split(key)
        start = init + 0.1 * jnp.asarray(problem.prior_sds()) * jax.random.normal(k_jitter, init.shape)
        state = init_kernel(start, num_warmup=warmup, target_accept_prob=target_accept,
                            max_tree_depth=max_tree_depth, model_args=(data,), rng_key=k_init)

        def step(state, _):
            state = sample_kernel(state, model_args=(data,))
            return state, (state.z, state.diverging)

        _, (z, diverging) = jax.lax.scan(step, state, None, length=warmup + samples)
        return z[warmup:][thin - 1::thin][: samples // thin], jnp.sum(diverging[warmup:])

    return sample


def run_sbc(problem: Problem, replicates: int, key: jax.Array, warmup: int = 200, samples: int = 200,
            thin: int = 2, target_accept: float = 0.8, max_tree_depth: int = 6, progress: bool = False) -> SBCResult:
    """SBC of NUTS on ``problem``: ``replicates`` prior draws, a data set each, one chain each.

    The ranks are of theta_true among L = samples // thin thinned post-warmup draws (L + 1 possible
    ranks). ``compile_seconds`` is the wall time of the first replicate (compilation included).
    """
    if samples // thin < 1:
        raise ValueError("samples // thin must be at least 1")
    k_prior, k_data, k_nuts = jax.random.split(key, 3)
    truths = problem.sample_prior(k_prior, replicates)
    rng = np.random.default_rng(int(jax.random.randint(k_data, (), 0, 2**31 - 1)))
    sample = nuts_sampler(problem, warmup, samples, thin, target_accept, max_tree_depth)
    keys = jax.random.split(k_nuts, replicates)
    n_draws = samples // thin
    rank_rows, means, sds, div = [], [], [], []
    t0 = time.perf_counter()
    compile_seconds = float("nan")
    for r in range(replicates):
        data = jax.tree_util.tree_map(jnp.asarray, simulate_data(problem, truths[r], rng))
        draws, n_div = sample(keys[r], data)
        draws = np.asarray(draws)
        rank_rows.append(ranks(truths[r], draws))
        means.append(draws.mean(0))
        sds.append(draws.std(0))
        div.append(int(n_div))
        if r == 0:
            compile_seconds = time.perf_counter() - t0
        if progress:
            print(f"replicate {r + 1}/{replicates}: ranks {rank_rows[-1].tolist()}, divergences {div[-1]} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    settings = {"replicates": replicates, "warmup": warmup, "samples": samples, "thin": thin, "chains": 1,
                "target_accept": target_accept, "max_tree_depth": max_tree_depth,
                "init": "prior mean + 0.1 prior sd x N(0, 1)", "sampler": "numpyro NUTS kernel (diagonal mass)"}
    return SBCResult(problem.ids, np.asarray(rank_rows, int), n_draws, truths, np.asarray(means), np.asarray(sds),
                     np.asarray(div, int), time.perf_counter() - t0, compile_seconds, settings)


def rank_histogram_plot(rank_matrix, n_draws: int, ids, path: Path, bins: int = 10, band: float = 0.99) -> Path:
    """Rank histogram per parameter with the central ``band`` interval of each bin's Binomial count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    from qspjax.io import atomic_write

    r = np.asarray(rank_matrix, int)
    n_rep, n_par = r.shape
    n_ranks = n_draws + 1
    bins = min(bins, n_ranks)
    which = bin_edges(n_ranks, bins)
    share = np.bincount(which, minlength=bins) / n_ranks
    lo = stats.binom.ppf((1 - band) / 2, n_rep, share)
    hi = stats.binom.ppf((1 + band) / 2, n_rep, share)
    cols = min(n_par, 5)  # a grid, not one row: 13 parameters in a row are unreadable
    rows = -(-n_par // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n_par:]:
        ax.set_visible(False)
    x = np.arange(bins)
    for j, ax in enumerate(axes.flat[:n_par]):
        hist = np.bincount(which[r[:, j]], minlength=bins)
        ax.fill_between(np.r_[x - 0.5, bins - 0.5], np.r_[lo, lo[-1]], np.r_[hi, hi[-1]], step="post",
                        color="0.85", label=f"{100 * band:g} % band (uniform)")
        ax.bar(x, hist, width=0.9, color="C0", alpha=0.8)
        ax.axhline(n_rep / bins, color="k", lw=0.8)
        ax.set_title(str(ids[j]), fontsize=9)
        ax.set_xlabel(f"rank bin ({n_ranks} ranks in {bins} bins)")
        ax.set_ylabel("replicates")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"SBC rank histograms, {n_rep} replicates, L = {n_draws}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)
    return path


def result_json(result: SBCResult, tests: dict) -> dict:
    return {"ids": list(result.ids), "n_draws": result.n_draws, "settings": result.settings,
            "ranks": result.ranks.tolist(), "theta_true": result.theta_true.tolist(),
            "posterior_mean": result.posterior_mean.tolist(), "posterior_sd": result.posterior_sd.tolist(),
            "divergences": result.divergences.tolist(), "divergences_total": int(result.divergences.sum()),
            "replicates_with_divergences": int((result.divergences > 0).sum()),
            "seconds": result.seconds, "first_replicate_seconds": result.compile_seconds,
            "uniformity": tests, "passed": tests["passed"],
            "mean_posterior_sd": dict(zip(result.ids, result.posterior_sd.mean(0).tolist())),
            "prior_sd_note": "posterior sds are on the unconstrained (log) scale; compare with the prior sd"}
