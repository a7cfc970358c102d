"""Antibody PK: every drug's simulated terminal half-life is its label's (within 20 %)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import yaml

from qspjax.model import QSPModel
from qspjax.model.pk import KNOWN_DRUGS
from qspjax.model.reference import state_from_species
from qspjax.params import PARAMS_DIR, load_parameters
from qspjax.regimen import compile_schedule, parse_regimen
from qspjax.solver.simulate import STATUS_OK, SolverConfig, simulate_patient


@pytest.fixture(scope="module")
def single_doses():
    """One 200 mg dose of every antibody at day 0 (independent compartments, one solve)."""
    params = load_parameters(extra=[PARAMS_DIR / "drugs.yaml"])  # label-fitted PK for every drug
    drugs = tuple(KNOWN_DRUGS)
    model = QSPModel.from_values(params.model_values(), drugs=drugs, n_lesions=1)
    y0 = state_from_species(model, params.initial_state)
    reg = parse_regimen({"name": "single", "ici": [
        {"drug": d, "dose": 200, "unit": "mg", "interval_days": 1000, "cycles": 1} for d in drugs]})
    sched = compile_schedule(reg, drugs, np.array([0.0, 1.0, 120.0, 160.0]), n_lesions=1)
    traj = jax.jit(lambda m, y: simulate_patient(m, y, sched, SolverConfig()))(model, y0)
    assert int(traj.status) == STATUS_OK
    return drugs, np.asarray(traj.ys["ab_C"]), np.asarray(sched.output_days), params


def test_every_drug_has_pk_parameters_and_a_label(params):
    doc = yaml.safe_load(open(PARAMS_DIR / "drugs.yaml"))["drugs"]
    assert set(doc) == set(KNOWN_DRUGS)
    for d in KNOWN_DRUGS:
        assert doc[d]["label"]["half_life_days"] > 0 and doc[d]["label"]["source"]
        assert params.targets[d] in ("PD1", "PDL1", "CTLA4")


@pytest.mark.parametrize("drug", KNOWN_DRUGS)
def test_terminal_half_life_matches_label(single_doses, drug):
    drugs, conc, times, _ = single_doses
    label = yaml.safe_load(open(PARAMS_DIR / "drugs.yaml"))["drugs"][drug]["label"]["half_life_days"]
    i = drugs.index(drug)
    c120, c160 = conc[2, i], conc[3, i]
    half_life = (times[3] - times[2]) * np.log(2.0) / np.log(c120 / c160)
    assert half_life == pytest.approx(label, rel=0.2)
    # dose in mg -> molar in the 5 L central compartment through the molecular weight
    mw = yaml.safe_load(open(PARAMS_DIR / "drugs.yaml"))["drugs"][drug]["molecular_weight"]["value"]
    assert conc[0, i] == pytest.approx(200e-3 / mw / 5.0, rel=1e-12)
