"""Sensitivity of clinical endpoints: global (Sobol, Morris) and local (autodiff) analyses.

Two layers.

**Generic** (any function, no model): :func:`sobol_indices` and :func:`morris_effects` take
``f`` mapping an (n, d) array of inputs to (n,) or (n, k) outputs and a SALib-style ``problem``
(``names``, ``bounds``, optional ``dists``), checked by :func:`check_problem`. SALib is the
engine: Saltelli/Sobol sampling (scrambled Sobol base sequence, no second-order terms) and
``SALib.analyze.sobol`` (Saltelli 2010 first-order, Jansen total-order estimators), with
bootstrap confidence intervals. The convergence check evaluates ``f`` once at 2N base points and
computes the indices from the first N base points and from all 2N (the first N points of a Sobol
sequence are themselves a Sobol set): the reported indices are those at 2N, with the largest
change of any index between N and 2N. Cost: 2N (d + 2) evaluations of ``f``.
:func:`local_sensitivities` gives normalised sensitivities d log(output) / d log(parameter) of
a JAX function by one reverse-mode pass per output (vector-Jacobian products), ranked;
:func:`finite_difference_sensitivities` is the central-difference check.

**Model-facing**: an analysis file (YAML) names the model, a fixed virtual cohort, the
regimen(s), the parameters with ranges or distributions, and the outputs; :func:`load_analysis`
validates it (a :class:`~qspjax.errors.QSPValidationError` names the file, the field, the value
and what is allowed) and :class:`EndpointModel` maps parameter vectors to outputs with the
smooth RECIST endpoints of :mod:`qspjax.outcomes`, differentiably. Schema::

    description: free text
    model:                                   # all optional; the default is the calibrated model
      params: configs/params/qspio_example1.yaml
      params_extra: [configs/params/calibrated/library_params.yaml]
      population: configs/params/calibrated/library_population.yaml
      simulator: qsp                         # or kinetics (closed-form surrogate, for tests)
    cohort: {patients: 16, seed: 0}          # one fixed cohort (common random numbers)
    simulation: {days: 400, output_every: 1, rtol: 1.0e-5}
    assessment: {interval_days: 56, target: all, temperature: 0.05, death_rate_per_day: 0}
    regimens:                                # id -> a regimen file, an experiment protocol or inline
      nivo: configs/regimens/nivolumab_240mg_q2w.yaml
      rt_nivo: {experiment: configs/experiments/rt_nivolumab_protocols.yaml, protocol: conc_3x8_nivo}
      inline: {regimen: {name: ..., ici: [...], rt: [...]}}
    parameters:
      - {name: k_C_T1, range: [10, 90], scale: log}          # population median (all patients)
      - {name: k_C1_growth, quantity: cv, range: [0.1, 0.5], scale: linear}   # between-patient CV
      - {name: k_cl_nivolumab, distribution: lognormal, median: 0.2, sd_log: 0.3}
      - {name: alpha_tumor, distribution: normal, mean: 0.4, sd: 0.05}
    outputs:
      - {id: orr_nivo, regimen: nivo, endpoint: orr}          # orr, dcr, cr, pd: P(best response)
      - {id: pfs6_nivo, regimen: nivo, endpoint: pfs, day: 182}
      - {id: gain, difference: [orr_rt_nivo, orr_nivo]}       # a - b of two other outputs
      - {id: d_p0, regimen: nivo, state: tumor_diameter_cm, day: 28, patient: 0, lesion: non_irradiated}
    global: {methods: [sobol, morris], n: 16, seed: 0, num_resamples: 200, conf_level: 0.95,
             batch: 4, morris: {trajectories: 10, levels: 4}}
    local: {parameters: all}                 # or a list of model parameter names, or false

Parameters. ``quantity: median`` (default) sets the median of a parameter: for a parameter the
population file varies between patients every patient's value moves with it (lognormal: scaled;
logitnormal: shifted on the logit scale); for any other model parameter (drug PK such as
``k_cl_nivolumab``, radiotherapy such as ``alpha_beta_tumor``) it is the value of every patient.
``quantity: cv`` sets the between-patient CV of a varied parameter (as in the population file).
A range is sampled uniformly on ``scale`` (``log``, the default, or ``linear``); distributions
are ``normal`` (``mean``, ``sd``) and ``lognormal`` (``median``, ``sd_log``). Morris needs
ranges: a distribution enters Morris screening as its 2.5-97.5 % quantile range. The local
analysis is taken at the nominal point: the parameter files' values (an analysis parameter at its
file value, or the range's geometric/arithmetic middle if the file value is outside the range).

Outputs. ``orr`` = P(CR) + P(PR), ``dcr`` = P(CR) + P(PR) + P(SD), ``cr``, ``pd``: cohort means
of :func:`qspjax.outcomes.soft_best_response_probabilities`; ``pfs``: the cohort mean of
:func:`qspjax.outcomes.soft_progression_free_probability` at ``day`` (counted from day 0 of the
regimen). The smooth endpoints converge to the hard RECIST reads as ``temperature`` goes to zero
and are used for the global analysis too (one evaluator, differentiable for the local part).
``state``: an observable of :data:`qspjax.runner.OBSERVABLES` of one ``patient`` (index) or the
cohort ``mean`` at ``day`` in one lesion; the kinetics simulator has only ``tumor_diameter_cm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qspjax.errors import QSPValidationError

SALIB_DISTS = ("unif", "norm", "lognorm")
SCALES = ("log", "linear")
QUANTITIES = ("median", "cv")
DISTRIBUTIONS = ("normal", "lognormal")
ENDPOINTS = ("orr", "dcr", "cr", "pd", "pfs")
METHODS = ("sobol", "morris")
SIMULATORS = ("qsp", "kinetics")
LESION_NAMES = ("irradiated", "non_irradiated")
DEFAULT_PARAMS = "configs/params/qspio_example1.yaml"
DEFAULT_PARAMS_EXTRA = ("configs/params/calibrated/library_params.yaml",)
DEFAULT_POPULATION = "configs/params/calibrated/library_population.yaml"


# ---------------------------------------------------------------------------------------------
# Problems (SALib-style dicts)
# ---------------------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)


def check_problem(problem: Any, source: str = "problem") -> dict[str, Any]:
    """Validate a SALib-style problem and return it normalised (``num_vars``, float bounds, ``dists``).

    ``names``: unique non-empty strings; ``bounds``: one ``[lo, hi]`` per name, finite, ``lo < hi``
    for ``unif`` (the default); ``[mean, sd]`` with ``sd > 0`` for ``norm``; ``[mean, sd]`` of the
    log for ``lognorm``. Raises :class:`QSPValidationError` naming ``source``, the field and value.
    """
    def fail(where, value, allowed):
        raise QSPValidationError(source, where, value, allowed)

    if not isinstance(problem, Mapping):
        fail("(problem)", problem, "a mapping with 'names' and 'bounds' is required")
    extra = sorted(set(problem) - {"names", "bounds", "dists", "num_vars", "outputs"})
    if extra:
        fail(extra[0], problem[extra[0]], "unknown key; allowed: ['bounds', 'dists', 'names', 'num_vars', 'outputs']")
    names = problem.get("names")
    if not isinstance(names, (list, tuple)) or not names:
        fail("names", names, "a non-empty list of parameter names is required")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            fail(f"names[{i}]", name, "a non-empty string is required")
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        fail("names", dup[0], "names must be unique")
    d = len(names)
    if "num_vars" in problem and problem["num_vars"] != d:
        fail("num_vars", problem["num_vars"], f"must equal the number of names ({d})")
    dists = problem.get("dists") or ["unif"] * d
    if not isinstance(dists, (list, tuple)) or len(dists) != d:
        fail("dists", dists, f"a list of {d} distribution names from {list(SALIB_DISTS)} is required")
    bounds = problem.get("bounds")
    if not isinstance(bounds, (list, tuple, np.ndarray)) or len(bounds) != d:
        fail("bounds", bounds, f"a list of {d} [lo, hi] pairs (one per name) is required")
    out_bounds = []
    for i, (name, dist, b) in enumerate(zip(names, dists, bounds)):
        if dist not in SALIB_DISTS:
            fail(f"dists[{i}]", dist, f"allowed values are {list(SALIB_DISTS)}")
        if not isinstance(b, (list, tuple, np.ndarray)) or len(b) != 2 or not all(_finite(x) for x in b):
            fail(f"bounds[{i}] ({name})", b, "a pair of finite numbers is required")
        lo, hi = float(b[0]), float(b[1])
        if dist == "unif" and not lo < hi:
            fail(f"bounds[{i}] ({name})", list(b), "an interval [lo, hi] with lo < hi is required (empty or inverted)")
        if dist in ("norm", "lognorm") and not hi > 0:
            fail(f"bounds[{i}] ({name})", list(b), f"[mean, sd] with sd > 0 is required for '{dist}'")
        out_bounds.append([lo, hi])
    return {"names": list(names), "num_vars": d, "bounds": out_bounds, "dists": list(dists)}


def _evaluate(f: Callable, x: np.ndarray) -> np.ndarray:
    y = np.asarray(f(x), dtype=float)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"f returned shape {y.shape} for inputs of shape {x.shape}; expected (n,) or (n, k)")
    bad = ~np.all(np.isfinite(y), axis=1)
    if bad.any():
        raise FloatingPointError(f"f returned non-finite outputs for {int(bad.sum())} of {len(y)} input rows "
                                 f"(first: row {int(np.flatnonzero(bad)[0])})")
    return y


def _output_names(names: Sequence[str] | None, k: int) -> list[str]:
    if names is None:
        return [f"y{i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} output names for {k} outputs")
    return list(names)


# ---------------------------------------------------------------------------------------------
# Sobol indices
# ---------------------------------------------------------------------------------------------
@dataclass
class SobolResult:
    """First-order (``S1``) and total (``ST``) indices (outputs, params) at 2N base points, their
    bootstrap half-widths (``*_conf``, ``conf_level``), the indices from the first N base points
    (``S1_half``, ``ST_half``) and ``max_change`` (outputs,): the largest |index(2N) - index(N)|."""

    names: list[str]
    outputs: list[str]
    S1: np.ndarray
    S1_conf: np.ndarray
    ST: np.ndarray
    ST_conf: np.ndarray
    S1_half: np.ndarray
    ST_half: np.ndarray
    max_change: np.ndarray
    n: int
    n_evaluations: int
    conf_level: float
    constant: np.ndarray  # (outputs,) True where the output did not vary (indices set to 0)
    X: np.ndarray | None = None
    Y: np.ndarray | None = None

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for k, o in enumerate(self.outputs):
            for j, p in enumerate(self.names):
                out.append({"output": o, "parameter": p, "method": "sobol",
                            "S1": self.S1[k, j], "S1_conf": self.S1_conf[k, j],
                            "ST": self.ST[k, j], "ST_conf": self.ST_conf[k, j],
                            "max_change_N_2N": self.max_change[k]})
        return out


def _sobol_one(problem, y, num_resamples, conf_level, seed):
    from SALib.analyze import sobol as sobol_analyze

    if np.ptp(y) <= 1e-14 * max(1.0, float(np.max(np.abs(y)))):
        z = np.zeros(problem["num_vars"])
        return z, z, z, z, True
    r = sobol_analyze.analyze(problem, y, calc_second_order=False, num_resamples=num_resamples,
                              conf_level=conf_level, seed=seed)
    return (np.asarray(r["S1"]), np.asarray(r["S1_conf"]), np.asarray(r["ST"]), np.asarray(r["ST_conf"]), False)


def sobol_indices(
    f: Callable[[np.ndarray], Any],
    problem: Mapping[str, Any],
    n: int,
    seed: int = 0,
    *,
    num_resamples: int = 200,
    conf_level: float = 0.95,
    output_names: Sequence[str] | None = None,
    keep_samples: bool = False,
) -> SobolResult:
    """First-order and total Sobol indices of every output of ``f`` over ``problem``.

    ``f`` maps an (m, d) array to (m,) or (m, k). ``n`` is the base sample size N (a power of 2
    keeps the Sobol sequence balanced); ``f`` is evaluated once on 2N (d + 2) rows, and the
    indices are reported at 2N with the change from N (see the module docstring). Bootstrap
    intervals use ``num_resamples`` resamples at ``conf_level``; ``seed`` fixes the sample and the
    bootstrap. An output that does not vary gets indices 0 (``constant``).
    """
    from SALib.sample import sobol as sobol_sample

    problem = check_problem(problem)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise QSPValidationError("sobol_indices", "n", n, "an integer >= 2 is required")
    d = problem["num_vars"]
    x = sobol_sample.sample(problem, 2 * n, calc_second_order=False, scramble=True, seed=seed)
    y = _evaluate(f, x)
    k = y.shape[1]
    half = n * (d + 2)
    res = {key: np.zeros((k, d)) for key in ("S1", "S1_conf", "ST", "ST_conf", "S1_half", "ST_half")}
    constant = np.zeros(k, bool)
    for i in range(k):
        s1, s1c, st, stc, const = _sobol_one(problem, y[:, i], num_resamples, conf_level, seed)
        s1h, _, sth, _, _ = _sobol_one(problem, y[:half, i], num_resamples, conf_level, seed)
        res["S1"][i], res["S1_conf"][i], res["ST"][i], res["ST_conf"][i] = s1, s1c, st, stc
        res["S1_half"][i], res["ST_half"][i] = s1h, sth
        constant[i] = const
    change = np.maximum(np.abs(res["S1"] - res["S1_half"]).max(axis=1), np.abs(res["ST"] - res["ST_half"]).max(axis=1))
    return SobolResult(problem["names"], _output_names(output_names, k), res["S1"], res["S1_conf"], res["ST"],
                       res["ST_conf"], res["S1_half"], res["ST_half"], change, 2 * n, int(x.shape[0]), conf_level,
                       constant, x if keep_samples else None, y if keep_samples else None)


# ---------------------------------------------------------------------------------------------
# Morris elementary effects
# ---------------------------------------------------------------------------------------------
@dataclass
class MorrisResult:
    """Morris screening per output (outputs, params): ``mu``, ``mu_star`` (mean |elementary
    effect|), its bootstrap half-width ``mu_star_conf`` and ``sigma`` (sd of the effects)."""

    names: list[str]
    outputs: list[str]
    mu: np.ndarray
    mu_star: np.ndarray
    mu_star_conf: np.ndarray
    sigma: np.ndarray
    trajectories: int
    levels: int
    n_evaluations: int

    def rows(self) -> list[dict[str, Any]]:
        return [{"output": o, "parameter": p, "method": "morris", "mu": self.mu[k, j],
                 "mu_star": self.mu_star[k, j], "mu_star_conf": self.mu_star_conf[k, j], "sigma": self.sigma[k, j]}
                for k, o in enumerate(self.outputs) for j, p in enumerate(self.names)]


def morris_effects(
    f: Callable[[np.ndarray], Any],
    problem: Mapping[str, Any],
    trajectories: int = 10,
    levels: int = 4,
    seed: int = 0,
    *,
    num_resamples: int = 200,
    conf_level: float = 0.95,
    output_names: Sequence[str] | None = None,
) -> MorrisResult:
    """Morris elementary effects of every output of ``f`` over ``problem`` (uniform ranges only).

    ``trajectories`` one-at-a-time paths on a grid of ``levels`` (even) levels; cost
    ``trajectories * (d + 1)`` evaluations. Effects are in output units per unit of the input
    as sampled (so a log-scale range gives effects per unit of log parameter).
    """
    from SALib.analyze import morris as morris_analyze
    from SALib.sample import morris as morris_sample

    problem = check_problem(problem)
    bad = [n for n, dist in zip(problem["names"], problem["dists"]) if dist != "unif"]
    if bad:
        raise QSPValidationError("morris_effects", "dists", bad[0], "Morris screening needs uniform ranges ('unif')")
    for key, value, lo in (("trajectories", trajectories, 2), ("levels", levels, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise QSPValidationError("morris_effects", key, value, f"an integer >= {lo} is required")
    if levels % 2:
        raise QSPValidationError("morris_effects", "levels", levels, "an even number of levels is required")
    uniform = {"names": problem["names"], "num_vars": problem["num_vars"], "bounds": problem["bounds"]}
    x = morris_sample.sample(uniform, int(trajectories), num_levels=int(levels), seed=seed)
    y = _evaluate(f, x)
    k, d = y.shape[1], problem["num_vars"]
    res = {key: np.zeros((k, d)) for key in ("mu", "mu_star", "mu_star_conf", "sigma")}
    for i in range(k):
        r = morris_analyze.analyze(uniform, x, y[:, i], num_resamples=num_resamples, conf_level=conf_level,
                                   num_levels=int(levels), seed=seed)
        for key in res:
            res[key][i] = np.asarray(r[key], dtype=float)
    return MorrisResult(problem["names"], _output_names(output_names, k), res["mu"], res["mu_star"],
                        res["mu_star_conf"], res["sigma"], int(trajectories), int(levels), int(x.shape[0]))


# ---------------------------------------------------------------------------------------------
# Local (autodiff) sensitivities
# ---------------------------------------------------------------------------------------------
@dataclass
class LocalResult:
    """Normalised local sensitivities at a point: ``sensitivity`` (outputs, params) =
    d log(output) / d log(parameter) (NaN where the output is 0), ``derivative`` = d output /
    d log(parameter), the ``values`` of the outputs there and ``params`` (the point).
    ``absolute`` (outputs,) marks outputs read as ``derivative`` (differences such as an ORR gain,
    which may be near 0 or change sign, so a relative change means nothing); the others are read
    as ``sensitivity`` unless their value is 0."""

    names: list[str]
    outputs: list[str]
    values: np.ndarray
    derivative: np.ndarray
    sensitivity: np.ndarray
    params: np.ndarray
    absolute: np.ndarray | None = None

    def measure(self, k: int) -> str:
        """What output ``k`` is ranked on: ``dlog_output_dlog_parameter`` or ``doutput_dlog_parameter``."""
        absolute = self.absolute is not None and bool(self.absolute[k])
        if absolute or not np.isfinite(self.values[k]) or self.values[k] == 0:
            return "doutput_dlog_parameter"
        return "dlog_output_dlog_parameter"

    def ranked(self, output: int | str) -> list[tuple[str, float]]:
        """(parameter, sensitivity) of one output, largest |sensitivity| first (|derivative| where
        the output is 0)."""
        k = self.outputs.index(output) if isinstance(output, str) else output
        key = self.sensitivity[k] if self.measure(k) == "dlog_output_dlog_parameter" else self.derivative[k]
        order = np.argsort(-np.abs(np.nan_to_num(key)), kind="stable")
        return [(self.names[j], float(key[j])) for j in order]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for k, o in enumerate(self.outputs):
            for rank, (p, v) in enumerate(self.ranked(k), start=1):
                j = self.names.index(p)
                out.append({"output": o, "parameter": p, "sensitivity": v, "measure": self.measure(k),
                            "dlog_output_dlog_parameter": self.sensitivity[k, j],
                            "doutput_dlog_parameter": self.derivative[k, j], "output_value": self.values[k],
                            "parameter_value": self.params[j], "rank": rank})
        return out


def _normalise(values, derivative):
    values = np.asarray(values, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(values[:, None] != 0, derivative / values[:, None], np.nan)
    return sens


def local_sensitivities(
    g: Callable[[jax.Array], jax.Array],
    params: Sequence[float],
    names: Sequence[str],
    output_names: Sequence[str] | None = None,
    absolute: Sequence[bool] | None = None,
) -> LocalResult:
    """d log(output) / d log(parameter) of a JAX function ``g`` (positive params (m,) -> outputs (k,))
    at ``params``, by reverse mode: the vector-Jacobian product of ``u -> g(params * exp(u))`` at
    u = 0 with each output's unit vector (one reverse pass per output, all parameters at once).
    ``absolute`` marks outputs to rank on d output / d log(parameter) (see :class:`LocalResult`)."""
    p0 = jnp.asarray(params, dtype=float)
    if p0.ndim != 1 or p0.shape[0] != len(names):
        raise ValueError(f"{p0.shape} parameters for {len(names)} names")
    if not bool(jnp.all(p0 > 0)):
        raise QSPValidationError("local_sensitivities", "params", np.asarray(p0).tolist(),
                                 "log-sensitivities need positive parameter values")

    def h(u):
        return jnp.atleast_1d(g(p0 * jnp.exp(u)))

    u0 = jnp.zeros_like(p0)
    values, vjp = jax.vjp(h, u0)
    k = values.shape[0]
    # One reverse pass after another, not vmapped: a vmap runs the k passes side by side and
    # multiplies the peak memory of the backward solves by k (the shipped 6-output analysis was
    # killed for memory at 9.7 GB that way on a shared 24 GB machine).
    # (the pullback is a pytree of residuals: passed as an argument, not baked in as constants)
    pullback = jax.jit(lambda f, e: f(e)[0])
    derivative = jnp.stack([pullback(vjp, e) for e in jnp.eye(k, dtype=values.dtype)])
    values, derivative = np.asarray(values), np.asarray(derivative)
    return LocalResult(list(names), _output_names(output_names, k), values, derivative,
                       _normalise(values, derivative), np.asarray(p0),
                       None if absolute is None else np.asarray(absolute, bool))


def finite_difference_sensitivities(
    g: Callable[[jax.Array], jax.Array], params: Sequence[float], rel_step: float = 1e-4,
    which: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Central finite differences in log-parameter: (d output / d log p (k, m), d log output /
    d log p (k, m)); ``which`` restricts to some parameter indices (the others are NaN)."""
    p0 = np.asarray(params, dtype=float)
    y0 = np.atleast_1d(np.asarray(g(jnp.asarray(p0)), float))
    deriv = np.full((y0.shape[0], p0.shape[0]), np.nan)
    for j in (range(p0.shape[0]) if which is None else which):
        up, down = p0.copy(), p0.copy()
        up[j] *= math.exp(rel_step)
        down[j] *= math.exp(-rel_step)
        yu = np.atleast_1d(np.asarray(g(jnp.asarray(up)), float))
        yd = np.atleast_1d(np.asarray(g(jnp.asarray(down)), float))
        deriv[:, j] = (yu - yd) / (2 * rel_step)
    return deriv, _normalise(y0, deriv)


