"""``python -m pipeline <command>``: the one CLI that strings the stages together.

Each command lives in its own module ``pipeline/cmd_<name>.py`` exposing ``add_parser(subparsers)``,
which registers the sub-command and sets ``func`` (``args -> int`` exit status).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from common.errors import UserError

COMMANDS = ["generate", "sheet", "prune", "export", "build", "engine"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
