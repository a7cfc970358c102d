"""Arms of the reviewed RT+ICI trials as validated data: schema, loader and tidy tables.

One YAML file per trial in ``configs/trials/`` (schema and conventions in that folder's README).
:func:`load_trials` reads and validates every file and returns a :class:`TrialSet`; every problem
raises :class:`~qspjax.errors.QSPValidationError` naming the file, the field path
(``arms[2].orr_pct``), the value and what is allowed. Code downstream trusts the result.

Units: percentages are 0–100 (never fractions), times are months unless the name says days,
``n`` is a head count. "Not reached" is the string ``"NR"`` in median and interval fields;
a value the source does not give is absent (``None``), never zero.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import yaml

from qspjax.errors import QSPValidationError

NCT_ID_PATTERN = re.compile(r"^NCT\d{8}$")
ARM_ID_PATTERN = re.compile(r"^(NCT\d{8}):[a-z0-9][a-z0-9_]*$")
NOT_REACHED = "NR"

SETTINGS = ("resectable", "early_stage", "locally_advanced", "advanced")
# The review describes each setting in one table and gives its arms' outcomes in the next.
SETTING_TABLES = {"resectable": (1, 2), "early_stage": (3, 4), "locally_advanced": (5, 6), "advanced": (7, 8)}
PHASES = ("1", "1b", "1/2", "2", "3")
SEQUENCE_KINDS = ("neoadjuvant", "adjuvant", "induction", "concurrent", "sequential", "consolidation", "maintenance")
ROLES = ("control", "experimental")
LANDMARK_ENDPOINTS = ("os", "pfs", "efs", "dfs", "lc")
CONSISTENCY_CHECKS = ("orr_sum", "dcr_sum", "category_sum")

# CR, PR and ORR are each rounded on their own (to 0.1 or 1 point) before printing, so their sums
# can disagree by about a point; 1.5 points allows for that and still catches a misread cell
# (the smallest single response in the largest arm here, 1/476, is 0.2 points, but a wrong cell
# is typically off by several points).
SUM_TOLERANCE_PCT_POINTS = 1.5
DAYS_PER_MONTH = 30.4375

RESPONSE_CATEGORIES = ("cr", "pr", "sd", "pd", "nd", "pseudo_pd")
# derived count name -> the percentage it is computed from
DERIVED_COUNTS = {
    "responders": "orr_pct",
    "disease_control_n": "dcr_pct",
    "cr_n": "cr_pct",
    "pr_n": "pr_pct",
    "sd_n": "sd_pct",
    "pd_n": "pd_pct",
    "nd_n": "nd_pct",
}

Bound = float | str | None  # a number, "NR" (not reached) or None (not given)
Interval = tuple[Bound, Bound]
Median = float | str | None  # months, "NR" or None


def default_trials_directory() -> Path:
    """``configs/trials`` of this checkout (the package sits at ``<repo>/qspjax/data``)."""
    return Path(__file__).resolve().parents[2] / "configs" / "trials"


def count_from_pct(pct: float, n: int) -> int:
    """Patients behind a printed percentage of ``n``, rounded half up (``round`` rounds half to even)."""
    return int(math.floor(pct / 100.0 * n + 0.5 + 1e-9))


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where a record sits in the seed: table number and the row's identifying cells."""

    table: int
    row: str


@dataclass(frozen=True)
class Reference:
    citation: str  # the review's reference numbers, as printed, e.g. "(45, 46)"
    first_author: str | None = None
    year: int | None = None


@dataclass(frozen=True)
class TreatmentSequence:
    kinds: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class Landmark:
    """A survival-type rate at a fixed time: ``pct`` % of patients event-free at ``months``."""

    endpoint: str
    months: float
    pct: float
    ci: Interval | None = None


@dataclass(frozen=True)
class Exemption:
    check: str
    reason: str


