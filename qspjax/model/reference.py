"""Mapping between the QSP-IO SimBiology export (species ids, output columns) and qspjax states."""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from qspjax.model._base import State
from qspjax.model.composer import QSPModel

# SimBiology species id -> (qspjax state, kind); kind: "shared", "lesion" (lesion 0) or "drug"
# (drug nivolumab, lesion 0 for ab_T).
SPECIES_TO_STATE: dict[str, str] = {
    "V_C.nT1": "nT1_C", "V_C.T1": "T1_C", "V_C.nT0": "nT0_C", "V_C.T0": "T0_C", "V_C.nivolumab": "ab_C",
    "V_P.nT1": "nT1_P", "V_P.T1": "T1_P", "V_P.nT0": "nT0_P", "V_P.T0": "T0_P", "V_P.nivolumab": "ab_P",
    "V_T.C_x": "C_x", "V_T.T_exh": "T_exh", "V_T.C1": "C1", "V_T.T1": "T1_T", "V_T.T0": "T0_T",
    "V_T.APC": "APC_T", "V_T.mAPC": "mAPC_T", "V_T.c": "c_T",
    "V_T.nivolumab": "ab_T",
    "V_LN.nT1": "nT1_LN", "V_LN.aT1": "aT1_LN", "V_LN.T1": "T1_LN",
    "V_LN.nT0": "nT0_LN", "V_LN.aT0": "aT0_LN", "V_LN.T0": "T0_LN", "V_LN.APC": "APC_LN",
    "V_LN.mAPC": "mAPC_LN", "V_LN.nivolumab": "ab_LN",
    "V_e.P0": "P0_e", "V_e.p0": "p0_e", "V_e.P1": "P1_e", "V_e.p1": "p1_e",
    "A_e.M1": "M1_e", "A_e.M1p0": "M1p0_e", "A_e.M1p1": "M1p1_e",
    "A_s.M1": "M1_s", "A_s.M1p0": "M1p0_s", "A_s.M1p1": "M1p1_s",
}
# Species that qspjax holds at quasi-steady state (algebraic, not states): SimBiology id -> aux key
SYNAPSE_SPECIES = ("PD1_PDL1", "PD1_PDL2", "PD1", "PDL1", "PDL2", "PD1_aPD1", "PD1_aPD1_PD1", "PDL1_aPDL1",
                   "PDL1_aPDL1_PDL1")
QSS_SPECIES: dict[str, str] = {"V_T.P0": "P0_T", "V_T.P1": "P1_T", "V_LN.IL2": "IL2_LN",
                               **{f"syn_T1_C1.{n}": n for n in SYNAPSE_SPECIES}}


def state_from_species(model: QSPModel, species: Mapping[str, float], drug: str = "nivolumab") -> State:
    """A qspjax state from SimBiology species values; every lesion gets the exported tumor state.

    Species qspjax holds at quasi-steady state (:data:`QSS_SPECIES`) are not states and are skipped.
    """
    y = model.zeros()
    d = model.drugs.index(drug) if drug in model.drugs else None
    for sid, value in species.items():
        if sid in QSS_SPECIES:
            continue
        name = SPECIES_TO_STATE[sid]
        if name.startswith("ab_"):
            if d is not None:
                y[name] = y[name].at[d].set(value)
        else:
            y[name] = jnp.full_like(y[name], value)
    return y


def species_from_state(model: QSPModel, y: State, lesion: int = 0, drug: str = "nivolumab") -> dict[str, float]:
    """Inverse of :func:`state_from_species` for one lesion."""
    d = model.drugs.index(drug) if drug in model.drugs else None
    out = {}
    for sid, name in SPECIES_TO_STATE.items():
        v = np.asarray(y[name])
        if name.startswith("ab_"):
            out[sid] = float(v[d, lesion] if name == "ab_T" else v[d]) if d is not None else 0.0
        elif v.ndim >= 1 and v.shape[-1] == model.n_lesions and model.state_specs()[name].shape == "lesion":
            out[sid] = float(v[..., lesion])
        else:
            out[sid] = float(v)
    aux = model.assignments(y)
    for sid, key in QSS_SPECIES.items():
        v = aux["synapse"][key] if sid.startswith("syn_") else aux[key]
        out[sid] = float(np.ravel(np.asarray(v))[lesion if np.size(v) > 1 else 0])
    return out


SIMBIOLOGY_COLUMNS = ("cancer_cells", "dead_cells", "t_cells", "tumour_volume_l", "tumour_diameter_cm",
                      "pd1_occupancy", "tcell_density_per_ul", "drug_plasma_molar", "drug_tumor_molar",
                      "cd8_tumor_cells", "treg_tumor_cells")


def simbiology_columns(model: QSPModel, y: State, lesion: int = 0, drug: str = "nivolumab") -> dict:
    """The columns of ``example1_treated_simbiology.csv`` (same names and units) from a state.

    Works on one state or on a trajectory (leading time axis).
    """
    obs = model.observables(y) if jnp.ndim(y["nT1_C"]) == 0 else _vmap_obs(model, y)
    d = model.drugs.index(drug) if drug in model.drugs else None
    zero = jnp.zeros_like(obs["cancer_cells"][..., lesion])
    return {
        "cancer_cells": obs["cancer_cells"][..., lesion],
        "dead_cells": obs["dead_cells"][..., lesion],
        "t_cells": obs["t_cells_tumor"][..., lesion],
        "tumour_volume_l": obs["tumor_volume_l"][..., lesion],
        "tumour_diameter_cm": obs["tumor_diameter_cm"][..., lesion],
        "pd1_occupancy": obs["pd1_signal"][..., lesion],
        "tcell_density_per_ul": obs["cd8_density_per_ul"][..., lesion],
        "drug_plasma_molar": obs["drug_plasma_molar"][..., d] if d is not None else zero,
        "drug_tumor_molar": obs["drug_tumor_molar"][..., d, lesion] if d is not None else zero,
        "cd8_tumor_cells": obs["cd8_tumor_cells"][..., lesion],
        "treg_tumor_cells": obs["treg_tumor_cells"][..., lesion],
    }


def _vmap_obs(model, y):
    import jax

    return jax.vmap(model.observables)(y)
