"""The composed tumor–immune–RT–ICI model: the biological modules assembled into one ODE system."""

from __future__ import annotations

from typing import ClassVar, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from qspjax.model._base import ParamSpec, State, StateSpec
from qspjax.model.antigen import AntigenPresentation
from qspjax.model.cancer import CancerCells, diameter_from_volume
from qspjax.model.checkpoint import SYNAPSE_TARGETS, Checkpoints
from qspjax.model.pk import DRUG_PARAMS, TARGETS, AntibodyPK
from qspjax.model.radiotherapy import Radiotherapy
from qspjax.model.tcells import TCells

# Order matters: each module's assignments may use those of the modules before it.
_MODULES = (("pk", AntibodyPK), ("checkpoint", Checkpoints), ("cancer", CancerCells),
            ("antigen", AntigenPresentation), ("tcells", TCells))

PATIENT_PARAMS: dict[str, ParamSpec] = {
    "body_weight_kg": ParamSpec("kilogram", "body weight (for mg/kg doses)"),
    "extinction_threshold_cells": ParamSpec("cell", "a lesion with fewer viable cells is set to zero (QSP-IO event)"),
    "initial_tumour_diameter": ParamSpec("centimeter", "baseline diameter the pre-treatment growth stops at"),
    "seed_cancer_cells": ParamSpec("cell", "cancer cells at the start of the pre-treatment growth"),
}


def module_param_specs() -> dict[str, ParamSpec]:
    """Every scalar parameter any module reads, with its internal unit (per-drug ones excluded)."""
    out: dict[str, ParamSpec] = dict(PATIENT_PARAMS)
    for _, cls in _MODULES + (("rt", Radiotherapy),):
        for name, spec in cls.PARAMS.items():
            if name in out and out[name].unit != spec.unit:
                raise AssertionError(f"{name} declared with two units: {out[name].unit} / {spec.unit}")
            out.setdefault(name, spec)
    return out


def drug_param_name(param: str, drug: str) -> str:
    return f"{param}_{drug}"


