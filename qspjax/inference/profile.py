"""Profile likelihood of the parameters of a fit (``qspjax profile FIT_DIR --out DIR``).

The objective is the fit's own, rebuilt from its ``run.json`` (run file settings, the arms it
fitted, the simulator) and started at its best point (``loss_history.json``): by default the
negative log likelihood (``objective="likelihood"``: what the data say; the priors would bound
every parameter), or the fit's negative log posterior (``objective="posterior"``). First all
parameters are re-optimised from the fit's best point (the profile's reference minimum); then,
for each profiled parameter, its value is stepped away from the optimum in both directions (steps
of ``step`` prior sds, at most ``max_points`` per side, to the edge of the design box: the prior
centre +- ``box_sds`` prior sds), the other parameters re-optimised at each fixed value (L-BFGS-B
within the box, warm-started from the previous point), until the objective has risen by
``max_delta`` nats. Where the profile crosses the chi-square(1) 95 % threshold (1.92 nats above the
minimum) the crossing is refined by root finding, giving the 95 % profile-likelihood interval.

Identifiability reading per parameter: ``identifiable`` (the threshold is crossed on both sides
inside the box), ``practically non-identifiable (lower side|upper side|both sides)`` (the profile
stays below the threshold up to the box edge there), or ``structurally non-identifiable (flat
profile)`` when the objective changes by less than ``FLAT_NATS`` over the whole profiled range.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qspjax.errors import QSPValidationError

THRESHOLD_95 = 0.5 * 3.841458820694124  # chi2(1).ppf(0.95) / 2, in log-likelihood units
FLAT_NATS = 1e-3
OBJECTIVES = ("likelihood", "posterior")

Fun = Callable[[np.ndarray], tuple[float, np.ndarray]]  # theta -> (objective, gradient), to minimise


@dataclass
class Profile:
    parameter: str
    index: int
    values: np.ndarray  # (n,) the fixed values, sorted
    objectives: np.ndarray  # (n,)
    lower: float | None  # 95 % interval ends (None: not crossed inside the box)
    upper: float | None
    box: tuple[float, float]
    optimum: float
    reading: str = ""
    thetas: np.ndarray | None = None  # (n, D) the re-optimised parameters along the profile
    notes: list[str] = field(default_factory=list)


def minimise(fun: Fun, theta0: np.ndarray, bounds: list[tuple[float, float]], fixed: int | None = None,
             maxiter: int = 500) -> tuple[np.ndarray, float]:
    """L-BFGS-B on ``fun`` within ``bounds``, the coordinate ``fixed`` (if any) held at its value."""
    from scipy.optimize import minimize

    theta0 = np.asarray(theta0, float)
    free = [j for j in range(theta0.size) if j != fixed]
    if not free:
        return theta0.copy(), float(fun(theta0)[0])

    def reduced(x):
        theta = theta0.copy()
        theta[free] = x
        value, grad = fun(theta)
        if not math.isfinite(value):
            return 1e300, np.zeros(len(free))
        return value, np.asarray(grad, float)[free]

    res = minimize(reduced, theta0[free], jac=True, method="L-BFGS-B", bounds=[bounds[j] for j in free],
                   options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-9})
    theta = theta0.copy()
    theta[free] = res.x
    return theta, float(res.fun)


def profile_parameter(fun: Fun, theta_hat: np.ndarray, index: int, bounds: list[tuple[float, float]],
                      step: float, max_points: int = 30, max_delta: float = 2 * THRESHOLD_95,
                      f_min: float | None = None, name: str | None = None, refine: bool = True) -> Profile:
    """Profile of coordinate ``index`` of ``fun`` around its minimum ``theta_hat`` (see the module)."""
    theta_hat = np.asarray(theta_hat, float)
    if f_min is None:
        f_min = float(fun(theta_hat)[0])
    lo_box, hi_box = bounds[index]
    points = {float(theta_hat[index]): (f_min, theta_hat.copy())}

    def at(x, warm):
        theta = warm.copy()
        theta[index] = x
        return minimise(fun, theta, bounds, fixed=index)

    for direction, edge in ((-1, lo_box), (+1, hi_box)):
        x, warm = float(theta_hat[index]), theta_hat.copy()
        for _ in range(max_points):
            if (x - edge) * direction >= 0:  # at the box edge
                break
            x_new = x + direction * step
            x_new = max(x_new, edge) if direction < 0 else min(x_new, edge)
            theta, f = at(x_new, warm)
            points[x_new] = (f, theta)
            x, warm = x_new, theta
            if f - f_min > max_delta:
                break
    xs = np.array(sorted(points))
    fs = np.array([points[x][0] for x in xs])
    thetas = np.array([points[x][1] for x in xs])
    prof = Profile(name or str(index), index, xs, fs, None, None, (lo_box, hi_box), float(theta_hat[index]),
                   thetas=thetas)
    f_ref = min(float(np.min(fs)), f_min)
    if f_ref < f_min - 1e-6:
        prof.notes.append(f"a lower objective ({f_ref:.6g} < {f_min:.6g}) was found along the profile: "
                          "the starting point was not the optimum; deltas are to the lowest value")
    delta = fs - f_ref
    x_best = float(xs[int(np.argmin(fs))]) if f_ref < f_min else float(theta_hat[index])
    for direction in (-1, +1):
        order = [k for k in np.argsort(xs * direction) if xs[k] * direction >= x_best * direction]
        for k_in, k_out in zip(order, order[1:]):
            if delta[k_in] < THRESHOLD_95 <= delta[k_out]:
                a_, b_ = float(xs[k_in]), float(xs[k_out])
                end = _crossing(lambda z: at(z, thetas[k_in])[1] - f_ref - THRESHOLD_95, a_, b_) if refine else (
                    a_ + (THRESHOLD_95 - delta[k_in]) / (delta[k_out] - delta[k_in]) * (b_ - a_))
                if direction < 0:
                    prof.lower = end
                else:
                    prof.upper = end
                break
    prof.reading = reading(prof, delta)
    return prof


def _crossing(g: Callable[[float], float], a: float, b: float) -> float:
    from scipy.optimize import brentq

    try:
        return float(brentq(g, a, b, xtol=1e-8, rtol=1e-10, maxiter=60))
    except ValueError:  # no sign change after re-optimising (noisy objective): the grid point
        return float(b)


def reading(prof: Profile, delta: np.ndarray) -> str:
    if float(np.max(delta)) < FLAT_NATS:
        return "structurally non-identifiable (flat profile)"
    missing = [side for side, end in (("lower side", prof.lower), ("upper side", prof.upper)) if end is None]
    if not missing:
        return "identifiable"
    return f"practically non-identifiable ({missing[0] if len(missing) == 1 else 'both sides'})"


# ---------------------------------------------------------------------------------------------
# A fit's objective, rebuilt from its output folder
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise QSPValidationError(path, "(file)", str(path), "no such file: FIT_DIR must be a `qspjax fit` output folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QSPValidationError(path, "(file)", str(path), f"is not valid JSON: {exc}") from None


def problem_from_fit(fit_dir: str | Path):
    """(problem, best theta (D,), run.json's config) of a fit output folder."""
    import dataclasses

    from qspjax.data.trials import load_trials
    from qspjax.inference import config as C
    from qspjax.inference.likelihood import build_problem
    from qspjax.params import load_parameters
    from qspjax.vpop import load_population

    fit_dir = Path(fit_dir)
    if not fit_dir.is_dir():
        raise QSPValidationError("command line", "FIT_DIR", str(fit_dir), "no such folder")
    run_path = fit_dir / "run.json"
    conf = _read_json(run_path).get("config")
    if not isinstance(conf, dict) or not isinstance(conf.get("arms"), list) or "priors" not in conf:
        raise QSPValidationError(run_path, "config", type(conf).__name__,
                                 "a `qspjax fit` run record (config with priors and the fitted arm ids)")
    simulator = conf.get("simulator", "qsp")
    if simulator not in ("qsp", "kinetics"):
        raise QSPValidationError(run_path, "config.simulator", simulator, "allowed values are ['qsp', 'kinetics']")

    def path_of(key):
        value = conf.get(key)
        if value is None:
            return None
        p = C.resolve_path(value, fit_dir)
        if not p.exists():
            raise QSPValidationError(run_path, f"config.{key}", value, "no such file")
        return p

    lik_doc = dict(conf.get("likelihood") or {})
    lesions = tuple(lik_doc.pop("target_lesions", C.LikelihoodSettings.target_lesions))
    lik = C._section(run_path, {"likelihood": lik_doc}, "likelihood", C.LikelihoodSettings, C._LIK_RULES)
    lik = dataclasses.replace(lik, target_lesions=lesions)
    params = load_parameters(path_of("params"))
    spec = load_population(path_of("population"))
    trials = load_trials(path_of("trials"))
    priors = C.load_priors(path_of("priors"), spec.names)
    endpoints = tuple(conf.get("endpoints") or C.ENDPOINTS)
    known = {a.arm_id for a in trials.arms}
    for j, arm_id in enumerate(conf["arms"]):
        if arm_id not in known:
            raise QSPValidationError(run_path, f"config.arms[{j}]", arm_id, "unknown arm id (see `qspjax trials list`)")
    problem = build_problem(conf["arms"], trials, priors, params, spec, lik, endpoints, simulator)
    history_path = fit_dir / "loss_history.json"
    history = _read_json(history_path)
    if list(history.get("ids", [])) != list(problem.ids):
        raise QSPValidationError(history_path, "ids", history.get("ids"), f"the fit's priors estimate {list(problem.ids)}")
    return problem, np.asarray(history["theta"], float), conf


def objective_of(problem, objective: str) -> Fun:
    """``theta -> (value, gradient)`` (numpy, float64) of the negative log likelihood or posterior."""
    import jax
    import jax.numpy as jnp

    target = problem._log_likelihood if objective == "likelihood" else problem._log_posterior
    vg = jax.jit(jax.value_and_grad(lambda th: -target(th)))

    def fun(theta):
        value, grad = vg(jnp.asarray(theta, float))
        return float(value), np.asarray(grad, float)

    return fun


def profile_fit(fit_dir, parameters: list[str] | None = None, objective: str = "likelihood", step: float = 0.1,
                max_points: int = 30, max_delta: float = 2 * THRESHOLD_95, box_sds: float | None = None):
    """Profiles of ``parameters`` (default: all) of the fit in ``fit_dir``; returns (profiles, info)."""
    problem, theta_fit, conf = problem_from_fit(fit_dir)
    ids = list(problem.ids)
    check_arguments(ids, parameters, objective, step, max_points, max_delta, box_sds)
    if box_sds is None:
        box_sds = float((conf.get("optimizer") or {}).get("box_sds", 3.0))
    mu, sd = problem.prior_means(), problem.prior_sds()
    bounds = [(float(m - box_sds * s), float(m + box_sds * s)) for m, s in zip(mu, sd)]
    fun = objective_of(problem, objective)
    start = np.clip(theta_fit, [b[0] for b in bounds], [b[1] for b in bounds])
    theta_hat, f_min = minimise(fun, start, bounds)
    profiles = []
    for name in parameters or ids:
        i = ids.index(name)
        profiles.append(profile_parameter(fun, theta_hat, i, bounds, step * float(sd[i]), max_points, max_delta,
                                          f_min, name))
    info = {"objective": objective, "minimum": f_min, "theta_at_minimum": dict(zip(ids, map(float, theta_hat))),
            "fit_theta": dict(zip(ids, map(float, theta_fit))), "box_sds": box_sds, "step_prior_sds": step,
            "threshold_nats": THRESHOLD_95, "simulator": conf.get("simulator", "qsp")}
    return profiles, info


def check_arguments(ids, parameters, objective, step, max_points, max_delta, box_sds) -> None:
    for j, name in enumerate(parameters or []):
        if name not in ids:
            raise QSPValidationError("command line", "--parameters", name, f"allowed: the fit's parameters {ids}")
    if objective not in OBJECTIVES:
        raise QSPValidationError("command line", "--objective", objective, f"allowed values are {list(OBJECTIVES)}")
    if not (isinstance(step, (int, float)) and math.isfinite(step) and 0 < step <= 5):
        raise QSPValidationError("command line", "--step", step, "a number of prior sds in (0, 5] is required")
    if not (isinstance(max_points, int) and 1 <= max_points <= 1000):
        raise QSPValidationError("command line", "--max-points", max_points, "an integer in [1, 1000] is required")
    if not (isinstance(max_delta, (int, float)) and math.isfinite(max_delta) and max_delta > THRESHOLD_95):
        raise QSPValidationError("command line", "--max-delta", max_delta,
                                 f"a number of nats above the 95 % threshold {THRESHOLD_95:.4f} is required")
    if box_sds is not None and not (isinstance(box_sds, (int, float)) and math.isfinite(box_sds) and 0 < box_sds <= 10):
        raise QSPValidationError("command line", "--box-sds", box_sds, "a number of prior sds in (0, 10] is required")


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def _minimum_of(profiles, info) -> float:
    return min([info["minimum"]] + [float(np.min(p.objectives)) for p in profiles])


def write_profiles(out: Path, profiles: list[Profile], info: dict) -> dict[str, Path]:
    """``profiles.csv``, ``profile_<parameter>.png`` and ``profiles.json`` in ``out``."""
    import csv
    import io

    from qspjax.io import atomic_write_json, atomic_write_text

    out = Path(out)
    f_min = _minimum_of(profiles, info)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["parameter", "value", "objective", "delta"])
    for p in profiles:
        for x, f in zip(p.values, p.objectives):
            w.writerow([p.parameter, repr(float(x)), repr(float(f)), repr(float(f - f_min))])
    files = {"csv": atomic_write_text(out / "profiles.csv", buf.getvalue())}
    for p in profiles:
        files[f"png:{p.parameter}"] = plot_profile(p, f_min, info, out / f"profile_{_safe(p.parameter)}.png")
    doc = dict(info)
    doc["minimum"] = f_min
    for p in profiles:  # a profile point below the re-optimised fit is the better minimum: report its parameters
        k = int(np.argmin(p.objectives))
        if p.thetas is not None and float(p.objectives[k]) == f_min and f_min < info["minimum"]:
            doc["theta_at_minimum"] = dict(zip(info["theta_at_minimum"], map(float, p.thetas[k])))
            doc["minimum_found_on_profile_of"] = p.parameter
    doc["parameters"] = {p.parameter: {
        "reading": p.reading, "identifiable": p.reading == "identifiable",
        "optimum": p.optimum, "interval_95": [p.lower, p.upper], "box": list(p.box),
        "points": int(p.values.size), "max_delta": float(np.max(p.objectives) - f_min), "notes": p.notes}
        for p in profiles}
    files["json"] = atomic_write_json(out / "profiles.json", doc)
    return files


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def plot_profile(p: Profile, f_min: float, info: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qspjax.io import atomic_write

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(p.values, p.objectives - f_min, "o-", ms=3, color="C0", label=f"profile ({info['objective']})")
    ax.axhline(THRESHOLD_95, color="C3", ls="--", lw=1, label="95 % threshold (1.92, chi-square(1))")
    for end in (p.lower, p.upper):
        if end is not None:
            ax.axvline(end, color="C3", lw=0.8, ls=":")
    ax.axvline(p.optimum, color="0.5", lw=0.8)
    for edge in p.box:
        ax.axvspan(edge, edge, color="k")
    ax.set_xlim(min(p.box[0], p.values.min()), max(p.box[1], p.values.max()))
    ax.set_xlabel(f"{p.parameter} (unconstrained scale; design box {p.box[0]:.3g} to {p.box[1]:.3g})")
    ax.set_ylabel("objective - minimum (nats)")
    lo = "-" if p.lower is None else f"{p.lower:.4g}"
    hi = "-" if p.upper is None else f"{p.upper:.4g}"
    ax.set_title(f"{p.parameter}: {p.reading}\n95 % interval [{lo}, {hi}]", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda q: fig.savefig(q, dpi=90, format="png"))
    plt.close(fig)
    return path
