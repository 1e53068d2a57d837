"""Triton Python-backend model: one exported component (text encoder, transformer, VAE decoder) in ONNX Runtime.

Copied into ``<model>/1/model.py`` of a serving repository, next to ``model.onnx`` (and its external data) and
``manifest.json``. It stands in for Triton's ``onnxruntime`` backend where the server has none (the bundled
``tritonserver`` of ``nvidia-pytriton``). At load, the files are checked against the manifest
(:func:`runtime.serve_repository.check_component`); a mismatch fails the load with one line. Requests that the
dynamic batcher hands over together run as one batch when their shapes past the batch dim agree.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from common.errors import UserError
        from common.dtypes import from_onnx_type
        from runtime.ort import make_session
        from runtime.serve_repository import check_component

        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.name = args["model_name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        try:
            check_component(version_dir)
            self.session = make_session(version_dir / "model.onnx", intra_op_threads=int(params.get("intra_op_threads", "0")))
        except UserError as e:
            raise pb_utils.TritonModelException(f"{self.name}: {e}") from None
        self.inputs = [(i.name, np.dtype(from_onnx_type(i.type))) for i in self.session.get_inputs()]
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _array(self, request, name, dtype):
        a = pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(dtype, copy=False)
        return a.reshape(-1) if self.ranks[name] == 1 else a  # a batch-only input arrives as (B, 1)

    def execute(self, requests):
        feeds = [{n: self._array(r, n, dt) for n, dt in self.inputs} for r in requests]
        sizes = [f[self.inputs[0][0]].shape[0] for f in feeds]
        same = all(f[n].shape[1:] == feeds[0][n].shape[1:] for f in feeds for n, _ in self.inputs)
        if len(feeds) > 1 and same:
            merged = {n: np.concatenate([f[n] for f in feeds]) for n, _ in self.inputs}
            outs = self.session.run(self.outputs, merged)
            bounds = np.cumsum([0, *sizes])
            results = [[o[a:b] for o in outs] for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            results = [self.session.run(self.outputs, f) for f in feeds]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(o)) for n, o in zip(self.outputs, res)]) for res in results]

