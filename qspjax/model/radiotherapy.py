"""Radiotherapy, chemotherapy and surgery as instantaneous changes of state at their times.

RT (one fraction of ``d`` Gy to a lesion): linear-quadratic-linear (LQ-L) survival of cancer cells,
S = exp(-a d - b d^2) up to a transition dose d_T per fraction and log-linear beyond it with the LQ
slope at d_T, S = exp(-a d_T - b d_T^2 - (a + 2 b d_T)(d - d_T)) (Astrahan 2008; Park et al. 2008:
the LQ curve keeps bending at ablative doses where measured survival curves turn straight); with
the default d_T (far above any fraction) it is the LQ model. The lethally hit cells stop dividing
and die over the next days; their immunogenic death releases antigen and DAMPs with a gain that
rises with dose per fraction up to a peak and then falls (TREX1 induction above ~12 Gy,
Vanpouille-Box 2017; seed review 004, section 3); kill of T cells in the field and of circulating
and lymph-node T cells by the dose they receive (radiation-induced lymphopenia, an effective dose
to immune cells that is larger per fraction for conventional fractionation than for SBRT, seed
004 section 5); and a PD-L1 up-regulation on the irradiated lesion's cancer cells.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp

from qspjax.model._base import ParamSpec, Params, State

_CIRCULATING = ("T1_C", "T0_C", "nT1_C", "nT0_C")
_NODAL = ("T1_LN", "T0_LN", "nT1_LN", "nT0_LN", "aT1_LN", "aT0_LN")


class Radiotherapy(eqx.Module):
    """Jump maps of RT fractions, chemotherapy cycles and surgery."""

    p: Params

    PARAMS: ClassVar[dict[str, ParamSpec]] = {
        "alpha_tumor": ParamSpec("1/gray", "LQ alpha of NSCLC cells"),
        "alpha_beta_tumor": ParamSpec("gray", "LQ alpha/beta of NSCLC cells"),
        "d_transition_tumor": ParamSpec("gray", "LQ-L transition dose per fraction of NSCLC cells"),
        "alpha_lymph": ParamSpec("1/gray", "LQ alpha of lymphocytes"),
        "alpha_beta_lymph": ParamSpec("gray", "LQ alpha/beta of lymphocytes"),
        "blood_dose_fraction_sbrt": ParamSpec("", "effective circulating-blood dose per fraction / prescribed dose, SBRT"),
        "blood_dose_fraction_conventional": ParamSpec("", "same, conventional fractionation"),
        "ln_dose_fraction_sbrt": ParamSpec("", "effective lymph-node dose per fraction / prescribed dose, SBRT"),
        "ln_dose_fraction_conventional": ParamSpec("", "same, conventional (elective nodal volumes)"),
        "icd_gain_max": ParamSpec("", "maximal extra antigen/DAMP release per RT-killed cell (relative)"),
        "icd_peak_dose_gy": ParamSpec("gray", "dose per fraction of maximal immunogenicity"),
        "pdl1_rt_gain_per_gy": ParamSpec("1/gray", "fold PD-L1 excess added per Gy on the irradiated lesion"),
        "chemo_lymph_kill_fraction": ParamSpec("", "fraction of circulating T cells killed per chemotherapy cycle"),
        "APC0_T": ParamSpec("cell/liter", "APC density in a lesion"),
        "V_Tmin": ParamSpec("liter", "volume of a lesion with no cells"),
    }

    def icd_gain(self, dose_gy):
        """Antigen/DAMP release per RT-killed cell relative to a naturally dying cell (>= 1).

        1 + g_max (d/d_peak) exp(1 - d/d_peak): rises to 1 + g_max at d_peak, then falls.
        """
        x = dose_gy / self.p["icd_peak_dose_gy"]
        return 1.0 + self.p["icd_gain_max"] * x * jnp.exp(1.0 - x)

    def log_survival(self, dose_gy):
        """ln S of cancer cells after one fraction of ``dose_gy`` (LQ-L; LQ for d <= d_T)."""
        p = self.p
        beta = p["alpha_tumor"] / p["alpha_beta_tumor"]
        d_t = p["d_transition_tumor"]
        # with m = min(d, d_T): -a d - b (2 d m - m^2) is -a d - b d^2 up to d_T and
        # LQ(d_T) - (a + 2 b d_T)(d - d_T) beyond it. One branch-free expression: the SBML export
        # then writes min(), which tools accept inside an event's extinction test, where a
        # piecewise in a comparison is refused (AMICI 1.0)
        m = jnp.minimum(dose_gy, d_t)
        return -p["alpha_tumor"] * dose_gy - beta * m * (2.0 * dose_gy - m)

    @staticmethod
    def _doom(y: State, killed, gain) -> State:
        """Lethally hit cells stop dividing and die over days, releasing antigen and DAMPs."""
        y = dict(y)
        y["C1"] = y["C1"] - killed
        y["C_doomed"] = y["C_doomed"] + killed
        y["C_doomed_icd"] = y["C_doomed_icd"] + killed * gain
        return y

    def fraction(self, y: State, dose_gy, blood_dose_gy, ln_dose_gy) -> State:
        """One RT fraction: ``dose_gy`` per lesion (L,), scalar blood and lymph-node doses (Gy)."""
        p = self.p
        survival = jnp.exp(self.log_survival(dose_gy))
        y = self._doom(y, y["C1"] * (1.0 - survival), self.icd_gain(dose_gy))
        lymph = lambda d: jnp.exp(-p["alpha_lymph"] * d - p["alpha_lymph"] / p["alpha_beta_lymph"] * d**2)
        s_field = lymph(dose_gy)
        dead_t = (y["T1_T"] + y["T0_T"]) * (1.0 - s_field)
        y["T1_T"] = y["T1_T"] * s_field
        y["T0_T"] = y["T0_T"] * s_field
        y["T_exh"] = y["T_exh"] + dead_t
        for name in _CIRCULATING:
            y[name] = y[name] * lymph(blood_dose_gy)
        for name in _NODAL:
            y[name] = y[name] * lymph(ln_dose_gy)
        y["pdl1_rt"] = y["pdl1_rt"] + p["pdl1_rt_gain_per_gy"] * dose_gy
        return y

    def chemotherapy(self, y: State, kill_fraction) -> State:
        """One cycle of cytotoxic chemotherapy: kills ``kill_fraction`` of cancer cells in every lesion."""
        y = self._doom(y, y["C1"] * kill_fraction, 1.0)
        spared = 1.0 - self.p["chemo_lymph_kill_fraction"] * (kill_fraction > 0)
        for name in _CIRCULATING:
            y[name] = y[name] * spared
        return y

    def surgery(self, y: State, resect) -> State:
        """Resect the lesions where ``resect`` (L,) is 1: every cell of the lesion is removed."""
        keep = 1.0 - resect
        y = dict(y)
        for name in ("C1", "C_x", "C_doomed", "C_doomed_icd", "T_exh", "T1_T", "T0_T", "mAPC_T"):
            y[name] = y[name] * keep
        y["APC_T"] = y["APC_T"] * keep + resect * self.p["APC0_T"] * self.p["V_Tmin"]
        return y
