"""Virtual populations: plausibility screening of baselines and its reasons."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspjax.model.reference import state_from_species
from qspjax.vpop import (PLAUSIBILITY_REASONS, Cohort, Plausibility, baseline_readouts, build_models,
                         load_population, plausibility_reasons)


@pytest.fixture(scope="module")
def four_patients(params):
    """The reference tumor-bearing state for four patients with different growth rates;
    patient 3's growth 'failed' (status 4) and patient 2 took 5,000 days to grow."""
    growth = params.values["k_C1_growth"] * np.array([0.5, 1.0, 2.0, 1.0])
    models = build_models(params, {"k_C1_growth": jnp.asarray(growth)}, 4, ("nivolumab",), 1)
    y0 = jax.vmap(lambda m: state_from_species(m, params.initial_state))(models)
    return Cohort(models, y0, jnp.asarray([0, 0, 0, 4]), jnp.asarray([300.0, 400.0, 5000.0, 400.0]),
                  jnp.full(4, 3.0), jnp.zeros(4, int))


def test_volume_doubling_time_is_ln2_over_the_untreated_volume_growth_rate(four_patients):
    read = baseline_readouts(four_patients)
    doubling = read["volume_doubling_days"]
    assert np.all(np.isfinite(doubling[:3])) and np.all(doubling > 0)
    # check one patient against a finite difference of the volume along the right-hand side
    m = jax.tree_util.tree_map(lambda x: x[1], four_patients.model)
    y = jax.tree_util.tree_map(lambda x: x[1], four_patients.y0)
    h = 1e-4
    dy = m.rates(y)
    step = {k: y[k] + h * dy[k] for k in y}
    back = {k: y[k] - h * dy[k] for k in y}
    v, v_up, v_dn = (float(m.lesion_volume(s)[0]) for s in (y, step, back))
    rate = (v_up - v_dn) / (2 * h) / v
    assert doubling[1] == pytest.approx(math.log(2) / rate, rel=1e-6)
    # faster growth, shorter doubling time
    assert doubling[2] < doubling[1] < doubling[0]


def test_screening_reports_the_first_failed_check_per_patient(four_patients):
    d = baseline_readouts(four_patients)["volume_doubling_days"]
    rule = Plausibility(volume_doubling_days=(float(d[1]) * 0.9, 1e9), growth_days=(0.0, 3650.0),
                        blood_cd8_cells=(0.0, math.inf))
    reasons = [PLAUSIBILITY_REASONS[r] if r >= 0 else "kept" for r in plausibility_reasons(four_patients, rule)]
    # patient 0 grows slowest (longest doubling): kept; patient 2 doubles too fast AND grew too long:
    # the doubling check comes first; patient 3's growth failed
    assert reasons == ["kept", "kept", "volume_doubling_days", "growth_failed"]
    wide = Plausibility(volume_doubling_days=(0.0, math.inf), growth_days=(0.0, 3650.0))
    assert [int(r) for r in plausibility_reasons(four_patients, wide)] == [-1, -1, PLAUSIBILITY_REASONS.index("growth_days"),
                                                                           PLAUSIBILITY_REASONS.index("growth_failed")]


def test_population_file_plausibility_ranges_load_and_bad_ones_are_refused(tmp_path):
    spec = load_population()
    assert spec.plausibility.volume_doubling_days[0] > 0
    text = (load_population.__globals__["DEFAULT_POPULATION_FILE"]).read_text()
    bad = tmp_path / "pop.yaml"
    bad.write_text(text.replace("volume_doubling_days: {min: 20, max: 2000", "volume_doubling_days: {min: 200, max: 20"))
    from qspjax.errors import QSPValidationError

    with pytest.raises(QSPValidationError, match="plausibility.volume_doubling_days"):
        load_population(bad)
    bad.write_text(text.replace("growth_days:", "growth_dayz:"))
    with pytest.raises(QSPValidationError, match="plausibility.growth_dayz"):
        load_population(bad)


def test_soft_plausibility_is_flat_inside_half_at_each_bound_and_steep_beyond():
    """The twin's prior carries the plausibility filter as a smooth factor: ~1 well inside every
    range, 1/2 at a bound, e^-20 at twice an upper bound (5 % width), and it ranks draws as the
    hard filter does away from the bounds."""
    from qspjax.vpop import log_soft_plausibility

    rule = Plausibility(volume_doubling_days=(20.0, 2000.0), growth_days=(0.0, 3650.0), blood_cd8_cells=(0.0, math.inf))
    rate = lambda doubling: math.log(2.0) / doubling
    f = lambda r, g, c=1e6: float(log_soft_plausibility(rule, r, g, c))
    assert f(rate(200.0), 1000.0) == pytest.approx(0.0, abs=1e-6)
    assert f(rate(200.0), 3650.0) == pytest.approx(math.log(0.5), abs=1e-6)
    assert f(rate(200.0), 7300.0) == pytest.approx(-20.0, abs=1e-6)
    assert f(rate(2000.0), 1000.0) == pytest.approx(math.log(0.5), abs=1e-6)
    assert f(rate(20.0), 1000.0) == pytest.approx(math.log(0.5), abs=1e-6)
    assert f(-1e-3, 1000.0) < -15.0  # a tumour that does not grow is screened out, finitely
    assert f(rate(10.0), 1000.0) < -15.0  # doubling faster than 20 days
    # differentiable: the gradient in the growth days is finite and negative beyond the bound
    g = jax.grad(lambda t: log_soft_plausibility(rule, rate(200.0), t, 1e6))(jnp.asarray(4000.0))
    assert np.isfinite(float(g)) and float(g) < 0.0
    # agrees with the hard filter where a read lies more than 20 % from every bound
    rng = np.random.default_rng(0)
    doubling = np.exp(rng.uniform(np.log(5.0), np.log(8000.0), 400))
    days = rng.uniform(0.0, 8000.0, 400)
    hard = (doubling >= 20.0) & (doubling <= 2000.0) & (days <= 3650.0)
    soft = np.asarray(log_soft_plausibility(rule, jnp.log(2.0) / doubling, days, 1e6)) > math.log(0.5)
    far = (np.minimum(np.abs(np.log(doubling / 20.0)), np.abs(np.log(doubling / 2000.0))) > 0.2) & \
        (np.abs(days / 3650.0 - 1.0) > 0.2)
    assert far.sum() > 200 and np.all(hard[far] == soft[far])
