"""The patient digital twin: one patient's posterior from their lesion measurements, and what
each candidate regimen would do to their lesions next.

Input (:func:`load_patient`): a CSV or YAML file of lesion diameters over time (``day, lesion,
diameter_mm``; day 0 = first day of treatment, the RECIST baseline; irregular days and lesions
missing at some days are fine), optional blood lymphocyte counts and PD-L1 TPS, and the
treatment given so far as a regimen file (``configs/regimens/`` format). Everything is checked
before any compute; a bad row is refused naming the file, row, field, value and what is allowed.

Model (hierarchical: the patient is one draw of the population). The calibrated population
(``configs/params/calibrated/``) is the prior. The patient's parameters are non-centred
standard-normal deviations ``z`` (:data:`PATIENT_PARAMETERS`, the population file's log-normal
spreads for the four that govern growth, immune kill, T-cell infiltration and radiosensitivity;
the others stay at the population median), plus the baseline size of the largest lesion
(population log-normal) and the second lesion's size ratio. The prior carries the population's
plausibility screen as a smooth factor (:func:`qspjax.vpop.log_soft_plausibility`), as a trial's
cohort is screened: its density falls off smoothly where a draw could not grow to its baseline in
time or doubles implausibly fast or slowly. A draw is grown untreated to its
baseline size (:func:`qspjax.solver.simulate.grow_to_baseline`) and treated with the history regimen,
solved only up to the last measurement with output at the measurement days, at a looser
tolerance than trial runs (:data:`FIT_RTOL`).

Measurement error (RECIST reads are noisy): a read diameter ``y`` of a lesion whose true
diameter is ``d`` mm is ``y ~ Normal(d, sqrt((MEASUREMENT_CV d)^2 + MEASUREMENT_FLOOR_MM^2))``:
10 % of the diameter (multiplicative) and 1.5 mm (additive floor) in quadrature. Source:
repeat and inter-observer unidimensional CT measurements of NSCLC lesions differ by of the order
of 10-20 % (Erasmus et al., J Clin Oncol 2003;21:2574, inter- and intra-observer variability of
lung-lesion diameters; Zhao et al., Radiology 2009;252:263, same-day repeat CT: relative
differences in the longest diameter mostly within about +-10 %); the floor stands for the
voxel/calliper resolution of a few mm. A read below :data:`qspjax.outcomes.DETECTION_LIMIT_MM`
(5 mm; RECIST's "too small to measure" or gone) is left-censored: its likelihood is
``P(y < 5 mm)``, not a density at the value written.

Posterior: NUTS, its gradient in forward mode (:func:`forward_mode_gradient`), chains started at
prior draws resampled by likelihood (:func:`starting_points`); numpyro's kernel runs under one
compiled ``lax.scan`` per chain (so the patient's data are arguments and one compilation serves
every patient with the same design). One patient's chains run one after another; many patients
with one design (the coverage check) run as one vectorised batch (:func:`run_nuts_batch`), where
a forward-mode gradient costs about half as much per member (``benchmarks/twin_gradient.py
--batch``). Diagnostics:
split R-hat, bulk ESS, divergences (ArviZ); :func:`diagnose` refuses to predict when any fails
its threshold or when the posterior does not reproduce the data (prior-data conflict).

Prediction: posterior draws are solved to the horizon under the history continued and under
each candidate regimen (candidate day 0 = the decision day = last measurement day; events of
the history before that day are kept). Ranked by the probability of being progression-free at
the landmark, then by the expected burden (sum of target-lesion diameters) there.
"""

from __future__ import annotations

import csv
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qspjax.errors import QSPValidationError
from qspjax.outcomes import DETECTION_LIMIT_MM
from qspjax.regimen import (ChemoCourse, IciCourse, Regimen, RtCourse, Surgery, compile_schedule,
                            timeline_points)

LESIONS = ("irradiated", "non_irradiated")
PATIENT_PARAMETERS = ("k_C1_growth", "k_C_T1", "q_T1_T_in", "alpha_tumor")
MEASUREMENT_CV = 0.10
MEASUREMENT_FLOOR_MM = 1.5
MEASUREMENT_ERROR_SOURCE = (
    "y ~ Normal(d, sqrt((0.10 d)^2 + (1.5 mm)^2)); reads below 5 mm left-censored. Order of magnitude of "
    "unidimensional CT measurement variability of NSCLC lesions: Erasmus et al. J Clin Oncol 2003;21:2574 "
    "(inter/intra-observer), Zhao et al. Radiology 2009;252:263 (same-day repeat CT)")
FIT_RTOL = 1e-4
TPS_CLASS_NAMES = ("lt1", "1to49", "ge50")
CSV_COLUMNS = ("day", "lesion", "diameter_mm")
CSV_OPTIONAL = ("lymphocytes_per_ul", "pdl1_tps")
# Thresholds below which predictions are refused (Vehtari et al. 2021, Bayesian Analysis 16:667,
# recommend R-hat < 1.01 and ESS > 400 for final estimates; these are looser, for short runs).
MAX_RHAT = 1.05
MIN_ESS_BULK = 50.0
MAX_DIVERGENT_FRACTION = 0.01
MISFIT_Z = 4.0  # a read more than this many measurement sds from the fit counts as not reproduced


# =============================================================================================
# The patient file
# =============================================================================================
@dataclass(frozen=True)
class PatientData:
    """One patient's measurements (rows in file order, days non-decreasing)."""

    source: str
    day: np.ndarray  # (n,) days from the start of treatment
    lesion: np.ndarray  # (n,) index into LESIONS
    diameter_mm: np.ndarray  # (n,) read diameters, mm (>= 0; below DETECTION_LIMIT_MM = censored)
    lymphocytes: tuple[tuple[float, float], ...] = ()  # (day, cells per uL)
    pdl1_tps: float | None = None  # percent

    @property
    def n(self) -> int:
        return int(self.day.size)

    @property
    def last_day(self) -> float:
        return float(self.day.max())

    @property
    def censored(self) -> np.ndarray:
        return self.diameter_mm < DETECTION_LIMIT_MM

    @property
    def lesions_measured(self) -> tuple[int, ...]:
        return tuple(sorted(set(int(x) for x in self.lesion)))

    def tps_class(self) -> int | None:
        if self.pdl1_tps is None:
            return None
        return 0 if self.pdl1_tps < 1.0 else (1 if self.pdl1_tps < 50.0 else 2)


def _number(source, where, text, *, allow_empty=False):
    if text is None or (isinstance(text, str) and text.strip() == ""):
        if allow_empty:
            return None
        raise QSPValidationError(source, where, text, "a number is required (the field is empty)")
    if isinstance(text, bool):
        raise QSPValidationError(source, where, text, "a number is required")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise QSPValidationError(source, where, text, "a number is required") from None
    if not math.isfinite(value):
        raise QSPValidationError(source, where, text, "a finite number is required")
    return value