@dataclass(frozen=True)
class Arm:
    """One arm (or cohort) of a trial with its baseline, outcomes and a runnable regimen."""

    arm_id: str
    nct_id: str
    label: str
    role: str
    treatment_text: str
    n: int
    source: Source
    regimen: dict  # validated by qspjax.regimen.parse_regimen (an upper layer); treat as read-only
    regimen_assumptions: tuple[str, ...]
    follow_up_days: int  # simulation horizon counted from day 0 of the regimen
    outcome_origin_day: int = 0  # day of the regimen from which the trial timed PFS/OS
    setting: str | None = None  # the trial's setting (SETTINGS), copied onto each arm
    # baseline
    stage_text: str | None = None
    stage_mix: Mapping[str, float] | None = None  # stage -> % of patients
    median_age_years: float | None = None
    mean_age_years: float | None = None
    male_pct: float | None = None
    smokers_pct: float | None = None
    squamous_pct: float | None = None
    pdl1_lt1_pct: float | None = None
    pdl1_ge50_pct: float | None = None
    ecog_text: str | None = None
    ecog1_pct: float | None = None
    ecog2_pct: float | None = None
    tumor_size_text: str | None = None
    median_follow_up_months: float | None = None
    follow_up_text: str | None = None
    # outcomes
    ci_level_pct: float = 95.0
    response_assessment_text: str | None = None
    # months after the outcome origin at which the paper read the response rates ("response at
    # 2.9 months"); None: best overall response over the follow-up
    orr_assessment_months: float | None = None
    orr_pct: float | None = None
    orr_ci: Interval | None = None
    dcr_pct: float | None = None
    dcr_ci: Interval | None = None
    cr_pct: float | None = None
    pr_pct: float | None = None
    sd_pct: float | None = None
    pd_pct: float | None = None
    nd_pct: float | None = None
    pseudo_pd_pct: float | None = None
    median_pfs_months: Median = None
    median_pfs_ci: Interval | None = None
    median_os_months: Median = None
    median_os_ci: Interval | None = None
    median_dor_months: Median = None
    median_dor_ci: Interval | None = None
    landmarks: tuple[Landmark, ...] = ()
    mpr_pct: float | None = None
    mpr_ci: Interval | None = None
    pcr_pct: float | None = None
    pcr_ci: Interval | None = None
    downstage_pct: float | None = None
    downstage_ci: Interval | None = None
    local_control_text: str | None = None
    grade3plus_ae_pct: float | None = None
    sae_pct: float | None = None
    adverse_events_text: str | None = None
    # derived counts (round half up of pct/100 * n), checked against the percentages on load
    responders: int | None = None
    disease_control_n: int | None = None
    cr_n: int | None = None
    pr_n: int | None = None
    sd_n: int | None = None
    pd_n: int | None = None
    nd_n: int | None = None
    consistency_exemptions: tuple[Exemption, ...] = ()
    notes: tuple[str, ...] = ()
    printed: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Trial:
    nct_id: str
    reference: Reference
    phase: str
    randomised: bool
    setting: str
    n_patients: int  # as printed in the description table (enrolled or planned; may differ from the arms' sum)
    design_text: str
    sequence: TreatmentSequence
    ici_dosing_text: str
    rt_dosing_text: str
    source: Source
    arms: tuple[Arm, ...]
    path: Path
    name: str | None = None
    nct_id_printed: str | None = None  # the id as misprinted in the seed, when it differs
    stage_text: str | None = None
    ecog_eligibility_text: str | None = None
    chemotherapy_text: str | None = None
    start_date_text: str | None = None
    status_text: str | None = None
    notes: tuple[str, ...] = ()
    printed: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Validation: a reader over one mapping that remembers which keys it used
