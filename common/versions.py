"""What a result was measured or built with: installed library versions and the device, as manifests and
benchmark reports record them (one copy for the project)."""

from __future__ import annotations

import importlib
import os
import platform
from importlib import metadata
from typing import Any, Iterable


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


def module_versions(modules: Iterable[str], *, optional: Iterable[str] = ()) -> dict[str, str]:
    """``{"python": ..., module: module.__version__}`` for modules the caller has loaded or needs (an
    ImportError propagates), then for each of ``optional`` that imports here (left out otherwise).

    Reads the running module rather than the distribution: the same for ``torch`` and ``torch==...+cpu``, and
    right for ``onnxruntime`` whichever wheel (``onnxruntime``, ``onnxruntime-gpu``) provides it; a module
    without ``__version__`` falls back to its distribution's version (``unknown`` when there is none).
    """
    out = {"python": platform.python_version()}
    for name in modules:
        out[name] = _module_version(name)
    for name in optional:
        try:
            out[name] = _module_version(name)
        except ImportError:
            pass
    return out


def _module_version(name: str) -> str:
    """``name.__version__``, or for a module without one (``tritonclient``) its distribution's version."""
    version = getattr(importlib.import_module(name), "__version__", None)
    if version is None:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


def cpu_description() -> str:
    """``CPU <processor>, <n> cores, torch threads <t>``: the host as a benchmark reports it."""
    import torch

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def device_description(device: Any = None) -> str:
    """One line naming the device a measurement ran on: the CUDA device's name for a CUDA ``device`` (a
    ``torch.device`` or a string such as ``"cuda:0"``), :func:`cpu_description` otherwise (``None``: CPU)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_description()


def device_info(cuda: bool, *, modules: Iterable[str] = ("torch", "diffusers", "onnxruntime"),
                optional: Iterable[str] = ("tensorrt", "tensorrt_rtx")) -> dict[str, Any]:
    """The host (CPU, core and torch thread counts), the versions of ``modules`` (and of ``optional`` ones
    that import here), the GPU with its compute capability when ``cuda``, and a one-line ``summary``."""
    import torch

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **module_versions(modules, optional=optional),
    }
    if cuda:
        info["gpu"] = torch.cuda.get_device_name()
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["summary"] = f"{info['gpu']} (compute {info['compute_capability']})"
    else:
        info["summary"] = cpu_description()
    return info
