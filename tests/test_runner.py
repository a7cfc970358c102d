"""Cohort runs: a failing patient is isolated and counted, too many failures stop the run (exit
3), and a run is reproducible from its inputs and records what it needs to be repeated.

Compilation dominates the cost of a short solve (~30 s a shape on 2 cores), and an unsolvable
patient costs the solver's step limit in every event segment, so every solve here is the
exported one-lesion QSP-IO patient over 3 days under the reference regimen (one segment): the CLI
runs share ``test_cli.py``'s compilation and the three-patient batches one more.
"""

from __future__ import annotations

import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
import yaml

from qspjax import outcomes as oc
from qspjax.cli import main
from qspjax.model.reference import state_from_species
from qspjax.regimen import compile_schedule, load_regimen
from qspjax.solver.simulate import STATUS_NAMES, STATUS_OK, SolverConfig, simulate_batch
from qspjax.vpop import build_models, draw, load_population

from conftest import REPO

REGIMEN = REPO / "configs" / "regimens" / "qspio_example1_nivolumab.yaml"
GRID = np.arange(0.0, 4.0)
ASSESSMENTS = [1.0, 3.0]


def cli_run(out, *extra: str) -> list[str]:
    return ["simulate", "--regimen", str(REGIMEN), "--patients", "1", "--no-variability", "--uncalibrated",
            "--days", "3", "--seed", "7", "--out", str(out), *extra]


def diameters_mm(observables) -> np.ndarray:
    """(patients, lesions, time) in mm from the observables' (patients, time, lesions) in cm."""
    return 10.0 * np.moveaxis(np.asarray(observables["tumor_diameter_cm"]), 2, 1)


def _solve_three_patients(params, growth_rates):
    models = build_models(params, {"k_C1_growth": jnp.asarray(growth_rates)}, 3, ("nivolumab",), 1)
    y0 = jax.vmap(lambda m: state_from_species(m, params.initial_state))(models)
    schedule = compile_schedule(load_regimen(REGIMEN), ("nivolumab",), GRID, n_lesions=1)
    traj = simulate_batch(models, y0, schedule, SolverConfig())
    observables = jax.vmap(lambda m, ys: jax.vmap(m.observables)(ys))(models, traj.ys)
    return np.asarray(traj.status), {k: np.asarray(v) for k, v in observables.items()}


@pytest.fixture(scope="module")
def healthy_batch(params):
    g = params.values["k_C1_growth"]
    return _solve_three_patients(params, [g, 0.5 * g, 2.0 * g])


@pytest.fixture(scope="module")
def batch_with_one_failure(params):
    """The same batch with the middle patient's growth rate infinite: its solve cannot succeed."""
    g = params.values["k_C1_growth"]
    return _solve_three_patients(params, [g, np.inf, 2.0 * g])


@pytest.fixture(scope="module")
def absurd_params_file(tmp_path_factory):
    """The reference parameter file with a growth rate of 1e300 /day: valid input, unsolvable model."""
    doc = yaml.safe_load((REPO / "configs" / "params" / "qspio_example1.yaml").read_text(encoding="utf-8"))
    doc["parameters"]["k_C1_growth"]["value"] = 1e300
    path = tmp_path_factory.mktemp("params") / "absurd.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Failure isolation
# ---------------------------------------------------------------------------------------------
def test_a_failing_patient_is_flagged_and_its_neighbours_are_unchanged(batch_with_one_failure, healthy_batch):
    status, observables = batch_with_one_failure
    healthy_status, healthy = healthy_batch
    assert np.all(healthy_status == STATUS_OK)
    assert status[1] != STATUS_OK and status[0] == STATUS_OK and status[2] == STATUS_OK
    # Sharing a vmapped solve with a failing patient must not perturb the others.
    for i in (0, 2):
        np.testing.assert_allclose(observables["tumor_diameter_cm"][i], healthy["tumor_diameter_cm"][i], rtol=1e-9)


