"""Writes the worked twin example's synthetic patient, ``configs/twins/example_patient.csv``.

A patient drawn from the calibrated model with known deviations (``Z_TRUE``, in population
standard deviations), treated with ``configs/twins/history_pembro_rt.yaml`` and read with the
twin's stated measurement error at irregular days (the irradiated lesion is not read on day 70).
The truth is written beside it as ``example_patient_truth.json``.
"""

from __future__ import annotations

import numpy as np

Z_TRUE = [0.4, 0.6, 0.3, 0.3, 0.2, 0.1]  # k_C1_growth, k_C_T1, q_T1_T_in, alpha_tumor, baseline size, 2nd-lesion ratio
DAYS = [0.0, 45.0, 70.0, 91.0]
SEED = 19


def main() -> None:
    from qspjax.analysis import twin
    from qspjax.commands import _model_options as mo
    from qspjax.io import atomic_write_json, atomic_write_text
    from qspjax.params import load_parameters
    from qspjax.regimen import load_regimen
    from qspjax.vpop import load_population

    history = load_regimen("configs/twins/history_pembro_rt.yaml")
    sim = twin.QSPTwinSimulator(load_parameters(mo.DEFAULT_PARAMS, (mo.CALIBRATED_PARAMS,)),
                                load_population(mo.CALIBRATED_POPULATION), history.drugs)
    patient, true_d, ok = twin.synthetic_patient(sim, np.asarray(Z_TRUE), history, DAYS, (0, 1),
                                                 np.random.default_rng(SEED))
    assert ok
    keep = ~((patient.day == 70.0) & (patient.lesion == 0))
    lymph = {0.0: 1450, 45.0: 1100, 91.0: 1230}
    lines = ["day,lesion,diameter_mm,lymphocytes_per_ul,pdl1_tps"]
    first = True
    for d, l, y in zip(patient.day[keep], patient.lesion[keep], patient.diameter_mm[keep]):
        lym = lymph.pop(float(d), "")
        lines.append(f"{d:g},{twin.LESIONS[int(l)]},{y:g},{lym},{'30' if first else ''}")
        first = False
    atomic_write_text("configs/twins/example_patient.csv", "\n".join(lines) + "\n")
    atomic_write_json("configs/twins/example_patient_truth.json",
                      {"z_true": Z_TRUE, "parameters": list(sim.names), "natural": {k: float(v) for k, v in sim.natural(np.asarray(Z_TRUE)).items()},
                       "days": DAYS, "true_diameters_mm": true_d.tolist(), "seed": SEED,
                       "history": "configs/twins/history_pembro_rt.yaml",
                       "measurement_error_model": twin.MEASUREMENT_ERROR_SOURCE})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
