"""Simulation-based calibration machinery (qspjax.inference.sbc, fits/sbc.py).

The rank and uniformity functions are checked on hand-made inputs whose answer is known (uniform
ranks pass; ranks piled at 0 or at both ends fail), the data simulator and the traced-data
likelihood against the problem's own likelihood, and the script end to end with tiny sizes.
The full SBC run is reported in fits/README.md.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qspjax  # noqa: F401
from qspjax.inference.sbc import (
    data_log_likelihood,
    observed_data,
    ranks,
    simulate_data,
    uniformity,
)

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("fits_sbc", REPO / "fits" / "sbc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small():
    return _script().small_problem(80)


def test_rank_counts_draws_below_the_truth():
    draws = np.array([[0.0, 5.0], [1.0, 6.0], [2.0, 7.0], [3.0, 8.0]])
    np.testing.assert_array_equal(ranks([1.5, 4.0], draws), [2, 0])
    np.testing.assert_array_equal(ranks([9.0, 9.0], draws), [4, 4])  # L + 1 = 5 possible ranks: 0..4


def test_uniform_ranks_pass_and_skewed_ranks_fail():
    L = 99
    rng = np.random.default_rng(1)
    uniform = rng.integers(0, L + 1, size=(400, 2))
    out = uniformity(uniform, L, bins=20)
    assert out["passed"] and all(p["chi2_pvalue"] > 0.01 and p["ks_pvalue"] > 0.01 for p in out["parameters"])
    assert sum(out["parameters"][0]["histogram"]) == 400 and math.isclose(sum(out["expected"]), 400)
    # one parameter piled at rank 0 (posterior biased high): that parameter fails, the verdict fails
    piled = uniform.copy()
    piled[:, 1] = rng.integers(0, 10, size=400)
    out = uniformity(piled, L, bins=20)
    assert out["parameters"][0]["passed"] and not out["parameters"][1]["passed"] and not out["passed"]
    assert out["parameters"][1]["chi2_pvalue"] < 1e-10 and out["parameters"][1]["ks_pvalue"] < 1e-10
    # a U shape (posterior too narrow) fails too
    u_shape = np.where(rng.uniform(size=(400, 1)) < 0.5, rng.integers(0, 15, (400, 1)), rng.integers(85, 100, (400, 1)))
    assert not uniformity(u_shape, L, bins=20)["passed"]
    with pytest.raises(ValueError):
        uniformity(np.array([[L + 1]]), L)


def test_traced_data_likelihood_equals_the_problems_likelihood(small):
    theta = jnp.asarray(small.prior_means() + np.array([0.3, -0.2]))
    data = jax.tree_util.tree_map(jnp.asarray, observed_data(small))
    assert math.isclose(float(data_log_likelihood(small, theta, data)), float(small.log_likelihood(theta)),
                        rel_tol=1e-12)


def test_simulated_data_follow_the_predicted_probabilities(small):
    theta = small.prior_means() + np.array([0.3, -0.2])
    pred = small.predict(jnp.asarray(theta))
    rng = np.random.default_rng(0)
    sims = [simulate_data(small, theta, rng) for _ in range(300)]
    counts = np.array([s[0]["counts"] for s in sims])
    responders = np.array([float(s[1]["responders"]) for s in sims])
    pfs = np.array([s[1]["pfs"] for s in sims])
    t0, t1 = small.terms
    # effective sizes: 1 / (1/80 + 1/16) = 13.3 -> 13 for the response terms
    assert t0.response_n == 13 and t1.response_n == 13
    assert np.all(counts.sum(1) == t0.response_n) and np.all(pfs <= np.asarray(t1.pfs_at_risk))
    p = np.clip(np.asarray(pred.response[0, :4]), 1e-9, None)
    n0 = t0.response_n
    np.testing.assert_allclose(counts.mean(0), n0 * p / p.sum(), atol=4 * math.sqrt(n0 * 0.25 / 300) + 1e-9)
    orr = float(pred.response[1, 0] + pred.response[1, 1])
    assert abs(responders.mean() - 13 * orr) < 4 * math.sqrt(13 * orr * (1 - orr) / 300) + 1e-9
    # PFS: one binomial per interval, of the interval's effective number at risk
    q = np.asarray(small.pfs_conditionals(pred, 1))
    m = np.asarray(t1.pfs_at_risk)
    assert q.shape == (2,) and np.all((0 < q) & (q < 1))
    np.testing.assert_array_less(np.abs(pfs.mean(0) - m * q), 4 * np.sqrt(m * 0.25 / 300))


def test_sbc_script_runs_end_to_end(tmp_path):
    script = _script()
    out = tmp_path / "sbc"
    summary = script.main(script.parser().parse_args(
        ["--replicates", "4", "--warmup", "30", "--samples", "20", "--thin", "2", "--bins", "5", "--out", str(out),
         "--quiet"]))
    assert {"sbc.json", "sbc_ranks.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "sbc.json").read_text())
    assert saved["ids"] == ["k_C1_growth", "alpha_tumor"] and saved["n_draws"] == 10
    r = np.asarray(saved["ranks"])
    assert r.shape == (4, 2) and r.min() >= 0 and r.max() <= 10
    assert len(saved["divergences"]) == 4 and len(saved["uniformity"]["parameters"]) == 2
    assert all(0.0 <= p["chi2_pvalue"] <= 1.0 and 0.0 <= p["ks_pvalue"] <= 1.0 for p in saved["uniformity"]["parameters"])
    assert saved["provenance"]["seed"] == 0 and saved["passed"] == summary["passed"]
    assert (out / "sbc_ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
