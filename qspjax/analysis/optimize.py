"""Gradient-based search of an RT + antibody schedule space for the best regimen of a virtual cohort.

A *space file* (``configs/optimize/*.yaml``, validated by :func:`load_space`) declares which regimen
quantities are free, their bounds and whether they are integers, the objective and the constraints.
The regimen family is one SBRT/conventional RT course and one antibody course:

* ``rt_dose_per_fraction_gy``, ``rt_fractions`` (integer), ``rt_gap_days`` (days between fractions),
  ``rt_start_offset_days`` (RT start minus antibody start), ``lesion`` (which lesion is irradiated);
* ``ici_dose_mg``, ``ici_interval_days``, ``ici_start_day``; doses run to ``ici_end_day``.

Every quantity enters the solve as a smooth input: doses scale the jumps and the days are the event
times of the timeline (rows sorted by time inside the traced function, so the order can change
between iterations), so ``jax.grad`` flows through the ODE solver to each continuous variable. The
number of fractions is relaxed (fraction j has weight clip(n - j, 0, 1) on its dose) and, like every
integer variable, rounded at the end by enumerating the floor/ceil neighbours of the continuous
optimum; each candidate is checked against every constraint (closed-form ones exactly, after a
bisection back towards the least-constrained corner of the box when needed; the lymphocyte nadir by
a solve) and the best feasible one is kept.

Objective (maximised): the smooth ORR, the smooth PFS probability at a landmark, or the tumor burden
(minus the log ratio of the sum of diameters at the horizon to baseline) of each patient, reduced by
the cohort mean or a lower quantile. Constraints: normal-tissue BED with alpha/beta = 3
(n d (1 + d/3)) at most a limit, RT overall treatment time ((n - 1) x gap) at most a limit, total
antibody (dose x number of doses) at most a limit, and a floor on the cohort-mean nadir of
circulating T cells (effector CD8 + Treg in blood, ``T1_C + T0_C``, relative to the pre-treatment
value; the model has no B or NK cells, so this is the T-cell part of the lymphocyte count).
Constraints enter the ascent as quadratic penalties; the final answer is checked, not penalised.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import yaml

from qspjax import outcomes as oc
from qspjax.errors import QSPValidationError
from qspjax.model.pk import KNOWN_DRUGS
from qspjax.regimen import LESIONS, TECHNIQUES, Schedule
from qspjax.solver.simulate import STATUS_OK, SolverConfig, simulate_patient

# name: (hard minimum, hard maximum, integer by nature, default value when not free)
NUMERIC_VARIABLES: dict[str, tuple[float, float, bool, float]] = {
    "rt_dose_per_fraction_gy": (0.5, 40.0, False, 8.0),
    "rt_fractions": (0.0, 30.0, True, 3.0),
    "rt_gap_days": (0.5, 28.0, False, 2.0),
    "rt_start_offset_days": (-365.0, 365.0, False, 0.0),
    "ici_dose_mg": (1.0, 2000.0, False, 240.0),
    "ici_interval_days": (7.0, 84.0, False, 14.0),
    "ici_start_day": (0.0, 365.0, False, 0.0),
}
ORDER = tuple(NUMERIC_VARIABLES)
CATEGORICAL = {"lesion": LESIONS}
ENDPOINTS = ("orr", "pfs", "burden")
STATISTICS = ("mean", "lower_quantile")
CONSTRAINTS = ("normal_tissue_bed_gy", "overall_treatment_time_days", "total_antibody_mg",
               "lymphocyte_nadir_fraction")
NORMAL_TISSUE_ALPHA_BETA_GY = 3.0
_TOP_KEYS = ("name", "description", "drug", "horizon_days", "output_every", "ici_end_day", "rt_technique",
             "variables", "objective", "constraints", "optimizer")


@dataclass(frozen=True)
class Variable:
    name: str
    low: float
    high: float
    integer: bool = False
    value: float | None = None  # fixed value when not free
    choices: tuple[str, ...] = ()  # categorical

    @property
    def free(self) -> bool:
        return self.value is None and (not self.choices or len(self.choices) > 1)


@dataclass(frozen=True)
class Objective:
    endpoint: str = "orr"
    statistic: str = "mean"
    quantile: float = 0.25
    landmark_days: float = 182.0
    temperature: float = 0.05
    assessment_interval_days: float = 56.0


@dataclass(frozen=True)
class Optimizer:
    steps: int = 20
    learning_rate: float = 0.3
    penalty: float = 50.0


@dataclass(frozen=True)
class Space:
    """A validated space file (hashable: it is a static argument of the compiled objective)."""

    source: str
    name: str
    description: str
    drug: str
    horizon_days: float
    output_every: float
    ici_end_day: float
    rt_technique: str
    variables: tuple[Variable, ...]
    lesion: Variable
    objective: Objective
    constraints: tuple[tuple[str, float], ...]  # (name, limit)
    optimizer: Optimizer

    def var(self, name: str) -> Variable:
        return next(v for v in self.variables if v.name == name)

    @property
    def free(self) -> tuple[Variable, ...]:
        return tuple(v for v in self.variables if v.free)

    @property
    def grid(self) -> tuple[float, ...]:
        g = np.unique(np.concatenate([np.arange(0.0, self.horizon_days + 1e-9, self.output_every),
                                      [self.horizon_days]]))
        return tuple(float(x) for x in g)

    @property
    def n_rt_rows(self) -> int:
        return int(math.ceil(self.var("rt_fractions").high if self.var("rt_fractions").free
                             else self.var("rt_fractions").value))

    @property
    def n_ici_rows(self) -> int:
        start = self.var("ici_start_day")
        interval = self.var("ici_interval_days")
        s0 = start.low if start.free else start.value
        i0 = interval.low if interval.free else interval.value
        end = min(self.ici_end_day, self.horizon_days)
        return max(0, int(math.floor((end - s0) / i0 + 1e-9)) + 1)

    def limit(self, name: str) -> float | None:
        return dict(self.constraints).get(name)


# ---------------------------------------------------------------------------------------------
# Space file validation (everything refused before any compute)
# ---------------------------------------------------------------------------------------------
def load_space(path: str | Path) -> Space:
    from qspjax.regimen import _read_yaml

    path = Path(path)
    return parse_space(_read_yaml(path), str(path))


def parse_space(doc: Any, source: str = "<space>") -> Space:
    def fail(where, value, allowed):
        raise QSPValidationError(source, where, value, allowed)

    def number(where, value, low=None, high=None, positive=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(where, value, "a finite number is required")
        if positive and value <= 0:
            fail(where, value, "must be > 0")
        if low is not None and value < low:
            fail(where, value, f"must be >= {low:g}")
        if high is not None and value > high:
            fail(where, value, f"must be <= {high:g}")
        return float(value)

    def mapping(where, value, allowed):
        if not isinstance(value, Mapping):
            fail(where or "(top level)", value, "a mapping is required")
        for k in value:
            if k not in allowed:
                fail(f"{where}.{k}" if where else str(k), value[k],
                     f"unknown key (misspelt?); allowed keys are {list(allowed)}")
        return value

    mapping("", doc, _TOP_KEYS)
    for k in ("name", "variables", "objective"):
        if k not in doc:
            fail(k, None, "required field is missing")
    name = doc["name"]
    if not isinstance(name, str) or not name.strip():
        fail("name", name, "a non-empty string is required")
    drug = doc.get("drug", "nivolumab")
    if drug not in KNOWN_DRUGS:
        fail("drug", drug, f"allowed values are {list(KNOWN_DRUGS)}")
    horizon = number("horizon_days", doc.get("horizon_days", 400.0), positive=True, high=3650.0)
    every = number("output_every", doc.get("output_every", 7.0), positive=True, high=horizon)
    end = number("ici_end_day", doc.get("ici_end_day", horizon), low=0.0)
    technique = doc.get("rt_technique", "sbrt")
    if technique not in TECHNIQUES:
        fail("rt_technique", technique, f"allowed values are {list(TECHNIQUES)}")

    variables = mapping("variables", doc["variables"], ORDER + tuple(CATEGORICAL))
    parsed = []
    for vname in ORDER:
        lo_hard, hi_hard, _, default = NUMERIC_VARIABLES[vname]
        spec = variables.get(vname)
        where = f"variables.{vname}"
        if spec is None:
            parsed.append(Variable(vname, default, default, value=default))
            continue
        if not isinstance(spec, Mapping):
            fail(where, spec, "a mapping {min, max, integer} (free) or {value} (fixed) is required")
        mapping(where, spec, ("min", "max", "integer", "value", "initial"))
        integer = spec.get("integer", vname == "rt_fractions")
        if not isinstance(integer, bool):
            fail(f"{where}.integer", integer, "true or false")
        if vname == "rt_fractions" and not integer:
            fail(f"{where}.integer", integer, "the number of fractions is an integer: integer must be true")
        if "value" in spec:
            if "min" in spec or "max" in spec:
                fail(f"{where}.value", spec["value"], "give either value (fixed) or min/max (free), not both")
            v = number(f"{where}.value", spec["value"], lo_hard, hi_hard)
            if integer and v != round(v):
                fail(f"{where}.value", v, "an integer is required (integer: true)")
            parsed.append(Variable(vname, v, v, integer, value=v))
            continue
        for k in ("min", "max"):
            if k not in spec:
                fail(f"{where}.{k}", None, "required field is missing (or give value for a fixed variable)")
        lo = number(f"{where}.min", spec["min"], lo_hard, hi_hard)
        hi = number(f"{where}.max", spec["max"], lo_hard, hi_hard)
        if not hi > lo:
            fail(f"{where}.max", spec["max"], f"empty bounds: max must be > min ({lo:g}); use value for a fixed variable")
        if integer and math.floor(hi) < math.ceil(lo):
            fail(f"{where}.max", spec["max"], f"no integer lies in [{lo:g}, {hi:g}]")
        if "initial" in spec:
            number(f"{where}.initial", spec["initial"], lo, hi)
        parsed.append(Variable(vname, lo, hi, integer))
    lesion_spec = variables.get("lesion", {"value": "irradiated"})
    if not isinstance(lesion_spec, Mapping):
        fail("variables.lesion", lesion_spec, "a mapping {choices: [...]} or {value: ...} is required")
    mapping("variables.lesion", lesion_spec, ("choices", "value"))
    if ("choices" in lesion_spec) == ("value" in lesion_spec):
        fail("variables.lesion", dict(lesion_spec), "give exactly one of choices or value")
    choices = lesion_spec.get("choices", [lesion_spec.get("value")])
    if not isinstance(choices, list) or not choices:
        fail("variables.lesion.choices", choices, f"a non-empty list of {list(LESIONS)}")
    for c in choices:
        if c not in LESIONS:
            fail("variables.lesion.choices", c, f"allowed values are {list(LESIONS)}")
    if len(set(choices)) != len(choices):
        fail("variables.lesion.choices", choices, "choices must be distinct")
    lesion = Variable("lesion", 0, len(choices) - 1, True, None if len(choices) > 1 else 0.0, tuple(choices))

    ob = mapping("objective", doc["objective"], ("endpoint", "statistic", "quantile", "landmark_days", "temperature",
                                                  "assessment_interval_days"))
    endpoint = ob.get("endpoint")
    if endpoint not in ENDPOINTS:
        fail("objective.endpoint", endpoint, f"allowed values are {list(ENDPOINTS)}")
    statistic = ob.get("statistic", "mean")
    if statistic not in STATISTICS:
        fail("objective.statistic", statistic, f"allowed values are {list(STATISTICS)}")
    q = number("objective.quantile", ob.get("quantile", 0.25), 0.0, 1.0)
    if not 0 < q < 1:
        fail("objective.quantile", q, "must be strictly between 0 and 1")
    landmark = number("objective.landmark_days", ob.get("landmark_days", min(182.0, horizon)), positive=True)
    if landmark > horizon:
        fail("objective.landmark_days", landmark, f"must be at most horizon_days ({horizon:g})")
    temperature = number("objective.temperature", ob.get("temperature", 0.05), positive=True, high=1.0)
    interval = number("objective.assessment_interval_days", ob.get("assessment_interval_days", 56.0), positive=True)
    if endpoint in ("orr", "pfs") and interval > horizon:
        fail("objective.assessment_interval_days", interval, f"must be at most horizon_days ({horizon:g})")
    objective = Objective(endpoint, statistic, q, landmark, temperature, interval)

    cons = doc.get("constraints") or {}
    mapping("constraints", cons, CONSTRAINTS)
    limits = []
    for cname, spec in cons.items():
        where = f"constraints.{cname}"
        key = "min" if cname == "lymphocyte_nadir_fraction" else "max"
        if not isinstance(spec, Mapping):
            fail(where, spec, f"a mapping {{{key}: ...}} is required")
        mapping(where, spec, (key,))
        if key not in spec:
            fail(f"{where}.{key}", None, "required field is missing")
        if cname == "lymphocyte_nadir_fraction":
            limit = number(f"{where}.min", spec["min"], 0.0, 1.0)
            if not 0 < limit < 1:
                fail(f"{where}.min", limit, "a fraction of the pre-treatment count strictly between 0 and 1")
        else:
            limit = number(f"{where}.{key}", spec[key], positive=True)
        limits.append((cname, limit))

    opt = doc.get("optimizer") or {}
    mapping("optimizer", opt, ("steps", "learning_rate", "penalty"))
    steps = number("optimizer.steps", opt.get("steps", 20), 1, 500)
    if steps != int(steps):
        fail("optimizer.steps", steps, "an integer is required")
    optimizer = Optimizer(int(steps), number("optimizer.learning_rate", opt.get("learning_rate", 0.3), positive=True),
                          number("optimizer.penalty", opt.get("penalty", 50.0), positive=True))

    space = Space(source, name, str(doc.get("description", "")), drug, horizon, every, end, technique,
                  tuple(parsed), lesion, objective, tuple(limits), optimizer)
    _check_box(space, fail)
    return space


def _check_box(space: Space, fail) -> None:
    """Refuse a box in which no regimen can satisfy the closed-form constraints, or that starts RT
    before day 0; the least-constrained corner is feasible whenever any point is."""
    start, offset = space.var("ici_start_day"), space.var("rt_start_offset_days")
    if start.low + offset.low < 0:
        fail("variables.rt_start_offset_days.min" if offset.free else "variables.rt_start_offset_days.value",
             offset.low, f"RT would start on day {start.low + offset.low:g} (< 0) with ici_start_day {start.low:g}")
    if start.low > space.horizon_days:
        fail("variables.ici_start_day", start.low, f"must be at most horizon_days ({space.horizon_days:g})")
    if space.n_ici_rows == 0 and (space.ici_end_day < start.low):
        fail("ici_end_day", space.ici_end_day, f"must be at least the earliest ici_start_day ({start.low:g})")
    corner = np.array([least_constrained_corner(space)[n] for n in ORDER])
    values = closed_form_constraints(space, dict(zip(ORDER, corner)), xp=np)
    for cname, limit in space.constraints:
        if cname in values and values[cname] > limit * (1 + 1e-12):
            fail(f"constraints.{cname}.max", limit,
                 f"infeasible: even the least-constrained regimen of the box gives {values[cname]:.4g}")


def least_constrained_corner(space: Space) -> dict[str, float]:
    """The box corner where every closed-form constraint is smallest: least RT dose, fractions and
    gap, least antibody dose, longest interval, latest start."""
    out = {}
    for v in space.variables:
        if not v.free:
            out[v.name] = v.value
            continue
        lo, hi = (math.ceil(v.low), math.floor(v.high)) if v.integer else (v.low, v.high)
        out[v.name] = hi if v.name in ("ici_interval_days", "ici_start_day") else lo
    return out


# ---------------------------------------------------------------------------------------------
# The regimen as smooth functions of the variables
# ---------------------------------------------------------------------------------------------
def _fraction_weights(space: Space, n):
    j = jnp.arange(space.n_rt_rows) if space.n_rt_rows else jnp.zeros(0)
    return jnp.clip(n - j, 0.0, 1.0)


def _ici_days(space: Space, v, xp=jnp):
    j = xp.arange(space.n_ici_rows)
    days = v["ici_start_day"] + j * v["ici_interval_days"]
    active = days <= min(space.ici_end_day, space.horizon_days) + 1e-9
    return days, active


def closed_form_constraints(space: Space, v: Mapping[str, Any], xp=jnp) -> dict[str, Any]:
    """BED (alpha/beta 3), RT overall treatment time and total antibody of the (relaxed) regimen."""
    d, n = v["rt_dose_per_fraction_gy"], v["rt_fractions"]
    if xp is np:
        w = np.clip(n - np.arange(space.n_rt_rows), 0.0, 1.0)
    else:
        w = _fraction_weights(space, n)
    dw = d * w
    bed = xp.sum(dw * (1.0 + dw / NORMAL_TISSUE_ALPHA_BETA_GY))
    ott = xp.maximum(n - 1.0, 0.0) * v["rt_gap_days"]
    _, active = _ici_days(space, v, xp)
    exposure = v["ici_dose_mg"] * xp.sum(active * 1.0)
    return {"normal_tissue_bed_gy": bed, "overall_treatment_time_days": ott, "total_antibody_mg": exposure}


def build_schedule(space: Space, v: Mapping[str, Any], lesion_index: int, drugs: tuple[str, ...],
                   n_lesions: int = 2) -> Schedule:
    """The regimen of values ``v`` (traced) as event arrays: one row per RT fraction and antibody dose
    (plus day 0 and the horizon), sorted by time (RT before a dose on the same day, as
    :func:`qspjax.regimen.compile_schedule` applies them)."""
    h = space.horizon_days
    nr, ni = space.n_rt_rows, space.n_ici_rows
    rt_start = v["ici_start_day"] + v["rt_start_offset_days"]
    j = jnp.arange(nr)
    rt_days = rt_start + j * v["rt_gap_days"]
    w = _fraction_weights(space, v["rt_fractions"]) * (rt_days <= h)
    ici_days, active = _ici_days(space, v)
    times = jnp.concatenate([jnp.zeros(1), jnp.clip(rt_days, 0.0, h), jnp.clip(ici_days, 0.0, h), jnp.full(1, h)])
    k = times.shape[0]
    d_index = drugs.index(space.drug)
    dose = jnp.zeros((k, len(drugs))).at[1 + nr:1 + nr + ni, d_index].set(v["ici_dose_mg"] * active)
    rt = jnp.zeros((k, n_lesions)).at[1:1 + nr, lesion_index].set(v["rt_dose_per_fraction_gy"] * w)
    sbrt = jnp.zeros(k).at[1:1 + nr].set(1.0 if space.rt_technique == "sbrt" else 0.0)
    order = jnp.argsort(times, stable=True)
    f = lambda a: a[order]
    zeros = jnp.zeros((k, n_lesions))
    return Schedule(f(times), f(dose), jnp.zeros_like(dose), f(rt), f(sbrt), jnp.zeros(k), zeros,
                    jnp.asarray(space.grid))


def values_of(space: Space, x) -> dict[str, Any]:
    """Every numeric variable's value: the free ones from ``x`` (ORDER of the free ones), others fixed."""
    out, i = {}, 0
    for var in space.variables:
        if var.free:
            out[var.name] = x[i]
            i += 1
        else:
            out[var.name] = jnp.asarray(var.value, dtype=float) if not isinstance(x, np.ndarray) else var.value
    return out


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------
def per_patient_score(space: Space, grid: np.ndarray, diam_mm, ok):
    """Per-patient endpoint to maximise from lesion diameters (P, L, T) in mm."""
    ob = space.objective
    if ob.endpoint == "orr":
        p = oc.soft_best_response_probabilities(grid, diam_mm, status_ok=ok, temperature=ob.temperature,
                                                assessment_interval_days=ob.assessment_interval_days)
        score = p[:, 0] + p[:, 1]
    elif ob.endpoint == "pfs":
        score = oc.soft_progression_free_probability(grid, diam_mm, [ob.landmark_days], status_ok=ok,
                                                     temperature=ob.temperature,
                                                     assessment_interval_days=ob.assessment_interval_days)[:, 0]
    else:
        sod = jnp.sum(diam_mm, axis=1)
        sod = jnp.where(ok[:, None], sod, 1.0)
        score = -jnp.log(jnp.maximum(sod[:, -1], 1e-6) / jnp.maximum(sod[:, 0], 1e-6))
    return score


