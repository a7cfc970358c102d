"""Treatment regimens as data: ICI administrations, RT courses, chemotherapy cycles and surgery.

A regimen file is YAML (schema in ``configs/regimens/README.md``). :func:`parse_regimen` validates a
mapping and returns a :class:`Regimen`; :func:`compile_schedule` turns a regimen into fixed-shape
event arrays on a timeline, outside ``jit``, so that every regimen of the same shape reuses one
compiled simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import yaml
from jaxtyping import Array, Float

from qspjax.errors import QSPValidationError
from qspjax.model.pk import KNOWN_DRUGS

DOSE_UNITS = ("mg", "mg/kg")
LESIONS = ("irradiated", "non_irradiated")
TECHNIQUES = ("sbrt", "conventional")
SBRT_MIN_DOSE_PER_FRACTION_GY = 5.0  # technique default when not given: >= 5 Gy per fraction is SBRT
# Caps that catch a course without a real end (a typo'd end_day of 1e9, cycles: 100000) before the
# schedule is expanded day by day; decades of q1w dosing and any real fractionation fit well inside.
MAX_CYCLES = 2000
MAX_FRACTIONS = 200


@dataclass(frozen=True)
class _Repeated:
    """A course given every ``interval_days`` from ``start_day``, ``cycles`` times."""

    interval_days: float
    start_day: float
    cycles: int

    def days(self) -> list[float]:
        return [self.start_day + i * self.interval_days for i in range(self.cycles)]


@dataclass(frozen=True)
class IciCourse(_Repeated):
    drug: str = ""
    dose: float = 0.0
    unit: str = "mg"


@dataclass(frozen=True)
class RtCourse:
    dose_per_fraction_gy: float
    days: tuple[float, ...]
    lesion: str
    technique: str

    @property
    def fractions(self) -> int:
        return len(self.days)


@dataclass(frozen=True)
class ChemoCourse(_Repeated):
    name: str = ""
    kill_fraction: float = 0.0


@dataclass(frozen=True)
class Surgery:
    """Resection of ``lesion`` on ``day``. ``pathology``: whether the resected specimen is read for
    pathological response (pCR/MPR); a lesion removed without being read (in an early-stage
    patient, the model's second lesion stands for disease the operation clears but the trial's
    pathology does not describe) still leaves the patient."""

    day: float
    lesion: str
    pathology: bool = True


@dataclass(frozen=True)
class Regimen:
    name: str
    ici: tuple[IciCourse, ...] = ()
    rt: tuple[RtCourse, ...] = ()
    chemo: tuple[ChemoCourse, ...] = ()
    surgery: tuple[Surgery, ...] = ()
    description: str = ""
    source: str = ""

    @property
    def drugs(self) -> tuple[str, ...]:
        """Drugs in order of first appearance."""
        return tuple(dict.fromkeys(c.drug for c in self.ici))

    def pathology_lesions(self, n_lesions: int = 2) -> np.ndarray:
        """(n_lesions,) bool: lesions whose resection is read for pathological response."""
        read = np.zeros(n_lesions, bool)
        for s in self.surgery:
            if s.pathology and LESIONS.index(s.lesion) < n_lesions:
                read[LESIONS.index(s.lesion)] = True
        return read

    def read_specimens(self, viable_fraction) -> np.ndarray:
        """``viable_fraction`` at surgery (..., L; NaN where not resected) with NaN also where the
        regimen does not read the lesion's specimen (:attr:`Surgery.pathology`): what pathology sees."""
        v = np.asarray(viable_fraction, float)
        return np.where(self.pathology_lesions(v.shape[-1]), v, np.nan)

    def last_event_day(self) -> float:
        days = [d for c in self.ici for d in c.days()] + [d for c in self.rt for d in c.days]
        days += [d for c in self.chemo for d in c.days()] + [s.day for s in self.surgery]
        return max(days, default=0.0)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, value: Any, allowed: str):
        raise QSPValidationError(self.source, where, value, allowed)

    def mapping(self, where: str, value: Any, allowed_keys: Sequence[str], required: Sequence[str]) -> Mapping:
        if not isinstance(value, Mapping):
            self.fail(where or "(top level)", value,
                      "a mapping is required" + (" (the file is empty)" if value is None and not where else ""))
        for k in value:
            if k not in allowed_keys:
                self.fail(f"{where}.{k}" if where else str(k), value[k],
                          f"unknown key (misspelt?); allowed keys are {list(allowed_keys)}")
        for k in required:
            if k not in value:
                self.fail(f"{where}.{k}" if where else str(k), None, "required field is missing")
        return value

    def number(self, where: str, value: Any, *, min_value: float | None = None, positive: bool = False,
               integer: bool = False, max_value: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, value, "a number is required" if not integer else "an integer is required")
        if not math.isfinite(value):
            self.fail(where, value, "a finite number is required")
        if integer and float(value) != int(value):
            self.fail(where, value, "an integer is required")
        if positive and value <= 0:
            self.fail(where, value, "must be > 0")
        if min_value is not None and value < min_value:
            self.fail(where, value, f"must be >= {min_value}")
        if max_value is not None and value > max_value:
            self.fail(where, value, f"must be <= {max_value}")
        return float(value)

    def choice(self, where: str, value: Any, allowed: Sequence[str]) -> str:
        if value not in allowed:
            self.fail(where, value, f"allowed values are {list(allowed)}")
        return value

    def string(self, where: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(where, value, "a non-empty string is required")
        return value

    def schedule(self, where: str, entry: Mapping) -> tuple[float, float, int]:
        start = self.number(f"{where}.start_day", entry.get("start_day", 0.0), min_value=0.0)
        interval = self.number(f"{where}.interval_days", entry["interval_days"], positive=True)
        has_cycles, has_end = "cycles" in entry, "end_day" in entry
        if has_cycles == has_end:
            self.fail(f"{where}.cycles", entry.get("cycles"), "give exactly one of 'cycles' or 'end_day'")
        if has_cycles:
            cycles = int(self.number(f"{where}.cycles", entry["cycles"], integer=True, min_value=1,
                                     max_value=MAX_CYCLES))
        else:
            end = self.number(f"{where}.end_day", entry["end_day"], min_value=start)
            cycles = int(math.floor((end - start) / interval + 1e-9)) + 1
            if cycles > MAX_CYCLES:
                self.fail(f"{where}.end_day", entry["end_day"],
                          f"gives {cycles} cycles of {interval:g} days; at most {MAX_CYCLES} are allowed")
        return start, interval, cycles


_ICI_KEYS = ("drug", "dose", "unit", "interval_days", "cycles", "end_day", "start_day")
_RT_KEYS = ("dose_per_fraction_gy", "fractions", "days", "start_day", "days_per_week", "lesion", "technique")
_CHEMO_KEYS = ("name", "kill_fraction", "interval_days", "cycles", "end_day", "start_day")
_TOP_KEYS = ("name", "description", "source", "ici", "rt", "chemo", "surgery")


def parse_regimen(doc: Any, source: str = "<regimen>") -> Regimen:
    """Validate a regimen mapping; raise :class:`QSPValidationError` naming the field on any problem."""
    ck = _Checker(source)
    ck.mapping("", doc, _TOP_KEYS, ("name",))
    name = ck.string("name", doc["name"])
    for key in ("description", "source"):
        if key in doc and not isinstance(doc[key], str):
            ck.fail(key, doc[key], "a string is required")
    for key in ("ici", "rt", "chemo", "surgery"):
        if doc.get(key) is not None and not isinstance(doc[key], list):
            ck.fail(key, doc[key], "a list is required")
    ici = []
    for i, e in enumerate(doc.get("ici") or []):
        w = f"ici[{i}]"
        ck.mapping(w, e, _ICI_KEYS, ("drug", "dose", "unit", "interval_days"))
        drug = ck.choice(f"{w}.drug", e["drug"], KNOWN_DRUGS)
        dose = ck.number(f"{w}.dose", e["dose"], positive=True)
        unit = ck.choice(f"{w}.unit", e["unit"], DOSE_UNITS)
        start, interval, cycles = ck.schedule(w, e)
        ici.append(IciCourse(interval, start, cycles, drug=drug, dose=dose, unit=unit))
    rt = []
    for i, e in enumerate(doc.get("rt") or []):
        w = f"rt[{i}]"
        ck.mapping(w, e, _RT_KEYS, ("dose_per_fraction_gy", "fractions"))
        d = ck.number(f"{w}.dose_per_fraction_gy", e["dose_per_fraction_gy"], positive=True, max_value=40.0)
        n = int(ck.number(f"{w}.fractions", e["fractions"], integer=True, min_value=1, max_value=MAX_FRACTIONS))
        if "days" in e:
            if "start_day" in e or "days_per_week" in e:
                ck.fail(f"{w}.days", e["days"], "give either 'days' or 'start_day'/'days_per_week', not both")
            if not isinstance(e["days"], list) or len(e["days"]) != n:
                ck.fail(f"{w}.days", e["days"], f"a list of {n} day numbers (one per fraction) is required")
            days = [ck.number(f"{w}.days[{j}]", x, min_value=0.0) for j, x in enumerate(e["days"])]
            if any(b <= a for a, b in zip(days, days[1:])):
                ck.fail(f"{w}.days", e["days"], "fraction days must be strictly increasing (no overlapping fractions)")
        else:
            start = ck.number(f"{w}.start_day", e.get("start_day", 0.0), min_value=0.0)
            per_week = int(ck.number(f"{w}.days_per_week", e.get("days_per_week", 5), integer=True,
                                     min_value=1, max_value=7))
            days, day = [], start
            while len(days) < n:  # per_week consecutive treatment days, then a break to the next week
                if (day - start) % 7 < per_week:
                    days.append(day)
                day += 1.0
        lesion = ck.choice(f"{w}.lesion", e.get("lesion", "irradiated"), LESIONS)
        default_tech = "sbrt" if d >= SBRT_MIN_DOSE_PER_FRACTION_GY else "conventional"
        tech = ck.choice(f"{w}.technique", e.get("technique", default_tech), TECHNIQUES)
        rt.append(RtCourse(d, tuple(days), lesion, tech))
    chemo = []
    for i, e in enumerate(doc.get("chemo") or []):
        w = f"chemo[{i}]"
        ck.mapping(w, e, _CHEMO_KEYS, ("name", "kill_fraction", "interval_days"))
        nm = ck.string(f"{w}.name", e["name"])
        kf = ck.number(f"{w}.kill_fraction", e["kill_fraction"], min_value=0.0, max_value=1.0)
        start, interval, cycles = ck.schedule(w, e)
        chemo.append(ChemoCourse(interval, start, cycles, name=nm, kill_fraction=kf))
    surgery = []
    for i, e in enumerate(doc.get("surgery") or []):
        w = f"surgery[{i}]"
        ck.mapping(w, e, ("day", "lesion", "pathology"), ("day",))
        read = e.get("pathology", True)
        if not isinstance(read, bool):
            ck.fail(f"{w}.pathology", read, "true or false")
        surgery.append(Surgery(ck.number(f"{w}.day", e["day"], min_value=0.0),
                               ck.choice(f"{w}.lesion", e.get("lesion", "irradiated"), LESIONS), read))
    resected = [(s.day, s.lesion) for s in surgery]
    for i, key in enumerate(resected):
        if key in resected[:i]:
            ck.fail(f"surgery[{i}]", {"day": key[0], "lesion": key[1]}, "the same lesion is resected twice on one day")
    # Two RT fractions on one lesion at the same time are an overlap.
    seen: dict[tuple[str, float], int] = {}
    for i, c in enumerate(rt):
        for day in c.days:
            if (c.lesion, day) in seen:
                ck.fail(f"rt[{i}].days", list(c.days),
                        f"fraction on day {day:g} overlaps one of rt[{seen[(c.lesion, day)]}] on the same lesion")
            seen[(c.lesion, day)] = i
    return Regimen(name, tuple(ici), tuple(rt), tuple(chemo), tuple(surgery),
                   str(doc.get("description", "")), str(doc.get("source", "")))


def load_regimen(path: str | Path) -> Regimen:
    """Read and validate a regimen YAML file."""
    path = Path(path)
    return parse_regimen(_read_yaml(path), source=str(path))


def _read_yaml(path: Path) -> Any:
    """The YAML document of ``path``; an unreadable, non-text or malformed file is a :class:`QSPValidationError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QSPValidationError(path, "(file)", str(path), f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise QSPValidationError(path, "(file)", str(path),
                                 f"is not a UTF-8 text file (byte {exc.start}: {exc.reason}); a YAML file is required") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())  # one line: the CLI prints a single-line message
        raise QSPValidationError(path, "(file)", str(path), f"is not valid YAML (truncated?): {detail}") from None


# ---------------------------------------------------------------------------------------------
# Compilation to fixed-shape event arrays
# ---------------------------------------------------------------------------------------------
class Schedule(eqx.Module):
    """A regimen on an event timeline plus the grid of days the trajectory is reported on.

    The jumps of row k are applied at ``times[k]``, then the ODE runs to ``times[k+1]``. Shapes:
    K timeline points (event days and the first and last output day, padded by repeating the
    last day), D drugs of the model, L lesions, G output days. Regimens with the same K, D, L and
    G share one compiled simulator.
    """

    times: Float[Array, " K"]
    dose_mg: Float[Array, "K D"]
    dose_mg_per_kg: Float[Array, "K D"]
    rt_dose_gy: Float[Array, "K L"]
    rt_sbrt: Float[Array, " K"]
    chemo_kill: Float[Array, " K"]
    surgery: Float[Array, "K L"]
    output_days: Float[Array, " G"]

    @property
    def events(self) -> tuple:
        """The jump-map rows in the order :func:`qspjax.solver.simulate.apply_events` takes them:
        (dose_mg, dose_mg_per_kg, rt_dose_gy, rt_sbrt, chemo_kill, surgery), each with the
        timeline axis first."""
        return (self.dose_mg, self.dose_mg_per_kg, self.rt_dose_gy, self.rt_sbrt, self.chemo_kill, self.surgery)


def timeline_points(regimen: Regimen, output_days) -> int:
    """Number of timeline points ``compile_schedule`` needs for ``regimen`` on ``output_days``."""
    out = np.asarray(output_days, dtype=float)
    lo, hi = float(out.min()), float(out.max())
    days = {d for d in _event_days(regimen) if d <= hi} | {lo, hi}
    return len(days)


def _event_days(regimen: Regimen) -> list[float]:
    days = [d for c in regimen.ici for d in c.days()] + [d for c in regimen.rt for d in c.days]
    days += [d for c in regimen.chemo for d in c.days()] + [s.day for s in regimen.surgery]
    return [float(d) for d in days]


def compile_schedule(
    regimen: Regimen,
    drugs: Sequence[str],
    output_days: Sequence[float] | np.ndarray,
    n_lesions: int = 2,
    n_points: int | None = None,
) -> Schedule:
    """Place every event of ``regimen`` on a timeline and attach the output grid ``output_days``.

    ``drugs`` is the model's drug order; a regimen drug outside it is an error. Events after the
    last output day are dropped. ``n_points`` pads the timeline (repeating its last day:
    zero-length segments) so that regimens with different event counts share one shape and one
    compilation.
    """
    out_days = np.asarray(sorted(set(float(x) for x in output_days)), dtype=float)
    if out_days.size == 0:
        raise QSPValidationError(regimen.name, "output_days", [], "at least one output day is required")
    missing = [d for d in regimen.drugs if d not in drugs]
    if missing:
        raise QSPValidationError(regimen.name, "ici[].drug", missing[0], f"the model has drugs {list(drugs)}")
    lesion_index = {name: i for i, name in enumerate(LESIONS[:n_lesions])}
    for c in regimen.rt:
        if c.lesion not in lesion_index:
            raise QSPValidationError(regimen.name, "rt[].lesion", c.lesion, f"the model has {n_lesions} lesion(s)")
    horizon = out_days[-1]
    if min(_event_days(regimen), default=out_days[0]) < out_days[0]:
        raise QSPValidationError(regimen.name, "(event days)", min(_event_days(regimen)),
                                 f"events must not precede the first output day {out_days[0]:g}")
    event_days = [d for d in _event_days(regimen) if d <= horizon]
    times = np.asarray(sorted(set(event_days) | {out_days[0], horizon}), dtype=float)
    k = len(times)
    if n_points is not None:
        if n_points < k:
            raise ValueError(f"n_points={n_points} < {k} timeline points needed")
        times = np.concatenate([times, np.full(n_points - k, times[-1])])
    index = {t: i for i, t in enumerate(times[:k])}
    n, d = len(times), len(drugs)
    dose_mg, dose_kg = np.zeros((n, d)), np.zeros((n, d))
    rt_dose, rt_sbrt = np.zeros((n, n_lesions)), np.zeros(n)
    chemo, surgery = np.zeros(n), np.zeros((n, n_lesions))
    for c in regimen.ici:
        for day in c.days():
            if day <= horizon:
                target = dose_mg if c.unit == "mg" else dose_kg
                target[index[day], list(drugs).index(c.drug)] += c.dose
    for c in regimen.rt:
        for day in c.days:
            if day <= horizon:
                rt_dose[index[day], lesion_index[c.lesion]] = c.dose_per_fraction_gy
                rt_sbrt[index[day]] = 1.0 if c.technique == "sbrt" else 0.0
    for c in regimen.chemo:
        for day in c.days():
            if day <= horizon:
                i = index[day]
                chemo[i] = 1.0 - (1.0 - chemo[i]) * (1.0 - c.kill_fraction)
    for s in regimen.surgery:
        if s.day <= horizon and s.lesion in lesion_index:
            surgery[index[s.day], lesion_index[s.lesion]] = 1.0
    f = lambda a: jnp.asarray(a, dtype=float)
    return Schedule(f(times), f(dose_mg), f(dose_kg), f(rt_dose), f(rt_sbrt), f(chemo), f(surgery), f(out_days))
