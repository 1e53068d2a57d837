"""One exported component compiled by OpenVINO for the CPU: :class:`OvModel`, called as the pipeline runner calls an
ONNX Runtime session (:class:`runtime.ort.OrtModel`): ``{input name: tensor or array} -> {output name: torch tensor}``,
inputs cast to the dtypes the ONNX declares.

OpenVINO reads the project's ONNX as stage 2 writes it (float32; float16; ModelOpt's INT8 Q/DQ, run as INT8 GEMMs;
the INT4 ``com.microsoft.MatMulNBits`` of ``export --precision int4`` and the INT4 ``DequantizeLinear`` of
``--precision w4a16``, both run with 4-bit weights). Every compilation gets the same settings
(:func:`compile_config`): an explicit precision hint (:mod:`runtime.openvino.precision`), one stream tuned for
latency, INT8 activations for 4-bit weights (:data:`A8_GROUP`), and the thread count ONNX Runtime would get (0:
OpenVINO's default, one per physical core, as ONNX Runtime's).
OpenVINO's TBB worker threads wait busily for a while after each call: a benchmark times OpenVINO in a process of its
own, not beside another runtime.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from common.dtypes import numpy_feeds
from common.errors import UserError
from common.input_files import check_onnx
from runtime.openvino.library import core, openvino, version
from runtime.openvino.precision import Hint, resolve_hint

log = logging.getLogger(__name__)

DEVICE = "CPU"
OV_TYPES = {"f32": "f32", "bf16": "bf16"}
# GEMMs with 4-bit (MatMulNBits, W4A16) weights round their activations to INT8 per group of this many values along K
# (OpenVINO's dynamic quantization; its default, set explicitly): the W4A8 model that ONNX Runtime's MatMulNBits computes at
# accuracy_level 4 (which rounds per block of the weights' group, 128 in the project's exports). 0 would keep them float.
A8_GROUP = 32


def compile_config(hint: Hint, threads: int = 0) -> dict[str, Any]:
    """The properties every compilation of the project gets: ``hint``'s precision, latency mode with one stream, and
    ``threads`` inference threads (0: OpenVINO's default, one per physical core)."""
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_TYPES[hint.name], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                           "DYNAMIC_QUANTIZATION_GROUP_SIZE": A8_GROUP}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


def read_onnx(onnx_path: str | os.PathLike, shapes: dict[str, list[int]] | None = None):
    """The ONNX at ``onnx_path`` as an ``openvino.Model`` (checked first: a cut or foreign file is one line), its inputs
    made static to ``shapes`` (input name -> shape) when given."""
    ov = openvino()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"missing ONNX {onnx_path}; run `python -m pipeline export` first")
    check_onnx(onnx_path, fix="re-run the export stage")
    try:
        model = core().read_model(str(onnx_path))
    except RuntimeError as e:  # OpenVINO's frontend errors (an op it has no converter for) are RuntimeErrors
        raise UserError(f"OpenVINO {version()} cannot read {onnx_path}: {_first_line(e)}") from None
    if shapes:
        unknown = sorted(set(shapes) - {i.get_any_name() for i in model.inputs})
        if unknown:
            raise UserError(f"{onnx_path.name} has no input(s) {', '.join(unknown)}")
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
    return model


def compile_onnx(onnx_path: str | os.PathLike, hint: Hint, threads: int = 0, shapes: dict[str, list[int]] | None = None):
    """``openvino.CompiledModel`` of the ONNX at ``onnx_path`` on the CPU with :func:`compile_config`."""
    return compile_model(read_onnx(onnx_path, shapes), hint, threads, name=Path(onnx_path).name)


def compile_model(model, hint: Hint, threads: int = 0, *, name: str = "the model"):
    """``openvino.CompiledModel`` of an ``openvino.Model`` (read from ONNX, or NNCF's: :mod:`runtime.openvino.nncf_peers`)
    on the CPU with :func:`compile_config`."""
    try:
        return core().compile_model(model, DEVICE, compile_config(hint, threads))
    except RuntimeError as e:
        raise UserError(f"OpenVINO {version()} cannot compile {name} for the CPU: {_first_line(e)}") from None


def effective_precision(compiled) -> str:
    """The precision a compiled model runs in (``f32``/``bf16``), as OpenVINO reports it after compiling."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(("Check ", "Exception from"))]
    return (lines[0] if lines else type(e).__name__)[:300]


class OvModel:
    """One exported component compiled by OpenVINO for the CPU.

    ``OvModel(path, precision="auto", threads=0)`` reads and compiles the ONNX (dynamic shapes as exported, or
    ``shapes`` to make them static); ``compiled`` takes an already compiled model instead (a build's, from
    :mod:`runtime.openvino.build`, with ``keep`` the mapped file it points into). Call with ``{name: torch tensor or array}``, get ``{output name: torch tensor}``
    (float32 outputs whatever the hint: bf16 is internal to OpenVINO's kernels).
    """

    def __init__(self, onnx_path: str | os.PathLike, *, precision: str = "auto", threads: int = 0, shapes: dict[str, list[int]] | None = None,
                 compiled=None, hint: Hint | None = None, keep: Any = None):
        self.path = Path(onnx_path)
        self._keep = keep  # the memory a compiled model imported from a file points into
        self.hint = hint or resolve_hint(precision)
        self.threads = int(threads)
        self.compiled = compiled if compiled is not None else compile_onnx(self.path, self.hint, self.threads, shapes)
        self.precision = effective_precision(self.compiled)
        if self.precision != self.hint.name:  # OpenVINO ignores a hint the CPU cannot honour; say so rather than mislabel
            raise UserError(f"{self.path.name}: OpenVINO compiled it for {self.precision}, not the {self.hint.name} asked for ({self.hint.why})")
        self.inputs = {i.get_any_name(): i.get_element_type().to_dtype().name for i in self.compiled.inputs}
        self.outputs = [o.get_any_name() for o in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()
        self.on_cuda = False

    @property
    def label(self) -> str:
        """``openvino 2026.4.1 CPU bf16``: runtime, device and precision, for reports."""
        return f"openvino {version()} {DEVICE} {self.precision}"

    @property
    def providers(self) -> list[str]:
        """Where it runs, in ONNX Runtime's terms (reports name a session's first provider)."""
        return [f"OpenVINO {DEVICE} {self.precision}"]

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the ONNX and its external data."""
        from runtime.manifest import onnx_files

        return sum(p.stat().st_size for p in onnx_files(self.path))

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        np_feeds = numpy_feeds(feeds, self.inputs, self.path.name)
        try:
            result = self.request.infer(np_feeds)  # outputs copied out of OpenVINO's buffers (share_outputs=False)
        except RuntimeError as e:
            shown = {n: list(a.shape) for n, a in np_feeds.items()}
            raise UserError(f"{self.path.name}: OpenVINO cannot run inputs {shown}: {_first_line(e)}") from None
        return {o: torch.from_numpy(np.asarray(result[o])) for o in self.outputs}
