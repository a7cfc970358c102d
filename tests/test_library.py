"""The library route of Bayesian inference (qspjax.inference.library): importance weights, the
reweighted likelihood against likelihood.py, NUTS output the posterior-predictive reader accepts,
and refusal of libraries that do not fit the run. Synthetic libraries (fake per-patient
probabilities, no ODE) except one opt-in test that simulates a tiny real library."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspjax.errors import QSPValidationError
from qspjax.inference import library as L
from qspjax.inference.config import LikelihoodSettings, load_priors

from conftest import REPO

ARMS = ("NCT02444741:pembro", "NCT03644823:atezo_sbrt")
SETTINGS = LikelihoodSettings(patients=8, seed=0, horizon_days=190.0, output_every_days=7.0, rtol=1e-4,
                              temperature=0.1, assessment_interval_days=56.0)


@pytest.fixture(scope="module")
def setup():
    from qspjax.data import load_trials
    from qspjax.params import load_parameters
    from qspjax.vpop import load_population

    params, spec = load_parameters(), load_population()
    priors = load_priors(REPO / "configs/inference/priors_library.yaml", spec.names)
    trials = load_trials()
    arms = [trials.get_arm(a) for a in ARMS]
    return params, spec, priors, arms


def fake_library(setup, n=40, seed=0, tmp=None, arm_ids=ARMS) -> L.Library:
    """A library of ``n`` proposal patients per arm with made-up outcome probabilities that depend
    smoothly on the patients' log values (no ODE solve)."""
    params, spec, priors, arms = setup
    rng = np.random.default_rng(seed)
    arms = [a for a in arms if a.arm_id in arm_ids]
    t0 = L.arm_template(arms[0], priors, params, spec, SETTINGS, L.arm_horizon(arms[0], SETTINGS.horizon_days))
    proposal = L.default_proposal(t0)
    libs = []
    for arm in arms:
        t = L.arm_template(arm, priors, params, spec, SETTINGS, L.arm_horizon(arm, SETTINGS.horizon_days))
        x = np.asarray(proposal.loc) + np.asarray(proposal.scale) * rng.standard_normal((n, len(proposal.names)))
        score = 1.0 / (1.0 + np.exp(-(x - np.asarray(proposal.loc)) @ np.linspace(-1, 1, x.shape[1])))
        resp = np.stack([0.1 * score, 0.4 * score, 0.5 * (1 - score), 0.5 * (1 - score), 0 * score], 1)
        e = len(t.assessment_days)
        pfs = np.cumprod(np.concatenate([np.ones((n, 1)), np.tile((0.6 + 0.35 * score)[:, None], (1, e - 1))], 1), 1)
        libs.append(L.ArmLibrary(arm.arm_id, t.settings.horizon_days, x, proposal.log_density(x), resp, pfs,
                                 np.ones(n, bool), np.ones(n, bool), np.zeros(n, int), np.asarray(t.assessment_days),
                                 np.zeros((n, 0))))
    meta = {"format": L.LIBRARY_FORMAT, "arm_ids": [a.arm_id for a in arms], "proposal": proposal.as_dict(),
            "settings_key": "test", "likelihood": dataclasses.asdict(SETTINGS), "seed": seed}
    lib = L.Library(tuple(libs), meta, "")
    if tmp is not None:
        from qspjax.io import atomic_write_json

        for a in libs:
            L._write_arm(L.arm_file(tmp, a.arm_id), a, "test")
        atomic_write_json(tmp / L.SIDECAR, meta)
        lib.path = str(tmp)
    return lib


def model_of(setup, lib, mc_error=True):
    params, spec, priors, arms = setup
    arms = [a for a in arms if a.arm_id in lib.arm_ids]
    return L.LibraryModel(lib, arms, priors, params, spec, SETTINGS, mc_error=mc_error)


def theta_at_proposal(model) -> np.ndarray:
    """theta whose population is the proposal: medians at its centres, sds at its scales."""
    prop = model.library.proposal()
    theta = np.zeros(len(model.ids))
    for k, name in enumerate(prop.names):
        theta[model.ids.index(name)] = prop.loc[k]
        theta[model.ids.index(f"{name}.sd")] = math.log(prop.scale[k])
    return theta


def test_weights_are_uniform_when_theta_is_the_proposal(setup):
    model = model_of(setup, fake_library(setup, n=30))
    for w in model.weights(jnp.asarray(theta_at_proposal(model))):
        np.testing.assert_allclose(np.asarray(w), 1.0 / 30, rtol=1e-10)
    np.testing.assert_allclose(model.ess(theta_at_proposal(model)), 30.0, rtol=1e-10)


