"""Inference configuration files: priors, arm selections and the fit/infer run file.

Three YAML files, each validated on load (:class:`~qspjax.errors.QSPValidationError` names the file
and the field):

* **priors** (``configs/inference/priors.yaml``): one entry per estimated quantity, PEtab-shaped
  (``parameterId``/``parameterScale``/``priorType``/``priorParameters`` become ``id``, ``scale``,
  ``prior``). A quantity is either the population median of a varied model parameter
  (``quantity: median``; its unconstrained scale is log for lognormal and logit for logitnormal
  parameters of the population file) or its between-patient spread (``quantity: sd``: the sd of
  the log/logit value, estimated on the log scale). Priors are normal on the unconstrained scale,
  centred on the parameter file's value (``center: nominal``) or on a number in natural units.
* **arm selection** (``configs/inference/advanced_arms.yaml``): arm ids to fit and to hold out.
* **run file** (``configs/inference/fit_advanced.yaml``): which priors and arms, cohort size, seed,
  horizon, solver and outcome settings, optimiser and NUTS settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from qspjax.errors import QSPValidationError
from qspjax.params import CONFIG_DIR

REPO_ROOT = CONFIG_DIR.parent
QUANTITIES = ("median", "sd")
ENDPOINTS = ("response_counts", "orr", "pfs")


def _read_yaml(path: Path) -> Mapping:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise QSPValidationError(path, "(file)", str(path), f"cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise QSPValidationError(path, "(file)", str(path), f"is not valid YAML: {exc}") from None
    if not isinstance(doc, Mapping):
        raise QSPValidationError(path, "(top level)", doc, "a mapping is required")
    return doc


def _unknown(path, where: str, doc: Mapping, allowed: set[str]) -> None:
    extra = sorted(set(doc) - allowed)
    if extra:
        prefix = f"{where}." if where else ""
        raise QSPValidationError(path, f"{prefix}{extra[0]}", doc[extra[0]], f"unknown key; allowed: {sorted(allowed)}")


def _number(path, where: str, value: Any, lo: float | None = None, hi: float | None = None,
            positive: bool = False, integer: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and positive:
        ok = value > 0
    if ok and lo is not None:
        ok = value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        what = "an integer" if integer else "a finite number"
        bounds = " > 0" if positive else ""
        if lo is not None or hi is not None:
            bounds += f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise QSPValidationError(path, where, value, f"{what}{bounds} is required")
    return int(value) if integer else float(value)


def resolve_path(value: str | Path, relative_to: Path) -> Path:
    """A path from a config file: absolute, else relative to the file's folder, else to the repo root."""
    p = Path(value)
    if p.is_absolute():
        return p
    for base in (relative_to, REPO_ROOT):
        if (base / p).exists():
            return base / p
    return REPO_ROOT / p


# ---------------------------------------------------------------------------------------------
# Priors
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prior:
    """A normal prior on one unconstrained quantity.

    ``id`` is ``<parameter>`` for a population median and ``<parameter>.sd`` for its spread;
    ``center`` is in natural units (None = the parameter file's value / the population file's
    spread); ``sd`` is on the unconstrained (log or logit) scale.
    """

    id: str
    parameter: str
    quantity: str
    center: float | None
    sd: float
    source: str = ""


@dataclass(frozen=True)
class PriorSet:
    priors: tuple[Prior, ...]
    path: str = ""
    description: str = ""

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.priors)