def load_patient(path: str | Path, horizon_days: float | None = None) -> PatientData:
    """Read and check a patient file (``.csv``, or ``.yaml``/``.yml``); refuse bad rows before compute.

    CSV columns: ``day, lesion, diameter_mm`` (required) and ``lymphocytes_per_ul``, ``pdl1_tps``
    (optional; TPS in percent, the same on every row where given). A row may leave
    ``diameter_mm`` empty when it only carries a lymphocyte count. YAML: ``measurements`` (a list of
    mappings with the three required keys), ``lymphocytes`` (list of ``{day, per_ul}``) and
    ``pdl1_tps``. Rules: ``day`` >= 0 and at most ``horizon_days``; rows in non-decreasing day order;
    ``lesion`` one of :data:`LESIONS`; ``diameter_mm`` >= 0 and < 500 (a read below 5 mm means too
    small to measure or gone, and is treated as censored); one read per lesion and day.
    """
    path = Path(path)
    src = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QSPValidationError(src, "(file)", src, f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise QSPValidationError(src, "(file)", src, "is not a UTF-8 text file") from None
    rows: list[tuple[str, dict]] = []  # (where, fields)
    tps_values: list[tuple[str, Any]] = []
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise QSPValidationError(src, "(file)", src, f"is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(doc, Mapping):
            raise QSPValidationError(src, "(top level)", doc, "a mapping with 'measurements' is required")
        unknown = set(doc) - {"measurements", "lymphocytes", "pdl1_tps", "description"}
        if unknown:
            key = sorted(unknown)[0]
            raise QSPValidationError(src, key, doc[key], "unknown key; allowed: description, measurements, lymphocytes, pdl1_tps")
        meas = doc.get("measurements")
        if not isinstance(meas, list) or not meas:
            raise QSPValidationError(src, "measurements", meas, "a non-empty list of {day, lesion, diameter_mm} is required")
        for i, m in enumerate(meas):
            if not isinstance(m, Mapping) or set(m) - set(CSV_COLUMNS) or not set(CSV_COLUMNS) <= set(m):
                raise QSPValidationError(src, f"measurements[{i}]", m, f"a mapping with exactly the keys {list(CSV_COLUMNS)} is required")
            rows.append((f"measurements[{i}]", dict(m)))
        for i, m in enumerate(doc.get("lymphocytes") or []):
            if not isinstance(m, Mapping) or set(m) != {"day", "per_ul"}:
                raise QSPValidationError(src, f"lymphocytes[{i}]", m, "a mapping with the keys day, per_ul is required")
            rows.append((f"lymphocytes[{i}]", {"day": m["day"], "lymphocytes_per_ul": m["per_ul"], "lesion": None,
                                               "diameter_mm": None}))
        if doc.get("pdl1_tps") is not None:
            tps_values.append(("pdl1_tps", doc["pdl1_tps"]))
    else:
        reader = csv.reader(text.splitlines())
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise QSPValidationError(src, "(header)", "", f"the file is empty; columns {list(CSV_COLUMNS)} are required") from None
        for col in header:
            if col not in CSV_COLUMNS + CSV_OPTIONAL:
                raise QSPValidationError(src, "(header)", col,
                                         f"unknown column; allowed: {list(CSV_COLUMNS + CSV_OPTIONAL)}")
        for col in CSV_COLUMNS:
            if col not in header:
                raise QSPValidationError(src, "(header)", header, f"the column {col!r} is required")
        for k, values in enumerate(reader, start=1):
            if not values or all(not v.strip() for v in values):
                continue
            where = f"row {k} (line {k + 1})"
            if len(values) != len(header):
                raise QSPValidationError(src, where, values, f"{len(header)} fields are required ({', '.join(header)})")
            fields = dict(zip(header, (v.strip() for v in values)))
            if "pdl1_tps" in fields and fields["pdl1_tps"] != "":
                tps_values.append((f"{where} pdl1_tps", fields.pop("pdl1_tps")))
            rows.append((where, fields))
    days, lesions, diam, lymph = [], [], [], []
    seen: dict[tuple[float, int], str] = {}
    previous: dict[str, tuple[float, str]] = {}  # per list (YAML) or for the whole file (CSV)
    for where, f in rows:
        group = where.split("[")[0] if "[" in where else "rows"
        previous_day, previous_where = previous.get(group, (-math.inf, None))
        day = _number(src, f"{where} day", f.get("day"))
        if day < 0:
            raise QSPValidationError(src, f"{where} day", f.get("day"),
                                     "must be >= 0 (day 0 = first day of treatment, the baseline scan)")
        if horizon_days is not None and day > horizon_days:
            raise QSPValidationError(src, f"{where} day", f.get("day"),
                                     f"a measurement after the horizon ({horizon_days:g} days) is not allowed; "
                                     "raise --horizon or drop the row")
        if day < previous_day:
            raise QSPValidationError(src, f"{where} day", f.get("day"),
                                     f"days must not decrease down the file (the previous row, {previous_where}, "
                                     f"has day {previous_day:g}); sort the rows by day")
        previous[group] = (day, where)
        lym = f.get("lymphocytes_per_ul")
        if lym is not None and str(lym).strip() != "":
            value = _number(src, f"{where} lymphocytes_per_ul", lym)
            if not 0 < value < 1e5:
                raise QSPValidationError(src, f"{where} lymphocytes_per_ul", lym, "must be in (0, 100000) cells per uL")
            lymph.append((day, value))
        d = _number(src, f"{where} diameter_mm", f.get("diameter_mm"), allow_empty=lym is not None and str(lym).strip() != "")
        if d is None:
            continue
        if d < 0 or d >= 500:
            raise QSPValidationError(src, f"{where} diameter_mm", f.get("diameter_mm"),
                                     f"must be in [0, 500) mm (a lesion too small to measure or gone: 0 or any "
                                     f"value below {DETECTION_LIMIT_MM:g} mm)")
        name = f.get("lesion")
        if name not in LESIONS:
            raise QSPValidationError(src, f"{where} lesion", name,
                                     f"unknown lesion; allowed: {list(LESIONS)} (the model's two lesions)")
        li = LESIONS.index(name)
        if (day, li) in seen:
            raise QSPValidationError(src, f"{where} day", f.get("day"),
                                     f"lesion {name!r} is already measured on day {day:g} ({seen[(day, li)]}); "
                                     "one read per lesion and day is allowed")
        seen[(day, li)] = where
        days.append(day)
        lesions.append(li)
        diam.append(d)
    if not days:
        raise QSPValidationError(src, "diameter_mm", None, "at least one lesion diameter is required")
    tps = None
    for where, value in tps_values:
        v = _number(src, where, value)
        if not 0 <= v <= 100:
            raise QSPValidationError(src, where, value, "PD-L1 TPS in percent, in [0, 100], is required")
        if tps is not None and v != tps:
            raise QSPValidationError(src, where, value, f"must be the same on every row (earlier: {tps:g})")
        tps = v
    return PatientData(src, np.asarray(days, float), np.asarray(lesions, int), np.asarray(diam, float),
                       tuple(lymph), tps)


# =============================================================================================
# Regimens: the history continued, or switched to a candidate at the decision day
# =============================================================================================
def switch_regimen(history: Regimen, candidate: Regimen, decision_day: float) -> Regimen:
    """``history`` before ``decision_day``, then ``candidate`` with its day 0 on ``decision_day``."""
    before = lambda d: d < decision_day - 1e-9
    ici = [IciCourse(1.0, d, 1, c.drug, c.dose, c.unit) for c in history.ici for d in c.days() if before(d)]
    ici += [IciCourse(c.interval_days, c.start_day + decision_day, c.cycles, c.drug, c.dose, c.unit) for c in candidate.ici]
    rt = [RtCourse(c.dose_per_fraction_gy, tuple(d for d in c.days if before(d)), c.lesion, c.technique)
          for c in history.rt]
    rt = [c for c in rt if c.days]
    rt += [RtCourse(c.dose_per_fraction_gy, tuple(d + decision_day for d in c.days), c.lesion, c.technique)
           for c in candidate.rt]
    chemo = [ChemoCourse(1.0, d, 1, c.name, c.kill_fraction) for c in history.chemo for d in c.days() if before(d)]
    chemo += [ChemoCourse(c.interval_days, c.start_day + decision_day, c.cycles, c.name, c.kill_fraction)
              for c in candidate.chemo]
    surgery = [s for s in history.surgery if before(s.day)]
    surgery += [Surgery(s.day + decision_day, s.lesion, s.pathology) for s in candidate.surgery]
    return Regimen(candidate.name, tuple(ici), tuple(rt), tuple(chemo), tuple(surgery), candidate.description,
                   candidate.source)


# =============================================================================================
# Simulators: theta (standard-normal deviations) -> lesion diameters on a schedule's grid
# =============================================================================================
class QSPTwinSimulator:
    """The QSP model as a function of the patient's deviations ``z`` (D,).

    ``z[:4]`` scale :data:`PATIENT_PARAMETERS` log-normally around the population medians with the
    population's spreads; ``z[4]`` is the baseline diameter of the largest lesion (population
    log-normal, median and CV from the population file; not clipped, so the density stays smooth);
    ``z[5]`` the second lesion's seed-size ratio (population log-normal).
    """

    def __init__(self, params, spec, drugs: Sequence[str], config=None):
        from qspjax.solver.simulate import SolverConfig
        from qspjax.vpop import _lognormal_sd

        self.params, self.spec = params, spec
        self.drugs = tuple(drugs)
        # The pre-treatment growth may run to twice the plausibility screen's longest growth, so
        # the solver's own limit lies where the smooth screen has already fallen by ~e^-20.
        longest = spec.plausibility.growth_days[1]
        self.config = config or SolverConfig(rtol=FIT_RTOL, atol=FIT_RTOL * 1e-3, autodiff="forward",
                                             pretreatment_max_days=2.0 * longest if math.isfinite(longest)
                                             else SolverConfig.pretreatment_max_days)
        missing = [n for n in PATIENT_PARAMETERS if n not in spec.cv]
        self.varied = tuple(n for n in PATIENT_PARAMETERS if n in spec.cv)
        self.missing = tuple(missing)
        self.median = {n: float(params.values[n]) for n in self.varied}
        self.sd = {n: _lognormal_sd(spec.cv[n]) for n in self.varied}
        self.names = self.varied + ("baseline_diameter_mm", "second_lesion_ratio")
        self.median["baseline_diameter_mm"] = 10.0 * spec.diameter_median_cm
        self.sd["baseline_diameter_mm"] = _lognormal_sd(spec.diameter_cv)
        self.median["second_lesion_ratio"] = spec.second_lesion_median
        self.sd["second_lesion_ratio"] = _lognormal_sd(spec.second_lesion_cv)
        self.tps_multipliers = tuple(spec.tps_multipliers)
        self.default_tps_class = int(np.argmax(spec.tps_probabilities))

    @property
    def dim(self) -> int:
        return len(self.names)

    def natural(self, z) -> dict[str, np.ndarray]:
        z = np.asarray(z)
        return {n: self.median[n] * np.exp(self.sd[n] * z[..., i]) for i, n in enumerate(self.names)}

    def prior_record(self) -> dict:
        return {n: {"median": self.median[n], "log_sd": self.sd[n], "distribution": "lognormal"} for n in self.names}

    def __call__(self, z, schedule, pdl1_multiplier):
        """(diameters in mm (G, L), ok, log screen) for one patient: the log of the population's
        smooth plausibility screen (:func:`qspjax.vpop.log_soft_plausibility`) at this draw's baseline."""
        from qspjax.model.reference import state_from_species
        from qspjax.solver.simulate import STATUS_OK, grow_to_baseline, simulate_patient, untreated_seed_state
        from qspjax.vpop import baseline_growth_rate, build_models, log_soft_plausibility

        values = {n: jnp.reshape(self.median[n] * jnp.exp(self.sd[n] * z[i]), (1,)) for i, n in enumerate(self.varied)}
        k = len(self.varied)
        diameter_cm = 0.1 * self.median["baseline_diameter_mm"] * jnp.exp(self.sd["baseline_diameter_mm"] * z[k])
        ratio = self.median["second_lesion_ratio"] * jnp.exp(self.sd["second_lesion_ratio"] * z[k + 1])
        model = build_models(self.params, values, 1, self.drugs, 2, jnp.reshape(pdl1_multiplier, (1,)))
        model = jax.tree_util.tree_map(lambda x: x[0], model)
        seed = untreated_seed_state(model, state_from_species(model, self.params.initial_state))
        seed["C1"] = seed["C1"].at[1].multiply(ratio ** 3)
        y0, grow_status, grow_days = grow_to_baseline(model, seed, diameter_cm, self.config)
        screen = log_soft_plausibility(self.spec.plausibility, baseline_growth_rate(model, y0), grow_days, y0["T1_C"])
        traj = simulate_patient(model, y0, schedule, self.config)
        d = 10.0 * jax.vmap(model.observables)(traj.ys)["tumor_diameter_cm"]
        ok = (grow_status == STATUS_OK) & (traj.status == STATUS_OK) & jnp.all(jnp.isfinite(d)) & jnp.isfinite(screen)
        return jnp.where(jnp.isfinite(d), d, 0.0), ok, jnp.where(ok, screen, -jnp.inf)


class ToyTwinSimulator:
    """A closed-form stand-in with the same interface, for fast tests of the machinery.

    Lesion l: ``log d_l(t) = log d0_l + g t - k * (antibody mg given up to t) / 1000``, with
    ``g``, ``k``, ``d0`` log-normal in ``z``; lesion 2 starts at ``0.6 d0``.
    """

    names = ("growth_per_day", "kill_per_gram", "baseline_diameter_mm")
    median = {"growth_per_day": 0.01, "kill_per_gram": 0.6, "baseline_diameter_mm": 30.0}
    sd = {"growth_per_day": 0.5, "kill_per_gram": 0.5, "baseline_diameter_mm": 0.4}
    tps_multipliers = (1.0, 1.0, 1.0)
    default_tps_class = 1
    drugs = ("nivolumab", "pembrolizumab")
    missing = ()

    dim = property(lambda self: len(self.names))
    natural = QSPTwinSimulator.natural
    prior_record = QSPTwinSimulator.prior_record

    def __call__(self, z, schedule, pdl1_multiplier):
        g, k, d0 = (self.median[n] * jnp.exp(self.sd[n] * z[i]) for i, n in enumerate(self.names))
        t = schedule.output_days
        upto = jnp.sum(jnp.where(schedule.times[None, :] <= t[:, None] + 1e-9,
                                 jnp.sum(schedule.dose_mg, axis=1)[None, :], 0.0), axis=1)
        log_d = jnp.log(d0) + g * t - k * upto / 1000.0
        d = jnp.exp(log_d)[:, None] * jnp.asarray([1.0, 0.6])[None, :]
        return d, jnp.asarray(True), jnp.asarray(0.0)


# =============================================================================================
# Likelihood and NUTS
# =============================================================================================
def measurement_sd(d_mm):
    return jnp.sqrt((MEASUREMENT_CV * d_mm) ** 2 + MEASUREMENT_FLOOR_MM ** 2)


def read_log_likelihood(d_mm, y_mm, censored):
    """Per-read log-likelihood: Normal density, or P(y < detection limit) for a censored read."""
    from jax.scipy.stats import norm

    sd = measurement_sd(d_mm)
    dens = norm.logpdf(y_mm, d_mm, sd)
    cens = norm.logcdf((DETECTION_LIMIT_MM - d_mm) / sd)
    return jnp.where(censored, cens, dens)


def standardized_residuals(d_mm, y_mm, censored):
    """(y - d) / sd for measured reads; for censored ones how far the model lies above the limit
    (0 when the model is below it too)."""
    sd = measurement_sd(d_mm)
    return np.where(censored, np.maximum(0.0, (np.asarray(d_mm) - DETECTION_LIMIT_MM) / sd), (y_mm - d_mm) / sd)


@dataclass
class FitData:
    """The arrays the compiled potential reads (one compile per design shape)."""

    schedule: Any
    obs_index: np.ndarray
    obs_lesion: np.ndarray
    y: np.ndarray
    censored: np.ndarray
    pdl1_multiplier: float

    def tree(self):
        return {"schedule": self.schedule, "obs_index": jnp.asarray(self.obs_index), "obs_lesion": jnp.asarray(self.obs_lesion),
                "y": jnp.asarray(self.y), "censored": jnp.asarray(self.censored),
                "pdl1_multiplier": jnp.asarray(self.pdl1_multiplier, dtype=float)}


def fit_data(patient: PatientData, history: Regimen, drugs: Sequence[str], pdl1_multiplier: float) -> FitData:
    grid = np.unique(np.concatenate([[0.0], patient.day]))
    schedule = compile_schedule(history, drugs, grid, n_lesions=2, n_points=timeline_points(history, grid))
    idx = np.searchsorted(grid, patient.day)
    return FitData(schedule, idx, patient.lesion, patient.diameter_mm, patient.censored, pdl1_multiplier)


def _log_density(simulator, z, data):
    """Log posterior density of the deviations (up to a constant): the reads' likelihood, the
    standard-normal population prior and the population's smooth plausibility screen (the twin's
    prior is the population a trial draws from: lognormal spreads, then screened)."""
    d, ok, screen = simulator(z, data["schedule"], data["pdl1_multiplier"])
    d_obs = d[data["obs_index"], data["obs_lesion"]]
    ll = jnp.sum(read_log_likelihood(d_obs, data["y"], data["censored"]))
    prior = -0.5 * jnp.sum(z ** 2) + screen
    return jnp.where(ok & jnp.isfinite(ll), ll + prior, -jnp.inf)


def forward_mode_gradient(f: Callable) -> Callable:
    """``f`` (R^D -> R) whose reverse-mode derivative (what NUTS asks for) is computed in forward
    mode: the value and all D directional derivatives in one pass (``jax.vmap`` of ``jax.jvp`` over
    the unit vectors; the primal solve is shared, not batched). For an ODE solve with few
    parameters this is cheaper than reverse mode, which stores or recomputes the forward solve."""

    @jax.custom_vjp
    def g(z):
        return f(z)

    def g_fwd(z):
        values, grad = jax.vmap(lambda t: jax.jvp(f, (z,), (t,)))(jnp.eye(z.shape[0], dtype=z.dtype))
        return values[0], grad

    def g_bwd(grad, ct):
        return (ct * grad,)

    g.defvjp(g_fwd, g_bwd)
    return g


@functools.partial(jax.jit, static_argnames=("simulator", "warmup", "samples", "max_tree_depth", "target_accept",
                                             "report_every"))
def _run_chain(key, z0, data, *, simulator, warmup, samples, max_tree_depth, target_accept, report_every=0):
    from numpyro.infer import NUTS

    def potential(z):
        return -_log_density(simulator, z, data)

    if getattr(getattr(simulator, "config", None), "autodiff", "reverse") == "forward":
        potential = forward_mode_gradient(potential)
    kernel = NUTS(potential_fn=potential, max_tree_depth=max_tree_depth, target_accept_prob=target_accept,
                  dense_mass=True)
    state = kernel.init(key, warmup, init_params=z0)

    def body(s, i):
        s = kernel.sample(s, (), {})
        if report_every:
            jax.lax.cond((i + 1) % report_every == 0,
                         lambda: jax.debug.print("  NUTS iteration {i}/{n}: {k} leapfrog steps", i=i + 1,
                                                 n=warmup + samples, k=s.num_steps),
                         lambda: None)
        return s, (s.z, s.diverging, s.num_steps, s.potential_energy, s.accept_prob, s.adapt_state.step_size)

    _, trace = jax.lax.scan(body, state, jnp.arange(warmup + samples))
    return trace


@dataclass
class Chains:
    z: np.ndarray  # (chains, samples, D)
    diverging: np.ndarray  # (chains, samples)
    num_steps: np.ndarray  # (chains, samples)
    potential_energy: np.ndarray
    step_size: np.ndarray  # (chains,) adapted
    warmup_num_steps: np.ndarray  # (chains, warmup)
    seconds: float


def starting_points(z: np.ndarray, d_at_reads: np.ndarray, patient: PatientData, k: int,
                    rng: np.random.Generator) -> np.ndarray:
    """``k`` starting points for the chains, inside the screened prior and spread like the
    posterior: prior draws (rows of ``z``, their diameters at the reads ``d_at_reads``) resampled
    without replacement with weights proportional to their likelihood (sampling-importance
    resampling, Rubin 1988); where fewer than ``k`` draws carry weight, the most likely repeat."""
    ll = np.sum(np.asarray(read_log_likelihood(d_at_reads, patient.diameter_mm, patient.censored)), axis=1)
    ll = np.where(np.isfinite(ll), ll, -np.inf)
    w = np.exp(ll - np.max(ll))
    carrying = int(np.count_nonzero(w > 1e-12))
    if carrying >= k:
        return z[rng.choice(len(z), size=k, replace=False, p=w / w.sum())]
    top = np.argsort(-ll)[:max(carrying, 1)]
    return z[top[np.arange(k) % len(top)]]


def _chain_keys(seed: int, chains: int) -> list[tuple[jax.Array, jax.Array]]:
    """(init key, run key) of each chain of a fit seeded ``seed`` (the same for one patient fitted
    alone or in a batch)."""
    key = jax.random.PRNGKey(seed)
    out = []
    for _ in range(chains):
        key, k_init, k_run = jax.random.split(key, 3)
        out.append((k_init, k_run))
    return out


def _chain_start(simulator, k_init, inits, c: int, init_radius: float) -> jax.Array:
    if inits is not None:
        return jnp.asarray(inits[c], dtype=float)
    return jax.random.uniform(k_init, (simulator.dim,), minval=-init_radius, maxval=init_radius, dtype=float)


def _chains_from_traces(traces: list, warmup: int, seconds: float) -> Chains:
    """Stack per-chain traces (z, diverging, steps, potential, accept, step size) into :class:`Chains`."""
    z = np.stack([o[0][warmup:] for o in traces])
    return Chains(z, np.stack([o[1][warmup:] for o in traces]), np.stack([o[2][warmup:] for o in traces]),
                  np.stack([o[3][warmup:] for o in traces]), np.array([o[5][-1] for o in traces]),
                  np.stack([o[2][:warmup] for o in traces]), seconds)


def run_nuts(simulator, data: FitData, *, chains: int = 2, warmup: int = 100, samples: int = 100, seed: int = 0,
             max_tree_depth: int = 4, target_accept: float = 0.8, init_radius: float = 0.5,
             progress: Callable[[str], None] | None = None, report_every: int = 0,
             inits: np.ndarray | None = None) -> Chains:
    """``chains`` NUTS chains one after another (one compile); chain c starts at ``inits[c]``, or
    without ``inits`` at a uniform draw in [-init_radius, init_radius]^D around the population
    median."""
    tree = data.tree()
    out = []
    t0 = time.perf_counter()
    for c, (k_init, k_run) in enumerate(_chain_keys(seed, chains)):
        z0 = _chain_start(simulator, k_init, inits, c, init_radius)
        trace = _run_chain(k_run, z0, tree, simulator=simulator, warmup=warmup, samples=samples,
                           max_tree_depth=max_tree_depth, target_accept=target_accept, report_every=report_every)
        out.append(jax.tree_util.tree_map(np.asarray, trace))
        if progress:
            progress(f"chain {c + 1}/{chains} done ({time.perf_counter() - t0:.0f} s)")
    return _chains_from_traces(out, warmup, time.perf_counter() - t0)


def run_nuts_batch(simulator, datas: Sequence[FitData], seeds: Sequence[int], *, chains: int = 2,
                   warmup: int = 100, samples: int = 100, max_tree_depth: int = 4, target_accept: float = 0.8,
                   init_radius: float = 0.5, inits: Sequence[np.ndarray] | None = None) -> list[Chains]:
    """Several patients' fits in one vectorised run: every chain of every patient is one member of
    a ``jax.vmap`` over the compiled chain (the patients must share a design: the same read days,
    lesions and history, so their data stack). Patient ``p`` with seed ``seeds[p]`` gets the chain
    keys and starts :func:`run_nuts` would give it. On CPU a batched forward-mode gradient costs
    about half as much per member as one alone (``benchmarks/RESULTS.md``), which is what the
    coverage check over many synthetic patients needs; a single patient's fit stays sequential.

    Run it with ``EQX_ON_ERROR=nan`` in the environment (set before Equinox is imported; the
    coverage script does): members of a vmapped adaptive solve that have finished keep stepping on
    stale values, and a NaN there would trip Equinox's runtime checks for the whole batch."""
    if len(datas) != len(seeds) or not datas:
        raise ValueError(f"run_nuts_batch: {len(datas)} data sets and {len(seeds)} seeds (need equal, at least one)")
    trees = [d.tree() for d in datas]
    shapes = {str(jax.tree_util.tree_map(jnp.shape, t)) for t in trees}
    if len(shapes) != 1:
        raise ValueError("run_nuts_batch: the patients' designs differ (read days, lesions or schedule); fit them apart")
    keys, z0s, members = [], [], []
    for p, seed in enumerate(seeds):
        for c, (k_init, k_run) in enumerate(_chain_keys(seed, chains)):
            keys.append(k_run)
            z0s.append(_chain_start(simulator, k_init, None if inits is None else inits[p], c, init_radius))
            members.append(trees[p])
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *members)
    run = functools.partial(_run_chain, simulator=simulator, warmup=warmup, samples=samples,
                            max_tree_depth=max_tree_depth, target_accept=target_accept)
    t0 = time.perf_counter()
    traces = jax.tree_util.tree_map(np.asarray, jax.jit(jax.vmap(run))(jnp.stack(keys), jnp.stack(z0s), stacked))
    seconds = (time.perf_counter() - t0) / len(datas)
    per_member = [jax.tree_util.tree_map(lambda x, m=m: x[m], traces) for m in range(len(members))]
    return [_chains_from_traces(per_member[p * chains:(p + 1) * chains], warmup, seconds) for p in range(len(datas))]


def inference_data(chains: Chains, simulator, patient: PatientData):
    """ArviZ InferenceData: posterior of the deviations ``z_<name>`` and natural values ``<name>``."""
    import arviz as az

    post = {}
    nat = simulator.natural(chains.z)
    for i, n in enumerate(simulator.names):
        post[f"z_{n}"] = chains.z[..., i]
        post[n] = nat[n]
    stats = {"diverging": chains.diverging, "n_steps": chains.num_steps, "lp": -chains.potential_energy}
    idata = az.from_dict(posterior=post, sample_stats=stats,
                         observed_data={"diameter_mm": patient.diameter_mm},
                         constant_data={"day": patient.day, "lesion": patient.lesion})
    idata.posterior.attrs["measurement_error_model"] = MEASUREMENT_ERROR_SOURCE
    idata.posterior.attrs["parameterisation"] = "z_*: standard-normal deviations; natural = median * exp(log_sd * z)"
    return idata


def diagnostics(chains: Chains, simulator) -> dict:
    import arviz as az

    ds = az.convert_to_dataset({f"z_{n}": chains.z[..., i] for i, n in enumerate(simulator.names)})
    rhat = az.rhat(ds)
    ess = az.ess(ds, method="bulk")
    per = {n: {"rhat": float(rhat[f"z_{n}"]), "ess_bulk": float(ess[f"z_{n}"])} for n in simulator.names}
    n_draws = int(chains.diverging.size)
    return {"rhat_max": max(v["rhat"] for v in per.values()), "ess_bulk_min": min(v["ess_bulk"] for v in per.values()),
            "divergences": int(chains.diverging.sum()), "draws": n_draws, "chains": int(chains.z.shape[0]),
            "per_parameter": per, "mean_leapfrog_steps": float(chains.num_steps.mean()),
            "step_size": chains.step_size.tolist()}


def diagnose(diag: dict, conflict: dict | None = None, *, max_rhat: float = MAX_RHAT, min_ess: float = MIN_ESS_BULK,
             max_divergent_fraction: float = MAX_DIVERGENT_FRACTION) -> list[str]:
    """Reasons to refuse predictions (empty: predict). NaN R-hat/ESS (e.g. one chain) fail."""
    reasons = []
    if not (diag["rhat_max"] <= max_rhat):
        reasons.append(f"R-hat {diag['rhat_max']:.3g} > {max_rhat:g}: chains disagree (not converged)")
    if not (diag["ess_bulk_min"] >= min_ess):
        reasons.append(f"bulk ESS {diag['ess_bulk_min']:.3g} < {min_ess:g}: too few effective draws")
    if diag["divergences"] > max_divergent_fraction * diag["draws"]:
        reasons.append(f"{diag['divergences']} divergent transitions of {diag['draws']} (> {max_divergent_fraction:.0%}): "
                       "the posterior geometry was not explored reliably")
    if conflict and conflict.get("posterior_misfit"):
        reasons.append(conflict["message"])
    return reasons


# =============================================================================================
# Batched forward solves (prior check, posterior predictive)
# =============================================================================================
@functools.partial(jax.jit, static_argnames=("simulator",))
def _solve_batch(zs, schedule, pdl1_multiplier, *, simulator):
    return jax.vmap(lambda z: simulator(z, schedule, pdl1_multiplier))(zs)


def solve_draws(simulator, zs: np.ndarray, schedule, pdl1_multiplier: float, chunk: int = 8):
    """Diameters (n, G, L), ok (n,) and the log plausibility screen (n,) of each row of ``zs``, in
    fixed-size chunks (one compile)."""
    n = zs.shape[0]
    ds, oks, screens = [], [], []
    for start in range(0, n, chunk):
        idx = np.minimum(np.arange(start, start + chunk), n - 1)
        d, ok, screen = _solve_batch(jnp.asarray(zs[idx]), schedule, jnp.asarray(pdl1_multiplier, dtype=float),
                                     simulator=simulator)
        m = min(chunk, n - start)
        ds.append(np.asarray(d)[:m])
        oks.append(np.asarray(ok)[:m])
        screens.append(np.asarray(screen)[:m])
    return np.concatenate(ds), np.concatenate(oks), np.concatenate(screens)


def prior_draws(simulator, n: int, rng: np.random.Generator, schedule, pdl1_multiplier: float, chunk: int = 8,
                max_rounds: int = 20):
    """``n`` draws of the twin's prior (the screened population) by rejection: standard-normal
    deviations, each kept with probability exp(log screen) when it solves. Returns (z (n, D),
    diameters (n, G, L), record of draws tried and kept); fewer than ``n`` rows only if
    ``max_rounds`` rounds could not find them."""
    zs, ds, tried = [], [], 0
    for _ in range(max_rounds):
        need = n - sum(len(z) for z in zs)
        if need <= 0:
            break
        z = rng.standard_normal((max(need, chunk), simulator.dim))
        d, ok, screen = solve_draws(simulator, z, schedule, pdl1_multiplier, chunk)
        keep = ok & (rng.random(len(z)) < np.exp(np.where(ok, screen, -np.inf)))
        tried += len(z)
        zs.append(z[keep][:need])
        ds.append(d[keep][:need])
    z, d = np.concatenate(zs), np.concatenate(ds)
    return z, d, {"tried": tried, "kept": int(len(z)), "acceptance": len(z) / max(tried, 1)}


def conflict_check(patient: PatientData, d_obs_prior: np.ndarray, ok_prior: np.ndarray, d_obs_post: np.ndarray,
                   ok_post: np.ndarray, misfit_z: float = MISFIT_Z) -> dict:
    """Prior-data conflict: does any prior draw reproduce every read within ``misfit_z`` sds, and
    does the posterior (median over draws of the worst read's |residual|)?

    ``d_obs_*`` are the model's diameters at the reads (draws, n).
    """
    def worst(d):
        r = standardized_residuals(d, patient.diameter_mm[None, :], patient.censored[None, :])
        return np.max(np.abs(r), axis=1), r

    out: dict[str, Any] = {"misfit_threshold_sd": misfit_z}
    if d_obs_prior is not None and d_obs_prior.size:
        w, _ = worst(d_obs_prior[ok_prior]) if ok_prior.any() else (np.array([np.inf]), None)
        out["prior_draws"] = int(d_obs_prior.shape[0])
        out["prior_draws_compatible"] = int(np.sum(w <= misfit_z))
        out["prior_conflict"] = bool(np.all(w > misfit_z))
    w, r = worst(d_obs_post[ok_post]) if ok_post.any() else (np.array([np.inf]), None)
    med = float(np.median(w))
    out["posterior_worst_abs_residual_sd"] = med
    out["posterior_misfit"] = bool(not med <= misfit_z)
    if r is not None:
        rmed = np.median(r, axis=0)
        i = int(np.argmax(np.abs(rmed)))
        d_med = np.median(d_obs_post[ok_post][:, i])
        out["worst_read"] = {"day": float(patient.day[i]), "lesion": LESIONS[int(patient.lesion[i])],
                             "measured_mm": float(patient.diameter_mm[i]), "posterior_median_mm": float(d_med),
                             "residual_sd": float(rmed[i])}
    if out["posterior_misfit"]:
        wr = out.get("worst_read", {})
        prior = (f"; none of the {out['prior_draws']} prior draws reproduced the data either"
                 if out.get("prior_conflict") else "")
        out["message"] = (f"prior-data conflict: the model drawn from the population cannot reproduce this patient's "
                          f"reads (worst: {wr.get('lesion')} on day {wr.get('day', math.nan):g}, measured "
                          f"{wr.get('measured_mm', math.nan):.1f} mm, fitted {wr.get('posterior_median_mm', math.nan):.1f} mm, "
                          f"{abs(wr.get('residual_sd', math.nan)):.1f} measurement sds off){prior}. Check the file "
                          f"(units, lesion labels, days) or the population prior; no prediction is made")
    elif out.get("prior_conflict"):
        out["message"] = (f"no prior draw of {out['prior_draws']} reproduced every read within {misfit_z:g} sds, but the "
                          "posterior does: the data are informative, not contradictory")
    return out


# =============================================================================================
# Ranking
# =============================================================================================
def regimen_outcomes(grid: np.ndarray, d: np.ndarray, ok: np.ndarray, targets: Sequence[int], landmark: float,
                     assessment_interval_days: float = 56.0) -> dict:
    """RECIST outcomes over posterior draws of one regimen: d (draws, G, L) in mm on ``grid``
    (day 0 first). Response = best overall response CR/PR (unconfirmed) up to the landmark;
    progression-free = no PD at an assessment up to the landmark; burden = sum of target-lesion
    diameters at the landmark."""
    from qspjax.outcomes import CR, PR, best_overall_response, recist_assessments

    upto = grid <= landmark + 1e-9
    g = grid[upto]
    dd = np.transpose(d[:, upto, :], (0, 2, 1))  # (draws, L, G)
    mask = np.zeros(d.shape[2], bool)
    mask[list(targets)] = True
    a = recist_assessments(g, dd, mask, ok, assessment_interval_days=assessment_interval_days)
    best = best_overall_response(a)
    good = ok.astype(bool)
    resp = np.isin(best.category, (CR, PR))[good]
    pfs = ~(np.isfinite(best.progression_day) & (best.progression_day <= landmark + 1e-9))[good]
    burden = dd[good][:, mask, -1].sum(axis=1)
    return {"p_response": float(resp.mean()) if resp.size else math.nan,
            "p_progression_free": float(pfs.mean()) if pfs.size else math.nan,
            "expected_burden": float(burden.mean()) if burden.size else math.nan,
            "burden_q05": float(np.quantile(burden, 0.05)) if burden.size else math.nan,
            "burden_q95": float(np.quantile(burden, 0.95)) if burden.size else math.nan,
            "draws": int(good.sum()), "failed_draws": int((~good).sum())}


def rank(rows: list[dict]) -> list[dict]:
    """Highest probability progression-free first; ties (within 1e-12) by lower expected burden."""
    ordered = sorted(rows, key=lambda r: (-round(r["p_progression_free"], 12), r["expected_burden"]))
    for i, r in enumerate(ordered, start=1):
        r["rank"] = i
    return ordered


RANKING_COLUMNS = ("rank", "regimen", "file", "p_response", "p_progression_free", "expected_burden", "burden_q05",
                   "burden_q95", "landmark_day", "draws", "failed_draws")


def ranking_csv(rows: list[dict]) -> str:
    import io as _io

    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RANKING_COLUMNS)
    for r in rows:
        w.writerow([(repr(float(r[c])) if isinstance(r[c], float) else r[c]) for c in RANKING_COLUMNS])
    return buf.getvalue()


