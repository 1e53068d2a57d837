"""The builder's log: a TensorRT logger that keeps every line, and the sparsity report parsed from it."""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable

from runtime.trt.backend import Backend

log = logging.getLogger(__name__)


def capturing_logger(backend: Backend, *, forward: bool = True):
    """An ``ILogger`` of ``backend``'s library that keeps every line (``.lines``: (severity, message)).

    Warnings and errors are forwarded to :mod:`logging` (``forward=False``: only kept, for a build whose failure
    is expected and reported otherwise); the full log goes to the engine manifest's sparsity extraction
    (:func:`parse_sparsity_log`).
    """
    trt = backend.module

    class _CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[tuple[str, str]] = []

        def log(self, severity, msg):  # called from TensorRT's threads: keep it cheap
            self.lines.append((getattr(severity, "name", str(severity)), msg))
            if not forward:
                return
            if severity <= trt.ILogger.Severity.ERROR:
                log.error("%s: %s", backend.name, msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("%s: %s", backend.name, msg)

        def text(self) -> list[str]:
            return [m for _, m in self.lines]

    return _CapturingLogger()


_SPARSE_HEAD = re.compile(
    r"(Layers eligible for sparse math|picked sparse implementation|layer\(s\) eligible to use sparse tactics|"
    r"layer\(s\) using sparse tactics|\(Sparsity\))",
    re.IGNORECASE,
)


def parse_sparsity_log(lines: Iterable[str]) -> dict[str, Any]:
    """Extract TensorRT's sparsity report from builder log lines.

    TensorRT 8-10 logs ``(Sparsity) Layers eligible for sparse math: a, b`` and
    ``(Sparsity) TRT inference plan picked sparse implementation for layers: b``; TensorRT-RTX logs
    ``N layer(s) eligible to use sparse tactics:`` / ``N layer(s) using sparse tactics:`` followed by names.
    Returns ``{"lines": [...], "eligible": [names], "sparse": [names]}`` (names in log order, deduplicated).
    """
    lines = [ln.rstrip() for text in lines for ln in str(text).splitlines()]
    out: dict[str, Any] = {"lines": [], "eligible": [], "sparse": []}
    i = 0
    while i < len(lines):
        ln = lines[i]
        if not _SPARSE_HEAD.search(ln):
            i += 1
            continue
        out["lines"].append(ln)
        low = ln.lower()
        key = "eligible" if "eligible" in low else ("sparse" if ("picked sparse" in low or "using sparse" in low) else None)
        names: list[str] = []
        if ":" in ln:
            tail = ln.split(":", 1)[1] if "(Sparsity)" not in ln else ln.rsplit(":", 1)[1]
            names += [n.strip() for n in tail.split(",") if n.strip()]
        # RTX style lists one name per following (indented) line.
        j = i + 1
        while j < len(lines) and lines[j][:1] in (" ", "\t", "-") and lines[j].strip():
            out["lines"].append(lines[j])
            names.append(lines[j].strip().lstrip("-").strip())
            j += 1
        if key:
            for n in names:
                if n not in out[key]:
                    out[key].append(n)
        i = j
    return out


_WEIGHTS_MEMORY = re.compile(r"Total Weights Memory:\s*(\d+)\s*bytes")
_CONSTANTS = re.compile(r"Constants: \[(.*?)\], Outputs:")
_INPUTS = re.compile(r"Inputs: \[(.*?)\], Constants:")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def parse_engine_layers(lines: Iterable[str]) -> dict[str, Any]:
    """What the builder says it built, from the layer table it logs at ``ProfilingVerbosity.DETAILED``
    (``Name: ..., LayerType: ..., Constants: [ { ..., Datatype: Int4, ... } ], ..., Metadata: [ONNX Layer: a]...``)
    and its ``Total Weights Memory: N bytes`` line.

    Returns ``{"layers": engine layers listed, "weights_memory_bytes": int or None, "constant_dtypes": {dtype:
    count of constants}, "int4_onnx_nodes": [ONNX node names of the engine layers that hold an INT4 constant and take
    an activation (the dequantization fused into a GEMM)], "int4_unfused_onnx_nodes": [those of layers that hold one
    and take no input: the weight dequantized on its own into a float16 tensor the GEMM then reads]}``."""
    out: dict[str, Any] = {"layers": 0, "weights_memory_bytes": None, "constant_dtypes": {}, "int4_onnx_nodes": [], "int4_unfused_onnx_nodes": []}
    for text in lines:
        for ln in str(text).splitlines():
            hit = _WEIGHTS_MEMORY.search(ln)
            if hit:
                out["weights_memory_bytes"] = int(hit.group(1))
                continue
            if not ln.startswith("Name: ") or "LayerType:" not in ln:
                continue
            out["layers"] += 1
            consts = _CONSTANTS.search(ln)
            dtypes = re.findall(r"Datatype: (\w+)", consts.group(1)) if consts else []
            for d in dtypes:
                out["constant_dtypes"][d] = out["constant_dtypes"].get(d, 0) + 1
            if "Int4" in dtypes:
                inputs = _INPUTS.search(ln)
                key = "int4_onnx_nodes" if inputs and inputs.group(1).strip() else "int4_unfused_onnx_nodes"
                out[key] += [n for n in _ONNX_LAYER.findall(ln) if n not in out[key]]
    return out
