"""Maximum a posteriori calibration: multi-start Adam or L-BFGS on the negative log posterior.

Starts are the points of a design over the priors (a scrambled Sobol sequence over the prior box,
or prior draws; explicit PRNG key), optionally screened by one forward evaluation each so that only
the best are optimised (:func:`screen_starts`); each start runs optax Adam (or L-BFGS) on
``-log_posterior(theta)`` with the problem's one compiled value-and-gradient, stops early when the
best loss has not improved by ``tolerance`` (absolute, in nats) for ``patience`` steps, and the
best start wins. Outputs (:func:`write_calibration`): the fitted population file (the schema of
``configs/params/population.yaml`` with fitted spreads) plus a parameter overlay with the fitted
medians that ``load_parameters(extra=[...])`` reads, the loss history (JSON), one
fit-vs-observed PNG per arm, ``run.json`` provenance, and the multistart diagnostics of
:mod:`qspjax.inference.multistart` (``starts.csv``, ``waterfall.png``, ``best_starts.png``). Every
file is written atomically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from qspjax.inference.config import OPTIMIZER_DESIGNS, OPTIMIZER_METHODS
from qspjax.inference.likelihood import DAYS_PER_MONTH, Problem
from qspjax.io import atomic_write, atomic_write_json, atomic_write_text


@dataclass
class CalibrationResult:
    """Best parameters (D,) on the unconstrained scale, their loss (nats), and every start's history."""

    theta: np.ndarray
    loss: float
    starts: np.ndarray  # (S, D)
    histories: list[list[float]] = field(default_factory=list)
    best_start: int = 0
    finals: np.ndarray | None = None  # (S, D)
    screened: dict | None = None  # candidates (C, D) and their log posteriors (C,), when screened
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT); the best point found so far is kept
    initial_losses: np.ndarray | None = None  # (S,) first loss of each optimised start (nats)
    stop_reasons: list[str] = field(default_factory=list)  # converged / max_steps / non_finite / interrupted
    design: str = "prior"
    box_sds: float = 3.0


def design_points(problem: Problem, key: jax.Array, n: int, design: str = "sobol", box_sds: float = 3.0) -> np.ndarray:
    """``n`` start points (n, D) on the unconstrained scale; the first is always the prior centre.

    ``sobol``: a scrambled Sobol sequence (scipy.stats.qmc, seeded from ``key``) over the prior box,
    each prior centre +- ``box_sds`` prior sds; ``prior``: draws from the priors.
    """
    if design not in OPTIMIZER_DESIGNS:
        from qspjax.errors import QSPValidationError

        raise QSPValidationError("optimizer", "design", design, f"allowed values are {list(OPTIMIZER_DESIGNS)}")
    mu, sd = problem.prior_means(), problem.prior_sds()
    if design == "sobol":
        import warnings

        from scipy.stats import qmc

        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        with warnings.catch_warnings():  # n need not be a power of 2 (a slightly less balanced design)
            warnings.simplefilter("ignore", UserWarning)
            u = qmc.Sobol(len(mu), scramble=True, seed=seed).random(n)
        points = mu + box_sds * sd * (2.0 * u - 1.0)
    else:
        points = np.array(problem.sample_prior(key, n))
    points[0] = mu
    return points