# =============================================================================================
# The whole twin
# =============================================================================================
@dataclass
class TwinConfig:
    horizon_days: float = 365.0
    landmark_days: float | None = None  # default: the horizon
    chains: int = 2
    warmup: int = 100
    samples: int = 100
    seed: int = 0
    max_tree_depth: int = 4
    target_accept: float = 0.8
    predictive_draws: int = 48
    prior_draws: int = 32
    output_every_days: float = 7.0
    chunk: int = 8
    max_rhat: float = MAX_RHAT
    min_ess: float = MIN_ESS_BULK
    max_divergent_fraction: float = MAX_DIVERGENT_FRACTION
    report_every: int = 20  # NUTS iterations between progress lines (when a progress function is given)

    @property
    def landmark(self) -> float:
        return self.horizon_days if self.landmark_days is None else self.landmark_days


@dataclass
class TwinResult:
    patient: PatientData
    history: Regimen
    candidates: list[tuple[Regimen, str]]
    simulator: Any
    chains: Chains | None
    diagnostics: dict
    conflict: dict
    refused: list[str]
    prior_dominated: dict
    grid: np.ndarray = field(default_factory=lambda: np.zeros(0))
    predictions: dict[str, dict] = field(default_factory=dict)  # regimen -> {"d": (draws,G,L), "ok": (draws,)}
    ranking: list[dict] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    config: TwinConfig = field(default_factory=TwinConfig)
    pdl1_tps_class: str = ""

    @property
    def predicted(self) -> bool:
        return not self.refused


