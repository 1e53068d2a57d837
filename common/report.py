"""A result as files: the JSON and its Markdown table written side by side, each atomically (one writer for
the project's benchmarks and reports)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.io import atomic_path, write_json


def write_markdown(path: str | os.PathLike, text: str) -> Path:
    """Write Markdown ``text`` to ``path`` atomically (a temporary sibling renamed into place); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_report(json_path: str | os.PathLike, result: Any, markdown: str, *, md_path: str | os.PathLike | None = None) -> Path:
    """Write ``result`` as JSON to ``json_path``, then ``markdown`` to ``md_path`` (default: beside it,
    ``.md`` for ``.json``), each atomically; returns the Markdown path."""
    json_path = Path(json_path)
    write_json(json_path, result)
    return write_markdown(json_path.with_suffix(".md") if md_path is None else md_path, markdown)
