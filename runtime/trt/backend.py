"""The TensorRT library an engine is built or run with: :class:`Backend`, :func:`get_backend`, target names.

``"trt"`` is TensorRT 10/11 (module ``tensorrt``, GPU hosts); ``"trtrtx"`` is TensorRT-RTX (module
``tensorrt_rtx``, builds without a GPU for a list of target compute capabilities). See docs/tensorrt.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from common.errors import UserError
from runtime.manifest import current_gpu, engine_stem

# TensorRT-RTX's default portable targets (docs: "8.0, 8.6, 8.9, 12.0, and later"; Turing needs SM75 explicitly).
RTX_DEFAULT_TARGETS = ("SM80", "SM86", "SM89", "SM120")


@dataclass(frozen=True)
class Backend:
    """A TensorRT flavour: ``name`` is ``"trt"`` (module ``tensorrt``) or ``"trtrtx"`` (``tensorrt_rtx``)."""

    name: str
    module: ModuleType
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.name == "trtrtx"

    @property
    def stem(self) -> str:
        return engine_stem(self.name, self.version)


# backend name -> the Python module of its library
BACKEND_MODULES = {"trt": "tensorrt", "trtrtx": "tensorrt_rtx"}


def get_backend(prefer: str = "auto") -> Backend:
    """Pick the TensorRT library: ``"trt"``, ``"trtrtx"`` or ``"auto"``.

    auto: ``tensorrt`` when a CUDA GPU is visible and it is installed, otherwise ``tensorrt_rtx`` (builds
    without a GPU), otherwise ``tensorrt``. Raises :class:`UserError` when the requested one is missing.
    """
    if prefer not in ("auto", *BACKEND_MODULES):
        raise UserError(f"unknown TensorRT backend {prefer!r}; use auto, trt or trtrtx")
    order = [prefer] if prefer != "auto" else (["trt", "trtrtx"] if current_gpu() is not None else ["trtrtx", "trt"])
    for name in order:
        try:
            mod = importlib.import_module(BACKEND_MODULES[name])
        except ImportError:
            continue
        return Backend(name, mod, str(mod.__version__))
    want = " or ".join(BACKEND_MODULES[n] for n in order)
    raise UserError(
        f"{want} is not installed; `pip install tensorrt-rtx` (builds without a GPU) or install TensorRT from "
        f"NVIDIA's index on a GPU host (`pip install tensorrt --extra-index-url https://pypi.nvidia.com`)"
    )


def sm_name(cc: str) -> str:
    """A compute capability as TensorRT-RTX names it: ``"8.6"`` or ``"sm86"`` -> ``"SM86"``."""
    cc = cc.strip().upper()
    if cc.startswith("SM"):
        return cc
    major, _, minor = cc.partition(".")
    return f"SM{int(major)}{int(minor or 0)}"
