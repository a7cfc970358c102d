"""The flat public API: every advertised name resolves, and nothing else pretends to."""

from __future__ import annotations

import pytest

import qspjax
import qspjax.analysis


@pytest.mark.parametrize("module", [qspjax, qspjax.analysis])
def test_every_exported_name_resolves_and_unknown_names_raise(module):
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_thing"):
        getattr(module, "no_such_thing")


def test_flat_names_are_the_implementations():
    from qspjax.runner import run_cohort
    from qspjax.solver.simulate import SolverConfig

    assert qspjax.run_cohort is run_cohort and qspjax.SolverConfig is SolverConfig
    assert qspjax.analysis.sobol_indices.__module__ == "qspjax.analysis.sensitivity"
