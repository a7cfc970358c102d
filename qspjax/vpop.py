"""Virtual populations: patient parameters, baseline tumors and PD-L1 classes.

Population parameters (medians and spreads on an unconstrained scale) form a pytree that
calibration differentiates through; the standard-normal draws are fixed per seed (common random
numbers), so a cohort is a smooth function of them. Baseline tumors are grown from a seed to each
patient's baseline diameter by the untreated model (``qspjax.solver.simulate.grow_to_baseline``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from scipy.special import ndtri
from scipy.stats import qmc

from qspjax.errors import QSPValidationError
from qspjax.model.composer import QSPModel, module_param_specs
from qspjax.model.reference import state_from_species
from qspjax.params import PARAMS_DIR, ParameterSet
from qspjax.solver.simulate import SolverConfig, grow_to_baseline, untreated_seed_state

DEFAULT_POPULATION_FILE = PARAMS_DIR / "population.yaml"
TPS_CLASSES = ("lt1", "1to49", "ge50")
DISTRIBUTIONS = ("lognormal", "logitnormal")


@dataclass(frozen=True)
class Plausibility:
    """Ranges a virtual patient must fall in at baseline to be kept (plausibility filter).

    ``volume_doubling_days``: untreated tumor volume doubling time at baseline (days);
    ``growth_days``: time the pre-treatment growth took from the seed to the baseline diameter;
    ``blood_cd8_cells``: effector CD8 T cells in blood at baseline (cells).
    """

    volume_doubling_days: tuple[float, float] = (20.0, 2000.0)
    growth_days: tuple[float, float] = (0.0, 3650.0)
    blood_cd8_cells: tuple[float, float] = (0.0, math.inf)


@dataclass(frozen=True)
class PopulationSpec:
    """Which parameters vary and how; baseline tumor and PD-L1 distributions."""

    distributions: dict[str, str]
    cv: dict[str, float]
    diameter_median_cm: float = 3.0
    diameter_cv: float = 0.4
    diameter_min_cm: float = 1.0
    diameter_max_cm: float = 10.0
    second_lesion_median: float = 0.6
    second_lesion_cv: float = 0.4
    tps_probabilities: tuple[float, float, float] = (0.33, 0.37, 0.30)
    tps_multipliers: tuple[float, float, float] = (0.1, 1.0, 3.0)
    source: str = ""
    plausibility: Plausibility = field(default_factory=Plausibility)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.distributions)


def load_population(path: str | Path | None = None) -> PopulationSpec:
    """Read and validate a population file (default ``configs/params/population.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_POPULATION_FILE
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise QSPValidationError(path, "(file)", str(path), f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise QSPValidationError(path, "(file)", str(path),
                                 f"is not a UTF-8 text file (byte {exc.start}: {exc.reason}); a YAML file is required") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())  # one line: the CLI prints a single-line message
        raise QSPValidationError(path, "(file)", str(path), f"is not valid YAML (truncated?): {detail}") from None

    def mapping(where: str, value: Any, allowed: tuple[str, ...]) -> Mapping:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise QSPValidationError(path, where, value, "a mapping is required")
        for key in value:
            if key not in allowed:
                raise QSPValidationError(path, f"{where}.{key}" if where != "(top level)" else str(key), value[key],
                                         f"unknown key (misspelt?); allowed keys are {list(allowed)}")
        return value

    def number(where: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        if bad or value < lo or (lo_open and value == lo) or value >= hi:
            raise QSPValidationError(path, where, value, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}) is required")
        return float(value)

    if doc is None:  # an empty file: say so rather than run on the defaults
        raise QSPValidationError(path, "(top level)", None, "a mapping is required (the file is empty)")
    doc = mapping("(top level)", doc, ("description", "variability", "baseline", "plausibility"))
    specs = module_param_specs()
    dists, cvs = {}, {}
    variability = doc.get("variability") or {}
    if not isinstance(variability, Mapping):
        raise QSPValidationError(path, "variability", variability, "a mapping of parameter name to {distribution, cv} is required")
    for name, entry in variability.items():
        where = f"variability.{name}"
        if name not in specs:
            raise QSPValidationError(path, where, name, "not a model parameter (misspelt?)")
        if not isinstance(entry, Mapping):
            raise QSPValidationError(path, where, entry, "a mapping with distribution and cv is required")
        mapping(where, entry, ("distribution", "cv", "source"))
        dist = entry.get("distribution", "lognormal")
        if dist not in DISTRIBUTIONS:
            raise QSPValidationError(path, f"{where}.distribution", dist, f"allowed values are {list(DISTRIBUTIONS)}")
        if dist == "lognormal" and specs[name].upper is not None:
            raise QSPValidationError(path, f"{where}.distribution", dist,
                                     f"{name} is at most {specs[name].upper:g}: use logitnormal (a lognormal draw can exceed it)")
        if "cv" not in entry:
            raise QSPValidationError(path, f"{where}.cv", None, "required field is missing")
        # cv up to 1000 (a log-scale sd up to ~3.7): a calibrated spread can be that wide (fits/README.md:
        # the growth rate's posterior median spread is cv ~31, sd 2.6 on the log scale)
        dists[name], cvs[name] = dist, number(f"{where}.cv", entry["cv"], 0.0, 1000.0)
    base = mapping("baseline", doc.get("baseline"), ("diameter_cm", "second_lesion_ratio", "pdl1_tps"))
    diam = mapping("baseline.diameter_cm", base.get("diameter_cm"), ("median", "cv", "min", "max", "source"))
    second = mapping("baseline.second_lesion_ratio", base.get("second_lesion_ratio"), ("median", "cv", "source"))
    tps = mapping("baseline.pdl1_tps", base.get("pdl1_tps"), ("probabilities", "pdl1_multiplier", "source"))
    w = "baseline.diameter_cm"
    d_median = number(f"{w}.median", diam.get("median", 3.0), 0.0, lo_open=True)
    d_cv = number(f"{w}.cv", diam.get("cv", 0.4), 0.0, 10.0)
    d_min = number(f"{w}.min", diam.get("min", 1.0), 0.0, lo_open=True)
    d_max = number(f"{w}.max", diam.get("max", 10.0), d_min)
    w = "baseline.second_lesion_ratio"
    s_median = number(f"{w}.median", second.get("median", 0.6), 0.0, lo_open=True)
    s_cv = number(f"{w}.cv", second.get("cv", 0.4), 0.0, 10.0)
    probs = tps.get("probabilities", {"lt1": 0.33, "1to49": 0.37, "ge50": 0.30})
    mults = tps.get("pdl1_multiplier", {"lt1": 0.1, "1to49": 1.0, "ge50": 3.0})
    for key, value in (("probabilities", probs), ("pdl1_multiplier", mults)):
        if not isinstance(value, Mapping) or set(value) != set(TPS_CLASSES):
            raise QSPValidationError(path, f"baseline.pdl1_tps.{key}", value,
                                     f"a mapping with exactly the keys {list(TPS_CLASSES)} is required")
    p = tuple(number(f"baseline.pdl1_tps.probabilities.{c}", probs[c], 0.0, 1.0 + 1e-9) for c in TPS_CLASSES)
    if abs(sum(p) - 1.0) > 1e-6:
        raise QSPValidationError(path, "baseline.pdl1_tps.probabilities", dict(probs), "non-negative and summing to 1")
    m = tuple(number(f"baseline.pdl1_tps.pdl1_multiplier.{c}", mults[c], 0.0) for c in TPS_CLASSES)
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise QSPValidationError(path, "description", description, "a string is required")
    return PopulationSpec(dists, cvs, d_median, d_cv, d_min, d_max, s_median, s_cv, p, m, description,
                          _read_plausibility(path, doc.get("plausibility") or {}))


def _read_plausibility(path: Path, doc: Any) -> Plausibility:
    if not isinstance(doc, Mapping):
        raise QSPValidationError(path, "plausibility", doc, "a mapping of ranges is required")
    defaults = Plausibility()
    ranges = {}
    for key, value in doc.items():
        where = f"plausibility.{key}"
        if key == "source":
            continue
        if key not in Plausibility.__dataclass_fields__:
            raise QSPValidationError(path, where, value, f"unknown key; allowed: {sorted(Plausibility.__dataclass_fields__)}")
        if not isinstance(value, Mapping) or set(value) - {"min", "max", "source"}:
            raise QSPValidationError(path, where, value, "a mapping with min and/or max (and source) is required")
        lo, hi = getattr(defaults, key)
        lo, hi = value.get("min", lo), value.get("max", hi)
        for bound_name, bound in (("min", lo), ("max", hi)):
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or math.isnan(bound):
                raise QSPValidationError(path, f"{where}.{bound_name}", bound, "a number is required")
        if not lo < hi:
            raise QSPValidationError(path, where, value, "min must be below max")
        ranges[key] = (float(lo), float(hi))
    return Plausibility(**ranges)


class PopulationParams(eqx.Module):
    """Population means (``loc``, on the log or logit scale) and spreads (``log_sd``) per parameter.

    This is the pytree calibration and inference act on.
    """

    loc: dict[str, jax.Array]
    log_sd: dict[str, jax.Array]


def _lognormal_sd(cv: float) -> float:
    return math.sqrt(math.log1p(cv * cv))


def population_params(spec: PopulationSpec, params: ParameterSet) -> PopulationParams:
    """The population pytree centred on ``params`` (the medians) with the spec's spreads."""
    loc, log_sd = {}, {}
    for name in spec.names:
        median = params.values[name]
        if spec.distributions[name] == "logitnormal":
            if not 0.0 < median < 1.0:
                raise QSPValidationError("population", f"variability.{name}", median, "logitnormal needs a median in (0, 1)")
            loc[name] = jnp.asarray(math.log(median / (1.0 - median)))
        else:
            if median <= 0.0:
                raise QSPValidationError("population", f"variability.{name}", median, "lognormal needs a median > 0")
            loc[name] = jnp.asarray(math.log(median))
        log_sd[name] = jnp.asarray(math.log(max(_lognormal_sd(spec.cv[name]), 1e-12)))
    return PopulationParams(loc, log_sd)


@dataclass
class Draws:
    """Fixed standard-normal and uniform draws of a cohort (common random numbers)."""

    z: np.ndarray  # (n, n_params) standard normal for the varied parameters
    z_diameter: np.ndarray  # (n,)
    z_second: np.ndarray  # (n,)
    u_tps: np.ndarray  # (n,) uniform for the PD-L1 class
    seed: int
    names: tuple[str, ...] = field(default_factory=tuple)


def draw(spec: PopulationSpec, n: int, seed: int) -> Draws:
    """Scrambled-Sobol quasi-random draws for ``n`` patients from ``seed``."""
    if n <= 0:
        raise QSPValidationError("command line", "--patients", n, "must be a positive integer")
    dim = len(spec.names) + 3
    sobol = qmc.Sobol(d=dim, scramble=True, seed=np.random.default_rng(seed))
    m = max(1, math.ceil(math.log2(n)))
    u = sobol.random_base2(m)[:n]
    u = np.clip(u, 1e-12, 1 - 1e-12)
    z = ndtri(u)
    k = len(spec.names)
    return Draws(z[:, :k], z[:, k], z[:, k + 1], u[:, k + 2], seed, spec.names)


def patient_values(spec: PopulationSpec, pop: PopulationParams, draws: Draws) -> dict[str, jax.Array]:
    """Per-patient values (n,) of the varied parameters; differentiable in ``pop``."""
    out = {}
    for j, name in enumerate(spec.names):
        x = pop.loc[name] + jnp.exp(pop.log_sd[name]) * jnp.asarray(draws.z[:, j])
        out[name] = jax.nn.sigmoid(x) if spec.distributions[name] == "logitnormal" else jnp.exp(x)
    return out


def baseline(spec: PopulationSpec, draws: Draws) -> dict[str, np.ndarray]:
    """Baseline diameter (cm) of the index lesion, second-lesion size ratio and PD-L1 class."""
    d = spec.diameter_median_cm * np.exp(_lognormal_sd(spec.diameter_cv) * draws.z_diameter)
    d = np.clip(d, spec.diameter_min_cm, spec.diameter_max_cm)
    ratio = spec.second_lesion_median * np.exp(_lognormal_sd(spec.second_lesion_cv) * draws.z_second)
    cum = np.cumsum(spec.tps_probabilities)
    tps = np.minimum(np.searchsorted(cum, draws.u_tps, side="right"), len(TPS_CLASSES) - 1)
    return {"diameter_cm": d, "second_lesion_ratio": ratio, "tps_class": tps,
            "pdl1_multiplier": np.asarray(spec.tps_multipliers)[tps]}


class Cohort(eqx.Module):
    """A batch of virtual patients: a batched model, their baseline and the state at baseline."""

    model: QSPModel
    y0: dict
    status: jax.Array
    growth_days: jax.Array
    baseline_diameter_cm: jax.Array
    tps_class: jax.Array


def build_models(params: ParameterSet, values: Mapping[str, jax.Array], n: int, drugs, n_lesions: int,
                 pdl1_multiplier=None) -> QSPModel:
    """A batched model: nominal ``params`` with per-patient ``values`` (n,) substituted."""
    nominal = QSPModel.from_values(params.model_values(), drugs=tuple(drugs), n_lesions=n_lesions)
    batched = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), nominal)

    def put(module, name, value):
        if name in module.p:
            return eqx.tree_at(lambda m: m.p[name], module, value)
        return module

    for name, value in values.items():
        for attr in ("pk", "checkpoint", "cancer", "antigen", "tcells", "rt"):
            batched = eqx.tree_at(lambda m: getattr(m, attr), batched, put(getattr(batched, attr), name, value))
        if name in batched.patient:
            batched = eqx.tree_at(lambda m: m.patient[name], batched, value)
    if pdl1_multiplier is not None:
        base = batched.checkpoint.p["C_PDL1_total"]
        batched = eqx.tree_at(lambda m: m.checkpoint.p["C_PDL1_total"], batched, base * jnp.asarray(pdl1_multiplier))
    return batched


