"""Engine manifests: what an engine was built from and for, checked before anything is deserialised.

An engine ``engine_<backend><version>.plan`` has a manifest ``engine_<backend><version>.json`` next to it
recording the backend and its version, the precision (``fp32``/``fp16`` from the ONNX's weights, ``int8``/``fp8``
from its Q/DQ nodes; a quantized engine's name carries it: ``engine_<backend><version>_int8.plan``), the GPU
(name and compute capability) or, for TensorRT-RTX builds, the target compute capabilities (and the targets
the builder refused, with its message: FP8 on SM80/SM86), the optimisation profile, the sparsity pattern, the
sha256 of the source ONNX (with its external data) and of the plan, the builder options, the builder's
sparsity log lines, and for a quantized engine the quantized layers and those that are also N:M.

:func:`check_engine` compares a manifest with the running backend and GPU and with the files on disk; any
mismatch raises :class:`~common.errors.UserError` with one line that says to rebuild. It never touches the
plan beyond hashing it, so it runs (and is tested) on machines without a GPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.io import read_json, sha256_file

MANIFEST_VERSION = 1

BACKEND_TITLES = {"trt": "TensorRT", "trtrtx": "TensorRT-RTX"}


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA device: marketing name and compute capability as ``"major.minor"`` (e.g. ``"8.9"``)."""

    name: str
    compute_capability: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "compute_capability": self.compute_capability}


