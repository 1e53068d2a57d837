"""The frame every benchmark program shares (one copy): its argument parser, logging, bad input as one
``error:`` line with exit status 2 (never a traceback), and the result written as JSON with its Markdown
table beside it, each atomically, recording the device and library versions it was measured with.

A benchmark module holds what it measures and how it tabulates it; its ``main`` is::

    def main(argv=None) -> int:
        p = program.parser("name", __doc__)      # prog "python -m benchmarks.name"
        p.add_argument(...)
        return program.run(p, argv, body)        # body(args) -> exit status (None: 0)

and ``body`` starts with :func:`check_out` (the outputs can be written: one line now, not after the
measurement) and ends with :func:`write` (``result`` carrying :func:`environment`'s keys).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from common.cli import ArgumentParser, run_command, setup_logging
from common.report import write_report
from common.versions import device_description, module_versions

log = logging.getLogger(__name__)


def parser(name: str, doc: str | None) -> ArgumentParser:
    """The argument parser of ``python -m benchmarks.<name>``, described by the first line of ``doc``."""
    lines = (doc or "").strip().splitlines()
    return ArgumentParser(prog=f"python -m benchmarks.{name}", description=lines[0] if lines else None)


def run(p: argparse.ArgumentParser, argv: list[str] | None, body: Callable[[argparse.Namespace], int | None]) -> int:
    """Parse ``argv``, set up logging, run ``body(args)``; returns its exit status (0 for None). A bad
    input (:class:`common.errors.UserError`, a user-caused OS error) is one ``error:`` line and status 2."""
    args = p.parse_args(argv)
    setup_logging()
    return run_command(lambda: body(args))


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads when ``threads`` is given (0 or None: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def resolve_device(device: str) -> Any:
    """``--device``: ``auto`` is CUDA when available, CPU otherwise; anything else as torch reads it."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def split_list(text: str | None) -> list[str]:
    """The items of a comma-separated option, stripped, empty ones dropped (``"a, b,"`` -> ``["a", "b"]``)."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def environment(device: Any = None, libraries: Iterable[str] = ("torch",)) -> dict[str, Any]:
    """``{"device": <one line>, "versions": {...}}``: what a result was measured on and with
    (:func:`common.versions.device_description`, :func:`common.versions.module_versions`)."""
    return {"device": device_description(device), "versions": module_versions(libraries)}


def check_out(json_path: str | os.PathLike, *, md_path: str | os.PathLike | None = None, option: str = "--out") -> Path:
    """Check, before anything is measured, that :func:`write` can write ``json_path`` and its Markdown (one line
    otherwise: a directory there, a read-only location, a symbolic link that leads nowhere). Creates nothing."""
    from common.io import check_output

    json_path = Path(json_path)
    check_output(json_path, "file", option=option)
    check_output(json_path.with_suffix(".md") if md_path is None else md_path, "file", option=option)
    return json_path


def write(json_path: str | os.PathLike, result: Any, markdown: str, *, md_path: str | os.PathLike | None = None,
          echo: bool = False) -> Path:
    """Write ``result`` to ``json_path`` and ``markdown`` beside it (or to ``md_path``), each atomically;
    with ``echo`` also print the Markdown to stdout. Returns the Markdown path."""
    md = write_report(json_path, result, markdown, md_path=md_path)
    log.info("wrote %s and %s", json_path, md)
    if echo:
        sys.stdout.write(markdown)
    return md