def make_cohort(
    params: ParameterSet,
    n: int,
    seed: int,
    drugs=("nivolumab",),
    n_lesions: int = 2,
    spec: PopulationSpec | None = None,
    pop: PopulationParams | None = None,
    variability: bool = True,
    config: SolverConfig = SolverConfig(),
    subset: slice | np.ndarray | None = None,
) -> Cohort:
    """Sample ``n`` patients from ``seed`` and grow each one's tumor to its baseline diameter.

    With ``variability=False`` every patient has the nominal parameters and the parameter file's
    baseline diameter; a patient whose growth fails is kept and flagged in ``status``. ``subset`` (a slice or index array)
    selects patients of the ``n`` drawn (chunked runs draw the whole cohort once).
    """
    spec = spec or load_population()
    pop = pop or population_params(spec, params)
    draws = draw(spec, n, seed)
    if subset is not None:
        draws = Draws(draws.z[subset], draws.z_diameter[subset], draws.z_second[subset], draws.u_tps[subset],
                      draws.seed, draws.names)
        n = len(draws.z_diameter)
    base = baseline(spec, draws)
    if variability:
        values = patient_values(spec, pop, draws)
        diameter = base["diameter_cm"]
        ratio = base["second_lesion_ratio"]
        mult = base["pdl1_multiplier"]
    else:
        values = {}
        diameter = np.full(n, params.values["initial_tumour_diameter"])
        ratio = np.full(n, spec.second_lesion_median)
        mult = None
    models = build_models(params, values, n, drugs, n_lesions, mult)
    y0, status, days = grow_cohort(models, params, jnp.asarray(diameter), jnp.asarray(ratio), config)
    return Cohort(models, y0, status, days, jnp.asarray(diameter), jnp.asarray(base["tps_class"]))


