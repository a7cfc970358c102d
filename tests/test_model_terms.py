"""Model terms of issue 15: target-class E_max of checkpoint blockade, LQ-L radiation kill, and
their parameters through the loaders, the calibration configuration and the SBML export."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspjax.errors import QSPValidationError
from qspjax.model import QSPModel
from qspjax.model.checkpoint import Checkpoints
from qspjax.model.radiotherapy import Radiotherapy
from qspjax.model.reference import state_from_species
from qspjax.params import CONFIG_DIR, load_parameter_file, load_parameters
from qspjax.regimen import compile_schedule, parse_regimen
from qspjax.solver.simulate import STATUS_OK, SolverConfig, simulate_patient

D_T = 6.2  # Gy, Park et al. 2008 (the literature value documented in radiotherapy.yaml)
AB_TISSUE = 1e-7  # mol/L of antibody in lesion and lymph node (~15 ug/mL, a trough level)


def _model(params, drugs=("nivolumab",), n_lesions=1, **values) -> QSPModel:
    return QSPModel.from_values(dict(params.model_values(), **values), drugs=drugs, n_lesions=n_lesions)


def _with_drug(model, y, conc=AB_TISSUE):
    """``y`` with every antibody of ``model`` at ``conc`` in the lesions and the lymph node."""
    y = dict(y)
    y["ab_T"] = jnp.full_like(y["ab_T"], conc)
    y["ab_LN"] = jnp.full_like(y["ab_LN"], conc)
    return y


def _state(params, model):
    return state_from_species(model, params.initial_state)


_assign = jax.jit(lambda model, y: model.assignments(y))  # compiled once per model structure
_rates = jax.jit(lambda model, y: model.rates(y))


def _signal(model, y):
    return float(_assign(model, y)["H_PD1"][0])


# --- LQ-L -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rt(params):
    return _model(params, d_transition_tumor=D_T).rt


def _ab(rt):
    a = float(rt.p["alpha_tumor"])
    return a, a / float(rt.p["alpha_beta_tumor"])


def test_lql_is_lq_up_to_the_transition_and_log_linear_beyond(rt):
    a, b = _ab(rt)
    for d in (0.0, 0.5, 2.0, 6.0, D_T):
        assert float(rt.log_survival(jnp.asarray(d))) == pytest.approx(-a * d - b * d * d, rel=1e-15, abs=0.0)
    gamma = a + 2 * b * D_T
    lq_dt = -a * D_T - b * D_T**2
    for d in (8.0, 12.0, 18.0, 34.0):
        assert float(rt.log_survival(jnp.asarray(d))) == pytest.approx(lq_dt - gamma * (d - D_T), rel=1e-14)
    for d1, d2 in ((8.0, 12.0), (18.0, 34.0)):  # slope gamma, whatever the dose
        slope = (float(rt.log_survival(jnp.asarray(d2))) - float(rt.log_survival(jnp.asarray(d1)))) / (d2 - d1)
        assert slope == pytest.approx(-gamma, rel=1e-12)
    # An 18 Gy SBRT fraction: LQ-L kills e^4.2 ~ 65x fewer cells than LQ (log-kill 10.9 vs 15.1).
    assert -float(rt.log_survival(jnp.asarray(18.0))) == pytest.approx(10.94, abs=0.01)
    assert a * 18 + b * 18**2 == pytest.approx(15.12, abs=0.01)


def test_lql_value_and_slope_are_continuous_at_the_transition(rt):
    a, b = _ab(rt)
    gamma = a + 2 * b * D_T
    eps = 1e-7
    lo, hi = (float(rt.log_survival(jnp.asarray(D_T + s))) for s in (-eps, eps))
    assert hi - lo == pytest.approx(-2 * eps * gamma, rel=1e-6)
    slope = jax.grad(lambda d: rt.log_survival(d))
    for d in (D_T - 1e-9, D_T + 1e-9):
        assert float(slope(jnp.asarray(d))) == pytest.approx(-gamma, rel=1e-8)


def test_default_transition_keeps_the_lq_model(params):
    rt = _model(params).rt
    assert float(rt.p["d_transition_tumor"]) > 100.0
    a, b = _ab(rt)
    for d in (2.0, 8.0, 20.0, 34.0):
        assert float(rt.log_survival(jnp.asarray(d))) == -a * d - b * d * d
    grad_dt = jax.grad(lambda r: r.log_survival(jnp.asarray(20.0)))(rt).p["d_transition_tumor"]
    assert float(grad_dt) == 0.0


def test_lql_gradients_match_finite_differences_and_the_closed_form(rt):
    names = ("alpha_tumor", "alpha_beta_tumor", "d_transition_tumor")
    base = {k: float(rt.p[k]) for k in names}

    def log_s(values, d):
        return Radiotherapy(dict(rt.p, **values)).log_survival(jnp.asarray(d))

    a, b = _ab(rt)
    for d in (4.0, 12.0):
        grad = jax.grad(log_s)({k: jnp.asarray(v) for k, v in base.items()}, d)
        for k in names:
            h = 1e-6 * base[k]
            fd = (float(log_s(dict(base, **{k: base[k] + h}), d)) - float(log_s(dict(base, **{k: base[k] - h}), d))) / (2 * h)
            assert float(grad[k]) == pytest.approx(fd, rel=1e-6, abs=1e-9), (k, d)
        # d ln S / d d_T: 0 in the LQ part, -2 beta (d - d_T) beyond (a higher transition kills more).
        want = 0.0 if d <= D_T else -2 * b * (d - D_T)
        assert float(grad["d_transition_tumor"]) == pytest.approx(want, rel=1e-12, abs=1e-15)
        # d ln S / d alpha at fixed alpha/beta: -(d + d^2/ab) in LQ, -(d + d_T (2d - d_T)/ab) beyond.
        ab = base["alpha_beta_tumor"]
        want_a = -(d + d * d / ab) if d <= D_T else -(d + D_T * (2 * d - D_T) / ab)
        assert float(grad["alpha_tumor"]) == pytest.approx(want_a, rel=1e-12)


def test_rt_fraction_applies_the_lql_survival(params, rt):
    model = _model(params, n_lesions=2, d_transition_tumor=D_T)
    y = _state(params, model)
    y1 = model.rt.fraction(y, jnp.asarray([12.0, 0.0]), jnp.asarray(0.0), jnp.asarray(0.0))
    s = np.exp(float(rt.log_survival(jnp.asarray(12.0))))
    assert float(y1["C1"][0]) == pytest.approx(float(y["C1"][0]) * s, rel=1e-12)
    assert float(y1["C_doomed"][0] - y["C_doomed"][0]) == pytest.approx(float(y["C1"][0]) * (1 - s), rel=1e-12)
    assert float(y1["C1"][1]) == float(y["C1"][1])


# --- target-class E_max -----------------------------------------------------------------------
def _short_run(model, y0, regimen, days=(0.0, 1.5, 4.0, 10.0)):
    sched = compile_schedule(parse_regimen(regimen), model.drugs, np.asarray(days), n_lesions=model.n_lesions)
    traj = jax.jit(lambda m, y: simulate_patient(m, y, sched, SolverConfig()))(model, y0)
    assert int(traj.status) == STATUS_OK
    return traj


def _ici(drugs, rt_gy=8.0):
    return {"name": "t", "ici": [{"drug": d, "dose": 240, "unit": "mg", "interval_days": 14, "cycles": 1,
                                  "start_day": 0} for d in drugs],
            "rt": [{"dose_per_fraction_gy": rt_gy, "fractions": 1, "days": [1], "lesion": "irradiated"}]}


def _full_blockade(model):
    """The same model on the synapse path it had before target-class E_max (no unreached synapses)."""
    return eqx.tree_at(lambda m: m.checkpoint, model, Checkpoints(model.checkpoint.p))


def _states(params, model):
    """States to compare right-hand sides at: reference tumor, with antibody, after an RT fraction."""
    y0 = _state(params, model)
    dosed = _with_drug(model, y0)
    after_rt = model.rt.fraction(dosed, jnp.full(model.n_lesions, 8.0), jnp.asarray(0.2), jnp.asarray(1.0))
    return y0, dosed, after_rt


def test_emax_one_reproduces_the_full_blockade_model_bit_for_bit(params):
    drugs = ("nivolumab", "ipilimumab")
    model = _model(params, drugs, n_lesions=2)
    full = _full_blockade(model)
    assert model.checkpoint.blocked == ("PD1",) and full.checkpoint.blocked == ()
    for y in _states(params, model):
        a, b = _rates(model, y), _rates(full, y)
        for k in a:
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    aux = _assign(model, _with_drug(model, _state(params, model)))
    p = model.checkpoint.p
    assert float(aux["ctla4_priming"]) == float(1.0 + p["ctla4_priming_emax"] * aux["ctla4_occupancy_LN"])
    assert 0.5 < float(aux["ctla4_occupancy_LN"]) < 1.0


@pytest.mark.slow
def test_emax_one_reproduces_the_full_blockade_model_on_a_short_solve(params):
    drugs = ("nivolumab", "ipilimumab")
    model = _model(params, drugs, n_lesions=2)
    y0 = _state(params, model)
    a, b = _short_run(model, y0, _ici(drugs)), _short_run(_full_blockade(model), y0, _ici(drugs))
    for k in a.ys:
        assert np.array_equal(np.asarray(a.ys[k]), np.asarray(b.ys[k])), k


@pytest.mark.parametrize("drug,target", [("nivolumab", "PD1"), ("durvalumab", "PDL1")])
def test_emax_zero_is_the_untreated_tumor(params, drug, target):
    off = _model(params, (drug,), **{f"blockade_emax_{target}": 0.0})
    on = _model(params, (drug,))
    y0 = _state(params, on)
    y = _with_drug(on, y0)
    untreated = _signal(on, y0)
    assert _signal(off, y) == untreated
    assert _signal(on, y) < untreated - 0.05  # the full-effect drug does block (0.997 -> 0.908 for anti-PD-L1)
    # Every non-PK rate of a dosed patient at emax 0 is the undosed patient's.
    a, b = _rates(off, y), _rates(off, y0)
    for k in a:
        if not k.startswith("ab_"):
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


@pytest.mark.slow
def test_emax_zero_follows_the_undosed_tumor_on_a_solve(params):
    off = _model(params, blockade_emax_PD1=0.0)
    y0 = _state(params, off)
    reg = _ici(("nivolumab",))
    reg.pop("rt")
    days = (0.0, 10.0, 30.0)
    dosed, none = _short_run(off, y0, reg, days), _short_run(off, y0, {"name": "none"}, days)
    dosed_on = _short_run(_model(params), y0, reg, days)
    for k in ("C1", "T1_T", "T_exh"):
        assert np.allclose(np.asarray(dosed.ys[k]), np.asarray(none.ys[k]), rtol=1e-5), k
    assert abs(float(dosed_on.ys["T_exh"][-1, 0] / none.ys["T_exh"][-1, 0]) - 1) > 1e-2


def test_occupancy_response_is_emax_times_the_blockade_and_monotone(params):
    model = _model(params)
    y0 = _state(params, model)
    h0 = _signal(model, y0)
    h1 = _signal(model, _with_drug(model, y0))
    emaxes = np.linspace(0.0, 1.0, 6)
    h = [_signal(_model(params, blockade_emax_PD1=e), _with_drug(model, y0)) for e in emaxes]
    assert np.all(np.diff(h) < 0)
    for e, he in zip(emaxes, h):  # effective blockade = emax * the occupancy-driven blockade
        assert 1 - he / h0 == pytest.approx(e * (1 - h1 / h0), rel=1e-12, abs=1e-15)
    # At a fixed emax the signal falls with the antibody concentration and levels off at 1 - emax.
    partial = _model(params, blockade_emax_PD1=0.7)
    h_conc = [_signal(partial, _with_drug(partial, y0, c)) for c in (0.0, 1e-11, 1e-10, 1e-9, 1e-8, 1e-6)]
    assert h_conc[0] == pytest.approx(h0, rel=1e-14)
    assert np.all(np.diff(h_conc) < 0)
    assert h_conc[-1] / h0 > 0.3 - 1e-12
    occupancy = float(_assign(partial, _with_drug(partial, y0, 1e-6))["pd1_drug_occupancy"][0])
    assert occupancy > 0.95  # occupancy in the reached synapses is unchanged by emax


def test_anti_pd1_and_anti_pdl1_classes_reach_synapses_independently(params):
    drugs = ("nivolumab", "durvalumab")
    y0 = _state(params, _model(params, drugs))

    def signal(**emax):
        m = _model(params, drugs, **emax)
        return _signal(m, _with_drug(m, y0))

    both = _model(params, drugs)
    assert both.checkpoint.blocked == ("PD1", "PDL1")
    assert signal() == _signal(_full_blockade(both), _with_drug(both, y0))
    assert signal(blockade_emax_PD1=0.0, blockade_emax_PDL1=0.0) == _signal(both, y0)
    # Anti-PD-L1 reaching nothing: the pair is anti-PD-1 alone at its emax.
    nivo = _model(params, blockade_emax_PD1=0.6)
    alone = _signal(nivo, _with_drug(nivo, _state(params, nivo)))
    assert signal(blockade_emax_PD1=0.6, blockade_emax_PDL1=0.0) == pytest.approx(alone, rel=1e-12)
    assert signal(blockade_emax_PD1=0.6, blockade_emax_PDL1=0.5) < alone


def test_ctla4_emax_scales_priming_and_treg_depletion(params):
    drugs = ("ipilimumab",)
    full, half = _model(params, drugs), _model(params, drugs, blockade_emax_CTLA4=0.5)
    y = _with_drug(full, _state(params, full))
    a, b = _assign(full, y), _assign(half, y)
    assert full.checkpoint.blocked == ()
    assert float(b["ctla4_priming"] - 1) == pytest.approx(0.5 * float(a["ctla4_priming"] - 1), rel=1e-14)
    assert float(b["ctla4_treg_depletion"][0]) == pytest.approx(0.5 * float(a["ctla4_treg_depletion"][0]), rel=1e-14)
    assert float(a["ctla4_treg_depletion"][0]) > 0.0


def test_pd1_signal_gradient_wrt_emax_matches_finite_differences(params):
    model = _model(params, blockade_emax_PD1=0.7)
    y = _with_drug(model, _state(params, model))
    h0, h1 = _signal(_model(params, blockade_emax_PD1=0.0), y), _signal(_model(params), y)

    @jax.jit
    def rate(emax):  # a rate the PD-1 signal drives (T cell exhaustion in the lesion)
        m = eqx.tree_at(lambda m: m.checkpoint.p["blockade_emax_PD1"], model, emax)
        return m.assignments(y)["H_PD1"][0], m.rates(y)["T_exh"][0]

    (dh, dr) = jax.jacfwd(rate)(jnp.asarray(0.7))
    assert float(dh) == pytest.approx(h1 - h0, rel=1e-10)  # dH/d emax = H(drug) - H(no drug)
    step = 1e-5
    fd = (np.asarray(rate(jnp.asarray(0.7 + step))) - np.asarray(rate(jnp.asarray(0.7 - step)))) / (2 * step)
    assert float(dh) == pytest.approx(fd[0], rel=1e-7)
    assert float(dr) == pytest.approx(fd[1], rel=1e-6) and abs(fd[1]) > 0


@pytest.mark.slow
def test_solver_gradients_wrt_emax_and_lql_match_finite_differences(params):
    model = _model(params, d_transition_tumor=D_T, blockade_emax_PD1=0.7)
    y0 = _state(params, model)
    sched = compile_schedule(parse_regimen(_ici(("nivolumab",), rt_gy=10.0)), model.drugs,
                             np.array([0.0, 0.5, 2.0]), n_lesions=1)
    config = SolverConfig(rtol=1e-9, atol=1e-12, max_steps=100_000)
    where = {"blockade_emax_PD1": lambda m: m.checkpoint.p["blockade_emax_PD1"],
             "d_transition_tumor": lambda m: m.rt.p["d_transition_tumor"],
             "alpha_tumor": lambda m: m.rt.p["alpha_tumor"]}

    @jax.jit
    def objective(theta):
        m = model
        for k, get in where.items():
            m = eqx.tree_at(get, m, theta[k])
        traj = simulate_patient(m, y0, sched, config)
        return jnp.log(traj.ys["C1"][-1, 0]) + jnp.log(traj.ys["T_exh"][-1, 0])

    base = {k: jnp.asarray(float(get(model))) for k, get in where.items()}
    grad = jax.jit(jax.grad(objective))(base)
    for k in where:
        h = 1e-4 * float(base[k])
        fd = (float(objective(dict(base, **{k: base[k] + h}))) - float(objective(dict(base, **{k: base[k] - h})))) / (2 * h)
        assert np.isfinite(float(grad[k]))
        assert float(grad[k]) == pytest.approx(fd, rel=1e-4, abs=1e-8), k
        assert abs(fd) > 1e-6, k  # each parameter does move the objective


# --- SBML export -------------------------------------------------------------------------------
@pytest.mark.slow  # ~30 s: exports and evaluates the SBML model
def test_sbml_export_carries_emax_and_lql(params):
    pytest.importorskip("libsbml")
    roadrunner = pytest.importorskip("roadrunner")
    from qspjax.interop import sbml

    model = _model(params, blockade_emax_PD1=0.6, d_transition_tumor=D_T)
    y0 = _with_drug(model, _state(params, model))
    runner = roadrunner.RoadRunner(sbml.export_sbml(model, y0))
    assert runner["blockade_emax_PD1"] == 0.6 and runner["d_transition_tumor"] == D_T
    rates = dict(zip((c.rstrip("'") for c in runner.getRatesOfChangeNamedArray().colnames), runner.getRatesOfChange()))
    ours = model.rates(y0)  # eager, as qss_values (the exported roots) is evaluated
    for key, ids in sbml.state_names(model).items():
        for i, sid in np.ndenumerate(ids):
            assert rates[sid] == pytest.approx(float(np.asarray(ours[key])[i]), rel=1e-10, abs=1e-300), sid
    qss = sbml.qss_values(model, y0)
    assert set(qss) == {"PD1_free", "PD1_free_untreated", "IL2_LN"}
    # At emax 1 the unreached synapses weigh 0 and the export leaves them out (the QSP-IO export).
    assert set(sbml.qss_values(_model(params), y0)) == {"PD1_free", "IL2_LN"}
    for sid, x in zip(sbml._names_like("PD1_free_untreated", (1,), model.drugs, 1), np.asarray(qss["PD1_free_untreated"])):
        assert runner[str(sid)] == pytest.approx(float(x), rel=1e-12)  # a relaxation state at its own root
        assert abs(rates[sbml.log_qss_name(str(sid))]) <= 1e-6 * sbml.K_RELAX_QSS_PER_DAY
    assert float(qss["PD1_free_untreated"][0]) > 10 * float(qss["PD1_free"][0])  # no antibody holds PD-1 there
    # An RT fraction above d_T: the exported event applies the LQ-L survival.
    reg = parse_regimen({"name": "rt", "rt": [{"dose_per_fraction_gy": 12, "fractions": 1, "days": [0], "lesion": "irradiated"}]})
    schedule = compile_schedule(reg, model.drugs, np.array([0.0, 1.0]), n_lesions=1)
    jump = sbml.trace_jump(model, y0, tuple(e[0] for e in schedule.events))
    assert "d_transition_tumor" in jump["C1_irradiated"] and "piecewise" in jump["C1_irradiated"]
    # Evaluate the exported event assignment (SBML L3 infix) with the export's parameter and state values.
    values = {}
    for leaf, ids in zip(*sbml.parameter_names(model)):
        values |= {str(sid): float(np.asarray(leaf)[i]) for i, sid in np.ndenumerate(ids)}
    for key, ids in sbml.state_names(model).items():
        values |= {str(sid): float(np.asarray(y0[key])[i]) for i, sid in np.ndenumerate(ids)}
    values |= {"exp": np.exp, "ln": np.log, "sqrt": np.sqrt, "max": max, "min": min,
               "lt": lambda a, b: a < b, "leq": lambda a, b: a <= b, "gt": lambda a, b: a > b,
               "geq": lambda a, b: a >= b, "piecewise": lambda t, cond, f: t if cond else f}
    c1 = eval(jump["C1_irradiated"].replace("^", "**"), {"__builtins__": {}}, values)
    s = float(np.exp(model.rt.log_survival(jnp.asarray(12.0))))
    assert c1 == pytest.approx(float(y0["C1"][0]) * s, rel=1e-12)
    assert s > 2.5 * np.exp(-_ab(model.rt)[0] * 12.0 - _ab(model.rt)[1] * 144.0)  # LQ-L (e^-6.9), not LQ (e^-7.9)


# --- parameter files, population and priors ---------------------------------------------------
def test_out_of_range_values_are_refused_naming_file_and_field(tmp_path):
    bad = tmp_path / "overlay.yaml"
    bad.write_text("parameters:\n  blockade_emax_PD1: {value: 1.5, unit: dimensionless}\n")
    with pytest.raises(QSPValidationError) as err:
        load_parameter_file(bad)
    assert str(bad) in str(err.value) and "parameters.blockade_emax_PD1.value = 1.5" in str(err.value)
    assert "at most 1" in str(err.value)
    bad.write_text("parameters:\n  d_transition_tumor: {value: -6.2, unit: gray}\n")
    with pytest.raises(QSPValidationError, match=r"parameters\.d_transition_tumor\.value = -6\.2: must be non-negative"):
        load_parameter_file(bad)
    bad.write_text("parameters:\n  d_transition_tumor: {value: 6.2, unit: gray/second}\n")
    with pytest.raises(QSPValidationError, match=r"d_transition_tumor\.unit"):
        load_parameter_file(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("parameters:\n  blockade_emax_PD1: {value: 0.7}\n  d_transition_tumor: {value: 620, unit: cGy}\n")
    ps = load_parameters(extra=[ok])
    assert ps.values["blockade_emax_PD1"] == 0.7 and ps.values["d_transition_tumor"] == pytest.approx(6.2)


def test_population_refuses_lognormal_for_a_fraction_bounded_by_one(tmp_path):
    from qspjax.vpop import load_population

    pop = tmp_path / "pop.yaml"
    text = (CONFIG_DIR / "params" / "population.yaml").read_text()
    pop.write_text(text.replace("variability:\n", "variability:\n  blockade_emax_PD1: {distribution: lognormal, cv: 0.2}\n", 1))
    with pytest.raises(QSPValidationError, match=r"variability\.blockade_emax_PD1\.distribution = 'lognormal'.*logitnormal"):
        load_population(pop)


def test_commented_example_priors_fit_the_new_parameters(tmp_path):
    """The example in configs/inference/priors.yaml, uncommented, is a valid priors file for a
    population that varies the new parameters (with a nominal emax inside (0, 1))."""
    from qspjax.inference.config import load_priors
    from qspjax.vpop import load_population, population_params

    text = (CONFIG_DIR / "inference" / "priors.yaml").read_text()
    block = text.split("# Example (model terms):", 1)[1].splitlines()
    variability = [ln for ln in block if ln.startswith("  #   population.yaml: ")]
    start = next(i for i, ln in enumerate(block) if ln.startswith("  # - parameter:"))
    priors = [ln[2:].replace("# ", "", 1) for ln in block[start:] if ln.startswith("  # ")]
    assert len(variability) == 3 and len(priors) >= 9
    pri = tmp_path / "priors.yaml"
    pri.write_text("parameters:\n" + "\n".join(priors) + "\n")
    pop = tmp_path / "pop.yaml"
    entries = "".join(f"  {ln.split(': ', 1)[1]}\n" for ln in variability)
    pop.write_text((CONFIG_DIR / "params" / "population.yaml").read_text().replace("variability:\n", "variability:\n" + entries, 1))
    spec = load_population(pop)
    loaded = load_priors(pri, population_names=tuple(spec.names))
    assert {p.parameter for p in loaded.priors} == {"blockade_emax_PD1", "blockade_emax_PDL1", "d_transition_tumor"}
    overlay = tmp_path / "nominal.yaml"
    overlay.write_text("parameters:\n  blockade_emax_PD1: {value: 0.9}\n  blockade_emax_PDL1: {value: 0.9}\n"
                       "  d_transition_tumor: {value: 6.2, unit: gray}\n")
    pop_params = population_params(spec, load_parameters(extra=[overlay]))
    assert float(pop_params.loc["blockade_emax_PD1"]) == pytest.approx(np.log(9.0))
    assert float(pop_params.loc["d_transition_tumor"]) == pytest.approx(np.log(6.2))
    with pytest.raises(QSPValidationError, match="logitnormal needs a median in"):
        population_params(spec, load_parameters())  # the shipped emax 1 must be overlaid to be fitted


def test_parameters_are_documented():
    readme = (CONFIG_DIR / "params" / "README.md").read_text()
    for name in ("blockade_emax_PD1", "blockade_emax_PDL1", "blockade_emax_CTLA4", "d_transition_tumor"):
        assert re.search(rf"`{name}`", readme), name