def check_inputs(patient: PatientData, history: Regimen, candidates: Sequence[Regimen], config: TwinConfig,
                 history_source: str = "--history") -> None:
    if not patient.last_day < config.horizon_days:
        raise QSPValidationError(patient.source, "day", patient.last_day,
                                 f"the last measurement must fall before the horizon ({config.horizon_days:g} days)")
    if not patient.last_day < config.landmark <= config.horizon_days:
        raise QSPValidationError("command line", "--landmark", config.landmark,
                                 f"must lie after the last measurement (day {patient.last_day:g}) and at most the horizon")
    for name, v, lo in (("--chains", config.chains, 1), ("--samples", config.samples, 1), ("--warmup", config.warmup, 1),
                        ("--predictive-draws", config.predictive_draws, 1)):
        if v < lo:
            raise QSPValidationError("command line", name, v, f"must be an integer >= {lo}")


def fit_twin(patient: PatientData, history: Regimen, candidates: Sequence[tuple[Regimen, str]], *,
             params=None, spec=None, simulator=None, config: TwinConfig = TwinConfig(),
             progress: Callable[[str], None] | None = None) -> TwinResult:
    """Posterior of one patient and the posterior-predictive course under each regimen.

    ``candidates`` are (regimen, file) pairs; ``simulator`` defaults to :class:`QSPTwinSimulator`
    on ``params``/``spec``. Predictions are skipped (``result.refused`` says why) when the
    diagnostics fail or the data contradict the model.
    """
    log = progress or (lambda s: None)
    check_inputs(patient, history, [c for c, _ in candidates], config)
    if simulator is None:
        drugs = tuple(dict.fromkeys(history.drugs + tuple(d for c, _ in candidates for d in c.drugs))) or ("nivolumab",)
        simulator = QSPTwinSimulator(params, spec, drugs)
    tps_class = patient.tps_class()
    tps_note = TPS_CLASS_NAMES[tps_class] if tps_class is not None else (
        f"{TPS_CLASS_NAMES[simulator.default_tps_class]} (TPS not given: the population's most frequent class)")
    pdl1 = simulator.tps_multipliers[tps_class if tps_class is not None else simulator.default_tps_class]
    timing = {}
    rng = np.random.default_rng(config.seed)

    # The prediction grid and every regimen on one timeline shape (one compiled forward solve).
    landmark = config.landmark
    grid = np.unique(np.concatenate([np.arange(0.0, config.horizon_days + 1e-9, config.output_every_days),
                                     patient.day, [patient.last_day, landmark, config.horizon_days],
                                     np.arange(0.0, config.horizon_days + 1e-9, 56.0)]))
    regimens = [(history.name + " (continued)", history, "--history")]
    regimens += [(c.name, switch_regimen(history, c, patient.last_day), f) for c, f in candidates]
    n_points = max(timeline_points(r, grid) for _, r, _ in regimens)
    schedules = [compile_schedule(r, simulator.drugs, grid, 2, n_points) for _, r, _ in regimens]
    read_idx = np.searchsorted(grid, patient.day)

    def at_reads(d):
        return d[:, read_idx, patient.lesion]

    t0 = time.perf_counter()
    log(f"prior check: {config.prior_draws} population draws under the history")
    z_prior, d_prior, screening = prior_draws(simulator, config.prior_draws, rng, schedules[0], pdl1, config.chunk)
    ok_prior = np.ones(len(z_prior), bool)
    timing["prior_check_s"] = time.perf_counter() - t0
    pre = conflict_check(patient, at_reads(d_prior), ok_prior, at_reads(d_prior), ok_prior)
    if pre.get("prior_conflict"):
        log(f"warning: none of the {config.prior_draws} prior draws reproduces every read within {MISFIT_Z:g} "
            "measurement sds; fitting anyway, the posterior check decides")

    data = fit_data(patient, history, simulator.drugs, pdl1)
    log(f"NUTS: {config.chains} chain(s) x ({config.warmup} warmup + {config.samples}) draws, "
        f"max tree depth {config.max_tree_depth}, {simulator.dim} parameters, {patient.n} read(s) to day {patient.last_day:g}")
    chains = run_nuts(simulator, data, chains=config.chains, warmup=config.warmup, samples=config.samples,
                      seed=config.seed, max_tree_depth=config.max_tree_depth, target_accept=config.target_accept,
                      progress=log, report_every=config.report_every if progress else 0,
                      inits=starting_points(z_prior, at_reads(d_prior), patient, config.chains, rng))
    timing["nuts_s"] = chains.seconds
    diag = diagnostics(chains, simulator)
    diag["seconds"] = chains.seconds

    # Posterior predictive: a thinned set of draws under every regimen.
    flat = chains.z.reshape(-1, simulator.dim)
    take = np.unique(np.linspace(0, flat.shape[0] - 1, min(config.predictive_draws, flat.shape[0])).round().astype(int))
    zs = flat[take]
    t0 = time.perf_counter()
    preds = {}
    for (name, _, f), sched in zip(regimens, schedules):
        log(f"predicting {name}: {len(zs)} posterior draws to day {config.horizon_days:g}")
        d, ok, _ = solve_draws(simulator, zs, sched, pdl1, config.chunk)
        preds[name] = {"d": d, "ok": ok, "file": f}
    timing["prediction_s"] = time.perf_counter() - t0
    first = preds[regimens[0][0]]
    conflict = conflict_check(patient, at_reads(d_prior), ok_prior, at_reads(first["d"]), first["ok"])
    conflict["prior_screening"] = screening
    refused = diagnose(diag, conflict, max_rhat=config.max_rhat, min_ess=config.min_ess,
                       max_divergent_fraction=config.max_divergent_fraction)
    prior_dom = prior_domination(chains, patient)
    result = TwinResult(patient, history, list(candidates), simulator, chains, diag, conflict, refused, prior_dom,
                        grid, preds, [], timing, config, tps_note)
    if not refused:
        rows = []
        for name, _, f in regimens:
            p = preds[name]
            row = regimen_outcomes(grid, p["d"], p["ok"], patient.lesions_measured, landmark)
            rows.append({"regimen": name, "file": f, "landmark_day": landmark, **row})
        result.ranking = rank(rows)
    return result


