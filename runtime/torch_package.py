"""The torch backend's transformer as one file a server loads without this project: ``torch.export`` +
AOTInductor (``transformer.pt2``), with a manifest like the engines' (``transformer.json``).

The manifest records the format, the library versions the package was compiled with (torch, torchao,
diffusers), the GPU (name and compute capability), the settings and layer report of
:func:`runtime.torch_backend.prepare_transformer`, the example input shapes and dtypes, and the sha256 of
the package and of the checkpoint it came from. :func:`check_package` compares it with the running libraries,
the GPU and the file before anything is loaded; a mismatch stops with one line saying to rebuild. When
``torch.export`` or AOTInductor cannot package the converted transformer (a tensor subclass it cannot trace,
no compiler), :func:`package_transformer` returns the reason instead, for the build report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from common.io import atomic_path, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "torch-aoti-package"
PACKAGE_VERSION = 1
PACKAGE = "transformer.pt2"
MANIFEST = "transformer.json"
VERSIONED = ("torch", "torchao", "diffusers")
REBUILD = "rebuild it with `python -m pipeline build --backend torch`"


@dataclass(frozen=True)
class PackageResult:
    """Where the package went (None when it could not be written) and why not."""

    path: Path | None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"package": str(self.path) if self.path else None, "not_packaged_because": self.reason}


def running_versions() -> dict[str, str]:
    from common.versions import library_versions

    return library_versions(VERSIONED)


def _describe_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: ({"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} if isinstance(v, torch.Tensor) else v)
            for k, v in inputs.items()}


def write_manifest(directory: Path, *, package: Path, gpu, report: dict[str, Any], inputs: dict[str, Any],
                   source_sha256: str | None, versions: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``directory/transformer.json`` for ``package`` and return it."""
    manifest = {
        "format": PACKAGE_FORMAT, "version": PACKAGE_VERSION, "backend": "torch",
        "versions": versions or running_versions(), "gpu": gpu.to_dict() if gpu is not None else None,
        "package": package.name, "package_sha256": sha256_file(package), "source_sha256": source_sha256,
        "inputs": _describe_inputs(inputs), "report": report,
    }
    write_json(directory / MANIFEST, manifest)
    return manifest


def package_transformer(model: nn.Module, inputs: dict[str, torch.Tensor], out_dir: str | os.PathLike, *, gpu, report: dict[str, Any],
                        source_sha256: str | None = None) -> PackageResult:
    """``torch.export`` the converted (uncompiled) ``model`` on ``inputs`` (keyword arguments of its forward)
    and compile it with AOTInductor into ``out_dir/transformer.pt2`` + manifest; the directory appears whole
    or not at all. Returns where it went, or the first line of why it could not be packaged."""
    out_dir = Path(out_dir)
    kwargs = {**inputs, "return_dict": False}
    try:
        with torch.no_grad():
            program = torch.export.export(model, args=(), kwargs=kwargs, strict=False)
    except Exception as e:  # what torch.export cannot trace: tensor subclasses, data-dependent control flow
        return PackageResult(None, f"torch.export: {_first_line(e)}")
    try:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir(parents=True)
            path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp / PACKAGE))
            write_manifest(tmp, package=Path(path), gpu=gpu, report=report, inputs=inputs, source_sha256=source_sha256)
    except UserError:
        raise
    except Exception as e:  # AOTInductor: lowering or C++ compilation failures
        return PackageResult(None, f"AOTInductor: {_first_line(e)}")
    log.info("AOTInductor package: %s", out_dir / PACKAGE)
    return PackageResult(out_dir / PACKAGE)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def check_package(path: str | os.PathLike, *, gpu, versions: dict[str, str] | None = None) -> dict[str, Any]:
    """Check ``path`` (a ``transformer.pt2``) and its manifest against the running libraries (``versions``,
    default the installed ones) and ``gpu`` (a :class:`runtime.manifest.GpuInfo`, None: no CUDA). Returns the
    manifest; raises :class:`UserError` with one line on any mismatch."""
    path = Path(path)
    where = f"torch package {path}"
    if not path.is_file():
        raise UserError(f"{where} does not exist; {REBUILD}")
    mpath = path.parent / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{where} has no manifest ({MANIFEST}); it cannot be checked, {REBUILD}")
    m = read_json(mpath)
    if m.get("format") != PACKAGE_FORMAT or m.get("version") != PACKAGE_VERSION or "package_sha256" not in m:
        raise UserError(f"{where}: {MANIFEST} is not a version-{PACKAGE_VERSION} {PACKAGE_FORMAT} manifest; {REBUILD}")
    if sha256_file(path) != m["package_sha256"]:
        raise UserError(f"{where} does not match the sha256 in its manifest (modified or truncated); {REBUILD}")
    running = versions or running_versions()
    for lib in VERSIONED:
        built = (m.get("versions") or {}).get(lib)
        if built != running.get(lib):
            raise UserError(f"{where} was compiled with {lib} {built} but this is {lib} {running.get(lib)}; {REBUILD}")
    built_gpu = m.get("gpu") or {}
    if gpu is None:
        raise UserError(f"{where} runs on an NVIDIA GPU and none is visible (CUDA unavailable); run it on a GPU host")
    if built_gpu.get("name") != gpu.name or built_gpu.get("compute_capability") != gpu.compute_capability:
        raise UserError(f"{where} was compiled for {built_gpu.get('name')} (compute {built_gpu.get('compute_capability')}) "
                        f"but this GPU is {gpu.name} (compute {gpu.compute_capability}); {REBUILD}")
    return m


def load_package(path: str | os.PathLike, *, gpu) -> Any:
    """The compiled transformer of a checked package (callable with the manifest's inputs as keywords)."""
    check_package(path, gpu=gpu)
    return torch._inductor.aoti_load_package(str(path))