def grow_cohort(models: QSPModel, params: ParameterSet, diameter_cm, second_ratio, config: SolverConfig):
    """Pre-treatment growth of every patient of a batched model to its baseline diameter.

    In a ``jax.distributed`` run each process grows its share of the patients and all get the
    whole cohort back (:func:`qspjax.solver.simulate.over_processes`), instead of each growing all.
    """
    from qspjax.solver.simulate import over_processes

    species = params.initial_state
    return over_processes(lambda m, d, r: _grow_jit(m, species, d, r, config), (models, diameter_cm, second_ratio))


@eqx.filter_jit
def _grow_jit(models, species, diameter_cm, second_ratio, config):
    def one(model, d, ratio):
        ref = state_from_species(model, species)
        seed_state = untreated_seed_state(model, ref)
        if model.n_lesions > 1:
            # Lesion sizes follow from their seed cell counts (same growth law per patient).
            seed_state["C1"] = seed_state["C1"].at[1].multiply(ratio**3)
        return grow_to_baseline(model, seed_state, d, config)

    return jax.vmap(one)(models, diameter_cm, second_ratio)


# ---------------------------------------------------------------------------------------------
# Plausibility and matching a trial arm's baseline
# ---------------------------------------------------------------------------------------------
PLAUSIBILITY_REASONS = ("growth_failed", "volume_doubling_days", "growth_days", "blood_cd8_cells")


