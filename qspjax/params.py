"""Parameter files: loading, validation and conversion to the model's internal units.

A parameter file is YAML with any of these top-level keys:

``parameters``
    ``{name: {value, unit, meaning, source, assumed}}``, one entry per scalar parameter.
``drugs``
    ``{drug: {target: PD1|PDL1|CTLA4, <pk parameter>: {value, unit, ...}, label: {...}}}``; each
    PK parameter becomes ``<parameter>_<drug>`` (``q_P_nivolumab``...).
``initial_state``
    a list of ``{id, value, unit}`` in the SimBiology species ids of the QSP-IO export.

Files are merged in order, later ones overriding earlier ones. The model's own set is
``configs/params/{drugs,radiotherapy,model_extensions}.yaml`` under a main file (by default
``qspio_example1.yaml``, the QSP-IO reference). Every value is converted with ``pint`` to the unit
the reading module declares, so a wrong dimension is caught at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from qspjax.errors import QSPValidationError
from qspjax.model.composer import module_param_specs
from qspjax.model.pk import DRUG_PARAMS, KNOWN_DRUGS, TARGETS
from qspjax.units import conversion_factor

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PARAMS_DIR = CONFIG_DIR / "params"
BASE_FILES = ("drugs.yaml", "radiotherapy.yaml", "model_extensions.yaml")
DEFAULT_MAIN_FILE = PARAMS_DIR / "qspio_example1.yaml"

_ENTRY_KEYS = {"value", "unit", "meaning", "source", "assumed", "note"}
_TOP_KEYS = {"description", "source", "parameters", "drugs", "initial_state", "note", "notes", "targets", "ctla4"}
_DRUG_KEYS = {"target", "label", "note", "notes", "kon", "koff", "name", "class", "population_pk"}


@dataclass
class ParameterSet:
    """Parameters in internal units, with where each came from."""

    values: dict[str, float] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    initial_state: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def with_values(self, **updates: float) -> "ParameterSet":
        new = ParameterSet(dict(self.values), dict(self.targets), dict(self.origin),
                           dict(self.initial_state), list(self.files))
        for k, v in updates.items():
            if k not in new.values:
                raise KeyError(f"unknown parameter {k!r}")
            new.values[k] = float(v)
        return new

    def model_values(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.values)
        out.update({f"target_{d}": t for d, t in self.targets.items()})
        return out


def _load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QSPValidationError(path, "(file)", str(path), f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise QSPValidationError(path, "(file)", str(path),
                                 f"is not a UTF-8 text file (byte {exc.start}: {exc.reason}); a YAML file is required") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())  # one line: the CLI prints a single-line message
        raise QSPValidationError(path, "(file)", str(path), f"is not valid YAML (truncated?): {detail}") from None


def _convert_entry(path: Path, where: str, entry: Any, unit_to: str, upper: float | None = None) -> float:
    if not isinstance(entry, Mapping):
        raise QSPValidationError(path, where, entry, "a mapping with 'value' and 'unit' is required")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise QSPValidationError(path, f"{where}.{sorted(unknown)[0]}", entry[sorted(unknown)[0]],
                                 f"unknown key; allowed keys are {sorted(_ENTRY_KEYS)}")
    if "value" not in entry:
        raise QSPValidationError(path, f"{where}.value", None, "required")
    value = entry["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise QSPValidationError(path, f"{where}.value", value, "a finite number is required")
    if value < 0:  # rates, volumes, amounts, fractions: every quantity of the model is non-negative
        raise QSPValidationError(path, f"{where}.value", value, "must be non-negative")
    unit = entry.get("unit", "dimensionless")
    if not isinstance(unit, str):
        raise QSPValidationError(path, f"{where}.unit", unit, "a unit string is required")
    try:
        factor = conversion_factor(unit or "dimensionless", unit_to or "dimensionless")
    except ValueError:
        raise QSPValidationError(path, f"{where}.unit", unit,
                                 f"must be convertible to {unit_to or 'dimensionless'}") from None
    if upper is not None and float(value) * factor > upper:
        raise QSPValidationError(path, f"{where}.value", value, f"must be at most {upper:g} {unit_to}".rstrip())
    return float(value) * factor


def _split_drug_param(name: str) -> str | None:
    """'q_P_nivolumab' -> 'q_P' (the longest PK parameter name that prefixes it), else None."""
    for param in DRUG_PARAMS:
        if name.startswith(param + "_") and name[len(param) + 1:] in KNOWN_DRUGS:
            return param
    return None


def load_parameter_file(path: str | Path, into: ParameterSet | None = None) -> ParameterSet:
    """Read one parameter file into ``into`` (a new set by default), validating as it goes."""
    path = Path(path)
    out = into if into is not None else ParameterSet()
    doc = _load_yaml(path)
    if not isinstance(doc, Mapping):
        raise QSPValidationError(path, "(top level)", doc, "a mapping is required"
                                 + (" (the file is empty)" if doc is None else ""))
    for key in doc:
        if key not in _TOP_KEYS:
            raise QSPValidationError(path, str(key), doc[key], f"unknown top-level key (misspelt?); allowed: {sorted(_TOP_KEYS)}")
    for key in ("parameters", "drugs"):
        if doc.get(key) is not None and not isinstance(doc[key], Mapping):
            raise QSPValidationError(path, key, doc[key], "a mapping of name to entry is required")
    if doc.get("initial_state") is not None and not isinstance(doc["initial_state"], list):
        raise QSPValidationError(path, "initial_state", doc["initial_state"], "a list of {id, value, unit} is required")
    specs = module_param_specs()
    for name, entry in (doc.get("parameters") or {}).items():
        drug_param = _split_drug_param(name)
        if drug_param is not None:
            out.values[name] = _convert_entry(path, f"parameters.{name}", entry, DRUG_PARAMS[drug_param].unit)
            out.origin[name] = str(path)
            continue
        if name not in specs:
            raise QSPValidationError(path, f"parameters.{name}", name,
                                     "unknown parameter (is it misspelt?); see configs/params/README.md")
        out.values[name] = _convert_entry(path, f"parameters.{name}", entry, specs[name].unit, specs[name].upper)
        out.origin[name] = str(path)
    for drug, block in (doc.get("drugs") or {}).items():
        where = f"drugs.{drug}"
        if drug not in KNOWN_DRUGS:
            raise QSPValidationError(path, where, drug, f"unknown drug; allowed: {list(KNOWN_DRUGS)}")
        if not isinstance(block, Mapping):
            raise QSPValidationError(path, where, block, "a mapping is required")
        for key, entry in block.items():
            if key == "target":
                if entry not in TARGETS:
                    raise QSPValidationError(path, f"{where}.target", entry, f"allowed values are {list(TARGETS)}")
                out.targets[drug] = entry
            elif key in DRUG_PARAMS:
                name = f"{key}_{drug}"
                out.values[name] = _convert_entry(path, f"{where}.{key}", entry, DRUG_PARAMS[key].unit)
                out.origin[name] = str(path)
            elif key not in _DRUG_KEYS:
                raise QSPValidationError(path, f"{where}.{key}", key,
                                         f"unknown key; allowed: target, {', '.join(DRUG_PARAMS)}, {', '.join(sorted(_DRUG_KEYS))}")
    for i, sp in enumerate(doc.get("initial_state") or []):
        if not isinstance(sp, Mapping) or "id" not in sp or "value" not in sp:
            raise QSPValidationError(path, f"initial_state[{i}]", sp, "a mapping with 'id' and 'value' is required")
        unknown = [k for k in sp if k not in ("id", "value", "unit")]
        if unknown:
            raise QSPValidationError(path, f"initial_state[{i}].{unknown[0]}", sp[unknown[0]],
                                     "unknown key (misspelt?); allowed keys are ['id', 'unit', 'value']")
        if not isinstance(sp["id"], str) or not sp["id"].strip():
            raise QSPValidationError(path, f"initial_state[{i}].id", sp["id"], "a species id string is required")
        value = sp["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise QSPValidationError(path, f"initial_state[{i}].value", value,
                                     "a finite, non-negative number is required (an amount of a species)")
        out.initial_state[sp["id"]] = float(value)
    out.files.append(str(path))
    return out


def load_parameters(main: str | Path | None = None, extra: Iterable[str | Path] = ()) -> ParameterSet:
    """The model's parameters: the base files, then ``main`` (default QSP-IO example 1), then ``extra``."""
    ps = ParameterSet()
    for name in BASE_FILES:
        load_parameter_file(PARAMS_DIR / name, ps)
    load_parameter_file(Path(main) if main is not None else DEFAULT_MAIN_FILE, ps)
    for path in extra:
        load_parameter_file(path, ps)
    missing = sorted(set(module_param_specs()) - set(ps.values))
    if missing:
        raise QSPValidationError(ps.files[-1], "parameters", missing[:5],
                                 f"{len(missing)} required parameter(s) missing after merging {ps.files}")
    return ps
