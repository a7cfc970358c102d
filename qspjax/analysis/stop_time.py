"""The earliest safe stop of the antibody: the edge of the basin of elimination along a treated course.

For each virtual patient under a regimen, "stopping after dose k" keeps the first k antibody
administrations (days with any antibody dose, in time order) and drops every later one; RT,
chemotherapy and surgery stay as scheduled. A stop is *safe* when the patient is still in the basin
of tumor control at the horizon (:class:`StopCriterion`): every lesion eliminated (viable cancer
cells cleared by the model's extinction event, an absorbing state), or the sum of lesion diameters
below a burden threshold with viable cells not rising over the last weeks. The earliest safe stop is
found by bisection on k for the whole cohort at once (the dose count that regrows and the one that
controls bracket it), then confirmed on a longer horizon: the stop must still control there and
stopping one dose earlier must not.

Efficiency: a truncated regimen is the full regimen's fixed-shape event arrays with the antibody
rows after dose k masked to zero (``keep = ordinal <= k`` inside the vmapped solve), so every stop
day of every patient runs through one compiled solver (two: the confirmation has a longer grid);
the jobs of a bisection round are packed into fixed-size chunks of (patient, k) pairs.

Bisection assumes that control is monotone in the number of doses (more antibody never hurts); the
confirmation checks the two neighbours of the answer, not every dose count.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from qspjax.errors import QSPValidationError
from qspjax.regimen import Regimen, compile_schedule, timeline_points
from qspjax.solver.simulate import STATUS_OK, SolverConfig, over_devices, per_device, simulate_patient

REASON_NEVER_CONTROLLED = "never controlled under full regimen"
REASON_NEEDS_LATE_DOSES = "needs doses after the last stop day with enough follow-up before the horizon"
REASON_NOT_CONFIRMED = "controlled at the horizon but not on the longer confirmation horizon"
REASON_SOLVER_FAILED = "solver failed under the full regimen"
REASON_BASELINE_FAILED = "baseline (pre-treatment growth) failed"


@dataclass(frozen=True)
class StopCriterion:
    """When a patient counts as controlled at a horizon H (all days from the start of treatment).

    ``eliminated``: no viable cancer cell left in any lesion at H. Otherwise ``controlled`` needs the
    sum of lesion diameters at H at most ``burden_threshold_mm`` *and* viable cancer cells at H no
    more than ``trend_window_days`` earlier (not regrowing). Candidate stops are antibody doses on or
    before H - ``min_follow_up_days``; the answer is re-solved to H + ``confirm_days``.
    """

    burden_threshold_mm: float = 5.0
    trend_window_days: float = 28.0
    min_follow_up_days: float = 84.0
    confirm_days: float = 182.0

    def validate(self, source: str = "stop criterion") -> None:
        for name, low in (("burden_threshold_mm", 0.0), ("trend_window_days", 0.0), ("min_follow_up_days", 0.0),
                          ("confirm_days", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
                raise QSPValidationError(source, name, v, f"a finite number >= {low:g} is required")
        if self.trend_window_days <= 0:
            raise QSPValidationError(source, "trend_window_days", self.trend_window_days, "must be > 0")


# ---------------------------------------------------------------------------------------------
# The regimen's antibody doses on a fixed timeline
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DoseTimeline:
    """A compiled schedule with the ordinal (1..n) of each antibody administration row, 0 elsewhere."""

    schedule: Any
    row_ordinal: np.ndarray  # (K,)
    dose_days: np.ndarray  # (n,) days of the administrations inside the horizon
    grid: np.ndarray  # (G,) output days


def antibody_dose_days(regimen: Regimen) -> np.ndarray:
    """Sorted distinct days with any antibody dose (all courses, all drugs)."""
    return np.asarray(sorted({float(d) for c in regimen.ici for d in c.days()}), dtype=float)


def output_grid(days: float, every: float) -> np.ndarray:
    return np.unique(np.concatenate([np.arange(0.0, days + 1e-9, every), [days]]))


def dose_timeline(regimen: Regimen, drugs: Sequence[str], days: float, output_every: float,
                  n_lesions: int = 2) -> DoseTimeline:
    grid = output_grid(days, output_every)
    schedule = compile_schedule(regimen, drugs, grid, n_lesions=n_lesions,
                                n_points=timeline_points(regimen, grid))
    times = np.asarray(schedule.times)
    dosed = (np.asarray(schedule.dose_mg).sum(1) + np.asarray(schedule.dose_mg_per_kg).sum(1)) > 0
    ordinal = np.where(dosed, np.cumsum(dosed), 0)
    return DoseTimeline(schedule, ordinal.astype(np.int64), times[dosed], grid)


def truncated_schedule(schedule, row_ordinal, k):
    """``schedule`` keeping only antibody administrations 1..k (k may be traced)."""
    keep = (jnp.asarray(row_ordinal) <= k).astype(schedule.dose_mg.dtype)[:, None]
    return eqx.tree_at(lambda s: (s.dose_mg, s.dose_mg_per_kg), schedule,
                       (schedule.dose_mg * keep, schedule.dose_mg_per_kg * keep))


@eqx.filter_jit
def _solve_stops_jit(models, y0s, ks, schedule, row_ordinal, config, mesh=None):
    def solve(ms, ys, kk, sched, ordinal):
        def one(m, y, k):
            traj = simulate_patient(m, y, truncated_schedule(sched, ordinal, k), config)
            obs = jax.vmap(m.observables)(traj.ys)
            return traj.status, 10.0 * jnp.sum(obs["tumor_diameter_cm"], -1), jnp.sum(obs["cancer_cells"], -1)

        return jax.vmap(one)(ms, ys, kk)

    return per_device(solve, mesh, (models, y0s, ks), (schedule, row_ordinal))


def solve_stops(population, patients: np.ndarray, ks: np.ndarray, timeline: DoseTimeline,
                config: SolverConfig, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve each job (patient ``patients[j]`` stopping after dose ``ks[j]``) in fixed-size chunks.

    Returns status (J,), sum of lesion diameters in mm (J, G) and total viable cancer cells (J, G).
    """
    patients, ks = np.asarray(patients, int), np.asarray(ks, int)
    n_jobs, n_grid = len(patients), len(timeline.grid)
    status = np.zeros(n_jobs, int)
    sod, cells = np.zeros((n_jobs, n_grid)), np.zeros((n_jobs, n_grid))
    ordinal = jnp.asarray(timeline.row_ordinal)
    for start in range(0, n_jobs, chunk):
        idx = np.minimum(np.arange(start, start + chunk), n_jobs - 1)  # the last chunk padded: one shape
        m = min(chunk, n_jobs - start)
        models, y0 = population.take(patients[idx])
        st, s, c = over_devices(_solve_stops_jit, (models, y0, jnp.asarray(ks[idx])),
                                (timeline.schedule, ordinal, config))
        status[start:start + m] = np.asarray(st)[:m]
        sod[start:start + m] = np.asarray(s)[:m]
        cells[start:start + m] = np.asarray(c)[:m]
    return status, sod, cells