def test_arm_summary_excludes_the_failed_patient_and_counts_it(batch_with_one_failure):
    status, observables = batch_with_one_failure
    diam = diameters_mm(observables)
    ok = status == STATUS_OK
    summary = oc.summarise(GRID, diam, ok, assessment_days=ASSESSMENTS)
    assert (summary["n_patients"], summary["n_failed"], summary["n_evaluated"]) == (3, 1, 2)
    for key in ("orr", "dcr", "cr", "pr", "sd", "pd", "ne"):
        assert np.isfinite(summary[key]), key
    assert summary["cr"] + summary["pr"] + summary["sd"] + summary["pd"] + summary["ne"] == pytest.approx(1.0)
    # Excluded, not merely down-weighted: the arm equals the healthy patients alone, whatever the
    # failed solve left in its slot.
    alone = oc.summarise(GRID, diam[[0, 2]], assessment_days=ASSESSMENTS)
    for key in ("orr", "dcr", "sd", "pd"):
        assert summary[key] == alone[key], key
    garbage = diam.copy()
    garbage[1] = 0.0  # would read as a complete response if it were counted
    with_garbage = oc.summarise(GRID, garbage, ok, assessment_days=ASSESSMENTS)
    for key in ("orr", "dcr", "cr", "pr", "sd", "pd"):
        assert with_garbage[key] == alone[key], key
    assert sum(summary["km"]["n_events"]) + sum(summary["km"]["n_censored"]) == 2


def test_smooth_arm_rates_stay_finite_with_a_failed_patient(batch_with_one_failure):
    status, observables = batch_with_one_failure
    diam = jnp.asarray(diameters_mm(observables))
    ok = status == STATUS_OK
    probs = oc.soft_best_response_probabilities(GRID, diam, status_ok=ok, assessment_days=ASSESSMENTS)
    mean = np.asarray(oc.soft_cohort_mean(probs, ok))
    assert mean.shape == (5,) and np.all(np.isfinite(mean)) and mean.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(mean, np.asarray(probs)[[0, 2]].mean(axis=0), rtol=1e-12)


def test_cli_exits_3_and_writes_no_outputs_when_the_cohort_fails(tmp_path, capsys, absurd_params_file):
    out = tmp_path / "run"
    rc = main(cli_run(out, "--params", str(absurd_params_file)))
    err = capsys.readouterr().err
    assert rc == 3
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("qspjax: run failed: 1 of 1 patients failed") and "(allowed: 50%)" in last
    assert any(f"'{name}': 1" in last for name in STATUS_NAMES.values() if name != "ok")
    assert list(out.iterdir()) == []  # nothing half-written: outputs come only after a successful run


# ---------------------------------------------------------------------------------------------
# Reproducibility and provenance
# ---------------------------------------------------------------------------------------------
def _arrays(out) -> dict[str, np.ndarray]:
    with xr.open_dataset(out / "trajectories.nc", engine="h5netcdf") as ds:
        return {k: ds[k].values.copy() for k in ds.data_vars}


def test_rerunning_simulate_reproduces_identical_numbers_and_records_provenance(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(cli_run(first)) == 0
    assert main(cli_run(second)) == 0
    a, b = _arrays(first), _arrays(second)
    assert sorted(a) == sorted(b) and "tumor_diameter_cm" in a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert np.all(np.isfinite(a["tumor_diameter_cm"])) and np.all(a["status"] == STATUS_OK)
    assert (first / "summary.json").read_text() == (second / "summary.json").read_text()
    assert (first / "trajectory.csv").read_text() == (second / "trajectory.csv").read_text()

    run = json.loads((first / "run.json").read_text())
    assert run["seed"] == 7
    config = run["config"]
    assert config["regimen"] == str(REGIMEN) and config["patients"] == 1 and config["days"] == 3.0
    assert config["no_variability"] is True and config["seed"] == 7 and config["rtol"] == 1e-6
    for package in ("qspjax", "jax", "jaxlib", "diffrax", "equinox", "numpy"):
        assert run["versions"][package], package
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert head and run["git_revision"].removesuffix("-dirty") == head

    # The folder now holds a run: a repeat is refused and leaves it as it was ...
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    capsys.readouterr()
    assert main(cli_run(first)) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(first) in err
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    # ... and --overwrite replaces it with the same numbers and no temporary files.
    assert main(cli_run(first, "--overwrite")) == 0
    np.testing.assert_array_equal(_arrays(first)["tumor_diameter_cm"], a["tumor_diameter_cm"])
    assert sorted(p.name for p in first.iterdir()) == sorted(before)


def test_the_seed_alone_determines_the_cohort_draws():
    spec = load_population()
    a, b, c = draw(spec, 5, seed=11), draw(spec, 5, seed=11), draw(spec, 5, seed=12)
    np.testing.assert_array_equal(a.z, b.z)
    np.testing.assert_array_equal(a.u_tps, b.u_tps)
    assert not np.allclose(a.z, c.z)
