"""Regimen validation: every kind of bad input is refused with the field named; schedules compile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qspjax.errors import QSPValidationError
from qspjax.regimen import compile_schedule, load_regimen, parse_regimen

REGIMENS = Path(__file__).resolve().parents[1] / "configs" / "regimens"
ICI = {"drug": "nivolumab", "dose": 240, "unit": "mg", "interval_days": 14, "cycles": 3}
RT = {"dose_per_fraction_gy": 8, "fractions": 3, "days": [0, 2, 4]}


def _bad(field_fragment: str, doc):
    with pytest.raises(QSPValidationError) as exc:
        parse_regimen(doc, source="bad.yaml")
    assert "bad.yaml" in str(exc.value)
    assert field_fragment in exc.value.field, exc.value.field
    return exc.value


@pytest.mark.parametrize("path", sorted(REGIMENS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_regimens_load(path):
    reg = load_regimen(path)
    assert reg.name and (reg.ici or reg.rt)


@pytest.mark.parametrize("field,change,allowed", [
    ("ici[0].drug", {"drug": "nivolumabb"}, "allowed values"),
    ("ici[0].unit", {"unit": "mg/m2"}, "'mg', 'mg/kg'"),
    ("ici[0].dose", {"dose": -5}, "> 0"),
    ("ici[0].dose", {"dose": float("nan")}, "finite"),
    ("ici[0].dose", {"dose": "200"}, "number"),
    ("ici[0].interval_days", {"interval_days": 0}, "> 0"),
    ("ici[0].start_day", {"start_day": -1}, ">= 0"),
    ("ici[0].cycles", {"cycles": 2.5}, "integer"),
    ("ici[0].intervall_days", {"intervall_days": 14}, "unknown key"),
])
def test_bad_ici_entries_are_refused_naming_the_field(field, change, allowed):
    err = _bad(field, {"name": "x", "ici": [dict(ICI, **change)]})
    assert allowed in err.allowed


def test_cycles_and_end_day_exclusive_and_one_required():
    entry = dict(ICI)
    entry.pop("cycles")
    _bad("ici[0].cycles", {"name": "x", "ici": [entry]})
    _bad("ici[0].cycles", {"name": "x", "ici": [dict(ICI, end_day=100)]})


def test_rt_errors():
    _bad("rt[0].days", {"name": "x", "rt": [dict(RT, days=[0, 2])]})
    _bad("rt[0].days", {"name": "x", "rt": [dict(RT, days=[0, 0, 4])]})
    _bad("rt[0].days[0]", {"name": "x", "rt": [dict(RT, days=[-1, 2, 4])]})
    _bad("rt[0].lesion", {"name": "x", "rt": [dict(RT, lesion="liver")]})
    _bad("rt[0].dose_per_fraction_gy", {"name": "x", "rt": [dict(RT, dose_per_fraction_gy=0)]})
    overlap = {"name": "x", "rt": [RT, {"dose_per_fraction_gy": 2, "fractions": 1, "days": [2]}]}
    assert "overlaps" in _bad("rt[1].days", overlap).allowed


def test_missing_and_wrong_top_level_fields():
    _bad("name", {"ici": [ICI]})
    _bad("ici", {"name": "x", "ici": {"drug": "nivolumab"}})
    _bad("icii", {"name": "x", "icii": []})
    _bad("chemo[0].kill_fraction", {"name": "x", "chemo": [
        {"name": "c", "kill_fraction": 1.5, "interval_days": 21, "cycles": 1}]})


def test_unreadable_and_truncated_files(tmp_path):
    with pytest.raises(QSPValidationError, match="cannot be read"):
        load_regimen(tmp_path / "missing.yaml")
    p = tmp_path / "trunc.yaml"
    p.write_text("name: x\nici:\n  - {drug: nivolumab, dose: 240, unit: mg, interval")
    with pytest.raises(QSPValidationError, match="not valid YAML"):
        load_regimen(p)


def test_weekday_fractions_and_end_day():
    reg = parse_regimen({"name": "x", "rt": [{"dose_per_fraction_gy": 2, "fractions": 7, "start_day": 0}],
                         "ici": [{"drug": "durvalumab", "dose": 10, "unit": "mg/kg", "interval_days": 14,
                                  "end_day": 42, "start_day": 0}]})
    assert reg.rt[0].days == (0, 1, 2, 3, 4, 7, 8)
    assert reg.ici[0].days() == [0, 14, 28, 42]
    assert reg.rt[0].technique == "conventional"


def test_compile_places_events_exactly_and_pads():
    reg = parse_regimen({"name": "x", "ici": [dict(ICI, start_day=0.5)], "rt": [RT]})
    s = compile_schedule(reg, ("nivolumab",), np.arange(0.0, 30.0, 7.0), n_lesions=2, n_points=20)
    times = np.asarray(s.times)
    assert {0.5, 14.5, 2.0, 4.0} <= set(times.tolist()) and 28.5 not in times  # past the horizon
    assert times.shape == (20,) and np.all(np.diff(times) >= 0)
    assert np.asarray(s.dose_mg)[times.tolist().index(14.5), 0] == 240
    assert np.asarray(s.rt_dose_gy)[times.tolist().index(2.0)].tolist() == [8.0, 0.0]
    assert np.asarray(s.output_days).tolist() == [0.0, 7.0, 14.0, 21.0, 28.0]
    assert int((times == 28.0).sum()) == 20 - 5  # events 0.5, 2, 4, 14.5, the first day 0, padded with the last
    with pytest.raises(QSPValidationError):
        compile_schedule(reg, ("pembrolizumab",), np.arange(0.0, 30.0), 2)


def test_surgery_pathology_flag_is_read_and_checked():
    doc = {"name": "resect", "surgery": [{"day": 50, "lesion": "irradiated"},
                                         {"day": 50, "lesion": "non_irradiated", "pathology": False}]}
    regimen = parse_regimen(doc)
    assert [s.pathology for s in regimen.surgery] == [True, False]
    assert regimen.pathology_lesions(2).tolist() == [True, False]
    assert regimen.pathology_lesions(1).tolist() == [True]
    read = regimen.read_specimens(np.array([[0.2, 0.5], [np.nan, 0.1]]))
    assert read[0, 0] == 0.2 and np.isnan(read[1, 0]) and np.all(np.isnan(read[:, 1]))
    sched = compile_schedule(regimen, (), np.array([0.0, 50.0, 60.0]), n_lesions=2)
    assert np.asarray(sched.surgery).sum(axis=0).tolist() == [1.0, 1.0]  # both lesions resected
    _bad("surgery[1].pathology", {"name": "x", "surgery": [{"day": 5}, {"day": 5, "lesion": "non_irradiated",
                                                                          "pathology": "no"}]})
    _bad("surgery[1]", {"name": "x", "surgery": [{"day": 5}, {"day": 5, "lesion": "irradiated"}]})