def load_priors(path: str | Path, population_names: tuple[str, ...] | None = None) -> PriorSet:
    """Read and validate a priors file; ``population_names`` (the varied parameters of the population
    file) restricts which parameters may be estimated."""
    path = Path(path)
    doc = _read_yaml(path)
    _unknown(path, "", doc, {"description", "parameters"})
    entries = doc.get("parameters")
    if not isinstance(entries, list) or not entries:
        raise QSPValidationError(path, "parameters", entries, "a non-empty list of prior entries is required")
    priors, seen = [], set()
    for i, e in enumerate(entries):
        where = f"parameters[{i}]"
        if not isinstance(e, Mapping):
            raise QSPValidationError(path, where, e, "a mapping with parameter, quantity, prior is required")
        _unknown(path, where, e, {"parameter", "quantity", "prior", "source", "note"})
        name = e.get("parameter")
        if not isinstance(name, str) or not name:
            raise QSPValidationError(path, f"{where}.parameter", name, "a parameter name is required")
        if population_names is not None and name not in population_names:
            raise QSPValidationError(path, f"{where}.parameter", name,
                                     f"only parameters varied in the population file can be estimated: {list(population_names)}")
        quantity = e.get("quantity", "median")
        if quantity not in QUANTITIES:
            raise QSPValidationError(path, f"{where}.quantity", quantity, f"allowed values are {list(QUANTITIES)}")
        prior = e.get("prior")
        if not isinstance(prior, Mapping):
            raise QSPValidationError(path, f"{where}.prior", prior, "a mapping {type: normal, center, sd} is required")
        _unknown(path, f"{where}.prior", prior, {"type", "center", "sd"})
        if prior.get("type", "normal") != "normal":
            raise QSPValidationError(path, f"{where}.prior.type", prior.get("type"),
                                     "allowed values are ['normal'] (normal on the log/logit scale)")
        center = prior.get("center", "nominal")
        if center != "nominal":
            center = _number(path, f"{where}.prior.center", center, positive=True)
        sd = _number(path, f"{where}.prior.sd", prior.get("sd"), positive=True, hi=20.0)
        pid = name if quantity == "median" else f"{name}.sd"
        if pid in seen:
            raise QSPValidationError(path, f"{where}.parameter", name, f"{quantity} of {name} has two priors")
        seen.add(pid)
        priors.append(Prior(pid, name, quantity, None if center == "nominal" else center, sd, str(e.get("source", ""))))
    return PriorSet(tuple(priors), str(path), str(doc.get("description", "")))


# ---------------------------------------------------------------------------------------------
# Arm selection
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArmSelection:
    fit: tuple[str, ...]
    held_out: tuple[str, ...]
    endpoints: tuple[str, ...] = ENDPOINTS
    path: str = ""
    description: str = ""


def load_arm_selection(path: str | Path, known_arm_ids: tuple[str, ...] | None = None) -> ArmSelection:
    """Read and validate an arm-selection file (ids to fit, ids to hold out, endpoints used)."""
    path = Path(path)
    doc = _read_yaml(path)
    _unknown(path, "", doc, {"description", "fit", "held_out", "endpoints", "notes"})
    lists = {}
    for key in ("fit", "held_out"):
        ids = doc.get(key, [] if key == "held_out" else None)
        if not isinstance(ids, list) or (key == "fit" and not ids) or not all(isinstance(x, str) for x in ids):
            raise QSPValidationError(path, key, ids, "a list of arm ids (NCT...:arm) is required"
                                     + (", non-empty" if key == "fit" else ""))
        for j, arm_id in enumerate(ids):
            if known_arm_ids is not None and arm_id not in known_arm_ids:
                raise QSPValidationError(path, f"{key}[{j}]", arm_id, "unknown arm id (see `qspjax trials list`)")
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise QSPValidationError(path, key, dup, "an arm id is listed twice")
        lists[key] = tuple(ids)
    both = sorted(set(lists["fit"]) & set(lists["held_out"]))
    if both:
        raise QSPValidationError(path, "held_out", both[0], "an arm cannot be both fitted and held out")
    endpoints = doc.get("endpoints", list(ENDPOINTS))
    if not isinstance(endpoints, list) or not endpoints or any(e not in ENDPOINTS for e in endpoints):
        raise QSPValidationError(path, "endpoints", endpoints, f"a non-empty list from {list(ENDPOINTS)} is required")
    return ArmSelection(lists["fit"], lists["held_out"], tuple(endpoints), str(path), str(doc.get("description", "")))