def test_reweighted_mean_matches_direct_monte_carlo():
    # proposal N(0, 2^2), target N(0.5, 1): E[x^2] = 1.25, E[sigmoid(x)] by direct sampling
    rng = np.random.default_rng(1)
    prop = L.Proposal(("a",), (0.0,), (2.0,))
    x = 2.0 * rng.standard_normal((200_000, 1))
    w = L.self_normalised_weights(L.log_target_density(jnp.asarray(x), jnp.asarray([0.5]), jnp.log(jnp.asarray([1.0]))),
                                  jnp.asarray(prop.log_density(x)), jnp.ones(len(x), bool))
    assert float(w @ jnp.asarray(x[:, 0] ** 2)) == pytest.approx(1.25, abs=0.03)
    direct = np.mean(1 / (1 + np.exp(-(0.5 + rng.standard_normal(200_000)))))
    assert float(w @ jnp.asarray(1 / (1 + np.exp(-x[:, 0])))) == pytest.approx(direct, abs=0.005)


def test_kish_ess():
    assert float(L.kish_ess(jnp.ones(10) / 10)) == pytest.approx(10.0)
    assert float(L.kish_ess(jnp.asarray([1.0, 0, 0, 0]))) == pytest.approx(1.0)
    w = jnp.asarray([0.5, 0.25, 0.25])
    assert float(L.kish_ess(w)) == pytest.approx(1.0 / (0.25 + 0.0625 + 0.0625))
    assert float(L.kish_ess(3 * w)) == pytest.approx(float(L.kish_ess(w)))  # scale-free
    # an unusable patient gets weight 0 and leaves the ESS
    ws = L.self_normalised_weights(jnp.zeros(4), jnp.zeros(4), jnp.asarray([True, True, True, False]))
    np.testing.assert_allclose(np.asarray(ws), [1 / 3, 1 / 3, 1 / 3, 0.0])


def test_uniform_weights_reproduce_likelihood_py(setup):
    """Without the Monte-Carlo term and with uniform weights, each arm's log-likelihood is the one
    Problem.arm_log_likelihoods gives for the plain cohort mean (virtual_cohort_error=False)."""
    from qspjax.inference.likelihood import Prediction

    lib = fake_library(setup, n=25)
    model = model_of(setup, lib, mc_error=False)
    theta = jnp.asarray(theta_at_proposal(model))
    ours = np.asarray(model.arm_log_likelihoods(model.predict(theta)))
    for i, (t, a) in enumerate(zip(model.templates, lib.arms)):
        pred = Prediction(jnp.asarray(a.response.mean(0))[None], jnp.asarray(a.pfs.mean(0))[None], jnp.ones(1))
        ref = float(t.arm_log_likelihoods(pred)[0])
        assert ours[i] == pytest.approx(ref, rel=1e-10, abs=1e-9)
    # with the Monte-Carlo term at theta's ESS every size is 1/(1/n + 1/ESS)
    wide = model_of(setup, lib, mc_error="ess")
    for t, sizes in zip(wide.templates, wide.effective_sizes([25.0, 25.0])):
        n = t.terms[0].response_n
        assert sizes["response_n"] == pytest.approx(1 / (1 / n + 1 / 25.0))
        m = np.asarray(t.terms[0].pfs_at_risk, float)
        assert np.all(np.asarray(sizes["pfs_at_risk"]) < m)


def test_fixed_monte_carlo_term_is_whole_patients_and_independent_of_theta(setup):
    model = model_of(setup, fake_library(setup, n=20), mc_error="fixed")
    assert model.fixed_ess.shape == (2,) and np.all((model.fixed_ess >= 1) & (model.fixed_ess <= 20))
    a = model.effective_sizes([1.0, 1.0])
    b = model.effective_sizes([20.0, 20.0])
    for x, y in zip(a, b):
        assert x["response_n"] == y["response_n"] == round(x["response_n"])
        np.testing.assert_array_equal(x["pfs_at_risk"], y["pfs_at_risk"])
    with pytest.raises(QSPValidationError, match="mc_error"):
        model_of(setup, fake_library(setup, n=5), mc_error="sometimes")


def test_simulated_data_have_the_observed_layout(setup):
    model = model_of(setup, fake_library(setup, n=20))
    obs = model.observed_data()
    sim = model.simulate_data(model.prior_means(), np.random.default_rng(0))
    for o, s in zip(obs, sim):
        assert set(o) == set(s)
        for k in o:
            assert np.shape(o[k]) == np.shape(s[k])
            assert np.all((np.asarray(s[k]) >= 0) & (np.asarray(s[k]) <= 1))
    assert np.isfinite(float(model.log_posterior(jnp.asarray(model.prior_means()))))


