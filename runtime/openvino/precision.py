"""OpenVINO's inference precision on a CPU (``INFERENCE_PRECISION_HINT``): ``f32``, or ``bf16`` (activations and
weights rounded to bfloat16, 8 significant bits, inside OpenVINO's kernels; float32 at the component's inputs and
outputs).

The project always sets the hint explicitly. Its default (``auto``) follows the CPU: ``bf16`` where it computes
bfloat16 natively (the ``avx512_bf16`` or AMX ``amx_bf16`` instructions, read from ``/proc/cpuinfo``), else
``f32`` (OpenVINO's own default follows the same rule, and is the fallback where ``/proc/cpuinfo`` cannot be read).
``bf16`` asked on a CPU without them is an error: OpenVINO would silently run ``f32``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

HINTS = ("auto", "f32", "bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic


@dataclass(frozen=True)
class Hint:
    """A resolved precision hint: ``name`` (``f32``/``bf16``, what OpenVINO is told) and ``why`` (for reports)."""

    name: str
    why: str


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first processor's flags in ``cpuinfo``, or None where it cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    return frozenset(line.split(":", 1)[1].split()) if line else None


@functools.lru_cache(maxsize=1)
def default_hint() -> Hint:
    """``bf16`` where the CPU computes bfloat16 natively (:data:`BF16_FLAGS`), else ``f32``."""
    flags = cpu_flags()
    if flags is None:
        from runtime.openvino.library import core

        own = str(core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
        name = "bf16" if own == "bf16" else "f32"
        return Hint(name, f"OpenVINO's default on this CPU ({own}); /proc/cpuinfo unreadable")
    have = [f for f in BF16_FLAGS if f in flags]
    if have:
        return Hint("bf16", f"the CPU has {' and '.join(have)}")
    return Hint("f32", "the CPU has neither avx512_bf16 nor AMX")


def resolve_hint(hint: str = "auto") -> Hint:
    """``hint`` (one of :data:`HINTS`) as OpenVINO is told it. One line for an unknown hint, or for ``bf16`` on a CPU
    without native bfloat16."""
    if hint not in HINTS:
        raise UserError(f"unknown OpenVINO precision {hint!r}; use {', '.join(HINTS)}")
    if hint == "auto":
        return default_hint()
    if hint == "bf16" and default_hint().name != "bf16":
        raise UserError(f"--ov-precision bf16: {default_hint().why}, so OpenVINO would run float32; use f32 or auto")
    return Hint(hint, "asked for")
