"""CD8 effector T cells (T1) and regulatory T cells (T0): thymic output and homeostasis of naive
cells, priming in the tumor-draining lymph node, IL-2-driven clonal expansion, trafficking
between blood, periphery, lymph node and each lesion, exhaustion and death (QSP-IO)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp

from qspjax.model._base import ParamSpec, Params, State, StateSpec
from qspjax.model._qss import monotone_root


def _family(tag: str, who: str) -> dict[str, ParamSpec]:
    t = tag
    return {
        f"div_{t}": ParamSpec("", f"{who}: TCR diversity (number of clonotypes)"),
        f"n_{t}_clones": ParamSpec("", f"{who}: number of tumor-specific clones"),
        f"q_LN_{t}_in": ParamSpec("1/day/liter", f"{who}: lymph node entry rate per blood volume"),
        f"q_{t}_LN_out": ParamSpec("1/day", f"{who}: lymph node exit rate"),
        f"k_{t}_act": ParamSpec("1/day", f"{who}: activation rate of naive cells"),
        f"k_{t}_pro": ParamSpec("1/day", f"{who}: proliferation rate of activated cells"),
        f"k_{t}_death": ParamSpec("1/day", f"{who}: death rate of activated cells"),
        f"q_{t}_P_in": ParamSpec("1/day", f"{who}: peripheral entry rate"),
        f"q_{t}_P_out": ParamSpec("1/day", f"{who}: peripheral exit rate"),
        f"q_{t}_T_in": ParamSpec("1/day/liter", f"{who}: tumor entry rate per lesion volume"),
        f"Q_n{t}_thym": ParamSpec("cell/day", f"{who}: thymic output of naive cells"),
        f"k_n{t}_pro": ParamSpec("cell/day", f"{who}: maximal homeostatic proliferation of naive cells"),
        f"K_n{t}_pro": ParamSpec("cell", f"{who}: naive count for half-maximal homeostatic proliferation"),
        f"k_n{t}_death": ParamSpec("1/day", f"{who}: naive cell death rate"),
    }


class TCells(eqx.Module):
    """Effector (T1) and regulatory (T0) T cells in every compartment, exhausted T cells; IL-2."""

    p: Params

    PARAMS: ClassVar[dict[str, ParamSpec]] = {
        **_family("T1", "CD8 effector"),
        **_family("T0", "Treg"),
        "V_C": ParamSpec("liter", "central (blood) volume"),
        "V_LN": ParamSpec("liter", "tumor-draining lymph node volume"),
        "k_cell_clear": ParamSpec("1/day", "clearance rate of dead/exhausted T cells"),
        "k_IL2_deg": ParamSpec("1/day", "IL-2 degradation rate"),
        "k_IL2_cons": ParamSpec("mole/cell/day", "maximal IL-2 consumption per T cell"),
        "k_IL2_sec": ParamSpec("mole/cell/day", "IL-2 secretion per activated T cell"),
        "IL2_50": ParamSpec("molarity", "IL-2 for half-maximal consumption by effector cells"),
        "IL2_50_Treg": ParamSpec("molarity", "IL-2 for half-maximal consumption by Tregs"),
        "N0": ParamSpec("", "baseline number of divisions of activated T cells"),
        "N_IL2": ParamSpec("", "extra divisions at saturating IL-2"),
        "k_T1": ParamSpec("1/day", "effector exhaustion rate by cancer cells (PD-1 dependent)"),
        "k_Treg": ParamSpec("1/day", "effector exhaustion rate by Tregs"),
    }
    STATES: ClassVar[dict[str, StateSpec]] = {
        "nT1_C": StateSpec("cell", "naive CD8 T cells (per clone) in blood", "shared", 1e4),
        "T1_C": StateSpec("cell", "effector CD8 T cells in blood", "shared", 1e8),
        "nT0_C": StateSpec("cell", "naive Tregs (per clone) in blood", "shared", 1e2),
        "T0_C": StateSpec("cell", "Tregs in blood", "shared", 1e8),
        "nT1_P": StateSpec("cell", "naive CD8 T cells (per clone) in periphery", "shared", 1e5),
        "T1_P": StateSpec("cell", "effector CD8 T cells in periphery", "shared", 1e9),
        "nT0_P": StateSpec("cell", "naive Tregs (per clone) in periphery", "shared", 1e4),
        "T0_P": StateSpec("cell", "Tregs in periphery", "shared", 1e9),
        "nT1_LN": StateSpec("cell", "naive CD8 T cells (per clone) in lymph node", "shared", 1e6),
        "aT1_LN": StateSpec("cell", "activated CD8 T cells in lymph node", "shared", 1e5),
        "T1_LN": StateSpec("cell", "effector CD8 T cells in lymph node", "shared", 1e9),
        "nT0_LN": StateSpec("cell", "naive Tregs (per clone) in lymph node", "shared", 1e3),
        "aT0_LN": StateSpec("cell", "activated Tregs in lymph node", "shared", 1e5),
        "T0_LN": StateSpec("cell", "Tregs in lymph node", "shared", 1e9),
        "T1_T": StateSpec("cell", "effector CD8 T cells in the lesion", "lesion", 1e6),
        "T0_T": StateSpec("cell", "Tregs in the lesion", "lesion", 1e5),
        "T_exh": StateSpec("cell", "exhausted or dead T cells in the lesion, not yet cleared", "lesion", 1e7),
    }

    def il2_net_flux(self, il2, y: State):
        """Net IL-2 production in the lymph node (mol/day): secretion by activated CD8 cells minus
        degradation and consumption by effector cells and Tregs (QSP-IO Reactions 28–30, 53)."""
        p = self.p
        return (
            p["k_IL2_sec"] * y["aT1_LN"]
            - p["k_IL2_deg"] * il2 * p["V_LN"]
            - p["k_IL2_cons"] * y["T1_LN"] * il2 / (p["IL2_50"] + il2)
            - p["k_IL2_cons"] * y["T0_LN"] * il2 / (p["IL2_50_Treg"] + il2)
        )

    def il2_steady(self, y: State):
        """IL-2 (M) at which :meth:`il2_net_flux` vanishes.

        Its degradation and consumption act in microseconds (eigenvalue ~1e11 /day), so IL-2 is
        at quasi-steady state for every other process of the model.
        """
        p = self.p
        upper = p["k_IL2_sec"] * y["aT1_LN"] / (p["k_IL2_deg"] * p["V_LN"])
        return monotone_root(lambda c: -self.il2_net_flux(c, y), jnp.zeros_like(upper), upper + 1e-30)

    def assign(self, y: State, aux: dict) -> dict:
        p = self.p
        il2 = aux["IL2_LN"] if "IL2_LN" in aux else self.il2_steady(y)
        return {"IL2_LN": il2, "N_aT": p["N0"] + p["N_IL2"] * il2 / (p["IL2_50"] + il2)}

    def _naive_and_expansion(self, y: State, aux: dict, t: str, priming) -> dict:
        """Rates of one T-cell family (``t`` = T1 or T0) outside the lesions."""
        p = self.p
        div = p[f"div_{t}"]
        prolif_half = p[f"K_n{t}_pro"] / div
        n_c, n_p, n_ln = y[f"n{t}_C"], y[f"n{t}_P"], y[f"n{t}_LN"]
        act, eff_ln = y[f"a{t}_LN"], y[f"{t}_LN"]
        thymus = p[f"Q_n{t}_thym"] / div
        homeo_c = p[f"k_n{t}_pro"] / div * n_c / (prolif_half + n_c)
        homeo_p = p[f"k_n{t}_pro"] / div * n_p / (prolif_half + n_p)
        to_p, from_p = p[f"q_{t}_P_in"] * n_c, p[f"q_{t}_P_out"] * n_p
        to_ln, from_ln = p[f"q_LN_{t}_in"] * n_c * p["V_C"], p[f"q_{t}_LN_out"] * n_ln
        activation = p[f"k_{t}_act"] * priming * n_ln
        pro = p[f"k_{t}_pro"] * act
        return {
            f"n{t}_C": thymus + homeo_c - p[f"k_n{t}_death"] * n_c - to_p + from_p - to_ln + from_ln,
            f"n{t}_P": homeo_p - p[f"k_n{t}_death"] * n_p + to_p - from_p,
            f"n{t}_LN": to_ln - from_ln - activation,
            f"a{t}_LN": activation * p[f"n_{t}_clones"] - pro,
            f"{t}_LN": pro * 2.0 ** aux["N_aT"] - p[f"k_{t}_death"] * eff_ln - p[f"q_{t}_LN_out"] * eff_ln,
        }

    def _effector_traffic(self, y: State, aux: dict, t: str) -> dict:
        p = self.p
        eff_c, eff_p, eff_ln = y[f"{t}_C"], y[f"{t}_P"], y[f"{t}_LN"]
        into_lesions = p[f"q_{t}_T_in"] * aux["V_T"] * eff_c  # one value per lesion
        return {
            f"{t}_C": -p[f"k_{t}_death"] * eff_c - p[f"q_{t}_P_in"] * eff_c + p[f"q_{t}_P_out"] * eff_p
            - jnp.sum(into_lesions) + p[f"q_{t}_LN_out"] * eff_ln,
            f"{t}_P": -p[f"k_{t}_death"] * eff_p + p[f"q_{t}_P_in"] * eff_c - p[f"q_{t}_P_out"] * eff_p,
            "_into_lesions": into_lesions,
        }

    def rates(self, y: State, aux: dict) -> dict:
        p = self.p
        out = {}
        out |= self._naive_and_expansion(y, aux, "T1", aux["H_mAPC"] * aux["H_P1"] * aux["ctla4_priming"])
        out |= self._naive_and_expansion(y, aux, "T0", aux["H_APC"] * aux["H_P0"])
        eff = self._effector_traffic(y, aux, "T1")
        treg = self._effector_traffic(y, aux, "T0")
        cells = aux["cells_in_lesion"]
        death_t1 = p["k_T1_death"] * y["T1_T"]
        by_treg = p["k_Treg"] * y["T1_T"] * y["T0_T"] / cells
        by_cancer = p["k_T1"] * y["T1_T"] * y["C1"] / cells * aux["H_PD1"]
        death_t0 = p["k_T0_death"] * y["T0_T"]
        adcc_t0 = aux["ctla4_treg_depletion"] * y["T0_T"]
        out |= {
            "T1_C": eff["T1_C"], "T1_P": eff["T1_P"], "T0_C": treg["T0_C"], "T0_P": treg["T0_P"],
            "T1_T": -death_t1 - by_treg - by_cancer + eff["_into_lesions"],
            "T0_T": -death_t0 - adcc_t0 + treg["_into_lesions"],
            "T_exh": -p["k_cell_clear"] * y["T_exh"] + death_t1 + by_treg + by_cancer + death_t0 + adcc_t0,
        }
        return out
