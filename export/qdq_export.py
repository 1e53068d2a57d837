"""Export of a fake-quantized transformer to a Q/DQ ONNX with the TorchScript exporter (ModelOpt's Q/DQ are
TorchScript symbolic functions): INT8 gives ``QuantizeLinear``/``DequantizeLinear``, FP8 TensorRT's
``trt::TRT_FP8QuantizeLinear``/``TRT_FP8DequantizeLinear``; each weight quantizer is then folded into an
INT8/FP8 constant read by one DequantizeLinear before its GEMM (:mod:`export.graph_passes`). Limits and
design notes: ``docs/quantization.md``."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from common.dtypes import from_torch_scalar, torch_dtype
from export.graph_passes import DQ_OPS, Q_OPS, fold_dq_transposes, fold_shape_computations, fold_weight_quantizers, name_initializers_after_torch, remove_unused
from export.onnx_files import MAX_IR_VERSION, save_onnx
from export.quantize import is_quantized

log = logging.getLogger(__name__)

# TorchScript exporter opset: per-channel Q/DQ needs >= 13; 18 is the rest of stage 2's opset (what TensorRT 10,
# TensorRT-RTX and onnxruntime >= 1.20 are tested with here).
QUANT_OPSET = 18


def export_quantized_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: dict[str, torch.Tensor],
    *,
    adapter=None,
    opset: int = QUANT_OPSET,
    fold_weights: bool = True,
) -> Path:
    """Export a :func:`quantize_transformer`-ed model's ONNX wrapper to ``path`` (Q/DQ graph), batch dynamic.

    example_inputs: by ONNX input name, batch >= 2 (``adapter.transformer_inputs``); every input and the output
        get a dynamic ``batch`` axis 0. fold_weights: fold each weight quantizer into an INT8/FP8 constant read by
        one DequantizeLinear right before its GEMM (see the module docstring); False keeps ModelOpt's graph
        (QuantizeLinear on the float weight, then a Transpose). Initializers are named after the torch
        parameters. The IR version is capped at ``export.onnx_files.MAX_IR_VERSION``; written atomically.
    """
    import onnx

    from families import adapter_for

    adapter = adapter or adapter_for(model)
    if not is_quantized(model):
        raise ValueError("the model has no enabled quantizer; run quantize_transformer first")
    wrapper = adapter.transformer_for_onnx(model)
    names = list(wrapper.input_names)
    if sorted(example_inputs) != sorted(names):
        raise ValueError(f"example inputs {list(example_inputs)} are not the ONNX inputs {names}")
    args = tuple(example_inputs[n] for n in names)
    if args[0].shape[0] < 2:
        raise ValueError("export with a batch >= 2 example (a batch of 1 can be traced into the graph)")
    prefix = next(n for n, m in wrapper.named_children() if m is model)
    outputs = list(wrapper.output_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".onnx-quant-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings(), _quiet_tracer(), _rms_norm_symbolic(opset), _traceable_unflatten():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in names + outputs},
                do_constant_folding=True,
            )
        proto = onnx.load(str(raw))
    folded = fold_weight_quantizers(proto) if fold_weights else 0
    transposes = fold_dq_transposes(proto) if fold_weights else 0
    name_initializers_after_torch(proto, prefix)
    remove_unused(proto)
    proto = fold_shape_computations(proto)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    save_onnx(proto, path)
    log.info("exported quantized %s in %.1f s: %d weight quantizers folded, %d transposes folded",
             path.name, time.perf_counter() - t0, folded, transposes)
    return path


@contextlib.contextmanager
def _quiet_tracer():
    """Silence the TorchScript tracer's per-branch warnings (logged through ``warnings`` and ``torch.jit``)."""
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger("torch.onnx").setLevel(level)


@contextlib.contextmanager
def _rms_norm_symbolic(opset: int):
    """Teach the TorchScript exporter ``aten::rms_norm`` for the export (it has no symbolic for it up to opset
    20; ``torch.nn.RMSNorm``, e.g. Flux's per-head q/k norms, calls it). ATen's own decomposition: in float32,
    ``x * 1/sqrt(mean(x^2 over the normalized dims) + eps)``, back to the input type, times the weight."""

    def symbolic(g, x, normalized_shape, weight, eps):
        from torch.onnx import symbolic_helper as sh

        dims = sh._get_const(normalized_shape, "is", "normalized_shape")
        axes = list(range(-len(dims), 0))
        scalar = x.type().scalarType() or "Float"
        elem = from_torch_scalar(scalar)  # rms_norm's input is a float type
        eps_value = torch.finfo(torch_dtype(elem.name)).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
        x32 = x if scalar == "Float" else g.op("Cast", x, to_i=1)  # 1 = FLOAT
        square = g.op("Mul", x32, x32)
        if g.opset >= 18:
            mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.long)), keepdims_i=1)
        else:
            mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
        denom = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
        y = g.op("Div", x32, denom)
        if scalar != "Float":
            y = g.op("Cast", y, to_i=elem.onnx_proto)
        return y if sh._is_none(weight) else g.op("Mul", y, weight)

    torch.onnx.register_custom_op_symbolic("aten::rms_norm", symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rms_norm", opset)


@contextlib.contextmanager
def _traceable_unflatten():
    """``Tensor.unflatten`` as a reshape through ``x.shape`` for the export.

    The TorchScript tracer records the sizes of ``unflatten``'s output as constants, so a later
    ``y.reshape(*y.shape[:-1], -1, 2)`` (diffusers' rotary embedding after Flux's ``query.unflatten(-1, (-1,
    head_dim))``) bakes the example's batch and token count into the graph; a reshape through the traced
    ``x.shape`` keeps them symbolic. Same values, same strides (both are views of a contiguous split).
    """
    original = torch.Tensor.unflatten

    def unflatten(self, dim, sizes):
        dim = dim % self.dim()
        shape = self.shape
        return self.reshape(*shape[:dim], *sizes, *shape[dim + 1 :])

    torch.Tensor.unflatten = unflatten
    try:
        yield
    finally:
        torch.Tensor.unflatten = original


def quantized_op_counts(path_or_model) -> dict[str, int]:
    """How many Q/DQ nodes of each kind the ONNX holds (``{"DequantizeLinear": 42, ...}``)."""
    import onnx

    model = onnx.load(str(path_or_model), load_external_data=False) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        if node.op_type in Q_OPS + DQ_OPS:
            counts[node.op_type] += 1
    return dict(counts)