@pytest.mark.slow  # ~40 s; the committed fits/posterior is read by a fast test
def test_nuts_writes_a_posterior_the_predictive_reader_accepts(setup, tmp_path):
    from qspjax.inference.predictive import apply_draw, load_posterior, posterior_draws

    params, spec, _, _ = setup
    model = model_of(setup, fake_library(setup, n=20))
    mcmc = L.run_nuts(model, jax.random.PRNGKey(0), chains=2, warmup=20, samples=20, max_tree_depth=3)
    summary = L.write_posterior(tmp_path, mcmc, model, {"test": True}, check_draws=5)
    for key in ("rhat_max", "ess_bulk_min", "divergences", "weight_ess", "predictive_orr"):
        assert key in summary
    assert set(summary["weight_ess"]["per_arm"]) == set(ARMS)
    post = load_posterior(tmp_path)
    assert set(post.draws) == set(model.ids) and post.n_draws == 40
    for draw in posterior_draws(post, 3):
        p, s = apply_draw(draw, params, spec)
        assert p.values["k_C_T1"] == pytest.approx(math.exp(draw["k_C_T1"]))
        assert s.cv["alpha_tumor"] == pytest.approx(math.sqrt(math.expm1(math.exp(draw["alpha_tumor.sd"]) ** 2)))
    assert (tmp_path / "run.json").is_file()


def test_library_round_trip_and_refusals(setup, tmp_path):
    params, spec, priors, arms = setup
    lib = fake_library(setup, n=10, tmp=tmp_path)
    back = L.load_library(tmp_path)
    assert back.arm_ids == ARMS
    np.testing.assert_array_equal(back.arms[1].response, lib.arms[1].response)
    # an arm the library was not built for
    with pytest.raises(QSPValidationError, match=r"library\.json: arm_ids = 'NCT03223155:expansion'"):
        L.load_library(tmp_path, ["NCT03223155:expansion"])
    # a model over a different arm set
    with pytest.raises(QSPValidationError, match="arm_ids"):
        L.LibraryModel(back, arms[:1], priors, params, spec, SETTINGS)
    # a library folder without its sidecar
    with pytest.raises(QSPValidationError, match=r"library\.json: \(file\)"):
        L.load_library(tmp_path / "nowhere")
    # a missing arm file
    L.arm_file(tmp_path, ARMS[0]).unlink()
    with pytest.raises(QSPValidationError, match=r"NCT02444741_pembro\.npz: \(file\).*missing"):
        L.load_library(tmp_path)
    # an arm file built with other settings
    L._write_arm(L.arm_file(tmp_path, ARMS[0]), lib.arms[0], "other")
    with pytest.raises(QSPValidationError, match="settings_key"):
        L.load_library(tmp_path)
    # priors over other parameters than the library's proposal
    from qspjax.inference.config import Prior, PriorSet

    other = PriorSet((Prior("k_T1", "k_T1", "median", None, 1.0),))
    with pytest.raises(QSPValidationError, match="proposal.names"):
        L.LibraryModel(lib, arms, other, params, spec, SETTINGS)


@pytest.mark.slow  # ~15 s of surrogate solves
def test_kinetics_library_builds_and_resumes(setup, tmp_path, capsys):
    params, spec, priors, arms = setup
    lib = L.build_library(tmp_path, arms, priors, params, spec, SETTINGS, 6, 3, 190.0, "kinetics", progress=True)
    assert [len(a) for a in lib.arms] == [6, 6]
    again = L.build_library(tmp_path, arms, priors, params, spec, SETTINGS, 6, 3, 190.0, "kinetics", progress=True)
    assert "kept" in capsys.readouterr().out
    np.testing.assert_array_equal(again.arms[0].pfs, lib.arms[0].pfs)
    model = L.LibraryModel(L.load_library(tmp_path), arms, priors, params, spec)
    assert np.isfinite(float(model.log_posterior(jnp.asarray(model.prior_means()))))
    # an arm whose regimen changed since its file was built is rebuilt, the other kept
    changed = dataclasses.replace(arms[0], regimen=dict(arms[0].regimen, name="changed"))
    L.build_library(tmp_path, [changed, arms[1]], priors, params, spec, SETTINGS, 6, 3, 190.0, "kinetics", progress=True)
    out = capsys.readouterr().out
    assert f"{arms[0].arm_id}: rebuilding" in out and "arm_digest" in out and f"{arms[1].arm_id}: kept" in out


