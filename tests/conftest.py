"""Shared, session-scoped fixtures: parameters, models and compiled solvers are built once."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import qspjax  # noqa: F401  (float64 on)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference" / "qspio"


@pytest.fixture(scope="session")
def params():
    from qspjax.params import load_parameters

    return load_parameters()


@pytest.fixture(scope="session")
def reference_model(params):
    """The QSP-IO reference configuration: one lesion, nivolumab only."""
    from qspjax.model import QSPModel

    return QSPModel.from_values(params.model_values(), drugs=("nivolumab",), n_lesions=1)


@pytest.fixture(scope="session")
def reference_state(params, reference_model):
    from qspjax.model.reference import state_from_species

    return state_from_species(reference_model, params.initial_state)


@pytest.fixture(scope="session")
def simbiology_solution():
    rows = list(csv.DictReader(open(REFERENCE / "example1_treated_simbiology.csv")))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
