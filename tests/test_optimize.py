"""``qspjax optimize``: space-file validation, the smooth regimen against the compiled one, gradients
against finite differences, and the optimiser against a brute-force grid of the same space.

The solves are tiny (two calibrated patients, 42 days, weekly output) and shared through
module-scoped fixtures: each compiled objective is built once.
"""

from __future__ import annotations


import numpy as np
import pytest

from qspjax.cli import main
from qspjax.errors import QSPValidationError

from conftest import REPO

SPACE = REPO / "configs/optimize/rt_nivolumab_space.yaml"


def _space(**changes):
    doc = {"name": "t", "horizon_days": 42, "output_every": 7,
           "variables": {"rt_dose_per_fraction_gy": {"min": 4, "max": 16},
                         "rt_fractions": {"min": 1, "max": 3, "integer": True}},
           "objective": {"endpoint": "burden"}, "constraints": {"normal_tissue_bed_gy": {"max": 60}}}
    for key, value in changes.items():
        doc[key] = value
    return doc


# ---------------------------------------------------------------------------------------------
# Validation (nothing is computed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,field,words", [
    ({"variables": {"rt_dose": {"min": 1, "max": 2}}}, "variables.rt_dose", "unknown key"),
    ({"variables": {"rt_dose_per_fraction_gy": {"min": 8, "max": 8}}}, "variables.rt_dose_per_fraction_gy.max",
     "empty bounds"),
    ({"variables": {"rt_dose_per_fraction_gy": {"min": 10, "max": 6}}}, "variables.rt_dose_per_fraction_gy.max",
     "empty bounds"),
    ({"variables": {"rt_fractions": {"min": 1.2, "max": 1.8, "integer": True}}}, "variables.rt_fractions.max",
     "no integer"),
    ({"constraints": {"normal_tissue_bed_gy": {"max": 8}}}, "constraints.normal_tissue_bed_gy.max", "infeasible"),
    ({"variables": {"ici_dose_mg": {"min": 200, "max": 400}}, "constraints": {"total_antibody_mg": {"max": 100}}},
     "constraints.total_antibody_mg.max", "infeasible"),
    ({"constraints": {"lymphocyte_nadir_fraction": {"min": 1.5}}}, "constraints.lymphocyte_nadir_fraction.min",
     "<= 1"),
    ({"constraints": {"bed": {"max": 3}}}, "constraints.bed", "unknown key"),
    ({"objective": {"endpoint": "os"}}, "objective.endpoint", "allowed values"),
    ({"objective": {"endpoint": "pfs", "landmark_days": 90}}, "objective.landmark_days", "at most horizon_days"),
    ({"variables": {"rt_start_offset_days": {"min": -7, "max": 7}}}, "variables.rt_start_offset_days.min",
     "(< 0)"),
])
def test_bad_space_refused_naming_the_field(change, field, words):
    from qspjax.analysis.optimize import parse_space

    with pytest.raises(QSPValidationError) as info:
        parse_space(_space(**change), "bad.yaml")
    assert info.value.field == field and words in str(info.value) and "bad.yaml" in str(info.value)


