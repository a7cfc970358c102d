"""The ``qspjax`` command line.

Each sub-command lives next to the code it drives and registers itself through a
``register(subparsers)`` function; this file only assembles them and turns user errors into a
one-line message and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qspjax.errors import QSPValidationError

# (module, description) of every sub-command group; each module defines register(subparsers).
_COMMAND_MODULES = (
    "qspjax.commands.simulate",
    "qspjax.commands.export",
    "qspjax.data.commands",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: exit 2 with usage, no traceback
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qspjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QSPValidationError as exc:
        print(f"qspjax: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a failed run, not bad input: say so, still without a traceback
        from qspjax.runner import CohortFailure

        if isinstance(exc, CohortFailure):
            print(f"qspjax: run failed: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