def prior_domination(chains: Chains, patient: PatientData) -> dict:
    """Posterior sd of each deviation (prior sd = 1) and whether the prior dominates: one read, or
    the mean posterior/prior sd ratio above 0.8 (less than a fifth of the spread learnt)."""
    sd = chains.z.reshape(-1, chains.z.shape[-1]).std(axis=0)
    ratio = float(np.mean(sd))
    dominated = bool(patient.n <= 1 or ratio > 0.8)
    note = ("prior-dominated: the data barely move the population prior; predictions are close to the population's"
            if dominated else "data-informed: the posterior is narrower than the population prior")
    return {"prior_dominated": dominated, "mean_posterior_sd_over_prior_sd": ratio,
            "posterior_sd_over_prior_sd": sd.tolist(), "reads": patient.n, "note": note}


# =============================================================================================
# Outputs
# =============================================================================================
def summary_of(result: TwinResult) -> dict:
    s = {
        "patient_file": result.patient.source,
        "reads": result.patient.n,
        "last_read_day": result.patient.last_day,
        "lesions_measured": [LESIONS[i] for i in result.patient.lesions_measured],
        "censored_reads": int(result.patient.censored.sum()),
        "pdl1_tps_class": result.pdl1_tps_class,
        "lymphocyte_counts": len(result.patient.lymphocytes),
        "lymphocytes_note": "validated and recorded; not used in the likelihood (no calibrated map from blood "
                            "lymphocytes to the model's blood CD8 pool)",
        "history": result.history.name,
        "decision_day": result.patient.last_day,
        "rhat_max": result.diagnostics["rhat_max"],
        "ess_bulk_min": result.diagnostics["ess_bulk_min"],
        "divergences": result.diagnostics["divergences"],
        "diagnostics": result.diagnostics,
        "thresholds": {"max_rhat": result.config.max_rhat, "min_ess_bulk": result.config.min_ess,
                       "max_divergent_fraction": result.config.max_divergent_fraction,
                       "misfit_threshold_sd": MISFIT_Z},
        "prediction_refused": bool(result.refused),
        "refusal_reasons": result.refused,
        "data_conflict": result.conflict,
        "prior": {"parameters": result.simulator.prior_record(),
                  "not_varied_in_population": list(getattr(result.simulator, "missing", ()))},
        "prior_dominated": result.prior_dominated["prior_dominated"],
        "prior_domination": result.prior_dominated,
        "measurement_error_model": MEASUREMENT_ERROR_SOURCE,
        "posterior_median": {n: float(np.median(v)) for n, v in result.simulator.natural(result.chains.z).items()},
        "posterior_q05": {n: float(np.quantile(v, 0.05)) for n, v in result.simulator.natural(result.chains.z).items()},
        "posterior_q95": {n: float(np.quantile(v, 0.95)) for n, v in result.simulator.natural(result.chains.z).items()},
        "landmark_day": result.config.landmark,
        "horizon_days": result.config.horizon_days,
        "ranking": result.ranking,
        "timing_s": result.timing,
    }
    return s