# ---------------------------------------------------------------------------------------------
class _Record:
    def __init__(self, source: Path, path: str, value: Any):
        self.source, self.path = source, path
        if not isinstance(value, Mapping):
            self.fail("", value, "a mapping is required")
        self.data: Mapping = value
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else (self.path or key)

    def fail(self, key: str, value: Any, allowed: str):
        raise QSPValidationError(self.source, self.where(key) or "(file)", value, allowed)

    def get(self, key: str, required: bool) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None and required:
            self.fail(key, None, "required field is missing")
        return value

    def finish(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key not in self.used:
                self.fail(str(key), self.data[key], f"unknown key (misspelt?); allowed keys are {sorted(allowed)}")

    # typed getters -------------------------------------------------------------------------
    def text(self, key: str, required: bool = False) -> str | None:
        value = self.get(key, required)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            self.fail(key, value, "a non-empty string is required")
        return value

    def boolean(self, key: str, required: bool = False) -> bool | None:
        value = self.get(key, required)
        if value is not None and not isinstance(value, bool):
            self.fail(key, value, "true or false is required")
        return value

    def choice(self, key: str, allowed: Sequence[str], required: bool = False) -> str | None:
        value = self.get(key, required)
        if value is not None and value not in allowed:
            self.fail(key, value, f"allowed values are {list(allowed)}")
        return value

    def number(self, key: str, required: bool = False, lo: float | None = None, hi: float | None = None,
               what: str = "a number") -> float | None:
        value = self.get(key, required)
        if value is None:
            return None
        return self._number(key, value, lo, hi, what)

    def _number(self, key: str, value: Any, lo: float | None, hi: float | None, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, value, f"{what} is required")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(key, value, f"{what} within {lo:g}–{hi:g} is required" if hi is not None
                      else f"{what} >= {lo:g} is required")
        return float(value)

    def pct(self, key: str, required: bool = False) -> float | None:
        return self.number(key, required, 0.0, 100.0, "a percentage")

    def integer(self, key: str, required: bool = False, lo: int = 0) -> int | None:
        value = self.get(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            self.fail(key, value, f"an integer >= {lo} is required")
        return value

    def median(self, key: str) -> Median:
        value = self.get(key, False)
        if value is None or value == NOT_REACHED:
            return value
        return self._number(key, value, 0.0, None, f"a number of months or {NOT_REACHED!r} (not reached)")

    def interval(self, key: str, lo: float = 0.0, hi: float | None = None) -> Interval | None:
        value = self.get(key, False)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != 2:
            self.fail(key, value, "a list [lower, upper] is required")
        bounds = []
        for i, b in enumerate(value):
            if b is None or b == NOT_REACHED:
                bounds.append(b)
            else:
                bounds.append(self._number(f"{key}[{i}]", b, lo, hi,
                                           f"a number, {NOT_REACHED!r} or null"))
        if all(isinstance(b, float) for b in bounds) and bounds[0] > bounds[1]:
            self.fail(key, value, "lower bound must not exceed upper bound")
        if bounds[0] == NOT_REACHED:
            self.fail(key, value, f"only the upper bound may be {NOT_REACHED!r}")
        return tuple(bounds)

    def texts(self, key: str, required: bool = False) -> tuple[str, ...]:
        value = self.get(key, required)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
            self.fail(key, value, "a list of non-empty strings is required")
        if required and not value:
            self.fail(key, value, "at least one entry is required")
        return tuple(value)

    def records(self, key: str, required: bool = False) -> list["_Record"]:
        value = self.get(key, required)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, value, "a list is required")
        return [_Record(self.source, f"{self.where(key)}[{i}]", item) for i, item in enumerate(value)]

    def record(self, key: str, required: bool = False) -> "_Record | None":
        value = self.get(key, required)
        return None if value is None else _Record(self.source, self.where(key), value)

    def string_mapping(self, key: str) -> dict[str, str]:
        value = self.get(key, False)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in value.items()):
            self.fail(key, value, "a mapping of column header to the printed cell text (strings) is required")
        return dict(value)


