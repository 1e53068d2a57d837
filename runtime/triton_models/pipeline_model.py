"""Triton Python-backend model ``pipeline``: ``prompt`` (TYPE_STRING) in, ``image`` (UINT8, H x W x 3) out.

Copied into ``<pipeline model>/1/model.py`` next to ``pipeline.json`` (written by
:func:`runtime.serve_repository.write_serving_repository`: the model, the component models to call, the
limits, the scheduler correction file). The orchestration is :class:`runtime.served_pipeline.ServedPipeline`,
the same code the in-process runner uses; here its component callables are BLS requests to the component
models (text encoders once, the transformer every step, the VAE decoder once). This file only converts
tensors and errors.

Inputs (each ``[1]`` per batch row, all but ``prompt`` optional): ``prompt``, ``negative_prompt`` (TYPE_STRING),
``seed`` (INT64), ``steps`` (INT32), ``guidance`` (FP32), ``height``, ``width`` (INT32). Outputs: ``image``
(UINT8, H x W x 3) and ``truncated`` (BOOL: a text encoder read only the beginning of the prompt; Triton
2.51's Python backend has no response parameters, so it is an output).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

OPTIONAL = ("negative_prompt", "seed", "steps", "guidance", "height", "width")


class BlsRunner:
    """A component as :data:`runtime.pipeline_runner.Runner`: ``{input: tensor} -> {output: torch tensor}`` over BLS."""

    def __init__(self, model, inputs, outputs):
        # inputs: {name: [numpy dtype name, rank in the ONNX]}; a rank-1 (batch-only) input travels as (B, 1),
        # the shape its Triton config declares (dims [1] reshaped to [])
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def __call__(self, feeds):
        import torch

        from runtime.served_pipeline import ComponentError

        tensors = []
        for name, (dtype, rank) in self.inputs.items():
            v = feeds[name]
            arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            arr = arr.reshape(-1, 1) if rank == 1 else arr
            tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(arr.astype(dtype, copy=False))))
        resp = pb_utils.InferenceRequest(model_name=self.model, inputs=tensors, requested_output_names=list(self.outputs)).exec()
        if resp.has_error():
            raise ComponentError(f"component model {self.model!r} failed: {resp.error().message()}")
        return {n: torch.from_numpy(pb_utils.get_output_tensor_by_name(resp, n).as_numpy().copy()) for n in self.outputs}


class TritonPythonModel:
    def initialize(self, args):
        from families.registry import resolve_model
        from runtime.served_pipeline import ServedPipeline, ServeLimits

        version_dir = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((version_dir / "pipeline.json").read_text())
        self.spec = resolve_model(settings["model"])
        self.limits = ServeLimits.from_json(settings["limits"])
        runners = {c: BlsRunner(d["model"], d["inputs"], d["outputs"]) for c, d in settings["components"].items()}
        correction = version_dir / settings["correction"] if settings.get("correction") else None
        self.served = ServedPipeline(self.spec, runners, correction=correction)

    def execute(self, requests):
        from common.errors import UserError
        from runtime.served_pipeline import ComponentError, parse_request

        responses = [None] * len(requests)
        parsed = {}  # request index -> its rows
        for i, r in enumerate(requests):
            try:
                parsed[i] = [parse_request(row, self.spec, self.limits) for row in _rows(r)]
                for q in parsed[i]:
                    self.served.check(q)
                if len({(q.height, q.width) for q in parsed[i]}) > 1:
                    raise UserError("every row of one request must ask for the same height and width")
            except UserError as e:
                responses[i] = _error(str(e))
                parsed.pop(i, None)
        flat = [q for rows in parsed.values() for q in rows]
        try:
            results = self.served.generate(flat) if flat else []
        except (UserError, ComponentError) as e:
            for i in parsed:
                responses[i] = _error(str(e))
            return responses
        k = 0
        for i, rows in parsed.items():
            mine, k = results[k : k + len(rows)], k + len(rows)
            image = np.stack([m.image for m in mine])  # (B, H, W, 3) uint8
            truncated = np.array([[m.truncated] for m in mine], dtype=np.bool_)  # (B, 1)
            responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("image", image), pb_utils.Tensor("truncated", truncated)])
        return responses


def _rows(request):
    """The request's batch rows as ``{input: Python value}`` (absent optional inputs left out)."""
    from common.errors import UserError

    t = pb_utils.get_input_tensor_by_name(request, "prompt")
    if t is None:  # the Python backend passes requests without a required input through
        raise UserError("missing required input 'prompt' (TYPE_STRING, one per batch row)")
    prompt = t.as_numpy()  # (B, 1) object
    values = {"prompt": prompt}
    for name in OPTIONAL:
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is not None:
            values[name] = t.as_numpy()
    rows = []
    for b in range(prompt.shape[0]):
        rows.append({n: v.reshape(v.shape[0], -1)[b, 0].item() if v.dtype != object else v.reshape(v.shape[0], -1)[b, 0] for n, v in values.items()})
    return rows


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