def current_gpu() -> GpuInfo | None:
    """The CUDA device this process would run on (device 0 or the current one), or ``None`` without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return None
    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return GpuInfo(torch.cuda.get_device_name(idx), f"{major}.{minor}")


QUANTIZED_PRECISIONS = ("int8", "fp8", "w4a16")  # w4a16: INT4 weight-only DequantizeLinear (export.int4_qdq)


def engine_stem(backend: str, version: str, precision: str | None = None) -> str:
    """``engine_<backend><version>`` (``engine_trtrtx1.7.1.116``, ``engine_trt10.13.3.9``), with ``_int8`` /
    ``_fp8`` / ``_w4a16`` appended for an engine of a quantized ONNX (``engine_trtrtx1.7.1.116_int8``); a float engine's
    precision is its ONNX's dtype (strongly typed) and the manifest's ``precision``."""
    stem = f"engine_{backend}{version}"
    return f"{stem}_{precision}" if precision in QUANTIZED_PRECISIONS else stem


def manifest_path_for(plan: str | os.PathLike) -> Path:
    """The manifest next to a plan file (same stem, ``.json``)."""
    return Path(plan).with_suffix(".json")


def read_manifest_of(artifact: Path, where: str, rebuild_hint: str, what: str = "file") -> tuple[Path, dict[str, Any]]:
    """``(manifest path, manifest)`` of a built ``artifact`` (an engine plan, a compiled OpenVINO model), or one line
    saying to rebuild when the artifact or its manifest is missing. where: how the lines name the artifact."""
    mpath = manifest_path_for(artifact)
    if not artifact.is_file():
        raise UserError(f"{where} does not exist; {rebuild_hint}")
    if not mpath.is_file():
        raise UserError(f"{where} has no manifest ({mpath.name}); it cannot be checked, {rebuild_hint}")
    return mpath, read_json(mpath, what=what)


def onnx_files(onnx_path: str | os.PathLike) -> list[Path]:
    """The ONNX file and the external-data files it references (sorted, existing ones only)."""
    import onnx

    onnx_path = Path(onnx_path)
    files = [onnx_path]
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError/ValidationError subclasses we cannot name portably
        raise UserError(f"cannot read ONNX {onnx_path} ({type(e).__name__}); re-run the export stage") from None
    locations = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    for loc in sorted(locations):
        p = onnx_path.parent / loc
        if p.is_file():
            files.append(p)
    return files


def sha256_onnx(onnx_path: str | os.PathLike) -> str:
    """sha256 over the ONNX file and its external data (names and contents)."""
    import hashlib

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"missing ONNX file {onnx_path}; run the export stage first")
    files = onnx_files(onnx_path)
    if len(files) == 1:
        return sha256_file(onnx_path)
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _cc_matches(cc: str, targets: list[str]) -> bool:
    """Whether ``cc`` ("8.6") is among RTX targets given as ``SM86``/``8.6``."""
    norm = {re.sub(r"^SM(\d+)(\d)$", r"\1.\2", t.upper()) for t in targets}
    return cc in norm


def check_engine(
    plan: str | os.PathLike,
    *,
    backend: str,
    backend_version: str,
    gpu: GpuInfo | None,
    onnx_path: str | os.PathLike | None = None,
    rebuild_hint: str = "rebuild it with `python -m pipeline build`",
) -> dict[str, Any]:
    """Check an engine and its manifest against the running backend, GPU and source ONNX.

    plan: the ``.plan`` file. backend / backend_version: the runtime that would deserialise it
    (``"trt"`` or ``"trtrtx"`` and its ``__version__``). gpu: the device it would run on (``None``: no GPU,
    checked after everything else so mismatches show on any machine). onnx_path: the ONNX the engine must
    have been built from (default: the path recorded in the manifest, when it still exists).

    Returns the manifest. Raises :class:`UserError` (one line, saying to rebuild) on a missing manifest, a
    plan whose sha256 differs from the manifest, another backend or version, another GPU, or a changed ONNX.
    """
    plan = Path(plan)
    where = f"engine {plan}"
    mpath, m = read_manifest_of(plan, where, rebuild_hint)
    if m.get("format") != MANIFEST_VERSION or "plan_sha256" not in m:
        raise UserError(f"{where}: manifest {mpath.name} is not a version-{MANIFEST_VERSION} engine manifest; {rebuild_hint}")
    if sha256_file(plan) != m["plan_sha256"]:
        raise UserError(f"{where}: plan file does not match the sha256 in its manifest (modified or truncated); {rebuild_hint}")
    built_b, built_v = m.get("backend"), m.get("backend_version")
    if built_b != backend or built_v != backend_version:
        raise UserError(
            f"{where} was built with {BACKEND_TITLES.get(built_b, built_b)} {built_v} but this is "
            f"{BACKEND_TITLES.get(backend, backend)} {backend_version}; {rebuild_hint}"
        )
    check_source_onnx(m, onnx_path, where=where, rebuild_hint=rebuild_hint, base=plan.parent)
    built_gpu = m.get("gpu")
    targets = m.get("target_compute_capabilities") or []
    if gpu is None:
        raise UserError(f"{where} needs an NVIDIA GPU to run and none is visible (CUDA unavailable); run it on a GPU host")
    if targets:  # TensorRT-RTX: portable across the listed compute capabilities
        if not _cc_matches(gpu.compute_capability, targets):
            raise UserError(
                f"{where} targets compute capabilities {', '.join(targets)} but this GPU ({gpu.name}) is "
                f"{gpu.compute_capability}; {rebuild_hint} (--target-cc {gpu.compute_capability})"
            )
    elif built_gpu:
        if built_gpu.get("compute_capability") != gpu.compute_capability or built_gpu.get("name") != gpu.name:
            raise UserError(
                f"{where} was built for {built_gpu.get('name')} (compute {built_gpu.get('compute_capability')}) "
                f"but this GPU is {gpu.name} (compute {gpu.compute_capability}); {rebuild_hint}"
            )
    else:
        raise UserError(f"{where}: manifest records neither a GPU nor target compute capabilities; {rebuild_hint}")
    return m


def check_source_onnx(manifest: dict[str, Any], onnx_path: str | os.PathLike | None, *, where: str, rebuild_hint: str,
                      base: Path | None = None, built: str = "the engine was built") -> None:
    """One line when the ONNX that ``manifest`` records (or ``onnx_path``, when given; a relative recorded path is read
    against ``base``) changed since it was built from (sha256 with external data), or, when given, is missing. A
    recorded ONNX that is gone is not an error: the engine no longer needs it."""
    src = Path(onnx_path) if onnx_path is not None else (Path(manifest["onnx"]) if manifest.get("onnx") else None)
    if src is not None and not src.is_absolute() and onnx_path is None and base is not None:
        src = base / src
    if src is None:
        return
    if not src.is_file():
        if onnx_path is not None:
            raise UserError(f"{where}: source ONNX {src} is missing; re-export it, then {rebuild_hint}")
    elif sha256_onnx(src) != manifest.get("onnx_sha256"):
        raise UserError(f"{where}: source ONNX {src} changed since {built}; {rebuild_hint}")


def check_engines_model(engine_dir: str | os.PathLike, spec) -> None:
    """One line when an engine under ``engine_dir`` was built from an export of another model than ``spec``: the
    model and weights fingerprint its manifest records (a manifest written before they were: those of the export
    report beside the ONNX it was built from, when that is still there). Reads manifests only."""
    from families.registry import other_model

    for mpath in sorted(Path(engine_dir).rglob("engine_*.json")):
        m = read_json(mpath, what="engine manifest")
        model, weights = m.get("model"), m.get("model_weights")
        report = Path(m["onnx"]).parent.parent / "export_report.json" if model is None and m.get("onnx") else None
        if report is not None and report.is_file():
            r = read_json(report, what="export report")
            model, weights = r.get("model"), (r.get("inputs") or {}).get("model_weights")
        other = other_model(spec, model=model, weights=weights) if model else None
        if other:
            raise UserError(f"engine {mpath.with_suffix('.plan')} {other}; pass --model {model}, or build engines for {spec.id}")


def profile_violation(profile: dict[str, list[list[int]]], shapes: dict[str, Any]) -> str | None:
    """Why ``shapes`` (input name -> shape) fall outside an engine's optimisation ``profile`` (input ->
    ``[min, opt, max]``), or None when they fit. A batch above the maximum fits: the runner splits it."""
    for name, shape in shapes.items():
        if name not in profile:
            continue
        mn, _, mx = profile[name]
        shape = list(shape)
        if len(shape) != len(mn):
            return f"input {name} has rank {len(shape)}, the engine takes rank {len(mn)}"
        for k, (v, lo, hi) in enumerate(zip(shape, mn, mx)):
            if v < lo or (k > 0 and v > hi):
                return f"input {name} has shape {shape}, outside the engine's {mn}..{mx}"
    return None


def check_in_profile(manifest: dict[str, Any], shapes: dict[str, Any]) -> None:
    """One-line :class:`UserError` when ``shapes`` are outside the engine's profile; it names the served
    range (resolutions and batch, when the manifest records them) and how to widen it."""
    profile = (manifest.get("profiles") or [{}])[0]
    why = profile_violation(profile, shapes)
    if why is None:
        return
    served = manifest.get("served")
    if served:
        from families.shapes import ServedShapes

        s = ServedShapes(tuple(tuple(r) for r in served["resolutions"]), tuple(served["batch"]), served["text_seq_len"], served["vae_scale"], served.get("static", False))
        where = f"serves {s.describe()}" if not s.static else f"serves {', '.join(s.label(r) for r in s.resolutions)} px (static), batch {s.batch[0]}..{s.batch[2]}"
    else:
        where = "has a fixed profile"
    raise UserError(f"the {manifest.get('component', 'engine')} engine {where}: {why}; rebuild with `--resolution`/`--batch` covering the request")


def manifest_summary(plan: str | os.PathLike) -> dict[str, Any]:
    """A short view of a plan's manifest for reports: backend, size, sparsity, sparse-layer counts."""
    m = read_json(manifest_path_for(plan))
    nm = m.get("onnx_nm_weights") or {}
    quant = m.get("quantization") or {}
    return {
        "backend": f"{m['backend']} {m['backend_version']}",
        "precision": m.get("precision"),
        "quantized_layers": len(quant.get("quantized_layers", [])),
        "quantized_nm_layers": len(quant.get("quantized_nm_layers", [])),
        "refused_targets": (m.get("refused_targets") or {}).get("targets"),
        "plan_mib": round(m["plan_bytes"] / 2**20, 2),
        "sparsity": m.get("sparsity"),
        "sparse_weights": m.get("builder", {}).get("sparse_weights"),
        "log_eligible": len(m.get("sparsity_log", {}).get("eligible", [])),
        "log_sparse": len(m.get("sparsity_log", {}).get("sparse", [])),
        "onnx_nm_eligible": len(nm.get("eligible", [])),
        "targets": m.get("target_compute_capabilities"),
        "build_seconds": m.get("build_seconds"),
    }