def reduce_cohort(space: Space, score, ok):
    """Cohort mean, or the lower quantile (linear interpolation of the sorted values); a failed
    patient counts as the worst possible value of the endpoint."""
    worst = 0.0 if space.objective.endpoint in ("orr", "pfs") else -10.0
    s = jnp.where(ok, score, worst)
    if space.objective.statistic == "mean":
        return jnp.mean(s)
    s = jnp.sort(s)
    pos = space.objective.quantile * (s.shape[0] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.shape[0] - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _soft_min(x, axis, tau=0.02):
    return -tau * jax.nn.logsumexp(-x / tau, axis=axis) + tau * math.log(x.shape[axis])


@eqx.filter_jit
def _cohort_eval(models, y0s, x, lesion_index, space: Space, drugs, n_lesions, config):
    v = values_of(space, x)
    schedule = build_schedule(space, v, lesion_index, drugs, n_lesions)

    def one(m, y):
        traj = simulate_patient(m, y, schedule, config)
        diam = jax.vmap(m.observables)(traj.ys)["tumor_diameter_cm"]  # (G, L)
        lymph = (traj.ys["T1_C"] + traj.ys["T0_C"]) / (y["T1_C"] + y["T0_C"])
        return traj.status, 10.0 * diam.T, lymph

    status, diam, lymph = jax.vmap(one)(models, y0s)
    ok = status == STATUS_OK
    grid = np.asarray(space.grid)
    score = per_patient_score(space, grid, diam, ok)
    value = reduce_cohort(space, score, ok)
    nadir = jnp.where(ok, _soft_min(jnp.where(ok[:, None], lymph, 1.0), axis=1), 0.0)
    cons = closed_form_constraints(space, v)
    cons["lymphocyte_nadir_fraction"] = jnp.mean(nadir)
    return value, {"constraints": cons, "status": status, "score": score, "hard_nadir": jnp.mean(jnp.min(lymph, 1))}


def penalty(space: Space, cons: Mapping[str, Any]):
    total = 0.0
    for cname, limit in space.constraints:
        if cname == "lymphocyte_nadir_fraction":
            g = 1.0 - cons[cname] / limit
        else:
            g = cons[cname] / limit - 1.0
        total = total + jnp.maximum(g, 0.0) ** 2
    return space.optimizer.penalty * total


class CohortObjective:
    """The compiled objective of one space on one cohort.

    One compiled function serves everything (compilation dominates on a CPU: minutes per
    function): it returns the objective, the penalised objective the ascent climbs, the constraint
    values and the gradient of the penalised objective with respect to the free variables in their
    natural units. With no constraint in the space the two objectives coincide.
    """

    def __init__(self, space: Space, population, config: SolverConfig):
        self.space, self.config = space, config
        self.models, self.y0 = population.model, population.y0
        drugs, n_lesions = tuple(population.drugs), population.n_lesions
        self.evaluations = 0

        def penalised(x, models, y0, lesion_index):
            value, aux = _cohort_eval(models, y0, x, lesion_index, space, drugs, n_lesions, config)
            return value - penalty(space, aux["constraints"]), (value, aux)

        # the cohort is an argument, not a constant folded into the compiled program
        self._vg = jax.jit(jax.value_and_grad(penalised, has_aux=True), static_argnums=3)

    def evaluate(self, x, lesion_index: int = 0):
        """(penalised objective, objective, aux, gradient of the penalised objective)."""
        self.evaluations += 1
        (pv, (v, aux)), g = self._vg(jnp.asarray(x, dtype=float), self.models, self.y0, lesion_index)
        return float(pv), float(v), jax.tree_util.tree_map(np.asarray, aux), np.asarray(g)

    def value(self, x, lesion_index: int = 0):
        _, v, aux, _ = self.evaluate(x, lesion_index)
        return v, aux

    def penalised_value(self, x, lesion_index: int = 0) -> float:
        return self.evaluate(x, lesion_index)[0]

    def value_and_grad(self, x, lesion_index: int = 0):
        """The penalised objective and its gradient (the objective's own when the space has no constraint)."""
        pv, _, _, g = self.evaluate(x, lesion_index)
        return pv, g

    def penalised_value_and_grad(self, x, lesion_index: int = 0):
        pv, v, aux, g = self.evaluate(x, lesion_index)
        return pv, v, aux, g


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    x: np.ndarray  # free numeric variables, natural units
    lesion_index: int
    value: float
    constraints: dict[str, float]
    feasible: bool
    origin: str


@dataclass
class OptimizeResult:
    space: Space
    best: Candidate
    history: list[dict[str, Any]]
    candidates: list[Candidate]
    timing: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0


def free_numeric(space: Space) -> tuple[Variable, ...]:
    return tuple(v for v in space.variables if v.free)


def initial_point(space: Space, doc_initial: Mapping[str, float] | None = None) -> np.ndarray:
    x = []
    for v in free_numeric(space):
        init = (doc_initial or {}).get(v.name)
        x.append(init if init is not None else 0.5 * (v.low + v.high))
    return np.asarray(x, dtype=float)


def is_feasible(space: Space, cons: Mapping[str, float], tol: float = 1e-9) -> bool:
    for cname, limit in space.constraints:
        value = float(cons[cname])
        if cname == "lymphocyte_nadir_fraction":
            if value < limit * (1 - tol):
                return False
        elif value > limit * (1 + tol):
            return False
    return True


def _closed_form_feasible(space: Space, x: np.ndarray) -> bool:
    cons = closed_form_constraints(space, values_of(space, np.asarray(x, dtype=float)), xp=np)
    return all(cons[c] <= lim * (1 + 1e-12) for c, lim in space.constraints if c in cons)


def restore(space: Space, x: np.ndarray) -> np.ndarray | None:
    """Move ``x`` along the segment towards the least-constrained corner (integers kept) until the
    closed-form constraints hold: bisection on the segment, 40 halvings. None if even the corner
    (with these integers) is infeasible."""
    if _closed_form_feasible(space, x):
        return x
    corner_all = least_constrained_corner(space)
    free = free_numeric(space)
    corner = np.array([x[i] if v.integer else corner_all[v.name] for i, v in enumerate(free)])
    if not _closed_form_feasible(space, corner):
        return None
    lo, hi = 0.0, 1.0  # fraction of the way from the corner to x
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _closed_form_feasible(space, corner + mid * (x - corner)):
            lo = mid
        else:
            hi = mid
    return corner + lo * (x - corner)


def optimize(objective: CohortObjective, *, x0: np.ndarray | None = None, steps: int | None = None,
             progress: bool = False) -> OptimizeResult:
    """Projected-by-reparameterisation Adam ascent on the penalised objective, then rounding of the
    integers and categorical choices with a final feasibility check."""
    import optax

    space = objective.space
    free = free_numeric(space)
    lows = np.array([v.low for v in free])
    highs = np.array([v.high for v in free])
    steps = space.optimizer.steps if steps is None else steps
    x0 = initial_point(space) if x0 is None else np.asarray(x0, dtype=float)
    # start inside the closed-form constraints: a start far outside them makes a penalty gradient
    # that dominates Adam's second-moment estimate for many steps
    x0 = restore(space, x0) if free and restore(space, x0) is not None else x0
    x0 = np.clip(x0, lows + 1e-6 * (highs - lows), highs - 1e-6 * (highs - lows))
    # x = low + (high - low) sigmoid(u): the box is never left; Adam's steps are in u.
    u = np.log((x0 - lows) / (highs - x0)) if free else np.zeros(0)
    # a short second-moment memory: the gradient's scale changes as constraints become active
    opt = optax.adam(space.optimizer.learning_rate, b1=0.8, b2=0.9)
    state = opt.init(jnp.asarray(u))
    lesions = range(len(space.lesion.choices)) if space.lesion.free else [0]
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    # categorical lesion: relax-free, so the ascent runs on the first choice and the others are
    # compared at the rounding stage with the same continuous values.
    lesion0 = 0
    best_pen = -np.inf
    best_x = x0
    for it in range(steps + 1):
        sig = 1.0 / (1.0 + np.exp(-u))
        x = lows + (highs - lows) * sig
        pv, v, aux, g = objective.penalised_value_and_grad(x, lesion0)
        cons = {k: float(val) for k, val in aux["constraints"].items()}
        history.append({"iteration": it, "x": x.tolist(), "objective": v, "penalised": pv, "constraints": cons,
                        "failed": int(np.sum(aux["status"] != STATUS_OK)), "seconds": time.perf_counter() - t0})
        if progress:
            print(f"iteration {it}: objective {v:.4f} penalised {pv:.4f} x {np.round(x, 3).tolist()}", flush=True)
        if pv > best_pen:
            best_pen, best_x = pv, x
        if it == steps or not free:
            break
        # a non-finite gradient component (seen through the solver when the relaxed RT course nears
        # the antibody doses) must not poison Adam: that variable stays put this step, and it is said
        g = np.asarray(g, dtype=float)
        bad = ~np.isfinite(g)  # (Adam's momentum would still move it: its update is zeroed too)
        if bad.any():
            history[-1]["nonfinite_gradient"] = [free[i].name for i in np.flatnonzero(bad)]
            if progress:
                print(f"iteration {it}: non-finite gradient for {history[-1]['nonfinite_gradient']}; "
                      f"held this step", flush=True)
            g = np.where(bad, 0.0, g)
        grad_u = -(g * (highs - lows) * sig * (1.0 - sig))  # optax minimises
        updates, state = opt.update(jnp.asarray(grad_u), state)
        u = u + np.where(bad, 0.0, np.asarray(updates))
    t_ascent = time.perf_counter() - t0

    # Rounding: floor/ceil of each integer variable (the three most ambiguous; others to nearest),
    # every lesion choice; each candidate restored to the closed-form constraints and solved.
    t1 = time.perf_counter()
    ints = [i for i, v in enumerate(free) if v.integer]
    ambiguity = sorted(ints, key=lambda i: abs((best_x[i] % 1.0) - 0.5))[:3]
    options = []
    for i, v in enumerate(free):
        if not v.integer:
            options.append([best_x[i]])
        elif i in ambiguity:
            opts = sorted({min(max(math.floor(best_x[i]), math.ceil(v.low)), math.floor(v.high)),
                           min(max(math.ceil(best_x[i]), math.ceil(v.low)), math.floor(v.high))})
            options.append(opts)
        else:
            options.append([min(max(round(best_x[i]), math.ceil(v.low)), math.floor(v.high))])
    candidates: list[Candidate] = []
    seen = set()
    for combo in itertools.product(*options) if free else [()]:
        x = restore(space, np.asarray(combo, dtype=float))
        if x is None:
            continue
        for lesion in lesions:
            key = (tuple(np.round(x, 9)), lesion)
            if key in seen:
                continue
            seen.add(key)
            value, aux = objective.value(x, lesion)
            cons = {k: float(val) for k, val in aux["constraints"].items()}
            cons["lymphocyte_nadir_fraction"] = float(aux["hard_nadir"])  # the check uses the true minimum
            feasible = is_feasible(space, cons) and bool(np.all(aux["status"] == STATUS_OK))
            candidates.append(Candidate(np.asarray(x), lesion, value, cons, feasible, "rounded optimum"))
    feasible = [c for c in candidates if c.feasible]
    if not feasible:
        # fall back to the least-constrained corner, which validation guarantees for closed-form constraints
        corner = least_constrained_corner(space)
        x = np.array([corner[v.name] for v in free])
        value, aux = objective.value(x, 0)
        cons = {k: float(val) for k, val in aux["constraints"].items()}
        cons["lymphocyte_nadir_fraction"] = float(aux["hard_nadir"])
        candidates.append(Candidate(x, 0, value, cons, is_feasible(space, cons), "least-constrained corner"))
        feasible = [c for c in candidates if c.feasible] or candidates[-1:]
    best = max(feasible, key=lambda c: c.value)
    return OptimizeResult(space, best, history, candidates,
                          {"ascent_s": t_ascent, "rounding_s": time.perf_counter() - t1}, objective.evaluations)


# ---------------------------------------------------------------------------------------------
# The answer as a regimen file
# ---------------------------------------------------------------------------------------------
def regimen_document(space: Space, x: np.ndarray, lesion_index: int, name: str | None = None) -> dict[str, Any]:
    """A regimen mapping (``configs/regimens/README.md``) that ``qspjax trial --regimen`` runs as is."""
    v = {k: float(val) for k, val in values_of(space, np.asarray(x, dtype=float)).items()}
    n = int(round(v["rt_fractions"]))
    doc: dict[str, Any] = {"name": name or f"{space.name}-optimum",
                           "description": f"found by qspjax optimize on {space.source} (objective: "
                                          f"{space.objective.statistic} {space.objective.endpoint})"}
    if n > 0:
        start = v["ici_start_day"] + v["rt_start_offset_days"]
        days = [float(round(start + j * v["rt_gap_days"], 6)) for j in range(n)]
        doc["rt"] = [{"dose_per_fraction_gy": float(round(v["rt_dose_per_fraction_gy"], 6)), "fractions": n,
                      "days": days, "lesion": space.lesion.choices[lesion_index], "technique": space.rt_technique}]
    doc["ici"] = [{"drug": space.drug, "dose": float(round(v["ici_dose_mg"], 6)), "unit": "mg",
                   "interval_days": float(round(v["ici_interval_days"], 6)),
                   "end_day": float(min(space.ici_end_day, space.horizon_days)),
                   "start_day": float(round(v["ici_start_day"], 6))}]
    return doc


def write_regimen(path: Path, doc: Mapping[str, Any]) -> None:
    from qspjax.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=None))


