"""``python -m pipeline <command>``: the one CLI that strings the stages together.

Each command lives in its own module ``pipeline/cmd_<name>.py`` exposing ``add_parser(subparsers)``,
which registers the sub-command and sets ``func`` (``args -> int`` exit status). The stage commands
(``prune``, ``export``, ``build``) are thin: ``settings_from_args(args)`` turns the options into the stage's
typed settings, ``validate(args)`` adds every check that needs no weights, and ``run(args)`` calls the stage's
driver with the settings (``make engine`` builds the same settings directly and calls the same drivers).
"""

from __future__ import annotations

import importlib
import sys

from common.cli import ArgumentParser, run_command, setup_logging

COMMANDS = ["generate", "sheet", "prune", "export", "build", "engine", "serve", "client"]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the library warnings that are silenced by default (also SDD_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pipeline.cmd_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"pipeline.cmd_{name}":
                raise
            continue
        module.add_parser(sub)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
