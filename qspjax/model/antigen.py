"""Tumor antigen and antigen-presenting cells: release of antigen and DAMPs by dying cancer cells,
APC maturation in each lesion and migration to the lymph node, antigen processing and MHC loading
in the APC, and the TCR signal H_P that drives priming (QSP-IO, Sové et al. 2020). RT- or
chemotherapy-doomed cells add their (dose-dependent) immunogenic release to the natural one."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp

from qspjax.model._base import ParamSpec, Params, State, StateSpec
from qspjax.units import AVOGADRO


def _antigen(i: str, who: str) -> dict[str, ParamSpec]:
    return {
        f"k_P{i}_up": ParamSpec("1/day/cell", f"antigen {i} ({who}): uptake rate by APCs"),
        f"k_xP{i}_deg": ParamSpec("1/day", f"antigen {i}: extracellular degradation"),
        f"k_P{i}_deg": ParamSpec("1/day", f"antigen {i}: endosomal degradation into epitopes"),
        f"k_p{i}_deg": ParamSpec("1/day", f"epitope {i}: degradation"),
        f"k_P{i}_on": ParamSpec("1/day/molarity", f"epitope {i}: MHC association"),
        f"k_P{i}_d1": ParamSpec("molarity", f"epitope {i}: MHC dissociation constant"),
        f"p{i}_50": ParamSpec("molecule/micrometer^2", f"epitope {i}: pMHC-TCR for half-maximal activation"),
        f"P{i}_C1": ParamSpec("molarity/cell", f"antigen {i}: released per dying cancer cell"),
        f"k_M1p{i}_TCR_on": ParamSpec("micrometer^2/molecule/day", f"epitope {i}: TCR binding"),
        f"k_M1p{i}_TCR_off": ParamSpec("1/day", f"epitope {i}: TCR unbinding"),
        f"TCR_p{i}_tot": ParamSpec("molecule/micrometer^2", f"epitope {i}: TCR density on naive T cells"),
    }


class AntigenPresentation(eqx.Module):
    """APCs, DAMPs, antigen (0: Treg antigen, 1: CD8 antigen) and MHC presentation.

    Tumor antigen is at quasi-steady state (see :meth:`tumor_antigen_steady`); endosomal antigen,
    epitopes and MHC complexes are dynamic states.
    """

    p: Params

    PARAMS: ClassVar[dict[str, ParamSpec]] = {
        **_antigen("0", "Treg"),
        **_antigen("1", "CD8"),
        "k_M1p1_TCR_p": ParamSpec("1/day", "TCR kinetic-proofreading step rate"),
        "phi_M1p1_TCR": ParamSpec("1/day", "TCR modification to a non-signalling state"),
        "N_M1p1_TCR": ParamSpec("", "number of kinetic-proofreading steps"),
        "n_T0_clones": ParamSpec("", "number of Treg clones"),
        "n_T1_clones": ParamSpec("", "number of CD8 clones"),
        "k_C1_death": ParamSpec("1/day", "natural cancer cell death rate"),
        "k_C1_therapy": ParamSpec("1/day", "continuous-therapy cancer cell death rate"),
        "k_APC_mat": ParamSpec("1/day", "APC maturation rate"),
        "k_APC_mig": ParamSpec("1/day", "mature APC migration rate to the lymph node"),
        "k_APC_death": ParamSpec("1/day", "APC turnover rate"),
        "k_mAPC_death": ParamSpec("1/day", "mature APC death rate"),
        "APC0_T": ParamSpec("cell/liter", "APC density in a lesion"),
        "APC0_LN": ParamSpec("cell/liter", "APC density in the lymph node"),
        "k_c": ParamSpec("1/day", "cytokine (DAMP) relaxation rate"),
        "c0": ParamSpec("molarity", "baseline cytokine concentration"),
        "c50": ParamSpec("molarity", "cytokine for half-maximal APC maturation"),
        "DAMPs": ParamSpec("mole/cell", "cytokine released per T-cell-killed cancer cell"),
        "n_sites_APC": ParamSpec("", "T cells one APC can engage"),
        "kin": ParamSpec("1/day", "MHC internalisation rate"),
        "kout": ParamSpec("1/day", "MHC externalisation rate"),
        "V_LN": ParamSpec("liter", "lymph node volume"),
        "V_e": ParamSpec("liter", "endosomal volume of an APC"),
        "A_e": ParamSpec("micrometer^2", "endosomal surface area of an APC"),
        "A_s": ParamSpec("micrometer^2", "surface area of an APC"),
        "k_C_T1": ParamSpec("1/day", "cancer cell killing rate by effector T cells"),
    }
    STATES: ClassVar[dict[str, StateSpec]] = {
        "APC_T": StateSpec("cell", "immature APCs in the lesion", "lesion", 1e4),
        "mAPC_T": StateSpec("cell", "mature APCs in the lesion", "lesion", 1e4),
        "c_T": StateSpec("molarity", "cytokines/DAMPs in the lesion", "lesion", 1e-8),
        "APC_LN": StateSpec("cell", "immature APCs in the lymph node", "shared", 1e6),
        "mAPC_LN": StateSpec("cell", "mature APCs in the lymph node", "shared", 1e6),
        "P0_e": StateSpec("molarity", "Treg antigen in APC endosomes", "shared", 1e-8),
        "p0_e": StateSpec("molarity", "Treg epitope in APC endosomes", "shared", 1e-9),
        "P1_e": StateSpec("molarity", "CD8 antigen in APC endosomes", "shared", 1e-9),
        "p1_e": StateSpec("molarity", "CD8 epitope in APC endosomes", "shared", 1e-10),
        "M1_e": StateSpec("molecule/micrometer^2", "free MHC in endosomes", "shared", 1e2),
        "M1p0_e": StateSpec("molecule/micrometer^2", "MHC-Treg epitope in endosomes", "shared", 1e-2),
        "M1p1_e": StateSpec("molecule/micrometer^2", "MHC-CD8 epitope in endosomes", "shared", 1e-3),
        "M1_s": StateSpec("molecule/micrometer^2", "free MHC on the APC surface", "shared", 1e1),
        "M1p0_s": StateSpec("molecule/micrometer^2", "MHC-Treg epitope on the APC surface", "shared", 1e-1),
        "M1p1_s": StateSpec("molecule/micrometer^2", "MHC-CD8 epitope on the APC surface", "shared", 1e-1),
    }

    def _tcr_engagement(self, surface_pmhc, i: str, n_clones):
        """pMHC-TCR complexes per µm² from the quasi-steady binding quadratic (smaller root).

        The stable form 2ac / (b + sqrt(b^2 - 4ac)) avoids the cancellation of (b - sqrt(...)) / 2.
        """
        p = self.p
        a = surface_pmhc / n_clones
        tcr = p[f"TCR_p{i}_tot"]
        b = a + tcr + p[f"k_M1p{i}_TCR_off"] / p[f"k_M1p{i}_TCR_on"]
        disc = jnp.maximum(b * b - 4.0 * a * tcr, 0.0)
        return 2.0 * a * tcr / (b + jnp.sqrt(disc))

    def dying_cells(self, y: State, aux: dict):
        """Cancer cells dying per day that release antigen (naturally dying cell equivalents)."""
        p = self.p
        rate = p["k_C1_death"] + p["k_C1_therapy"] + p["k_C_T1"] * y["T1_T"] / aux["cells_in_lesion"] * (1.0 - aux["H_PD1"])
        return rate * y["C1"] + aux["icd_release"]

    def tumor_antigen_net_flux(self, conc, y: State, aux: dict, i: str):
        """Net production of antigen ``i`` in a lesion (mol/day) at concentration ``conc`` (M):
        release by dying cells minus extracellular degradation and APC uptake (QSP-IO R63-65)."""
        p = self.p
        n_clones = p[f"n_T{i}_clones"]
        released = n_clones * p[f"P{i}_C1"] * self.dying_cells(y, aux) * aux["V_T"]
        lost = (p[f"k_xP{i}_deg"] + p[f"k_P{i}_up"] * y["mAPC_LN"]) * conc * aux["V_T"]
        return released - lost

    def tumor_antigen_steady(self, y: State, aux: dict, i: str):
        """Antigen ``i`` (M) in each lesion at quasi-steady state: uptake by the lymph node's mature
        APCs clears it in ~1e-7 day (eigenvalue ~2.5e7 /day), so it tracks cell death exactly."""
        p = self.p
        return (p[f"n_T{i}_clones"] * p[f"P{i}_C1"] * self.dying_cells(y, aux)
                / (p[f"k_xP{i}_deg"] + p[f"k_P{i}_up"] * y["mAPC_LN"]))

    def assign(self, y: State, aux: dict) -> dict:
        p = self.p
        lymph_t_cells = y["T1_LN"] + 1.0
        h_apc = p["n_sites_APC"] * y["APC_LN"] / (p["n_sites_APC"] * y["APC_LN"] + lymph_t_cells)
        h_mapc = p["n_sites_APC"] * y["mAPC_LN"] / (p["n_sites_APC"] * y["mAPC_LN"] + lymph_t_cells)
        ptcr0 = self._tcr_engagement(y["M1p0_s"], "0", p["n_T0_clones"])
        koff, kp, phi = p["k_M1p1_TCR_off"], p["k_M1p1_TCR_p"], p["phi_M1p1_TCR"]
        proofreading = koff / (koff + phi) * (kp / (koff + kp)) ** p["N_M1p1_TCR"]
        ptcr1 = proofreading * self._tcr_engagement(y["M1p1_s"], "1", p["n_T1_clones"])
        return {
            "P0_T": aux["P0_T"] if "P0_T" in aux else self.tumor_antigen_steady(y, aux, "0"),
            "P1_T": aux["P1_T"] if "P1_T" in aux else self.tumor_antigen_steady(y, aux, "1"),
            "H_APC": h_apc,
            "H_mAPC": h_mapc,
            "pTCR_p0_MHC_tot": ptcr0,
            "pTCR_p1_MHC_tot": ptcr1,
            "H_P0": ptcr0 / (ptcr0 + p["p0_50"]),
            "H_P1": ptcr1 / (ptcr1 + p["p1_50"]),
        }

    def _antigen_rates(self, y: State, aux: dict, i: str) -> dict:
        p = self.p
        v_e, a_e, a_s = p["V_e"], p["A_e"], p["A_s"]
        tumor_ag = aux[f"P{i}_T"]
        into_endosome = jnp.sum(p[f"k_P{i}_up"] * 1.0 * tumor_ag * v_e)  # QSP-IO: uptake by one cell
        endo_ag, epitope = y[f"P{i}_e"], y[f"p{i}_e"]
        processed = p[f"k_P{i}_deg"] * endo_ag * v_e
        epitope_deg = p[f"k_p{i}_deg"] * epitope * v_e
        m_e, mp_e, mp_s = y["M1_e"], y[f"M1p{i}_e"], y[f"M1p{i}_s"]
        loading = p[f"k_P{i}_on"] * epitope * m_e * a_e  # molecule/day
        unloading_e = p[f"k_P{i}_d1"] * p[f"k_P{i}_on"] * mp_e * a_e
        unloading_s = p[f"k_P{i}_d1"] * p[f"k_P{i}_on"] * mp_s * a_s
        export = p["kout"] * mp_e * a_e
        return {
            f"P{i}_e": (into_endosome - processed) / v_e,
            f"p{i}_e": (processed - epitope_deg - (loading - unloading_e) / AVOGADRO) / v_e,
            f"M1p{i}_e": (loading - unloading_e - export) / a_e,
            f"M1p{i}_s": (-unloading_s + export) / a_s,
            "_M1_e": (-loading + unloading_e) / a_e,
            "_M1_s": unloading_s / a_s,
        }

    def rates(self, y: State, aux: dict) -> dict:
        p = self.p
        v_t = aux["V_T"]
        apc_t, mapc_t, c = y["APC_T"], y["mAPC_T"], y["c_T"]
        maturation = p["k_APC_mat"] * c / (c + p["c50"]) * apc_t
        migration = p["k_APC_mig"] * mapc_t
        mhc_cycle = p["kout"] * y["M1_e"] * p["A_e"] - p["kin"] * y["M1_s"] * p["A_s"]
        ag0 = self._antigen_rates(y, aux, "0")
        ag1 = self._antigen_rates(y, aux, "1")
        out = {k: v for k, v in (ag0 | ag1).items() if not k.startswith("_")}
        out |= {
            "APC_T": p["k_APC_death"] * (p["APC0_T"] * v_t - apc_t) - maturation,
            "mAPC_T": maturation - migration - p["k_mAPC_death"] * mapc_t,
            "APC_LN": p["k_APC_death"] * (p["APC0_LN"] * p["V_LN"] - y["APC_LN"]),
            "mAPC_LN": jnp.sum(migration) - p["k_mAPC_death"] * y["mAPC_LN"],
            "c_T": (p["k_c"] * (p["c0"] - c) * v_t + (aux["R_Tcell"] + aux["icd_release"]) * p["DAMPs"]) / v_t,
            "M1_e": -mhc_cycle / p["A_e"] + ag0["_M1_e"] + ag1["_M1_e"],
            "M1_s": mhc_cycle / p["A_s"] + ag0["_M1_s"] + ag1["_M1_s"],
        }
        return out