# ---------------------------------------------------------------------------------------------
# Analysis files
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Factor:
    """One analysed parameter: ``name`` (model parameter), ``quantity`` (median or cv), sampled
    uniformly on ``scale`` over ``range`` or from ``distribution`` with ``dist_params``."""

    name: str
    quantity: str = "median"
    range: tuple[float, float] | None = None
    scale: str = "log"
    distribution: str | None = None
    dist_params: tuple[float, float] | None = None

    @property
    def id(self) -> str:
        return self.name if self.quantity == "median" else f"{self.name}.{self.quantity}"

    def salib(self) -> tuple[str, list[float]]:
        """(SALib dist, bounds) on the sampling scale."""
        if self.distribution == "normal":
            return "norm", list(self.dist_params)
        if self.distribution == "lognormal":
            return "norm", [math.log(self.dist_params[0]), self.dist_params[1]]  # sampled as log, then exp
        lo, hi = self.range
        return "unif", ([math.log(lo), math.log(hi)] if self.scale == "log" else [lo, hi])

    @property
    def log_sampled(self) -> bool:
        return self.distribution == "lognormal" or (self.distribution is None and self.scale == "log")

    def quantile_range(self) -> list[float]:
        """Morris range on the sampling scale: the range, or the 2.5-97.5 % quantiles."""
        dist, b = self.salib()
        return b if dist == "unif" else [b[0] - 1.959963984540054 * b[1], b[0] + 1.959963984540054 * b[1]]


