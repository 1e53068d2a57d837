"""Library output a user cannot act on, silenced at its source; ``SDD_DEBUG=1`` (or ``python -m pipeline -v``)
shows everything.

Every command's entry point (``python -m pipeline``, the benchmarks' frame, the scripts) calls
:func:`common.cli.setup_logging`, which calls :func:`silence_libraries`. Each entry below names one message of
one library: a Python warning by category, the module that issues it and its text, or a log record by the
logger that emits it and its text. Nothing else is filtered: a new warning of the same library, or the same
warning raised from our own code, still shows. The project's own ``logging`` lines are never touched.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

DEBUG_ENV = "SDD_DEBUG"

# (category, module regex (the module whose line ``warnings`` reports: where the library's code reached it, so the
# same warning raised from our own code still shows), message regex, why the user cannot act on it)
WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (FutureWarning, r"abc\Z", r"`torch\.distributed\.reduce_op` is deprecated",
     "torch's own deprecated alias, reached by an isinstance check inside torch.export (reported from abc)"),
    (FutureWarning, r"copyreg\Z", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "torch.export copying its own pytree specs (reported from copyreg)"),
    (UserWarning, r"torch\.onnx\._internal\.exporter\._onnx_program", r"# The axis name: .* will not be used, since it shares",
     "the dynamo exporter merging two dynamic axes we named alike (batch of every input)"),
    (RuntimeWarning, r"onnx\.reference\.ops\.", r"(divide by zero|invalid value|overflow) encountered",
     "onnx's reference evaluator folding constants (T5's relative-position buckets take log(0))"),
)

# logger name -> (message regex, only under a CPU build of torch, why)
LOG_RECORDS: dict[str, tuple[str, bool, str]] = {
    "torch.onnx._internal.exporter._registration": (
        r"torchvision is not installed\. Skipping torchvision::", False,
        "the exporter registers torchvision's ops when it can; no component of ours uses them"),
    "torch.utils._pytree": (
        r"is an Enum subclass and is now natively supported by torch\.compile", False,
        "torchao registering its enums the way older torch wanted"),
    "diffusers.quantizers.torchao.torchao_quantizer": (
        r"Unable to import `torchao` Tensor objects", False,
        "diffusers naming torchao classes that torchao 0.18 no longer has; we load no torchao-serialized checkpoint"),
    "matplotlib.font_manager": (
        r"generated new fontManager", False,
        "matplotlib's font cache, built once per machine (INFO, which our log level shows)"),
    "torchao": (
        r"Failed to load .*torchao.*_C.*\.so", True,
        "torchao's CUDA kernel libraries cannot load into a CPU build of torch (kept under a CUDA build, where they matter)"),
    "torchao.kernel.intmm": (
        r"Detected no triton", True,
        "Triton comes with a CUDA build of torch; the CPU build has none (kept under a CUDA build)"),
    "onnxruntime.quantization.matmul_nbits_quantizer": (
        r"^(start to quantize \S+ \.\.\.|complete quantization of \S+ with \d bits \.\.\.)$", False,
        "ONNX Runtime's weight-only quantizer, two INFO lines per layer (export.encoder_quant logs one line per encoder)"),
}


def debug_requested() -> bool:
    """``SDD_DEBUG`` is set to anything but ``""`` or ``"0"``."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _cpu_torch() -> bool:
    """torch is a CPU build (read from its version, without touching a CUDA driver)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is None or getattr(torch.version, "cuda", None) is None


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message matches ``pattern`` (if ``cpu_only``, only under a CPU build
    of torch)."""

    def __init__(self, pattern: str, cpu_only: bool):
        super().__init__()
        self.pattern = re.compile(pattern)
        self.cpu_only = cpu_only

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pattern.search(record.getMessage()):
            return True
        return self.cpu_only and not _cpu_torch()


def silence_libraries(debug: bool = False) -> bool:
    """Install the filters above unless ``debug`` or ``SDD_DEBUG`` asks to see everything; returns whether
    they are installed. Idempotent (a second call adds nothing). Call it before the libraries are imported where
    possible: several of these messages are printed at import time."""
    if debug or debug_requested():
        return False
    for category, module, message, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)  # replaces its own copy
    for name, (pattern, cpu_only, _why) in LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessage(pattern, cpu_only))
    return True