def test_bad_space_file_refused_by_the_command_before_compute(tmp_path, capsys):
    bad = tmp_path / "space.yaml"
    bad.write_text(SPACE.read_text().replace("rt_dose_per_fraction_gy: {min: 5, max: 20}",
                                             "rt_dose_per_fraction_gy: {min: 5, max: 5}"))
    rc = main(["optimize", str(bad), "--patients", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "space.yaml" in err and "variables.rt_dose_per_fraction_gy.max" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    rc = main(["optimize", str(SPACE), "--patients", "2", "--holdout-seed", "0", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--holdout-seed" in capsys.readouterr().err
    # the posterior flags: a draw count the cohort cannot hold, a folder without posterior.nc
    rc = main(["optimize", str(SPACE), "--patients", "2", "--posterior", str(tmp_path), "--posterior-draws", "3",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "--posterior-draws" in capsys.readouterr().err
    rc = main(["optimize", str(SPACE), "--patients", "2", "--posterior", str(tmp_path / "none"),
               "--posterior-draws", "2",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--posterior" in err and "posterior.nc" in err and not (tmp_path / "o").exists()


def test_concat_populations_keeps_each_patients_values():
    from qspjax.params import load_parameters
    from qspjax.runner import build_population, concat_populations

    base = load_parameters()
    other = base.with_values(k_C1_growth=2 * base.values["k_C1_growth"])
    a = build_population(base, 2, 0, ("nivolumab",), exported_initial_state=True)
    b = build_population(other, 3, 0, ("nivolumab",), exported_initial_state=True)
    pop = concat_populations([a, b])
    assert len(pop) == 5 and pop.drugs == ("nivolumab",)
    np.testing.assert_allclose(np.asarray(pop.model.cancer.p["k_C1_growth"]),
                               [base.values["k_C1_growth"]] * 2 + [other.values["k_C1_growth"]] * 3)
    np.testing.assert_array_equal(pop.baseline_diameter_cm[:2], a.baseline_diameter_cm)
    c = build_population(base, 1, 0, ("ipilimumab",), exported_initial_state=True)
    with pytest.raises(QSPValidationError, match="drugs"):
        concat_populations([a, c])


def test_shipped_space_loads_and_its_least_constrained_corner_is_feasible():
    from qspjax.analysis.optimize import closed_form_constraints, least_constrained_corner, load_space

    space = load_space(SPACE)
    assert [v.name for v in space.free] == ["rt_dose_per_fraction_gy", "rt_fractions", "rt_start_offset_days",
                                            "ici_dose_mg", "ici_interval_days"]
    corner = least_constrained_corner(space)
    assert corner["rt_dose_per_fraction_gy"] == 5 and corner["rt_fractions"] == 1 and corner["ici_interval_days"] == 28
    cons = closed_form_constraints(space, corner, xp=np)
    assert cons["normal_tissue_bed_gy"] == pytest.approx(5 * (1 + 5 / 3))
    assert cons["total_antibody_mg"] == pytest.approx(120 * 15)  # days 0, 28, ..., 392


# ---------------------------------------------------------------------------------------------
# The smooth regimen is the regimen
# ---------------------------------------------------------------------------------------------
def test_smooth_schedule_matches_the_compiled_regimen_file():
    """At whole-number values, the traced event rows carry exactly the doses and fractions of the
    regimen YAML the command writes (per day), and the BED is n d (1 + d/3)."""
    import jax.numpy as jnp

    from qspjax.analysis.optimize import build_schedule, closed_form_constraints, parse_space, regimen_document, values_of
    from qspjax.regimen import compile_schedule, parse_regimen

    doc = _space(variables={"rt_dose_per_fraction_gy": {"min": 4, "max": 16}, "rt_fractions": {"min": 1, "max": 5},
                            "rt_gap_days": {"min": 1, "max": 3}, "rt_start_offset_days": {"min": 0, "max": 10},
                            "ici_dose_mg": {"min": 100, "max": 400}, "ici_interval_days": {"min": 7, "max": 21},
                            "lesion": {"choices": ["irradiated", "non_irradiated"]}},
                 constraints={})
    space = parse_space(doc, "t")
    x = np.array([8.0, 3.0, 2.0, 7.0, 240.0, 14.0])
    for lesion in (0, 1):
        v = values_of(space, jnp.asarray(x))
        smooth = build_schedule(space, v, lesion, ("nivolumab",))
        regimen = parse_regimen(regimen_document(space, x, lesion))
        compiled = compile_schedule(regimen, ("nivolumab",), np.asarray(space.grid))
        for arrays in (("dose_mg", 0), ("rt_dose_gy", lesion)):
            name, col = arrays
            per_day = {}
            for t, a in zip(np.asarray(smooth.times), np.asarray(getattr(smooth, name))[:, col]):
                per_day[float(t)] = per_day.get(float(t), 0.0) + float(a)
            expected = {float(t): float(a) for t, a in zip(np.asarray(compiled.times),
                                                           np.asarray(getattr(compiled, name))[:, col])}
            assert {t: a for t, a in per_day.items() if a} == {t: a for t, a in expected.items() if a}
        assert np.all(np.diff(np.asarray(smooth.times)) >= 0)
        assert np.asarray(smooth.rt_dose_gy)[:, 1 - lesion].sum() == 0.0
    assert [r["days"] for r in regimen_document(space, x, 0)["rt"]] == [[7.0, 9.0, 11.0]]
    cons = closed_form_constraints(space, values_of(space, jnp.asarray(x)))
    assert float(cons["normal_tissue_bed_gy"]) == pytest.approx(3 * 8 * (1 + 8 / 3))
    assert float(cons["overall_treatment_time_days"]) == pytest.approx(4.0)
    assert float(cons["total_antibody_mg"]) == pytest.approx(240.0 * 4)  # days 0, 14, 28 and 42 (the horizon)


# ---------------------------------------------------------------------------------------------
# The search itself, on an analytic objective (no solver): ascent, rounding, restoration, checks
# ---------------------------------------------------------------------------------------------
class _AnalyticObjective:
    """Tumor LQ effect of the relaxed course, sum_j w_j (a d + b d^2) with a/b = 10 Gy, as a
    stand-in for the cohort objective: same interface as ``CohortObjective``."""

    def __init__(self, space):
        import jax
        import jax.numpy as jnp

        from qspjax.analysis.optimize import _fraction_weights, closed_form_constraints, penalty, values_of

        self.space, self.evaluations = space, 0

        def f(x):
            v = values_of(space, x)
            d = v["rt_dose_per_fraction_gy"]
            value = jnp.sum(_fraction_weights(space, v["rt_fractions"]) * (0.3 * d + 0.03 * d**2)) / 10.0
            cons = closed_form_constraints(space, v)
            cons["lymphocyte_nadir_fraction"] = jnp.asarray(1.0)
            return value - penalty(space, cons), (value, cons)

        self._vg = jax.jit(jax.value_and_grad(f, has_aux=True))

    def evaluate(self, x, lesion_index=0):
        self.evaluations += 1
        (pv, (v, cons)), g = self._vg(np.asarray(x, dtype=float))
        aux = {"constraints": {k: float(c) for k, c in cons.items()}, "status": np.zeros(2, int), "hard_nadir": 1.0}
        return float(pv), float(v), aux, np.asarray(g)

    def value(self, x, lesion_index=0):
        return self.evaluate(x, lesion_index)[1:3]

    def penalised_value_and_grad(self, x, lesion_index=0):
        return self.evaluate(x, lesion_index)


def test_search_on_analytic_objective_lands_on_the_constraint_like_a_grid():
    from qspjax.analysis.optimize import optimize, parse_space

    space = parse_space(_space(optimizer={"steps": 60, "learning_rate": 0.3, "penalty": 50}), "t")
    objective = _AnalyticObjective(space)
    best = optimize(objective).best
    d, n = best.x
    # fractions of 6.39 Gy x 3 (BED 60 exactly) beat 8.08 Gy x 2 and 12 Gy x 1 in tumor effect
    assert n == 3 and best.feasible
    assert 3 * d * (1 + d / 3) == pytest.approx(60.0, rel=1e-6) and 3 * d * (1 + d / 3) <= 60.0 * (1 + 1e-12)
    assert d == pytest.approx((-3 + np.sqrt(9 + 12 * 20)) / 2, rel=1e-6)  # d^2 + 3 d - 60 = 0
    grid = [(dd, nn) for nn in (1, 2, 3) for dd in np.arange(4.0, 16.0 + 1e-9, 1.0) if nn * dd * (1 + dd / 3) <= 60]
    values = [objective.value(np.array([dd, float(nn)]))[0] for dd, nn in grid]
    top = [(dd, nn) for (dd, nn), val in zip(grid, values) if val >= max(values) - 1e-12]
    assert (6.0, 3) in top  # tied with (8 Gy, 2): 3 (1.8 + 1.08) = 2 (2.4 + 1.92)
    assert any(nn == n and abs(d - dd) <= 1.0 for dd, nn in top) and best.value >= max(values)


def test_a_non_finite_gradient_component_holds_its_variable_and_is_reported():
    """A NaN in one gradient component (the full-solver run of 2026-12-03 met one) must not turn
    the iterate into NaN: the variable is held for that step and the history names it."""
    from qspjax.analysis.optimize import optimize, parse_space

    space = parse_space(_space(optimizer={"steps": 6, "learning_rate": 0.3, "penalty": 50}), "t")

    class _NanAtStep2(_AnalyticObjective):
        def evaluate(self, x, lesion_index=0):
            pv, v, aux, g = super().evaluate(x, lesion_index)
            if self.evaluations == 3:
                g = np.array([np.nan, g[1]])
            return pv, v, aux, g

    result = optimize(_NanAtStep2(space))
    xs = np.array([h["x"] for h in result.history])
    assert np.all(np.isfinite(xs)) and np.all(np.isfinite([h["penalised"] for h in result.history]))
    assert result.history[2]["nonfinite_gradient"] == ["rt_dose_per_fraction_gy"]
    assert xs[3, 0] == xs[2, 0] and xs[3, 1] != xs[2, 1]  # held; the other variable moved
    assert sum("nonfinite_gradient" in h for h in result.history) == 1
