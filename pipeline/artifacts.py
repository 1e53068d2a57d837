"""The artifact store: ``artifacts/<model>/<config-id>/`` and its ``manifest.json``.

Layout of one configuration (``config-id`` = sparsity id + method, e.g. ``2-4-obs-diff``)::

    prune/         stage 1: plan.json, transformer/ (masked, dense shapes)
    export/        stage 2, float32: compact/, onnx/ (every component), export_report.json
    export-fp16/   stage 2, float16 for TensorRT (strongly typed): onnx/transformer.onnx ...
    export-int8/   stage 2 with an INT8 (Q/DQ) transformer (--precision int8); export-fp8/ likewise
    engines/       stage 3: <component>/engine_<backend><version>.plan + manifest
    engines-int8/  stage 3 from export-int8/: <component>/engine_<backend><version>_int8.plan; engines-fp8/ likewise
    bench.json     the end-to-end benchmark (bench.md, bench.png, grid.png beside it); bench-int8/ for --precision int8
    manifest.json  each stage: inputs, settings, outputs, versions, timings

The dense reference lives in ``artifacts/<model>/dense/`` with the same layout (no prune/), shared by every
configuration of that model. Each stage decides itself whether its output is complete and current (it
fingerprints its inputs); the manifest records what happened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.io import read_json, write_json
from common.paths import REPO_ROOT
from common.versions import library_versions
from families.registry import ModelSpec

ARTIFACTS = REPO_ROOT / "artifacts"


@dataclass(frozen=True)
class ConfigDirs:
    root: Path

    @property
    def prune(self) -> Path:
        return self.root / "prune"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def export_fp16(self) -> Path:
        return self.root / "export-fp16"

    @property
    def engines(self) -> Path:
        return self.root / "engines"

    def export_for(self, precision: str) -> Path:
        """Stage 2's directory for a transformer precision: ``export/`` (fp32), ``export-fp16/``, ``export-int8/``, ..."""
        return self.export if precision == "fp32" else self.root / f"export-{precision}"

    def engines_for(self, precision: str) -> Path:
        """Stage 3's directory for engines of a precision: ``engines/`` (float16, the default), ``engines-int8/``, ``engines-fp8/``."""
        return self.engines if precision in ("fp16", "fp32") else self.root / f"engines-{precision}"

    def bench_dir(self, precision: str = "fp32") -> Path:
        """Where the end-to-end benchmark of a precision writes: the config directory (fp32) or ``bench-<precision>/``."""
        return self.root if precision == "fp32" else self.root / f"bench-{precision}"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def bench(self) -> Path:
        return self.root / "bench.json"


def model_dir(spec: ModelSpec, base: Path = ARTIFACTS) -> Path:
    return base / spec.id


def config_dirs(spec: ModelSpec, config_id: str, base: Path = ARTIFACTS) -> ConfigDirs:
    return ConfigDirs(model_dir(spec, base) / config_id)


VERSIONED = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt", "tensorrt-rtx", "polygraphy")


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the artifacts depend on (:data:`VERSIONED`, those installed)."""
    return library_versions(VERSIONED, absent=None)


class Manifest:
    """``manifest.json`` of one configuration directory, updated stage by stage (atomically)."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = read_json(path) if path.is_file() else {}
        self.data.update(header)
        self.data.setdefault("stages", {})
        self.data["versions"] = versions()

    def record(self, stage: str, *, inputs: dict, settings: dict, outputs: dict, seconds: float, reused: bool) -> None:
        self.data["stages"][stage] = {
            "inputs": inputs,
            "settings": settings,
            "outputs": outputs,
            "seconds": round(seconds, 2),
            "reused": reused,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)