def _read_source(r: _Record, key: str, tables: Sequence[int]) -> Source:
    s = r.record(key, required=True)
    source = Source(table=s.integer("table", required=True), row=s.text("row", required=True))
    if source.table not in tables:
        s.fail("table", source.table, f"this record's setting is described in table(s) {list(tables)}")
    s.finish(("table", "row"))
    return source


def _read_landmark(r: _Record) -> Landmark:
    lm = Landmark(
        endpoint=r.choice("endpoint", LANDMARK_ENDPOINTS, required=True),
        months=r.number("months", required=True, lo=0.0, what="a time in months"),
        pct=r.pct("pct", required=True),
        ci=r.interval("ci", 0.0, 100.0),
    )
    r.finish(("endpoint", "months", "pct", "ci"))
    if lm.months <= 0:
        r.fail("months", lm.months, "a time in months > 0 is required")
    return lm


def _read_stage_mix(r: _Record) -> dict[str, float] | None:
    value = r.get("stage_mix", False)
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        r.fail("stage_mix", value, "a mapping of stage to % of patients is required")
    for stage, pct in value.items():
        r._number(f"stage_mix.{stage}", pct, 0.0, 100.0, "a percentage")
    if sum(value.values()) > 100 + SUM_TOLERANCE_PCT_POINTS:
        r.fail("stage_mix", dict(value), f"stage percentages must sum to at most 100 (± {SUM_TOLERANCE_PCT_POINTS:g})")
    return {str(k): float(v) for k, v in value.items()}


def _read_arm(r: _Record, nct_id: str, table: int, setting: str | None = None) -> Arm:
    arm_id = r.text("arm_id", required=True)
    m = ARM_ID_PATTERN.match(arm_id)
    if not m:
        r.fail("arm_id", arm_id, "'<NCT id>:<lower_snake_name>' is required, e.g. 'NCT02125461:crt_durva'")
    if m.group(1) != nct_id:
        r.fail("arm_id", arm_id, f"must start with this trial's id {nct_id!r}")
    n = r.integer("n", required=True, lo=1)
    origin = r.integer("outcome_origin_day") or 0
    regimen = r.get("regimen", True)
    if not isinstance(regimen, Mapping) or not isinstance(regimen.get("name"), str):
        r.fail("regimen", regimen, "a regimen mapping with a 'name' is required (schema: qspjax/regimen.py)")
    follow_up = r.integer("follow_up_days", required=True, lo=1)
    if follow_up <= origin:
        r.fail("follow_up_days", follow_up, f"must be later than outcome_origin_day ({origin})")
    derived = r.record("derived")
    exemptions = []
    for e in r.records("consistency_exemptions"):
        exemptions.append(Exemption(e.choice("check", CONSISTENCY_CHECKS, required=True),
                                    e.text("reason", required=True)))
        e.finish(("check", "reason"))
    fields: dict[str, Any] = dict(
        arm_id=arm_id, nct_id=nct_id,
        label=r.text("label", required=True),
        role=r.choice("role", ROLES, required=True),
        treatment_text=r.text("treatment_text", required=True),
        n=n,
        source=_read_source(r, "source", (table + 1,)),
        regimen=copy.deepcopy(dict(regimen)),
        regimen_assumptions=r.texts("regimen_assumptions", required=True),
        follow_up_days=follow_up,
        outcome_origin_day=origin,
        setting=setting,
        stage_text=r.text("stage_text"),
        stage_mix=_read_stage_mix(r),
        median_age_years=r.number("median_age_years", lo=0, hi=120, what="an age in years"),
        mean_age_years=r.number("mean_age_years", lo=0, hi=120, what="an age in years"),
        ecog_text=r.text("ecog_text"),
        tumor_size_text=r.text("tumor_size_text"),
        median_follow_up_months=r.number("median_follow_up_months", lo=0, what="a time in months"),
        follow_up_text=r.text("follow_up_text"),
        ci_level_pct=r.number("ci_level_pct", lo=50, hi=99.9, what="a confidence level in %") or 95.0,
        response_assessment_text=r.text("response_assessment_text"),
        orr_assessment_months=_read_orr_assessment(r, origin, follow_up),
        median_pfs_months=r.median("median_pfs_months"),
        median_pfs_ci=r.interval("median_pfs_ci"),
        median_os_months=r.median("median_os_months"),
        median_os_ci=r.interval("median_os_ci"),
        median_dor_months=r.median("median_dor_months"),
        median_dor_ci=r.interval("median_dor_ci"),
        landmarks=tuple(_read_landmark(x) for x in r.records("landmarks")),
        local_control_text=r.text("local_control_text"),
        adverse_events_text=r.text("adverse_events_text"),
        consistency_exemptions=tuple(exemptions),
        notes=r.texts("notes"),
        printed=r.string_mapping("printed"),
    )
    for key in ("male_pct", "smokers_pct", "squamous_pct", "pdl1_lt1_pct", "pdl1_ge50_pct", "ecog1_pct",
                "ecog2_pct", "orr_pct", "dcr_pct", *(f"{c}_pct" for c in RESPONSE_CATEGORIES),
                "mpr_pct", "pcr_pct", "downstage_pct", "grade3plus_ae_pct", "sae_pct"):
        fields[key] = r.pct(key)
    for key in ("orr_ci", "dcr_ci", "mpr_ci", "pcr_ci", "downstage_ci"):
        fields[key] = r.interval(key, 0.0, 100.0)
    r.finish(tuple(r.used))
    _check_consistency(r, fields)
    _check_derived(r, derived, fields)
    return Arm(**fields)


