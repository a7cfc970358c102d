"""Unit conversion of parameter files into the model's internal units (via ``pint``).

Internal units: time in days, volumes in litres, amounts of drug, antigen and cytokine in moles
(concentrations in mol/L), cells as counts, membrane densities in molecules/µm², areas in µm².
Each model module declares the internal unit of every parameter it reads; a parameter file may
give any unit of the same dimension (SimBiology's export uses minutes, seconds, mL, nM, ...).
"""

from __future__ import annotations

import functools

import pint

AVOGADRO = 6.02214076e23  # 1/mol, exact (SI 2019)


@functools.cache
def registry() -> pint.UnitRegistry:
    ureg = pint.UnitRegistry()
    ureg.define("cell = [cell_count]")
    ureg.define(f"molecule = mole / {AVOGADRO!r}")
    ureg.define("molarity = mole / liter")
    ureg.define("millimolarity = 1e-3 * molarity")
    ureg.define("micromolarity = 1e-6 * molarity")
    ureg.define("nanomolarity = 1e-9 * molarity")
    ureg.define("picomolarity = 1e-12 * molarity")
    return ureg


def _parse(unit: str) -> pint.Unit:
    text = unit.strip()
    if text in ("", "dimensionless"):
        return registry().dimensionless
    return registry().parse_units(text)


def conversion_factor(from_unit: str, to_unit: str) -> float:
    """Multiply a value in ``from_unit`` by this to express it in ``to_unit``.

    Raises ``ValueError`` naming both units if they are of different dimensions or unknown.
    """
    try:
        q = registry().Quantity(1.0, _parse(from_unit))
        return float(q.to(_parse(to_unit)).magnitude)
    except (pint.errors.DimensionalityError, pint.errors.UndefinedUnitError, AttributeError, TypeError) as exc:
        raise ValueError(f"cannot convert {from_unit!r} to {to_unit!r}: {exc}") from None