@dataclass(frozen=True)
class Output:
    """An output: an ``endpoint`` of a ``regimen`` (``day`` for pfs), a ``state`` of a patient,
    or the ``difference`` of two other outputs."""

    id: str
    regimen: str | None = None
    endpoint: str | None = None
    day: float | None = None
    state: str | None = None
    patient: int | str | None = None
    lesion: str = "irradiated"
    difference: tuple[str, str] | None = None


@dataclass
class Analysis:
    """A validated analysis file (see the module docstring)."""

    path: str
    description: str
    params_file: str
    params_extra: tuple[str, ...]
    population_file: str
    simulator: str
    patients: int
    cohort_seed: int
    days: float
    output_every: float
    rtol: float
    assessment: dict[str, Any]
    regimens: dict[str, Any]  # id -> Regimen
    factors: tuple[Factor, ...]
    outputs: tuple[Output, ...]
    methods: tuple[str, ...] = ("sobol",)
    n: int = 16
    seed: int = 0
    num_resamples: int = 200
    conf_level: float = 0.95
    batch: int = 4
    morris_trajectories: int = 10
    morris_levels: int = 4
    local: Any = "all"
    raw: dict = field(default_factory=dict)

    def problem(self) -> dict[str, Any]:
        """The SALib problem on the sampling scale (log for log ranges and lognormals)."""
        pairs = [f.salib() for f in self.factors]
        return {"names": [f.id for f in self.factors], "bounds": [b for _, b in pairs], "dists": [d for d, _ in pairs]}

    def morris_problem(self) -> dict[str, Any]:
        return {"names": [f.id for f in self.factors], "bounds": [f.quantile_range() for f in self.factors]}

    def to_natural(self, x: np.ndarray) -> np.ndarray:
        """Sampled rows (n, d) to parameter values in natural units."""
        x = np.asarray(x, float).copy()
        for j, f in enumerate(self.factors):
            if f.log_sampled:
                x[:, j] = np.exp(x[:, j])
        return x


