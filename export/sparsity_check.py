"""The N:M checker of an exported graph: every constant GEMM weight (also an INT8/FP8 weight behind its
DequantizeLinear) checked along its reduction axis, mapped back to torch layer names and weighed by its FLOPs
per denoising step (:func:`check_onnx_sparsity`); the ONNX/TensorRT quantize of a constant; and
``polygraphy inspect sparsity`` as an independent cross-check. Design notes: ``docs/export.md``."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NMResult:
    """N:M check of one weight along its K axis."""

    ok: bool
    groups: int  # groups of M along K, over all output columns
    bad_groups: int  # groups with more than N non-zeros
    density: float  # share of non-zero weights
    reason: str = ""


def check_nm(weight: np.ndarray, k_axis: int, n: int = 2, m: int = 4) -> NMResult:
    """Exact N:M check: every group of ``m`` consecutive entries along ``k_axis`` has at most ``n`` non-zeros.

    weight: 2-D array (any float dtype); a K not divisible by ``m`` fails (TensorRT would not use sparse tactics).
    """
    w = np.moveaxis(np.asarray(weight), k_axis, -1)  # (N_out, K)
    nnz = np.count_nonzero(w)
    density = float(nnz / w.size) if w.size else 0.0
    k = w.shape[-1]
    if k % m:
        return NMResult(False, 0, 0, density, f"K={k} is not a multiple of {m}")
    groups = (w.reshape(-1, k // m, m) != 0).sum(axis=-1)  # (N_out, K/m) non-zeros per group
    bad = int((groups > n).sum())
    return NMResult(bad == 0, int(groups.size), bad, density, "" if bad == 0 else f"{bad} of {groups.size} groups exceed {n}:{m}")


@dataclass
class GemmInfo:
    """One MatMul/Gemm node: its FLOPs per call and, if its weight is a constant, the N:M verdict."""

    node: str
    op: str
    flops: int  # 2 * M * K * N at the shapes given (multiply-adds x 2)
    weight: str | None = None  # initializer name (torch parameter name where the exporter allowed it)
    layer: str | None = None  # torch module name, e.g. transformer_blocks.0.attn.to_q
    k_axis: int | None = None  # of the initializer (through any Transposes)
    shape: list[int] | None = None  # of the initializer
    nm: NMResult | None = None
    quant: str | None = None  # the dequantize op in front of the GEMM (DequantizeLinear / TRT_FP8DequantizeLinear)


@dataclass
class SparsityReport:
    """What :func:`check_onnx_sparsity` found."""

    pattern: str  # "2:4" / "4:8"
    gemms: list[GemmInfo] = field(default_factory=list)
    expected_layers: list[str] = field(default_factory=list)  # layers that must be N:M (the plan's pruned layers)
    missing_layers: list[str] = field(default_factory=list)  # expected but not a constant GEMM weight in the ONNX
    failed_layers: list[str] = field(default_factory=list)  # expected but not N:M
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total_flops(self) -> int:
        return sum(g.flops for g in self.gemms)

    @property
    def eligible_flops(self) -> int:
        return sum(g.flops for g in self.gemms if g.nm is not None and g.nm.ok)

    @property
    def eligible_share(self) -> float:
        return self.eligible_flops / self.total_flops if self.total_flops else 0.0

    @property
    def ok(self) -> bool:
        return not self.missing_layers and not self.failed_layers

    def summary(self) -> dict[str, Any]:
        sparse = [g for g in self.gemms if g.nm is not None and g.nm.ok]
        return {
            "pattern": self.pattern,
            "ok": self.ok,
            "input_shapes": self.input_shapes,
            "gemm_nodes": len(self.gemms),
            "constant_weight_gemms": sum(g.weight is not None for g in self.gemms),
            "sparse_gemms": len(sparse),
            "gemm_flops": self.total_flops,
            "sparse_eligible_flops": self.eligible_flops,
            "sparse_eligible_share": self.eligible_share,
            "expected_layers": len(self.expected_layers),
            "missing_layers": self.missing_layers,
            "failed_layers": {name: self._reason(name) for name in self.failed_layers},
            "sparse_layers": sorted(g.layer or g.weight for g in sparse),
        }

    def _reason(self, layer: str) -> str:
        g = next((g for g in self.gemms if g.layer == layer), None)
        return g.nm.reason if g is not None and g.nm is not None else ""


def _dims(value_info) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim]


def infer_shapes(model, input_shapes: dict[str, Iterable[int]]) -> dict[str, list]:
    """Shapes of every tensor of ``model`` when its inputs have ``input_shapes`` (ONNX shape inference).

    The model is not modified; initializer data is not needed (load it with ``load_external_data=False``).
    """
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    # TensorRT's FP8 Q/DQ (domain "trt") are element-wise: an Identity has their shapes, and shape inference
    # (ONNX's or ONNX Runtime's) then sees through them
    for node in m.graph.node:
        if node.op_type in _TRT_QDQ:
            data = node.input[0]
            node.domain, node.op_type = "", "Identity"
            del node.input[:]
            node.input.append(data)
            del node.attribute[:]
    # big weights only need their type and dims: turn them into graph inputs (small shape constants stay)
    big = [t for t in m.graph.initializer if int(np.prod(t.dims)) > 4096 or t.data_location == onnx.TensorProto.EXTERNAL]
    for t in big:
        m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    keep = [t for t in m.graph.initializer if not (int(np.prod(t.dims)) > 4096 or t.data_location == onnx.TensorProto.EXTERNAL)]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for inp in m.graph.input:
        if inp.name in input_shapes:
            shape = list(input_shapes[inp.name])
            dims = inp.type.tensor_type.shape.dim
            if len(dims) != len(shape):
                raise ValueError(f"input {inp.name} has rank {len(dims)}, got shape {shape}")
            for d, v in zip(dims, shape):
                d.Clear()
                d.dim_value = int(v)
    del m.graph.value_info[:]
    for out in m.graph.output:
        for d in out.type.tensor_type.shape.dim:
            d.Clear()
    inferred = shape_inference.infer_shapes(m, data_prop=True)
    shapes = {v.name: _dims(v) for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    if any(isinstance(d, str) for v in shapes.values() for d in v):
        # A graph exported with dynamic height/width computes its reshape targets from the input's shape;
        # ONNX's data propagation gives up on some of those chains, ONNX Runtime's symbolic inference does not.
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(m, auto_merge=True)
        shapes = {v.name: _dims(v) for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


_TRT_QDQ = ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear")
_DQ_OPS = ("DequantizeLinear", "TRT_FP8DequantizeLinear")
_Q_OPS = ("QuantizeLinear", "TRT_FP8QuantizeLinear")


@dataclass(frozen=True)
class QuantizedWeight:
    """A GEMM weight behind a dequantize node: ``dq(source)`` or ``dq(q(source))`` with ``source`` an initializer."""

    source: str  # the initializer
    k_axis: int  # K along the initializer's axes
    dq: Any  # the DequantizeLinear / TRT_FP8DequantizeLinear node
    q: Any = None  # the QuantizeLinear / TRT_FP8QuantizeLinear node of an unfolded float weight, else None


def trace_quantized_weight(name: str, k_axis: int, inits, producers) -> QuantizedWeight | None:
    """Follow a GEMM's weight input ``name`` (K on ``k_axis``) back through Transposes to a dequantize node
    whose data is a constant, or a quantize node of a constant; None when it is anything else (an activation)."""
    axis = k_axis
    node = producers.get(name)
    while node is not None and node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        axis = perm[axis] if perm else (1 - axis)  # Y = Transpose(X): Y's axis i is X's axis perm[i]
        node = producers.get(node.input[0])
    if node is None or node.op_type not in _DQ_OPS:
        return None
    data = node.input[0]
    if data in inits:
        return QuantizedWeight(data, axis, node)
    q = producers.get(data)
    if q is not None and q.op_type in _Q_OPS and q.input[0] in inits:
        return QuantizedWeight(q.input[0], axis, node, q)
    return None


def constant_value(name: str, inits, producers, load_dir: str = "") -> np.ndarray | None:
    """The value of a constant tensor ``name`` (an initializer, read from ``load_dir`` when external, or a ``Constant`` node), or None."""
    from onnx import numpy_helper

    if not name:
        return None
    if name in inits:
        return numpy_helper.to_array(inits[name], base_dir=load_dir)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        a = next((a for a in node.attribute if a.name == "value"), None)
        if a is not None:
            return numpy_helper.to_array(a.t)
    return None


def per_axis(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-tensor (scalar) or per-axis (1-D) quantization parameter, broadcastable to a rank-``rank`` tensor."""
    values = np.asarray(values)
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis % rank] = values.size
    return values.reshape(shape)


