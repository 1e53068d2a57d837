"""Ask a served ``pipeline`` model for images over gRPC (tritonclient): the request, the reply, the errors.

:func:`pipeline_inputs` builds the request tensors (``prompt`` TYPE_STRING, the optional settings with the
types the pipeline's config declares, one row per prompt); :func:`request_image` sends one request and turns
an error response or an unreachable server into :class:`~common.errors.UserError` with the server's message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from common.errors import UserError

INPUT_TYPES = {"negative_prompt": ("BYTES", object), "seed": ("INT64", np.int64), "steps": ("INT32", np.int32), "guidance": ("FP32", np.float32),
               "height": ("INT32", np.int32), "width": ("INT32", np.int32)}


@dataclass
class ImageResult:
    """``image`` (H, W, 3) uint8, ``truncated`` (a text encoder read only the prompt's beginning), ``seconds`` round trip."""

    image: np.ndarray
    truncated: bool
    seconds: float


def pipeline_inputs(prompts: Sequence[str], **values: Any) -> list:
    """The gRPC inputs for ``prompts`` (one row each); ``values``: optional inputs, one value for every row."""
    import tritonclient.grpc as grpcclient

    n = len(prompts)
    prompt = grpcclient.InferInput("prompt", [n, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[p.encode("utf-8")] for p in prompts], dtype=object))
    inputs = [prompt]
    for name, v in values.items():
        if name not in INPUT_TYPES:
            raise UserError(f"unknown pipeline input {name!r}; the pipeline takes prompt, {', '.join(INPUT_TYPES)}")
        triton_type, np_type = INPUT_TYPES[name]
        t = grpcclient.InferInput(name, [n, 1], triton_type)
        arr = np.array([[v.encode("utf-8") if isinstance(v, str) else v]] * n, dtype=np_type)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def grpc_client(url: str):
    """A gRPC client of its own connection: channels of one process otherwise share subchannels, and one left in
    reconnect back-off by a server that died answers UNAVAILABLE to a fresh client of the restarted server."""
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url, channel_args=[("grpc.use_local_subchannel_pool", 1)])


def server_message(e: Exception) -> str:
    """The one-line message of a tritonclient exception."""
    msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    return " ".join(str(msg).split())


def request_image(url: str, prompt: str, *, model: str = "pipeline", timeout: float = 600.0, client=None, **values: Any) -> ImageResult:
    """One image from the server at ``url`` (``host:port``, gRPC). An error response raises :class:`UserError`."""
    from tritonclient.utils import InferenceServerException

    client = client or grpc_client(url)
    t0 = time.perf_counter()
    try:
        result = client.infer(model, pipeline_inputs([prompt], **values), client_timeout=timeout)
    except InferenceServerException as e:
        text = server_message(e)
        if "StatusCode.UNAVAILABLE" in str(e.status()) or "failed to connect" in text.lower():
            raise UserError(f"no Triton server answers at {url}: start one with `make serve` (or pass --url)") from None
        raise UserError(f"the server refused the request: {text}") from None
    return ImageResult(result.as_numpy("image")[0], bool(result.as_numpy("truncated")[0, 0]), time.perf_counter() - t0)