def write_twin(out: Path, result: TwinResult, prov: dict) -> dict:
    """posterior.nc, summary.json, ranking.csv (unless refused), fitted_past.png, predicted_futures.png, run.json."""
    from qspjax.io import atomic_write, atomic_write_json, atomic_write_text

    out = Path(out)
    idata = inference_data(result.chains, result.simulator, result.patient)
    atomic_write(out / "posterior.nc", lambda p: idata.to_netcdf(str(p), engine="h5netcdf"))
    summary = summary_of(result)
    if result.ranking:
        atomic_write_text(out / "ranking.csv", ranking_csv(result.ranking))
    plot_fitted_past(out / "fitted_past.png", result)
    if not result.refused:
        plot_predicted_futures(out / "predicted_futures.png", result)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "run.json", prov)
    return summary


def _bands(d: np.ndarray, ok: np.ndarray, lesion: int, noise: bool, rng) -> tuple[np.ndarray, ...]:
    x = d[ok][:, :, lesion]
    if noise:
        x = np.maximum(x + np.asarray(measurement_sd(x)) * rng.standard_normal(x.shape), 0.0)
    return tuple(np.quantile(x, q, axis=0) for q in (0.05, 0.5, 0.95))


def plot_fitted_past(path: Path, result: TwinResult):
    from qspjax.plots import _new_figure, _save

    p = result.patient
    first = next(iter(result.predictions.values()))
    grid = result.grid
    upto = grid <= p.last_day + 1e-9
    rng = np.random.default_rng(0)
    fig = _new_figure(7.0, 4.2)
    ax = fig.add_subplot()
    for li in p.lesions_measured:
        c = f"C{li}"
        if first["ok"].any():
            lo, med, hi = _bands(first["d"][:, upto], first["ok"], li, False, rng)
            plo, _, phi = _bands(first["d"][:, upto], first["ok"], li, True, rng)
            ax.fill_between(grid[upto], plo, phi, color=c, alpha=0.12, lw=0)
            ax.fill_between(grid[upto], lo, hi, color=c, alpha=0.3, lw=0)
            ax.plot(grid[upto], med, color=c, lw=1.5, label=f"{LESIONS[li]}: posterior median, 90 % band")
        sel = p.lesion == li
        cens = sel & p.censored
        ax.plot(p.day[sel & ~p.censored], p.diameter_mm[sel & ~p.censored], "o", color=c, mec="k", ms=5)
        if cens.any():
            ax.plot(p.day[cens], np.full(cens.sum(), DETECTION_LIMIT_MM), "v", color=c, mec="k", ms=6,
                    label=f"{LESIONS[li]}: below {DETECTION_LIMIT_MM:g} mm")
    ax.axhline(DETECTION_LIMIT_MM, color="grey", ls=":", lw=0.8)
    status = "PREDICTION REFUSED: " + "; ".join(r[:60] for r in result.refused) if result.refused else (
        "prior-dominated" if result.prior_dominated["prior_dominated"] else "data-informed")
    ax.set(xlabel="day from start of treatment", ylabel="lesion diameter (mm)",
           title=f"Fitted past under {result.history.name} ({status})"[:120])
    ax.legend(fontsize=7, loc="best")
    ax.text(0.01, 0.01, "dark band: true diameter 90 %; light: a new read 90 % (measurement error)",
            transform=ax.transAxes, fontsize=6)
    return _save(fig, path)


