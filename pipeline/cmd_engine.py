"""``python -m pipeline engine`` (``make engine``): prune, export, build engines and benchmark, end to end.

Parses and hands over to :func:`pipeline.engine.run_engine`, which checks every stage's typed settings before the
first one starts and then calls each stage's driver.
"""

from __future__ import annotations

import argparse

from pipeline.engine import add_engine_args


def add_parser(sub) -> None:
    p = sub.add_parser("engine", help="prune + export + build engines + benchmark (make engine)")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.engine import run_engine

    return run_engine(args)
