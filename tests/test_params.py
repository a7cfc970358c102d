"""Parameter files: unit conversion on load and refusal of bad entries."""

from __future__ import annotations

import pytest

from qspjax.errors import QSPValidationError
from qspjax.params import load_parameter_file
from qspjax.units import conversion_factor


def test_units_convert_to_internal(params):
    assert params.values["q_T1_P_in"] == pytest.approx(0.0402 * 1440)  # 1/minute -> 1/day
    assert params.values["V_LN"] == pytest.approx(1374.44678594553e-6)  # mm^3 -> L
    assert params.values["k_IL2_cons"] == pytest.approx(6e-6 * 1e-9 * 24)  # nmol/cell/h -> mol/cell/day
    assert params.values["kon_PD1_PDL1"] == pytest.approx(0.0583333333333333 / 0.602214076 * 86400, rel=1e-9)
    assert conversion_factor("1/nanometer", "molarity*micrometer^2/molecule") == pytest.approx(1e3 / 6.02214076e23 * 1e15 / 1e6 * 1e-3 * 1e9, rel=1e-9)


@pytest.mark.parametrize("text,field", [
    ("parameters:\n  k_C1_growthh: {value: 0.01, unit: 1/day}\n", "parameters.k_C1_growthh"),
    ("parameters:\n  k_C1_growth: {value: 0.01, unit: liter}\n", "parameters.k_C1_growth.unit"),
    ("parameters:\n  k_C1_growth: {value: .nan, unit: 1/day}\n", "parameters.k_C1_growth.value"),
    ("parameters:\n  k_C1_growth: {unit: 1/day}\n", "parameters.k_C1_growth.value"),
    ("parameters:\n  k_C1_growth: {value: -0.01, unit: 1/day}\n", "parameters.k_C1_growth.value"),
    ("parameters:\n  k_C1_growth: {value: 0.01, unit: 1/day, sorce: x}\n", "parameters.k_C1_growth.sorce"),
    ("drugs:\n  nivolumab: {target: PD2}\n", "drugs.nivolumab.target"),
    ("drugs:\n  aspirin: {target: PD1}\n", "drugs.aspirin"),
    ("paramters: {}\n", "paramters"),
])
def test_bad_parameter_entries_are_refused_naming_the_field(tmp_path, text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(QSPValidationError) as exc:
        load_parameter_file(p)
    assert exc.value.field == field
    assert str(p) in str(exc.value)
