"""Immune checkpoints.

PD-1/PD-L1/PD-L2 binding in the synapse between an effector T cell and a cancer cell of each
lesion, with bivalent antibody binding (anti-PD-1 or anti-PD-L1), as in QSP-IO (Sové et al. 2020,
Jafarnejad et al. 2019). Binding equilibrates within seconds to minutes (off-rates 1e2–1e5 /day)
while everything else moves over days, so the synapse is solved as its quasi-steady state
(the root of the mass-action fluxes :meth:`Checkpoints.synapse_fluxes`) given the receptor totals
and the antibody available in the lesion; bound PD-1 gives the Hill signal ``H_PD1`` that lowers
killing and raises exhaustion. RT up-regulates PD-L1 on irradiated cancer cells: a fold excess
``pdl1_rt`` raises the lesion's total PD-L1 and decays. CTLA-4 blockade (ipilimumab,
tremelimumab) acts through receptor occupancy: it raises CD8 priming in the lymph node and depletes
intratumoral Tregs by ADCC (after Jafarnejad et al. 2019).

Target-class efficacy (E_max occupancy-response). Anti-PD-1, anti-PD-L1 and anti-CTLA-4
antibodies are not interchangeable, and full receptor occupancy need not mean full blockade
(nivolumab's PD-1 occupancy on circulating T cells plateaus at ~70 % at every dose, Brahmer et al.
2010). ``blockade_emax_<target>`` is the maximal fraction of the checkpoint signal the antibodies
of one target class can block. For PD-1/PD-L1 the antibody reaches a fraction ``emax`` of the
synapses and the rest signal as untreated, so the effective PD-1 signal is
``H = emax * H(antibody) + (1 - emax) * H(no antibody)``, i.e. the blockade of the signal is
``emax`` times the model's occupancy-driven blockade (with anti-PD-1 and anti-PD-L1 together, each
class reaches its own fraction independently). For CTLA-4 the occupancy that drives priming and
Treg depletion is ``emax * occupancy``. At ``emax = 1`` (the default) every term is the QSP-IO
one exactly; at 0 the drug has no effect.
"""

from __future__ import annotations

from itertools import product
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp

from qspjax.model._base import ParamSpec, Params, State, StateSpec, hill
from qspjax.model._qss import monotone_root

_SURFACE = "molecule/micrometer^2"
SYNAPSE_TARGETS = ("PD1", "PDL1")