def _resolve(value: str, relative_to: Path) -> Path:
    from qspjax.inference.config import resolve_path

    return resolve_path(value, relative_to)


def load_analysis(path: str | Path, n: int | None = None, seed: int | None = None) -> Analysis:
    """Read and validate an analysis file; ``n`` and ``seed`` override ``global.n``/``global.seed``.

    Everything is checked before any compute: unknown keys, model parameters and regimens,
    empty or inverted ranges, unknown outputs and endpoints, non-positive sizes. Regimen files,
    parameter files and the population file are loaded (and so validated) here too.
    """
    import yaml

    from qspjax.model.pk import DRUG_PARAMS, KNOWN_DRUGS
    from qspjax.regimen import load_regimen, parse_regimen
    from qspjax.runner import OBSERVABLES
    from qspjax.virtual_trial import TARGET_LESIONS, load_experiment

    path = Path(path)
    src = str(path)

    def fail(where, value, allowed):
        raise QSPValidationError(src, where, value, allowed)

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        fail("(file)", str(path), f"cannot be read: {exc.strerror}")
    except yaml.YAMLError as exc:
        fail("(file)", str(path), "is not valid YAML: " + " ".join(str(exc).split()))
    if not isinstance(doc, Mapping):
        fail("(top level)", doc, "a mapping is required" + (" (the file is empty)" if doc is None else ""))

    def keys(where, value, allowed, required=()):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            fail(where, value, "a mapping is required")
        for k in value:
            if k not in allowed:
                fail(f"{where}.{k}" if where else str(k), value[k], f"unknown key (misspelt?); allowed keys are {list(allowed)}")
        for k in required:
            if k not in value:
                fail(f"{where}.{k}" if where else k, None, "required field is missing")
        return value

    def number(where, value, lo=None, hi=None, positive=False, integer=False):
        ok = _finite(value) and (not integer or float(value).is_integer())
        ok = ok and (not positive or value > 0) and (lo is None or value >= lo) and (hi is None or value <= hi)
        if not ok:
            what = "an integer" if integer else "a finite number"
            cond = " > 0" if positive else ""
            if lo is not None or hi is not None:
                cond += f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            fail(where, value, f"{what}{cond} is required")
        return int(value) if integer else float(value)

    keys("", doc, ("description", "model", "cohort", "simulation", "assessment", "regimens", "parameters",
                   "outputs", "global", "local"), ("regimens", "parameters", "outputs"))
    model = keys("model", doc.get("model"), ("params", "params_extra", "population", "simulator"))
    simulator = model.get("simulator", "qsp")
    if simulator not in SIMULATORS:
        fail("model.simulator", simulator, f"allowed values are {list(SIMULATORS)}")
    params_file = model.get("params", DEFAULT_PARAMS)
    extra = model.get("params_extra", list(DEFAULT_PARAMS_EXTRA))
    if isinstance(extra, str):
        extra = [extra]
    if not isinstance(extra, list) or not all(isinstance(e, str) for e in extra):
        fail("model.params_extra", extra, "a list of parameter file paths is required")
    population_file = model.get("population", DEFAULT_POPULATION)
    for where, value in (("model.params", params_file), ("model.population", population_file)):
        if not isinstance(value, str) or not _resolve(value, path.parent).exists():
            fail(where, value, "an existing file path is required (relative to the analysis file or the repository)")
    for i, e in enumerate(extra):
        if not _resolve(e, path.parent).exists():
            fail(f"model.params_extra[{i}]", e, "an existing file path is required")
    params_file = str(_resolve(params_file, path.parent))
    extra = tuple(str(_resolve(e, path.parent)) for e in extra)
    population_file = str(_resolve(population_file, path.parent))
    from qspjax.params import load_parameters
    from qspjax.vpop import load_population

    params = load_parameters(params_file, extra)
    spec = load_population(population_file)

    cohort = keys("cohort", doc.get("cohort"), ("patients", "seed"))
    patients = number("cohort.patients", cohort.get("patients", 16), 1, 100000, integer=True)
    cohort_seed = number("cohort.seed", cohort.get("seed", 0), 0, integer=True)
    sim = keys("simulation", doc.get("simulation"), ("days", "output_every", "rtol"))
    days = number("simulation.days", sim.get("days", 400), positive=True, hi=1e5)
    output_every = number("simulation.output_every", sim.get("output_every", 1.0), positive=True, hi=days)
    rtol = number("simulation.rtol", sim.get("rtol", 1e-5), positive=True, hi=1e-2)
    assess = keys("assessment", doc.get("assessment"), ("interval_days", "target", "temperature", "death_rate_per_day"))
    assessment = {
        "interval_days": number("assessment.interval_days", assess.get("interval_days", 56.0), positive=True),
        "target": assess.get("target", "all"),
        "temperature": number("assessment.temperature", assess.get("temperature", 0.05), positive=True, hi=10),
        "death_rate_per_day": number("assessment.death_rate_per_day", assess.get("death_rate_per_day", 0.0), lo=0),
    }
    if assessment["target"] not in TARGET_LESIONS:
        fail("assessment.target", assessment["target"], f"allowed values are {list(TARGET_LESIONS)}")

    regs = doc["regimens"]
    if not isinstance(regs, Mapping) or not regs:
        fail("regimens", regs, "a non-empty mapping of regimen id to a regimen file, experiment protocol or inline regimen")
    regimens = {}
    for rid, entry in regs.items():
        where = f"regimens.{rid}"
        if isinstance(entry, str):
            rpath = _resolve(entry, path.parent)
            if not rpath.exists():
                fail(where, entry, "an existing regimen file is required")
            regimens[str(rid)] = load_regimen(rpath)
            continue
        entry = keys(where, entry, ("experiment", "protocol", "regimen"))
        if "regimen" in entry:
            regimens[str(rid)] = parse_regimen(entry["regimen"], source=f"{src}: {where}.regimen")
        elif "experiment" in entry and "protocol" in entry:
            epath = _resolve(str(entry["experiment"]), path.parent)
            if not epath.exists():
                fail(f"{where}.experiment", entry["experiment"], "an existing experiment file is required")
            protocols = {p.protocol_id: p for p in load_experiment(epath).protocols}
            if entry["protocol"] not in protocols:
                fail(f"{where}.protocol", entry["protocol"], f"allowed values are {sorted(protocols)}")
            regimens[str(rid)] = protocols[entry["protocol"]].regimen
        else:
            fail(where, dict(entry), "a regimen file path, {experiment, protocol} or {regimen: {...}} is required")
    drugs = tuple(dict.fromkeys(d for r in regimens.values() for d in r.drugs)) or ("nivolumab",)

    # parameters
    names = model_parameter_names(params, drugs)
    factors = []
    plist = doc["parameters"]
    if not isinstance(plist, list) or not plist:
        fail("parameters", plist, "a non-empty list of {name, range | distribution} is required")
    for i, entry in enumerate(plist):
        where = f"parameters[{i}]"
        entry = keys(where, entry, ("name", "quantity", "range", "scale", "distribution", "mean", "sd", "median",
                                    "sd_log", "note", "source"), ("name",))
        name = entry["name"]
        if name not in names:
            hint = ""
            split = [p for p in DRUG_PARAMS if isinstance(name, str) and name.startswith(p + "_")]
            if split and name[len(split[0]) + 1:] in KNOWN_DRUGS:
                hint = f" (drug {name[len(split[0]) + 1:]} is in no regimen of this analysis)"
            fail(f"{where}.name", name, "unknown model parameter" + hint + "; see configs/params/README.md")
        quantity = entry.get("quantity", "median")
        if quantity not in QUANTITIES:
            fail(f"{where}.quantity", quantity, f"allowed values are {list(QUANTITIES)}")
        if quantity == "cv" and name not in spec.names:
            fail(f"{where}.quantity", quantity, f"'cv' needs a parameter the population file varies: {list(spec.names)}")
        if simulator == "kinetics" and name not in ("k_C1_growth", "alpha_tumor", "k_C_T1"):
            fail(f"{where}.name", name, "the kinetics simulator reads only ['k_C1_growth', 'alpha_tumor', 'k_C_T1']")
        if ("range" in entry) == ("distribution" in entry):
            fail(where, dict(entry), "exactly one of 'range' or 'distribution' is required")
        if "range" in entry:
            r = entry["range"]
            if not isinstance(r, list) or len(r) != 2 or not all(_finite(x) for x in r):
                fail(f"{where}.range", r, "a pair [lo, hi] of finite numbers is required")
            scale = entry.get("scale", "log")
            if scale not in SCALES:
                fail(f"{where}.scale", scale, f"allowed values are {list(SCALES)}")
            if not r[0] < r[1]:
                fail(f"{where}.range", r, "lo < hi is required (the range is empty or inverted)")
            if scale == "log" and not r[0] > 0:
                fail(f"{where}.range", r, "a log-scale range needs lo > 0")
            if quantity == "median" and r[0] < 0:
                fail(f"{where}.range", r, "model parameters are non-negative")
            if quantity == "median" and name in spec.names and spec.distributions[name] == "logitnormal" and not (0 < r[0] and r[1] < 1):
                fail(f"{where}.range", r, "a logitnormal parameter's median must lie in (0, 1)")
            factors.append(Factor(name, quantity, (float(r[0]), float(r[1])), scale))
        else:
            dist = entry["distribution"]
            if dist not in DISTRIBUTIONS:
                fail(f"{where}.distribution", dist, f"allowed values are {list(DISTRIBUTIONS)}")
            if dist == "normal":
                mean = number(f"{where}.mean", entry.get("mean"))
                sd = number(f"{where}.sd", entry.get("sd"), positive=True)
                if mean - 4.0 * sd <= 0 or (quantity == "median" and name in spec.names
                                            and spec.distributions[name] == "logitnormal" and mean + 4.0 * sd >= 1):
                    fail(f"{where}.sd", sd, f"mean ± 4 sd must stay inside the parameter's domain (mean {mean:g}); "
                                            "use a lognormal or a range")
                factors.append(Factor(name, quantity, None, "linear", dist, (mean, sd)))
            else:
                median = number(f"{where}.median", entry.get("median"), positive=True)
                sd_log = number(f"{where}.sd_log", entry.get("sd_log"), positive=True)
                factors.append(Factor(name, quantity, None, "log", dist, (median, sd_log)))
    ids = [f.id for f in factors]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        fail("parameters", dup[0], "each parameter (and quantity) may appear once")

    # outputs
    olist = doc["outputs"]
    if not isinstance(olist, list) or not olist:
        fail("outputs", olist, "a non-empty list of outputs is required")
    outputs: list[Output] = []
    seen: set[str] = set()
    allowed_states = OBSERVABLES if simulator == "qsp" else ("tumor_diameter_cm",)
    for i, entry in enumerate(olist):
        where = f"outputs[{i}]"
        entry = keys(where, entry, ("id", "regimen", "endpoint", "day", "state", "patient", "lesion", "difference",
                                    "note"), ("id",))
        oid = entry["id"]
        if not isinstance(oid, str) or not oid.strip() or oid in seen:
            fail(f"{where}.id", oid, "a unique non-empty string is required")
        kinds = [k for k in ("endpoint", "state", "difference") if k in entry]
        if len(kinds) != 1:
            fail(where, dict(entry), "exactly one of 'endpoint', 'state' or 'difference' is required")
        if kinds[0] == "difference":
            diff = entry["difference"]
            if not isinstance(diff, list) or len(diff) != 2:
                fail(f"{where}.difference", diff, "a pair [a, b] of earlier output ids is required (a - b)")
            for x in diff:
                if x not in seen:
                    fail(f"{where}.difference", x, f"unknown output; earlier outputs are {sorted(seen)}")
            outputs.append(Output(oid, difference=(diff[0], diff[1])))
            seen.add(oid)
            continue
        rid = entry.get("regimen")
        if rid not in regimens:
            fail(f"{where}.regimen", rid, f"unknown regimen; allowed values are {sorted(regimens)}")
        day = None
        if kinds[0] == "endpoint":
            ep = entry["endpoint"]
            if ep not in ENDPOINTS:
                fail(f"{where}.endpoint", ep, f"unknown output endpoint; allowed values are {list(ENDPOINTS)}")
            if ep == "pfs":
                day = number(f"{where}.day", entry.get("day"), lo=0, hi=days)
            elif "day" in entry:
                fail(f"{where}.day", entry["day"], f"only 'pfs' and 'state' outputs take a day (endpoint '{ep}' is read over the whole course)")
            outputs.append(Output(oid, rid, endpoint=ep, day=day))
        else:
            state = entry["state"]
            if state not in allowed_states:
                fail(f"{where}.state", state, f"unknown output state; allowed values are {list(allowed_states)}")
            day = number(f"{where}.day", entry.get("day"), lo=0, hi=days)
            patient = entry.get("patient", "mean")
            if patient != "mean":
                patient = number(f"{where}.patient", patient, 0, patients - 1, integer=True)
            lesion = entry.get("lesion", "irradiated")
            if lesion not in LESION_NAMES:
                fail(f"{where}.lesion", lesion, f"allowed values are {list(LESION_NAMES)}")
            outputs.append(Output(oid, rid, state=state, day=day, patient=patient, lesion=lesion))
        seen.add(oid)

    glob = keys("global", doc.get("global"), ("methods", "n", "seed", "num_resamples", "conf_level", "batch", "morris"))
    methods = glob.get("methods", ["sobol"])
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or any(m not in METHODS for m in methods):
        fail("global.methods", methods, f"a list of values from {list(METHODS)} is required")
    n_where, n_value = ("global.n", glob.get("n", 16)) if n is None else ("--n", n)
    if not (_finite(n_value) and float(n_value).is_integer() and n_value >= 2):
        fail(n_where, n_value, "a positive integer >= 2 (the Sobol base sample size N) is required")
    n_value = int(n_value)
    seed_value = number("global.seed" if seed is None else "--seed", glob.get("seed", 0) if seed is None else seed, 0, integer=True)
    morris = keys("global.morris", glob.get("morris"), ("trajectories", "levels"))
    levels = number("global.morris.levels", morris.get("levels", 4), 2, integer=True)
    if levels % 2:
        fail("global.morris.levels", levels, "an even number of levels is required")
    local = doc.get("local", {"parameters": "all"})
    if local is False or local is None:
        local_params: Any = None
    else:
        local = keys("local", local, ("parameters",))
        local_params = local.get("parameters", "all")
        if local_params != "all":
            if not isinstance(local_params, list) or not local_params:
                fail("local.parameters", local_params, "'all' or a non-empty list of model parameter names is required")
            for j, p in enumerate(local_params):
                if p not in names:
                    fail(f"local.parameters[{j}]", p, "unknown model parameter")
    return Analysis(
        path=src, description=str(doc.get("description", "")), params_file=params_file, params_extra=extra,
        population_file=population_file, simulator=simulator, patients=patients, cohort_seed=cohort_seed, days=days,
        output_every=output_every, rtol=rtol, assessment=assessment, regimens=regimens, factors=tuple(factors),
        outputs=tuple(outputs), methods=tuple(dict.fromkeys(methods)), n=n_value, seed=seed_value,
        num_resamples=number("global.num_resamples", glob.get("num_resamples", 200), 10, integer=True),
        conf_level=number("global.conf_level", glob.get("conf_level", 0.95), lo=0.5, hi=0.999),
        batch=number("global.batch", glob.get("batch", 4), 1, 4096, integer=True),
        morris_trajectories=number("global.morris.trajectories", morris.get("trajectories", 10), 2, integer=True),
        morris_levels=levels, local=local_params, raw=dict(doc))