def screen_starts(problem: Problem, key: jax.Array, starts: int, candidates: int,
                  progress: bool = True, design: str = "prior",
                  box_sds: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``starts`` best of ``candidates`` design points by log posterior (forward solves only).

    A forward evaluation costs a fraction of a value-and-gradient (~1/4 on the QSP model), so
    screening many points and descending from the best few spends the gradient budget where the
    posterior mass is. The prior centre is always among the candidates (its first row; see
    :func:`design_points`). Returns (chosen (starts, D), candidates (C, D), their log posteriors
    (C,); non-finite = -inf).
    """
    from tqdm import tqdm

    cands = design_points(problem, key, candidates, design, box_sds)
    values = []
    for theta in tqdm(cands, desc="screening starts", unit="draw", disable=not progress):
        v = float(problem.log_posterior(jnp.asarray(theta)))
        values.append(v if math.isfinite(v) else -math.inf)
    values = np.asarray(values)
    order = np.argsort(-values, kind="stable")
    return cands[order[:starts]], cands, values


def _descent(problem: Problem, method: str, learning_rate: float, max_linesearch_steps: int = 8):
    """(init, advance) of one optimiser on ``-log_posterior``; ``advance(theta, state, value, grad)``
    takes the log posterior and its gradient at ``theta`` and returns them at the next point.

    ``adam``: optax Adam with ``learning_rate``, one value-and-gradient per step. ``lbfgs``: optax
    L-BFGS with its zoom line search (strong Wolfe), whose accepted point's value and gradient are
    reused, so a step costs as many value-and-gradients as the line search tried (usually 1-2);
    the line search compiles a second copy of the objective inside the update.
    """
    if method == "adam":
        opt = optax.adam(learning_rate)

        @jax.jit
        def update(theta, state, grad):
            updates, state = opt.update(-grad, state, theta)  # ascend the log posterior
            return optax.apply_updates(theta, updates), state

        def advance(theta, state, value, grad):
            theta, state = update(theta, state, grad)
            value, grad = problem.value_and_grad(theta)
            return theta, state, value, grad

        return opt.init, advance
    if method == "lbfgs":
        opt = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=max_linesearch_steps,
                                                                     initial_guess_strategy="one"))
        loss_fn = lambda theta: -problem._log_posterior(theta)

        @jax.jit
        def update(theta, state, loss, grad):
            updates, state = opt.update(grad, state, theta, value=loss, grad=grad, value_fn=loss_fn)
            theta = optax.apply_updates(theta, updates)
            return theta, state, optax.tree_utils.tree_get(state, "value"), optax.tree_utils.tree_get(state, "grad")

        def advance(theta, state, value, grad):
            theta, state, loss, neg_grad = update(theta, state, -value, -grad)
            return theta, state, -loss, -neg_grad

        return opt.init, advance
    from qspjax.errors import QSPValidationError

    raise QSPValidationError("optimizer", "method", method, f"allowed values are {list(OPTIMIZER_METHODS)}")


def calibrate(problem: Problem, key: jax.Array, starts: int = 4, steps: int = 200, learning_rate: float = 0.05,
              patience: int = 25, tolerance: float = 1e-3, initial: np.ndarray | None = None,
              progress: bool = True, screen: int = 0, method: str = "adam", design: str = "prior",
              box_sds: float = 3.0) -> CalibrationResult:
    """Multi-start descent (``method``: ``adam`` or ``lbfgs``, :func:`_descent`) on the negative log
    posterior of ``problem``.

    Starts are ``starts`` design points (:func:`design_points`: ``design`` ``sobol`` over the prior
    box of half-width ``box_sds`` prior sds, or ``prior`` draws), or, with ``screen`` > ``starts``,
    the best ``starts`` of ``screen`` design points (:func:`screen_starts`). ``initial`` (S, D)
    replaces both. Each start
    stops after ``steps`` steps, or when its best loss has not improved by ``tolerance`` (nats) for
    ``patience`` steps; a start whose loss turns non-finite is stopped and keeps its best finite point.
    """
    from tqdm import tqdm

    init, advance = _descent(problem, method, learning_rate)
    screened = None
    if initial is not None:
        inits = np.atleast_2d(np.asarray(initial, float))
    elif screen > starts:
        inits, cands, values = screen_starts(problem, key, starts, screen, progress, design, box_sds)
        screened = {"candidates": cands, "log_posterior": values,
                    "chosen": np.argsort(-values, kind="stable")[:starts]}
    else:
        inits = design_points(problem, key, starts, design, box_sds)

    histories, finals, losses, reasons = [], [], [], []
    bar = tqdm(total=len(inits) * steps, desc=f"calibrating ({method})", unit="step", disable=not progress)
    interrupted = False
    for s, x0 in enumerate(inits):
        theta = jnp.asarray(x0, float)
        best, best_theta, since, history = math.inf, np.asarray(theta), 0, []
        reason = "max_steps"
        try:
            state = init(theta)
            value, grad = problem.value_and_grad(theta)
            for step in range(steps):
                loss = -float(value)
                bar.update(1)
                if not (math.isfinite(loss) and np.all(np.isfinite(np.asarray(grad)))):
                    reason = "non_finite"
                    break
                history.append(loss)
                if loss < best - tolerance:
                    best, best_theta, since = loss, np.asarray(theta), 0
                else:
                    since += 1
                    if loss < best:
                        best, best_theta = loss, np.asarray(theta)
                    if since >= patience:
                        reason = "converged"
                        break
                bar.set_postfix(start=s, loss=f"{best:.3f}")
                if step + 1 < steps:
                    theta, state, value, grad = advance(theta, state, value, grad)
        except KeyboardInterrupt:  # Ctrl-C (SIGINT), seen once the running compiled step returns: keep what was found
            interrupted = True
            reason = "interrupted"
        if history or not interrupted:
            histories.append(history)
            finals.append(best_theta)
            losses.append(best)
            reasons.append(reason)
        if interrupted:
            break
    bar.close()
    if not losses:
        raise KeyboardInterrupt("calibration interrupted before its first evaluation")
    i = int(np.argmin(losses))
    first = np.array([h[0] if h else math.inf for h in histories])
    return CalibrationResult(np.asarray(finals[i]), float(losses[i]), inits, histories, i, np.asarray(finals),
                             screened, interrupted, first, reasons, design, box_sds)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def population_document(problem: Problem, theta, source: str) -> dict:
    """The population file (schema of ``configs/params/population.yaml``) with fitted spreads."""
    sds = np.exp([float(problem.population(jnp.asarray(theta)).log_sd[k]) for k in problem.spec.names])
    spec = problem.spec
    fitted = {p.parameter for p in problem.priors.priors if p.quantity == "sd"}
    variability = {}
    for name, sd in zip(spec.names, sds):
        cv = math.sqrt(math.expm1(sd * sd))  # inverse of vpop's sd = sqrt(log(1 + cv^2))
        entry = {"distribution": spec.distributions[name], "cv": float(round(cv, 6))}
        entry["source"] = f"fitted ({source})" if name in fitted else "population file (not fitted)"
        variability[name] = entry
    tps = {"probabilities": dict(zip(("lt1", "1to49", "ge50"), map(float, spec.tps_probabilities))),
           "pdl1_multiplier": dict(zip(("lt1", "1to49", "ge50"), map(float, spec.tps_multipliers)))}
    return {
        "description": f"calibrated population ({source}); medians in params_fitted.yaml",
        "variability": variability,
        "baseline": {"diameter_cm": {"median": spec.diameter_median_cm, "cv": spec.diameter_cv,
                                     "min": spec.diameter_min_cm, "max": spec.diameter_max_cm},
                     "second_lesion_ratio": {"median": spec.second_lesion_median, "cv": spec.second_lesion_cv},
                     "pdl1_tps": tps},
    }


def parameter_overlay(problem: Problem, theta, source: str) -> dict:
    """A parameter file with the fitted medians in the model's internal units (for ``extra=``)."""
    from qspjax.model.composer import module_param_specs

    specs = module_param_specs()
    natural = problem.natural(np.asarray(theta))
    out = {}
    for p in problem.priors.priors:
        if p.quantity == "median":
            out[p.parameter] = {"value": float(natural[p.id]), "unit": specs[p.parameter].unit,
                                "source": f"fitted ({source})"}
    return {"description": f"fitted population medians ({source})", "parameters": out}


def plot_arms(problem: Problem, theta, path_for) -> list[Path]:
    """One PNG per arm: predicted BOR probabilities and PFS curve against the observed values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = problem.predict(jnp.asarray(theta))
    paths = []
    for i, a in enumerate(problem.arms):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        cats = ["CR", "PR", "SD", "PD", "NE"]
        ax1.bar(cats, 100 * np.asarray(pred.response[i]), color="0.7", label="predicted")
        if a.response_counts is not None:
            ev = sum(a.response_counts)
            ax1.plot(cats[:4], [100 * c / ev for c in a.response_counts], "ko", label="observed")
        elif a.responders is not None:
            ax1.axhline(100 * a.responders / a.n, color="k", ls="--", label="observed ORR")
            ax1.axhline(100 * float(pred.response[i, 0] + pred.response[i, 1]), color="C0", label="predicted ORR")
        ax1.set_ylabel("% of patients")
        ax1.set_title("best overall response")
        ax1.legend(fontsize=7)
        days = problem.assessment_days - a.origin_day
        keep = days >= 0
        curve = np.asarray(pred.pfs[i])[keep] / max(float(pred.pfs[i][np.argmax(keep)]), 1e-12)
        ax2.step(days[keep] / DAYS_PER_MONTH, 100 * curve, where="post", label="predicted")
        if a.pfs_days:
            ax2.plot(np.asarray(a.pfs_days) / DAYS_PER_MONTH, 100 * np.asarray(a.pfs_progression_free) / a.n, "ko",
                     label="observed")
        ax2.set_xlabel("months")
        ax2.set_ylabel("% progression-free")
        ax2.set_ylim(0, 105)
        ax2.legend(fontsize=7)
        fig.suptitle(a.arm_id, fontsize=9)
        fig.tight_layout()
        path = Path(path_for(a.arm_id))
        atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths


def safe_name(arm_id: str) -> str:
    return arm_id.replace(":", "__").replace("/", "_")


def write_calibration(out: Path, problem: Problem, result: CalibrationResult, prov: dict) -> dict[str, Path]:
    """Write population_fitted.yaml, params_fitted.yaml, loss_history.json, fit_<arm>.png, run.json,
    starts.csv, waterfall.png and best_starts.png (:mod:`qspjax.inference.multistart`)."""
    from qspjax.inference.multistart import write_multistart

    out = Path(out)
    source = f"qspjax fit, {len(problem.arms)} arm(s), loss {result.loss:.3f}"
    files = {
        "population": atomic_write_text(out / "population_fitted.yaml",
                                        yaml.safe_dump(population_document(problem, result.theta, source), sort_keys=False)),
        "params": atomic_write_text(out / "params_fitted.yaml",
                                    yaml.safe_dump(parameter_overlay(problem, result.theta, source), sort_keys=False)),
    }
    history = {"ids": list(problem.ids), "best_start": result.best_start, "best_loss": result.loss,
               "theta": result.theta, "natural": problem.natural(result.theta),
               "starts": result.starts, "finals": result.finals, "loss_history": result.histories,
               "interrupted": result.interrupted, "stop_reasons": result.stop_reasons,
               "design": {"type": result.design, "box_sds": result.box_sds},
               "screened": None if result.screened is None else {
                   "candidates": result.screened["candidates"],
                   "log_posterior": [float(v) if math.isfinite(v) else None for v in result.screened["log_posterior"]]}}
    files["history"] = atomic_write_json(out / "loss_history.json", history)
    plot_arms(problem, result.theta, lambda arm_id: out / f"fit_{safe_name(arm_id)}.png")
    cluster_tolerance = float((prov.get("config") or {}).get("optimizer", {}).get("cluster_tolerance", 0.1))
    files.update(write_multistart(out, problem, result, cluster_tolerance))
    files["run"] = atomic_write_json(out / "run.json", prov)
    return files
