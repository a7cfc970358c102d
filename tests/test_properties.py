"""Property-based tests (hypothesis) of regimens and parameter files.

Valid regimens are generated together with the event days they must produce, computed here
independently of ``qspjax.regimen``; every day is a multiple of 0.5, so days are exact in
binary floating point and compared with ``==``. Invalid inputs are single mutations of valid
documents and must raise :class:`QSPValidationError`, never another exception. A few generated
regimens are simulated with one compiled simulator: all are compiled to the same padded
timeline and output grid.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qspjax.errors import QSPValidationError
from qspjax.model.pk import KNOWN_DRUGS
from qspjax.params import load_parameter_file
from qspjax.regimen import LESIONS, compile_schedule, parse_regimen, timeline_points

FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

half_days = st.integers(0, 80).map(lambda k: k / 2.0)  # 0 .. 40 days in steps of half a day
intervals = st.integers(1, 42).map(lambda k: k / 2.0)


# ---------------------------------------------------------------------------------------------
# Strategies: a valid document and the events it must compile to
# ---------------------------------------------------------------------------------------------
@st.composite
def repeated_course(draw, max_cycles: int):
    """(keys of the course's schedule, its days)."""
    start, interval = draw(half_days), draw(intervals)
    cycles = draw(st.integers(1, max_cycles))
    days = [start + i * interval for i in range(cycles)]
    if draw(st.booleans()):
        keys = {"interval_days": interval, "cycles": cycles}
    else:  # an end day anywhere before the next cycle gives the same days
        slack = draw(st.integers(0, max(0, int(2 * interval) - 1))) / 2.0
        keys = {"interval_days": interval, "end_day": days[-1] + slack}
    if start != 0.0 or draw(st.booleans()):
        keys["start_day"] = start
    return keys, days


@st.composite
def ici_course(draw, max_cycles: int = 4):
    keys, days = draw(repeated_course(max_cycles))
    unit = draw(st.sampled_from(("mg", "mg/kg")))
    dose = draw(st.floats(1.0, 2000.0) if unit == "mg" else st.floats(0.1, 20.0))
    doc = {"drug": draw(st.sampled_from(KNOWN_DRUGS)), "dose": dose, "unit": unit, **keys}
    return doc, days


@st.composite
def chemo_course(draw, max_cycles: int = 2):
    keys, days = draw(repeated_course(max_cycles))
    doc = {"name": draw(st.sampled_from(("carboplatin-paclitaxel", "cisplatin-etoposide"))),
           "kill_fraction": draw(st.floats(0.0, 0.9)), **keys}
    return doc, days


def weekday_days(start: float, fractions: int, per_week: int) -> list[float]:
    """Treatment days of a course given on ``per_week`` consecutive days each week."""
    return [start + 7 * (i // per_week) + i % per_week for i in range(fractions)]


@st.composite
def rt_courses(draw, lesion: str, max_fractions: int = 5):
    """The RT courses on one lesion: none, one weekday-form course, or explicit days split
    over one or two courses (so no two fractions on the lesion share a day)."""
    form = draw(st.sampled_from(("none", "weekdays", "explicit")))
    dose = float(draw(st.integers(1, 24)))
    base = {"dose_per_fraction_gy": dose}
    if lesion != "irradiated" or draw(st.booleans()):
        base["lesion"] = lesion
    if draw(st.booleans()):
        base["technique"] = draw(st.sampled_from(("sbrt", "conventional")))
    if form == "none":
        return []
    if form == "weekdays":
        start = float(draw(st.integers(0, 20)))
        n = draw(st.integers(1, max_fractions))
        per_week = draw(st.integers(1, 7))
        doc = dict(base, fractions=n, start_day=start)
        if per_week != 5 or draw(st.booleans()):
            doc["days_per_week"] = per_week
        return [(doc, weekday_days(start, n, per_week))]
    days = sorted(draw(st.sets(half_days, min_size=1, max_size=max_fractions)))
    split = draw(st.integers(1, len(days)))
    parts = [days[:split], days[split:]] if split < len(days) else [days]
    return [(dict(base, fractions=len(p), days=p), p) for p in parts]


@st.composite
def regimens(draw, max_ici: int = 3, max_ici_cycles: int = 4, max_fractions: int = 5):
    """(document, expected events) where expected holds (day, kind, detail) tuples."""
    doc: dict = {"name": draw(st.text("abcdefghij-_ 0123456789", min_size=1, max_size=12).filter(str.strip))}
    expected = []
    ici = [draw(ici_course(max_ici_cycles)) for _ in range(draw(st.integers(0, max_ici)))]
    rt = [c for lesion in LESIONS for c in draw(rt_courses(lesion, max_fractions))]
    chemo = [draw(chemo_course()) for _ in range(draw(st.integers(0, 1)))]
    surgery = [{"day": draw(half_days), "lesion": draw(st.sampled_from(LESIONS))}
               for _ in range(draw(st.integers(0, 1)))]
    if ici:
        doc["ici"] = [c for c, _ in ici]
        expected += [(d, "ici", c) for c, days in ici for d in days]
    if rt:
        doc["rt"] = [c for c, _ in rt]
        expected += [(d, "rt", c) for c, days in rt for d in days]
    if chemo:
        doc["chemo"] = [c for c, _ in chemo]
        expected += [(d, "chemo", c) for c, days in chemo for d in days]
    if surgery:
        doc["surgery"] = surgery
        expected += [(s["day"], "surgery", s) for s in surgery]
    if draw(st.booleans()):
        doc["description"] = "generated"
    return doc, expected


# ---------------------------------------------------------------------------------------------
# Valid regimens parse and compile exactly
# ---------------------------------------------------------------------------------------------
@FAST
@given(regimens(), st.integers(1, 40), st.integers(0, 5))
def test_valid_regimens_parse_and_compile_to_exact_fixed_shape_events(generated, horizon, pad):
    doc, expected = generated
    reg = parse_regimen(copy.deepcopy(doc), source="generated.yaml")
    grid = np.arange(0.0, horizon + 1e-9, 1.0)
    on_grid = [e for e in expected if e[0] <= horizon]
    k = len({e[0] for e in on_grid} | {0.0, float(horizon)})
    assert timeline_points(reg, grid) == k
    s = compile_schedule(reg, KNOWN_DRUGS, grid, n_lesions=2, n_points=k + pad)

    times = np.asarray(s.times)
    assert times.shape == (k + pad,) and s.dose_mg.shape == (k + pad, len(KNOWN_DRUGS))
    assert s.rt_dose_gy.shape == (k + pad, 2) and s.surgery.shape == (k + pad, 2)
    assert np.all(np.diff(times) >= 0) and np.all(times[k:] == horizon)
    assert set(times.tolist()) == {e[0] for e in on_grid} | {0.0, float(horizon)}
    np.testing.assert_array_equal(np.asarray(s.output_days), grid)
    row = {t: i for i, t in enumerate(times[:k].tolist())}

    want_mg, want_kg = np.zeros((k, len(KNOWN_DRUGS))), np.zeros((k, len(KNOWN_DRUGS)))
    want_rt, want_cut, survive = np.zeros((k, 2)), np.zeros((k, 2)), np.ones(k)
    for day, kind, c in on_grid:
        i = row[day]
        if kind == "ici":
            (want_mg if c["unit"] == "mg" else want_kg)[i, KNOWN_DRUGS.index(c["drug"])] += c["dose"]
        elif kind == "rt":
            want_rt[i, LESIONS.index(c.get("lesion", "irradiated"))] = c["dose_per_fraction_gy"]
        elif kind == "chemo":
            survive[i] *= 1.0 - c["kill_fraction"]
        else:
            want_cut[i, LESIONS.index(c["lesion"])] = 1.0
    np.testing.assert_allclose(np.asarray(s.dose_mg)[:k], want_mg, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(s.dose_mg_per_kg)[:k], want_kg, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(s.rt_dose_gy)[:k], want_rt)
    np.testing.assert_allclose(np.asarray(s.chemo_kill)[:k], 1.0 - survive, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(s.surgery)[:k], want_cut)
    # padding rows are zero-length segments that must carry no treatment
    for leaf in (s.dose_mg, s.dose_mg_per_kg, s.rt_dose_gy, s.chemo_kill, s.surgery):
        assert not np.any(np.asarray(leaf)[k:])


# ---------------------------------------------------------------------------------------------
# A few generated regimens simulated with one compiled simulator
# ---------------------------------------------------------------------------------------------
SIM_HORIZON = 20.0
SIM_GRID = np.arange(0.0, SIM_HORIZON + 1e-9, 2.0)
# Bounds of the simulated strategy: 2 ICI courses x 3 cycles, 4 fractions per lesion, 2 chemo
# cycles, 1 surgery, plus the first and last output days.
SIM_POINTS = 2 * 3 + 2 * 4 + 2 + 1 + 2


@pytest.fixture(scope="module")
def two_lesion_patient(params):
    """One nominal two-lesion patient carrying every known drug (so any generated regimen fits)."""
    from qspjax.model.reference import state_from_species
    from qspjax.vpop import build_models

    models = build_models(params, {}, 1, KNOWN_DRUGS, 2)
    y0 = jax.vmap(lambda m: state_from_species(m, params.initial_state))(models)
    y0["C1"] = y0["C1"].at[:, 1].multiply(0.3)
    scales = {k: np.asarray(v)[:, None] for k, v in jax.vmap(lambda m: m.scales())(models).items()}
    return models, y0, scales


@pytest.mark.slow  # one compilation of the all-drug two-lesion simulator (~30-50 s on 2 cores)
def test_generated_regimens_simulate_to_finite_non_negative_states_without_recompiling(two_lesion_patient):
    from qspjax.solver import simulate as sim

    models, y0, scales = two_lesion_patient
    sizes = []
    config = sim.SolverConfig()

    @settings(max_examples=8, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(regimens(max_ici=2, max_ici_cycles=3, max_fractions=4))
    def check(generated):
        doc, _ = generated
        reg = parse_regimen(doc, source="generated.yaml")
        assume(reg.ici or reg.rt or reg.chemo)
        schedule = compile_schedule(reg, KNOWN_DRUGS, SIM_GRID, n_lesions=2, n_points=SIM_POINTS)
        traj = sim.simulate_batch(models, y0, schedule, config)
        sizes.append(sim._simulate_queue_jit._cached._cache_size())  # concrete inputs: the lane queue
        assert int(traj.status[0]) == sim.STATUS_OK, doc
        for name, value in traj.ys.items():
            v = np.asarray(value)
            assert np.all(np.isfinite(v)), name
            # Error control is absolute on state / typical magnitude, so a state that should be zero
            # (an antibody never given) carries round-off of order atol x its scale, of either sign.
            assert np.all(v >= -1e3 * config.atol * scales[name]), name
        cut = [s.lesion for s in reg.surgery if s.day <= SIM_HORIZON]
        for lesion in cut:  # a resected lesion has no cancer cells afterwards
            assert float(traj.ys["C1"][0, -1, LESIONS.index(lesion)]) == 0.0

    check()
    assert len(sizes) >= 2 and len(set(sizes)) == 1, sizes  # one compilation served every example


# ---------------------------------------------------------------------------------------------
# Invalid regimens: single mutations of valid documents
# ---------------------------------------------------------------------------------------------
REQUIRED = {"ici": ("drug", "dose", "unit", "interval_days"), "rt": ("dose_per_fraction_gy", "fractions"),
            "chemo": ("name", "kill_fraction", "interval_days"), "surgery": ("day",)}
NUMERIC = {"dose", "interval_days", "cycles", "end_day", "start_day", "dose_per_fraction_gy", "fractions",
           "days_per_week", "kill_fraction", "day"}
WRONG_TYPES = st.sampled_from(["12", "twelve", [], [1.0], {"value": 1}, None, True, float("nan")])
STRING_WRONG_TYPES = st.sampled_from([12, 0.5, [], ["nivolumab"], {"name": "x"}, None, True])


@st.composite
def mutated_regimens(draw):
    """A valid document with exactly one mutation that makes it invalid, and what was done."""
    doc, _ = draw(regimens())
    doc = copy.deepcopy(doc)
    entries = [(section, i, e) for section in ("ici", "rt", "chemo", "surgery") for i, e in enumerate(doc.get(section, []))]
    kinds = ["unknown_top_key", "top_wrong_type", "missing_name"] + (["entry"] * 4 if entries else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "unknown_top_key":
        doc[draw(st.sampled_from(["nme", "icis", "radiotherapy", "Chemo", "surgeries"]))] = []
        return doc, kind
    if kind == "missing_name":
        del doc["name"]
        return doc, kind
    if kind == "top_wrong_type":
        key = draw(st.sampled_from(["name", "ici", "rt", "chemo", "surgery", "description"]))
        doc[key] = draw(STRING_WRONG_TYPES if key in ("name", "description") else st.sampled_from(["abc", 3, {"a": 1}]))
        assume(not (key == "name" and isinstance(doc[key], str)))
        return doc, f"{kind}:{key}"
    section, i, entry = draw(st.sampled_from(entries))
    what = draw(st.sampled_from(["unknown_key", "missing_required", "wrong_type", "negative", "not_a_mapping"]))
    if what == "unknown_key":
        entry[draw(st.sampled_from(["dose_mg", "intervall_days", "Drug", "cycle", "lesions", "day_of"]))] = 1
    elif what == "missing_required":
        del entry[draw(st.sampled_from(REQUIRED[section]))]
    elif what == "not_a_mapping":
        doc[section][i] = draw(st.sampled_from(["nivolumab 240 mg", 240, [entry], None]))
    else:
        numeric = sorted(k for k in entry if k in NUMERIC)
        if what == "negative":
            assume(numeric)
            key = draw(st.sampled_from(numeric))
            entry[key] = -(abs(entry[key]) + draw(st.floats(0.5, 100.0)))
        else:
            key = draw(st.sampled_from(sorted(entry)))
            value = draw(STRING_WRONG_TYPES if key not in NUMERIC else WRONG_TYPES)
            if key == "days":
                value = draw(st.sampled_from(["0, 2, 4", 3, {"0": 1}, None, [None], ["x"]]))
            entry[key] = value
    return doc, f"{section}:{what}"


@FAST
@given(mutated_regimens())
def test_mutated_regimens_raise_validation_errors_and_nothing_else(mutated):
    doc, what = mutated
    try:
        parse_regimen(doc, source="mutated.yaml")
    except QSPValidationError as exc:
        assert exc.source == "mutated.yaml" and exc.field and exc.allowed
        assert "\n" not in str(exc)
    else:
        pytest.fail(f"{what} was accepted: {doc!r}")


# ---------------------------------------------------------------------------------------------
# Parameter files: mutations through the file loader
# ---------------------------------------------------------------------------------------------
VALID_PARAMS = {
    "parameters": {"k_C1_growth": {"value": 0.0126, "unit": "1/day", "source": "test"}},
    "drugs": {"nivolumab": {"target": "PD1", "k_cl": {"value": 0.2, "unit": "1/day"}}},
    "initial_state": [{"id": "V_T.C1", "value": 1.0e7, "unit": "cell"}],
}


@st.composite
def mutated_parameter_documents(draw):
    doc = copy.deepcopy(VALID_PARAMS)
    entry = draw(st.sampled_from(["parameter", "drug_param", "initial"]))
    target = {"parameter": doc["parameters"]["k_C1_growth"], "drug_param": doc["drugs"]["nivolumab"]["k_cl"],
              "initial": doc["initial_state"][0]}[entry]
    what = draw(st.sampled_from(["wrong_type", "unknown_key", "missing_value", "bad_unit", "non_finite"]
                                + (["negative"] if entry == "initial" else [])))
    if what == "wrong_type":
        target["value"] = draw(st.sampled_from(["0.01", [0.01], {"v": 1}, None, True]))
    elif what == "unknown_key":
        target[draw(st.sampled_from(["valeu", "units", "sorce", "Value"]))] = 1
    elif what == "missing_value":
        del target["value"]
    elif what == "bad_unit":
        assume(entry != "initial")  # initial amounts are taken in the export's own units
        target["unit"] = draw(st.sampled_from(["furlong", "gram", "mole/second", 5]))
    elif what == "non_finite":
        target["value"] = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
    else:
        target["value"] = -draw(st.floats(1e-9, 1e9))
    return doc, f"{entry}:{what}"


def test_the_unmutated_parameter_document_loads():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_text(yaml.safe_dump(VALID_PARAMS), encoding="utf-8")
        ps = load_parameter_file(path)
    assert ps.values["k_C1_growth"] == pytest.approx(0.0126)
    assert ps.targets["nivolumab"] == "PD1" and ps.initial_state["V_T.C1"] == 1.0e7


@FAST
@given(mutated_parameter_documents())
def test_mutated_parameter_files_raise_validation_errors_and_nothing_else(mutated):
    doc, what = mutated
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        with pytest.raises(QSPValidationError) as exc:
            load_parameter_file(path)
    assert exc.value.source == str(path), what
