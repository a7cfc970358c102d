"""Exchange formats: SBML export, SED-ML/COMBINE (OMEX) archives and PEtab problems.

* :mod:`qspjax.interop.sbml` -- one virtual patient as an SBML Level 3 Version 2 document
  (``qspjax export-sbml``);
* :mod:`qspjax.interop.omex` -- that SBML plus a SED-ML reference simulation as a COMBINE archive
  (``qspjax export-sbml --omex``), and re-running such an archive with libRoadRunner;
* :mod:`qspjax.interop.petab` -- the QSP-IO reference problem as PEtab v1
  (``qspjax export-petab``), and running a PEtab problem written for this model with qspjax.

Importing this package is cheap: the submodules (which import JAX, libsbml, petab, ...) and the
names below are loaded on first use.
"""

from __future__ import annotations

import importlib

__all__ = [
    "export_sbml",
    "reference_patient",
    "SBMLExportError",
    "build_sedml",
    "write_omex",
    "read_omex",
    "simulate_omex",
    "OmexError",
    "write_petab",
    "simulate_petab",
    "lint_petab",
    "PetabError",
]

# public name -> (submodule, attribute)
_LAZY = {
    "export_sbml": ("sbml", "export_sbml"),
    "reference_patient": ("sbml", "reference_patient"),
    "SBMLExportError": ("sbml", "SBMLExportError"),
    "build_sedml": ("omex", "build_sedml"),
    "write_omex": ("omex", "write_omex"),
    "read_omex": ("omex", "read_omex"),
    "simulate_omex": ("omex", "simulate_omex"),
    "OmexError": ("omex", "OmexError"),
    "write_petab": ("petab", "write_petab"),
    "simulate_petab": ("petab", "simulate_petab"),
    "lint_petab": ("petab", "lint"),
    "PetabError": ("petab", "PetabError"),
}
_SUBMODULES = ("sbml", "omex", "petab")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