def baseline_growth_rate(model, y):
    """d ln V / dt of the index lesion's volume on the model's right-hand side at state ``y`` (1/day)."""
    volume = lambda state: model.lesion_volume(state)[0]
    v, dv = jax.jvp(volume, (y,), (model.rates(y),))
    return dv / v


SOFT_SCREEN_WIDTH = 0.05


def log_soft_plausibility(rule: Plausibility, growth_rate, growth_days, blood_cd8_cells,
                          width: float = SOFT_SCREEN_WIDTH):
    """A smooth log of the plausibility filter's indicator, for densities (the twin's prior).

    The filter keeps a patient when every readout lies in its range; a density cannot have that
    step in it (NUTS diverges on it), so each finite, non-zero bound ``b`` contributes
    ``log sigmoid((x - b) / (width |b|))`` (lower) or ``log sigmoid((b - x) / (width |b|))``
    (upper): about 0 inside the range, log(1/2) at the bound, falling linearly beyond it (by 1 per
    ``width`` of the bound: 20 at twice an upper bound with the default 5 %). The doubling-time
    range acts on its reciprocal, the growth rate ln 2 / doubling, which is finite for a tumour that
    does not grow; bounds at 0 or infinity constrain nothing for these non-negative quantities.
    """
    log2 = math.log(2.0)

    def lower(x, b):
        return jax.nn.log_sigmoid((x - b) / (width * abs(b))) if 0.0 < abs(b) < math.inf else 0.0

    def upper(x, b):
        return jax.nn.log_sigmoid((b - x) / (width * abs(b))) if 0.0 < abs(b) < math.inf else 0.0

    lo, hi = rule.volume_doubling_days
    out = upper(growth_rate, log2 / lo if lo > 0 else math.inf) + lower(growth_rate, log2 / hi)
    out = out + lower(growth_days, rule.growth_days[0]) + upper(growth_days, rule.growth_days[1])
    out = out + lower(blood_cd8_cells, rule.blood_cd8_cells[0]) + upper(blood_cd8_cells, rule.blood_cd8_cells[1])
    return out


