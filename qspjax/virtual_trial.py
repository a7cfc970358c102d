"""Virtual clinical trials: RECIST 1.1 endpoints of simulated cohorts, published values beside them,
per-patient tables and plots, and the comparison of several protocols on one virtual population.

A trial arm is simulated by :mod:`qspjax.runner` (screened population, one regimen); this module
turns its lesion diameters into the endpoints a trial reports (:func:`evaluate`, from the arm's
outcome origin, best response or a fixed-time read), reads the published endpoints of a dataset
arm in the same units and at their own CI level (:func:`published_endpoints`), checks each printed
rate against the interval a trial of its size would show at the simulated rate
(:func:`compare_with_published`) and writes
what a user looks at (:func:`write_trial`, :func:`write_comparison`). Experiment files
(``configs/experiments/``) list protocols to compare; :func:`load_experiment` validates them.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.stats
import yaml

from qspjax import outcomes as oc
from qspjax import plots
from qspjax.data.trials import DAYS_PER_MONTH
from qspjax.errors import QSPValidationError
from qspjax.io import atomic_write_json, atomic_write_text
from qspjax.regimen import Regimen, load_regimen, parse_regimen
from qspjax.runner import CohortResult, status_counts, write_trajectories

TARGET_LESIONS = ("all", "irradiated", "non_irradiated")


@dataclass(frozen=True)
class Assessment:
    """How a virtual trial reads its cohort (RECIST 1.1 adapted; see :mod:`qspjax.outcomes`).

    ``target``: which lesions are RECIST target lesions: ``all`` or ``non_irradiated`` (trials
    such as PEMBRO-RT assessed response outside the radiation field). ``death_rate_per_day``:
    an optional constant competing death hazard for PFS. ``origin_day``: the regimen day the
    trial's outcome clock starts at (an arm's ``outcome_origin_day``, e.g. PACIFIC's randomisation
    after chemoradiation): the RECIST baseline is the tumour at that day, scans come every
    ``interval_days`` from it and PFS is counted from it. ``detection_limit_mm``: below it a
    lesion reads as gone. ``orr_assessment_day``: days after the origin at which the trial read
    its response rates (e.g. "response at 2.9 months"); None: best overall response.
    """

    interval_days: float = 56.0
    target: str = "all"
    confirm: bool = False
    death_rate_per_day: float = 0.0
    origin_day: float = 0.0
    detection_limit_mm: float = oc.DETECTION_LIMIT_MM
    orr_assessment_day: float | None = None

    def __post_init__(self):
        def number(name, value, ok, allowed):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(value) or not ok(float(value)):
                raise QSPValidationError("assessment", name, value, allowed)

        number("interval_days", self.interval_days, lambda v: v > 0, "a positive number of days")
        if self.target not in TARGET_LESIONS:
            raise QSPValidationError("assessment", "target", self.target, f"one of {list(TARGET_LESIONS)}")
        number("death_rate_per_day", self.death_rate_per_day, lambda v: v >= 0, "a non-negative rate per day")
        number("origin_day", self.origin_day, lambda v: v >= 0, "a regimen day >= 0")
        number("detection_limit_mm", self.detection_limit_mm, lambda v: v > 0,
               "a positive, finite diameter in mm (RECIST 1.1 default: 5)")
        if self.orr_assessment_day is not None:
            number("orr_assessment_day", self.orr_assessment_day, lambda v: v > 0,
                   "a positive number of days after the origin, or None (best overall response)")


@dataclass
class TrialOutcome:
    """Endpoints of one simulated cohort: ``summary`` (arm level, JSON-ready), ``patients``
    (one row per patient), the RECIST reads and best responses, and the PFS Kaplan–Meier."""

    summary: dict[str, Any]
    patients: list[dict[str, Any]]
    assessments: oc.RecistAssessments
    best: oc.BestResponse
    km: oc.KaplanMeier


def _origin_index(days: np.ndarray, origin_day: float) -> int:
    """Index of the grid point nearest ``origin_day`` (the RECIST baseline), refused if the grid
    ends on or before it."""
    if not origin_day < days[-1]:
        raise QSPValidationError("assessment", "origin_day", origin_day,
                                 f"must come before the last simulated day ({days[-1]:g})")
    return int(np.argmin(np.abs(days - origin_day)))


def evaluate(result: CohortResult, assessment: Assessment = Assessment(), seed: int = 0) -> TrialOutcome:
    """RECIST endpoints of ``result``: ORR, DCR, CR/PR/SD/PD, PFS (KM, median and CI), duration
    of response, out-of-field response of the non-irradiated lesion, pathological response.

    Everything is read from ``assessment.origin_day`` on (baseline there, scans every interval
    after it, days in the summary counted from it). With ``assessment.orr_assessment_day`` the
    rates (``orr``, ``dcr``, ``cr`` ... ``ne``) are the RECIST reads at that fixed time
    (:func:`qspjax.outcomes.response_at_day`) and the best-overall-response rates move to
    ``best_overall_response_rates``.
    """
    days = np.asarray(result.days, dtype=float)
    i0 = _origin_index(days, float(assessment.origin_day))
    times = days[i0:]
    diam_mm = 10.0 * np.moveaxis(result.observables["tumor_diameter_cm"], 2, 1)[:, :, i0:]  # (P, L, T from origin)
    n_lesions = diam_mm.shape[1]
    if assessment.target == "non_irradiated" and n_lesions < 2:
        raise QSPValidationError("assessment", "target", assessment.target, "needs a model with two lesions")
    target = target_mask(assessment.target, n_lesions)
    ok = result.status == 0
    viable = result.viable_fraction_at_surgery
    arm = oc.arm_endpoints(
        times, diam_mm, ok, target_mask=target, assessment_interval_days=assessment.interval_days,
        detection_limit_mm=assessment.detection_limit_mm,
        confirm=assessment.confirm, death_rate_per_day=assessment.death_rate_per_day, seed=seed,
        out_of_field_lesion=1 if n_lesions > 1 else None,
        viable_fraction=viable if viable is not None and np.any(np.isfinite(viable)) else None,
    )
    summary, reads, best, pfs, km = arm.summary, arm.assessments, arm.best, arm.pfs, arm.km
    fixed = None
    if assessment.orr_assessment_day is not None:
        fixed = oc.response_at_day(times, diam_mm, assessment.orr_assessment_day, target, ok,
                                   assessment_interval_days=assessment.interval_days,
                                   detection_limit_mm=assessment.detection_limit_mm)
        summary["best_overall_response_rates"] = {k: summary[k] for k in ("orr", "orr_ci", "dcr", "dcr_ci")} | {
            name.lower(): summary[name.lower()] for name in oc.RESPONSE_NAMES.values()}
        orr = oc.rate((fixed == oc.CR) | (fixed == oc.PR), ok)
        dcr = oc.rate((fixed == oc.CR) | (fixed == oc.PR) | (fixed == oc.SD), ok)
        summary.update(orr=orr.estimate, orr_ci=(orr.ci_low, orr.ci_high), dcr=dcr.estimate,
                       dcr_ci=(dcr.ci_low, dcr.ci_high))
        for code, name in oc.RESPONSE_NAMES.items():
            summary[name.lower()] = oc.rate(fixed == code, ok).estimate
        summary["response_read"] = f"RECIST read at day {assessment.orr_assessment_day:g} after the outcome origin"
    else:
        summary["response_read"] = "best overall response over the follow-up"
    dor = oc.duration_of_response(best)
    responders = np.isfinite(dor.days)
    if responders.any():
        dor_km = oc.kaplan_meier(dor.days[responders], dor.event[responders])
        summary["median_dor_days"] = oc.median_survival(dor_km)[0]
        summary["responders_censored"] = int((~dor.event[responders]).sum())
    summary["median_pfs_months"] = summary["median_pfs_days"] / DAYS_PER_MONTH
    summary["status_counts"] = status_counts(result.status)
    summary["assessment"] = vars(assessment) | {"baseline_day": float(times[0]), "days": reads.days.tolist(),
                                                "days_counted_from": "the outcome origin (baseline_day)"}
    summary["solver"] = {k: v for k, v in result.meta.items() if k != "screening"}
    summary["screening"] = result.meta.get("screening", {})
    rows = []
    for i in range(len(result.status)):
        row = {
            "patient": i,
            "status": "ok" if ok[i] else f"failed({int(result.status[i])})",
            "pdl1_tps_class": int(result.tps_class[i]),
            "baseline_diameter_irradiated_mm": float(10.0 * result.observables["tumor_diameter_cm"][i, 0, 0]),
            "baseline_diameter_non_irradiated_mm": (float(10.0 * result.observables["tumor_diameter_cm"][i, 0, 1])
                                                    if n_lesions > 1 else math.nan),
            "recist_baseline_sum_mm": float(reads.baseline_mm[i]),
            "best_percent_change": float(best.best_percent_change[i]),
            "best_overall_response": oc.RESPONSE_NAMES[int(best.category[i])],
        }
        if fixed is not None:
            row["response_at_orr_assessment"] = oc.RESPONSE_NAMES[int(fixed[i])]
        row.update({
            "pfs_days": float(pfs.days[i]),
            "progressed": bool(pfs.event[i]),
            "duration_of_response_days": float(dor.days[i]),
        })
        rows.append(row)
    return TrialOutcome(summary, rows, reads, best, km)


# ---------------------------------------------------------------------------------------------
# Published endpoints of a dataset arm
# ---------------------------------------------------------------------------------------------
def published_endpoints(arm) -> dict[str, Any]:
    """The arm's published endpoints in the simulator's units (fractions, days), None if not given.

    Every interval is at the arm's own level, ``ci_level`` (the trial file's ``ci_level_pct`` / 100:
    0.95 unless the paper printed e.g. 90 % CIs, as NCT02888743 did). The ORR interval is the
    paper's when printed, otherwise the exact (Clopper–Pearson) binomial interval of responders of
    N at that level (marked ``orr_ci_source``). ``outcome_origin_day`` and
    ``orr_assessment_day`` (days after the origin of a fixed-time response read, None for best
    response) say when the paper read them.
    """
    def frac(pct):
        return None if pct is None else pct / 100.0

    def numeric(ci):
        return ci is not None and all(isinstance(b, (int, float)) for b in ci)

    level = float(arm.ci_level_pct) / 100.0
    out: dict[str, Any] = {"arm_id": arm.arm_id, "label": arm.label, "n": arm.n, "ci_level": level,
                           "outcome_origin_day": float(arm.outcome_origin_day),
                           "orr_assessment_day": (None if arm.orr_assessment_months is None
                                                  else float(arm.orr_assessment_months) * DAYS_PER_MONTH)}
    out["orr"] = frac(arm.orr_pct)
    if numeric(arm.orr_ci):
        out["orr_ci"] = (frac(arm.orr_ci[0]), frac(arm.orr_ci[1]))
        out["orr_ci_source"] = "published"
    elif arm.responders is not None:
        out["orr_ci"] = oc.binomial_ci(arm.responders, arm.n, level)
        out["orr_ci_source"] = "exact binomial of responders/N"
    for key in ("dcr", "cr", "pr", "sd", "pd"):
        out[key] = frac(getattr(arm, f"{key}_pct"))
    if numeric(arm.dcr_ci):
        out["dcr_ci"] = (frac(arm.dcr_ci[0]), frac(arm.dcr_ci[1]))
    median = arm.median_pfs_months
    out["median_pfs_days"] = median * DAYS_PER_MONTH if isinstance(median, (int, float)) else None
    if numeric(arm.median_pfs_ci):
        out["median_pfs_ci_days"] = tuple(b * DAYS_PER_MONTH for b in arm.median_pfs_ci)
    out["pfs_landmarks"] = {
        float(lm.months * DAYS_PER_MONTH): lm.pct / 100.0
        for lm in arm.landmarks if lm.endpoint == "pfs" and lm.pct is not None
    }
    return out


PREDICTIVE_LEVEL = 0.95
_RATES = ("orr", "dcr", "cr", "pr", "sd", "pd")


def trial_predictive_interval(successes: float | Sequence[float], evaluated: float | Sequence[float],
                              n_trial: int, level: float = PREDICTIVE_LEVEL) -> dict[str, Any]:
    """The rate a trial of ``n_trial`` patients would print if the truth were the simulated cohort's.

    The simulated rate's posterior from ``successes`` of ``evaluated`` virtual patients is Jeffreys'
    Beta(x + 1/2, M - x + 1/2); the trial's count is Binomial(n_trial, p) under it, so its
    predictive distribution is Beta-binomial(n_trial, x + 1/2, M - x + 1/2), an equal-weight
    mixture of them when several cohorts (posterior draws) are given. The interval is
    [k_lo, k_hi] / n_trial with P(K < k_lo) <= (1 - level)/2 and P(K > k_hi) <= (1 - level)/2, so
    it covers at least ``level`` and does not shrink below the trial's own binomial spread however
    large the virtual cohort.
    """
    x = np.atleast_1d(np.asarray(successes, dtype=float))
    m = np.atleast_1d(np.asarray(evaluated, dtype=float))
    if isinstance(n_trial, bool) or not isinstance(n_trial, (int, np.integer)) or n_trial < 1:
        raise QSPValidationError("published", "n", n_trial, "a positive whole number of trial patients")
    if not 0.0 < level < 1.0:
        raise QSPValidationError("comparison", "level", level, "a probability in (0, 1)")
    keep = m > 0
    if not keep.any():
        return {"lower": None, "upper": None, "level": level, "n_trial": int(n_trial), "cdf": None}
    k = np.arange(int(n_trial) + 1)
    pmf = np.mean([scipy.stats.betabinom.pmf(k, int(n_trial), xi + 0.5, mi - xi + 0.5)
                   for xi, mi in zip(x[keep], m[keep])], axis=0)
    cdf = np.cumsum(pmf)
    tail = 0.5 * (1.0 - level)
    k_lo = int(np.flatnonzero(cdf >= tail - 1e-12)[0])  # P(K <= k_lo - 1) < tail
    k_hi = int(np.flatnonzero(cdf >= 1.0 - tail - 1e-12)[0])  # P(K > k_hi) <= tail
    return {"lower": k_lo / n_trial, "upper": k_hi / n_trial, "level": level, "n_trial": int(n_trial), "cdf": cdf}


def _predictive_p_value(cdf: np.ndarray, count: int) -> float:
    """Two-sided predictive p-value of a printed count: 2 min(P(K <= k), P(K >= k)), at most 1."""
    below = float(cdf[count])
    above = 1.0 - (float(cdf[count - 1]) if count > 0 else 0.0)
    return min(1.0, 2.0 * min(below, above))


def compare_with_published(summary: Mapping[str, Any], published: Mapping[str, Any],
                           draws: Sequence[Mapping[str, Any]] | None = None,
                           level: float = PREDICTIVE_LEVEL) -> dict[str, Any]:
    """Simulated and published endpoints side by side.

    For every rate the paper prints: the ``predictive_interval`` of a trial of the published N
    drawn at the simulated rate (:func:`trial_predictive_interval`; over the posterior ``draws``'
    summaries when given, else the one cohort of ``summary``), ``inside_predictive_interval`` and
    the printed rate's two-sided ``predictive_p_value``. This is the check: the virtual cohort's
    own CI (``summary["orr_ci"]``) shrinks with the number of virtual patients while the trial's
    sampling error does not. Where the paper prints an interval (ORR, DCR, median PFS),
    ``simulated_inside_published_ci`` says whether the simulated value lies in it, at the arm's
    own ``published_ci_level``.
    """
    rows: dict[str, Any] = {}
    for key in (*_RATES, "median_pfs_days"):
        rows[key] = {"simulated": summary.get(key), "published": published.get(key)}
    n_trial = published.get("n")
    cohorts = list(draws) if draws else [summary]
    for key in _RATES:
        pub = published.get(key)
        if pub is None or n_trial is None or any(c.get(key) is None for c in cohorts):
            continue
        evaluated = [float(c["n_evaluated"]) for c in cohorts]
        successes = [round(float(c[key]) * e) for c, e in zip(cohorts, evaluated)]
        pi = trial_predictive_interval(successes, evaluated, n_trial, level)
        if pi["lower"] is None:
            continue
        rows[key]["predictive_interval"] = (pi["lower"], pi["upper"])
        rows[key]["predictive_level"] = level
        rows[key]["predictive_n_trial"] = int(n_trial)
        rows[key]["predictive_over"] = f"{len(cohorts)} posterior draws" if draws else "the virtual cohort"
        rows[key]["inside_predictive_interval"] = bool(pi["lower"] - 1e-9 <= pub <= pi["upper"] + 1e-9)
        count = min(int(n_trial), max(0, int(math.floor(pub * n_trial + 0.5))))
        rows[key]["predictive_p_value"] = _predictive_p_value(pi["cdf"], count)
    for key, ci_key in (("orr", "orr_ci"), ("dcr", "dcr_ci"), ("median_pfs_days", "median_pfs_ci_days")):
        ci, sim = published.get(ci_key), summary.get(key)
        if ci is not None and sim is not None and all(b is not None for b in ci):
            rows[key]["simulated_inside_published_ci"] = bool(ci[0] <= sim <= ci[1])
            rows[key]["published_ci_level"] = published.get("ci_level", 0.95)
    return rows


# ---------------------------------------------------------------------------------------------
# Writing a trial
# ---------------------------------------------------------------------------------------------
def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_trial(out: Path, result: CohortResult, outcome: TrialOutcome, prov: dict,
                published: Mapping[str, Any] | None = None,
                extra: Mapping[str, Any] | None = None,
                draws: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """``patients.csv``, ``summary.json`` (with the published values and their comparison beside
    when given, and the entries of ``extra``, e.g. ``posterior_predictive``), ``trajectories.nc``,
    ``run.json`` and the PNGs waterfall, spider and Kaplan–Meier PFS. ``draws``: the posterior
    draws' summaries, over which the comparison's predictive intervals then mix."""
    out = Path(out)
    summary = dict(outcome.summary, regimen=result.regimen.name, **(extra or {}))
    if published is not None:
        summary["published"] = published
        summary["comparison"] = compare_with_published(outcome.summary, published, draws)
    atomic_write_text(out / "patients.csv", _csv_text(outcome.patients))
    write_trajectories(result, out / "trajectories.nc")
    ok = outcome.best.status_ok
    title = result.regimen.name
    plots.waterfall(out / "waterfall.png", outcome.best.best_percent_change[ok], outcome.best.category[ok],
                    title=f"{title}: best change in sum of target diameters")
    plots.spider(out / "spider.png", outcome.assessments.days, outcome.assessments.percent_change[ok],
                 outcome.best.category[ok], title=f"{title}: change in sum of target diameters")
    origin = float(outcome.summary["assessment"]["baseline_day"])
    km_title = f"{title}: progression-free survival" + (f" from day {origin:g}" if origin > 0 else "")
    if (published or {}).get("median_pfs_ci_days") is not None:
        km_title += f"\n(observed median with its {100 * published.get('ci_level', 0.95):g} % CI)"
    plots.kaplan_meier_curve(
        out / "km_pfs.png", outcome.km, title=km_title,
        observed_median_days=(published or {}).get("median_pfs_days"),
        observed_median_ci_days=(published or {}).get("median_pfs_ci_days"),
        observed_landmarks=(published or {}).get("pfs_landmarks") or None,
    )
    atomic_write_json(out / "summary.json", summary, null_reasons=oc.NULL_REASONS)
    atomic_write_json(out / "run.json", prov)
    return summary


# ---------------------------------------------------------------------------------------------
# Experiments: several protocols on one virtual population
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    protocol_id: str
    label: str
    regimen: Regimen
    reported: Mapping[str, Any] = field(default_factory=dict)


def target_mask(target: str, n_lesions: int) -> np.ndarray:
    """Which lesions are RECIST target lesions: ``all``, ``irradiated`` (lesion 0, the one RT aims
    at: the seed review's QSP-IO setting, one tumor irradiated as a whole) or ``non_irradiated``
    (lesion 1: trials that score the unirradiated lesions, PEMBRO-RT-like)."""
    if target == "all":
        return np.ones(n_lesions, bool)
    return np.arange(n_lesions) == (0 if target == "irradiated" else 1)


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    source: str
    days: float
    assessment: Assessment
    protocols: tuple[Protocol, ...]


_EXPERIMENT_KEYS = ("name", "description", "source", "days", "assessment", "protocols")
_PROTOCOL_KEYS = ("id", "label", "regimen", "regimen_file", "reported")
_REPORTED_KEYS = ("orr", "source", "note", "responders_censored")


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file (schema in ``configs/experiments/README.md``)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise QSPValidationError(path, "(file)", str(path), f"cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise QSPValidationError(path, "(file)", str(path), f"is not valid YAML (truncated?): {exc}") from None

    def fail(where, value, allowed):
        raise QSPValidationError(path, where, value, allowed)

    if not isinstance(doc, Mapping):
        fail("(top level)", doc, "a mapping is required")
    for k in doc:
        if k not in _EXPERIMENT_KEYS:
            fail(k, doc[k], f"unknown key (misspelt?); allowed keys are {list(_EXPERIMENT_KEYS)}")
    for k in ("name", "protocols"):
        if k not in doc:
            fail(k, None, "required field is missing")
    days = doc.get("days", 400)
    if isinstance(days, bool) or not isinstance(days, (int, float)) or not (0 < days < 1e5):
        fail("days", days, "a positive number of days is required")
    assess = doc.get("assessment") or {}
    if not isinstance(assess, Mapping) or set(assess) - {"interval_days", "target", "confirm"}:
        fail("assessment", assess, "a mapping with interval_days, target, confirm")
    interval = assess.get("interval_days", 56.0)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
        fail("assessment.interval_days", interval, "a positive number of days")
    target = assess.get("target", "all")
    if target not in TARGET_LESIONS:
        fail("assessment.target", target, f"one of {list(TARGET_LESIONS)}")
    protocols = doc["protocols"]
    if not isinstance(protocols, list) or not protocols:
        fail("protocols", protocols, "a non-empty list of protocols")
    seen = set()
    parsed = []
    for i, p in enumerate(protocols):
        where = f"protocols[{i}]"
        if not isinstance(p, Mapping):
            fail(where, p, "a mapping is required")
        for k in p:
            if k not in _PROTOCOL_KEYS:
                fail(f"{where}.{k}", p[k], f"unknown key (misspelt?); allowed keys are {list(_PROTOCOL_KEYS)}")
        pid = p.get("id")
        if not isinstance(pid, str) or not pid:
            fail(f"{where}.id", pid, "a non-empty string is required")
        if pid in seen:
            fail(f"{where}.id", pid, "protocol ids must be unique")
        seen.add(pid)
        if ("regimen" in p) == ("regimen_file" in p):
            fail(f"{where}.regimen", None, "exactly one of regimen (inline) or regimen_file is required")
        if "regimen" in p:
            regimen = parse_regimen(p["regimen"], source=f"{path}: {where}.regimen")
        else:
            regimen = load_regimen((path.parent / p["regimen_file"]).resolve())
        reported = p.get("reported") or {}
        if not isinstance(reported, Mapping):
            fail(f"{where}.reported", reported, "a mapping is required")
        for k, v in reported.items():
            if k not in _REPORTED_KEYS:
                fail(f"{where}.reported.{k}", v, f"unknown key; allowed keys are {list(_REPORTED_KEYS)}")
        orr = reported.get("orr")
        if orr is not None and (isinstance(orr, bool) or not isinstance(orr, (int, float)) or not 0 <= orr <= 1):
            fail(f"{where}.reported.orr", orr, "a fraction in [0, 1] or null")
        parsed.append(Protocol(pid, str(p.get("label", pid)), regimen, dict(reported)))
    return Experiment(str(doc["name"]), str(doc.get("description", "")), str(doc.get("source", "")),
                      float(days), Assessment(float(interval), target, bool(assess.get("confirm", False))),
                      tuple(parsed))


def comparison_rows(experiment: Experiment, outcomes: list[TrialOutcome]) -> list[dict[str, Any]]:
    """One row per protocol: simulated endpoints and the reported ORR."""
    rows = []
    for protocol, outcome in zip(experiment.protocols, outcomes):
        s = outcome.summary
        rows.append({
            "id": protocol.protocol_id,
            "label": protocol.label,
            "orr": s["orr"], "orr_ci": list(s["orr_ci"]),
            "dcr": s["dcr"], "cr": s["cr"], "pr": s["pr"], "sd": s["sd"], "pd": s["pd"],
            "median_pfs_days": s["median_pfs_days"],
            "abscopal_rate": s.get("abscopal_rate"),
            "responders_censored": s.get("responders_censored", 0),
            "n_evaluated": s["n_evaluated"], "n_failed": s["n_failed"],
            "reported_orr": protocol.reported.get("orr"),
            "reported_source": protocol.reported.get("source"),
        })
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the comparison (what the README shows)."""
    def pct(x):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"

    lines = ["| protocol | ORR (95 % CI) | reported ORR | DCR | CR | PR | SD | PD | median PFS (days) | out-of-field response |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mpfs = r["median_pfs_days"]
        lines.append(
            f"| {r['label']} | {pct(r['orr'])} ({pct(r['orr_ci'][0])}–{pct(r['orr_ci'][1])}) | {pct(r['reported_orr'])} "
            f"| {pct(r['dcr'])} | {pct(r['cr'])} | {pct(r['pr'])} | {pct(r['sd'])} | {pct(r['pd'])} "
            f"| {'not reached' if not math.isfinite(mpfs) else f'{mpfs:.0f}'} | {pct(r['abscopal_rate'])} |")
    return "\n".join(lines) + "\n"


def write_comparison(out: Path, experiment: Experiment, results: list[CohortResult],
                     outcomes: list[TrialOutcome], prov: dict,
                     posterior_predictive: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``summary.json`` (one entry per protocol, with its ``posterior_predictive`` rates when
    given), ``comparison.md``/``.csv``, the ORR bar plot beside the reported values, per protocol
    a patient table, a Kaplan–Meier and a waterfall PNG, and ``run.json``."""
    out = Path(out)
    rows = comparison_rows(experiment, outcomes)
    for protocol, result, outcome in zip(experiment.protocols, results, outcomes):
        atomic_write_text(out / f"patients_{protocol.protocol_id}.csv", _csv_text(outcome.patients))
        plots.kaplan_meier_curve(out / f"km_pfs_{protocol.protocol_id}.png", outcome.km,
                                 title=f"{protocol.label}: progression-free survival")
        ok = outcome.best.status_ok
        plots.waterfall(out / f"waterfall_{protocol.protocol_id}.png", outcome.best.best_percent_change[ok],
                        outcome.best.category[ok], title=f"{protocol.label}: best change")
    reported = np.array([np.nan if r["reported_orr"] is None else r["reported_orr"] for r in rows])
    plots.response_rate_comparison(
        out / "orr_comparison.png", [r["label"] for r in rows], [r["orr"] for r in rows],
        [r["orr_ci"] for r in rows], reported if np.isfinite(reported).any() else None,
        title=f"{experiment.name}: ORR at day {experiment.days:g}, simulated vs reported")
    atomic_write_text(out / "comparison.md", comparison_table(rows))
    flat = [{k: (";".join(f"{x:.6g}" for x in v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
    atomic_write_text(out / "comparison.csv", _csv_text(flat))
    summary = {"experiment": experiment.name, "source": experiment.source, "days": experiment.days,
               "n_patients": int(len(results[0].status)), "screening": results[0].meta.get("screening", {}),
               "protocols": [dict(r, summary={k: v for k, v in o.summary.items() if k != "km"})
                             for r, o in zip(rows, outcomes)]}
    if posterior_predictive is not None:
        for entry, pp in zip(summary["protocols"], posterior_predictive):
            entry["posterior_predictive"] = pp
    atomic_write_json(out / "summary.json", summary, null_reasons=oc.NULL_REASONS)
    atomic_write_json(out / "run.json", prov)
    return rows