def quantize_int(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1) -> np.ndarray:
    """ONNX ``QuantizeLinear`` of a constant: ``saturate(round_half_even(w / scale) + zero_point)`` in the zero
    point's integer type (int8 without one); ``axis`` applies to a 1-D scale (per channel)."""
    dtype = np.asarray(zero_point).dtype if zero_point is not None else np.dtype(np.int8)
    info = np.iinfo(dtype)
    s = per_axis(scale, w.ndim, axis).astype(np.float32)
    zp = per_axis(zero_point, w.ndim, axis).astype(np.int64) if zero_point is not None else 0
    q = np.rint(w.astype(np.float32) / s).astype(np.int64) + zp
    return np.clip(q, info.min, info.max).astype(dtype)


def quantize_fp8(w: np.ndarray, scale: np.ndarray, axis: int = 1) -> np.ndarray:
    """TensorRT's FP8 quantize of a constant: ``w / scale`` saturated to +-448 and rounded to E4M3
    (``ml_dtypes.float8_e4m3fn``, round half to even); ``axis`` applies to a 1-D scale."""
    import ml_dtypes

    x = w.astype(np.float32) / per_axis(scale, w.ndim, axis).astype(np.float32)
    return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)


def quantized_nonzeros(qw: QuantizedWeight, inits, producers, load_dir: str = "") -> np.ndarray:
    """Boolean mask of the weights that dequantize to a non-zero value, on the initializer's layout.

    A stored constant: non-zero after subtracting its zero point (FP8 bytes stored as UINT8 read as E4M3). An
    unfolded float weight: quantized first, as ONNX ``QuantizeLinear`` (round half to even, saturate) or
    TensorRT's FP8 quantize (saturate to +-448, round to E4M3) would.
    """
    import ml_dtypes

    data = constant_value(qw.source, inits, producers, load_dir)
    if qw.q is None:
        if data.dtype == np.uint8 and qw.dq.op_type == "TRT_FP8DequantizeLinear":
            data = data.view(ml_dtypes.float8_e4m3fn)
        if data.dtype.kind in "iu":
            zp_name = qw.dq.input[2] if len(qw.dq.input) > 2 else ""
            zp = constant_value(zp_name, inits, producers)
            axis = next((a.i for a in qw.dq.attribute if a.name == "axis"), 1)
            zp = per_axis(zp, data.ndim, axis).astype(np.int64) if zp is not None else 0
            return (data.astype(np.int64) - zp) != 0
        return data.astype(np.float32) != 0
    scale = constant_value(qw.q.input[1], inits, producers)
    if scale is None:
        raise ValueError(f"the scale of {qw.q.name} is not a constant")
    axis = next((a.i for a in qw.q.attribute if a.name == "axis"), 1)
    if qw.q.op_type == "TRT_FP8QuantizeLinear":
        return quantize_fp8(data, scale, axis).astype(np.float32) != 0
    zp = constant_value(qw.q.input[2] if len(qw.q.input) > 2 else "", inits, producers)
    q = quantize_int(data, scale, zp, axis).astype(np.int64)
    return (q - (per_axis(zp, data.ndim, axis).astype(np.int64) if zp is not None else 0)) != 0


