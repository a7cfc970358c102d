"""Sensitivity analysis: Sobol indices against closed forms, Morris on a linear function, local
sensitivities against finite differences, analysis files refused with the field named, the CLI.

The model-facing tests use the closed-form tumor-kinetics surrogate (``simulator: kinetics``),
as the inference tests do; the QSP model's reverse pass takes minutes to compile, so its
finite-difference check is marked slow.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from qspjax.analysis.sensitivity import (EndpointModel, check_problem, finite_difference_sensitivities, load_analysis,
                                         local_sensitivities, morris_effects, sobol_indices)
from qspjax.errors import QSPValidationError

REPO = Path(__file__).resolve().parents[1]
PI = math.pi


def ishigami(x, a=7.0, b=0.1):
    return np.sin(x[:, 0]) + a * np.sin(x[:, 1]) ** 2 + b * x[:, 2] ** 4 * np.sin(x[:, 0])


def ishigami_indices(a=7.0, b=0.1):
    """Closed-form first-order and total indices of the Ishigami function on [-pi, pi]^3."""
    v1 = 0.5 * (1 + b * PI**4 / 5) ** 2
    v2 = a**2 / 8
    v13 = b**2 * PI**8 * (1 / 18 - 1 / 50)
    var = v1 + v2 + v13
    return np.array([v1, v2, 0.0]) / var, np.array([v1 + v13, v2, v13]) / var


def test_ishigami_closed_form():
    s1, st = ishigami_indices()
    np.testing.assert_allclose(s1, [0.3139, 0.4424, 0.0], atol=1e-4)
    np.testing.assert_allclose(st, [0.5576, 0.4424, 0.2437], atol=1e-4)


def test_sobol_ishigami_matches_closed_form_and_dummy_is_zero():
    problem = {"names": ["x1", "x2", "x3", "dummy"], "bounds": [[-PI, PI]] * 4}
    r = sobol_indices(ishigami, problem, 1024, seed=1, output_names=["ishigami"])
    s1, st = ishigami_indices()
    # 2N = 2048 base points: the estimators' error is ~0.01; tolerance 0.03 on every index
    np.testing.assert_allclose(r.S1[0, :3], s1, atol=0.03)
    np.testing.assert_allclose(r.ST[0, :3], st, atol=0.03)
    assert np.all(r.S1_conf[0, :3] > 0) and np.all(r.S1_conf[0, :3] < 0.1)
    # the closed form lies within the bootstrap intervals (95 %) of the strong indices
    assert np.all(np.abs(r.ST[0, :2] - st[:2]) <= r.ST_conf[0, :2])
    # a parameter the output does not depend on: within its interval of zero
    assert abs(r.S1[0, 3]) <= r.S1_conf[0, 3] + 1e-12 and abs(r.ST[0, 3]) <= r.ST_conf[0, 3] + 1e-12
    assert r.n_evaluations == 2 * 1024 * (4 + 2)
    assert 0 <= r.max_change[0] < 0.05  # convergence N -> 2N
    # indices at N (first half of the rows) differ from those at 2N but agree to the tolerance
    assert not np.allclose(r.S1_half, r.S1)
    np.testing.assert_allclose(r.S1_half[0, :3], s1, atol=0.05)


def test_sobol_two_outputs_and_additive_function():
    # y = x1 + 2 x2 on uniform [0, 1]: S1 = ST = (1, 4) / 5; the second column is constant
    problem = {"names": ["a", "b"], "bounds": [[0, 1], [0, 1]]}
    r = sobol_indices(lambda x: np.stack([x[:, 0] + 2 * x[:, 1], np.ones(len(x))], 1), problem, 512, seed=3)
    np.testing.assert_allclose(r.S1[0], [0.2, 0.8], atol=0.02)
    np.testing.assert_allclose(r.ST[0], [0.2, 0.8], atol=0.02)
    assert r.constant.tolist() == [False, True] and np.all(r.ST[1] == 0)


def test_sobol_additive_with_normal_and_lognormal_inputs():
    # y = a + b + c, a ~ U(0, 1), b ~ N(1, 0.5), c ~ LogN(0, 0.3): S1 = ST = var_i / sum(var)
    problem = {"names": ["a", "b", "c"], "bounds": [[0, 1], [1.0, 0.5], [0.0, 0.3]],
               "dists": ["unif", "norm", "lognorm"]}
    var = np.array([1 / 12, 0.25, (math.exp(0.09) - 1) * math.exp(0.09)])
    r = sobol_indices(lambda x: x.sum(axis=1), problem, 256, seed=0)
    np.testing.assert_allclose(r.S1[0], var / var.sum(), atol=0.03)
    np.testing.assert_allclose(r.ST[0], var / var.sum(), atol=0.03)


def test_sobol_refuses_bad_input():
    problem = {"names": ["a"], "bounds": [[0, 1]]}
    with pytest.raises(QSPValidationError, match="n = 0"):
        sobol_indices(lambda x: x[:, 0], problem, 0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        sobol_indices(lambda x: np.where(x[:, 0] > 0.5, np.nan, x[:, 0]), problem, 8)


@pytest.mark.parametrize("problem, field", [
    ({"names": [], "bounds": []}, "names"),
    ({"names": ["a", "a"], "bounds": [[0, 1], [0, 1]]}, "names"),
    ({"names": ["a", "b"], "bounds": [[0, 1]]}, "bounds"),
    ({"names": ["a"], "bounds": [[1, 1]]}, r"bounds\[0\] \(a\)"),
    ({"names": ["a"], "bounds": [[2, 1]]}, r"bounds\[0\] \(a\)"),
    ({"names": ["a"], "bounds": [[0, math.inf]]}, r"bounds\[0\] \(a\)"),
    ({"names": ["a"], "bounds": [[0, 1]], "dists": ["beta"]}, r"dists\[0\]"),
    ({"names": ["a"], "bounds": [[0, -1]], "dists": ["norm"]}, r"bounds\[0\] \(a\)"),
    ({"names": ["a"], "bounds": [[0, 1]], "groups": ["g"]}, "groups"),
])
def test_check_problem_refuses(problem, field):
    with pytest.raises(QSPValidationError, match=rf"^problem: {field} = "):
        check_problem(problem)


def test_morris_ranks_a_linear_function():
    coef = np.array([10.0, 3.0, 1.0, 0.0])
    problem = {"names": ["big", "mid", "small", "none"], "bounds": [[0, 1]] * 4}
    r = morris_effects(lambda x: x @ coef, problem, trajectories=12, levels=4, seed=2)
    # elementary effects of a linear function are its coefficients exactly, with no spread
    np.testing.assert_allclose(r.mu_star[0], coef, atol=1e-9)
    np.testing.assert_allclose(r.sigma[0], 0.0, atol=1e-9)
    assert [r.names[j] for j in np.argsort(-r.mu_star[0])] == ["big", "mid", "small", "none"]
    assert r.n_evaluations == 12 * 5
    with pytest.raises(QSPValidationError, match="levels = 3"):
        morris_effects(lambda x: x @ coef, problem, trajectories=4, levels=3)


def test_local_sensitivities_closed_form():
    import jax.numpy as jnp

    # y0 = a^2 b^-1 (elasticities 2, -1, 0); y1 = a + b (elasticities a/(a+b), b/(a+b), 0)
    g = lambda p: jnp.stack([p[0] ** 2 / p[1], p[0] + p[1]])
    r = local_sensitivities(g, [2.0, 3.0, 5.0], ["a", "b", "c"], ["y0", "y1"])
    np.testing.assert_allclose(r.sensitivity, [[2, -1, 0], [0.4, 0.6, 0]], atol=1e-12)
    assert [p for p, _ in r.ranked("y0")] == ["a", "b", "c"]
    _, fd = finite_difference_sensitivities(g, [2.0, 3.0, 5.0])
    np.testing.assert_allclose(fd, r.sensitivity, atol=1e-7)
    with pytest.raises(QSPValidationError, match="positive"):
        local_sensitivities(g, [2.0, 0.0, 1.0], ["a", "b", "c"])


# ---------------------------------------------------------------------------------------------
# Analysis files
# ---------------------------------------------------------------------------------------------
TINY = """
model: {simulator: kinetics}
cohort: {patients: 6, seed: 0}
simulation: {days: 84, output_every: 2}
regimens:
  nivo: configs/regimens/nivolumab_240mg_q2w.yaml
  rt_nivo: {experiment: configs/experiments/rt_nivolumab_protocols.yaml, protocol: conc_3x8_nivo}
