"""Running a cohort under a regimen in compiled chunks, and writing its outputs."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qspjax.io import atomic_write, atomic_write_json, atomic_write_text
from qspjax.model.composer import QSPModel
from qspjax.model.reference import SIMBIOLOGY_COLUMNS, simbiology_columns, state_from_species
from qspjax.params import ParameterSet
from qspjax.regimen import Regimen, compile_schedule
from qspjax.simulate import STATUS_NAMES, STATUS_OK, SolverConfig, simulate_batch
from qspjax.vpop import build_models, load_population, make_cohort

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
) -> CohortResult:
    """Sample, grow and treat ``n_patients`` virtual patients; failures are flagged, never fatal
    unless more than ``max_failed_fraction`` of the cohort fails."""
    from tqdm import tqdm

    drugs = regimen.drugs or ("nivolumab",)
    n_lesions = 1 if exported_initial_state else 2
    config = SolverConfig(rtol=rtol, atol=rtol * 1e-3)
    grid = np.arange(0.0, days + 1e-9, output_every)
    spec = load_population(population_file)
    schedule = None
    parts: list[dict] = []
    bar = tqdm(total=n_patients, desc=f"simulating {regimen.name}", unit="patient", disable=not progress)
    n_points = None
    for start in range(0, n_patients, chunk):
        n = min(chunk, n_patients - start)
        if exported_initial_state:
            models = build_models(params, {}, n, drugs, n_lesions)
            y0 = jax.vmap(lambda m: state_from_species(m, params.initial_state))(models)
            grow_status = jnp.zeros(n, dtype=int)
            diameter = jnp.full(n, params.values["initial_tumour_diameter"])
            tps = jnp.full(n, -1)
        else:
            # One draw of the whole cohort keeps patients independent of the chunk size.
            cohort = make_cohort(params, n_patients, seed, drugs, n_lesions, spec=spec,
                                 variability=variability, config=config, subset=slice(start, start + n))
            models, y0, grow_status = cohort.model, cohort.y0, cohort.status
            diameter, tps = cohort.baseline_diameter_cm, cohort.tps_class
        if schedule is None:
            schedule = compile_schedule(regimen, drugs, grid, n_lesions=n_lesions)
            n_points = int(schedule.times.shape[0])
        traj = simulate_batch(models, y0, schedule, config)
        status = jnp.where(grow_status != STATUS_OK, grow_status, traj.status)
        obs = _observe(models, traj.ys)
        part = {k: np.asarray(obs[k]) for k in OBSERVABLES}
        part["status"] = np.asarray(status)
        part["baseline"] = np.asarray(diameter)
        part["tps"] = np.asarray(tps)
        part["viable"] = np.asarray(traj.viable_fraction_at_surgery)
        if n_lesions == 1:
            cols = jax.vmap(lambda m, ys: simbiology_columns(m, ys, drug=drugs[0]))(models, traj.ys)
            part["simbiology"] = {k: np.asarray(v) for k, v in cols.items()}
        parts.append(part)
        bar.update(n)
    bar.close()
    cat = lambda k: np.concatenate([p[k] for p in parts])
    observables = {k: cat(k) for k in OBSERVABLES}
    status = cat("status")
    result = CohortResult(
        regimen, grid, observables, status, cat("baseline"), cat("tps"), tuple(drugs),
        ("irradiated", "non_irradiated")[:n_lesions],
        simbiology={k: np.concatenate([p["simbiology"][k] for p in parts]) for k in parts[0]["simbiology"]}
        if n_lesions == 1 else None,
        viable_fraction_at_surgery=cat("viable"),
        meta={"timeline_points": int(n_points), "rtol": rtol},
    )
    if result.n_failed > max_failed_fraction * n_patients:
        raise CohortFailure(f"{result.n_failed} of {n_patients} patients failed to solve "
                            f"(allowed: {max_failed_fraction:.0%}); statuses: {_status_counts(status)}")
    return result


def _status_counts(status: np.ndarray) -> dict[str, int]:
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


def write_outputs(result: CohortResult, out: Path, prov: dict) -> None:
    """``trajectories.nc`` (xarray), ``summary.json``, ``run.json``, and ``trajectory.csv`` for a
    single one-lesion patient (columns of the SimBiology reference export). Each file is written
    atomically."""
    import xarray as xr

    out = Path(out)
    coords = {"patient": np.arange(len(result.status)), "time_days": result.days, "lesion": list(result.lesions)}
    data = {k: (("patient", "time_days", "lesion"), v) for k, v in result.observables.items()}
    ds = xr.Dataset(data, coords=coords)
    ds["status"] = ("patient", result.status.astype(np.int32))
    ds["baseline_diameter_cm"] = ("patient", result.baseline_diameter_cm)
    ds.attrs.update({"regimen": result.regimen.name, "status_codes": str(STATUS_NAMES)})
    atomic_write(out / "trajectories.nc", lambda p: ds.to_netcdf(p, engine="h5netcdf"))
    summary = {
        "regimen": result.regimen.name,
        "n_patients": int(len(result.status)),
        "n_failed": result.n_failed,
        "status_counts": _status_counts(result.status),
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
