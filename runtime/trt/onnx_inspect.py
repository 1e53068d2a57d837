"""What TensorRT will see in an ONNX, read without building: its precision, its N:M weights, its I/O."""

from __future__ import annotations

import os
from typing import Any


def onnx_precision(onnx_path: str | os.PathLike) -> str:
    """The precision of an ONNX as TensorRT builds it strongly typed: ``"fp8"`` (TensorRT's FP8 Q/DQ),
    ``"w4a16"`` (``DequantizeLinear`` of INT4 constants: 4-bit weights, float16 activations, see
    :mod:`export.int4_qdq`), ``"int8"`` (``DequantizeLinear`` of INT8/UINT8 constants), else ``"fp16"`` when its
    floating-point weights are float16 (the majority of their elements), else ``"fp32"``. Reads no weight data."""
    import numpy as np
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if ops & {"TRT_FP8DequantizeLinear", "TRT_FP8QuantizeLinear"}:
        return "fp8"
    if int4_dequantize_nodes(onnx_path):
        return "w4a16"
    if "DequantizeLinear" in ops:
        return "int8"
    sizes: dict[int, int] = {}
    for t in model.graph.initializer:
        sizes[t.data_type] = sizes.get(t.data_type, 0) + int(np.prod(t.dims))
    half = sizes.get(onnx.TensorProto.FLOAT16, 0) + sizes.get(onnx.TensorProto.BFLOAT16, 0)
    return "fp16" if half > sizes.get(onnx.TensorProto.FLOAT, 0) else "fp32"


def int4_dequantize_nodes(onnx_path: str | os.PathLike) -> dict[str, str]:
    """``{DequantizeLinear node name: its INT4 constant}`` of an ONNX (a W4A16 graph's weights). Reads no weight data."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    int4 = {t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
    return {n.name: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4}


def onnx_nm_weights(onnx_path: str | os.PathLike, n: int = 2, m: int = 4) -> dict[str, Any]:
    """Which constant MatMul/Gemm/Conv weights of an ONNX satisfy N:M along the reduction (K) dimension.

    This is TensorRT's eligibility condition for sparse kernels. A quantized weight (``DequantizeLinear`` /
    ``TRT_FP8DequantizeLinear`` of a constant, possibly through Transposes; :mod:`export.quantize`) is checked
    on its quantized values, the ones TensorRT gets. Returns ``{"pattern": "n:m", "eligible": [weight names],
    "checked": int, "not_eligible": [names], "quantized": [names of the weights behind a dequantize node],
    "quantized_eligible": [those that are also N:M]}``.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from export.sparsity_check import quantized_nonzeros, trace_quantized_weight

    model = onnx.load(str(onnx_path), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: node for node in model.graph.node for o in node.output}
    eligible, not_eligible, quantized = [], [], []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[1] not in inits:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
            qw = trace_quantized_weight(node.input[1], 1 if trans_b else 0, inits, producers)
            if qw is None or len(inits[qw.source].dims) != 2:
                continue
            nonzero = np.moveaxis(quantized_nonzeros(qw, inits, producers), qw.k_axis, -1)  # (N, K)
            quantized.append(qw.source)
            if nonzero.shape[1] % m:
                not_eligible.append(qw.source)
                continue
            groups = nonzero.reshape(nonzero.shape[0], -1, m).sum(-1)  # (N, K/m) non-zeros per group
            (eligible if bool((groups <= n).all()) else not_eligible).append(qw.source)
            continue
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            wk = w.T  # (N, K): MatMul B is (K, N)
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            wk = w if trans_b else w.T  # (N, K)
        else:
            wk = np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)  # (C_out, kh*kw*C_in): channels innermost
        if wk.shape[1] % m:
            not_eligible.append(node.input[1])
            continue
        groups = (wk.reshape(wk.shape[0], -1, m) != 0).sum(-1)  # (N, K/m) non-zeros per group
        (eligible if bool((groups <= n).all()) else not_eligible).append(node.input[1])
    return {"pattern": f"{n}:{m}", "eligible": eligible, "not_eligible": not_eligible, "checked": len(eligible) + len(not_eligible),
            "quantized": quantized, "quantized_eligible": [w for w in quantized if w in set(eligible)]}


def io_signature(onnx_path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init_names = {t.name for t in model.graph.initializer}

    def sig(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims}

    return {
        "inputs": [sig(v) for v in model.graph.input if v.name not in init_names],
        "outputs": [sig(v) for v in model.graph.output],
    }