def assess_control(grid: np.ndarray, status: np.ndarray, sod_mm: np.ndarray, cells: np.ndarray,
                   criterion: StopCriterion) -> dict[str, np.ndarray]:
    """Per job: ``eliminated``, ``controlled`` (False for failed solves), and the horizon readouts."""
    horizon = grid[-1]
    back = int(np.argmin(np.abs(grid - (horizon - criterion.trend_window_days))))
    ok = status == STATUS_OK
    eliminated = ok & (cells[:, -1] <= 0.0)
    not_rising = cells[:, -1] <= cells[:, back]
    controlled = eliminated | (ok & (sod_mm[:, -1] <= criterion.burden_threshold_mm) & not_rising)
    return {"ok": ok, "eliminated": eliminated, "controlled": controlled, "sod_mm_at_horizon": sod_mm[:, -1],
            "sod_mm_at_start": sod_mm[:, 0],
            "cells_at_horizon": cells[:, -1]}


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------
@dataclass
class StopTimeResult:
    regimen: Regimen
    days: float
    criterion: StopCriterion
    dose_days: np.ndarray  # administrations inside the horizon
    doses_scheduled: int  # administrations of the whole regimen
    patients: list[dict[str, Any]]
    stop_k: np.ndarray  # (P,) doses given at the safe stop, -1 when none
    full_controlled: np.ndarray  # (P,)
    examples: dict[str, Any] = field(default_factory=dict)  # trajectories for the plot
    timing: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0