class Checkpoints(eqx.Module):
    """PD-1 synapse per lesion (quasi-steady), RT-induced PD-L1, CTLA-4 occupancy effects.

    ``blocked``: the synapse targets (PD1, PDL1) of the antibodies in the model; a synapse without
    those antibodies is solved for each class that could miss it (target-class E_max).
    """

    p: Params
    blocked: tuple[str, ...] = eqx.field(static=True, default=())

    PARAMS: ClassVar[dict[str, ParamSpec]] = {
        "kon_PD1_PDL1": ParamSpec("micrometer^2/molecule/day", "PD-1/PD-L1 2D association"),
        "koff_PD1_PDL1": ParamSpec("1/day", "PD-1/PD-L1 dissociation"),
        "kon_PD1_PDL2": ParamSpec("micrometer^2/molecule/day", "PD-1/PD-L2 2D association"),
        "koff_PD1_PDL2": ParamSpec("1/day", "PD-1/PD-L2 dissociation"),
        "kon_PD1_aPD1": ParamSpec("1/molarity/day", "anti-PD-1 association"),
        "koff_PD1_aPD1": ParamSpec("1/day", "anti-PD-1 dissociation"),
        "kon_PDL1_aPDL1": ParamSpec("1/molarity/day", "anti-PD-L1 association"),
        "koff_PDL1_aPDL1": ParamSpec("1/day", "anti-PD-L1 dissociation"),
        "Chi_PD1": ParamSpec("molarity*micrometer^2/molecule", "anti-PD-1 cross-arm binding, 2D-corrected"),
        "Chi_PDL1": ParamSpec("molarity*micrometer^2/molecule", "anti-PD-L1 cross-arm binding, 2D-corrected"),
        "PD1_50": ParamSpec(_SURFACE, "bound PD-1 for half-maximal inhibition"),
        "n_PD1": ParamSpec("", "Hill coefficient of PD-1 inhibition"),
        "T_PD1_total": ParamSpec("molecule", "PD-1 molecules per T cell"),
        "C_PDL1_total": ParamSpec("molecule", "PD-L1 molecules per cancer cell (before RT)"),
        "C_PDL2_total": ParamSpec("molecule", "PD-L2 molecules per cancer cell"),
        "A_Tcell": ParamSpec("micrometer^2", "T cell surface area"),
        "A_cell": ParamSpec("micrometer^2", "cancer cell surface area"),
        "k_pdl1_rt_decay": ParamSpec("1/day", "decay of the RT-induced PD-L1 excess"),
        "kon_CTLA4_aCTLA4": ParamSpec("1/molarity/day", "anti-CTLA-4 association"),
        "koff_CTLA4_aCTLA4": ParamSpec("1/day", "anti-CTLA-4 dissociation"),
        "ctla4_priming_emax": ParamSpec("", "maximal relative increase of CD8 priming at full CTLA-4 blockade"),
        "k_CTLA4_ADCC": ParamSpec("1/day", "maximal ADCC depletion rate of intratumoral Tregs"),
        "blockade_emax_PD1": ParamSpec("", "maximal fraction of the PD-1 signal anti-PD-1 antibodies block", upper=1.0),
        "blockade_emax_PDL1": ParamSpec("", "maximal fraction of the PD-1 signal anti-PD-L1 antibodies block", upper=1.0),
        "blockade_emax_CTLA4": ParamSpec("", "maximal fraction of CTLA-4 signalling anti-CTLA-4 antibodies block", upper=1.0),
    }
    STATES: ClassVar[dict[str, StateSpec]] = {
        "pdl1_rt": StateSpec("", "RT-induced fold excess of cancer-cell PD-L1", "lesion", 1.0),
    }

    def totals(self, pdl1_rt):
        """Receptor densities (molecules/µm²) on the synapse: PD-1, PD-L1 (RT-raised), PD-L2."""
        p = self.p
        return (p["T_PD1_total"] / p["A_Tcell"] * jnp.ones_like(pdl1_rt),
                p["C_PDL1_total"] / p["A_cell"] * (1.0 + pdl1_rt),
                p["C_PDL2_total"] / p["A_cell"] * jnp.ones_like(pdl1_rt))

    def synapse_equilibrium(self, pdl1_rt, a_pd1, a_pdl1, name: str = "PD1_free") -> dict:
        """Quasi-steady synapse species (molecules/µm²) per lesion.

        ``a_pd1``, ``a_pdl1``: antibody (M) seen by the synapse. Every complex follows from free
        PD-1 and free PD-L1 through the equilibrium constants; free PD-L1 solves its conservation
        (a quadratic, closed form) and free PD-1 the PD-1 conservation (monotone, bracketed).
        ``name`` labels the free PD-1 root in the SBML export.
        """
        p = self.p
        pd1_tot, pdl1_tot, pdl2_tot = self.totals(pdl1_rt)
        k1 = p["koff_PD1_PDL1"] / p["kon_PD1_PDL1"]
        k2 = p["koff_PD1_PDL2"] / p["kon_PD1_PDL2"]
        ka = p["koff_PD1_aPD1"] / p["kon_PD1_aPD1"]
        kb = p["koff_PDL1_aPDL1"] / p["kon_PDL1_aPDL1"]

        def free_pdl1(pd1):
            q1 = 1.0 + pd1 / k1 + 2.0 * a_pdl1 / kb
            q2 = 2.0 * p["Chi_PDL1"] * a_pdl1 / kb**2
            return 2.0 * pdl1_tot / (q1 + jnp.sqrt(q1 * q1 + 4.0 * q2 * pdl1_tot))

        def pd1_residual(pd1):
            pdl2 = pdl2_tot / (1.0 + pd1 / k2)
            bound = pd1 * (free_pdl1(pd1) / k1 + pdl2 / k2 + 2.0 * a_pd1 / ka)
            return pd1 + bound + 2.0 * p["Chi_PD1"] * a_pd1 / ka**2 * pd1**2 - pd1_tot

        pd1 = monotone_root(pd1_residual, jnp.zeros_like(pd1_tot), pd1_tot, name=name)
        pdl1 = free_pdl1(pd1)
        pdl2 = pdl2_tot / (1.0 + pd1 / k2)
        pd1_ab = 2.0 * pd1 * a_pd1 / ka
        pdl1_ab = 2.0 * pdl1 * a_pdl1 / kb
        return {
            "PD1": pd1, "PDL1": pdl1, "PDL2": pdl2,
            "PD1_PDL1": pd1 * pdl1 / k1, "PD1_PDL2": pd1 * pdl2 / k2,
            "PD1_aPD1": pd1_ab, "PD1_aPD1_PD1": p["Chi_PD1"] * pd1 * pd1_ab / (2.0 * ka),
            "PDL1_aPDL1": pdl1_ab, "PDL1_aPDL1_PDL1": p["Chi_PDL1"] * pdl1 * pdl1_ab / (2.0 * kb),
        }

    def synapse_fluxes(self, s: dict, a_pd1, a_pdl1) -> dict:
        """QSP-IO's mass-action binding fluxes (molecules/µm²/day; Reactions 89–94 of the
        export divided by the synapse area) at synapse species ``s``. Zero at equilibrium."""
        p = self.p
        return {
            "PD1_PDL1": p["kon_PD1_PDL1"] * s["PD1"] * s["PDL1"] - p["koff_PD1_PDL1"] * s["PD1_PDL1"],
            "PD1_PDL2": p["kon_PD1_PDL2"] * s["PD1"] * s["PDL2"] - p["koff_PD1_PDL2"] * s["PD1_PDL2"],
            "PD1_aPD1": 2.0 * p["kon_PD1_aPD1"] * s["PD1"] * a_pd1 - p["koff_PD1_aPD1"] * s["PD1_aPD1"],
            "PD1_aPD1_PD1": p["Chi_PD1"] * p["kon_PD1_aPD1"] * s["PD1"] * s["PD1_aPD1"]
            - 2.0 * p["koff_PD1_aPD1"] * s["PD1_aPD1_PD1"],
            "PDL1_aPDL1": 2.0 * p["kon_PDL1_aPDL1"] * s["PDL1"] * a_pdl1 - p["koff_PDL1_aPDL1"] * s["PDL1_aPDL1"],
            "PDL1_aPDL1_PDL1": p["Chi_PDL1"] * p["kon_PDL1_aPDL1"] * s["PDL1"] * s["PDL1_aPDL1"]
            - 2.0 * p["koff_PDL1_aPDL1"] * s["PDL1_aPDL1_PDL1"],
        }

    @staticmethod
    def pd1_signal(bound_pd1, pd1_50, n):
        return hill(bound_pd1, pd1_50, n)

    def unreached_synapses(self, pdl1_rt, a_pd1, a_pdl1) -> dict:
        """Synapses some antibody class misses: ``{name: (weight, synapse)}``, one per proper subset
        of ``blocked`` reaching them, weighted by the chance of that subset (E_max per class)."""
        out = {}
        for reach in product((True, False), repeat=len(self.blocked)):
            if all(reach):
                continue
            weight = 1.0
            for target, hit in zip(self.blocked, reach):
                e = self.p[f"blockade_emax_{target}"]
                weight = weight * (e if hit else 1.0 - e)
            only = [t for t, hit in zip(self.blocked, reach) if hit]
            name = f"PD1_free_a{only[0]}_only" if only else "PD1_free_untreated"
            syn = self.synapse_equilibrium(pdl1_rt, a_pd1 if "PD1" in only else jnp.zeros_like(a_pd1),
                                           a_pdl1 if "PDL1" in only else jnp.zeros_like(a_pdl1), name=name)
            out[name] = (weight, syn)
        return out

    def assign(self, y: State, aux: dict) -> dict:
        p = self.p
        syn = aux["synapse"] if "synapse" in aux else self.synapse_equilibrium(y["pdl1_rt"], aux["aPD1"], aux["aPDL1"])
        signal = lambda s: self.pd1_signal(s["PD1_PDL1"] + s["PD1_PDL2"], p["PD1_50"], p["n_PD1"])
        h_pd1 = signal(syn)
        unreached = self.unreached_synapses(y["pdl1_rt"], aux["aPD1"], aux["aPDL1"])
        if unreached:  # E_max: the reached synapses' signal plus the unreached ones' (weights 0 at emax 1)
            reached = 1.0
            for target in self.blocked:
                reached = reached * p[f"blockade_emax_{target}"]
            h_pd1 = reached * h_pd1
            for weight, s in unreached.values():
                h_pd1 = h_pd1 + weight * signal(s)
        kd_ctla4 = p["koff_CTLA4_aCTLA4"] / p["kon_CTLA4_aCTLA4"]
        occ_ln = aux["aCTLA4_LN"] / (aux["aCTLA4_LN"] + kd_ctla4)
        occ_t = aux["aCTLA4_T"] / (aux["aCTLA4_T"] + kd_ctla4)
        emax_ctla4 = p["blockade_emax_CTLA4"]
        return {
            "synapse": syn,
            "synapse_unreached": {k: s for k, (_, s) in unreached.items()},
            "H_PD1": h_pd1,
            "pd1_drug_occupancy": (syn["PD1_aPD1"] + 2.0 * syn["PD1_aPD1_PD1"]) / self.totals(y["pdl1_rt"])[0],
            "ctla4_occupancy_LN": occ_ln,
            "ctla4_priming": 1.0 + p["ctla4_priming_emax"] * (emax_ctla4 * occ_ln),
            "ctla4_treg_depletion": p["k_CTLA4_ADCC"] * (emax_ctla4 * occ_t),
        }

    def rates(self, y: State, aux: dict) -> dict:
        return {"pdl1_rt": -self.p["k_pdl1_rt_decay"] * y["pdl1_rt"]}
