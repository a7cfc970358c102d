"""Posterior-predictive virtual trials (issue 15, item 5): draws -> models, and the mixture interval."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from qspjax.errors import QSPValidationError
from qspjax.inference.predictive import (apply_draw, load_posterior, mixture_interval, posterior_draws,
                                         summarise_draws)
from qspjax.params import load_parameters
from qspjax.vpop import load_population

from conftest import REPO

CAL_PARAMS = REPO / "configs/params/calibrated/advanced_params.yaml"
CAL_POP = REPO / "configs/params/calibrated/advanced_population.yaml"


def _write_posterior(path, chains=2, draws=5, seed=0):
    import arviz as az

    rng = np.random.default_rng(seed)
    post = {"k_C1_growth": np.log(0.03) + 0.1 * rng.standard_normal((chains, draws)),
            "k_C1_growth.sd": np.log(0.25) + 0.1 * rng.standard_normal((chains, draws)),
            "alpha_tumor": np.log(0.4) + 0.1 * rng.standard_normal((chains, draws))}
    path.mkdir(parents=True, exist_ok=True)
    az.from_dict(posterior=post).to_netcdf(str(path / "posterior.nc"))
    return post


def test_a_draw_sets_medians_and_spreads_on_their_natural_scales(tmp_path):
    post = _write_posterior(tmp_path / "post")
    posterior = load_posterior(tmp_path / "post")
    assert posterior.n_draws == 10
    chosen = posterior_draws(posterior, 3)
    assert len(chosen) == 3 and chosen[0]["alpha_tumor"] == pytest.approx(post["alpha_tumor"][0, 0])
    assert chosen[-1]["alpha_tumor"] == pytest.approx(post["alpha_tumor"][1, 4])  # last draw of the last chain
    params, spec = load_parameters(None, [CAL_PARAMS]), load_population(CAL_POP)
    p, s = apply_draw(chosen[1], params, spec)
    assert p.values["k_C1_growth"] == pytest.approx(math.exp(chosen[1]["k_C1_growth"]))
    assert p.values["alpha_tumor"] == pytest.approx(math.exp(chosen[1]["alpha_tumor"]))
    sd = math.exp(chosen[1]["k_C1_growth.sd"])
    assert s.cv["k_C1_growth"] == pytest.approx(math.sqrt(math.expm1(sd * sd)))
    assert s.cv["k_C_T1"] == spec.cv["k_C_T1"]  # not in the posterior: unchanged
    # the inverse of vpop's sd = sqrt(log(1 + cv^2)) gives the draw's sd back
    assert math.sqrt(math.log1p(s.cv["k_C1_growth"] ** 2)) == pytest.approx(sd)


def test_unknown_variables_and_missing_files_are_refused(tmp_path):
    params, spec = load_parameters(None, [CAL_PARAMS]), load_population(CAL_POP)
    with pytest.raises(QSPValidationError, match="posterior.not_a_parameter"):
        apply_draw({"not_a_parameter": 0.0}, params, spec)
    with pytest.raises(QSPValidationError, match=r"posterior.V_LN.sd"):
        apply_draw({"V_LN.sd": 0.0}, params, spec)  # a parameter the population does not vary
    with pytest.raises(QSPValidationError, match="--posterior"):
        load_posterior(tmp_path / "nothing_here")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "posterior.nc").write_text("not netcdf")
    with pytest.raises(QSPValidationError, match="InferenceData"):
        load_posterior(tmp_path / "bad")
    _write_posterior(tmp_path / "good")
    with pytest.raises(QSPValidationError, match="--posterior-draws"):
        posterior_draws(load_posterior(tmp_path / "good"), 0)


def test_one_draw_gives_the_jeffreys_interval_and_spread_draws_widen_it():
    one = mixture_interval([5], [10], samples_per_draw=200_000)
    lo, hi = stats.beta.ppf([0.025, 0.975], 5.5, 5.5)
    assert one["lower"] == pytest.approx(lo, abs=3e-3) and one["upper"] == pytest.approx(hi, abs=3e-3)
    assert one["mean"] == pytest.approx(5.5 / 11)
    # two parameter values predicting 20 % and 80 % on 100 patients each: the mixture spans both
    two = mixture_interval([20, 80], [100, 100], samples_per_draw=50_000)
    assert two["lower"] < 0.2 < 0.8 < two["upper"] and two["mean"] == pytest.approx(0.5, abs=1e-9)
    each = mixture_interval([20], [100], samples_per_draw=50_000)
    assert two["upper"] - two["lower"] > 3 * (each["upper"] - each["lower"])
    # a draw where every patient failed is left out and counted, never a NaN
    gone = mixture_interval([3, 0], [10, 0])
    assert gone["draws"] == 1 and gone["draws_without_patients"] == 1
    assert mixture_interval([0], [0])["mean"] is None


def test_summaries_of_draws_become_rates_with_intervals():
    per_draw = [{"n_evaluated": 20, "orr": 0.25, "dcr": 0.5, "cr": 0.05, "pr": 0.2, "sd": 0.25, "pd": 0.5},
                {"n_evaluated": 20, "orr": 0.35, "dcr": 0.6, "cr": 0.05, "pr": 0.3, "sd": 0.25, "pd": 0.4}]
    out = summarise_draws(per_draw)
    assert out["orr"]["per_draw"] == [0.25, 0.35] and out["orr"]["draws"] == 2
    assert out["orr"]["mean"] == pytest.approx(np.mean([5.5 / 21, 7.5 / 21]))
    assert out["orr"]["lower"] < 0.25 and out["orr"]["upper"] > 0.35
    json.dumps(out, allow_nan=False)


@pytest.mark.slow
def test_trial_with_a_posterior_reports_credible_intervals(tmp_path):
    from qspjax.cli import main

    _write_posterior(tmp_path / "post", chains=1, draws=2)
    out = tmp_path / "trial"
    rc = main(["trial", "--regimen", str(REPO / "configs/regimens/nivolumab_240mg_q2w.yaml"), "--patients", "3",
               "--days", "30", "--output-every", "7", "--posterior", str(tmp_path / "post"),
               "--posterior-draws", "2", "--out", str(out)])
    assert rc == 0
    pp = json.loads((out / "summary.json").read_text())["posterior_predictive"]
    assert pp["draws"] == 2 and len(pp["orr"]["per_draw"]) == 2
    assert 0.0 <= pp["orr"]["lower"] <= pp["orr"]["mean"] <= pp["orr"]["upper"] <= 1.0
