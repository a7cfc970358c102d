"""``qspjax stop-time``: the earliest safe stop of the antibody, checked by independent solves.

One small run of the command (6 calibrated patients, nivolumab 240 mg q2w, 182-day horizon) is
shared by the tests; its answers are then re-checked with the ordinary cohort runner on regimen
files truncated by hand (``cycles: k``), a different code path from the masked event arrays.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qspjax.cli import main

from conftest import REPO

REGIMEN = REPO / "configs/regimens/nivolumab_240mg_q2w.yaml"
# the machinery is checked on a fixed model (the first point calibration), whatever the default
CAL_PARAMS = REPO / "configs/params/calibrated/advanced_params.yaml"
CAL_POPULATION = REPO / "configs/params/calibrated/advanced_population.yaml"
MODEL = ["--uncalibrated", "--params-extra", str(CAL_PARAMS), "--population", str(CAL_POPULATION)]
DAYS, EVERY, FOLLOW_UP, CONFIRM, THRESHOLD = 182.0, 7.0, 56.0, 56.0, 5.0
N_PATIENTS, SEED = 6, 0


def _strict_load(path):
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def stop_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stop") / "run"
    rc = main(["stop-time", "--regimen", str(REGIMEN), "--patients", str(N_PATIENTS), "--seed", str(SEED),
               "--days", str(DAYS), "--output-every", str(EVERY), "--min-follow-up", str(FOLLOW_UP),
               "--confirm-days", str(CONFIRM), "--chunk", "6", "--out", str(out), *MODEL])
    assert rc == 0
    return out, _strict_load(out / "summary.json")


@pytest.fixture(scope="module")
def independent(stop_run):
    """The same cohort, solved by ``treat_population`` under regimens truncated to k and k - 1
    doses for the first patient with a stop after at least two doses, and under the full regimen."""
    from qspjax.analysis.stop_time import StopCriterion, assess_control
    from qspjax.params import load_parameters
    from qspjax.regimen import load_regimen, parse_regimen
    from qspjax.runner import build_population, treat_population
    from qspjax.solver.simulate import SolverConfig
    from qspjax.vpop import load_population

    _, summary = stop_run
    rows = summary["patients"]
    target = next(r for r in rows if r["stop_after_dose"] is not None and r["stop_after_dose"] >= 2)
    k = target["stop_after_dose"]
    params = load_parameters(None, [CAL_PARAMS])
    config = SolverConfig(rtol=1e-5, atol=1e-8)
    population = build_population(params, N_PATIENTS, SEED, ("nivolumab",),
                                  spec=load_population(CAL_POPULATION), config=config, chunk=6)

    def truncated(n):
        return parse_regimen({"name": f"nivo-{n}", "ici": [{"drug": "nivolumab", "dose": 240, "unit": "mg",
                                                            "interval_days": 14, "cycles": n, "start_day": 0}]})

    regimens = [truncated(k), truncated(k - 1), load_regimen(REGIMEN)]
    results = treat_population(population, regimens, days=DAYS, output_every=EVERY, config=config, chunk=6)
    crit = StopCriterion(THRESHOLD, 28.0, FOLLOW_UP, CONFIRM)
    reads = []
    for res in results:
        sod = 10.0 * res.observables["tumor_diameter_cm"].sum(-1)
        cells = res.observables["cancer_cells"].sum(-1)
        reads.append(dict(assess_control(res.days, res.status, sod, cells, crit), sod=sod, cells=cells))
    return target, k, reads


@pytest.mark.slow  # a 6-patient cohort through the solver (~5 min on 2 shared cores)
def test_summary_is_strict_json_with_one_entry_per_patient_and_consistent_quantiles(stop_run):
    out, s = stop_run
    assert len(s["patients"]) == N_PATIENTS and s["n_patients"] == N_PATIENTS
    assert s["doses_scheduled"] == 53  # 240 mg q2w from day 0 to day 728
    assert s["doses_inside_horizon"] == 14  # days 0, 14, ..., 182
    stops = [r["stop_day"] for r in s["patients"] if r["stop_day"] is not None]
    assert stops, "the shared cohort must contain a patient with a safe stop"
    assert s["stop_day_quantiles"]["q50"] == pytest.approx(float(np.quantile(stops, 0.5)))
    spared = [r["doses_spared"] for r in s["patients"] if r["stop_day"] is not None]
    assert s["doses_spared_quantiles"]["q90"] == pytest.approx(float(np.quantile(spared, 0.9)))
    for r in s["patients"]:
        if r["stop_day"] is not None:
            assert r["doses_given"] + r["doses_spared"] == 53
            # the stop day is the day of the last dose given (q2w from day 0)
            assert r["stop_day"] == pytest.approx(14.0 * (r["doses_given"] - 1) if r["doses_given"] else 0.0)
            assert r["confirmation"]["stop_controlled"] is True
            if r["doses_given"] > 0:
                assert r["confirmation"]["one_dose_earlier_controlled"] is False
    n_ctrl = sum(r["controlled_under_full_regimen"] for r in s["patients"])
    assert s["controlled_under_full_regimen"]["n"] == n_ctrl
    assert s["controlled_under_full_regimen"]["fraction"] == pytest.approx(n_ctrl / N_PATIENTS)
    # risk of a one-size stop: at the last dose inside the horizon nobody who has a stop regrows;
    # stopping before any dose regrows every controlled patient whose own stop needs a dose
    by_k = s["risk"]["by_stop_dose"]
    need = [r["doses_given"] for r in s["patients"] if r["stop_day"] is not None]
    assert by_k[0]["regrowth_fraction_of_controlled"] == pytest.approx(sum(g > 0 for g in need) / n_ctrl)
    assert by_k[max(need)]["regrowth_fraction_of_controlled"] == pytest.approx((n_ctrl - len(need)) / n_ctrl)
    run = _strict_load(out / "run.json")
    assert run["seed"] == SEED and "git_revision" in run and run["versions"]["jax"]
    assert (out / "stop_time.png").stat().st_size > 10_000


@pytest.mark.slow  # a 6-patient cohort through the solver (~5 min on 2 shared cores)
def test_stop_is_confirmed_by_solving_one_dose_fewer_and_the_stop_itself(independent):
    target, k, (at_stop, one_fewer, full) = independent
    i = target["patient"]
    assert at_stop["controlled"][i], "stopping after the reported dose must control"
    assert not one_fewer["controlled"][i], "stopping one dose earlier must regrow"
    # regrowth, not a borderline read: one dose fewer ends above its baseline and rising
    assert one_fewer["sod"][i, -1] > one_fewer["sod"][i, 0]
    assert one_fewer["cells"][i, -1] > one_fewer["cells"][i, -5] > 0
    assert at_stop["eliminated"][i] or at_stop["sod"][i, -1] <= THRESHOLD
    # the full regimen's burden at the horizon as the command reported it (same solver, other shapes)
    assert full["sod"][i, -1] == pytest.approx(target["sod_mm_at_horizon_full_regimen"], rel=1e-3)


@pytest.mark.slow  # a 6-patient cohort through the solver (~5 min on 2 shared cores)
def test_patient_never_controlled_gets_no_safe_stop(stop_run, independent):
    _, s = stop_run
    _, _, (_, _, full) = independent
    never = [r for r in s["patients"] if not r["controlled_under_full_regimen"]]
    assert never, "the shared cohort must contain a patient the full regimen does not control"
    for r in never:
        assert r["stop_day"] is None and r["doses_spared"] is None
        assert r["reason"] == "never controlled under full regimen"
        i = r["patient"]
        assert not full["controlled"][i] and full["sod"][i, -1] > THRESHOLD
    assert s["no_safe_stop_reasons"]["never controlled under full regimen"] == len(never)


def test_truncated_schedule_masks_every_dose_after_k():
    from qspjax.analysis.stop_time import dose_timeline, truncated_schedule
    from qspjax.regimen import load_regimen

    tl = dose_timeline(load_regimen(REGIMEN), ("nivolumab",), 60.0, 7.0)
    np.testing.assert_array_equal(tl.dose_days, [0.0, 14.0, 28.0, 42.0, 56.0])
    for k in range(6):
        s = truncated_schedule(tl.schedule, tl.row_ordinal, k)
        dosed = np.asarray(s.times)[np.asarray(s.dose_mg)[:, 0] > 0]
        np.testing.assert_array_equal(dosed, tl.dose_days[:k])
        assert float(np.asarray(s.dose_mg).sum()) == pytest.approx(240.0 * k)


def test_control_criterion_on_hand_made_courses():
    from qspjax.analysis.stop_time import StopCriterion, assess_control

    grid = np.arange(0.0, 71.0, 7.0)
    n = grid.size
    sod = np.array([np.full(n, 0.3),  # eliminated
                    np.linspace(40, 3, n),  # small and shrinking: controlled
                    np.concatenate([np.linspace(40, 2, n - 4), [2.2, 2.6, 3.0, 3.5]]),  # small but regrowing
                    np.linspace(40, 80, n),  # regrowth
                    np.full(n, 0.3)])  # a failed solve
    cells = np.array([np.r_[np.full(n - 1, 1e6), 0.0], np.linspace(1e9, 1e6, n),
                      np.r_[np.linspace(1e9, 1e5, n - 4), [2e5, 4e5, 8e5, 1.6e6]], np.linspace(1e9, 1e11, n),
                      np.zeros(n)])
    status = np.array([0, 0, 0, 0, 2])
    c = assess_control(grid, status, sod, cells, StopCriterion(burden_threshold_mm=5.0, trend_window_days=28.0))
    np.testing.assert_array_equal(c["eliminated"], [True, False, False, False, False])
    np.testing.assert_array_equal(c["controlled"], [True, True, False, False, False])


@pytest.mark.parametrize("argv,field", [
    (["--patients", "0"], "--patients"),
    (["--days", "-5"], "--days"),
    (["--burden-threshold-mm", "-1"], "--burden-threshold-mm"),
    (["--days", "60"], "--days"),  # not more than the 84-day minimum follow-up
    (["--output-every", "30"], "--output-every"),  # coarser than the 28-day trend window
    (["--rtol", "0.5"], "--rtol"),
])
def test_bad_flags_refused_naming_the_flag(tmp_path, capsys, argv, field):
    rc = main(["stop-time", "--regimen", str(REGIMEN), "--out", str(tmp_path / "o")] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and field in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_regimen_without_antibody_refused_naming_the_field(tmp_path, capsys):
    rt_only = tmp_path / "rt.yaml"
    rt_only.write_text("name: rt\nrt:\n  - {dose_per_fraction_gy: 8, fractions: 3, days: [0, 2, 4]}\n")
    rc = main(["stop-time", "--regimen", str(rt_only), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "rt.yaml" in err and "ici" in err and "nothing to stop" in err
    late = tmp_path / "late.yaml"
    late.write_text("name: late\nici:\n  - {drug: nivolumab, dose: 240, unit: mg, interval_days: 14, cycles: 2, "
                    "start_day: 380}\n")
    rc = main(["stop-time", "--regimen", str(late), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "ici[].start_day" in err and "380" in err
    assert not (tmp_path / "o").exists()