def plot_predicted_futures(path: Path, result: TwinResult):
    from qspjax.plots import _new_figure, _save

    p = result.patient
    lesions = p.lesions_measured
    rng = np.random.default_rng(0)
    fig = _new_figure(7.0, 2.8 * len(lesions) + 0.6)
    axes = [fig.add_subplot(len(lesions), 1, i + 1) for i in range(len(lesions))]
    for ax, li in zip(axes, lesions):
        for k, (name, pr) in enumerate(result.predictions.items()):
            if not pr["ok"].any():
                continue
            lo, med, hi = _bands(pr["d"], pr["ok"], li, False, rng)
            c = f"C{k}"
            ax.fill_between(result.grid, lo, hi, color=c, alpha=0.18, lw=0)
            ax.plot(result.grid, med, color=c, lw=1.4, label=name)
        sel = p.lesion == li
        ax.plot(p.day[sel], np.maximum(p.diameter_mm[sel], 0), "ko", ms=4)
        ax.axvline(p.last_day, color="k", ls="--", lw=0.8)
        ax.axvline(result.config.landmark, color="grey", ls=":", lw=0.8)
        ax.set(ylabel=f"{LESIONS[li]} (mm)")
    axes[0].legend(fontsize=7, loc="best", title="regimen (median, 90 % band)", title_fontsize=7)
    axes[0].set_title("Predicted futures after the decision day (dashed); landmark dotted", fontsize=9)
    axes[-1].set_xlabel("day from start of treatment")
    return _save(fig, path)


