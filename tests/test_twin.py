"""The patient digital twin (qspjax.analysis.twin, ``qspjax twin``).

Default tests run the twin's machinery (file checks, likelihood, NUTS, diagnostics, refusal,
conflict check, prediction, ranking, outputs) on the closed-form :class:`ToyTwinSimulator`, which
compiles in seconds; the QSP model's NUTS gradient takes minutes to compile on 2 cores, so its runs
(the worked example, the coverage script) are opt-in (``-m slow``) or recorded in the README.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from qspjax.analysis import twin
from qspjax.errors import QSPValidationError
from qspjax.outcomes import DETECTION_LIMIT_MM
from qspjax.regimen import load_regimen

from conftest import REPO

HISTORY = REPO / "configs/regimens/nivolumab_240mg_q2w.yaml"
CANDIDATE = REPO / "configs/regimens/pembrolizumab_200mg_q3w.yaml"
GOOD = "day,lesion,diameter_mm\n0,irradiated,30\n0,non_irradiated,18\n42,irradiated,27\n84,irradiated,25\n84,non_irradiated,16\n"
FAST = dict(chains=2, warmup=120, samples=120, max_tree_depth=6, predictive_draws=40, prior_draws=16, horizon_days=200.0)


def _write(tmp_path, text, name="p.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def toy():
    return twin.ToyTwinSimulator()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, toy):
    """One toy twin fitted to the GOOD file, with one candidate, written to disk."""
    from qspjax.io import provenance

    d = tmp_path_factory.mktemp("twin")
    patient = twin.load_patient(_write(d, GOOD), 200.0)
    res = twin.fit_twin(patient, load_regimen(HISTORY), [(load_regimen(CANDIDATE), str(CANDIDATE))], simulator=toy,
                        config=twin.TwinConfig(**FAST))
    summary = twin.write_twin(d / "out", res, provenance({"test": True}, 0))
    return res, summary, d / "out"


# ---------------------------------------------------------------------------------------------
# Bad patient files: refused before compute, naming file, row, field, value and what is allowed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, field, value, allowed", [
    ("day,lesion,diameter_mm\n0,irradiated,30\n42,irradiated,-3\n", "row 2 (line 3) diameter_mm", "'-3'", "must be in [0, 500) mm"),
    ("day,lesion,diameter_mm\n0,irradiated,30\n42,liver,20\n", "row 2 (line 3) lesion", "'liver'", "unknown lesion; allowed: ['irradiated', 'non_irradiated']"),
    ("day,lesion,diameter_mm\n0,irradiated,30\n42,irradiated,28\n21,irradiated,29\n", "row 3 (line 4) day", "'21'", "days must not decrease"),
    ("day,lesion,diameter_mm\n0,irradiated,30\n42,irradiated,28\n42,irradiated,29\n", "row 3 (line 4) day", "'42'", "already measured on day 42 (row 2 (line 3))"),
    ("day,lesion,diameter_mm\n0,irradiated,30\n400,irradiated,28\n", "row 2 (line 3) day", "'400'", "after the horizon (365 days)"),
    ("day,lesion,diameter_mm,size\n0,irradiated,30,1\n", "(header)", "'size'", "unknown column"),
    ("day,lesion\n0,irradiated\n", "(header)", "['day', 'lesion']", "the column 'diameter_mm' is required"),
    ("day,lesion,diameter_mm\n0,irradiated,abc\n", "row 1 (line 2) diameter_mm", "'abc'", "a number is required"),
    ("day,lesion,diameter_mm,pdl1_tps\n0,irradiated,30,120\n", "row 1 (line 2) pdl1_tps", "'120'", "in [0, 100]"),
])
def test_bad_patient_files_are_refused_naming_file_row_field_value_and_rule(tmp_path, text, field, value, allowed):
    path = _write(tmp_path, text)
    with pytest.raises(QSPValidationError) as err:
        twin.load_patient(path, 365.0)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {field} = {value}: "), msg
    assert allowed in msg


def test_cli_refuses_a_bad_file_before_compute_and_creates_no_output(tmp_path, capsys):
    from qspjax.cli import main

    path = _write(tmp_path, "day,lesion,diameter_mm\n0,irradiated,30\n42,irradiated,-3\n")
    out = tmp_path / "out"
    rc = main(["twin", str(path), "--history", str(HISTORY), "--candidates", str(CANDIDATE), "--out", str(out)])
    assert rc == 2
    assert "row 2 (line 3) diameter_mm = '-3'" in capsys.readouterr().err
    assert not out.exists()


def test_yaml_patient_file_reads_like_the_csv(tmp_path):
    y = _write(tmp_path, "pdl1_tps: 55\nmeasurements:\n  - {day: 0, lesion: irradiated, diameter_mm: 30}\n"
                         "  - {day: 42, lesion: non_irradiated, diameter_mm: 3}\nlymphocytes:\n  - {day: 0, per_ul: 1500}\n",
               "p.yaml")
    p = twin.load_patient(y, 365.0)
    assert p.day.tolist() == [0.0, 42.0] and p.lesion.tolist() == [0, 1] and p.diameter_mm.tolist() == [30.0, 3.0]
    assert p.censored.tolist() == [False, True]  # 3 mm < the 5 mm detection limit
    assert p.pdl1_tps == 55.0 and p.tps_class() == 2 and p.lymphocytes == ((0.0, 1500.0),)


def test_the_shipped_example_patient_is_valid():
    p = twin.load_patient(REPO / "configs/twins/example_patient.csv", 365.0)
    assert p.n == 7 and p.lesions_measured == (0, 1) and p.last_day == 91.0 and p.tps_class() == 1
    assert len(p.lymphocytes) == 3


# ---------------------------------------------------------------------------------------------
# Measurement model and regimens
# ---------------------------------------------------------------------------------------------
def test_censored_read_likelihood_is_the_probability_below_the_detection_limit():
    from scipy.stats import norm

    d = np.array([4.0, 8.0, 30.0])
    sd = np.sqrt((0.1 * d) ** 2 + 1.5 ** 2)
    got = np.asarray(twin.read_log_likelihood(d, np.array([0.0, 0.0, 33.0]), np.array([True, True, False])))
    want = [norm.logcdf((DETECTION_LIMIT_MM - 4.0) / sd[0]), norm.logcdf((DETECTION_LIMIT_MM - 8.0) / sd[1]),
            norm.logpdf(33.0, 30.0, sd[2])]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_switch_keeps_history_before_the_decision_day_and_shifts_the_candidate():
    h, c = load_regimen(HISTORY), load_regimen(CANDIDATE)
    r = twin.switch_regimen(h, c, 84.0)
    days = sorted((d, k.drug) for k in r.ici for d in k.days())
    assert [d for d, drug in days if drug == "nivolumab"] == [0.0, 14.0, 28.0, 42.0, 56.0, 70.0]
    pem = [d for d, drug in days if drug == "pembrolizumab"]
    assert pem[:3] == [84.0, 105.0, 126.0] and len(pem) == 35


# ---------------------------------------------------------------------------------------------
# The fit, diagnostics, prediction and outputs (toy simulator)
# ---------------------------------------------------------------------------------------------
def test_fit_passes_diagnostics_and_writes_every_output(fitted):
    res, summary, out = fitted
    assert not res.refused, res.refused
    assert summary["rhat_max"] <= 1.05 and summary["ess_bulk_min"] >= 50 and summary["divergences"] == 0
    assert summary["prediction_refused"] is False
    for name in ("posterior.nc", "summary.json", "ranking.csv", "fitted_past.png", "predicted_futures.png", "run.json"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert {"rhat_max", "ess_bulk_min", "divergences", "prediction_refused"} <= set(s)
    assert json.loads((out / "run.json").read_text())["seed"] == 0


def test_posterior_file_holds_every_parameter_on_both_scales(fitted):
    import arviz as az

    res, _, out = fitted
    idata = az.from_netcdf(out / "posterior.nc")
    for n in res.simulator.names:
        assert idata.posterior[f"z_{n}"].shape == (2, 120)
        np.testing.assert_allclose(idata.posterior[n].values,
                                   res.simulator.median[n] * np.exp(res.simulator.sd[n] * idata.posterior[f"z_{n}"].values))
    assert int(idata.sample_stats["diverging"].sum()) == res.diagnostics["divergences"]


def test_ranking_file_has_one_row_per_regimen_in_rank_order(fitted):
    res, _, out = fitted
    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert list(rows[0]) == list(twin.RANKING_COLUMNS)
    assert {"regimen", "p_response", "p_progression_free", "expected_burden"} <= set(rows[0])
    assert [r["regimen"] for r in rows] == [r["regimen"] for r in res.ranking]
    assert sorted(r["regimen"] for r in rows) == ["nivolumab-240mg-q2w (continued)", "pembrolizumab-200mg-q3w"]
    pf = [float(r["p_progression_free"]) for r in rows]
    assert pf == sorted(pf, reverse=True) and all(0 <= float(r["p_response"]) <= 1 for r in rows)
    # The toy kills per gram of antibody: 240 mg q2w gives more than 200 mg q3w, so continuing wins.
    assert rows[0]["regimen"] == "nivolumab-240mg-q2w (continued)"
    assert float(rows[0]["expected_burden"]) < float(rows[1]["expected_burden"])


def test_fitted_reads_are_reproduced(fitted):
    res, _, _ = fitted
    c = res.conflict
    assert c["posterior_misfit"] is False and c["posterior_worst_abs_residual_sd"] < 2.5
    assert c["prior_conflict"] is False and c["prior_draws_compatible"] > 0


def test_diagnose_refuses_on_each_failed_diagnostic():
    good = {"rhat_max": 1.01, "ess_bulk_min": 200.0, "divergences": 0, "draws": 400}
    assert twin.diagnose(good) == []
    assert "R-hat" in twin.diagnose(good | {"rhat_max": 1.2})[0]
    assert "ESS" in twin.diagnose(good | {"ess_bulk_min": 12.0})[0]
    assert "divergent" in twin.diagnose(good | {"divergences": 5})[0]
    assert len(twin.diagnose(good | {"rhat_max": math.nan})) == 1  # one chain: no R-hat, no prediction


def test_failed_diagnostics_refuse_prediction_and_write_no_ranking(tmp_path, toy):
    from qspjax.io import provenance

    patient = twin.load_patient(_write(tmp_path, GOOD), 200.0)
    cfg = twin.TwinConfig(**(FAST | {"chains": 1}))  # the fixture's compiled chain; one chain has no R-hat
    res = twin.fit_twin(patient, load_regimen(HISTORY), [(load_regimen(CANDIDATE), "c.yaml")], simulator=toy, config=cfg)
    assert res.refused and res.ranking == []
    s = twin.write_twin(tmp_path / "out", res, provenance({}, 0))
    assert s["prediction_refused"] is True and s["refusal_reasons"]
    assert not (tmp_path / "out" / "ranking.csv").exists() and not (tmp_path / "out" / "predicted_futures.png").exists()
    assert (tmp_path / "out" / "fitted_past.png").is_file()


def test_data_contradicting_every_prior_draw_get_a_conflict_diagnostic(tmp_path, toy):
    # 30 mm, then 250 mm two weeks later, then 30 mm again: no growth law of the population does that.
    text = "day,lesion,diameter_mm\n0,irradiated,30\n14,irradiated,250\n28,irradiated,30\n42,irradiated,240\n"
    patient = twin.load_patient(_write(tmp_path, text), 200.0)
    res = twin.fit_twin(patient, load_regimen(HISTORY), [(load_regimen(CANDIDATE), "c.yaml")], simulator=toy,
                        config=twin.TwinConfig(**FAST))
    c = res.conflict
    assert c["prior_conflict"] is True and c["prior_draws_compatible"] == 0
    assert c["posterior_misfit"] is True and c["posterior_worst_abs_residual_sd"] > twin.MISFIT_Z
    assert any(r.startswith("prior-data conflict") for r in res.refused) and res.ranking == []
    assert "none of the 16 prior draws" in c["message"]


def test_one_measurement_is_prior_dominated_and_says_so(tmp_path, toy):
    patient = twin.load_patient(_write(tmp_path, "day,lesion,diameter_mm\n0,irradiated,30\n"), 200.0)
    res = twin.fit_twin(patient, load_regimen(HISTORY), [(load_regimen(CANDIDATE), "c.yaml")], simulator=toy,
                        config=twin.TwinConfig(**FAST))
    pd = res.prior_dominated
    assert pd["prior_dominated"] is True and "prior-dominated" in pd["note"]
    sd = dict(zip(toy.names, pd["posterior_sd_over_prior_sd"]))
    # Growth and kill are not seen at all: their posterior is the prior (sd ~1); the baseline is read.
    assert 0.75 < sd["growth_per_day"] < 1.25 and 0.75 < sd["kill_per_gram"] < 1.25
    assert sd["baseline_diameter_mm"] < 0.5
    assert not res.refused and len(res.ranking) == 2


@pytest.mark.slow  # ~20 s of toy NUTS fits
def test_toy_coverage_of_held_back_reads_and_parameters_is_near_nominal(tmp_path):
    """The coverage script on 20 toy patients (a wrong noise model or likelihood breaks this)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import twin_coverage

    out = tmp_path / "cov.json"
    twin_coverage.main(twin_coverage.build_parser().parse_args(
        ["--toy", "--patients", "20", "--warmup", "60", "--samples", "60", "--history", str(HISTORY),
         "--json", str(out), "--seed", "3"]))
    s = json.loads(out.read_text())["summary"]
    assert s["patients_fitted"] == 20 and s["complete"] is True
    assert 0.80 <= s["coverage_future_reads_90"] <= 0.99
    assert 0.80 <= s["coverage_parameters_90"] <= 0.99


