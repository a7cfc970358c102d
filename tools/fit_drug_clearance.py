"""Write ``configs/params/drugs.yaml``: one PK parameter set per antibody.

Every antibody shares QSP-IO's transport structure and values for nivolumab (transcapillary
exchange, lymphatic drainage, available volume fractions: shared/reference/qspio/example1), as
QSP-IO does for its antibodies; what differs is the molecular weight, the target and the linear
clearance, which is solved here so that the model's terminal half-life (slowest eigenvalue of the
linear PK system with a 14 mL lesion) equals the half-life on the drug's label.

Run by hand (``python tools/fit_drug_clearance.py``); the YAML it writes is committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import brentq

OUT = Path(__file__).resolve().parents[1] / "configs" / "params" / "drugs.yaml"
SECONDS_PER_DAY = 86400.0
# QSP-IO nivolumab transport (example1 parameters.csv), used for every antibody, except the
# central-peripheral exchange: QSP-IO's q_P (Q = 0.075 L/day) bounds the terminal half-life below
# by ~33 days whatever the clearance, longer than every label; the nivolumab population PK's
# Q = 32.9 mL/h = 0.79 L/day (Bajaj et al. 2017 CPT Pharmacometrics Syst Pharmacol 6:58) is used.
Q_POPPK_L_PER_DAY = 32.9e-3 * 24
TRANSPORT = {
    "q_P": (Q_POPPK_L_PER_DAY / 5.0, "1/day"), "q_T": (8.52e-06, "1/second"), "q_LN": (1.73655e-07, "1/second"),
    "q_LD": (0.0015, "1/minute"), "gamma_C": (0.77378, ""), "gamma_P": (0.058847, ""),
    "gamma_T": (0.718, ""), "gamma_LN": (0.1, ""),
}
V_C, V_P, V_T, V_LN = 5.0, 60.0, 0.014, 1374.44678594553e-6

# name: (target, molecular weight g/mol, label terminal half-life days, half-life source, labelled regimen)
DRUGS = {
    "nivolumab": ("PD1", 146_000, 25.0, "Opdivo (nivolumab) US prescribing information: terminal half-life 25 days, CL 7.9 mL/h", "240 mg Q2W"),
    "pembrolizumab": ("PD1", 149_000, 22.0, "Keytruda (pembrolizumab) SmPC: terminal half-life 22 days (CV 32 %), steady-state CL 195 mL/day", "200 mg Q3W"),
    "cemiplimab": ("PD1", 146_000, 20.3, "Libtayo (cemiplimab) US prescribing information (2018): elimination half-life at steady state 20.3 days", "350 mg Q3W"),
    "sintilimab": ("PD1", 146_000, 19.6, "sintilimab population PK (NMPA approval documents): terminal half-life ~19.6 days", "200 mg Q3W"),
    "tislelizumab": ("PD1", 147_000, 23.8, "Tevimbra (tislelizumab) SmPC: terminal half-life ~24 days (23.8)", "200 mg Q3W"),
    "toripalimab": ("PD1", 147_000, 18.0, "Loqtorzi (toripalimab) US prescribing information: terminal half-life ~18 days", "240 mg Q3W"),
    "durvalumab": ("PDL1", 146_000, 18.0, "Imfinzi (durvalumab) US prescribing information: terminal half-life ~18 days, CL 8.2 mL/h", "10 mg/kg Q2W"),
    "atezolizumab": ("PDL1", 145_000, 27.0, "Tecentriq (atezolizumab) US prescribing information: terminal half-life 27 days, CL 0.20 L/day", "1200 mg Q3W"),
    "avelumab": ("PDL1", 147_000, 6.1, "Bavencio (avelumab) US prescribing information: terminal half-life 6.1 days", "800 mg Q2W"),
    "ipilimumab": ("CTLA4", 148_000, 15.4, "Yervoy (ipilimumab) US prescribing information: terminal half-life 15.4 days", "3 mg/kg Q3W"),
    "tremelimumab": ("CTLA4", 149_000, 16.9, "Imjudo (tremelimumab) US prescribing information: terminal half-life 16.9 days", "75 mg Q4W"),
}


def pk_matrix(k_cl: float) -> np.ndarray:
    """Linear PK system (concentrations: central, peripheral, lesion, lymph node), per day."""
    q = {k: v * (SECONDS_PER_DAY if u == "1/second" else 1440.0 if u == "1/minute" else 1.0)
         for k, (v, u) in TRANSPORT.items()}
    gc, gp, gt, gln = q["gamma_C"], q["gamma_P"], q["gamma_T"], q["gamma_LN"]
    m = np.zeros((4, 4))
    m[0] = [-(q["q_P"] + q["q_T"] + q["q_LN"]) / gc - k_cl, q["q_P"] / gp, q["q_T"] / gt,
            q["q_LN"] / gln + q["q_LD"] / gln * V_LN / V_C]
    m[1, 0], m[1, 1] = q["q_P"] / gc * V_C / V_P, -q["q_P"] / gp * V_C / V_P
    m[2, 0], m[2, 2] = q["q_T"] / gc * V_C / V_T, -q["q_T"] / gt * V_C / V_T - q["q_LD"] / gt
    m[3, 0], m[3, 2] = q["q_LN"] / gc * V_C / V_LN, q["q_LD"] / gt * V_T / V_LN
    m[3, 3] = -q["q_LN"] / gln * V_C / V_LN - q["q_LD"] / gln
    return m


def terminal_half_life(k_cl: float) -> float:
    return float(np.log(2.0) / np.min(np.abs(np.linalg.eigvals(pk_matrix(k_cl)).real)))


def main() -> None:
    drugs = {}
    for name, (target, mw, t_half, source, regimen) in DRUGS.items():
        k_cl = brentq(lambda k: terminal_half_life(k) - t_half, 1e-4, 10.0, xtol=1e-14)
        entry = {"target": target,
                 "molecular_weight": {"value": float(mw), "unit": "gram/mole",
                                      "meaning": "molecular weight (~146 kDa IgG)", "source": f"{name} label"}}
        for k, (v, u) in TRANSPORT.items():
            src = ("Q = 0.79 L/day of the nivolumab population PK (Bajaj et al. 2017 CPT:PSP 6:58) / V_C = 5 L"
                   if k == "q_P" else "QSP-IO nivolumab value (shared/reference/qspio/example1), shared by all antibodies")
            entry[k] = {"value": v, "unit": u or "dimensionless", "source": src}
        entry["k_cl"] = {"value": float(k_cl), "unit": "1/day",
                         "meaning": "linear clearance rate, solved so the model's terminal half-life equals the label's",
                         "source": "tools/fit_drug_clearance.py from the label half-life", "assumed": False}
        entry["label"] = {"half_life_days": t_half, "source": source, "regimen": regimen}
        drugs[name] = entry
    doc = {"description": "Antibody PK per drug (generated by tools/fit_drug_clearance.py)", "drugs": drugs}
    OUT.write_text("# Generated by tools/fit_drug_clearance.py; edit the script and re-run it.\n"
                   + yaml.safe_dump(doc, sort_keys=False, width=110))
    for name in DRUGS:
        print(f"{name:14s} k_cl={drugs[name]['k_cl']['value']:.5f}/day t1/2={terminal_half_life(drugs[name]['k_cl']['value']):.2f} d")


if __name__ == "__main__":
    main()
