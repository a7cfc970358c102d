"""Running a cohort under a regimen in compiled chunks, and writing its outputs."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qspjax.errors import QSPValidationError
from qspjax.io import atomic_write, atomic_write_json, atomic_write_text
from qspjax.model.composer import QSPModel
from qspjax.model.reference import SIMBIOLOGY_COLUMNS, simbiology_columns, state_from_species
from qspjax.params import ParameterSet
from qspjax.regimen import Regimen, compile_schedule, timeline_points
from qspjax.solver.simulate import STATUS_NAMES, STATUS_OK, SolverConfig, simulate_batch
from qspjax.vpop import (PLAUSIBILITY_REASONS, BaselineTarget, Cohort, PopulationSpec, build_models,
                         load_population, make_cohort, matched_spec, plausibility_reasons)

OBSERVABLES = ("tumor_diameter_cm", "tumor_volume_l", "cancer_cells", "dead_cells", "cd8_tumor_cells",
               "treg_tumor_cells", "cd8_density_per_ul", "pd1_signal", "pd1_drug_occupancy")


class CohortFailure(RuntimeError):
    """More patients failed to solve than the run allows."""


@dataclass
class CohortResult:
    """Per-patient outputs on the output grid (patients, time[, lesion])."""

    regimen: Regimen
    days: np.ndarray
    observables: dict[str, np.ndarray]
    status: np.ndarray
    baseline_diameter_cm: np.ndarray
    tps_class: np.ndarray
    drugs: tuple[str, ...]
    lesions: tuple[str, ...]
    simbiology: dict[str, np.ndarray] | None = None
    viable_fraction_at_surgery: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return int(np.sum(self.status != STATUS_OK))


def _observe(model_batch: QSPModel, ys) -> dict:
    def per_patient(m, traj):
        return jax.vmap(m.observables)(traj)

    return jax.vmap(per_patient)(model_batch, ys)


@dataclass
class Population:
    """Screened virtual patients at baseline, ready to be treated (patient axis first)."""

    model: QSPModel
    y0: dict
    status: np.ndarray
    baseline_diameter_cm: np.ndarray
    tps_class: np.ndarray
    drugs: tuple[str, ...]
    n_lesions: int
    screening: dict[str, Any]

    def __len__(self) -> int:
        return int(self.status.shape[0])

    def take(self, index: np.ndarray) -> tuple[QSPModel, dict]:
        return (jax.tree_util.tree_map(lambda x: x[index], self.model),
                jax.tree_util.tree_map(lambda x: x[index], self.y0))


def build_population(
    params: ParameterSet,
    n_patients: int,
    seed: int,
    drugs: tuple[str, ...],
    *,
    variability: bool = True,
    exported_initial_state: bool = False,
    spec: PopulationSpec | None = None,
    target: BaselineTarget | None = None,
    config: SolverConfig = SolverConfig(),
    chunk: int = 64,
    screen_factor: int = 4,
    progress: bool = False,
) -> Population:
    """Draw, grow and screen virtual patients until ``n_patients`` plausible ones are found.

    Candidates come from one quasi-random pool of ``screen_factor * n_patients`` draws of
    ``seed`` (so the cohort depends on the seed and size only, not on the chunking), taken in
    order; each is grown to its baseline diameter and kept if it passes the population file's
    plausibility ranges. ``target`` re-centres the baseline mix on a trial arm's. Without
    variability every patient is nominal and nothing is screened.
    """
    from tqdm import tqdm

    spec = matched_spec(spec or load_population(), target)
    n_lesions = 1 if exported_initial_state else 2
    if exported_initial_state:
        models = build_models(params, {}, n_patients, drugs, n_lesions)
        y0 = jax.vmap(lambda m: state_from_species(m, params.initial_state))(models)
        return Population(models, y0, np.zeros(n_patients, dtype=int),
                          np.full(n_patients, params.values["initial_tumour_diameter"]), np.full(n_patients, -1),
                          tuple(drugs), n_lesions, {"candidates": n_patients, "rejected": {}})
    pool = n_patients * (screen_factor if variability else 1)
    kept: list[Cohort] = []
    n_kept = 0
    rejected = {r: 0 for r in PLAUSIBILITY_REASONS}
    screened = 0
    # Screening usually rejects a minority: a first batch a quarter larger than the cohort.
    n_dev = jax.local_device_count()
    chunk = n_dev * math.ceil(min(chunk, pool, math.ceil(1.25 * n_patients)) / n_dev)
    bar = tqdm(total=n_patients, desc="growing virtual patients", unit="patient", disable=not progress)
    for start in range(0, pool, chunk):
        if n_kept >= n_patients:
            break
        # A full-size chunk every time: one compilation of the growth for the whole run.
        index = np.minimum(np.arange(start, start + chunk), pool - 1)
        cohort = make_cohort(params, pool, seed, drugs, n_lesions, spec=spec, variability=variability,
                             config=config, subset=index)
        valid = np.arange(start, start + chunk) < pool
        reason = plausibility_reasons(cohort, spec.plausibility) if variability else np.full(chunk, -1)
        if not variability:
            # Nominal patients are kept even if their growth failed: the failure is their status.
            keep = valid
        else:
            keep = valid & (reason < 0)
            for r in reason[valid & (reason >= 0)]:
                rejected[PLAUSIBILITY_REASONS[r]] += 1
        screened += int(valid.sum())
        take = np.flatnonzero(keep)[: n_patients - n_kept]
        if take.size:
            kept.append(jax.tree_util.tree_map(lambda x: x[take], cohort))
            n_kept += int(take.size)
            bar.update(int(take.size))
    bar.close()
    if n_kept < n_patients:
        raise CohortFailure(
            f"only {n_kept} of {screened} candidate patients passed the plausibility ranges "
            f"(needed {n_patients}); rejections: {rejected}. Widen 'plausibility' in the population file "
            f"or raise the screening pool")
    cohort = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *kept)
    return Population(cohort.model, cohort.y0, np.asarray(cohort.status), np.asarray(cohort.baseline_diameter_cm),
                      np.asarray(cohort.tps_class), tuple(drugs), n_lesions,
                      {"candidates": screened, "rejected": {k: v for k, v in rejected.items() if v},
                       "target_notes": list(target.notes) if target else []})


def concat_populations(parts: list[Population]) -> Population:
    """One population of the patients of ``parts`` in order (same drugs and lesions), e.g. the
    cohorts of several posterior draws: each patient keeps its own parameter values."""
    if not parts:
        raise QSPValidationError("populations", "parts", [], "at least one population")
    first = parts[0]
    for p in parts[1:]:
        if p.drugs != first.drugs or p.n_lesions != first.n_lesions:
            raise QSPValidationError("populations", "drugs/n_lesions", (p.drugs, p.n_lesions),
                                     f"the same as the first population's {(first.drugs, first.n_lesions)}")
    model = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *[p.model for p in parts])
    y0 = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *[p.y0 for p in parts])
    screening = {"candidates": sum(p.screening.get("candidates", 0) for p in parts),
                 "rejected": {}, "parts": [p.screening for p in parts]}
    for p in parts:
        for k, v in p.screening.get("rejected", {}).items():
            screening["rejected"][k] = screening["rejected"].get(k, 0) + v
    return Population(model, y0, np.concatenate([p.status for p in parts]),
                      np.concatenate([p.baseline_diameter_cm for p in parts]),
                      np.concatenate([p.tps_class for p in parts]), first.drugs, first.n_lesions, screening)


def treat_population(
    population: Population,
    regimens: list[Regimen],
    *,
    days: float = 400.0,
    output_every: float = 1.0,
    config: SolverConfig = SolverConfig(),
    chunk: int = 64,
    max_failed_fraction: float = 0.5,
    progress: bool = False,
) -> list[CohortResult]:
    """Simulate the same ``population`` under each regimen.

    Every regimen is compiled to one padded timeline shape and every batch has ``chunk``
    patients (the last one padded), so all regimens and batches share one compiled solver.
    """
    from tqdm import tqdm

    grid = np.arange(0.0, days + 1e-9, output_every)
    n_points = max(timeline_points(r, grid) for r in regimens)
    n = len(population)
    # A batch splits evenly over the run's devices (GPUs: one each; every process's under
    # jax.distributed, e.g. one CPU device per process with --local-processes); simulate_batch
    # would pad an uneven one, this keeps the padding out of the timing.
    n_dev = jax.device_count()
    chunk = n_dev * math.ceil(min(chunk, n) / n_dev)
    results = []
    for regimen in regimens:
        schedule = compile_schedule(regimen, population.drugs, grid, n_lesions=population.n_lesions,
                                    n_points=n_points)
        parts: list[dict] = []
        bar = tqdm(total=n, desc=f"treating: {regimen.name}", unit="patient", disable=not progress)
        for start in range(0, n, chunk):
            index = np.minimum(np.arange(start, start + chunk), n - 1)
            m = min(chunk, n - start)
            models, y0 = population.take(index)
            traj = simulate_batch(models, y0, schedule, config)
            obs = _observe(models, traj.ys)
            part = {k: np.asarray(obs[k])[:m] for k in OBSERVABLES}
            part["status"] = np.asarray(traj.status)[:m]
            part["viable"] = regimen.read_specimens(np.asarray(traj.viable_fraction_at_surgery)[:m])
            part["steps"] = np.asarray(traj.num_steps)[:m]
            if population.n_lesions == 1:
                drug = population.drugs[0]
                cols = jax.vmap(lambda mm, ys: simbiology_columns(mm, ys, drug=drug))(models, traj.ys)
                part["simbiology"] = {k: np.asarray(v)[:m] for k, v in cols.items()}
            parts.append(part)
            bar.update(m)
        bar.close()
        cat = lambda k: np.concatenate([p[k] for p in parts])
        status = np.where(population.status != STATUS_OK, population.status, cat("status"))
        result = CohortResult(
            regimen, grid, {k: cat(k) for k in OBSERVABLES}, status, population.baseline_diameter_cm,
            population.tps_class, population.drugs, ("irradiated", "non_irradiated")[: population.n_lesions],
            simbiology={k: np.concatenate([p["simbiology"][k] for p in parts]) for k in parts[0]["simbiology"]}
            if population.n_lesions == 1 else None,
            viable_fraction_at_surgery=cat("viable"),
            meta={"timeline_points": int(n_points), "rtol": config.rtol, "solver": config.solver,
                  "solver_steps_median": float(np.median(cat("steps"))), "screening": population.screening},
        )
        if result.n_failed > max_failed_fraction * n:
            raise CohortFailure(f"{result.n_failed} of {n} patients failed to solve under {regimen.name} "
                                f"(allowed: {max_failed_fraction:.0%}); statuses: {status_counts(status)}")
        results.append(result)
    return results


def run_cohort(
    params: ParameterSet,
    regimen: Regimen,
    n_patients: int,
    seed: int,
    days: float = 400.0,
    output_every: float = 1.0,
    variability: bool = True,
    exported_initial_state: bool = False,
    population_file: str | None = None,
    chunk: int = 64,
    rtol: float = 1e-6,
    max_failed_fraction: float = 0.5,
    progress: bool = False,
    target: BaselineTarget | None = None,
    spec: PopulationSpec | None = None,
) -> CohortResult:
    """Sample, grow, screen and treat ``n_patients`` virtual patients under one regimen; failures
    are flagged, never fatal unless more than ``max_failed_fraction`` of the cohort fails.
    ``spec`` (a population already in memory, e.g. a posterior draw's) overrides ``population_file``."""
    drugs = regimen.drugs or ("nivolumab",)
    config = SolverConfig(rtol=rtol, atol=rtol * 1e-3)
    population = build_population(
        params, n_patients, seed, drugs, variability=variability, exported_initial_state=exported_initial_state,
        spec=spec if spec is not None else load_population(population_file), target=target, config=config, chunk=chunk, progress=progress)
    return treat_population(population, [regimen], days=days, output_every=output_every, config=config,
                            chunk=chunk, max_failed_fraction=max_failed_fraction, progress=progress)[0]


def status_counts(status: np.ndarray) -> dict[str, int]:
    """How many patients ended with each solver status, by status name."""
    values, counts = np.unique(status, return_counts=True)
    return {STATUS_NAMES.get(int(v), str(v)): int(c) for v, c in zip(values, counts)}


def per_patient_summary(result: CohortResult) -> list[dict]:
    d = result.observables["tumor_diameter_cm"]  # (P, T, L)
    rows = []
    for i in range(d.shape[0]):
        ok = result.status[i] == STATUS_OK
        base = d[i, 0, :]
        rows.append({
            "patient": i,
            "status": STATUS_NAMES.get(int(result.status[i]), str(int(result.status[i]))),
            "baseline_diameter_cm": [float(x) for x in base] if ok else None,
            "final_diameter_cm": [float(x) for x in d[i, -1, :]] if ok else None,
            "min_ratio_to_baseline": [float(x) for x in d[i, :, :].min(axis=0) / base] if ok else None,
            "pdl1_tps_class": int(result.tps_class[i]),
        })
    return rows


def write_trajectories(result: CohortResult, path: Path) -> None:
    """Observables per patient, day and lesion as a netCDF file (xarray, written atomically)."""
    import xarray as xr

    coords = {"patient": np.arange(len(result.status)), "time_days": result.days, "lesion": list(result.lesions)}
    data = {k: (("patient", "time_days", "lesion"), v) for k, v in result.observables.items()}
    ds = xr.Dataset(data, coords=coords)
    ds["status"] = ("patient", result.status.astype(np.int32))
    ds["baseline_diameter_cm"] = ("patient", result.baseline_diameter_cm)
    ds.attrs.update({"regimen": result.regimen.name, "status_codes": str(STATUS_NAMES)})
    atomic_write(path, lambda p: ds.to_netcdf(p, engine="h5netcdf"))


def write_outputs(result: CohortResult, out: Path, prov: dict) -> None:
    """``trajectories.nc`` (xarray), ``summary.json``, ``run.json``, and ``trajectory.csv`` for a
    single one-lesion patient (columns of the SimBiology reference export). Each file is written
    atomically."""
    out = Path(out)
    write_trajectories(result, out / "trajectories.nc")
    summary = {
        "regimen": result.regimen.name,
        "n_patients": int(len(result.status)),
        "n_failed": result.n_failed,
        "status_counts": status_counts(result.status),
        "patients": per_patient_summary(result),
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "run.json", prov)
    if result.simbiology is not None and len(result.status) == 1:
        names = list(SIMBIOLOGY_COLUMNS)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["time_days"] + names)
        for j, t in enumerate(result.days):
            w.writerow([f"{t:g}"] + [repr(float(result.simbiology[k][0, j])) for k in names])
        atomic_write_text(out / "trajectory.csv", buf.getvalue())