def gemm_table(model, input_shapes: dict[str, Iterable[int]]) -> list[GemmInfo]:
    """Every MatMul/Gemm node with its FLOPs at ``input_shapes`` and its constant weight (if any).

    FLOPs = 2 x (output elements) x K. A node whose shape cannot be inferred raises ``ValueError``. A weight
    behind a dequantize node (see the module docstring) is reported as its initializer, with ``quant`` set.
    """
    shapes = infer_shapes(model, input_shapes)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, b, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if not a or not y or any(not isinstance(d, int) or d <= 0 for d in [*a, *y]):
            raise ValueError(f"cannot infer the shapes of {node.op_type} {node.name} (A={a}, Y={y})")
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0) if node.op_type == "Gemm" else 0
        k = a[0] if trans_a else a[-1]
        flops = 2 * int(np.prod(y)) * int(k)
        info = GemmInfo(node=node.name, op=node.op_type, flops=flops)
        trans_b = next((x.i for x in node.attribute if x.name == "transB"), 0) if node.op_type == "Gemm" else 0
        if node.input[1] in inits and b is not None and len(b) == 2:
            info.weight = node.input[1]
            info.k_axis = 1 if trans_b else 0
            info.shape = list(b)
            info.layer = layer_name(node.input[1])
        elif (qw := trace_quantized_weight(node.input[1], 1 if trans_b else 0, inits, producers)) is not None:
            dims = list(inits[qw.source].dims)
            if len(dims) == 2:
                info.weight = qw.source
                info.k_axis = qw.k_axis
                info.shape = dims
                info.layer = layer_name(qw.source)
                info.quant = qw.dq.op_type
        out.append(info)
    return out


_ANON = re.compile(r"^(val|_val|onnx::|const)")


def layer_name(initializer: str) -> str | None:
    """Torch module name of an exported weight (``transformer_blocks.0.attn.to_q.weight`` -> ``...to_q``), else None."""
    if _ANON.match(initializer) or not initializer.endswith(".weight"):
        return None
    name = initializer[: -len(".weight")]
    return name[len("model.") :] if name.startswith("model.") else name