def _read_orr_assessment(r: _Record, origin: int, follow_up: int) -> float | None:
    """``orr_assessment_months``: positive, and its day (origin + months) within the follow-up."""
    months = r.number("orr_assessment_months", lo=0.0, what="a time in months after the outcome origin")
    if months is None:
        return None
    if months <= 0.0:
        r.fail("orr_assessment_months", months, "a time in months > 0 after the outcome origin is required")
    if origin + months * DAYS_PER_MONTH > follow_up:
        r.fail("orr_assessment_months", months,
               f"must fall within follow_up_days ({follow_up}) counted from outcome_origin_day ({origin})")
    return months


def _check_derived(r: _Record, derived: _Record | None, fields: dict[str, Any]) -> None:
    """Every count must be present exactly when its percentage is, and equal its recomputation."""
    n = fields["n"]
    for name, pct_key in DERIVED_COUNTS.items():
        pct = fields[pct_key]
        got = derived.get(name, False) if derived is not None else None
        where = f"derived.{name}"
        if pct is None:
            if got is not None:
                r.fail(where, got, f"must be absent because {pct_key} is not given")
            continue
        want = count_from_pct(pct, n)
        if got != want or isinstance(got, bool):
            r.fail(where, got, f"must equal round_half_up({pct_key} {pct:g} / 100 * n {n}) = {want}")
        fields[name] = want
    if derived is not None:
        derived.finish(tuple(DERIVED_COUNTS))


