"""The tumor–immune–RT–ICI model: one module per biological mechanism and their composer."""

from qspjax.model.antigen import AntigenPresentation
from qspjax.model.cancer import CancerCells, diameter_from_volume
from qspjax.model.checkpoint import Checkpoints
from qspjax.model.composer import QSPModel, module_param_specs, tree_stack
from qspjax.model.pk import AntibodyPK
from qspjax.model.radiotherapy import Radiotherapy
from qspjax.model.tcells import TCells

__all__ = [
    "AntibodyPK", "AntigenPresentation", "CancerCells", "Checkpoints", "QSPModel", "Radiotherapy",
    "TCells", "diameter_from_volume", "module_param_specs", "tree_stack",
]