# ---------------------------------------------------------------------------------------------
# Run file
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LikelihoodSettings:
    """How an arm is simulated and scored.

    ``patients``: virtual patients per arm (the same draws for every arm: common random numbers);
    ``horizon_days``: simulated days after day 0 (endpoints later than this are dropped);
    ``output_every_days``: output grid spacing (days; RECIST reads the nearest grid day);
    ``temperature``: of the smooth RECIST indicators; ``assessment_interval_days``: scan spacing;
    ``death_rate_per_day``: competing death hazard in PFS; ``target_lesions``: lesions in the SOD.
    """

    patients: int = 16
    seed: int = 0
    horizon_days: float = 365.0
    output_every_days: float = 7.0
    rtol: float = 1e-6
    temperature: float = 0.1
    assessment_interval_days: float = 56.0
    death_rate_per_day: float = 0.0
    target_lesions: tuple[str, ...] = ("irradiated", "non_irradiated")


OPTIMIZER_METHODS = ("adam", "lbfgs")


OPTIMIZER_DESIGNS = ("sobol", "prior")


@dataclass(frozen=True)
class OptimizerSettings:
    """Multi-start MAP optimisation (:func:`qspjax.inference.calibrate.calibrate`).

    ``starts`` points of a design (``sobol``: a scrambled Sobol sequence over the prior box, the
    prior centres +- ``box_sds`` prior sds; ``prior``: draws from the priors; the prior centre is
    always the first point) are each scored by one forward evaluation of the log posterior; the
    best ``optimize`` of them (None: all) are descended from by ``method`` for at most ``steps``
    steps, a start stopping (converged) when its loss has not improved by ``tolerance`` nats for
    ``patience`` steps. Final values within ``cluster_tolerance`` nats of the best are the best
    cluster of the waterfall plot. For the expensive QSP objective, screen many starts and
    optimise a few (``fit_advanced.yaml``); for cheap objectives optimise all.
    """

    starts: int = 64
    steps: int = 200
    learning_rate: float = 0.05
    patience: int = 25
    tolerance: float = 1e-3
    seed: int = 0
    optimize: int | None = None  # how many of the best-scoring starts are optimised; None: all
    method: str = "adam"  # one of OPTIMIZER_METHODS ("lbfgs": optax L-BFGS with a zoom line search)
    design: str = "sobol"  # one of OPTIMIZER_DESIGNS
    box_sds: float = 3.0
    cluster_tolerance: float = 0.1

    @property
    def optimized(self) -> int:
        return self.starts if self.optimize is None else min(self.optimize, self.starts)