def _check_consistency(r: _Record, f: dict[str, Any]) -> None:
    exempt = {e.check for e in f["consistency_exemptions"]}
    tol = SUM_TOLERANCE_PCT_POINTS
    cr, pr, sd = f["cr_pct"], f["pr_pct"], f["sd_pct"]
    if "orr_sum" not in exempt and None not in (f["orr_pct"], cr, pr) and abs(cr + pr - f["orr_pct"]) > tol:
        r.fail("orr_pct", f["orr_pct"], f"must equal CR + PR = {cr + pr:g} within ±{tol:g} percentage points")
    if "dcr_sum" not in exempt and None not in (f["dcr_pct"], cr, pr, sd) and abs(cr + pr + sd - f["dcr_pct"]) > tol:
        r.fail("dcr_pct", f["dcr_pct"], f"must equal CR + PR + SD = {cr + pr + sd:g} within ±{tol:g} percentage "
               "points (or list 'dcr_sum' in consistency_exemptions with the reason)")
    if f["orr_pct"] is not None and f["dcr_pct"] is not None and f["orr_pct"] > f["dcr_pct"] + tol:
        r.fail("orr_pct", f["orr_pct"], f"must not exceed dcr_pct ({f['dcr_pct']:g})")
    parts = [f[f"{c}_pct"] for c in RESPONSE_CATEGORIES if f[f"{c}_pct"] is not None]
    if "category_sum" not in exempt and sum(parts) > 100 + tol:
        r.fail("cr_pct", parts, f"response categories sum to {sum(parts):g} > 100 (± {tol:g}) percent")
    for key, ci_key in (("orr_pct", "orr_ci"), ("dcr_pct", "dcr_ci"), ("mpr_pct", "mpr_ci"), ("pcr_pct", "pcr_ci"),
                        ("downstage_pct", "downstage_ci"), ("median_pfs_months", "median_pfs_ci"),
                        ("median_os_months", "median_os_ci"), ("median_dor_months", "median_dor_ci")):
        value, ci = f[key], f[ci_key]
        if ci is not None and value is None:
            r.fail(ci_key, list(ci), f"an interval needs its value {key}")
        if ci is not None and not _within(value, ci):
            r.fail(ci_key, list(ci), f"must contain {key} = {value!r}")
    for i, lm in enumerate(f["landmarks"]):
        if lm.ci is not None and not _within(lm.pct, lm.ci):
            r.fail(f"landmarks[{i}].ci", list(lm.ci), f"must contain pct = {lm.pct:g}")
    seen = set()
    for i, lm in enumerate(f["landmarks"]):
        if (lm.endpoint, lm.months) in seen:
            r.fail(f"landmarks[{i}]", (lm.endpoint, lm.months), "each endpoint and time may appear once")
        seen.add((lm.endpoint, lm.months))


def _within(value: Median, ci: Interval) -> bool:
    lo, hi = ci
    if value == NOT_REACHED:
        return hi in (NOT_REACHED, None)
    return (not isinstance(lo, float) or lo <= value) and (not isinstance(hi, float) or value <= hi)


def _read_trial(doc: Any, path: Path) -> Trial:
    r = _Record(path, "", doc)
    nct_id = r.text("nct_id", required=True)
    if not NCT_ID_PATTERN.match(nct_id):
        r.fail("nct_id", nct_id, "'NCT' followed by 8 digits is required")
    if path.stem != nct_id:
        r.fail("nct_id", nct_id, f"must match the file name {path.name!r}")
    setting = r.choice("setting", SETTINGS, required=True)
    description_table, outcome_table = SETTING_TABLES[setting]
    ref = r.record("reference", required=True)
    reference = Reference(ref.text("citation", required=True), ref.text("first_author"),
                          ref.integer("year", lo=1900))
    ref.finish(("citation", "first_author", "year"))
    seq = r.record("sequence", required=True)
    kinds = seq.get("kinds", True)
    if not isinstance(kinds, list) or not kinds or any(k not in SEQUENCE_KINDS for k in kinds):
        seq.fail("kinds", kinds, f"a non-empty list of {list(SEQUENCE_KINDS)} is required")
    sequence = TreatmentSequence(tuple(kinds), seq.text("text", required=True))
    seq.finish(("kinds", "text"))
    phase = r.get("phase", True)
    if phase not in PHASES:
        r.fail("phase", phase, f"allowed values are {list(PHASES)} (quoted strings)")
    nct_printed = r.text("nct_id_printed")
    arms = []
    for a in r.records("arms", required=True):
        arms.append(_read_arm(a, nct_id, description_table, setting))
    if not arms:
        r.fail("arms", [], "at least one arm is required")
    trial = Trial(
        nct_id=nct_id, reference=reference, phase=phase,
        randomised=r.boolean("randomised", required=True), setting=setting,
        n_patients=r.integer("n_patients", required=True, lo=1),
        design_text=r.text("design_text", required=True), sequence=sequence,
        ici_dosing_text=r.text("ici_dosing_text", required=True),
        rt_dosing_text=r.text("rt_dosing_text", required=True),
        source=_read_source(r, "source", (description_table,)),
        arms=tuple(arms), path=path, name=r.text("name"), nct_id_printed=nct_printed,
        stage_text=r.text("stage_text"), ecog_eligibility_text=r.text("ecog_eligibility_text"),
        chemotherapy_text=r.text("chemotherapy_text"), start_date_text=r.text("start_date_text"),
        status_text=r.text("status_text"), notes=r.texts("notes"), printed=r.string_mapping("printed"),
    )
    r.finish(tuple(r.used))
    if trial.randomised and len(arms) < 2:
        r.fail("randomised", True, "a randomised trial needs at least two arms")
    seen: dict[str, int] = {}
    for i, a in enumerate(arms):
        if a.arm_id in seen:
            r.fail(f"arms[{i}].arm_id", a.arm_id, f"duplicate of arms[{seen[a.arm_id]}].arm_id")
        seen[a.arm_id] = i
    return trial


