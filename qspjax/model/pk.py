"""Antibody pharmacokinetics: central, peripheral, lymph-node and per-lesion compartments with
linear clearance and lymphatic drainage, one set of states per drug in the model (QSP-IO's
nivolumab structure, Sové et al. 2020; per-drug values in ``configs/params/drugs.yaml``)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from qspjax.model._base import ParamSpec, Params, State, StateSpec

DRUG_PARAMS: dict[str, ParamSpec] = {
    "q_P": ParamSpec("1/day", "central-peripheral transcapillary exchange per central volume"),
    "q_T": ParamSpec("1/day", "central-lesion exchange per central volume"),
    "q_LN": ParamSpec("1/day", "central-lymph node exchange per central volume"),
    "q_LD": ParamSpec("1/day", "lymphatic drainage rate from lesion and lymph node"),
    "k_cl": ParamSpec("1/day", "linear clearance rate from the central compartment"),
    "gamma_C": ParamSpec("", "available volume fraction, central"),
    "gamma_P": ParamSpec("", "available volume fraction, peripheral"),
    "gamma_T": ParamSpec("", "available volume fraction, lesion"),
    "gamma_LN": ParamSpec("", "available volume fraction, lymph node"),
    "molecular_weight": ParamSpec("gram/mole", "molecular weight (dose in mg to moles)"),
}
TARGETS = ("PD1", "PDL1", "CTLA4")
KNOWN_DRUGS = (
    "nivolumab", "pembrolizumab", "cemiplimab", "sintilimab", "tislelizumab", "toripalimab",
    "durvalumab", "atezolizumab", "avelumab", "ipilimumab", "tremelimumab",
)


class AntibodyPK(eqx.Module):
    """PK of every antibody in the model. ``p[name]`` has one entry per drug (shape ``(D,)``)."""

    p: Params
    drugs: tuple[str, ...] = eqx.field(static=True)
    targets: tuple[str, ...] = eqx.field(static=True)

    PARAMS: ClassVar[dict[str, ParamSpec]] = {
        "V_C": ParamSpec("liter", "central (blood) volume"),
        "V_P": ParamSpec("liter", "peripheral volume"),
        "V_LN": ParamSpec("liter", "lymph node volume"),
    }
    STATES: ClassVar[dict[str, StateSpec]] = {
        "ab_C": StateSpec("molarity", "antibody in blood", "drug", 1e-7),
        "ab_P": StateSpec("molarity", "antibody in the peripheral compartment", "drug", 1e-7),
        "ab_LN": StateSpec("molarity", "antibody in the lymph node", "drug", 1e-7),
        "ab_T": StateSpec("molarity", "antibody in the lesion", "drug_lesion", 1e-7),
    }

    def _mask(self, target: str):
        return jnp.asarray(np.array([t == target for t in self.targets], dtype=float))

    def assign(self, y: State, aux: dict) -> dict:
        p = self.p
        if not self.drugs:
            zero = jnp.zeros_like(y["C1"])
            return {"aPD1": zero, "aPDL1": zero, "aCTLA4_T": zero, "aCTLA4_LN": jnp.zeros(())}
        c_t = y["ab_T"]  # (D, L)
        # QSP-IO: the synapse sees the lesion concentration divided by gamma_C for anti-PD-1 and
        # the lesion concentration itself for anti-PD-L1 (example1 Reaction_91 and Reaction_93).
        a_pd1 = jnp.sum((self._mask("PD1") / p["gamma_C"])[:, None] * c_t, axis=0)
        a_pdl1 = jnp.sum(self._mask("PDL1")[:, None] * c_t, axis=0)
        ctla4 = self._mask("CTLA4")
        return {
            "aPD1": a_pd1,
            "aPDL1": a_pdl1,
            "aCTLA4_T": jnp.sum((ctla4 / p["gamma_T"])[:, None] * c_t, axis=0),
            "aCTLA4_LN": jnp.sum(ctla4 / p["gamma_LN"] * y["ab_LN"]),
        }

    def rates(self, y: State, aux: dict) -> dict:
        if not self.drugs:
            return {}
        p = self.p
        v_c, v_p, v_ln = p["V_C"], p["V_P"], p["V_LN"]
        free_c = y["ab_C"] / p["gamma_C"]  # (D,)
        free_t = y["ab_T"] / p["gamma_T"][:, None]  # (D, L)
        free_ln = y["ab_LN"] / p["gamma_LN"]
        to_p = p["q_P"] * (free_c - y["ab_P"] / p["gamma_P"]) * v_c
        to_t = p["q_T"][:, None] * (free_c[:, None] - free_t) * v_c  # QSP-IO: scaled by V_C
        to_ln = p["q_LN"] * (free_c - free_ln) * v_c
        drain_t = p["q_LD"][:, None] * free_t * aux["V_T"][None, :]
        drain_ln = p["q_LD"] * free_ln * v_ln
        clearance = p["k_cl"] * y["ab_C"] * v_c
        return {
            "ab_C": (-to_p - jnp.sum(to_t, axis=1) - to_ln + drain_ln - clearance) / v_c,
            "ab_P": to_p / v_p,
            "ab_T": (to_t - drain_t) / aux["V_T"][None, :],
            "ab_LN": (to_ln + jnp.sum(drain_t, axis=1) - drain_ln) / v_ln,
        }
