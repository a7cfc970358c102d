"""Which parameters and population a command runs: the calibrated model unless told otherwise.

Every command that simulates patients (``simulate``, ``trial``, ``compare``) takes the same four
options and resolves them the same way:

- nothing given: the shipped calibration, i.e. the main parameter file with
  ``configs/params/calibrated/library_params.yaml`` over it and the population
  ``configs/params/calibrated/library_population.yaml``: the posterior median of the population
  posterior fitted by NUTS to every trial arm with outcomes (``fits/README.md`` says how; the
  first point calibration to 12 arms stays as ``advanced_params.yaml`` / ``advanced_population.yaml``);
- ``--uncalibrated``: the uncalibrated defaults (``configs/params/qspio_example1.yaml``,
  ``configs/params/population.yaml``), i.e. QSP-IO's published values;
- an explicit ``--params FILE`` (with or without ``--uncalibrated``): that file alone (a parameter file of one's own is not mixed with
  a calibration fitted to other values), with the default population unless ``--population``;
- ``--params-extra FILE``: applied over whatever the above chose (later files win);
- ``--population FILE``: replaces the chosen population; parameters stay as chosen.

:func:`resolve` returns the files and a ``calibration`` record that goes into ``run.json``, so a
result always says which model produced it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from qspjax.errors import QSPValidationError
from qspjax.params import PARAMS_DIR

CALIBRATED_DIR = PARAMS_DIR / "calibrated"
CALIBRATED_PARAMS = CALIBRATED_DIR / "library_params.yaml"
CALIBRATED_POPULATION = CALIBRATED_DIR / "library_population.yaml"
DEFAULT_PARAMS = PARAMS_DIR / "qspio_example1.yaml"
DEFAULT_POPULATION = PARAMS_DIR / "population.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--params``, ``--params-extra``, ``--population`` and ``--uncalibrated`` to a sub-command."""
    p.add_argument("--params", default=None,
                   help="main parameter file; given explicitly, it replaces the calibrated model "
                        f"(default: {_rel(DEFAULT_PARAMS)} with the calibration {_rel(CALIBRATED_PARAMS)} over it)")
    p.add_argument("--params-extra", action="append", default=[], metavar="FILE",
                   help="parameter file applied over the chosen ones; repeatable, later files win")
    p.add_argument("--population", default=None,
                   help=f"population file (default: the calibrated {_rel(CALIBRATED_POPULATION)}; "
                        f"with --uncalibrated or --params: {_rel(DEFAULT_POPULATION)})")
    p.add_argument("--uncalibrated", action="store_true",
                   help="run QSP-IO's published parameters and the default population instead of the "
                        "shipped calibration")


@dataclass(frozen=True)
class ModelChoice:
    """The files a run reads, in the order they apply, and what they amount to."""

    main: Path
    extra: tuple[Path, ...]
    population: Path
    calibrated: bool

    def record(self) -> dict:
        """The ``calibration`` entry of ``run.json``."""
        return {
            "calibrated": self.calibrated,
            "source": "fits/README.md (shipped calibration)" if self.calibrated else "not calibrated",
            "parameter_files": [_rel(self.main), *(_rel(p) for p in self.extra)],
            "population_file": _rel(self.population),
        }


def resolve(args: argparse.Namespace) -> ModelChoice:
    """The parameter and population files that ``args`` ask for (see the module docstring)."""
    use_calibration = not args.uncalibrated and args.params is None
    main = Path(args.params) if args.params else DEFAULT_PARAMS
    extra = ((CALIBRATED_PARAMS,) if use_calibration else ()) + tuple(Path(p) for p in args.params_extra)
    if args.population:
        population = Path(args.population)
    else:
        population = CALIBRATED_POPULATION if use_calibration else DEFAULT_POPULATION
    return ModelChoice(main, extra, population, calibrated=use_calibration)


def check_cohort_flags(args: argparse.Namespace) -> None:
    """Refuse a non-positive ``--patients`` or ``--chunk`` and an ``--rtol`` outside (0, 1e-2)."""
    if args.patients <= 0:
        raise QSPValidationError("command line", "--patients", args.patients, "must be a positive integer")
    if args.chunk <= 0:
        raise QSPValidationError("command line", "--chunk", args.chunk, "must be a positive integer")
    if not (0 < args.rtol < 1e-2):
        raise QSPValidationError("command line", "--rtol", args.rtol, "must be in (0, 1e-2)")


def _rel(path: Path) -> str:
    """A path relative to the checkout when it lies inside it (portable run.json), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(PARAMS_DIR.parent.parent))
    except ValueError:
        return str(path)
