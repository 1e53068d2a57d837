"""The OpenVINO library: imported only when an OpenVINO path runs, so a host without it keeps working, and its absence
is one line naming what to install (:func:`openvino`); its version and the process's one ``openvino.Core``."""

from __future__ import annotations

import functools
from types import ModuleType

from common.errors import UserError

INSTALL_HINT = "run `make setup` (it installs the openvino extra) or `pip install -e '.[openvino]'`"


def openvino() -> ModuleType:
    """The ``openvino`` module, or :class:`UserError` (one line: how to install it) when it is not installed."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError(f"OpenVINO is not installed here; {INSTALL_HINT}") from None
    return ov


@functools.lru_cache(maxsize=1)
def core():
    """The process's ``openvino.Core`` (plugins load once; every compiled model of the process shares it)."""
    return openvino().Core()


def version() -> str:
    """OpenVINO's release, ``2026.4.1`` (its build suffix dropped); :func:`full_version` has the whole string."""
    return full_version().split("-")[0]


def full_version() -> str:
    """OpenVINO's whole version string (release, build number and commit), as manifests record it."""
    return str(openvino().__version__)


def cpu_name() -> str:
    """The CPU as OpenVINO's CPU plugin names it (``FULL_DEVICE_NAME``)."""
    return str(core().get_property("CPU", "FULL_DEVICE_NAME"))