def model_parameter_names(params, drugs: Sequence[str]) -> tuple[str, ...]:
    """Model parameters an analysis may vary: every scalar a model module or the patient reads,
    and ``<pk parameter>_<drug>`` for the drugs of the analysis."""
    from qspjax.model.composer import QSPModel

    model = QSPModel.from_values(params.model_values(), drugs=tuple(drugs), n_lesions=2)
    names = []
    for attr in ("pk", "checkpoint", "cancer", "antigen", "tcells", "rt"):
        names += [k for k, v in getattr(model, attr).p.items() if jnp.ndim(v) == 0]
    names += [k for k, v in model.patient.items() if jnp.ndim(v) == 0 and k != "initial_tumour_diameter"]
    names += [f"{k}_{d}" for k, v in model.pk.p.items() if jnp.ndim(v) == 1 for d in drugs
              if k != "molecular_weight"]
    return tuple(dict.fromkeys(n for n in names if n in params.values))


# ---------------------------------------------------------------------------------------------
# The model: parameter vectors -> clinical endpoints of a fixed virtual cohort
# ---------------------------------------------------------------------------------------------
class EndpointModel:
    """The outputs of an :class:`Analysis` as a pure, differentiable function of its parameters.

    One virtual cohort is drawn once (``cohort.patients`` from ``cohort.seed``: the same
    quasi-random draws and baselines for every parameter vector, i.e. common random numbers),
    grown to baseline under each parameter vector (the baseline immune state depends on the
    parameters, as in :mod:`qspjax.inference.likelihood`) and treated with every regimen; the
    regimens share one compiled shape (padded timelines, ``lax.map`` over regimens) and parameter
    vectors are evaluated ``batch`` at a time under one ``vmap`` (every batch padded to the same
    size, so the whole analysis compiles once). No screening: a patient whose solve fails is left
    out of the cohort means (``soft_cohort_mean``), and the fraction solved is returned beside.
    """

    def __init__(self, analysis: Analysis):
        from qspjax.inference.simulators import KineticsSimulator
        from qspjax.params import load_parameters
        from qspjax.regimen import compile_schedule, timeline_points
        from qspjax.runner import OBSERVABLES
        from qspjax.solver.simulate import SolverConfig
        from qspjax.vpop import baseline, draw, load_population, population_params

        a = self.analysis = analysis
        self.params = load_parameters(a.params_file, a.params_extra)
        self.spec = load_population(a.population_file)
        self.config = SolverConfig(rtol=a.rtol, atol=a.rtol * 1e-3)
        self.regimen_ids = tuple(a.regimens)
        self.drugs = tuple(dict.fromkeys(d for r in a.regimens.values() for d in r.drugs)) or ("nivolumab",)
        self.names = model_parameter_names(self.params, self.drugs)
        grid = np.arange(0.0, a.days + 1e-9, a.output_every)
        if grid[-1] < a.days - 1e-9:
            grid = np.append(grid, a.days)
        self.output_days = grid
        n_points = max(timeline_points(r, grid) for r in a.regimens.values())
        schedules = [compile_schedule(a.regimens[r], self.drugs, grid, n_lesions=2, n_points=n_points)
                     for r in self.regimen_ids]
        self.schedules = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *schedules)
        self.draws = draw(self.spec, a.patients, a.cohort_seed)
        base = baseline(self.spec, self.draws)
        self.baseline = {k: jnp.asarray(v) for k, v in base.items()}
        self.nominal_pop = population_params(self.spec, self.params)
        self.target_mask = np.array([True, True]) if a.assessment["target"] == "all" else np.array([False, True])
        self.pfs_days = np.array(sorted({o.day for o in a.outputs if o.endpoint == "pfs"}) or [0.0])
        self.state_names = tuple(n for n in OBSERVABLES if any(o.state == n for o in a.outputs))
        state_days = sorted({o.day for o in a.outputs if o.state is not None})
        self.state_index = np.array([int(np.argmin(np.abs(grid - d))) for d in state_days], dtype=int)
        self._state_pos = {d: i for i, d in enumerate(state_days)}
        self.kinetics = KineticsSimulator(self.params) if a.simulator == "kinetics" else None
        self._batched = None
        self.n_evaluations = 0

    # -- parameters -------------------------------------------------------------------------------
    @property
    def output_ids(self) -> list[str]:
        return [o.id for o in self.analysis.outputs]

    def nominal(self) -> np.ndarray:
        """The analysis parameters at the files' values (natural units, (d,)); a value outside a
        factor's range is replaced by the range's middle (geometric on a log scale)."""
        out = []
        for f in self.analysis.factors:
            if f.quantity == "cv":
                v = self.spec.cv[f.name]
            else:
                v = self.params.values[f.name]
            if f.range is not None and not f.range[0] <= v <= f.range[1]:
                lo, hi = f.range
                v = math.sqrt(lo * hi) if f.scale == "log" else 0.5 * (lo + hi)
            out.append(float(v))
        return np.asarray(out)

    def local_names(self) -> tuple[str, ...]:
        loc = self.analysis.local
        if self.kinetics is not None:
            return tuple(n for n in ("k_C1_growth", "alpha_tumor", "k_C_T1") if loc == "all" or n in loc)
        return tuple(n for n in self.names if self.params.values[n] > 0) if loc == "all" else tuple(loc)

    def _patients(self, theta, scale: Mapping[str, Any]):
        """Per-patient values (n,) of every changed parameter, and per-drug PK values."""
        from qspjax.vpop import PopulationParams, patient_values

        n = self.analysis.patients
        loc, log_sd = dict(self.nominal_pop.loc), dict(self.nominal_pop.log_sd)
        fixed: dict[str, Any] = {}
        for j, f in enumerate(self.analysis.factors):
            v = theta[j]
            if f.quantity == "cv":
                log_sd[f.name] = 0.5 * jnp.log(jnp.log1p(v * v))
            elif f.name in self.spec.names:
                loc[f.name] = jnp.log(v / (1.0 - v)) if self.spec.distributions[f.name] == "logitnormal" else jnp.log(v)
            else:
                fixed[f.name] = v
        values = dict(patient_values(self.spec, PopulationParams(loc, log_sd), self.draws))
        for name, m in scale.items():  # local analysis: every patient's value times m
            if name in values:
                values[name] = values[name] * m
            else:
                fixed[name] = fixed.get(name, self.params.values[name]) * m
        drug_values = {}
        for name, v in fixed.items():
            if name in self.params.values and self._drug_param(name) is not None:
                drug_values[name] = v
            else:
                values[name] = jnp.full(n, v, dtype=float)
        return values, drug_values

    def _drug_param(self, name: str):
        for d_index, drug in enumerate(self.drugs):
            if name.endswith("_" + drug) and name[: -len(drug) - 1] in ("q_P", "q_T", "q_LN", "q_LD", "k_cl",
                                                                      "gamma_C", "gamma_P", "gamma_T", "gamma_LN"):
                return name[: -len(drug) - 1], d_index
        return None

    def build_models(self, values: Mapping[str, Any], drug_values: Mapping[str, Any]):
        """The batched QSP model of the cohort with per-patient ``values`` and per-drug PK values
        (from :meth:`_patients`) substituted."""
        import equinox as eqx

        from qspjax.vpop import build_models

        models = build_models(self.params, values, self.analysis.patients, self.drugs, 2,
                              self.baseline["pdl1_multiplier"])
        for name, v in drug_values.items():
            param, k = self._drug_param(name)
            models = eqx.tree_at(lambda m: m.pk.p[param], models, models.pk.p[param].at[:, k].set(v))
        return models

    # -- one parameter vector ---------------------------------------------------------------------
    def outputs(self, theta, scale: Mapping[str, Any] | None = None):
        """Outputs (k,) and the fraction of patients solved per regimen (R,) at ``theta`` (d,) in
        natural units; ``scale`` multiplies named model parameters (local analysis)."""
        from qspjax.model.cancer import diameter_from_volume
        from qspjax.outcomes import soft_best_response_probabilities, soft_cohort_mean, soft_progression_free_probability
        from qspjax.solver.simulate import STATUS_OK, simulate_batch
        from qspjax.vpop import grow_cohort

        a = self.analysis
        values, drug_values = self._patients(theta, scale or {})
        kw = dict(temperature=a.assessment["temperature"], assessment_interval_days=a.assessment["interval_days"])
        sidx = jnp.asarray(self.state_index)
        if self.kinetics is None:
            models = self.build_models(values, drug_values)
            y0, grow_status, _ = grow_cohort(models, self.params, self.baseline["diameter_cm"],
                                             self.baseline["second_lesion_ratio"], self.config)

            def arm(schedule):
                traj = simulate_batch(models, y0, schedule, self.config)
                ok = (grow_status == STATUS_OK) & (traj.status == STATUS_OK)
                diam_cm = jax.vmap(lambda m, ys: diameter_from_volume(jax.vmap(m.lesion_volume)(ys)))(models, traj.ys)
                if self.state_names:
                    ys = jax.tree_util.tree_map(lambda x: x[:, sidx], traj.ys)
                    obs = jax.vmap(lambda m, y: jax.vmap(m.observables)(y))(models, ys)
                    states = jnp.stack([obs[s] for s in self.state_names])  # (S, P, days, L)
                else:
                    states = jnp.zeros((0, a.patients, len(sidx), 2))
                return 10.0 * jnp.swapaxes(diam_cm, 1, 2), ok, states
        else:
            prepared = self.kinetics.prepare(values, self.baseline)

            def arm(schedule):
                diam_mm, ok = self.kinetics.arm(prepared, schedule)
                states = (jnp.swapaxes(diam_mm, 1, 2)[:, sidx] / 10.0)[None] if self.state_names else \
                    jnp.zeros((0, a.patients, len(sidx), 2))
                return diam_mm, ok, states

        def one_arm(schedule):
            diam_mm, ok, states = arm(schedule)
            probs = soft_best_response_probabilities(self.output_days, diam_mm, self.target_mask, ok, **kw)
            pf = soft_progression_free_probability(self.output_days, diam_mm, self.pfs_days, self.target_mask, ok,
                                                   death_rate_per_day=a.assessment["death_rate_per_day"], **kw)
            mean_states = soft_cohort_mean(jnp.moveaxis(states, 1, 0), ok)  # (S, days, L)
            return (soft_cohort_mean(probs, ok), soft_cohort_mean(pf, ok), states, mean_states,
                    jnp.mean(ok.astype(float)))

        response, pfs, states, mean_states, ok_fraction = jax.lax.map(one_arm, self.schedules)
        done: dict[str, Any] = {}
        for o in a.outputs:
            if o.difference is not None:
                done[o.id] = done[o.difference[0]] - done[o.difference[1]]
                continue
            r = self.regimen_ids.index(o.regimen)
            if o.endpoint == "orr":
                v = response[r, 0] + response[r, 1]
            elif o.endpoint == "dcr":
                v = response[r, 0] + response[r, 1] + response[r, 2]
            elif o.endpoint == "cr":
                v = response[r, 0]
            elif o.endpoint == "pd":
                v = response[r, 3]
            elif o.endpoint == "pfs":
                v = pfs[r, int(np.searchsorted(self.pfs_days, o.day))]
            else:
                s, t, lesion = self.state_names.index(o.state), self._state_pos[o.day], LESION_NAMES.index(o.lesion)
                v = mean_states[r, s, t, lesion] if o.patient == "mean" else states[r, s, o.patient, t, lesion]
            done[o.id] = v
        return jnp.stack([done[o.id] for o in a.outputs]), ok_fraction

    # -- many parameter vectors -------------------------------------------------------------------
    def evaluate(self, theta: np.ndarray, progress: bool = False, desc: str = "model evaluations") -> np.ndarray:
        """Outputs (m, k) of parameter rows ``theta`` (m, d) in natural units, ``batch`` rows per
        compiled call; the lowest solved fraction seen is kept in ``min_ok_fraction``."""
        import equinox as eqx
        from tqdm import tqdm

        theta = np.asarray(theta, float)
        b = self.analysis.batch
        if self._batched is None:
            self._batched = eqx.filter_jit(jax.vmap(lambda t: self.outputs(t)))
        out, oks = [], []
        bar = tqdm(total=len(theta), desc=desc, unit="eval", disable=not progress)
        for start in range(0, len(theta), b):
            index = np.minimum(np.arange(start, start + b), len(theta) - 1)
            m = min(b, len(theta) - start)
            y, ok = self._batched(jnp.asarray(theta[index]))
            out.append(np.asarray(y)[:m])
            oks.append(np.asarray(ok)[:m])
            bar.update(m)
        bar.close()
        self.n_evaluations += len(theta)
        ok = np.concatenate(oks)
        self.min_ok_fraction = min(getattr(self, "min_ok_fraction", 1.0), float(ok.min()))
        return np.concatenate(out)

    def sampled(self, progress: bool = False, desc: str = "model evaluations") -> Callable[[np.ndarray], np.ndarray]:
        """``f`` for :func:`sobol_indices` / :func:`morris_effects`: rows on the sampling scale."""
        return lambda x: self.evaluate(self.analysis.to_natural(x), progress, desc)

    def local(self, names: Sequence[str] | None = None) -> LocalResult:
        """Local sensitivities of every output w.r.t. ``names`` (default: the analysis's ``local``
        list) at :meth:`nominal`, by one reverse-mode pass per output through the solver."""
        import equinox as eqx

        names = tuple(names or self.local_names())
        p0 = np.array([self.params.values[n] for n in names], float)
        self.n_evaluations += 1
        return local_sensitivities(self.local_function(names), p0, names, self.output_ids,
                                   absolute=[o.difference is not None for o in self.analysis.outputs])

    def local_function(self, names: Sequence[str]) -> Callable[[jax.Array], jax.Array]:
        """The function :meth:`local` differentiates: parameter values (m,) -> outputs (k,)."""
        import equinox as eqx

        theta = jnp.asarray(self.nominal())
        p0 = np.array([self.params.values[n] for n in names], float)
        return eqx.filter_jit(lambda p: self.outputs(theta, {n: p[i] / p0[i] for i, n in enumerate(names)})[0])