@dataclass(frozen=True)
class NutsSettings:
    chains: int = 4
    warmup: int = 200
    samples: int = 200
    target_accept: float = 0.8
    max_tree_depth: int = 6
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    priors: Path
    arms: Path
    params: Path | None = None
    population: Path | None = None
    trials: Path | None = None
    likelihood: LikelihoodSettings = field(default_factory=LikelihoodSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    nuts: NutsSettings = field(default_factory=NutsSettings)
    path: str = ""
    description: str = ""


_LIK_RULES = {
    "patients": dict(integer=True, lo=1, hi=100_000), "seed": dict(integer=True, lo=0),
    "horizon_days": dict(positive=True, hi=3650), "output_every_days": dict(positive=True),
    "rtol": dict(positive=True, hi=1e-2), "temperature": dict(positive=True, hi=10),
    "assessment_interval_days": dict(positive=True), "death_rate_per_day": dict(lo=0.0, hi=1.0),
}
_OPT_RULES = {"starts": dict(integer=True, lo=1, hi=100_000), "steps": dict(integer=True, lo=1),
              "learning_rate": dict(positive=True, hi=10), "patience": dict(integer=True, lo=1),
              "tolerance": dict(lo=0.0), "seed": dict(integer=True, lo=0),
              "box_sds": dict(positive=True, hi=10.0), "cluster_tolerance": dict(positive=True)}
_NUTS_RULES = {"chains": dict(integer=True, lo=1), "warmup": dict(integer=True, lo=1),
               "samples": dict(integer=True, lo=1), "target_accept": dict(positive=True, hi=0.999),
               "max_tree_depth": dict(integer=True, lo=1, hi=12), "seed": dict(integer=True, lo=0)}


def _section(path, doc: Mapping, key: str, cls, rules: dict, extra: dict | None = None):
    sec = doc.get(key) or {}
    if not isinstance(sec, Mapping):
        raise QSPValidationError(path, key, sec, "a mapping is required")
    _unknown(path, key, sec, set(rules) | set(extra or {}))
    kwargs = {k: _number(path, f"{key}.{k}", v, **rules[k]) for k, v in sec.items() if k in rules}
    for k, check in (extra or {}).items():
        if k in sec:
            kwargs[k] = check(f"{key}.{k}", sec[k])
    return cls(**kwargs)


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a fit/infer run file; paths in it are resolved (see :func:`resolve_path`)."""
    path = Path(path)
    doc = _read_yaml(path)
    _unknown(path, "", doc, {"description", "priors", "arms", "params", "population", "trials",
                             "likelihood", "optimizer", "nuts"})
    paths = {}
    for key in ("priors", "arms", "params", "population", "trials"):
        value = doc.get(key)
        if value is None:
            if key in ("priors", "arms"):
                raise QSPValidationError(path, key, value, "a file path is required")
            paths[key] = None
            continue
        if not isinstance(value, str):
            raise QSPValidationError(path, key, value, "a file path is required")
        p = resolve_path(value, path.parent)
        if not p.exists():
            raise QSPValidationError(path, key, value, "no such file or directory")
        paths[key] = p

    def lesions(where, value):
        allowed = ("irradiated", "non_irradiated")
        if not isinstance(value, list) or not value or any(v not in allowed for v in value):
            raise QSPValidationError(path, where, value, f"a non-empty list from {list(allowed)} is required")
        return tuple(value)

    lik = _section(path, doc, "likelihood", LikelihoodSettings, _LIK_RULES, {"target_lesions": lesions})
    if lik.output_every_days > lik.horizon_days:
        raise QSPValidationError(path, "likelihood.output_every_days", lik.output_every_days,
                                 "must not exceed likelihood.horizon_days")
    def method(where, value):
        if value not in OPTIMIZER_METHODS:
            raise QSPValidationError(path, where, value, f"allowed values are {list(OPTIMIZER_METHODS)}")
        return value

    def design(where, value):
        if value not in OPTIMIZER_DESIGNS:
            raise QSPValidationError(path, where, value, f"allowed values are {list(OPTIMIZER_DESIGNS)}")
        return value

    def optimize(where, value):
        if value is None or value == "all":
            return None
        return _number(path, where, value, integer=True, lo=1)

    opt_doc = doc.get("optimizer") or {}
    if isinstance(opt_doc, Mapping) and "screen" in opt_doc:
        raise QSPValidationError(path, "optimizer.screen", opt_doc["screen"],
                                 "replaced by optimizer.starts (design points, each scored by a forward "
                                 "solve) and optimizer.optimize (how many of the best are optimised)")
    opt = _section(path, doc, "optimizer", OptimizerSettings, _OPT_RULES,
                   {"method": method, "design": design, "optimize": optimize})
    if opt.optimize is not None and opt.optimize > opt.starts:
        raise QSPValidationError(path, "optimizer.optimize", opt.optimize,
                                 f"at most optimizer.starts ({opt.starts}) starts can be optimised")
    nuts = _section(path, doc, "nuts", NutsSettings, _NUTS_RULES)
    return RunConfig(paths["priors"], paths["arms"], paths["params"], paths["population"], paths["trials"],
                     lik, opt, nuts, str(path), str(doc.get("description", "")))
