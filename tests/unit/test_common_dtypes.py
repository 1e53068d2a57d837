"""The one element-type table agrees with the libraries whose names it holds."""

import numpy as np
import onnx
import pytest
import torch

from common.dtypes import (ELEMENT_TYPES, PRECISION_DTYPES, TRITON_TYPES, element_type, from_onnx_type, from_tensorrt,
                           from_torch_scalar, precision_dtype, torch_dtype)


@pytest.mark.parametrize("t", ELEMENT_TYPES, ids=lambda t: t.name)
def test_each_row_agrees_with_torch_and_onnx(t):
    assert isinstance(getattr(torch, t.name), torch.dtype)
    assert torch_dtype(t.name) is getattr(torch, t.name)
    assert onnx.TensorProto.DataType.Name(t.onnx_proto).lower() == {"float": "float", "double": "double"}.get(t.onnx, t.onnx)
    if t.name != "bfloat16":  # numpy has no bfloat16; ONNX maps it to ml_dtypes'
        assert onnx.helper.tensor_dtype_to_np_dtype(t.onnx_proto) == np.dtype(t.name)
    assert t.triton.startswith("TYPE_") and TRITON_TYPES[t.onnx] == TRITON_TYPES[t.name] == t.triton


def test_tensorrt_names_are_tensorrt_members():
    trt = pytest.importorskip("tensorrt_rtx", reason="needs the tensorrt-rtx wheel (the project's TensorRT-RTX extra)")
    members = {n for n in dir(trt.DataType) if n.isupper()}
    for t in ELEMENT_TYPES:
        if t.tensorrt:
            assert t.tensorrt in members
            assert from_tensorrt(t.tensorrt) == t.name
    with pytest.raises(KeyError, match="FP8"):
        from_tensorrt("FP8")


def test_lookups():
    assert from_onnx_type("tensor(float)") == "float32"
    assert from_onnx_type("tensor(float16)") == "float16"
    assert from_onnx_type("tensor(double)") == "float64"
    assert from_onnx_type("tensor(string)") == "float32"  # ONNX Runtime feeds default to float32
    with pytest.raises(KeyError):
        from_onnx_type("tensor(string)", default=None)
    assert TRITON_TYPES["float"] == "TYPE_FP32" and TRITON_TYPES["int64"] == "TYPE_INT64"
    assert "string" not in TRITON_TYPES
    assert from_torch_scalar("Half").onnx_proto == onnx.TensorProto.FLOAT16
    assert element_type("torch.bfloat16").name == "bfloat16"
    with pytest.raises(KeyError, match="known"):
        element_type("float8")


def test_precision_dtypes():
    assert precision_dtype("fp32") is torch.float32 and precision_dtype("fp16") is torch.float16
    assert set(PRECISION_DTYPES) == {"fp32", "fp16"}
    with pytest.raises(KeyError):
        precision_dtype("int8")
