"""Clinical outcomes from simulated lesion diameters: RECIST 1.1, survival, rates and their smooth twins.

Inputs are simulated lesion diameters in mm on a time grid ``times_days`` (T,) whose first point is
the start of treatment (day 0, the RECIST baseline). Diameters come either per lesion,
``(patients, lesions, T)``, with a lesion mask choosing the target lesions, or already summed,
``(patients, T)``. A per-patient ``status_ok`` mask (True = the solve succeeded) keeps failed
patients out of every rate and survival curve; they are counted, not dropped silently.

Three layers:

* hard outcomes (numpy, vectorised over patients): per-assessment RECIST categories, best overall
  response, time to progression, PFS with an optional competing death hazard, duration of
  response, out-of-field (abscopal) response, pathological response;
* statistics: Kaplan–Meier with Greenwood variance and log(-log) confidence band (lifelines'
  conventions), median survival with its CI, Clopper–Pearson intervals, and :func:`summarise`;
* smooth outcomes (jax.numpy) for calibration: every threshold comparison becomes a sigmoid of a
  dimensionless margin divided by ``temperature``; as the temperature goes to 0 they converge to
  the hard versions on data away from the thresholds.

Conventions (RECIST 1.1 adapted to a model that has no new lesions and no short axes):

* sum of diameters (SOD) of the target lesions; baseline = SOD at ``times_days[0]``;
* assessments every ``assessment_interval_days`` (56 = 8 weeks) after day 0 up to the last grid
  time, each read at the grid point nearest the scheduled day;
* what a scan records: each target lesion's diameter, or 0 mm (gone) when it is below
  ``detection_limit_mm`` (:data:`DETECTION_LIMIT_MM`, 5 mm); the SOD is the sum of these reads;
* CR: every target lesion reads as gone (read SOD = 0). RECIST's "nodes < 10 mm short axis" has
  no counterpart in a diameter-only model;
* PR: SOD at least 30 % below baseline; PD: SOD at least 20 % and at least 5 mm above the nadir,
  the smallest SOD among baseline and all previous assessments, or any target lesion read again
  after a read of all of them gone (reappearance after a CR is PD, Schwartz et al. 2016, RECIST 1.1
  update, Eur J Cancer 62:132); PD is checked first, then CR, then PR; SD otherwise. Boundaries
  are inclusive as RECIST states them (a relative tolerance of 1e-9 absorbs rounding, so
  100 → 70 mm is a PR);
* NE (not evaluable, code 4) marks failed patients and patients with no assessment qualifying
  for a best response; they stay in rate denominators (intention to treat) unless failed.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import scipy.stats
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from qspjax.errors import QSPValidationError

CR, PR, SD, PD, NE = 0, 1, 2, 3, 4
RESPONSE_NAMES = {CR: "CR", PR: "PR", SD: "SD", PD: "PD", NE: "NE"}

PR_MAX_CHANGE = -0.30  # RECIST 1.1: at least a 30 % decrease of the SOD from baseline
PD_MIN_CHANGE = 0.20  # RECIST 1.1: at least a 20 % increase of the SOD over the nadir ...
PD_MIN_ABSOLUTE_MM = 5.0  # ... that is also at least 5 mm
# The smallest lesion a scan can see: below it a lesion reads as gone (0 mm). RECIST 1.1
# (Eisenhauer et al. 2009, Eur J Cancer 45:228, section 3.1.1 and appendix II) sets the minimum
# *measurable* size at 10 mm, twice the 5 mm CT slice thickness it assumes, and tells readers to
# record a target lesion that is still faintly seen but "too small to measure" at a default 5 mm
# and one that has disappeared at 0 mm. A lesion below one slice thickness cannot be told from
# partial-volume noise, so 5 mm is the size under which a read of "gone" is the honest one; at or
# above it the lesion is seen and measured (at least the 5 mm default value).
DETECTION_LIMIT_MM = 5.0
SD_MIN_DAYS = 42.0  # SD counts as best response only from an assessment this many days in (6 weeks)
ABSCOPAL_MAX_CHANGE = -0.30  # an out-of-field lesion "responds" like a PR of that lesion alone
_TIE_RTOL = 1e-9  # so boundary values stated in RECIST (exactly -30 %, +20 %, +5 mm) count as met
_LOG_FLOOR_MM = 1e-6  # smooth versions take logs of SODs; a vanished lesion is floored here


# =============================================================================================
# Sum of diameters and the assessment schedule
# =============================================================================================
def sum_of_diameters(
    diameters_mm: Float[ArrayLike, "patients lesions time"] | Float[ArrayLike, "patients time"],
    target_mask: Bool[ArrayLike, "lesions"] | Bool[ArrayLike, "patients lesions"] | None = None,
) -> Float[np.ndarray, "patients time"]:
    """Sum of target-lesion diameters (mm). A 2-D input is taken as already summed.

    ``target_mask`` (default: every lesion) may be per lesion or per patient and lesion.
    """
    d = np.asarray(diameters_mm, dtype=float)
    if d.ndim == 2:
        return d
    mask = (np.ones(d.shape[:2], bool) if target_mask is None
            else np.broadcast_to(np.asarray(target_mask, bool), d.shape[:2]))
    # where, not multiply: a non-target lesion with a NaN diameter must not poison the sum
    return np.where(mask[..., None], d, 0.0).sum(axis=1)


def check_detection_limit(detection_limit_mm: float) -> float:
    """``detection_limit_mm`` as a float, or :class:`QSPValidationError` unless positive and finite."""
    try:
        value = float(detection_limit_mm)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0.0):
        raise QSPValidationError("outcomes", "detection_limit_mm", detection_limit_mm,
                                 "must be a positive, finite diameter in mm (RECIST 1.1 default: 5)")
    return value


def scan_sum_of_diameters(
    diameters_mm: Float[ArrayLike, "patients lesions time"] | Float[ArrayLike, "patients time"],
    target_mask: Bool[ArrayLike, "lesions"] | Bool[ArrayLike, "patients lesions"] | None = None,
    detection_limit_mm: float = DETECTION_LIMIT_MM,
) -> Float[np.ndarray, "patients time"]:
    """The SOD a scan records: each target lesion below ``detection_limit_mm`` reads 0 mm (gone).

    A 2-D input (already summed) is read as one lesion. NaN diameters stay NaN.
    """
    limit = check_detection_limit(detection_limit_mm)
    d = np.asarray(diameters_mm, dtype=float)
    with np.errstate(invalid="ignore"):
        read = np.where(d < limit * (1 - _TIE_RTOL), 0.0, d)
    return sum_of_diameters(read, target_mask)


def assessment_indices(
    times_days: Float[ArrayLike, "time"],
    assessment_interval_days: float = 56.0,
    assessment_days: Float[ArrayLike, "assessments"] | None = None,
) -> Int[np.ndarray, "assessments"]:
    """Grid indices of the response assessments: the grid point nearest each scheduled day.

    Scheduled days (relative to ``times_days[0]``) are ``assessment_days`` if given, otherwise
    every ``assessment_interval_days`` from the first interval up to the last grid time. The grid
    should be finer than the interval (a daily grid is), or two assessments can share a point.
    """
    t = np.asarray(times_days, dtype=float)
    rel = t - t[0]
    if assessment_days is None:
        n = int(math.floor(rel[-1] / assessment_interval_days * (1.0 + _TIE_RTOL)))
        scheduled = assessment_interval_days * np.arange(1, n + 1)
    else:
        scheduled = np.asarray(assessment_days, dtype=float)
    right = np.clip(np.searchsorted(rel, scheduled), 1, len(rel) - 1)
    left = right - 1
    nearer_left = np.abs(rel[left] - scheduled) <= np.abs(rel[right] - scheduled)
    return np.where(nearer_left, left, right).astype(int)


# =============================================================================================
# RECIST per assessment and best overall response
# =============================================================================================
class RecistAssessments(NamedTuple):
    """RECIST reads of a cohort at its assessments.

    ``days`` (A,) are grid times relative to day 0; ``sum_diameters_mm`` (the SOD the scans
    record, lesions below the detection limit read 0) and ``percent_change`` (change from
    baseline, in %) are (P, A); ``category`` (P, A) holds CR/PR/SD/PD codes (NE for
    failed patients); ``status_ok`` (P,) is the solve status passed in.
    """

    days: Float[np.ndarray, "assessments"]
    baseline_mm: Float[np.ndarray, "patients"]
    sum_diameters_mm: Float[np.ndarray, "patients assessments"]
    percent_change: Float[np.ndarray, "patients assessments"]
    category: Int[np.ndarray, "patients assessments"]
    status_ok: Bool[np.ndarray, "patients"]


def _status(status_ok, n_patients: int) -> np.ndarray:
    if status_ok is None:
        return np.ones(n_patients, bool)
    return np.broadcast_to(np.asarray(status_ok, bool), (n_patients,)).copy()


def recist_assessments(
    times_days: Float[ArrayLike, "time"],
    diameters_mm: Float[ArrayLike, "patients lesions time"] | Float[ArrayLike, "patients time"],
    target_mask: Bool[ArrayLike, "lesions"] | Bool[ArrayLike, "patients lesions"] | None = None,
    status_ok: Bool[ArrayLike, "patients"] | None = None,
    *,
    assessment_interval_days: float = 56.0,
    assessment_days: Float[ArrayLike, "assessments"] | None = None,
    detection_limit_mm: float = DETECTION_LIMIT_MM,
) -> RecistAssessments:
    """Classify every assessment as CR, PR, SD or PD by RECIST 1.1 on the target-lesion SOD.

    Every read is what a scan records (:func:`scan_sum_of_diameters`): a target lesion below
    ``detection_limit_mm`` reads 0 mm, and CR means every target lesion reads 0. PD is measured
    from the nadir: the smallest SOD among baseline and all *previous* assessments, so a lesion
    that shrank to 50 mm and regrew to 61 mm is PD even while still below its 100 mm baseline; a
    nadir of 0 (a CR was read) followed by any visible target lesion is PD too (reappearance).
    """
    t = np.asarray(times_days, dtype=float)
    sod = scan_sum_of_diameters(diameters_mm, target_mask, detection_limit_mm)
    ok = _status(status_ok, sod.shape[0])
    idx = assessment_indices(t, assessment_interval_days, assessment_days)
    baseline = sod[:, 0]
    at = sod[:, idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        change = at / baseline[:, None] - 1.0
        history = np.concatenate([baseline[:, None], at[:, :-1]], axis=1)
        nadir = np.minimum.accumulate(history, axis=1)
        growth = at - nadir
        is_pd = (growth >= PD_MIN_CHANGE * nadir * (1 - _TIE_RTOL)) & (growth >= PD_MIN_ABSOLUTE_MM * (1 - _TIE_RTOL))
        is_pd |= (nadir <= 0.0) & (at > 0.0)  # a lesion seen again after all were gone
        is_cr = at <= 0.0
        is_pr = change <= PR_MAX_CHANGE * (1 - _TIE_RTOL)
    category = np.select([is_pd, is_cr, is_pr], [PD, CR, PR], default=SD)
    category = np.where(ok[:, None], category, NE)
    return RecistAssessments(t[idx] - t[0], baseline, at, 100.0 * change, category.astype(int), ok)


class BestResponse(NamedTuple):
    """Per-patient best overall response and the events that define the response endpoints.

    All arrays are (P,). ``category``: CR/PR/SD/PD/NE codes. ``best_percent_change``: the
    largest decrease (most negative % change) over assessments up to and including the first PD
    (what a waterfall plot shows); NaN without assessments. ``response_day``: day of the first
    assessment of a (confirmed) CR/PR, NaN for non-responders. ``progression_day``: day of the
    first PD assessment, NaN without PD. ``last_assessment_day``: 0 without assessments.
    """

    category: Int[np.ndarray, "patients"]
    best_percent_change: Float[np.ndarray, "patients"]
    response_day: Float[np.ndarray, "patients"]
    progression_day: Float[np.ndarray, "patients"]
    last_assessment_day: Float[np.ndarray, "patients"]
    status_ok: Bool[np.ndarray, "patients"]


def _last_index(mask: np.ndarray) -> np.ndarray:
    """Index of the last True along the last axis, -1 where none."""
    return np.where(mask, np.arange(mask.shape[-1]), -1).max(axis=-1, initial=-1)


def _first_index(mask: np.ndarray) -> np.ndarray:
    """Index of the first True along the last axis, n (one past the end) where none."""
    n = mask.shape[-1]
    return np.where(mask, np.arange(n), n).min(axis=-1, initial=n)


def best_overall_response(
    assessments: RecistAssessments,
    *,
    confirm: bool = False,
    confirm_min_days: float = 28.0,
    sd_min_days: float = SD_MIN_DAYS,
) -> BestResponse:
    """RECIST 1.1 best overall response: the best category recorded before progression.

    CR/PR count if seen at an assessment before the first PD; with ``confirm`` they must be
    confirmed by a later assessment at least ``confirm_min_days`` later and still before PD (a CR
    by a CR; a PR by a PR or CR; a CR confirmed only by a PR is a confirmed PR; intervening SD is
    allowed). SD (including unconfirmed CR/PR) counts only from an assessment at least
    ``sd_min_days`` after day 0; otherwise the best response is PD if a PD occurred, else NE.
    """
    days = assessments.days
    cat = assessments.category
    n_patients, n_assess = cat.shape
    ok = assessments.status_ok
    first_pd = _first_index(cat == PD)
    before_pd = np.arange(n_assess)[None, :] < first_pd[:, None]
    is_cr = (cat == CR) & before_pd
    is_resp = ((cat == CR) | (cat == PR)) & before_pd
    if confirm:
        # earliest assessment that may confirm assessment i; n_assess when none is late enough
        earliest_confirmer = np.searchsorted(days, days + confirm_min_days * (1 - _TIE_RTOL), side="left")
        earliest_confirmer = np.maximum(earliest_confirmer, np.arange(n_assess) + 1)
    else:
        earliest_confirmer = np.arange(n_assess)
    # a later confirming assessment exists iff the last qualifying one comes late enough
    cr_confirmed = is_cr & (_last_index(is_cr)[:, None] >= earliest_confirmer[None, :])
    resp_confirmed = is_resp & (_last_index(is_resp)[:, None] >= earliest_confirmer[None, :])
    sd_eligible = (cat != PD) & (cat != NE) & before_pd & (days[None, :] >= sd_min_days * (1 - _TIE_RTOL))
    category = np.select(
        [cr_confirmed.any(1), resp_confirmed.any(1), sd_eligible.any(1), first_pd < n_assess],
        [CR, PR, SD, PD], default=NE,
    )
    category = np.where(ok, category, NE).astype(int)

    padded_days = np.append(days, np.nan)
    response_day = np.where(ok, padded_days[_first_index(resp_confirmed)], np.nan)
    progression_day = np.where(ok, padded_days[first_pd], np.nan)
    up_to_pd = np.arange(n_assess)[None, :] <= first_pd[:, None]
    with np.errstate(invalid="ignore"):
        masked = np.where(up_to_pd, assessments.percent_change, np.inf)
        best = masked.min(axis=1, initial=np.inf)
    best = np.where(ok & np.isfinite(best), best, np.nan)
    last_day = np.full(n_patients, days[-1] if n_assess else 0.0)
    return BestResponse(category, best, response_day, progression_day, last_day, ok)


def response_at_day(
    times_days: Float[ArrayLike, "time"],
    diameters_mm: Float[ArrayLike, "patients lesions time"] | Float[ArrayLike, "patients time"],
    day: float,
    target_mask: Bool[ArrayLike, "lesions"] | Bool[ArrayLike, "patients lesions"] | None = None,
    status_ok: Bool[ArrayLike, "patients"] | None = None,
    *,
    assessment_interval_days: float = 56.0,
    detection_limit_mm: float = DETECTION_LIMIT_MM,
    sd_min_days: float = SD_MIN_DAYS,
) -> Int[np.ndarray, "patients"]:
    """RECIST category read at one fixed time (a trial that reports "response at 2.9 months").

    A scan at ``day`` (relative to ``times_days[0]``, the baseline) after the scheduled scans
    before it (every ``assessment_interval_days``), which set the nadir: PD if that scan or an
    earlier one reads PD, otherwise the scan's own CR/PR/SD (not the best of the follow-up);
    SD before ``sd_min_days`` reads NE, as failed patients do. No confirmation.
    """
    t = np.asarray(times_days, dtype=float)
    span = float(t[-1] - t[0])
    try:
        day = float(day)
    except (TypeError, ValueError):
        day = math.nan
    if not (math.isfinite(day) and 0.0 < day <= span * (1 + _TIE_RTOL)):
        raise QSPValidationError("outcomes", "day", day, f"a fixed response time within (0, {span:g}] days of baseline")
    earlier = assessment_interval_days * np.arange(1, int(math.ceil(day / assessment_interval_days)) + 1)
    scans = np.append(earlier[earlier < day * (1 - _TIE_RTOL)], day)
    a = recist_assessments(t, diameters_mm, target_mask, status_ok, assessment_days=scans,
                           detection_limit_mm=detection_limit_mm)
    at_day = a.category[:, -1]
    early_sd = (at_day == SD) & (day < sd_min_days * (1 - _TIE_RTOL))
    category = np.where((a.category == PD).any(axis=1), PD, np.where(early_sd, NE, at_day))
    return np.where(a.status_ok, category, NE).astype(int)


# =============================================================================================
# Time-to-event endpoints
# =============================================================================================
class TimeToEvent(NamedTuple):
    """Per-patient times (days) and event flags (False = censored); (P,). NaN time = not defined
    for this patient (failed solve, or a non-responder for the duration of response)."""

    days: Float[np.ndarray, "patients"]
    event: Bool[np.ndarray, "patients"]


def time_to_progression(best: BestResponse) -> TimeToEvent:
    """Day of the first PD assessment; censored at the last assessment without PD."""
    progressed = np.isfinite(best.progression_day)
    days = np.where(progressed, best.progression_day, best.last_assessment_day)
    return TimeToEvent(np.where(best.status_ok, days, np.nan), progressed & best.status_ok)


def death_times(
    n_patients: int, death_rate_per_day: float, seed: int | np.random.Generator = 0
) -> Float[np.ndarray, "patients"]:
    """Death times (days) from a constant hazard, one per patient (inf when the rate is 0).

    One draw per patient whatever their status, so a patient keeps their draw across cohorts that
    differ only in which solves failed.
    """
    if death_rate_per_day <= 0.0:
        return np.full(n_patients, np.inf)
    return np.random.default_rng(seed).exponential(1.0 / death_rate_per_day, size=n_patients)


def progression_free_survival(
    ttp: TimeToEvent,
    *,
    death_rate_per_day: float = 0.0,
    seed: int | np.random.Generator = 0,
) -> TimeToEvent:
    """PFS = min(progression, death) with deaths from a constant hazard (Exp(rate), seeded).

    A death after the censoring time of a non-progressor is not observed, so the patient stays
    censored there. With a zero rate PFS equals time to progression.
    """
    death = death_times(len(ttp.days), death_rate_per_day, seed)
    dies_first = death < ttp.days
    days = np.where(dies_first, death, ttp.days)
    return TimeToEvent(days, (ttp.event | dies_first) & np.isfinite(ttp.days))


def duration_of_response(best: BestResponse) -> TimeToEvent:
    """From the first (confirmed) CR/PR to PD; censored at the last assessment. NaN for non-responders."""
    responder = (best.category == CR) | (best.category == PR)
    progressed = np.isfinite(best.progression_day)
    end = np.where(progressed, best.progression_day, best.last_assessment_day)
    return TimeToEvent(np.where(responder, end - best.response_day, np.nan), responder & progressed)


def out_of_field_response(
    times_days: Float[ArrayLike, "time"],
    diameters_mm: Float[ArrayLike, "patients lesions time"],
    lesion: int,
    status_ok: Bool[ArrayLike, "patients"] | None = None,
    *,
    assessment_interval_days: float = 56.0,
    assessment_days: Float[ArrayLike, "assessments"] | None = None,
    detection_limit_mm: float = DETECTION_LIMIT_MM,
) -> Bool[np.ndarray, "patients"]:
    """Abscopal response: the non-irradiated ``lesion`` alone is ≥ 30 % below its own baseline
    diameter at any assessment (read as a scan records it). False for failed patients."""
    single = np.asarray(diameters_mm, dtype=float)[:, lesion, :]
    a = recist_assessments(times_days, single, status_ok=status_ok,
                           assessment_interval_days=assessment_interval_days, assessment_days=assessment_days,
                           detection_limit_mm=detection_limit_mm)
    with np.errstate(invalid="ignore"):
        shrank = (a.percent_change <= 100.0 * ABSCOPAL_MAX_CHANGE * (1 - _TIE_RTOL)).any(axis=1)
    return shrank & a.status_ok


class PathologicalResponse(NamedTuple):
    """Per patient (P,): pathological complete response, major pathological response, and
    whether the patient is evaluable (valid solve and a resected lesion)."""

    pcr: Bool[np.ndarray, "patients"]
    mpr: Bool[np.ndarray, "patients"]
    evaluable: Bool[np.ndarray, "patients"]


def pathological_response(
    viable_fraction: Float[ArrayLike, "patients"] | Float[ArrayLike, "patients lesions"],
    status_ok: Bool[ArrayLike, "patients"] | None = None,
    *,
    pcr_max_viable_fraction: float = 1e-3,
    mpr_max_viable_fraction: float = 0.10,
) -> PathologicalResponse:
    """pCR / MPR from the viable cancer-cell fraction of resected specimens (NaN = not resected).

    MPR: ≤ 10 % viable tumour. pCR means no viable tumour; a continuous model never reaches an
    exact zero, so pCR is a viable fraction below ``pcr_max_viable_fraction`` (default 0.1 %,
    under what sampling of a specimen would find). With several resected lesions the one with
    the most viable tumour decides.
    """
    v = np.asarray(viable_fraction, dtype=float)
    if v.ndim == 2:
        resected = np.isfinite(v).any(axis=1)
        v = np.where(resected, np.max(np.where(np.isfinite(v), v, -np.inf), axis=1), np.nan)
    evaluable = np.isfinite(v) & _status(status_ok, v.shape[0])
    with np.errstate(invalid="ignore"):
        pcr = evaluable & (v < pcr_max_viable_fraction)
        mpr = evaluable & (v <= mpr_max_viable_fraction * (1 + _TIE_RTOL))
    return PathologicalResponse(pcr, mpr, evaluable)


# =============================================================================================
# Statistics: binomial intervals, Kaplan–Meier, medians
# =============================================================================================
class Rate(NamedTuple):
    """A proportion k / n with its Clopper–Pearson interval (NaN when n = 0)."""

    k: int
    n: int
    estimate: float
    ci_low: float
    ci_high: float


def binomial_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson (exact) interval for a binomial proportion; (NaN, NaN) when n = 0."""
    if n == 0:
        return (math.nan, math.nan)
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(scipy.stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(scipy.stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return (low, high)


def rate(
    flags: Bool[ArrayLike, "patients"],
    status_ok: Bool[ArrayLike, "patients"] | None = None,
    confidence: float = 0.95,
) -> Rate:
    """Fraction of valid patients with ``flags`` set, with its exact binomial interval."""
    f = np.asarray(flags, bool)
    ok = _status(status_ok, f.shape[0])
    k, n = int((f & ok).sum()), int(ok.sum())
    low, high = binomial_ci(k, n, confidence)
    return Rate(k, n, k / n if n else math.nan, low, high)


class KaplanMeier(NamedTuple):
    """Kaplan–Meier table on lifelines' timeline (0 and every distinct duration), all (K,).

    ``survival`` is right-continuous (after the events at that time); ``greenwood`` is the
    cumulative Greenwood sum Σ d / (n (n - d)), i.e. Var(log S); ``ci_lower``/``ci_upper`` the
    pointwise log(-log) band.
    """

    time: Float[np.ndarray, "k"]
    n_at_risk: Int[np.ndarray, "k"]
    n_events: Int[np.ndarray, "k"]
    n_censored: Int[np.ndarray, "k"]
    survival: Float[np.ndarray, "k"]
    greenwood: Float[np.ndarray, "k"]
    ci_lower: Float[np.ndarray, "k"]
    ci_upper: Float[np.ndarray, "k"]

    def as_dict(self) -> dict[str, list]:
        """Columns as plain lists (JSON-ready; ``pandas.DataFrame(km.as_dict())`` gives the table)."""
        return {name: getattr(self, name).tolist() for name in self._fields}


def kaplan_meier(
    durations: Float[ArrayLike, "n"],
    event_observed: Bool[ArrayLike, "n"],
    confidence: float = 0.95,
) -> KaplanMeier:
    """Kaplan–Meier estimate with Greenwood variance and a log(-log) confidence band.

    Matches ``lifelines.KaplanMeierFitter`` defaults: the band is
    exp(-exp(log(-log S) ± z sqrt(V) / log S)), 1 where S = 1, 0 where S = 0; an interval whose
    remaining patients all die (n = d) adds 0 to the Greenwood sum rather than infinity.
    NaN durations (failed patients) are dropped.
    """
    t = np.asarray(durations, dtype=float)
    e = np.asarray(event_observed, bool)
    keep = np.isfinite(t)
    t, e = t[keep], e[keep]
    time = np.unique(np.concatenate([[0.0], t]))
    # counts per distinct time via the sorted position of each duration
    pos = np.searchsorted(time, t)
    removed = np.bincount(pos, minlength=len(time))
    n_events = np.bincount(pos, weights=e.astype(float), minlength=len(time)).astype(int)
    n_at_risk = len(t) - np.concatenate([[0], np.cumsum(removed)[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        survival = np.cumprod(np.where(n_at_risk > 0, 1.0 - n_events / n_at_risk, 1.0))
        step = n_events / (n_at_risk * (n_at_risk - n_events).astype(float))
        greenwood = np.cumsum(np.where(np.isfinite(step), step, 0.0))
        z = scipy.special.ndtri(1.0 - (1.0 - confidence) / 2.0)
        log_s = np.log(survival)
        half_width = z * np.sqrt(greenwood) / log_s
        lower = np.exp(-np.exp(np.log(-log_s) - half_width))
        upper = np.exp(-np.exp(np.log(-log_s) + half_width))
    # S = 1 gives 0/0 above: nothing has happened yet, so the band is the point
    lower = np.where(np.isnan(lower), 1.0, lower)
    upper = np.where(np.isnan(upper), 1.0, upper)
    return KaplanMeier(time, n_at_risk.astype(int), n_events, removed - n_events, survival, greenwood, lower, upper)


def survival_quantile_time(time: Float[ArrayLike, "k"], curve: Float[ArrayLike, "k"], q: float = 0.5) -> float:
    """First time a step curve is ≤ q (lifelines' convention); inf if it never gets there."""
    below = np.flatnonzero(np.asarray(curve) <= q)
    return float(np.asarray(time)[below[0]]) if below.size else math.inf


def median_survival(km: KaplanMeier) -> tuple[float, tuple[float, float]]:
    """Median survival and its CI from where the band crosses 0.5 (inf = not reached).

    The lower limit is where the lower band reaches 0.5, the upper limit where the upper band
    does; lifelines' ``median_survival_times(kmf.confidence_interval_)``.
    """
    return (
        survival_quantile_time(km.time, km.survival),
        (survival_quantile_time(km.time, km.ci_lower), survival_quantile_time(km.time, km.ci_upper)),
    )


# Why a summary value written by :func:`qspjax.io.atomic_write_json` is null: medians of
# :func:`median_survival` are inf when the curve (or a band limit) never falls to 0.5.
NULL_REASONS = {
    "median_pfs_days": "not reached: the PFS Kaplan-Meier curve stays above 0.5 to the last assessment",
    "median_pfs_months": "not reached: the PFS Kaplan-Meier curve stays above 0.5 to the last assessment",
    "median_pfs_ci_days": "not reached: a confidence limit of the PFS Kaplan-Meier curve stays above 0.5 "
                          "to the last assessment",
    "median_dor_days": "not reached: the duration-of-response Kaplan-Meier curve of the responders stays "
                       "above 0.5 to the last assessment",
}


def survival_at(km: KaplanMeier, days: Float[ArrayLike, "e"]) -> Float[np.ndarray, "e"]:
    """The step curve evaluated at ``days`` (landmark survival, e.g. 12-month PFS)."""
    i = np.searchsorted(km.time, np.asarray(days, dtype=float), side="right") - 1
    return np.where(i >= 0, km.survival[np.maximum(i, 0)], 1.0)


# =============================================================================================
# Cohort summary
# =============================================================================================
def summarise(
    times_days: Float[ArrayLike, "time"],
    diameters_mm: Float[ArrayLike, "patients lesions time"] | Float[ArrayLike, "patients time"],
    status_ok: Bool[ArrayLike, "patients"] | None = None,
    *,
    target_mask: Bool[ArrayLike, "lesions"] | Bool[ArrayLike, "patients lesions"] | None = None,
    assessment_interval_days: float = 56.0,
    assessment_days: Float[ArrayLike, "assessments"] | None = None,
    detection_limit_mm: float = DETECTION_LIMIT_MM,
    confirm: bool = False,
    confirm_min_days: float = 28.0,
    sd_min_days: float = SD_MIN_DAYS,
    death_rate_per_day: float = 0.0,
    seed: int = 0,
    confidence: float = 0.95,
    out_of_field_lesion: int | None = None,
    viable_fraction: Float[ArrayLike, "patients"] | Float[ArrayLike, "patients lesions"] | None = None,
) -> dict[str, Any]:
    """Arm-level endpoints of a simulated cohort, as plain Python numbers.

    Rates are over valid patients (``n_evaluated``); ``n_failed`` counts the rest. Medians are
    in days, ``inf`` when not reached. ``km`` is the PFS Kaplan–Meier table as columns of lists.
    Abscopal and pathological entries appear when their inputs are given. The per-patient reads
    behind them come with :func:`arm_endpoints`.
    """
    return arm_endpoints(
        times_days, diameters_mm, status_ok, target_mask=target_mask,
        assessment_interval_days=assessment_interval_days, assessment_days=assessment_days,
        detection_limit_mm=detection_limit_mm, confirm=confirm, confirm_min_days=confirm_min_days,
        sd_min_days=sd_min_days, death_rate_per_day=death_rate_per_day, seed=seed, confidence=confidence,
        out_of_field_lesion=out_of_field_lesion, viable_fraction=viable_fraction,
    ).summary


class ArmEndpoints(NamedTuple):
    """:func:`summarise`'s dict and the per-patient reads it was computed from."""

    summary: dict[str, Any]
    assessments: RecistAssessments
    best: BestResponse
    pfs: TimeToEvent
    km: KaplanMeier


def arm_endpoints(
    times_days: Float[ArrayLike, "time"],
    diameters_mm: Float[ArrayLike, "patients lesions time"] | Float[ArrayLike, "patients time"],
    status_ok: Bool[ArrayLike, "patients"] | None = None,
    *,
    target_mask: Bool[ArrayLike, "lesions"] | Bool[ArrayLike, "patients lesions"] | None = None,
    assessment_interval_days: float = 56.0,
    assessment_days: Float[ArrayLike, "assessments"] | None = None,
    detection_limit_mm: float = DETECTION_LIMIT_MM,
    confirm: bool = False,
    confirm_min_days: float = 28.0,
    sd_min_days: float = SD_MIN_DAYS,
    death_rate_per_day: float = 0.0,
    seed: int = 0,
    confidence: float = 0.95,
    out_of_field_lesion: int | None = None,
    viable_fraction: Float[ArrayLike, "patients"] | Float[ArrayLike, "patients lesions"] | None = None,
) -> ArmEndpoints:
    """:func:`summarise`, also returning the RECIST reads, best responses, PFS times and PFS
    Kaplan–Meier it computed (for per-patient tables and plots of the same cohort)."""
    a = recist_assessments(times_days, diameters_mm, target_mask, status_ok,
                           assessment_interval_days=assessment_interval_days,
                           assessment_days=assessment_days, detection_limit_mm=detection_limit_mm)
    best = best_overall_response(a, confirm=confirm, confirm_min_days=confirm_min_days, sd_min_days=sd_min_days)
    ok = a.status_ok
    bor = best.category
    orr = rate((bor == CR) | (bor == PR), ok, confidence)
    dcr = rate((bor == CR) | (bor == PR) | (bor == SD), ok, confidence)
    pfs = progression_free_survival(time_to_progression(best), death_rate_per_day=death_rate_per_day, seed=seed)
    km = kaplan_meier(pfs.days, pfs.event, confidence)
    median, median_ci = median_survival(km)
    out: dict[str, Any] = {
        "n_patients": int(ok.size),
        "n_failed": int((~ok).sum()),
        "n_evaluated": orr.n,
        "orr": orr.estimate,
        "orr_ci": (orr.ci_low, orr.ci_high),
        "dcr": dcr.estimate,
        "dcr_ci": (dcr.ci_low, dcr.ci_high),
    }
    for code, name in RESPONSE_NAMES.items():
        out[name.lower()] = rate(bor == code, ok, confidence).estimate
    out["median_pfs_days"] = median
    out["median_pfs_ci_days"] = median_ci
    out["km"] = km.as_dict()
    if out_of_field_lesion is not None:
        ab = rate(out_of_field_response(times_days, diameters_mm, out_of_field_lesion, ok,
                                        assessment_interval_days=assessment_interval_days,
                                        assessment_days=assessment_days,
                                        detection_limit_mm=detection_limit_mm), ok, confidence)
        out["abscopal_rate"] = ab.estimate
        out["abscopal_ci"] = (ab.ci_low, ab.ci_high)
    if viable_fraction is not None:
        path = pathological_response(viable_fraction, ok)
        for name, flags in (("pcr", path.pcr), ("mpr", path.mpr)):
            r = rate(flags, path.evaluable, confidence)
            out[f"{name}_rate"] = r.estimate
            out[f"{name}_ci"] = (r.ci_low, r.ci_high)
        out["n_pathology_evaluable"] = int(path.evaluable.sum())
    return ArmEndpoints(out, a, best, pfs, km)


# =============================================================================================
# Smooth, differentiable versions (jax.numpy)
# =============================================================================================
class _SoftCourse(NamedTuple):
    """Soft RECIST course of a cohort, from one scan over the assessments."""

    days: np.ndarray  # (A,) assessment days relative to day 0: fixed data
    no_progression_through: Array  # (P, A) P(no PD at this or any earlier assessment)
    ever_complete: Array  # (P,) best over assessments of "CR here and no PD through here"
    ever_response: Array  # (P,) the same for a CR or PR
    ever_control: Array  # (P,) the same for a CR/PR, or a non-PD read from sd_min_days on


def _soft_reads(diameters_mm, target_mask, status_ok, columns, temperature, detection_limit_mm):
    """Smooth scan reads at grid ``columns``: log of the read SOD and P(every target lesion gone).

    Each target lesion is seen with the smooth indicator v = σ((log d - log limit) / τ) and enters
    the read SOD as v·d (its expected recorded diameter: d when seen, 0 when read as gone);
    "all gone" is Π (1 - v) over the target lesions, formed from log-sigmoids. A 2-D input is one
    lesion. Failed patients and non-target lesions are replaced by constants before any
    arithmetic, so NaNs in their slots cannot reach values or gradients.
    """
    d = jnp.asarray(diameters_mm)
    if d.ndim == 2:
        d = d[:, None, :]
        mask = jnp.ones(d.shape[:2], bool)
    else:
        mask = (jnp.ones(d.shape[:2], bool) if target_mask is None
                else jnp.broadcast_to(jnp.asarray(target_mask, bool), d.shape[:2]))
    d = d[:, :, columns]
    keep = mask[..., None]
    if status_ok is not None:
        keep = keep & jnp.asarray(status_ok, bool)[:, None, None]
    d = jnp.where(keep, d, 2.0 * detection_limit_mm)
    margin = (jnp.log(jnp.maximum(d, _LOG_FLOOR_MM)) - math.log(detection_limit_mm)) / temperature
    read = jnp.sum(jnp.where(mask[..., None], jax.nn.sigmoid(margin) * d, 0.0), axis=1)
    gone = jnp.exp(jnp.sum(jnp.where(mask[..., None], jax.nn.log_sigmoid(-margin), 0.0), axis=1))
    return jnp.log(jnp.maximum(read, _LOG_FLOOR_MM)), gone


def _soft_course(times_days, diameters_mm, target_mask, status_ok, temperature, assessment_interval_days,
                 assessment_days, detection_limit_mm, sd_min_days) -> _SoftCourse:
    """Soft indicators of PD, CR and PR at each assessment, combined along the course.

    The reads are :func:`_soft_reads` at baseline and each assessment; a ``lax.scan`` over the
    assessments carries the exact running nadir of the read SOD, whether every lesion was read as
    gone before (for PD by reappearance), P(no PD so far), and the running best of each
    "X at this scan and no PD through it". Cumulative jnp ops would do the same but compile
    seconds slower, gradients above all.
    """
    limit = check_detection_limit(detection_limit_mm)
    idx = assessment_indices(times_days, assessment_interval_days, assessment_days)
    t = np.asarray(times_days, dtype=float)
    days = t[idx] - t[0]
    columns = np.concatenate([[0], idx]).astype(int)
    log_read, gone = _soft_reads(diameters_mm, target_mask, status_ok, columns, temperature, limit)
    sd_time_ok = jnp.asarray(days >= sd_min_days * (1 - _TIE_RTOL), dtype=log_read.dtype)
    no_pd, best_cr, best_resp, best_dc = _soft_scan(log_read, gone, sd_time_ok, temperature)
    return _SoftCourse(days, no_pd, best_cr, best_resp, best_dc)


@jax.jit
def _soft_scan(log_read, gone, sd_time_ok, temperature):
    """The scan of :func:`_soft_course` over assessments; column 0 of ``log_read`` and ``gone``
    (P, 1 + A) is the baseline. Jitted at module level with every setting as an argument, so eager
    callers reuse one compilation per cohort shape instead of re-tracing the scan.

    Per assessment: PD = max(σ(relative margin)·σ(absolute margin), reappearance), with
    reappearance = (all gone at baseline or an earlier scan) · (not all gone now); CR = all gone;
    response = max(CR, σ(PR margin)); control = max(response, SD timing). The nadir is the exact
    running minimum of the log read SOD (``jnp.minimum``: differentiable except where two reads
    tie, where either one-sided derivative is valid); a soft-min would sit τ log(k + 1) below it
    and make a stable tumor look progressed. "Ever X before PD" is the running maximum over
    assessments of X_a · P(no PD through a), the smooth read of the single best scan, as the hard
    best response is: a course that reads X with the same soft probability at one scan or at six
    gets the same value (a noisy-OR over scans, 1 - Π(1 - X_a), would climb with their number).
    P(no PD through a) stays the product Π_{b≤a}(1 - PD_b).
    """
    sigmoid = jax.nn.sigmoid
    log_base = log_read[:, 0]

    def one_assessment(carry, read):
        log_nadir, was_gone, no_pd, best_cr, best_resp, best_dc = carry
        log_sod, all_gone, sd_ok = read
        # both PD limits as dimensionless margins: a log-ratio and (growth - 5 mm) / 5 mm
        relative = (log_sod - log_nadir - math.log1p(PD_MIN_CHANGE)) / temperature
        absolute = (jnp.exp(log_sod) - jnp.exp(log_nadir) - PD_MIN_ABSOLUTE_MM) / (PD_MIN_ABSOLUTE_MM * temperature)
        progression = jnp.maximum(sigmoid(relative) * sigmoid(absolute), was_gone * (1.0 - all_gone))
        no_pd = no_pd * (1.0 - progression)
        partial = sigmoid((math.log1p(PR_MAX_CHANGE) - (log_sod - log_base)) / temperature)
        response = jnp.maximum(all_gone, partial)
        control = jnp.maximum(response, sd_ok)
        best_cr = jnp.maximum(best_cr, no_pd * all_gone)
        best_resp = jnp.maximum(best_resp, no_pd * response)
        best_dc = jnp.maximum(best_dc, no_pd * control)
        carry = (jnp.minimum(log_nadir, log_sod), jnp.maximum(was_gone, all_gone), no_pd, best_cr, best_resp, best_dc)
        return carry, no_pd

    zeros = jnp.zeros_like(log_base)
    init = (log_base, gone[:, 0], jnp.ones_like(log_base), zeros, zeros, zeros)
    (_, _, _, best_cr, best_resp, best_dc), no_pd = jax.lax.scan(
        one_assessment, init, (log_read[:, 1:].T, gone[:, 1:].T, sd_time_ok))
    return no_pd.T, best_cr, best_resp, best_dc


def soft_best_response_probabilities(
    times_days: Float[ArrayLike, "time"],
    diameters_mm: Float[Array, "patients lesions time"] | Float[Array, "patients time"],
    target_mask: Bool[ArrayLike, "lesions"] | Bool[ArrayLike, "patients lesions"] | None = None,
    status_ok: Bool[ArrayLike, "patients"] | None = None,
    *,
    temperature: float = 0.05,
    assessment_interval_days: float = 56.0,
    assessment_days: Float[ArrayLike, "assessments"] | None = None,
    detection_limit_mm: float = DETECTION_LIMIT_MM,
    sd_min_days: float = SD_MIN_DAYS,
) -> Float[Array, "patients 5"]:
    """Smooth multinomial over best overall response, columns CR, PR, SD, PD, NE (unconfirmed BOR).

    Each threshold becomes a sigmoid of a dimensionless margin over ``temperature``: log-ratios
    for the relative thresholds (-30 %, +20 %, a lesion's size against ``detection_limit_mm``),
    (Δ - 5 mm) / 5 mm for the absolute PD rule; the nadir is the exact running minimum of the read
    SOD. "No PD through assessment a" is Π_{b≤a}(1 - PD_b); "X before PD" (X = CR, response,
    disease control) is max_a X_a · (no PD through a), the single best scan, as the hard best
    response; "evaluable" is the noisy-OR of disease control and any PD. The columns are
    differences of these nested probabilities (CR ⊂ response ⊂ control scan by scan), so they are
    ≥ 0 and sum to 1. P(response) is the sum of the first two. As the temperature goes to 0 they
    converge to the hard :func:`best_overall_response` (unconfirmed) on courses away from the
    thresholds. ``times_days`` must be concrete (not traced): it fixes the assessment schedule.
    """
    c = _soft_course(times_days, diameters_mm, target_mask, status_ok, temperature,
                     assessment_interval_days, assessment_days, detection_limit_mm, sd_min_days)
    any_pd = 1.0 - c.no_progression_through[:, -1] if c.days.size else jnp.zeros_like(c.ever_complete)
    evaluable = 1.0 - (1.0 - c.ever_control) * (1.0 - any_pd)
    cumulative = jnp.stack([c.ever_complete, c.ever_response, c.ever_control, evaluable,
                            jnp.ones_like(evaluable)], axis=1)
    # nested by construction; the clip only removes rounding below 0
    return jnp.clip(jnp.diff(cumulative, axis=1, prepend=0.0), 0.0, 1.0)


def soft_progression_free_probability(
    times_days: Float[ArrayLike, "time"],
    diameters_mm: Float[Array, "patients lesions time"] | Float[Array, "patients time"],
    eval_days: Float[ArrayLike, "e"],
    target_mask: Bool[ArrayLike, "lesions"] | Bool[ArrayLike, "patients lesions"] | None = None,
    status_ok: Bool[ArrayLike, "patients"] | None = None,
    *,
    temperature: float = 0.05,
    assessment_interval_days: float = 56.0,
    assessment_days: Float[ArrayLike, "assessments"] | None = None,
    death_rate_per_day: float = 0.0,
    detection_limit_mm: float = DETECTION_LIMIT_MM,
) -> Float[Array, "patients e"]:
    """Smooth P(progression-free at each of ``eval_days``) per patient.

    Progression is seen only at assessments, so the probability at t is Π over assessments on or
    before t of (1 - soft PD), times exp(-rate · t) for the competing death hazard (its expected
    value, no sampling). The cohort curve is :func:`soft_cohort_mean` of this; without deaths it
    converges to the Kaplan–Meier PFS curve of the hard version while t ≤ the last assessment.
    """
    c = _soft_course(times_days, diameters_mm, target_mask, status_ok, temperature,
                     assessment_interval_days, assessment_days, detection_limit_mm, 0.0)
    e = np.asarray(eval_days, dtype=float)
    no_pd = jnp.concatenate([jnp.ones_like(c.ever_complete)[:, None], c.no_progression_through], axis=1)
    n_seen = np.searchsorted(c.days, e * (1 + _TIE_RTOL) + 1e-12, side="right")  # assessments on or before t
    return no_pd[:, n_seen] * jnp.exp(-death_rate_per_day * e)[None, :]


def soft_cohort_mean(
    per_patient: Float[Array, "patients ..."], status_ok: Bool[ArrayLike, "patients"] | None = None
) -> Float[Array, "..."]:
    """Mean over valid patients (axis 0); failed patients' values are ignored, NaN or not."""
    if status_ok is None:
        return jnp.mean(per_patient, axis=0)
    ok = jnp.asarray(status_ok, bool).reshape((-1,) + (1,) * (per_patient.ndim - 1))
    return jnp.sum(jnp.where(ok, per_patient, 0.0), axis=0) / jnp.maximum(jnp.sum(ok), 1)