def check_onnx_sparsity(
    path_or_model,
    pattern: tuple[int, int] = (2, 4),
    *,
    input_shapes: dict[str, Iterable[int]],
    expected_layers: Iterable[str] = (),
    base_dir: str | os.PathLike | None = None,
) -> SparsityReport:
    """Check every constant GEMM weight of an ONNX model for the N:M ``pattern`` along its K axis.

    input_shapes: concrete input shapes for FLOP counting (e.g. the export shapes at the per-step batch).
    expected_layers: torch module names that must be N:M (the plan's pruned layers, ``.weight`` optional);
        each one missing from the ONNX or failing the check is listed in the report (``report.ok`` False).
    base_dir: the directory of the model's external data when ``path_or_model`` is a model loaded without
        it; weights are then read one at a time (memory: one weight, not the model). A path is read so.
    """
    import onnx
    from onnx import numpy_helper

    if isinstance(path_or_model, (str, os.PathLike)):
        model = onnx.load(str(path_or_model), load_external_data=False)
        base_dir = Path(path_or_model).parent
    else:
        model = path_or_model
    load_dir = str(base_dir) if base_dir is not None else ""
    n, m = pattern
    inits = {t.name: t for t in model.graph.initializer}
    report = SparsityReport(pattern=f"{n}:{m}", input_shapes={k: list(v) for k, v in input_shapes.items()})
    report.gemms = gemm_table(model, input_shapes)
    producers = {o: node for node in model.graph.node for o in node.output}
    gemm_nodes = [node for node in model.graph.node if node.op_type in ("MatMul", "Gemm")]  # gemm_table's order
    for g, node in zip(report.gemms, gemm_nodes):
        if g.weight is None:
            continue
        if g.quant is None:
            g.nm = check_nm(numpy_helper.to_array(inits[g.weight], base_dir=load_dir), g.k_axis, n, m)
        else:  # the quantized values (what TensorRT gets), not the float ones
            trans_b = next((x.i for x in node.attribute if x.name == "transB"), 0) if node.op_type == "Gemm" else 0
            qw = trace_quantized_weight(node.input[1], 1 if trans_b else 0, inits, producers)
            g.nm = check_nm(quantized_nonzeros(qw, inits, producers, load_dir), g.k_axis, n, m)
    expected = [e[: -len(".weight")] if e.endswith(".weight") else e for e in expected_layers]
    report.expected_layers = expected
    by_layer = {g.layer: g for g in report.gemms if g.layer is not None}
    report.missing_layers = [e for e in expected if e not in by_layer]
    report.failed_layers = [e for e in expected if e in by_layer and not by_layer[e].nm.ok]
    log.info(
        "sparsity %s: %d/%d constant GEMM weights are %s; %.1f%% of GEMM FLOPs sparse-eligible; %d expected layers missing, %d failing",
        report.pattern,
        sum(g.nm is not None and g.nm.ok for g in report.gemms),
        sum(g.nm is not None for g in report.gemms),
        report.pattern,
        100 * report.eligible_share,
        len(report.missing_layers),
        len(report.failed_layers),
    )
    return report


def polygraphy_sparsity(path: str | os.PathLike, timeout_s: float = 600) -> dict[str, bool]:
    """Run ``polygraphy inspect sparsity`` on ``path``; return ``{tensor name: is 2:4}`` as it reports.

    Polygraphy checks 2:4 only (the pattern TensorRT's sparse tactics use), along the K axis it derives
    from each MatMul/Gemm/Conv. Its check is a Python loop: minutes for multi-GB models.
    """
    exe = Path(sys.executable).with_name("polygraphy")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "polygraphy"]
    env = dict(os.environ, POLYGRAPHY_USE_TENSORRT_RTX=os.environ.get("POLYGRAPHY_USE_TENSORRT_RTX", "1"))
    proc = subprocess.run([*cmd, "inspect", "sparsity", str(path)], capture_output=True, text=True, timeout=timeout_s, env=env)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"polygraphy inspect sparsity failed ({proc.returncode}): {text.strip().splitlines()[-1:]}")
    result: dict[str, bool] = {}
    for line in text.splitlines():
        if mt := re.search(r"Found (non-sparse|sparse) tensor: (\S+)", line):
            result[mt.group(2)] = mt.group(1) == "sparse"
    return result


def cross_check_polygraphy(report: SparsityReport, polygraphy: dict[str, bool]) -> list[str]:
    """Constant GEMM weights on which our 2:4 verdict and polygraphy's disagree (empty = agreement).

    Only weights polygraphy examined (K divisible by 4) are compared.
    """
    if report.pattern != "2:4":
        raise ValueError("polygraphy checks 2:4 only")
    return [g.weight for g in report.gemms if g.weight in polygraphy and g.nm is not None and g.nm.ok != polygraphy[g.weight]]


def report_to_json(report: SparsityReport, per_layer: bool = False) -> dict[str, Any]:
    out = report.summary()
    if per_layer:
        out["gemms"] = [{**asdict(g), "nm": asdict(g.nm) if g.nm else None} for g in report.gemms]
    return out