def find_stop_times(population, regimen: Regimen, *, days: float = 400.0, output_every: float = 7.0,
                    criterion: StopCriterion = StopCriterion(), config: SolverConfig = SolverConfig(rtol=1e-5, atol=1e-8),
                    chunk: int = 64, progress: bool = False) -> StopTimeResult:
    """Earliest safe stop of the antibody for every patient of ``population`` (see module docstring)."""
    criterion.validate()
    all_days = antibody_dose_days(regimen)
    if all_days.size == 0:
        raise QSPValidationError(regimen.name, "ici", [], "the regimen has no antibody dose to stop")
    if days <= criterion.min_follow_up_days:
        raise QSPValidationError("command line", "--days", days,
                                 f"must exceed the minimum follow-up after a stop ({criterion.min_follow_up_days:g} days)")
    t0 = time.perf_counter()
    tl = dose_timeline(regimen, population.drugs, days, output_every, population.n_lesions)
    n_doses = len(tl.dose_days)
    if n_doses == 0:
        raise QSPValidationError(regimen.name, "ici[].start_day", float(all_days[0]),
                                 f"no antibody dose falls inside the horizon of {days:g} days")
    k_max = int(np.sum(tl.dose_days <= days - criterion.min_follow_up_days))  # last candidate with follow-up
    n = len(population)
    chunk = max(1, min(chunk, n * 2))
    log = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    evaluations = 0

    def evaluate(patients, ks):
        nonlocal evaluations
        evaluations += len(patients)
        if len(patients) == 0:
            return {k: np.zeros(0, dtype=bool) for k in ("ok", "eliminated", "controlled")}
        return assess_control(tl.grid, *solve_stops(population, patients, ks, tl, config, chunk), criterion)

    base_ok = population.status == STATUS_OK
    everyone = np.flatnonzero(base_ok)
    full = evaluate(everyone, np.full(everyone.size, n_doses))
    log(f"full regimen: {int(full['controlled'].sum())}/{everyone.size} controlled")
    full_controlled = np.zeros(n, bool)
    full_controlled[everyone] = full["controlled"]
    full_ok = np.zeros(n, bool)
    full_ok[everyone] = full["ok"]
    full_sod = np.full(n, np.nan)
    full_sod[everyone] = full["sod_mm_at_horizon"]
    base_sod = np.full(n, np.nan)
    base_sod[everyone] = full["sod_mm_at_start"]
    reason = np.full(n, None, dtype=object)
    reason[~base_ok] = REASON_BASELINE_FAILED
    reason[base_ok & ~full_ok] = REASON_SOLVER_FAILED
    reason[base_ok & full_ok & ~full_controlled] = REASON_NEVER_CONTROLLED

    lo = np.full(n, -1)  # largest dose count known to regrow (-1: none tested)
    hi = np.full(n, -1)  # smallest dose count known to control
    active = np.flatnonzero(full_controlled)
    hi[active] = n_doses
    if k_max < n_doses and active.size:
        r = evaluate(active, np.full(active.size, k_max))
        late = active[~r["controlled"]]
        reason[late] = REASON_NEEDS_LATE_DOSES
        hi[active[r["controlled"]]] = k_max
        active = active[r["controlled"]]
    if active.size:
        r = evaluate(active, np.zeros(active.size, int))
        hi[active[r["controlled"]]] = 0
        lo[active[~r["controlled"]]] = 0
        active = active[~r["controlled"]]
    rounds = 0
    while True:
        active = active[hi[active] - lo[active] > 1]
        if not active.size:
            break
        rounds += 1
        mid = (lo[active] + hi[active]) // 2
        r = evaluate(active, mid)
        hi[active[r["controlled"]]] = mid[r["controlled"]]
        lo[active[~r["controlled"]]] = mid[~r["controlled"]]
        log(f"bisection round {rounds}: {active.size} patients")
    t_search = time.perf_counter() - t0

    # Confirmation on a longer horizon: the stop still controls there; one dose earlier regrows.
    t1 = time.perf_counter()
    found = np.flatnonzero((hi >= 0) & (hi <= k_max) & (reason == None))  # noqa: E711 (object array)
    confirm = {}
    examples: dict[str, Any] = {}
    if found.size:
        tl_c = dose_timeline(regimen, population.drugs, days + criterion.confirm_days, output_every,
                             population.n_lesions)
        earlier = found[hi[found] > 0]
        jobs_p = np.concatenate([found, earlier])
        jobs_k = np.concatenate([hi[found], hi[earlier] - 1])
        evaluations += len(jobs_p)
        st, sod, cells = solve_stops(population, jobs_p, jobs_k, tl_c, config, chunk)
        c = assess_control(tl_c.grid, st, sod, cells, criterion)
        for j, (p, k) in enumerate(zip(jobs_p, jobs_k)):
            confirm[(int(p), int(k))] = {"controlled": bool(c["controlled"][j]), "eliminated": bool(c["eliminated"][j]),
                                         "sod_mm": float(c["sod_mm_at_horizon"][j]), "cells": float(c["cells_at_horizon"][j])}
        examples = {"grid": tl_c.grid, "patients": jobs_p, "k": jobs_k, "sod_mm": sod, "stop_days": tl.dose_days}
        for p in found:
            ok_stop = confirm[(int(p), int(hi[p]))]["controlled"]
            ok_earlier = hi[p] == 0 or not confirm[(int(p), int(hi[p]) - 1)]["controlled"]
            if not ok_stop:
                reason[p] = REASON_NOT_CONFIRMED
            elif not ok_earlier:
                # One dose earlier regrew at the horizon but controls on the longer one: the slower
                # course is still in the basin. Keep the answer (the earlier stop was refused at H).
                pass
    t_confirm = time.perf_counter() - t1

    stop_k = np.where(reason == None, hi, -1)  # noqa: E711
    schedule_total = len(all_days)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"patient": i, "baseline_sod_mm": _finite(base_sod[i]),
                               "controlled_under_full_regimen": bool(full_controlled[i]),
                               "sod_mm_at_horizon_full_regimen": _finite(full_sod[i])}
        if stop_k[i] >= 0:
            k = int(stop_k[i])
            row.update({"stop_day": float(tl.dose_days[k - 1]) if k > 0 else 0.0, "stop_after_dose": k,
                        "doses_given": k, "doses_spared": schedule_total - k, "reason": None})
            if k == 0:
                row["note"] = "controlled without any antibody dose (stop before the first one)"
            later = confirm.get((i, k))
            earlier = confirm.get((i, k - 1)) if k > 0 else None
            row["confirmation"] = {
                "horizon_days": days + criterion.confirm_days,
                "stop_controlled": later["controlled"], "stop_eliminated": later["eliminated"],
                "stop_sod_mm": later["sod_mm"],
                "one_dose_earlier_controlled": None if earlier is None else earlier["controlled"],
                "one_dose_earlier_sod_mm": None if earlier is None else earlier["sod_mm"],
            }
        else:
            row.update({"stop_day": None, "stop_after_dose": None, "doses_given": n_doses if full_controlled[i]
                        else None, "doses_spared": 0 if reason[i] == REASON_NEEDS_LATE_DOSES else None,
                        "reason": reason[i]})
        rows.append(row)
    return StopTimeResult(regimen, float(days), criterion, tl.dose_days, schedule_total, rows, stop_k,
                          full_controlled, examples,
                          {"search_s": t_search, "confirm_s": t_confirm, "bisection_rounds": rounds}, evaluations)


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------
# Cohort summary, plot, outputs
# ---------------------------------------------------------------------------------------------
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {f"q{int(round(100 * q)):02d}": None for q in QUANTILES}
    return {f"q{int(round(100 * q)):02d}": float(np.quantile(values, q)) for q in QUANTILES}


