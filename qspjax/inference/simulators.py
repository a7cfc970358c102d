"""Cohort simulators the likelihood runs: the QSP model, and a tumor-kinetics surrogate for tests.

A simulator has two pure methods, both traced inside the compiled objective:

* ``prepare(values, baseline)``: the per-parameter-value work shared by every arm (for the QSP
  model: build the batched model and grow each patient to baseline);
* ``arm(prepared, schedule)``: treat the cohort with one arm's schedule; returns lesion diameters
  in mm, (P, L, T) on the schedule's output days, and a per-patient ``ok`` flag (P,).

``values`` are per-patient parameter values (n,) from :func:`qspjax.vpop.patient_values`;
``baseline`` holds ``diameter_cm`` (n,), ``second_lesion_ratio`` (n,) and ``pdl1_multiplier`` (n,).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from qspjax.model.cancer import diameter_from_volume
from qspjax.params import ParameterSet
from qspjax.regimen import Schedule
from qspjax.solver.simulate import STATUS_OK, SolverConfig, simulate_batch
from qspjax.vpop import build_models, grow_cohort


@dataclass(frozen=True)
class QSPSimulator:
    """The full QSP model: growth to baseline once per parameter value, then each arm's regimen.

    Growth is part of the objective (differentiated like the treatment solves): the baseline
    immune state depends on the parameters being estimated.
    """

    params: ParameterSet
    drugs: tuple[str, ...]
    config: SolverConfig

    def prepare(self, values, baseline):
        n = baseline["diameter_cm"].shape[0]
        models = build_models(self.params, values, n, self.drugs, 2, baseline["pdl1_multiplier"])
        y0, status, _ = grow_cohort(models, self.params, baseline["diameter_cm"],
                                    baseline["second_lesion_ratio"], self.config)
        return models, y0, status

    def arm(self, prepared, schedule: Schedule):
        models, y0, grow_status = prepared
        traj = simulate_batch(models, y0, schedule, self.config)
        ok = (grow_status == STATUS_OK) & (traj.status == STATUS_OK)
        diam_cm = jax.vmap(lambda m, ys: diameter_from_volume(jax.vmap(m.lesion_volume)(ys)))(models, traj.ys)
        return 10.0 * jnp.swapaxes(diam_cm, 1, 2), ok


@dataclass(frozen=True)
class KineticsSimulator:
    """A closed-form tumor-kinetics surrogate driven by the same schedules and population draws.

    For tests and smoke runs only (the QSP model's compiled gradient takes minutes to build).
    Lesion l's log diameter moves as

        log d_l(t) = log d_l(0) + g t - rt_scale * alpha * RT_l(t) - ici_scale * k_kill * max(0, t - t_ici)

    with g = ``k_C1_growth`` (1/day), alpha = ``alpha_tumor`` (1/Gy), k_kill = ``k_C_T1`` (1/day),
    RT_l(t) the Gy delivered to lesion l by day t and t_ici the first checkpoint-inhibitor dose.
    ``rt_scale`` (cell log-kill to diameter, ~1/3 in a sphere, smaller here for partial repopulation)
    and ``ici_scale`` (kill rate to net diameter shrinkage) are fixed, dimensionless.
    Parameters missing from ``values`` take their nominal value; chemotherapy and surgery are
    ignored (no regimen of the tests uses them).
    """

    params: ParameterSet
    rt_scale: float = 0.05
    ici_scale: float = 0.02 / 18.0

    def prepare(self, values, baseline):
        n = baseline["diameter_cm"].shape[0]
        get = lambda k: values[k] if k in values else jnp.full(n, self.params.values[k])
        d0_mm = 10.0 * jnp.stack([baseline["diameter_cm"], baseline["diameter_cm"] * baseline["second_lesion_ratio"]], 1)
        return get("k_C1_growth"), get("alpha_tumor"), get("k_C_T1"), d0_mm

    def arm(self, prepared, schedule: Schedule):
        growth, alpha, kill, d0_mm = prepared
        t = schedule.output_days  # (T,)
        given = schedule.times[None, :] <= t[:, None] + 1e-9  # (T, K): events on or before each output day
        rt_gy = given.astype(float) @ schedule.rt_dose_gy  # (T, L)
        ici = jnp.sum(schedule.dose_mg + schedule.dose_mg_per_kg, axis=1) > 0
        t_ici = jnp.min(jnp.where(ici, schedule.times, jnp.inf))
        ici_days = jnp.where(jnp.isfinite(t_ici), jnp.maximum(t - t_ici, 0.0), 0.0)  # (T,)
        log_d = (jnp.log(d0_mm)[:, :, None] + growth[:, None, None] * t
                 - self.rt_scale * alpha[:, None, None] * rt_gy.T[None]
                 - self.ici_scale * kill[:, None, None] * ici_days)
        return jnp.exp(log_d), jnp.ones(d0_mm.shape[0], bool)