# ---------------------------------------------------------------------------------------------
# Figures and tables
# ---------------------------------------------------------------------------------------------
def tornado_plot(path, result: LocalResult, output: str, top: int = 15) -> Path:
    """Horizontal bars of the ``top`` largest local sensitivities of one output, largest on top
    (d log output / d log parameter; d output / d log parameter where the output is 0)."""
    from qspjax.plots import _new_figure, _save

    k = result.outputs.index(output)
    ranked = result.ranked(k)[:top]
    normalised = result.measure(k) == "dlog_output_dlog_parameter"
    labels = [p for p, _ in ranked][::-1]
    values = np.array([v for _, v in ranked][::-1])
    figure = _new_figure(7.0, 0.3 * len(labels) + 1.5)
    axes = figure.add_subplot()
    axes.barh(np.arange(len(values)), values, color=np.where(values >= 0, "#4575b4", "#d73027"))
    axes.set_yticks(np.arange(len(values)), labels, fontsize=8)
    axes.axvline(0.0, color="#222222", linewidth=0.8)
    axes.set_xlabel("d log(output) / d log(parameter)" if normalised else "d output / d log(parameter)")
    axes.set_title(f"{output} = {result.values[k]:.3g}: local sensitivities (top {len(labels)})", fontsize=10)
    return _save(figure, path)


