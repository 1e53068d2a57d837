"""Reuse of stage 2's output: the fingerprint of everything an export depends on (plan and weights, model,
precision, calibration, components, shapes, library versions, the export package's code), whether an
existing export covers a request, and whether its files are all there."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import UserError
from common.io import read_json, sha256_file, sha256_tree
from common.versions import library_versions
from export.stage import OTHERS_PRECISION
from families.registry import model_fingerprint, other_model

if TYPE_CHECKING:
    from families.shapes import ServedShapes

REPORT_VERSION = 1
VERSIONED = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx-graphsurgeon", "nvidia-modelopt")


def versions() -> dict[str, str]:
    """Python's and each library of :data:`VERSIONED`'s version (``absent`` when not installed)."""
    return library_versions(VERSIONED)


def _code_hash() -> str:
    """This stage's code: every module of the ``export`` package (this driver included) and of ``families`` (the
    component wrappers, example inputs and dynamic axes the exporter uses live there)."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for f in sorted([*here.glob("*.py"), *(here.parent / "families").glob("*.py")]):
        h.update(f"{f.parent.name}/{f.name}".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def fingerprint(spec, pruned: Path | None, precision: str, components: list[str], served: ServedShapes | None = None, *,
                calibration: dict[str, Any] | None = None, others_precision: str | None = None) -> dict[str, Any]:
    """Everything the output depends on; equal fingerprints mean the existing output can be reused.

    calibration: a quantized export's :func:`resolve_calibration` (its prompts enter by hash)."""
    out: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "model": spec.id,
        "precision": precision,
        "others_precision": others_precision or OTHERS_PRECISION.get(precision, "fp32"),
        # the calibration by value (prompts by hash), not by where its prompt list was read from
        "calibration": {k: v for k, v in calibration.items() if k not in ("prompts", "prompts_source")} if calibration is not None else None,
        "components": list(components),  # a list, as the JSON report reads back
        "shapes": served.to_json() if served is not None else dict(spec.shapes.__dict__),
        "versions": versions(),
        "code": _code_hash(),
    }
    needs_model = pruned is None or any(c != "transformer" for c in components)
    out["model_weights"] = model_fingerprint(spec) if needs_model else None
    if pruned is not None:
        out["plan_sha256"] = sha256_file(pruned / "plan.json")
        out["transformer_sha256"] = sha256_tree(pruned / "transformer")
    return out


def covers(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether an export with fingerprint ``existing`` serves a request with fingerprint ``wanted``: the same
    inputs and at least the components asked for (a transformer-only request is served by a full export)."""
    if not existing or not set(wanted.get("components", [])) <= set(existing.get("components", [])):
        return False
    skip = {"components"} | ({"model_weights"} if wanted.get("model_weights") is None else set())
    return all(existing.get(k) == v for k, v in wanted.items() if k not in skip) and set(existing) - skip == set(wanted) - skip


def output_complete(out: Path, report: dict[str, Any]) -> bool:
    """Whether every file ``report`` lists (compact checkpoint, each component's ONNX) is in ``out``."""
    files = [out / "compact" / "model.safetensors", out / "compact" / "compact.json"]
    files += [out / "onnx" / c["file"] for c in report.get("components", {}).values()]
    return all(f.is_file() for f in files)


def check_export_for(onnx_dir: str | Path, spec, *, sparsity: str | None = None, option: str = "--onnx-dir") -> dict[str, Any]:
    """One line when stage 2's output that holds ``onnx_dir`` was made for another model than ``spec`` (its report's
    ``model`` and weights fingerprint, :func:`families.registry.other_model`) or, given ``sparsity``, pruned to
    another pattern. Returns the report (``{}`` when there is none: an ONNX directory assembled by hand)."""
    report_file = Path(onnx_dir).parent / "export_report.json"
    if not report_file.is_file():
        return {}
    report = read_json(report_file, what="export report")
    model = report.get("model")
    other = other_model(spec, model=model, weights=(report.get("inputs") or {}).get("model_weights")) if model else None
    if other:
        raise UserError(f"{option} {onnx_dir}: the export ({report_file}) {other}; pass --model {model}, or export {spec.id}")
    theirs = report.get("sparsity")
    if sparsity is not None and theirs is not None and str(theirs) != str(sparsity):
        raise UserError(f"{option} {onnx_dir} holds a {theirs} export ({report_file}), not {sparsity}; pass --sparsity {theirs}")
    return report
