"""Tensor element types: one table of how each is named by numpy/torch, ONNX, TensorRT, Triton and
TorchScript, and the lookups between those names (one copy for the project).

The canonical name is numpy's and torch's (``"float32"``, ``"float16"``, ``"bfloat16"``, ``"int64"``...);
``getattr(torch, name)`` is the torch dtype. Nothing here imports torch, ONNX or TensorRT at module import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ElementType:
    """One element type under each of its names.

    name: numpy/torch (``float32``). onnx: ONNX's type name, as in ONNX Runtime's ``tensor(float)``.
    onnx_proto: ``onnx.TensorProto`` data type number. tensorrt: ``tensorrt.DataType`` member name (None:
    TensorRT has no such type). triton: the Triton model-config ``TYPE_`` name. torch_scalar: TorchScript's
    ``ScalarType`` name (``x.type().scalarType()`` in an ONNX symbolic function).
    """

    name: str
    onnx: str
    onnx_proto: int
    tensorrt: str | None
    triton: str
    torch_scalar: str


ELEMENT_TYPES: tuple[ElementType, ...] = (
    ElementType("float32", "float", 1, "FLOAT", "TYPE_FP32", "Float"),
    ElementType("float16", "float16", 10, "HALF", "TYPE_FP16", "Half"),
    ElementType("bfloat16", "bfloat16", 16, "BF16", "TYPE_BF16", "BFloat16"),
    ElementType("float64", "double", 11, None, "TYPE_FP64", "Double"),
    ElementType("int64", "int64", 7, "INT64", "TYPE_INT64", "Long"),
    ElementType("int32", "int32", 6, "INT32", "TYPE_INT32", "Int"),
    ElementType("int16", "int16", 5, None, "TYPE_INT16", "Short"),
    ElementType("int8", "int8", 3, "INT8", "TYPE_INT8", "Char"),
    ElementType("uint8", "uint8", 2, "UINT8", "TYPE_UINT8", "Byte"),
    ElementType("bool", "bool", 9, "BOOL", "TYPE_BOOL", "Bool"),
)

_BY_NAME = {t.name: t for t in ELEMENT_TYPES}
_BY_ONNX_TYPE = {f"tensor({t.onnx})": t for t in ELEMENT_TYPES}
_BY_TENSORRT = {t.tensorrt: t for t in ELEMENT_TYPES if t.tensorrt}
_BY_TORCH_SCALAR = {t.torch_scalar: t for t in ELEMENT_TYPES}

#: Triton ``TYPE_`` name by ONNX element type name (``float``, ``double``) or numpy/torch name (``float32``).
TRITON_TYPES: dict[str, str] = {**{t.onnx: t.triton for t in ELEMENT_TYPES}, **{t.name: t.triton for t in ELEMENT_TYPES}}

#: The floating-point dtype of each export precision (``--precision``) whose weights are stored as floats.
PRECISION_DTYPES: dict[str, str] = {"fp32": "float32", "fp16": "float16"}


def element_type(name: str) -> ElementType:
    """The row of a numpy/torch name (``"float16"``, or ``"torch.float16"``); KeyError if unknown."""
    key = str(name).removeprefix("torch.")
    try:
        return _BY_NAME[key]
    except KeyError:
        raise KeyError(f"unknown element type {name!r}; known: {', '.join(_BY_NAME)}") from None


def from_onnx_type(type_str: str, default: str | None = "float32") -> str:
    """numpy/torch name of an ONNX Runtime type string (``"tensor(float16)"`` -> ``"float16"``); ``default``
    for one not in the table (KeyError when ``default`` is None)."""
    t = _BY_ONNX_TYPE.get(type_str)
    if t is not None:
        return t.name
    if default is None:
        raise KeyError(f"unknown ONNX type {type_str!r}")
    return default


def from_tensorrt(name: str) -> str:
    """numpy/torch name of a ``tensorrt.DataType`` member name (``"HALF"`` -> ``"float16"``); KeyError if
    TensorRT's type has no torch counterpart here."""
    try:
        return _BY_TENSORRT[name].name
    except KeyError:
        raise KeyError(f"TensorRT type {name} has no torch dtype here; known: {', '.join(_BY_TENSORRT)}") from None


def from_torch_scalar(scalar: str) -> ElementType:
    """The row of a TorchScript ``ScalarType`` name (``"Half"``); KeyError if unknown."""
    try:
        return _BY_TORCH_SCALAR[scalar]
    except KeyError:
        raise KeyError(f"unknown TorchScript scalar type {scalar!r}") from None


def torch_dtype(name: str) -> Any:
    """The ``torch.dtype`` of a numpy/torch name (``"bfloat16"`` -> ``torch.bfloat16``)."""
    import torch

    return getattr(torch, element_type(name).name)


def precision_dtype(precision: str) -> Any:
    """The ``torch.dtype`` a float export precision holds its weights in (``"fp16"`` -> ``torch.float16``);
    KeyError for a precision that is not a float one (``int8``, ``fp8``)."""
    return torch_dtype(PRECISION_DTYPES[precision])


def numpy_feeds(feeds: dict[str, Any], dtypes: dict[str, str], owner: str) -> dict[str, Any]:
    """``feeds`` (``{input name: torch tensor or array}``) as contiguous numpy arrays of the ``dtypes`` a model
    declares (``{input name: dtype name}``), for a runtime that takes numpy (ONNX Runtime, OpenVINO). A missing input is
    one line naming ``owner`` (the model's file name)."""
    import numpy as np
    import torch

    from common.errors import UserError

    missing = [n for n in dtypes if n not in feeds]
    if missing:
        raise UserError(f"{owner}: inputs missing: {', '.join(missing)}")
    out = {}
    for name, dt in dtypes.items():
        v = feeds[name]
        arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        out[name] = np.ascontiguousarray(arr.astype(dt, copy=False))
    return out