# =============================================================================================
# Synthetic patients (coverage checks, the shipped example)
# =============================================================================================
def synthetic_patient(simulator, z: np.ndarray, history: Regimen, days: Sequence[float], lesions: Sequence[int],
                      rng: np.random.Generator, pdl1_multiplier: float | None = None, source: str = "<synthetic>"):
    """A patient drawn from the model: deviations ``z`` (D,), solved under ``history``, read at
    ``days`` for ``lesions`` with the stated measurement error (reads below the detection limit
    written as 0 mm). Returns (PatientData, true diameters (len(days), L) in mm, ok)."""
    grid = np.unique(np.concatenate([[0.0], np.asarray(days, float)]))
    sched = compile_schedule(history, simulator.drugs, grid, 2, timeline_points(history, grid))
    mult = simulator.tps_multipliers[simulator.default_tps_class] if pdl1_multiplier is None else pdl1_multiplier
    d, ok, _ = solve_draws(simulator, np.asarray(z, float)[None, :], sched, mult, chunk=1)
    d = d[0][np.searchsorted(grid, np.asarray(days, float))]
    rows_day, rows_les, rows_y = [], [], []
    for j, t in enumerate(days):
        for li in lesions:
            true = d[j, li]
            y = true + float(measurement_sd(true)) * rng.standard_normal()
            y = 0.0 if y < DETECTION_LIMIT_MM else round(float(y), 1)
            rows_day.append(float(t))
            rows_les.append(int(li))
            rows_y.append(y)
    patient = PatientData(source, np.asarray(rows_day), np.asarray(rows_les, int), np.asarray(rows_y))
    return patient, d, bool(ok[0])


def patient_csv(patient: PatientData) -> str:
    lines = ["day,lesion,diameter_mm"]
    lines += [f"{d:g},{LESIONS[int(l)]},{y:g}" for d, l, y in zip(patient.day, patient.lesion, patient.diameter_mm)]
    return "\n".join(lines) + "\n"