class QSPModel(eqx.Module):
    """The whole model for one virtual patient: its parameters are the array leaves.

    A batch of patients is the same pytree with a leading axis on every leaf (``jax.vmap``).
    ``n_lesions`` and ``drugs`` fix the shapes: lesion 0 is the irradiated one by convention.
    """

    pk: AntibodyPK
    checkpoint: Checkpoints
    cancer: CancerCells
    antigen: AntigenPresentation
    tcells: TCells
    rt: Radiotherapy
    patient: dict
    n_lesions: int = eqx.field(static=True)

    LESION_NAMES: ClassVar[tuple[str, ...]] = ("irradiated", "non_irradiated")

    @classmethod
    def from_values(
        cls,
        values: Mapping[str, float],
        drugs: tuple[str, ...] = ("nivolumab",),
        targets: Mapping[str, str] | None = None,
        n_lesions: int = 2,
    ) -> "QSPModel":
        """Build from internal-unit values (see :func:`qspjax.params.load_parameters`).

        ``targets`` maps each drug to PD1 / PDL1 / CTLA4 (default: from ``values['target_<drug>']``).
        """
        def pick(spec: Mapping[str, ParamSpec]) -> dict:
            return {k: jnp.asarray(values[k], dtype=float) for k in spec}

        drug_targets = tuple((targets or {}).get(d) or values[f"target_{d}"] for d in drugs)
        for d, t in zip(drugs, drug_targets):
            if t not in TARGETS:
                raise ValueError(f"drug {d}: target {t!r} not one of {TARGETS}")
        pk_p = pick(AntibodyPK.PARAMS)
        for name in DRUG_PARAMS:
            pk_p[name] = jnp.asarray([values[drug_param_name(name, d)] for d in drugs], dtype=float).reshape(len(drugs))
        return cls(
            pk=AntibodyPK(pk_p, tuple(drugs), drug_targets),
            checkpoint=Checkpoints(pick(Checkpoints.PARAMS), tuple(t for t in SYNAPSE_TARGETS if t in drug_targets)),
            cancer=CancerCells(pick(CancerCells.PARAMS)),
            antigen=AntigenPresentation(pick(AntigenPresentation.PARAMS)),
            tcells=TCells(pick(TCells.PARAMS)),
            rt=Radiotherapy(pick(Radiotherapy.PARAMS)),
            patient=pick(PATIENT_PARAMS),
            n_lesions=n_lesions,
        )

    @property
    def drugs(self) -> tuple[str, ...]:
        return self.pk.drugs

    # --- state layout -------------------------------------------------------------------------
    def state_specs(self) -> dict[str, StateSpec]:
        out: dict[str, StateSpec] = {}
        for name, _ in _MODULES:
            out |= type(getattr(self, name)).STATES
        return out

    def state_shape(self, spec: StateSpec) -> tuple[int, ...]:
        d, n = len(self.drugs), self.n_lesions
        return {"shared": (), "lesion": (n,), "drug": (d,), "drug_lesion": (d, n)}[spec.shape]

    def zeros(self) -> State:
        return {k: jnp.zeros(self.state_shape(s)) for k, s in self.state_specs().items()}

    def scales(self) -> State:
        """Typical magnitude of each state: the solver's error control acts on state / scale."""
        return {k: jnp.full(self.state_shape(s), s.typical) for k, s in self.state_specs().items()}

    # --- right-hand side ------------------------------------------------------------------------
    def assignments(self, y: State, overrides: dict | None = None) -> dict:
        """QSP-IO's repeated assignments (volumes, Hill signals, drug availability...).

        ``overrides`` fixes algebraic quantities instead of solving for them (``synapse``,
        ``IL2_LN``, ``P0_T``, ``P1_T``): used to evaluate the model at a non-equilibrium state
        such as SimBiology's t = 0, where nothing is bound yet.
        """
        aux: dict = dict(overrides or {})
        for name, _ in _MODULES:
            new = getattr(self, name).assign(y, aux)
            aux |= {k: v for k, v in new.items() if k not in (overrides or {})}
        return aux

    def rates(self, y: State, overrides: dict | None = None) -> State:
        """dy/dt for every state, in internal units per day."""
        aux = self.assignments(y, overrides)
        out = {k: jnp.zeros_like(v) for k, v in y.items()}
        for name, _ in _MODULES:
            for k, v in getattr(self, name).rates(y, aux).items():
                out[k] = out[k] + v
        return out

    def __call__(self, t, y: State, args=None) -> State:
        return self.rates(y)

    # --- readouts -------------------------------------------------------------------------------
    def observables(self, y: State) -> dict:
        """Clinical and mechanistic readouts of a state (works on a trajectory by vmap)."""
        aux = self.assignments(y)
        volume = aux["V_T"]
        return {
            "tumor_volume_l": volume,
            "tumor_diameter_cm": diameter_from_volume(volume),
            "cancer_cells": y["C1"],
            "dead_cells": y["C_x"],
            "t_cells_tumor": y["T1_T"] + y["T0_T"],
            "cd8_tumor_cells": y["T1_T"],
            "treg_tumor_cells": y["T0_T"],
            "cd8_density_per_ul": y["T1_T"] / (volume * 1e6),
            "pd1_signal": aux["H_PD1"],
            "pd1_drug_occupancy": aux["pd1_drug_occupancy"],
            "il2_ln_molar": aux["IL2_LN"],
            "cd8_blood_cells": y["T1_C"],
            "drug_plasma_molar": y["ab_C"],
            "drug_tumor_molar": y["ab_T"],
        }

    def apply_extinction(self, y: State) -> State:
        """QSP-IO event: a lesion with fewer than ~1 viable cancer cell has none."""
        y = dict(y)
        y["C1"] = jnp.where(y["C1"] < self.patient["extinction_threshold_cells"], 0.0, y["C1"])
        return y

    def dose(self, y: State, amount_mg) -> State:
        """Add ``amount_mg`` (D,) of each antibody to the central compartment as a bolus."""
        if not self.drugs:
            return y
        y = dict(y)
        moles = amount_mg * 1e-3 / self.pk.p["molecular_weight"]
        y["ab_C"] = y["ab_C"] + moles / self.pk.p["V_C"]
        return y

    def lesion_volume(self, y: State):
        return self.assignments(y)["V_T"]


def tree_stack(models: list[QSPModel]) -> QSPModel:
    """Stack patients' models into one batched model (leading axis on every array leaf)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *models)


def as_numpy_state(y: State) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in y.items()}