def baseline_readouts(cohort: Cohort) -> dict[str, np.ndarray]:
    """Per-patient baseline quantities the plausibility filter looks at (numpy, (n,)).

    The volume doubling time is ln 2 over the instantaneous untreated growth rate of the index
    lesion's volume, d ln V / dt, evaluated on the model's right-hand side at baseline.
    """
    rate = np.asarray(_baseline_growth_rate_jit(cohort.model, cohort.y0, baseline_growth_rate))
    with np.errstate(divide="ignore"):
        doubling = np.where(rate > 0, math.log(2.0) / np.where(rate > 0, rate, 1.0), np.inf)
    return {
        "volume_doubling_days": doubling,
        "growth_days": np.asarray(cohort.growth_days),
        "blood_cd8_cells": np.asarray(cohort.y0["T1_C"]),
    }


@eqx.filter_jit
def _baseline_growth_rate_jit(models, y0, fn):
    return jax.vmap(fn)(models, y0)


def plausibility_reasons(cohort: Cohort, rule: Plausibility) -> np.ndarray:
    """Why each patient is implausible: an index into ``PLAUSIBILITY_REASONS``, or -1 if kept."""
    from qspjax.solver.simulate import STATUS_OK

    read = baseline_readouts(cohort)
    reason = np.full(len(read["growth_days"]), -1)
    checks = [("growth_failed", np.asarray(cohort.status) != STATUS_OK)]
    for key in PLAUSIBILITY_REASONS[1:]:
        lo, hi = getattr(rule, key)
        value = read[key]
        checks.append((key, ~((value >= lo) & (value <= hi))))
    for key, bad in reversed(checks):  # the first failing check is the one reported
        reason = np.where(bad, PLAUSIBILITY_REASONS.index(key), reason)
    return reason


