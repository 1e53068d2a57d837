"""The components a pruned export shares with the dense one: text encoders and VAE decoder do not depend on
the pruning, so a pruned export takes them from a finished dense export of the same model (same weights,
precision, served shapes, libraries and export code) by hard link instead of exporting them again (for SD3 at
real size that is CLIP-L, CLIP-G and a 4.7B-parameter T5-XXL). Anything that differs, or a file that is
missing, and the component is exported as usual."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.io import link_or_copy, read_json

log = logging.getLogger(__name__)

# What a text encoder's or VAE's ONNX depends on, in an export fingerprint (export.fingerprint.fingerprint):
# not the transformer's precision, its plan or its weights.
SHARED_INPUTS = ("report_version", "model", "model_weights", "others_precision", "shapes", "versions", "code")


def shared_components(source: Path | None, inputs: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """The report entries of the components in ``names`` that the finished export in ``source`` holds for the
    same :data:`SHARED_INPUTS` as ``inputs`` (a fingerprint), with every file in place; ``{}`` when none."""
    if source is None or not names or inputs.get("model_weights") is None:
        return {}
    try:
        report = read_json(Path(source) / "export_report.json")
    except UserError:
        return {}
    theirs = report.get("inputs") or {}
    if any(theirs.get(k) != inputs.get(k) for k in SHARED_INPUTS):
        return {}
    entries = report.get("components") or {}
    return {n: entries[n] for n in names if n in entries and (Path(source) / "onnx" / entries[n]["file"]).is_file()}


def link_component(source: Path, entry: dict[str, Any], onnx_dir: Path) -> dict[str, Any]:
    """Hard-link (copy across file systems) one component's ONNX and its external data from ``source``'s
    ``onnx/`` into ``onnx_dir``; returns its report entry, marked with where it came from."""
    src = Path(source) / "onnx" / entry["file"]
    for f in (src, src.with_name(src.name + ".data")):
        if f.is_file():
            link_or_copy(f, onnx_dir / f.name)
    log.info("%s: the dense export's, linked from %s (the pruning does not change it)", entry["file"], src.parent)
    return {**entry, "shared_with": str(Path(source).resolve())}