# ---------------------------------------------------------------------------------------------
# The loaded set and its tidy views
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialSet:
    """Every trial of a directory, validated. ``trials`` are sorted by NCT id."""

    trials: tuple[Trial, ...]
    directory: Path

    @property
    def arms(self) -> tuple[Arm, ...]:
        return tuple(a for t in self.trials for a in t.arms)

    def get_trial(self, nct_id: str) -> Trial:
        for t in self.trials:
            if t.nct_id == nct_id:
                return t
        raise QSPValidationError(self.directory, "nct_id", nct_id,
                                 f"unknown trial; known ids are {[t.nct_id for t in self.trials]}")

    def get_arm(self, arm_id: str) -> Arm:
        for a in self.arms:
            if a.arm_id == arm_id:
                return a
        raise QSPValidationError(self.directory, "arm_id", arm_id,
                                 f"unknown arm; known ids are {[a.arm_id for a in self.arms]}")

    def arms_table(self) -> pd.DataFrame:
        """One row per arm: design, baseline, response rates, medians (NaN when not reached or not given,
        with ``*_nr`` flags) and derived counts."""
        rows = []
        for t in self.trials:
            for a in t.arms:
                row = dict(nct_id=t.nct_id, trial_name=t.name, arm_id=a.arm_id, label=a.label, role=a.role,
                           setting=t.setting, phase=t.phase, randomised=t.randomised, n=a.n,
                           source_table=a.source.table)
                for key in ("median_age_years", "mean_age_years", "male_pct", "smokers_pct", "squamous_pct",
                            "pdl1_lt1_pct", "pdl1_ge50_pct", "ecog1_pct", "ecog2_pct", "median_follow_up_months",
                            "orr_pct", "dcr_pct", *(f"{c}_pct" for c in RESPONSE_CATEGORIES), "mpr_pct",
                            "pcr_pct", "downstage_pct", "grade3plus_ae_pct", "sae_pct"):
                    row[key] = _nan(getattr(a, key))
                for key in ("median_pfs_months", "median_os_months", "median_dor_months"):
                    value = getattr(a, key)
                    row[key] = math.nan if value in (None, NOT_REACHED) else value
                    row[key.replace("_months", "_nr")] = value == NOT_REACHED
                for key in DERIVED_COUNTS:
                    value = getattr(a, key)
                    row[key] = pd.NA if value is None else value
                row.update(outcome_origin_day=a.outcome_origin_day, follow_up_days=a.follow_up_days,
                           regimen_name=a.regimen["name"])
                rows.append(row)
        df = pd.DataFrame(rows)
        for key in DERIVED_COUNTS:
            df[key] = df[key].astype("Int64")
        return df

    def endpoints_table(self) -> pd.DataFrame:
        """PEtab-shaped arm-level measurements: one row per printed endpoint of an arm.

        ``endpoint`` plays PEtab's observableId, ``arm_id`` its simulationConditionId, ``value`` its
        measurement and ``time_months`` its time (NaN for best-response rates and medians).
        ``unit`` is ``%`` or ``months``. A median "not reached" has ``value`` NaN and
        ``value_text`` "NR"; an interval bound "NR" is ``+inf`` (open above), an absent bound NaN.
        """
        rows = []

        def add(t: Trial, a: Arm, endpoint: str, value: Any, unit: str, ci: Interval | None = None,
                time_months: float = math.nan):
            lo, hi = ci if ci is not None else (None, None)
            rows.append(dict(
                nct_id=t.nct_id, arm_id=a.arm_id, endpoint=endpoint,
                value=math.nan if value == NOT_REACHED else float(value),
                value_text=NOT_REACHED if value == NOT_REACHED else None, unit=unit, n=a.n,
                ci_lo=_bound(lo), ci_hi=_bound(hi), ci_level_pct=a.ci_level_pct if ci is not None else math.nan,
                time_months=time_months, source_table=a.source.table,
            ))

        for t in self.trials:
            for a in t.arms:
                for name in ("orr", "dcr", *RESPONSE_CATEGORIES, "mpr", "pcr", "downstage", "grade3plus_ae", "sae"):
                    value = getattr(a, f"{name}_pct")
                    if value is not None:
                        add(t, a, name, value, "%", getattr(a, f"{name}_ci", None))
                for name in ("pfs", "os", "dor"):
                    value = getattr(a, f"median_{name}_months")
                    if value is not None:
                        add(t, a, f"median_{name}", value, "months", getattr(a, f"median_{name}_ci"))
                for lm in a.landmarks:
                    add(t, a, f"{lm.endpoint}_rate", lm.pct, "%", lm.ci, time_months=lm.months)
        columns = ["nct_id", "arm_id", "endpoint", "value", "value_text", "unit", "n", "ci_lo", "ci_hi",
                   "ci_level_pct", "time_months", "source_table"]
        return pd.DataFrame(rows, columns=columns)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _bound(b: Bound) -> float:
    if b is None:
        return math.nan
    return math.inf if b == NOT_REACHED else float(b)


