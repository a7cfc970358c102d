"""Shared pieces of the biological modules: parameter declarations and the state layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import jax.numpy as jnp
from jaxtyping import Array, Float

State = dict[str, Float[Array, "..."]]
Params = Mapping[str, Float[Array, ""]]


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a module reads: its internal unit and what it means; ``upper``, where set, is
    the largest value it may take (a parameter file above it is refused)."""

    unit: str
    meaning: str
    upper: float | None = None


@dataclass(frozen=True)
class StateSpec:
    """A state a module owns.

    ``shape`` is ``"shared"`` (one value per patient), ``"lesion"`` (one per lesion) or ``"drug"``
    / ``"drug_lesion"`` (one per drug in the model, and per lesion). ``typical`` is the magnitude
    the solver scales the state by (error control acts on state/typical), in the internal unit.
    """

    unit: str
    meaning: str
    shape: str
    typical: float


def hill(x, half, n):
    """(x/half)^n / (1 + (x/half)^n), safe at x = 0."""
    r = (jnp.maximum(x, 0.0) / half) ** n
    return r / (1.0 + r)