def sobol_plot(path, result: SobolResult, output: str) -> Path:
    """Bars of the first-order and total Sobol indices of one output with their bootstrap intervals."""
    from qspjax.plots import _new_figure, _save

    k = result.outputs.index(output)
    d = len(result.names)
    x = np.arange(d)
    figure = _new_figure(max(5.0, 0.9 * d + 2.0), 4.0)
    axes = figure.add_subplot()
    w = 0.38
    axes.bar(x - w / 2, result.S1[k], w, yerr=result.S1_conf[k], capsize=3, color="#91bfdb", label="first order S1")
    axes.bar(x + w / 2, result.ST[k], w, yerr=result.ST_conf[k], capsize=3, color="#4575b4", label="total ST")
    axes.set_xticks(x, result.names, rotation=30, ha="right", fontsize=8)
    axes.axhline(0.0, color="#222222", linewidth=0.8)
    axes.set_ylabel("Sobol index")
    axes.set_title(f"{output}: Sobol indices, N = {result.n} ({result.n_evaluations} runs)\n"
                   f"{int(100 * result.conf_level)} % bootstrap intervals; largest change from N/2: "
                   f"{result.max_change[k]:.2f}", fontsize=9)
    axes.legend(fontsize=8)
    return _save(figure, path)


INDEX_COLUMNS = ("output", "parameter", "method", "S1", "S1_conf", "ST", "ST_conf", "max_change_N_2N",
                 "mu", "mu_star", "mu_star_conf", "sigma")
LOCAL_COLUMNS = ("output", "parameter", "sensitivity", "measure", "dlog_output_dlog_parameter",
                 "doutput_dlog_parameter", "output_value", "parameter_value", "rank")


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV with ``columns``; a missing or non-finite number is an empty cell, floats in repr."""
    import csv
    import io

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, (float, np.floating)):
            return repr(float(v)) if math.isfinite(v) else ""
        if isinstance(v, (np.integer,)):
            return str(int(v))
        return str(v)

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow([cell(r.get(c)) for c in columns])
    return buf.getvalue()
