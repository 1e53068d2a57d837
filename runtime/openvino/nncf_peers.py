"""NNCF's own compression of a float32 ONNX inside OpenVINO, the peers of the project's ModelOpt INT8 Q/DQ and stage 1's
OBS 4-bit weights: :func:`nncf_int8` (post-training quantization: INT8 weights and activations, calibrated on given
inputs) and :func:`nncf_int4` (weight compression: symmetric INT4 weights in groups, no data). Each returns an
``openvino.Model`` to compile like any other (:func:`runtime.openvino.session.compile_model`). NNCF is installed with
OpenVINO (the ``openvino`` extra); measured against the project's own in docs/openvino.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from common.errors import UserError
from common.quiet import debug_requested
from runtime.openvino.library import INSTALL_HINT

INT4_GROUP = 128  # the project's 4-bit group (obsdiff.weight_quant.DEFAULT_GROUP_SIZE)


def _nncf():
    try:
        import nncf
    except ImportError:
        raise UserError(f"NNCF is not installed here; {INSTALL_HINT}") from None
    if not debug_requested():  # its per-step INFO lines are not the user's (SDD_DEBUG=1 shows them)
        nncf.set_log_level(logging.WARNING)
    return nncf


def nncf_int8(onnx_path: str | os.PathLike, calibration: Sequence[dict[str, Any]], *, shapes: dict[str, list[int]] | None = None):
    """NNCF's INT8 post-training quantization (transformer preset: its own choice of layers, scales from
    ``calibration``, a list of ``{input name: array}``; fast bias correction) of the ONNX at ``onnx_path``."""
    from runtime.openvino.session import read_onnx

    nncf = _nncf()
    if not calibration:
        raise UserError("NNCF INT8 needs calibration inputs")
    model = read_onnx(onnx_path, shapes)
    return nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER)


def nncf_int4(onnx_path: str | os.PathLike, *, group_size: int = INT4_GROUP, shapes: dict[str, list[int]] | None = None):
    """NNCF's INT4 weight compression (symmetric, ``group_size`` input columns per scale, round to nearest, no data) of
    the ONNX at ``onnx_path``, with NNCF's defaults for what stays wider (the first and last layers INT8); a layer whose
    width is not a multiple of the group stays as NNCF's backup precision."""
    from runtime.openvino.session import read_onnx

    nncf = _nncf()
    model = read_onnx(onnx_path, shapes)
    advanced = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.IGNORE)
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=group_size, ratio=1.0, advanced_parameters=advanced)
