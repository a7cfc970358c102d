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
    "qspjax.commands.trial",
    "qspjax.commands.fit",
    "qspjax.commands.profile",
    "qspjax.commands.export",
    "qspjax.commands.sensitivity",
    "qspjax.data.commands",
    "qspjax.commands.stop_time",
    "qspjax.commands.optimize",
    "qspjax.commands.twin",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2, no traceback
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad or --help command line: the same status in-process as from a shell
        return int(exc.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --local-processes, which runs it again
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
