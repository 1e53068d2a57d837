"""Finding the plan a component directory holds for the running backend and a precision."""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import UserError
from runtime.manifest import QUANTIZED_PRECISIONS, engine_stem
from runtime.trt.backend import Backend, get_backend


def find_plan(component_dir: str | os.PathLike, backend: Backend | None = None, precision: str | None = None) -> Path:
    """The plan of ``component_dir`` for ``backend`` (default: the running one), or a one-line error.

    precision: ``"int8"``/``"fp8"`` picks that quantized engine; None takes the float engine, else the one
    quantized engine of the directory (several: an error naming them)."""
    component_dir = Path(component_dir)
    be = backend or get_backend("auto")
    plan = component_dir / f"{engine_stem(be.name, be.version, precision)}.plan"
    if plan.is_file():
        return plan
    if precision is None:
        quantized = [component_dir / f"{engine_stem(be.name, be.version, p)}.plan" for p in QUANTIZED_PRECISIONS]
        quantized = [p for p in quantized if p.is_file()]
        if len(quantized) == 1:
            return quantized[0]
        if quantized:
            raise UserError(f"{component_dir} holds {' and '.join(p.name for p in quantized)}; keep one engine per directory "
                            f"(`make engine` builds each precision into its own engines-<precision>/)")
    others = sorted(p.name for p in component_dir.glob("engine_*.plan"))
    hint = f" (found {', '.join(others)}, built with another version)" if others else ""
    raise UserError(f"no {be.name} {be.version} engine in {component_dir}{hint}; rebuild it with `python -m pipeline build`")