@pytest.mark.slow
def test_qsp_coverage_script_small_run(tmp_path):
    """The QSP model end to end on two synthetic patients (compiles the NUTS gradient: ~10 min)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import twin_coverage

    out = tmp_path / "cov.json"
    twin_coverage.main(twin_coverage.build_parser().parse_args(
        ["--patients", "2", "--warmup", "15", "--samples", "15", "--predictive-draws", "8",
         "--fit-days", "0", "42", "--future-days", "84", "--json", str(out)]))
    res = json.loads(out.read_text())
    assert res["summary"]["patients_done"] == 2 and res["summary"]["complete"] is True
    for p in res["patients"]:
        assert p["status"] == "fitted" and len(p["future_read_in_90"]) == 2 and len(p["theta_in_90"]) == 6


# ---------------------------------------------------------------------------------------------
# The prior is the screened population; forward-mode gradients; chains start inside the prior
# ---------------------------------------------------------------------------------------------
def test_forward_mode_gradient_gives_the_reverse_mode_gradient_and_the_same_value():
    import jax
    import jax.numpy as jnp

    f = lambda z: jnp.sum(jnp.sin(z)) * jnp.exp(z[0]) + z[1] ** 3
    g = twin.forward_mode_gradient(f)
    z = jnp.asarray([0.3, -1.2, 2.0])
    value, grad = jax.jit(jax.value_and_grad(g))(z)
    np.testing.assert_allclose(float(value), float(f(z)), rtol=1e-15)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(f)(z)), rtol=1e-13)


class _ScreenedToy(twin.ToyTwinSimulator):
    """The toy with a plausibility screen that keeps a draw with z0 > 0 with probability 1/4."""

    def __call__(self, z, schedule, pdl1_multiplier):
        import jax.numpy as jnp

        d, ok, _ = super().__call__(z, schedule, pdl1_multiplier)
        return d, ok, jnp.where(z[0] > 0, math.log(0.25), 0.0)


def test_prior_draws_keep_each_draw_with_the_probability_of_its_screen():
    from qspjax.regimen import compile_schedule, timeline_points

    sim = _ScreenedToy()
    history = load_regimen(HISTORY)
    grid = np.array([0.0, 42.0])
    sched = compile_schedule(history, sim.drugs, grid, 2, timeline_points(history, grid))
    z, d, record = twin.prior_draws(sim, 400, np.random.default_rng(3), sched, 1.0, chunk=64)
    assert z.shape == (400, sim.dim) and d.shape[0] == 400 and record["kept"] == 400
    # kept: P(z0 > 0 | kept) = 0.5 * 0.25 / (0.5 * 0.25 + 0.5) = 0.2; acceptance 0.625 (sd ~0.02 each)
    assert 0.13 < np.mean(z[:, 0] > 0) < 0.27
    assert 0.55 < record["acceptance"] < 0.70


def test_chains_start_at_prior_draws_resampled_by_their_likelihood():
    patient = twin.load_patient(_write(Path(__import__("tempfile").mkdtemp()), GOOD), 200.0)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((50, 3))
    d = np.full((50, patient.n), 80.0)  # far from every read
    d[[7, 21, 33]] = patient.diameter_mm  # these three reproduce the reads
    start = twin.starting_points(z, d, patient, 2, rng)
    rows = {int(np.flatnonzero(np.all(z == s, axis=1))[0]) for s in start}
    assert len(rows) == 2 and rows <= {7, 21, 33}
    # fewer likely draws than chains: the most likely ones repeat
    start = twin.starting_points(z, d, patient, 4, rng)
    assert {int(np.flatnonzero(np.all(z == s, axis=1))[0]) for s in start} <= {7, 21, 33}


def test_batched_nuts_gives_each_patient_the_fit_it_gets_alone(toy):
    """run_nuts_batch (every chain of every patient one vmap member) = run_nuts per patient with the
    same seed: the same keys and starts, so the same draws to rounding (a key or data mix-up between
    members breaks this); patients with another design are refused."""
    history = load_regimen(HISTORY)
    texts = [GOOD, GOOD.replace(",27\n", ",22\n").replace(",25\n", ",19\n")]
    datas = [twin.fit_data(twin.load_patient(_write(Path(__import__("tempfile").mkdtemp()), t), 200.0), history,
                           toy.drugs, 1.0) for t in texts]
    nuts = dict(chains=2, warmup=30, samples=30, max_tree_depth=4)
    batch = twin.run_nuts_batch(toy, datas, [11, 12], **nuts)
    for data, seed, got in zip(datas, [11, 12], batch):
        alone = twin.run_nuts(toy, data, seed=seed, **nuts)
        assert got.z.shape == alone.z.shape == (2, 30, toy.dim)
        np.testing.assert_allclose(got.z, alone.z, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got.num_steps, alone.num_steps)
    assert not np.allclose(batch[0].z, batch[1].z)
    short = twin.fit_data(twin.load_patient(_write(Path(__import__("tempfile").mkdtemp()), GOOD.rsplit("84,", 2)[0]),
                                            200.0), history, toy.drugs, 1.0)
    with pytest.raises(ValueError, match="designs differ"):
        twin.run_nuts_batch(toy, [datas[0], short], [1, 2], **nuts)