@dataclass(frozen=True)
class BaselineTarget:
    """A trial arm's baseline mix a virtual cohort is matched to (what the arm reports).

    ``tps_probabilities``: PD-L1 class fractions (<1 %, 1–49 %, ≥50 %) or None;
    ``diameter_median_cm``: median index-lesion diameter or None; ``second_lesion``: False where
    the patients have one lesion (the model's second lesion is seeded empty). ``notes`` says what
    was used and what could not be (stage mix: the model has no nodal or metastatic stage).
    """

    tps_probabilities: tuple[float, float, float] | None = None
    diameter_median_cm: float | None = None
    notes: tuple[str, ...] = ()
    second_lesion: bool = True


def target_from_arm(arm) -> BaselineTarget:
    """The matchable part of a trial arm's baseline (:class:`qspjax.data.Arm`)."""
    notes = []
    tps = None
    if arm.pdl1_lt1_pct is not None and arm.pdl1_ge50_pct is not None:
        lt1, ge50 = arm.pdl1_lt1_pct / 100.0, arm.pdl1_ge50_pct / 100.0
        mid = max(0.0, 1.0 - lt1 - ge50)
        total = lt1 + mid + ge50
        tps = (lt1 / total, mid / total, ge50 / total)
        notes.append(f"PD-L1 TPS classes matched to <1 %: {arm.pdl1_lt1_pct:g} %, >=50 %: {arm.pdl1_ge50_pct:g} %")
    elif arm.pdl1_lt1_pct is not None or arm.pdl1_ge50_pct is not None:
        notes.append("PD-L1: only one class reported; population default class mix kept")
    diameter = _median_diameter_cm(arm.tumor_size_text)
    if diameter is not None:
        notes.append(f"median index-lesion diameter set to {diameter:g} cm from '{arm.tumor_size_text}'")
    elif arm.tumor_size_text:
        notes.append(f"tumor size '{arm.tumor_size_text}' is not a diameter; population default kept")
    if arm.stage_mix or arm.stage_text:
        notes.append("stage mix not matched: the model has no nodal or metastatic stage")
    # Early-stage disease (stage I-II, node-negative, no metastasis) is one tumour: the model's
    # second lesion, a metastasis or nodal deposit elsewhere, has no counterpart and is left empty.
    second = getattr(arm, "setting", None) != "early_stage"
    if not second:
        notes.append("early-stage setting: one lesion (the model's second lesion is seeded empty)")
    return BaselineTarget(tps, diameter, tuple(notes), second)


def _median_diameter_cm(text: str | None) -> float | None:
    """A median diameter from texts such as 'Diam: 2 cm (1.4–2.6)', '45 mm (31–60)', 'median 24.5 mm'."""
    import re

    if not text:
        return None
    m = re.search(r"(?:Diam:\s*|median\s+|^)\s*([0-9]+(?:\.[0-9]+)?)\s*(cm|mm)\b", text)
    if not m:
        return None
    value = float(m.group(1))
    return value / 10.0 if m.group(2) == "mm" else value


def matched_spec(spec: PopulationSpec, target: BaselineTarget | None) -> PopulationSpec:
    """``spec`` with its baseline re-centred on ``target`` (PD-L1 classes, median diameter)."""
    if target is None:
        return spec
    changes: dict[str, Any] = {}
    if target.tps_probabilities is not None:
        changes["tps_probabilities"] = target.tps_probabilities
    if target.diameter_median_cm is not None:
        changes["diameter_median_cm"] = target.diameter_median_cm
    if not target.second_lesion:
        changes["second_lesion_median"] = 0.0
    return dataclasses.replace(spec, **changes)
