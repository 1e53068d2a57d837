"""ONNX Runtime sessions for the exported components (CPU by default, CUDA execution provider where available).

:class:`OrtModel` wraps one ``InferenceSession`` behind the same call as :class:`runtime.trt.engine.TrtEngine`:
``{input name: tensor} -> {output name: torch tensor}``, casting inputs to the dtypes the ONNX declares.
Sessions take the project's options (:mod:`common.ort_options`): they never spin idle threads (spinning burns the
cores the rest of the pipeline needs and makes interleaved benchmarks noisy), and INT8 graphs compute exactly on
CPUs without VNNI (``session.x64quantprecision``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from common.dtypes import from_onnx_type, numpy_feeds
from common.errors import UserError
from common.input_files import check_onnx
from common.ort_options import session_options

log = logging.getLogger(__name__)

def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_provider(provider: str = "cpu") -> list[str]:
    """Execution providers for ``provider``: ``"cpu"``, ``"cuda"`` (error if unavailable) or ``"auto"``."""
    have = available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in have:
            raise UserError("ONNX Runtime has no CUDA execution provider here; `pip install onnxruntime-gpu` on a GPU host or use --provider cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "auto":
        return resolve_provider("cuda" if "CUDAExecutionProvider" in have and _cuda_visible() else "cpu")
    raise UserError(f"unknown ONNX Runtime provider {provider!r}; use cpu, cuda or auto")


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def make_session(onnx_path: str | os.PathLike, *, provider: str = "cpu", intra_op_threads: int = 0):
    """An ``InferenceSession`` with all graph optimisations, the project's session options, and ``provider``'s EPs.

    intra_op_threads: 0 lets ONNX Runtime use one thread per physical core.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"missing ONNX {onnx_path}; run `python -m pipeline export` first")
    check_onnx(onnx_path, fix="re-run the export stage")  # truncated graph or external data: one line, not ORT's error
    so = session_options(threads=intra_op_threads)
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=so, providers=resolve_provider(provider))
    except (ort.capi.onnxruntime_pybind11_state.InvalidGraph, ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as e:
        raise UserError(f"ONNX Runtime cannot load {onnx_path}: {str(e).splitlines()[0]}; re-run the export stage") from None


class OrtModel:
    """One exported component as an ONNX Runtime session.

    ``OrtModel(path, provider="cpu")``; call with ``{name: torch tensor or array}``, get
    ``{output name: torch tensor}`` (on the CPU, or on the GPU for the CUDA provider with CUDA inputs).
    """

    def __init__(self, onnx_path: str | os.PathLike, *, provider: str = "cpu", intra_op_threads: int = 0):
        self.path = Path(onnx_path)
        self.session = make_session(self.path, provider=provider, intra_op_threads=intra_op_threads)
        self.providers = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.inputs = {i.name: from_onnx_type(i.type) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._out_shapes = {o.name: o.shape for o in self.session.get_outputs()}
        self._in_shapes = {i.name: i.shape for i in self.session.get_inputs()}

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the ONNX and its external data."""
        from runtime.manifest import onnx_files

        return sum(p.stat().st_size for p in onnx_files(self.path))

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        if self.on_cuda and all(isinstance(feeds.get(n), torch.Tensor) and feeds[n].is_cuda for n in self.inputs):
            return self._run_cuda(feeds)
        outs = self.session.run(self.outputs, numpy_feeds(feeds, self.inputs, self.path.name))
        return {n: torch.from_numpy(np.asarray(o)) for n, o in zip(self.outputs, outs)}

    def _run_cuda(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Zero-copy run on CUDA tensors with IO binding; outputs land in torch-allocated CUDA memory."""
        import numpy as np
        import torch

        binding = self.session.io_binding()
        keep, dims = [], {}
        for name, dt in self.inputs.items():
            t = feeds[name].to(getattr(torch, dt)).contiguous()
            keep.append(t)
            for sym, size in zip(self._in_shapes[name], t.shape):
                if isinstance(sym, str):
                    dims[sym] = int(size)
            binding.bind_input(name, "cuda", t.device.index or 0, np.dtype(dt), tuple(t.shape), t.data_ptr())
        outs, fallback = {}, []
        for name in self.outputs:
            shape = self._out_shapes[name]
            if all(isinstance(s, int) or s in dims for s in shape):
                # Output dtype: the ONNX's; for our exports outputs share the first float input's dtype.
                o_type = next(o.type for o in self.session.get_outputs() if o.name == name)
                dt = getattr(torch, from_onnx_type(o_type))
                buf = torch.empty([s if isinstance(s, int) else dims[s] for s in shape], dtype=dt, device=keep[0].device)
                binding.bind_output(name, "cuda", buf.device.index or 0, np.dtype(str(dt).split(".")[1]), tuple(buf.shape), buf.data_ptr())
                outs[name] = buf
            else:
                binding.bind_output(name, "cuda")
                fallback.append(name)
        self.session.run_with_iobinding(binding)
        if fallback:
            values = dict(zip(self.outputs, binding.get_outputs()))
            for name in fallback:
                outs[name] = torch.from_numpy(values[name].numpy()).to(keep[0].device)
        return outs