parameters:
  - {name: k_C_T1, range: [10, 90]}
  - {name: alpha_tumor, range: [0.1, 0.8]}
  - {name: k_C1_growth, quantity: cv, range: [0.1, 0.5], scale: linear}
outputs:
  - {id: orr_nivo, regimen: nivo, endpoint: orr}
  - {id: orr_rt_nivo, regimen: rt_nivo, endpoint: orr}
  - {id: gain, difference: [orr_rt_nivo, orr_nivo]}
  - {id: pfs56, regimen: rt_nivo, endpoint: pfs, day: 56}
  - {id: diam_p0, regimen: rt_nivo, state: tumor_diameter_cm, day: 28, patient: 0, lesion: irradiated}
global: {methods: [sobol, morris], n: 4, batch: 8, num_resamples: 20, morris: {trajectories: 3, levels: 4}}
"""


def write_analysis(tmp_path, text=TINY, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("old, new, field", [
    ("{name: k_C_T1, range: [10, 90]}", "{name: k_C_T1x, range: [10, 90]}", r"parameters\[0\]\.name = 'k_C_T1x'"),
    ("range: [10, 90]", "range: [90, 10]", r"parameters\[0\]\.range = \[90, 10\]"),
    ("range: [10, 90]", "range: [10, 10]", r"parameters\[0\]\.range = \[10, 10\]"),
    ("range: [10, 90]", "range: []", r"parameters\[0\]\.range = \[\]"),
    ("range: [0.1, 0.8]}", "range: [0.0, 0.8]}", r"parameters\[1\]\.range.*lo > 0"),
    ("endpoint: orr}\n  - {id: orr_rt", "endpoint: best}\n  - {id: orr_rt", r"outputs\[0\]\.endpoint = 'best'"),
    ("{id: orr_nivo, regimen: nivo,", "{id: orr_nivo, regimen: pembro,", r"outputs\[0\]\.regimen = 'pembro'"),
    ("difference: [orr_rt_nivo, orr_nivo]", "difference: [orr_rt_nivo, orr_x]", r"outputs\[2\]\.difference = 'orr_x'"),
    ("state: tumor_diameter_cm", "state: cd8_density_per_ul", r"outputs\[4\]\.state = 'cd8_density_per_ul'"),
    ("patient: 0,", "patient: 6,", r"outputs\[4\]\.patient = 6"),
    ("n: 4,", "n: 0,", "global.n = 0"),
    ("n: 4,", "n: -3,", "global.n = -3"),
    ("patients: 6,", "patients: 0,", "cohort.patients = 0"),
    ("protocol: conc_3x8_nivo", "protocol: nope", r"regimens\.rt_nivo\.protocol = 'nope'"),
    ("quantity: cv", "quantity: mean", r"parameters\[2\]\.quantity = 'mean'"),
    ("methods: [sobol, morris]", "methods: [sobol, prcc]", "global.methods"),
    ("levels: 4", "levels: 3", "global.morris.levels = 3"),
    ("{name: alpha_tumor, range: [0.1, 0.8]}", "{name: alpha_tumor, distribution: normal, mean: 0.4, sd: 0.2}",
     r"parameters\[1\]\.sd = 0\.2"),
    ("{name: alpha_tumor, range: [0.1, 0.8]}", "{name: alpha_tumor, distribution: gamma, mean: 0.4, sd: 0.02}",
     r"parameters\[1\]\.distribution = 'gamma'"),
    ("cohort:", "cohorts:", "cohorts"),
])
def test_bad_analysis_files_refused_with_field(tmp_path, old, new, field):
    assert old in TINY
    path = write_analysis(tmp_path, TINY.replace(old, new, 1))
    with pytest.raises(QSPValidationError, match=field) as info:
        load_analysis(path)
    assert str(path) in str(info.value)


def test_bad_analysis_qsp_parameter_names(tmp_path):
    text = TINY.replace("model: {simulator: kinetics}", "model: {simulator: qsp}")
    load_analysis(write_analysis(tmp_path, text.replace("tumor_diameter_cm", "cd8_density_per_ul")))  # fine for qsp
    bad = text.replace("{name: alpha_tumor, range: [0.1, 0.8]}", "{name: k_cl_pembrolizumab, range: [0.1, 0.8]}")
    with pytest.raises(QSPValidationError, match=r"parameters\[1\]\.name = 'k_cl_pembrolizumab'.*pembrolizumab is in no regimen"):
        load_analysis(write_analysis(tmp_path, bad, "b.yaml"))
    with pytest.raises(QSPValidationError, match=r"--n = 1"):
        load_analysis(write_analysis(tmp_path, text, "c.yaml"), n=1)


def test_endpoint_model_common_random_numbers_and_local_vs_fd(tmp_path):
    analysis = load_analysis(write_analysis(tmp_path))
    model = EndpointModel(analysis)
    theta = np.stack([model.nominal(), model.nominal() * [1.5, 1.0, 1.0]])
    y1 = model.evaluate(theta)
    y2 = model.evaluate(theta[::-1])
    # the same cohort for every parameter vector and batch position: identical outputs
    np.testing.assert_array_equal(y1, y2[::-1])
    assert y1.shape == (2, 5) and np.all((y1[:, :2] >= 0) & (y1[:, :2] <= 1))
    np.testing.assert_allclose(y1[:, 2], y1[:, 1] - y1[:, 0], rtol=0, atol=1e-15)
    assert y1[1, 1] > y1[0, 1]  # a faster kill rate raises the response rate
    local = model.local()
    _, fd = finite_difference_sensitivities(model.local_function(local.names), local.params, rel_step=1e-5)
    ok = np.isfinite(fd)
    np.testing.assert_allclose(local.sensitivity[ok], fd[ok], rtol=1e-4, atol=1e-6)
    assert np.nanmax(np.abs(local.sensitivity)) > 0.1  # a check on all-zero gradients would pass vacuously


@pytest.mark.slow
def test_qsp_local_sensitivities_against_finite_differences(tmp_path):
    """The QSP model (growth + treatment, 2 patients, 42 days): reverse mode vs central differences."""
    text = (TINY.replace("model: {simulator: kinetics}", "model: {simulator: qsp}")
            .replace("patients: 6", "patients: 2").replace("days: 84, output_every: 2", "days: 42, output_every: 1")
            .replace("day: 56}", "day: 42}").replace("patient: 0, lesion: irradiated", "patient: 1, lesion: non_irradiated")
            + "local: {parameters: [k_C_T1, k_C1_growth, alpha_tumor, k_cl_nivolumab]}\n")
    model = EndpointModel(load_analysis(write_analysis(tmp_path, text)))
    local = model.local()
    _, fd = finite_difference_sensitivities(model.local_function(local.names), local.params, rel_step=1e-4)
    ok = np.isfinite(fd) & (np.abs(fd) > 1e-6)
    assert ok.sum() >= 4
    np.testing.assert_allclose(local.sensitivity[ok], fd[ok], rtol=2e-2, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def _strict_json(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_cli_end_to_end(tmp_path):
    from qspjax.cli import main

    path = write_analysis(tmp_path)
    out = tmp_path / "out"
    assert main(["sensitivity", str(path), "--out", str(out), "--n", "4", "--seed", "3", "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "indices.csv")))
    for col in ("output", "parameter", "method", "S1", "S1_conf", "ST", "ST_conf", "mu_star", "sigma"):
        assert col in rows[0]
    sobol = [r for r in rows if r["method"] == "sobol"]
    morris = [r for r in rows if r["method"] == "morris"]
    assert len(sobol) == len(morris) == 5 * 3
    assert all(r["mu_star"] == "" and r["sigma"] == "" and r["S1"] != "" for r in sobol)
    assert all(r["S1"] == "" and r["ST"] == "" and r["mu_star"] != "" for r in morris)
    # the kill rate dominates the response rate of nivolumab alone
    orr = {r["parameter"]: float(r["ST"]) for r in sobol if r["output"] == "orr_nivo"}
    assert max(orr, key=orr.get) == "k_C_T1"
    local = list(csv.DictReader(open(out / "local.csv")))
    assert {"output", "parameter", "sensitivity"} <= set(local[0])
    assert len(local) == 5 * 3 and local[0]["rank"] == "1"
    run = _strict_json((out / "run.json").read_text())
    assert run["seed"] == 3 and run["config"]["n"] == 4 and "git_revision" in run and run["versions"]["jax"]
    assert run["results"]["model_evaluations"] == 2 * 4 * (3 + 2) + 3 * 4 + 1
    for name in ("sobol_gain.png", "tornado_gain.png", "sobol_orr_nivo.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a non-empty folder is refused without --overwrite, before any compute
    assert main(["sensitivity", str(path), "--out", str(out), "--quiet"]) == 2
    assert main(["sensitivity", str(path), "--out", str(tmp_path / "o2"), "--n", "0"]) == 2


def test_cli_local_only(tmp_path):
    from qspjax.cli import main

    path = write_analysis(tmp_path)
    out = tmp_path / "local_only"
    assert main(["sensitivity", str(path), "--out", str(out), "--no-global", "--quiet"]) == 0
    assert not (out / "indices.csv").exists() and (out / "local.csv").exists()
    run = _strict_json((out / "run.json").read_text())
    assert run["results"]["model_evaluations"] == 1 and "sobol" not in run["results"]
    # both halves switched off is refused before any output is written
    assert main(["sensitivity", str(path), "--out", str(tmp_path / "none"), "--no-global", "--no-local"]) == 2
    assert not (tmp_path / "none").exists()


def test_shipped_analysis_file_loads():
    a = load_analysis(REPO / "configs/sensitivity/rt_nivolumab_endpoints.yaml")
    assert a.simulator == "qsp" and {"nivolumab", "rt_nivolumab"} <= set(a.regimens)
    assert any(o.difference is not None for o in a.outputs)
    assert a.params_extra and a.params_extra[0].endswith("calibrated/library_params.yaml")
    assert a.population_file.endswith("calibrated/library_population.yaml")


def test_parameters_reach_every_patient(tmp_path):
    """A median factor scales every patient's value (spread kept); a cv factor changes the spread
    (median kept); drug PK and RT factors become every patient's value in the batched model."""
    text = (TINY.replace("model: {simulator: kinetics}", "model: {simulator: qsp}")
            .replace("{name: alpha_tumor, range: [0.1, 0.8]}",
                     "{name: k_cl_nivolumab, range: [0.03, 0.12]}\n  - {name: icd_gain_max, range: [1, 4]}"))
    model = EndpointModel(load_analysis(write_analysis(tmp_path, text)))
    assert [f.id for f in model.analysis.factors] == ["k_C_T1", "k_cl_nivolumab", "icd_gain_max", "k_C1_growth.cv"]
    theta = model.nominal()
    base, _ = model._patients(theta, {})
    v, drug = model._patients(theta * [2.0, 1.5, 1.25, 1.0], {})
    np.testing.assert_allclose(v["k_C_T1"], 2.0 * base["k_C_T1"], rtol=1e-12)
    assert np.ptp(base["k_C_T1"]) > 0  # between-patient spread kept
    wide, _ = model._patients(theta * [1.0, 1.0, 1.0, 2.0], {})
    log_ratio = np.log(wide["k_C1_growth"]) - np.log(base["k_C1_growth"])
    assert np.std(np.log(wide["k_C1_growth"])) > 1.5 * np.std(np.log(base["k_C1_growth"]))
    assert abs(np.median(log_ratio)) < np.max(np.abs(log_ratio))
    models = model.build_models(v, drug)
    np.testing.assert_allclose(models.pk.p["k_cl"][:, 0], 1.5 * theta[1], rtol=1e-12)
    np.testing.assert_allclose(models.rt.p["icd_gain_max"], 1.25 * theta[2], rtol=1e-12)
    np.testing.assert_allclose(models.cancer.p["k_C_T1"], v["k_C_T1"], rtol=1e-12)
    # the local analysis's multipliers reach every patient the same way
    scaled, _ = model._patients(theta, {"k_C_T1": 3.0, "V_Tmin": 2.0})
    np.testing.assert_allclose(scaled["k_C_T1"], 3.0 * base["k_C_T1"], rtol=1e-12)
    np.testing.assert_allclose(scaled["V_Tmin"], 2.0 * model.params.values["V_Tmin"], rtol=1e-12)