def summarise(result: StopTimeResult) -> dict[str, Any]:
    """Cohort figures: quantiles of stop day and doses spared, control under the full regimen, and
    the risk of regrowth if every patient stopped after the same dose."""
    from qspjax.outcomes import binomial_ci

    n = len(result.patients)
    has_stop = result.stop_k >= 0
    n_ctrl = int(result.full_controlled.sum())
    stop_days = np.array([r["stop_day"] for r in result.patients if r["stop_day"] is not None], dtype=float)
    spared = np.array([r["doses_spared"] for r in result.patients if r["stop_day"] is not None], dtype=float)
    # Risk of a one-size stop: stopping everyone after dose k, patients whose own safe stop is
    # later (or who have none although the full regimen controls them) regrow (bisection's monotone
    # reading of control in the dose count).
    need = np.where(has_stop, result.stop_k, len(result.dose_days) + 1)
    risk = []
    for k in range(0, len(result.dose_days) + 1):
        regrow = result.full_controlled & (need > k)
        risk.append({"stop_after_dose": k, "stop_day": float(result.dose_days[k - 1]) if k else None,
                     "doses_spared": result.doses_scheduled - k,
                     "regrowth_fraction_of_controlled": float(regrow.sum() / n_ctrl) if n_ctrl else None,
                     "controlled_fraction_of_cohort": float((result.full_controlled & ~regrow).sum() / n)})
    lo, hi = binomial_ci(n_ctrl, n)
    reasons: dict[str, int] = {}
    for r in result.patients:
        if r["reason"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    median_k = None
    if has_stop.any():
        median_k = int(np.ceil(np.quantile(result.stop_k[has_stop], 0.5)))
    return {
        "regimen": result.regimen.name,
        "horizon_days": result.days,
        "criterion": asdict(result.criterion),
        "n_patients": n,
        "doses_scheduled": result.doses_scheduled,
        "doses_inside_horizon": int(len(result.dose_days)),
        "dose_days_inside_horizon": [float(d) for d in result.dose_days],
        "controlled_under_full_regimen": {"n": n_ctrl, "fraction": n_ctrl / n if n else None,
                                          "ci95": [_finite(lo), _finite(hi)]},
        "with_safe_stop": {"n": int(has_stop.sum()), "fraction": float(has_stop.mean()) if n else None,
                           "fraction_of_controlled": float(has_stop.sum() / n_ctrl) if n_ctrl else None},
        "no_safe_stop_reasons": reasons,
        "stop_day_quantiles": _quantiles(stop_days),
        "doses_spared_quantiles": _quantiles(spared),
        "doses_spared_mean": float(spared.mean()) if spared.size else None,
        "doses_spared_fraction_of_scheduled": (float(spared.sum() / (result.doses_scheduled * spared.size))
                                               if spared.size else None),
        "risk": {
            "description": "if every patient stopped after the same dose: fraction of the patients the full "
                           "regimen controls who would regrow (assuming control is monotone in doses given)",
            "at_median_stop": next((r for r in risk if r["stop_after_dose"] == median_k), None),
            "by_stop_dose": risk,
        },
        "evaluations": result.evaluations,
        "timing_s": result.timing,
        "patients": result.patients,
    }


def plot_stop_times(path: Path, result: StopTimeResult, summary: dict[str, Any]) -> Path:
    """Three panels: ECDF of the stop day, histogram of doses spared, and the one-size-stop risk."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from qspjax.io import atomic_write

    fig = Figure(figsize=(13.0, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    a, b, c = fig.subplots(1, 3)
    stops = np.sort([r["stop_day"] for r in result.patients if r["stop_day"] is not None])
    n = len(result.patients)
    if stops.size:
        a.step(np.concatenate([[0.0], stops]), np.arange(stops.size + 1) / n, where="post", color="#4575b4")
    a.axhline(summary["controlled_under_full_regimen"]["fraction"] or 0.0, color="k", linestyle="--", linewidth=0.8,
              label="controlled by the full regimen")
    a.set(xlabel="earliest safe stop day", ylabel="fraction of cohort that may stop by then", ylim=(0, 1.02),
          title="stop day (ECDF over the cohort)")
    a.legend(fontsize=8, loc="lower right")
    spared = np.array([r["doses_spared"] for r in result.patients if r["stop_day"] is not None])
    if spared.size:
        b.hist(spared, bins=np.arange(spared.min() - 0.5, spared.max() + 1.5), color="#91cf60", edgecolor="k")
    b.set(xlabel=f"doses spared (of {result.doses_scheduled} scheduled)", ylabel="patients",
          title=f"doses spared ({len(spared)} of {n} patients have a safe stop)")
    risk = [r for r in summary["risk"]["by_stop_dose"] if r["stop_day"] is not None]  # k = 0: no antibody at all
    c.step([r["stop_day"] for r in risk], [r["regrowth_fraction_of_controlled"] or 0.0 for r in risk], where="post",
           color="#d73027")
    c.set(xlabel="everyone stops after the dose of day", ylabel="regrowth among controlled patients",
          ylim=(0, 1.02), title="risk of a one-size stop")
    fig.suptitle(f"{result.regimen.name}: earliest safe antibody stop (horizon {result.days:g} days)")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def write_stop_time(out: Path, result: StopTimeResult, prov: dict[str, Any], extra: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    from qspjax.io import atomic_write_json

    out = Path(out)
    summary = summarise(result)
    if extra:
        summary.update(extra)
    plot_stop_times(out / "stop_time.png", result, summary)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "run.json", prov)
    return summary


def stop_time_table(summary: dict[str, Any]) -> str:
    """A Markdown table of the cohort figures (what the README shows)."""
    def f(x, fmt="{:.0f}"):
        return "–" if x is None else fmt.format(x)

    q, s = summary["stop_day_quantiles"], summary["doses_spared_quantiles"]
    ctrl = summary["controlled_under_full_regimen"]
    lines = ["| quantity | value |", "|---|---|",
             f"| patients | {summary['n_patients']} |",
             f"| controlled under the full regimen | {ctrl['n']} ({f(100 * (ctrl['fraction'] or 0), '{:.0f}')} %) |",
             f"| with a confirmed safe stop | {summary['with_safe_stop']['n']} |",
             f"| stop day q10 / q25 / median / q75 / q90 | {f(q['q10'])} / {f(q['q25'])} / {f(q['q50'])} / "
             f"{f(q['q75'])} / {f(q['q90'])} |",
             f"| doses spared q10 / median / q90 (of {summary['doses_scheduled']}) | {f(s['q10'])} / {f(s['q50'])} / "
             f"{f(s['q90'])} |"]
    at = summary["risk"]["at_median_stop"]
    if at is not None:
        lines.append(f"| regrowth if everyone stopped after dose {at['stop_after_dose']} (the median stop, day "
                     f"{at['stop_day'] if at['stop_day'] is not None else 'before the first dose'}) | "
                     f"{f(100 * (at['regrowth_fraction_of_controlled'] or 0), '{:.0f}')} % of controlled |")
    for reason, count in summary["no_safe_stop_reasons"].items():
        lines.append(f"| no safe stop: {reason} | {count} |")
    return "\n".join(lines) + "\n"