def test_arm_digest_follows_the_regimen_and_the_matched_baseline(setup):
    _, _, _, arms = setup
    arm = arms[0]
    assert L.arm_digest(arm) == L.arm_digest(dataclasses.replace(arm))
    assert L.arm_digest(dataclasses.replace(arm, regimen=dict(arm.regimen, name="other"))) != L.arm_digest(arm)
    assert L.arm_digest(dataclasses.replace(arm, setting="early_stage")) != L.arm_digest(arm)


@pytest.mark.slow
def test_tiny_real_library(setup, tmp_path):
    """Three patients through the ODE on a short horizon: growth, screening, treatment, outcomes."""
    params, spec, priors, arms = setup
    settings = dataclasses.replace(SETTINGS, horizon_days=60.0)
    lib = L.build_library(tmp_path, arms[:1], priors, params, spec, settings, 3, 0, 60.0, "qsp", chunk=3)
    a = lib.arms[0]
    assert len(a) == 3 and a.solved.all()
    np.testing.assert_allclose(a.response.sum(1), 1.0, atol=1e-9)
    assert np.all(a.pfs[:, 0] == 1.0)


def test_libraries_of_other_seeds_merge(setup, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fake_library(setup, n=10, seed=0, tmp=a)
    fake_library(setup, n=7, seed=1, tmp=b)
    merged = L.load_library([a, b])
    assert [len(x) for x in merged.arms] == [17, 17]
    assert merged.meta["seed"] == [0, 1]
    with pytest.raises(QSPValidationError, match="different seeds"):
        L.load_library([a, a])


def test_committed_posterior_is_readable_by_the_predictive_machinery():
    # The shipped library-route posterior (fits/posterior) in the layout `qspjax trial --posterior` reads.
    from qspjax.inference.predictive import load_posterior, posterior_draws

    post = load_posterior(REPO / "fits/posterior")
    ids = {"k_C1_growth", "k_C_T1", "q_T1_T_in", "n_T1_clones", "alpha_tumor"}
    potency = {"blockade_emax_PD1", "blockade_emax_PDL1", "blockade_emax_CTLA4"}
    assert ids | {f"{i}.sd" for i in ids} | potency == set(post.draws)
    import json

    summary = json.loads((REPO / "fits/posterior/summary.json").read_text())
    assert summary["chains"] >= 4 and post.n_draws == summary["chains"] * summary["samples_per_chain"]
    assert all(np.all(np.isfinite(v)) for v in post.draws.values())
    draws = posterior_draws(post, 4)
    assert len(draws) == 4


# ---------------------------------------------------------------------------------------------
# Per-target potency (blockade_emax_<target>) as reweighted parameters
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def potency_setup():
    from qspjax.data import load_trials
    from qspjax.params import load_parameters
    from qspjax.vpop import load_population

    params = load_parameters(None, (REPO / "configs/params/potency_nominal.yaml",))
    spec = load_population(REPO / "configs/inference/population_potency.yaml")
    priors = load_priors(REPO / "configs/inference/priors_potency.yaml", spec.names)
    trials = load_trials()
    return params, spec, priors, [trials.get_arm(a) for a in ARMS]


def test_potency_relevance_follows_the_arms_antibodies(potency_setup):
    from qspjax.data import load_trials

    params, _, priors, _ = potency_setup
    names = L.reweighted_parameters(priors)
    trials = load_trials()

    def relevant(arm_id):
        mask = L.relevant_parameters(trials.get_arm(arm_id), names, params)
        return {n for n, m in zip(names, mask) if m and n.startswith(L.POTENCY_PREFIX)}

    assert relevant("NCT02444741:pembro") == {"blockade_emax_PD1"}
    assert relevant("NCT03644823:atezo_sbrt") == {"blockade_emax_PDL1"}
    assert relevant("NCT02888743:durva_treme") == {"blockade_emax_PDL1", "blockade_emax_CTLA4"}
    assert relevant("NCT02125461:crt_placebo") == set()  # chemoradiation alone: no antibody
    # the QSP-IO parameters are relevant to every arm
    assert all(L.relevant_parameters(trials.get_arm("NCT02125461:crt_placebo"), names, params)[:5])


def test_an_irrelevant_potency_leaves_the_weights_unchanged(potency_setup):
    """Moving the PD-L1 potency changes the atezolizumab arm's weights and not the pembrolizumab
    arm's (and vice versa); the masked weights equal those of the proposal's marginal."""
    lib = fake_library(potency_setup, n=40, seed=2)
    model = model_of(potency_setup, lib)
    theta = jnp.asarray(model.prior_means())
    i_pd1, i_pdl1 = model.ids.index("blockade_emax_PD1"), model.ids.index("blockade_emax_PDL1")
    w0 = model.weights(theta)
    w_pdl1 = model.weights(theta.at[i_pdl1].add(1.0))
    w_pd1 = model.weights(theta.at[i_pd1].add(1.0))
    np.testing.assert_array_equal(np.asarray(w_pdl1[0]), np.asarray(w0[0]))  # pembrolizumab arm
    assert np.max(np.abs(np.asarray(w_pdl1[1]) - np.asarray(w0[1]))) > 1e-3  # atezolizumab arm moves
    np.testing.assert_array_equal(np.asarray(w_pd1[1]), np.asarray(w0[1]))
    assert np.max(np.abs(np.asarray(w_pd1[0]) - np.asarray(w0[0]))) > 1e-3
    # direct computation on the relevant dimensions only (pembrolizumab arm: all but PD-L1 and CTLA-4)
    prop = lib.proposal()
    keep = [k for k, n in enumerate(prop.names) if n not in ("blockade_emax_PDL1", "blockade_emax_CTLA4")]
    loc, log_sd = model._loc_log_sd(theta)
    x = lib.arms[0].log_values[:, keep]
    marginal = L.Proposal(tuple(prop.names[k] for k in keep), tuple(prop.loc[k] for k in keep),
                          tuple(prop.scale[k] for k in keep))
    direct = L.self_normalised_weights(L.log_target_density(jnp.asarray(x), loc[jnp.asarray(keep)],
                                                            log_sd[jnp.asarray(keep)]),
                                       jnp.asarray(marginal.log_density(x)), jnp.ones(len(x), bool))
    np.testing.assert_allclose(np.asarray(w0[0]), np.asarray(direct), rtol=1e-10, atol=1e-15)


def test_posterior_proposal():
    base = L.Proposal(("a", "b"), (0.0, 1.0), (2.0, 3.0))
    rng = np.random.default_rng(0)
    draws = {"a": 0.5 + 0.2 * rng.standard_normal(4000), "a.sd": np.log(0.4) + 0.1 * rng.standard_normal(4000)}
    p = L.posterior_proposal(draws, base, inflate=1.5)
    assert p.names == base.names
    assert p.loc[0] == pytest.approx(np.mean(draws["a"]))
    s_b = math.exp(np.mean(draws["a.sd"]) + np.std(draws["a.sd"]))
    assert p.scale[0] == pytest.approx(1.5 * math.sqrt(np.var(draws["a"]) + s_b ** 2))
    assert (p.loc[1], p.scale[1]) == (1.0, 3.0)  # no draws: the base proposal's entry
    with pytest.raises(QSPValidationError, match="inflate"):
        L.posterior_proposal(draws, base, inflate=0.0)


def test_endpoint_table_reads_cr_and_pfs_as_the_likelihood_does(setup):
    model = model_of(setup, fake_library(setup, n=30, seed=4))
    theta = np.asarray(model.prior_means())
    rows = L.endpoint_table(model, theta[None, :], n_draws=1)
    w = model.weights(jnp.asarray(theta))
    pred = model.predict(jnp.asarray(theta))
    for i, (row, arm, lib, t) in enumerate(zip(rows, model.arms, model.library.arms, model.templates)):
        assert row["arm_id"] == arm.arm_id
        if arm.response_counts is not None:
            assert row["cr"]["predicted_pct"] == pytest.approx(100 * float(w[i] @ jnp.asarray(lib.response[:, 0])))
            assert row["cr"]["observed_pct"] == pytest.approx(100 * arm.response_counts[0] / sum(arm.response_counts))
        assert len(row["pfs"]) == len(arm.pfs_days)
        for j, p in enumerate(row["pfs"]):
            assert p["predicted_pct"] == pytest.approx(100 * float(t.landmark_pfs(pred[i][0], 0)[j]))
            assert p["observed_ci"][0] <= p["observed_pct"] <= p["observed_ci"][1]
            assert p["inside_ci"] == (p["observed_ci"][0] <= p["predicted_pct"] <= p["observed_ci"][1])
    tally = L.endpoint_tally(rows)
    assert tally["cr"]["arms"] == sum(r["cr"] is not None for r in rows)
    assert tally["cr"]["inside_ci"] == sum(r["cr"]["inside_ci"] for r in rows if r["cr"] is not None)


def test_response_read_follows_what_the_trial_reports():
    from qspjax.data import load_trials
    from qspjax.outcomes import SD_MIN_DAYS

    trials = load_trials()
    grid = np.arange(0.0, 421.0, 7.0)
    pacific = L.response_read(trials.get_arm("NCT02125461:crt_placebo"), grid)
    assert pacific.origin_day == 56.0 and pacific.read_days is None  # baseline at randomisation (day 53)
    neo = L.response_read(trials.get_arm("NCT02904954:durva"), grid)  # durvalumab, then surgery
    assert neo.origin_day == 0.0 and neo.sd_min_days == 0.0 and len(neo.read_days) == 1
    assert "before surgery" in neo.rule and neo.read_days[0] < 57.0
    fixed = L.response_read(trials.get_arm("NCT02221739:rt_ipi"), grid)  # orr_assessment_months 2.9
    assert fixed.read_days == pytest.approx((2.9 * 30.4375,)) and fixed.sd_min_days == SD_MIN_DAYS
    best = L.response_read(trials.get_arm("NCT02444741:pembro"), grid)
    assert (best.origin_day, best.read_days) == (0.0, None)


def test_library_reads_the_response_from_the_origin(setup, tmp_path):
    """The stored P(CR, PR, SD, PD, NE) of an arm with a later outcome origin are the smooth best
    response of the course from that origin on, not from day 0."""
    from qspjax.data import load_trials
    from qspjax.inference.simulators import KineticsSimulator
    from qspjax.outcomes import soft_best_response_probabilities

    params, spec, priors, _ = setup
    arm = load_trials().get_arm("NCT02125461:crt_placebo")
    t = L.arm_template(arm, priors, params, spec, SETTINGS, 190.0)
    prop = L.default_proposal(t)
    cand = L.draw_patients(t, arm, prop, 6, seed=0)
    read = L.response_read(arm, t.output_days)
    _, out = L.simulate_patients(t, cand, 6, "kinetics", read=read)
    sim = KineticsSimulator(params)
    schedule = jax.tree_util.tree_map(lambda x: x[0], t.schedules)
    diam, ok = sim.arm(sim.prepare({k: jnp.asarray(v) for k, v in cand["values"].items()},
                                   {k: jnp.asarray(v) for k, v in cand["baseline"].items()}), schedule)
    days = np.asarray(t.output_days)
    i0 = int(np.argmin(np.abs(days - read.origin_day)))
    assert i0 > 0
    kw = dict(temperature=SETTINGS.temperature, assessment_interval_days=SETTINGS.assessment_interval_days)
    want = soft_best_response_probabilities(days[i0:], diam[..., i0:], t.target_mask, ok, **kw)
    from_day0 = soft_best_response_probabilities(days, diam, t.target_mask, ok, **kw)
    np.testing.assert_allclose(out["response"], np.asarray(want), atol=1e-12)
    assert np.max(np.abs(np.asarray(from_day0) - np.asarray(want))) > 1e-3  # the origin matters here


def test_fixed_monte_carlo_size_can_come_from_a_pilot_posterior(setup):
    lib = fake_library(setup, n=40, seed=5)
    model = model_of(setup, lib)
    draws = np.asarray(model.prior_means())[None, :] + 0.05 * np.random.default_rng(0).standard_normal((20, len(model.ids)))
    m = model.median_ess(draws)
    assert m.shape == (2,) and np.all((m >= 1) & (m <= 40))
    params, spec, priors, arms = setup
    given = L.LibraryModel(lib, arms, priors, params, spec, SETTINGS, mc_error="fixed", fixed_ess=[30.0, 12.0])
    np.testing.assert_array_equal(given.fixed_ess, [30.0, 12.0])
    sizes = given.effective_sizes(None)
    n = sizes[0]["response_n"]
    assert n == float(round(1.0 / (1.0 / given._data_sizes[0]["response_n"] + 1.0 / 30.0)))
    with pytest.raises(QSPValidationError, match="fixed_ess"):
        L.LibraryModel(lib, arms, priors, params, spec, SETTINGS, mc_error="fixed", fixed_ess=[30.0])


@pytest.mark.slow  # surrogate library, then ~2 starts and short profiles of 10 quantities
def test_diagnostics_write_a_waterfall_and_profiles(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(REPO))
    from fits import library as script

    common = ["--arms", *ARMS, "--simulator", "kinetics", "--horizon-cap", "190", "--seed", "3"]
    script.main(script.parser().parse_args(["--build", "--patients", "12", "--out", str(tmp_path / "lib"), "--quiet",
                                            *common]))
    doc = script.main(script.parser().parse_args(["--library", str(tmp_path / "lib"), "--diagnostics", "--multistart",
                                                  "2", "--profile-points", "2", "--profile-step", "0.5", "--out",
                                                  str(tmp_path / "diag"), "--quiet", *common]))
    out = tmp_path / "diag"
    for name in ("starts.csv", "waterfall.png", "best_starts.png", "profiles.csv", "profiles.json", "diagnostics.json"):
        assert (out / name).stat().st_size > 0, name
    assert doc["multistart"]["starts"] == 2 and len(doc["profiles"]) == 10
    profiles = json.loads((out / "profiles.json").read_text())
    # every profile point is at or above the minimum it is measured from
    assert all(p["max_delta"] >= -1e-6 for p in profiles["parameters"].values())


# ---------------------------------------------------------------------------------------------
# Pathology at surgery (pCR / MPR)
# ---------------------------------------------------------------------------------------------
PATH_ARM = "NCT03694236:crt_durva"  # neoadjuvant chemoradiation + durvalumab: pCR 40.7 %, MPR 74.1 %


def test_pathology_categories_follow_the_recist_of_pathology():
    v = np.array([[5e-4, np.nan], [0.05, np.nan], [0.10, np.nan], [0.5, np.nan], [np.nan, np.nan], [1e-4, np.nan],
                  [1e-4, 0.3]])
    ok = np.array([True, True, True, True, True, False, True])
    c = L.pathology_categories(v, ok)
    np.testing.assert_array_equal(c[:4], [[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]])  # 10 % viable is MPR
    assert np.isnan(c[4]).all()  # not resected: no category
    np.testing.assert_array_equal(c[5], [0, 0, 0])  # failed solve: finite, never weighted
    np.testing.assert_array_equal(c[6], [0, 0, 1])  # two resected lesions: the most viable decides


@pytest.fixture(scope="module")
def path_setup(setup):
    from qspjax.data import load_trials

    params, spec, priors, arms = setup
    return params, spec, priors, [load_trials().get_arm(PATH_ARM)]


def _with_pathology(lib, rng):
    """``lib`` with made-up pathology categories that depend on the patients' first log value."""
    arms = []
    for a in lib.arms:
        u = 1.0 / (1.0 + np.exp(-(a.log_values[:, 0] - a.log_values[:, 0].mean())))
        cat = np.where(u[:, None] > np.array([[0.6, 0.3]]), 1.0, 0.0)
        path = np.stack([cat[:, 0], cat[:, 1] - cat[:, 0], 1.0 - cat[:, 1]], 1)
        arms.append(dataclasses.replace(a, pathology=path))
    return dataclasses.replace(lib, arms=tuple(arms))


def test_pathology_term_is_one_multinomial_of_the_reweighted_categories(path_setup, tmp_path):
    from qspjax.inference.likelihood import multinomial_logpmf

    params, spec, priors, arms = path_setup
    lib = fake_library(path_setup, n=40, seed=2, arm_ids=(PATH_ARM,))
    assert lib.arms[0].pathology is None
    without = L.LibraryModel(lib, arms, priors, params, spec, SETTINGS, fixed_ess=[20.0])
    assert without.pathology_omitted == [PATH_ARM] and "pathology" not in without.observed_data()[0]
    lib_p = _with_pathology(lib, np.random.default_rng(0))
    model = L.LibraryModel(lib_p, arms, priors, params, spec, SETTINGS, fixed_ess=[20.0])
    assert model.pathology_omitted == []
    arm = arms[0]
    n = arm.n
    k_pcr, k_mpr = math.floor(0.407 * n + 0.5), math.floor(0.741 * n + 0.5)
    np.testing.assert_allclose(model.observed_data()[0]["pathology"] * n, [k_pcr, k_mpr - k_pcr, n - k_mpr])
    theta = jnp.asarray(np.asarray(model.prior_means()) + 0.2)
    w = model.weights(theta)[0]
    pred = model.predict(theta)[0]
    np.testing.assert_allclose(np.asarray(pred.pathology), np.asarray(w @ jnp.asarray(lib_p.arms[0].pathology)))
    assert float(jnp.sum(pred.pathology)) == pytest.approx(1.0)
    # the arm's log-likelihood gains exactly the multinomial at the Monte-Carlo-limited size
    m = round(1.0 / (1.0 / n + 1.0 / 20.0))
    assert model.effective_sizes([None])[0]["pathology_n"] == m
    counts = np.array([k_pcr, k_mpr - k_pcr, n - k_mpr]) / n * m
    extra = float(multinomial_logpmf(counts, pred.pathology)) + 2.0 * math.log(m / n)
    gained = float(model.arm_log_likelihoods(model.predict(theta))[0]
                   - without.arm_log_likelihoods(without.predict(theta))[0])
    assert gained == pytest.approx(extra, rel=1e-10)
    # the gradient flows through the weights into the pathology term
    g = jax.grad(lambda th: model.log_likelihood(th) - without.log_likelihood(th))(theta)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0
    # simulated data carry the same layout; the endpoint table reads pCR and MPR
    sim = model.simulate_data(np.asarray(theta), np.random.default_rng(1))[0]
    assert sim["pathology"].shape == (3,) and sim["pathology"].sum() == pytest.approx(1.0)
    row = L.endpoint_table(model, np.asarray(theta)[None, :], n_draws=1)[0]
    assert row["pathology"]["pcr"]["predicted_pct"] == pytest.approx(100 * float(pred.pathology[0]))
    assert row["pathology"]["mpr"]["predicted_pct"] == pytest.approx(100 * float(pred.pathology[0] + pred.pathology[1]))
    assert row["pathology"]["pcr"]["observed_pct"] == pytest.approx(100 * k_pcr / n)
    assert L.endpoint_tally([row])["pcr"]["arms"] == 1
    # the arm file keeps the categories; a file without them reads as None
    L._write_arm(tmp_path / "a.npz", lib_p.arms[0], "k")
    np.testing.assert_array_equal(L._read_arm(tmp_path / "a.npz", PATH_ARM).pathology, lib_p.arms[0].pathology)
    L._write_arm(tmp_path / "b.npz", lib.arms[0], "k")
    assert L._read_arm(tmp_path / "b.npz", PATH_ARM).pathology is None


def test_walled_model_prior_and_sbc_density_carry_the_wall(setup):
    """With a min-ESS wall the model's prior is prior x wall: SBC's truths come from it (not from
    the bare prior, most of whose draws the wall excludes) and its chains sample the same wall."""
    from qspjax.inference.sbc import log_density, log_support_prior

    params, spec, priors, arms = setup
    lib = fake_library(setup, n=40, seed=3)
    free = L.LibraryModel(lib, arms, priors, params, spec, SETTINGS, fixed_ess=[20.0, 20.0])
    walled = L.LibraryModel(lib, arms, priors, params, spec, SETTINGS, fixed_ess=[20.0, 20.0], min_ess=6.0)
    theta = jnp.asarray(theta_at_proposal(walled))
    assert float(log_support_prior(free, theta)) == pytest.approx(float(free._log_prior(theta)))
    data = jax.tree_util.tree_map(jnp.asarray, walled.observed_data())
    assert float(log_density(walled, theta + 2.0, data)) == pytest.approx(float(walled.log_posterior(theta + 2.0)))
    exact, info0 = L.sample_support_prior(free, 5, jax.random.PRNGKey(1))
    assert info0["sampler"] == "exact prior draws" and exact.shape == (5, len(free.ids))


@pytest.mark.slow  # ~40 s: two NUTS compilations
def test_sbc_of_the_walled_model_runs_inside_the_support(setup):
    params, spec, priors, arms = setup
    walled = L.LibraryModel(fake_library(setup, n=40, seed=3), arms, priors, params, spec, SETTINGS, min_ess=6.0)
    bare = np.asarray(walled.sample_prior(jax.random.PRNGKey(0), 200))
    inside_bare = np.mean([walled.ess(t).min() >= 6.0 * 0.8 for t in bare])
    truths, info = L.sample_support_prior(walled, 40, jax.random.PRNGKey(1), warmup=200, thin=4)
    ess = np.array([walled.ess(t).min() for t in truths])
    assert info["divergences"] >= 0 and truths.shape == (40, len(walled.ids))
    assert np.mean(ess >= 6.0 * 0.8) > max(0.9, inside_bare + 0.2)  # the wall holds (10 % soft) where the prior did not
    result = L.run_sbc(walled, 2, jax.random.PRNGKey(2), warmup=20, samples=20, thin=2, max_tree_depth=4)
    assert result.ranks.shape == (2, len(walled.ids)) and result.settings["min_ess"] == 6.0
    assert result.settings["truths"]["sampler"] == "NUTS on prior x support wall"
