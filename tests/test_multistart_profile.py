"""Fitting diagnostics: the Sobol multistart design, starts.csv / waterfall.png / best_starts.png,
and profile likelihoods (``qspjax profile``), on the closed-form kinetics surrogate (seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qspjax  # noqa: F401
from qspjax.errors import QSPValidationError
from qspjax.inference.config import load_run_config
from qspjax.inference.profile import THRESHOLD_95, profile_parameter

from test_inference import synthetic  # noqa: F401  (the fixture: kinetics problem with known truth)

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_the_threshold_is_half_the_chi_square_95_quantile():
    from scipy.stats import chi2

    assert THRESHOLD_95 == pytest.approx(chi2.ppf(0.95, 1) / 2, rel=1e-12)
    assert round(THRESHOLD_95, 2) == 1.92


# ---------------------------------------------------------------------------------------------
# Multistart
# ---------------------------------------------------------------------------------------------
def test_sobol_design_fills_the_prior_box_stratified(synthetic):  # noqa: F811
    from qspjax.inference.calibrate import design_points

    problem, _ = synthetic
    mu, sd = problem.prior_means(), problem.prior_sds()
    pts = design_points(problem, jax.random.PRNGKey(7), 64, "sobol", 2.5)
    np.testing.assert_array_equal(pts[0], mu)  # the prior centre first
    z = (pts[1:] - mu) / (2.5 * sd)  # in [-1, 1]
    assert np.all(np.abs(z) <= 1.0)
    # a scrambled Sobol set of 64 points puts exactly 8 in each eighth of every axis; the centre
    # replaced one point, so one bin per axis holds 7
    for d in range(z.shape[1]):
        counts = np.histogram(z[:, d], bins=8, range=(-1, 1))[0]
        assert sorted(counts) == [7] + [8] * 7, counts
    again = design_points(problem, jax.random.PRNGKey(7), 64, "sobol", 2.5)
    np.testing.assert_array_equal(pts, again)  # seeded by the key
    with pytest.raises(QSPValidationError, match="design"):
        design_points(problem, jax.random.PRNGKey(7), 4, "grid")


@pytest.fixture(scope="module")
def multistart(synthetic, tmp_path_factory):  # noqa: F811
    from qspjax.inference.calibrate import calibrate
    from qspjax.inference.multistart import read_starts_csv, write_multistart

    problem, truth = synthetic
    result = calibrate(problem, jax.random.PRNGKey(1), starts=50, steps=60, patience=5, tolerance=1e-7,
                       progress=False, method="lbfgs", design="sobol", box_sds=3.0)
    out = tmp_path_factory.mktemp("multistart")
    files = write_multistart(out, problem, result, cluster_tolerance=0.1)
    return problem, truth, result, files, read_starts_csv(files["starts"])


def test_the_waterfall_finds_the_known_optimum_among_the_best_starts(multistart):
    problem, truth, result, files, rows = multistart
    assert len(rows) == 50 and all(r["optimized"] for r in rows)
    assert [r["start"] for r in rows] == list(range(50))
    ranked = sorted(rows, key=lambda r: r["rank"])
    assert [r["rank"] for r in ranked] == list(range(1, 51))
    finals = [r["final_objective"] for r in ranked]
    assert finals == sorted(finals)
    ids = list(problem.ids)
    best_theta = np.array([ranked[0][f"theta:{i}"] for i in ids])
    np.testing.assert_allclose(best_theta, truth, atol=0.05)  # the recovery tolerance of test_inference
    assert finals[0] == pytest.approx(result.loss, abs=1e-12)
    assert finals[0] <= -float(problem.log_posterior(jnp.asarray(truth))) + 1e-9
    cluster = [r for r in rows if r["best_cluster"]]
    # the optimum is found repeatedly, and every start of the best cluster is that optimum
    assert len(cluster) >= 10
    for r in cluster:
        assert r["final_objective"] - finals[0] <= 0.1
        np.testing.assert_allclose([r[f"theta:{i}"] for i in ids], best_theta, atol=0.05)
    for r in rows:  # the initial objective is the start's own value; descent never ends above it
        start = result.starts[r["start"]]
        assert r["initial_objective"] == pytest.approx(-float(problem.log_posterior(jnp.asarray(start))), rel=1e-10)
        assert r["final_objective"] <= r["initial_objective"] + 1e-12
        assert r["converged"] == (r["stop_reason"] == "converged")
    assert sum(r["converged"] for r in rows) >= 40
    for key in ("waterfall", "best_starts"):
        assert Path(files[key]).read_bytes()[:8] == PNG


def test_screened_fit_writes_every_design_point_and_optimises_the_best(tmp_path):
    from qspjax.cli import main
    from qspjax.inference.multistart import read_starts_csv

    run = tmp_path / "run.yaml"
    run.write_text(f"priors: {REPO}/configs/inference/priors.yaml\narms: {REPO}/configs/inference/advanced_arms.yaml\n"
                   "likelihood: {patients: 4, horizon_days: 60, output_every_days: 7}\n"
                   "optimizer: {starts: 12, optimize: 3, steps: 20, patience: 3, method: lbfgs, seed: 4}\n")
    out = tmp_path / "fit"
    assert main(["fit", str(run), "--out", str(out), "--simulator", "kinetics", "--max-arms", "2"]) == 0
    rows = read_starts_csv(out / "starts.csv")
    assert len(rows) == 12 and sum(r["optimized"] for r in rows) == 3
    by_initial = sorted(rows, key=lambda r: r["initial_objective"])
    assert {r["start"] for r in by_initial[:3]} == {r["start"] for r in rows if r["optimized"]}
    assert all(math.isnan(r["final_objective"]) for r in rows if not r["optimized"])
    history = json.loads((out / "loss_history.json").read_text())
    best = min((r for r in rows if r["optimized"]), key=lambda r: r["final_objective"])
    assert best["final_objective"] == pytest.approx(history["best_loss"], abs=1e-12)
    assert history["design"] == {"type": "sobol", "box_sds": 3.0}
    for name in ("waterfall.png", "best_starts.png"):
        assert (out / name).read_bytes()[:8] == PNG


@pytest.mark.parametrize("optimizer, field", [
    ("{starts: 10, optimize: 11}", "optimizer.optimize"),
    ("{starts: 0}", "optimizer.starts"),
    ("{design: grid}", "optimizer.design"),
    ("{box_sds: -1}", "optimizer.box_sds"),
    ("{cluster_tolerance: 0}", "optimizer.cluster_tolerance"),
    ("{starts: 1, screen: 10}", "optimizer.screen"),
])
def test_bad_multistart_settings_are_refused_naming_the_field(tmp_path, optimizer, field):
    path = tmp_path / "run.yaml"
    path.write_text(f"priors: {REPO}/configs/inference/priors.yaml\narms: {REPO}/configs/inference/advanced_arms.yaml\n"
                    f"optimizer: {optimizer}\n")
    with pytest.raises(QSPValidationError) as err:
        load_run_config(path)
    assert err.value.field == field and str(path) in str(err.value)


def test_the_shipped_run_file_screens_at_least_50_sobol_starts():
    o = load_run_config(REPO / "configs/inference/fit_advanced.yaml").optimizer
    assert o.starts >= 50 and o.design == "sobol" and o.optimized <= o.starts


# ---------------------------------------------------------------------------------------------
# Profiles of known objectives
# ---------------------------------------------------------------------------------------------
H = np.array([[4.0, 3.0, 0.5], [3.0, 9.0, 1.0], [0.5, 1.0, 2.0]])  # correlated, positive definite
MU = np.array([0.3, -0.2, 1.0])


def _quadratic(theta):
    d = np.asarray(theta) - MU
    return 0.5 * float(d @ H @ d), H @ d


def test_a_quadratic_profile_gives_the_analytic_interval():
    sigma = np.linalg.inv(H)
    bounds = [(-10.0, 10.0)] * 3
    for i in range(3):
        prof = profile_parameter(_quadratic, MU, i, bounds, step=0.1 * math.sqrt(sigma[i, i]), max_points=60)
        half = math.sqrt(2 * THRESHOLD_95 * sigma[i, i])  # 1.96 marginal sds
        assert prof.lower == pytest.approx(MU[i] - half, abs=1e-6)
        assert prof.upper == pytest.approx(MU[i] + half, abs=1e-6)
        assert prof.reading == "identifiable"
        # the other parameters were re-optimised: without that the interval is sqrt(1/H_ii) wide
        assert abs(half - math.sqrt(2 * THRESHOLD_95 / H[i, i])) > 0.04  # >> the 1e-6 tolerance above
        np.testing.assert_allclose(prof.objectives, 0.5 * (prof.values - MU[i]) ** 2 / sigma[i, i], atol=1e-9)


def test_a_parameter_the_objective_ignores_is_non_identifiable():
    def fun(theta):  # depends on theta[0] only
        return 0.5 * (theta[0] - 1.0) ** 2, np.array([theta[0] - 1.0, 0.0])

    prof = profile_parameter(fun, np.array([1.0, 0.0]), 1, [(-5, 5), (-3, 3)], step=0.5)
    assert prof.lower is None and prof.upper is None
    assert prof.reading == "structurally non-identifiable (flat profile)"
    assert prof.values.min() == -3 and prof.values.max() == 3  # walked to the box edges


def test_a_one_sided_profile_is_practically_non_identifiable_on_that_side():
    def fun(theta):  # softplus: rises to the right, flat to the left
        x = theta[0]
        return 3.0 * math.log1p(math.exp(x)), np.array([3.0 / (1.0 + math.exp(-x))])

    prof = profile_parameter(fun, np.array([-5.0]), 0, [(-8.0, 4.0)], step=0.25, max_points=100)
    assert prof.lower is None and prof.upper is not None
    f0 = 3.0 * math.log1p(math.exp(-8.0))  # the lowest value: the box edge, not the start
    expected = math.log(math.expm1((f0 + THRESHOLD_95) / 3.0))
    assert prof.upper == pytest.approx(expected, abs=1e-6)
    assert prof.reading == "practically non-identifiable (lower side)"
    assert prof.notes and "lower objective" in prof.notes[0]  # the start was not the optimum


# ---------------------------------------------------------------------------------------------
# qspjax profile on a fit folder
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory):
    from qspjax.cli import main

    out = tmp_path_factory.mktemp("fit") / "fit"
    assert main(["fit", str(REPO / "configs/inference/fit_advanced.yaml"), "--out", str(out), "--simulator",
                 "kinetics", "--patients", "4", "--horizon-days", "60", "--max-arms", "2", "--starts", "8",
                 "--steps", "40"]) == 0
    return out


def test_cli_profile_writes_the_tables_plots_and_readings(fit_dir, tmp_path, capsys):
    from qspjax.cli import main
    from qspjax.inference.profile import problem_from_fit

    out = tmp_path / "profiles"
    assert main(["profile", str(fit_dir), "--out", str(out), "--parameters", "k_C1_growth,q_T1_T_in",
                 "--step", "0.5"]) == 0
    doc = json.loads((out / "profiles.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert set(doc["parameters"]) == {"k_C1_growth", "q_T1_T_in"}
    # q_T1_T_in does not enter the kinetics surrogate: flat, non-identifiable
    q = doc["parameters"]["q_T1_T_in"]
    assert not q["identifiable"] and "non-identifiable" in q["reading"] and q["interval_95"] == [None, None]
    # Flat up to the inner re-optimisation's error: the fixture's fit stops after 40 Adam steps, so
    # re-optimising the others at each fixed value moves the objective by a few hundredths of a nat
    # (0.034 measured on a clean clone), far below the 1.92 that would make it informative.
    assert q["max_delta"] < 0.1
    g = doc["parameters"]["k_C1_growth"]
    assert g["max_delta"] > THRESHOLD_95 and g["interval_95"][0] is not None  # the data bound it from below
    import csv

    rows = list(csv.DictReader((out / "profiles.csv").open()))
    assert set(rows[0]) == {"parameter", "value", "objective", "delta"}
    problem, _, _ = problem_from_fit(fit_dir)
    for r in rows[:5]:  # the objective is the fit's own negative log likelihood, rebuilt from run.json
        assert float(r["delta"]) == pytest.approx(float(r["objective"]) - doc["minimum"], abs=1e-9)
        assert float(r["delta"]) >= -1e-9
    at_min = jnp.asarray([doc["theta_at_minimum"][i] for i in problem.ids])
    assert doc["minimum"] == pytest.approx(-float(problem.log_likelihood(at_min)), rel=1e-10)
    for name in ("k_C1_growth", "q_T1_T_in"):
        assert (out / f"profile_{name}.png").read_bytes()[:8] == PNG
    assert "structurally non-identifiable" in capsys.readouterr().out


@pytest.mark.parametrize("argv, field", [
    (["--parameters", "no_such_parameter"], "--parameters"),
    (["--step", "-1"], "--step"),
    (["--max-points", "0"], "--max-points"),
    (["--max-delta", "1.0"], "--max-delta"),
    (["--objective", "evidence"], "--objective"),
    (["--box-sds", "0"], "--box-sds"),
])
def test_cli_profile_refuses_bad_arguments_naming_the_field(fit_dir, tmp_path, capsys, argv, field):
    from qspjax.cli import main

    out = tmp_path / "p"
    assert main(["profile", str(fit_dir), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert field in err and argv[1] in err
    assert not out.exists()  # refused before any output


def test_cli_profile_refuses_a_folder_that_is_not_a_fit(tmp_path, capsys):
    from qspjax.cli import main

    assert main(["profile", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert "run.json" in capsys.readouterr().err
