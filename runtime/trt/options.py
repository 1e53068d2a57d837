"""Builder settings (:class:`BuildOptions`) and the optimisation profile they give for an ONNX."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from common.errors import UserError


@dataclass
class BuildOptions:
    """Builder settings.

    batch: (min, opt, max) batch of the optimisation profile (the ONNX's ``batch`` dim); every other dim
        must be static in the ONNX or given in ``dims`` as name -> (min, opt, max).
    sparsity: the pattern string recorded in the manifest (``"2:4"``); ``sparse_weights`` defaults to True
        for N:M patterns. opt_level: builder optimisation level 0-5 (TensorRT default 3).
    timing_cache: file read before and written after each build (TensorRT; a no-op in TensorRT-RTX).
    target_cc: TensorRT-RTX target compute capabilities (``("8.6", "8.9")`` or ``("SM86",)``); default:
        the current GPU if any, else :data:`RTX_DEFAULT_TARGETS`. workspace_mib: workspace pool limit.
    profile: the optimisation profile itself, ``{input: [min, opt, max]}`` (stage 2's export report has one
        per component covering the served resolutions); replaces ``batch``/``dims``.
    served: the served shapes (:meth:`families.shapes.ServedShapes.to_json`), recorded in the manifest so
        that a request outside the profile is told the range.
    model / model_weights: the model the ONNX was exported from and its weights fingerprint (stage 2's report),
        recorded in the manifest so that a runner told another model refuses the engine.
    """

    batch: tuple[int, int, int] = (1, 2, 4)
    dims: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    profile: dict[str, list[list[int]]] | None = None
    served: dict[str, Any] | None = None
    sparsity: str = "dense"
    sparse_weights: bool | None = None
    opt_level: int = 3
    timing_cache: str | None = None
    target_cc: tuple[str, ...] | None = None
    workspace_mib: int | None = None
    model: str | None = None
    model_weights: str | None = None

    @property
    def use_sparse_weights(self) -> bool:
        if self.sparse_weights is not None:
            return self.sparse_weights
        return bool(re.fullmatch(r"\d+:\d+", self.sparsity.strip()))


def profile_shapes(onnx_path: str | os.PathLike, batch: tuple[int, int, int], dims: dict[str, tuple[int, int, int]] | None = None) -> dict[str, list[list[int]]]:
    """Optimisation profile from the ONNX inputs: ``{input: [min_shape, opt_shape, max_shape]}``.

    The dimension named ``batch`` takes ``batch``; other named dims take ``dims[name]``; static dims stay.
    """
    import onnx

    lo, mid, hi = batch
    if not (1 <= lo <= mid <= hi):
        raise UserError(f"batch range {batch} must satisfy 1 <= min <= opt <= max")
    dims = dict(dims or {})
    model = onnx.load(str(onnx_path), load_external_data=False)
    init_names = {t.name for t in model.graph.initializer}
    prof: dict[str, list[list[int]]] = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        shapes: list[list[int]] = [[], [], []]
        for k, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                rng = (d.dim_value,) * 3
            elif d.dim_param == "batch" or (k == 0 and d.dim_param and d.dim_param not in dims):
                rng = (lo, mid, hi)
            elif d.dim_param in dims:
                rng = tuple(dims[d.dim_param])
            else:
                raise UserError(f"{onnx_path}: input {inp.name} dim {k} ({d.dim_param or '?'}) is dynamic; give its range in BuildOptions.dims")
            for s, v in zip(shapes, rng):
                s.append(int(v))
        prof[inp.name] = shapes
    return prof


def expected_profile(onnx_path: str | os.PathLike, options: BuildOptions) -> dict[str, list[list[int]]]:
    """The profile an engine of ``onnx_path`` is built with: ``options.profile`` (checked against the ONNX's
    inputs, ranks and static dims) or the one :func:`profile_shapes` derives from the batch range."""
    if options.profile is None:
        return profile_shapes(onnx_path, options.batch, options.dims)
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init_names = {t.name for t in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        if inp.name not in options.profile:
            raise UserError(f"{onnx_path}: the profile has no shapes for input {inp.name}; re-export with `python -m pipeline export`")
        shapes = [list(map(int, s)) for s in options.profile[inp.name]]
        dims = inp.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            if any(len(s) != len(dims) for s in shapes) or (d.HasField("dim_value") and d.dim_value > 0 and any(s[k] != d.dim_value for s in shapes)):
                raise UserError(f"{onnx_path}: input {inp.name} profile {shapes} does not fit the ONNX shape; re-export with `python -m pipeline export`")
        out[inp.name] = shapes
    return out
