"""Virtual clinical trials: RECIST 1.1 endpoints of simulated cohorts, published values beside them,
per-patient tables and plots, and the comparison of several protocols on one virtual population.

A trial arm is simulated by :mod:`qspjax.runner` (screened population, one regimen); this module
turns its lesion diameters into the endpoints a trial reports (:func:`evaluate`), reads the
published endpoints of a dataset arm in the same units (:func:`published_endpoints`) and writes
what a user looks at (:func:`write_trial`, :func:`write_comparison`). Experiment files
(``configs/experiments/``) list protocols to compare; :func:`load_experiment` validates them.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from qspjax import outcomes as oc
from qspjax import plots
from qspjax.data.trials import DAYS_PER_MONTH
from qspjax.errors import QSPValidationError
from qspjax.io import atomic_write_json, atomic_write_text
from qspjax.regimen import Regimen, load_regimen, parse_regimen
from qspjax.runner import CohortResult, status_counts, write_trajectories

TARGET_LESIONS = ("all", "non_irradiated")


@dataclass(frozen=True)
class Assessment:
    """How a virtual trial reads its cohort (RECIST 1.1 adapted; see :mod:`qspjax.outcomes`).

    ``target``: which lesions are RECIST target lesions: ``all`` or ``non_irradiated`` (trials
    such as PEMBRO-RT assessed response outside the radiation field). ``death_rate_per_day``:
    an optional constant competing death hazard for PFS.
    """

    interval_days: float = 56.0
    target: str = "all"
    confirm: bool = False
    death_rate_per_day: float = 0.0


@dataclass
class TrialOutcome:
    """Endpoints of one simulated cohort: ``summary`` (arm level, JSON-ready), ``patients``
    (one row per patient), the RECIST reads and best responses, and the PFS Kaplan–Meier."""

    summary: dict[str, Any]
    patients: list[dict[str, Any]]
    assessments: oc.RecistAssessments
    best: oc.BestResponse
    km: oc.KaplanMeier


def evaluate(result: CohortResult, assessment: Assessment = Assessment(), seed: int = 0) -> TrialOutcome:
    """RECIST endpoints of ``result``: ORR, DCR, CR/PR/SD/PD, PFS (KM, median and CI), duration
    of response, out-of-field response of the non-irradiated lesion, pathological response."""
    diam_mm = 10.0 * np.moveaxis(result.observables["tumor_diameter_cm"], 2, 1)  # (P, L, T)
    n_lesions = diam_mm.shape[1]
    if assessment.target == "non_irradiated" and n_lesions < 2:
        raise QSPValidationError("assessment", "target", assessment.target, "needs a model with two lesions")
    target = np.ones(n_lesions, bool) if assessment.target == "all" else np.arange(n_lesions) == 1
    ok = result.status == 0
    arm = oc.arm_endpoints(
        result.days, diam_mm, ok, target_mask=target, assessment_interval_days=assessment.interval_days,
        confirm=assessment.confirm, death_rate_per_day=assessment.death_rate_per_day, seed=seed,
        out_of_field_lesion=1 if n_lesions > 1 else None,
        viable_fraction=result.viable_fraction_at_surgery if np.any(np.isfinite(result.viable_fraction_at_surgery))
        else None,
    )
    summary, reads, best, pfs, km = arm.summary, arm.assessments, arm.best, arm.pfs, arm.km
    dor = oc.duration_of_response(best)
    responders = np.isfinite(dor.days)
    if responders.any():
        dor_km = oc.kaplan_meier(dor.days[responders], dor.event[responders])
        summary["median_dor_days"] = oc.median_survival(dor_km)[0]
        summary["responders_censored"] = int((~dor.event[responders]).sum())
    summary["median_pfs_months"] = summary["median_pfs_days"] / DAYS_PER_MONTH
    summary["status_counts"] = status_counts(result.status)
    summary["assessment"] = vars(assessment) | {"days": reads.days.tolist()}
    summary["solver"] = {k: v for k, v in result.meta.items() if k != "screening"}
    summary["screening"] = result.meta.get("screening", {})
    rows = []
    for i in range(len(result.status)):
        rows.append({
            "patient": i,
            "status": "ok" if ok[i] else f"failed({int(result.status[i])})",
            "pdl1_tps_class": int(result.tps_class[i]),
            "baseline_diameter_irradiated_mm": float(diam_mm[i, 0, 0]),
            "baseline_diameter_non_irradiated_mm": float(diam_mm[i, 1, 0]) if n_lesions > 1 else math.nan,
            "best_percent_change": float(best.best_percent_change[i]),
            "best_overall_response": oc.RESPONSE_NAMES[int(best.category[i])],
            "pfs_days": float(pfs.days[i]),
            "progressed": bool(pfs.event[i]),
            "duration_of_response_days": float(dor.days[i]),
        })
    return TrialOutcome(summary, rows, reads, best, km)


# ---------------------------------------------------------------------------------------------
# Published endpoints of a dataset arm
# ---------------------------------------------------------------------------------------------
def published_endpoints(arm) -> dict[str, Any]:
    """The arm's published endpoints in the simulator's units (fractions, days), None if not given.

    The ORR interval is the paper's when printed, otherwise the exact (Clopper–Pearson) binomial
    interval of responders of N (marked ``orr_ci_source``).
    """
    def frac(pct):
        return None if pct is None else pct / 100.0

    out: dict[str, Any] = {"arm_id": arm.arm_id, "label": arm.label, "n": arm.n}
    out["orr"] = frac(arm.orr_pct)
    if arm.orr_ci is not None and all(isinstance(b, (int, float)) for b in arm.orr_ci):
        out["orr_ci"] = (frac(arm.orr_ci[0]), frac(arm.orr_ci[1]))
        out["orr_ci_source"] = "published"
    elif arm.responders is not None:
        out["orr_ci"] = oc.binomial_ci(arm.responders, arm.n)
        out["orr_ci_source"] = "exact binomial of responders/N"
    for key in ("dcr", "cr", "pr", "sd", "pd"):
        out[key] = frac(getattr(arm, f"{key}_pct"))
    median = arm.median_pfs_months
    out["median_pfs_days"] = median * DAYS_PER_MONTH if isinstance(median, (int, float)) else None
    if arm.median_pfs_ci is not None and all(isinstance(b, (int, float)) for b in arm.median_pfs_ci):
        out["median_pfs_ci_days"] = tuple(b * DAYS_PER_MONTH for b in arm.median_pfs_ci)
    out["pfs_landmarks"] = {
        float(lm.months * DAYS_PER_MONTH): lm.pct / 100.0
        for lm in arm.landmarks if lm.endpoint == "pfs" and lm.pct is not None
    }
    return out


def compare_with_published(summary: Mapping[str, Any], published: Mapping[str, Any]) -> dict[str, Any]:
    """Simulated and published endpoints side by side, with whether the published ORR lies in
    the simulated ORR's 95 % interval and the simulated ORR in the published interval."""
    rows = {}
    for key in ("orr", "dcr", "cr", "pr", "sd", "pd", "median_pfs_days"):
        rows[key] = {"simulated": summary.get(key), "published": published.get(key)}
    if published.get("orr") is not None:
        lo, hi = summary["orr_ci"]
        rows["orr"]["published_inside_simulated_ci"] = bool(lo <= published["orr"] <= hi)
        if published.get("orr_ci") is not None:
            plo, phi = published["orr_ci"]
            rows["orr"]["simulated_inside_published_ci"] = bool(plo <= summary["orr"] <= phi)
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
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``patients.csv``, ``summary.json`` (with the published values beside when given, and the
    entries of ``extra``, e.g. ``posterior_predictive``), ``trajectories.nc``, ``run.json`` and the
    PNGs waterfall, spider and Kaplan–Meier PFS."""
    out = Path(out)
    summary = dict(outcome.summary, regimen=result.regimen.name, **(extra or {}))
    if published is not None:
        summary["published"] = published
        summary["comparison"] = compare_with_published(outcome.summary, published)
    atomic_write_text(out / "patients.csv", _csv_text(outcome.patients))
    write_trajectories(result, out / "trajectories.nc")
    ok = outcome.best.status_ok
    title = result.regimen.name
    plots.waterfall(out / "waterfall.png", outcome.best.best_percent_change[ok], outcome.best.category[ok],
                    title=f"{title}: best change in sum of target diameters")
    plots.spider(out / "spider.png", outcome.assessments.days, outcome.assessments.percent_change[ok],
                 outcome.best.category[ok], title=f"{title}: change in sum of target diameters")
    plots.kaplan_meier_curve(
        out / "km_pfs.png", outcome.km, title=f"{title}: progression-free survival",
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
