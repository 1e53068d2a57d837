"""Installed library versions, as manifests and benchmark reports record them (one copy for the project)."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Iterable


def library_versions(names: Iterable[str], *, absent: str | None = "absent") -> dict[str, str]:
    """``{"python": ..., name: version}`` for each distribution in ``names``; a missing one is recorded as
    ``absent`` (or left out when ``absent`` is None)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if absent is not None:
                out[name] = absent
    return out