def load_trial_file(path: str | Path) -> Trial:
    """Read and validate one trial file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QSPValidationError(path, "(file)", str(path), f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise QSPValidationError(path, "(file)", str(path),
                                 f"is not a UTF-8 text file (byte {exc.start}: {exc.reason}); a YAML file is required") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())  # one line: the CLI prints a single-line message
        raise QSPValidationError(path, "(file)", str(path), f"is not valid YAML (truncated?): {detail}") from None
    return _read_trial(doc, path)


def load_trials(directory: str | Path | None = None) -> TrialSet:
    """Load and validate every ``*.yaml`` trial file of ``directory`` (default: the repo's configs/trials).

    Arm ids must be unique across all files. Raises :class:`QSPValidationError` on the first problem.
    """
    directory = Path(directory) if directory is not None else default_trials_directory()
    if not directory.is_dir():
        raise QSPValidationError(directory, "(directory)", str(directory),
                                 "a directory of trial YAML files is required")
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise QSPValidationError(directory, "(directory)", str(directory), "contains no *.yaml trial files")
    trials = [load_trial_file(p) for p in paths]
    owner: dict[str, Path] = {}
    for t in trials:
        for i, a in enumerate(t.arms):
            if a.arm_id in owner:
                raise QSPValidationError(t.path, f"arms[{i}].arm_id", a.arm_id,
                                         f"arm ids must be unique across files; already used in {owner[a.arm_id].name}")
            owner[a.arm_id] = t.path
    return TrialSet(tuple(sorted(trials, key=lambda t: t.nct_id)), directory)