def plot_convergence(path: Path, result: OptimizeResult) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from qspjax.io import atomic_write

    space = result.space
    fig = Figure(figsize=(13.0, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    a, b, c = fig.subplots(1, 3)
    it = [h["iteration"] for h in result.history]
    a.plot(it, [h["objective"] for h in result.history], "o-", label="objective")
    a.plot(it, [h["penalised"] for h in result.history], "s--", label="objective - penalty", alpha=0.7)
    a.axhline(result.best.value, color="k", linestyle=":", label="rounded, checked optimum")
    a.set(xlabel="iteration", ylabel=f"{space.objective.statistic} {space.objective.endpoint}",
          title="objective")
    a.legend(fontsize=8)
    for cname, limit in space.constraints:
        vals = [h["constraints"][cname] / limit for h in result.history]
        b.plot(it, vals, "o-", label=cname)
    b.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    b.set(xlabel="iteration", ylabel="value / limit", title="constraints (limit = 1)")
    if space.constraints:
        b.legend(fontsize=7)
    free = free_numeric(space)
    for i, v in enumerate(free):
        xs = [(h["x"][i] - v.low) / (v.high - v.low) for h in result.history]
        c.plot(it, xs, "o-", label=v.name)
    c.set(xlabel="iteration", ylabel="position in [min, max]", ylim=(-0.02, 1.02), title="free variables")
    if free:
        c.legend(fontsize=7)
    fig.suptitle(f"{space.name}: gradient ascent through the solver")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
