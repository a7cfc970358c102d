"""Cancer cells of each lesion: logistic growth to a carrying capacity, natural death, killing by
effector T cells, the dead-cell pool and the lesion volume and diameter (QSP-IO, Sové et al. 2020).
Cells lethally hit by RT or chemotherapy stop dividing and die over the following days
(``C_doomed``), releasing antigen and DAMPs with an immunogenicity that depends on the dose per
fraction (``C_doomed_icd``); without RT or chemotherapy both are zero and the model is QSP-IO's."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp

from qspjax.model._base import ParamSpec, Params, State, StateSpec


class CancerCells(eqx.Module):
    """Cancer-cell growth and death per lesion; owns ``C1`` (viable) and ``C_x`` (dead) cells."""

    p: Params

    PARAMS: ClassVar[dict[str, ParamSpec]] = {
        "k_C1_growth": ParamSpec("1/day", "cancer cell growth rate"),
        "C_max": ParamSpec("cell", "carrying capacity of one lesion"),
        "k_C1_death": ParamSpec("1/day", "natural cancer cell death rate"),
        "k_C1_therapy": ParamSpec("1/day", "extra cancer cell death rate from a continuous therapy (0 = none)"),
        "k_cell_clear": ParamSpec("1/day", "clearance rate of dead cancer cells and dead/exhausted T cells"),
        "k_C_T1": ParamSpec("1/day", "cancer cell killing rate by one effector T cell (per cell fraction)"),
        "vol_cell": ParamSpec("liter/cell", "volume of a cancer cell"),
        "vol_Tcell": ParamSpec("liter/cell", "volume of a T cell"),
        "V_Tmin": ParamSpec("liter", "volume of a lesion with no cells"),
        "k_doomed_death": ParamSpec("1/day", "death rate of cancer cells lethally hit by RT or chemotherapy"),
    }
    STATES: ClassVar[dict[str, StateSpec]] = {
        "C1": StateSpec("cell", "viable cancer cells", "lesion", 1e9),
        "C_x": StateSpec("cell", "dead cancer cells not yet cleared", "lesion", 1e8),
        "C_doomed": StateSpec("cell", "cancer cells lethally hit by RT/chemotherapy, dying over days", "lesion", 1e8),
        "C_doomed_icd": StateSpec(
            "cell", "doomed cells weighted by their immunogenicity (antigen/DAMP release relative to a "
            "naturally dying cell)", "lesion", 1e8),
    }

    def assign(self, y: State, aux: dict) -> dict:
        p = self.p
        t_total = y["T1_T"] + y["T0_T"]
        volume = (
            p["V_Tmin"]
            + p["vol_cell"] * (y["C_x"] + y["C1"] + y["C_doomed"])
            + p["vol_Tcell"] * (y["T_exh"] + t_total)
        )
        cells_in_lesion = y["C1"] + t_total + 1.0  # + 1 cell, as QSP-IO, keeps the fractions finite
        # Effector killing (QSP-IO Reaction_31), reduced by the PD-1 signal H_PD1 of the synapse.
        kill = p["k_C_T1"] * y["T1_T"] * y["C1"] / cells_in_lesion * (1.0 - aux["H_PD1"])
        # Immunogenic death of doomed cells, in naturally-dying-cell equivalents per day.
        icd_release = p["k_doomed_death"] * y["C_doomed_icd"]
        return {"V_T": volume, "cells_in_lesion": cells_in_lesion, "R_Tcell": kill, "icd_release": icd_release}

    def rates(self, y: State, aux: dict) -> dict:
        p = self.p
        growth = p["k_C1_growth"] * y["C1"] * (1.0 - y["C1"] / p["C_max"])
        death = p["k_C1_death"] * y["C1"]
        clearance = p["k_cell_clear"] * y["C_x"]
        doomed_death = p["k_doomed_death"] * y["C_doomed"]
        return {
            "C1": growth - death - aux["R_Tcell"],
            "C_x": -clearance + death + aux["R_Tcell"] + doomed_death,
            "C_doomed": -doomed_death,
            "C_doomed_icd": -p["k_doomed_death"] * y["C_doomed_icd"],
        }


def diameter_from_volume(volume_l):
    """Diameter (cm) of a sphere of the given volume (L): (6 V / pi)^(1/3), with 1 L = 1000 cm^3."""
    return (6.0 * volume_l * 1000.0 / jnp.pi) ** (1.0 / 3.0)
