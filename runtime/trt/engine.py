"""Running engines: :class:`TrtEngine` (one checked, deserialised plan on CUDA torch tensors) and
:class:`EngineSet` (static engines of one component, one per served resolution)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from common.dtypes import from_tensorrt, torch_dtype
from common.errors import UserError
from common.io import atomic_path, read_json
from runtime.manifest import GpuInfo, check_engine, check_in_profile, current_gpu, manifest_path_for
from runtime.trt.backend import BACKEND_MODULES, get_backend
from runtime.trt.builder_log import capturing_logger

log = logging.getLogger(__name__)


class TrtEngine:
    """A checked, deserialised engine that runs on CUDA torch tensors.

    ``TrtEngine(plan, onnx_path=None)`` runs :func:`runtime.manifest.check_engine` (backend and version,
    GPU, plan sha256, source ONNX) first; it then hashes the bytes it read and deserialises them only if
    they still match. Call with ``{input name: tensor}``; returns ``{output name: tensor}`` on the GPU.

    runtime_cache (TensorRT-RTX only): file of JIT-compiled kernels, loaded if present and compatible
    (TensorRT-RTX validates GPU, versions and driver itself) and written by :meth:`save_runtime_cache`;
    ``"auto"`` = ``runtime.cache`` next to the plan, ``None`` = no cache.
    """

    def __init__(
        self,
        plan: str | os.PathLike,
        *,
        onnx_path: str | os.PathLike | None = None,
        gpu: GpuInfo | None = None,
        runtime_cache: str | os.PathLike | None = "auto",
    ):
        import hashlib

        import torch

        plan = Path(plan)
        manifest_file = manifest_path_for(plan)
        if not (plan.is_file() and manifest_file.is_file()):
            check_engine(plan, backend="", backend_version="", gpu=None)  # raises the missing-file line
        built_with = read_json(manifest_file).get("backend")
        try:  # the library the engine was built with; if absent, whatever is installed (the check then says rebuild)
            be = get_backend(built_with if built_with in BACKEND_MODULES else "auto")
        except UserError:
            be = get_backend("auto")
        gpu = gpu or current_gpu()
        self.manifest = check_engine(plan, backend=be.name, backend_version=be.version, gpu=gpu, onnx_path=onnx_path)
        data = plan.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["plan_sha256"]:
            raise UserError(f"engine {plan} changed while loading (sha256 mismatch); rebuild it with `python -m pipeline build`")
        trt = be.module
        self.backend = be
        self._logger = capturing_logger(be)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise UserError(f"{be.name} could not deserialise {plan}; rebuild it with `python -m pipeline build`")
        self._cache, self.runtime_cache_path = None, None
        if be.is_rtx and runtime_cache is not None:
            self.runtime_cache_path = plan.parent / "runtime.cache" if runtime_cache == "auto" else Path(runtime_cache)
            rc = self.engine.create_runtime_config()
            self._cache = rc.create_runtime_cache()
            if self.runtime_cache_path.is_file() and not self._cache.deserialize(self.runtime_cache_path.read_bytes()):
                log.info("runtime cache %s is from another GPU/driver/version; kernels will be recompiled", self.runtime_cache_path)
            rc.set_runtime_cache(self._cache)
            self.context = self.engine.create_execution_context(runtime_config=rc)
        else:
            self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
        self.dtypes = {n: torch_dtype(from_tensorrt(self.engine.get_tensor_dtype(n).name)) for n in self.inputs + self.outputs}
        self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def max_batch(self) -> int:
        """Largest batch of the optimisation profile (every input's dim 0 max)."""
        prof = (self.manifest.get("profiles") or [{}])[0]
        return min((shapes[2][0] for shapes in prof.values() if shapes and shapes[2]), default=1 << 30)

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run the engine; a batch above the profile's max runs in chunks (outputs concatenated on dim 0)."""
        import torch

        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise UserError(f"engine inputs missing: {', '.join(missing)}")
        batch = int(torch.as_tensor(feeds[self.inputs[0]]).shape[0])
        step = self.max_batch
        if batch <= step:
            return self._run(feeds)
        parts = [self._run({n: feeds[n][i : i + step] for n in self.inputs}) for i in range(0, batch, step)]
        return {n: torch.cat([p[n] for p in parts]) for n in self.outputs}

    def _run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        keep = []  # keep converted inputs alive until the enqueue has completed
        check_in_profile(self.manifest, {n: tuple(torch.as_tensor(feeds[n]).shape) for n in self.inputs})
        for name in self.inputs:
            t = torch.as_tensor(feeds[name]).to(self.device, self.dtypes[name]).contiguous()
            keep.append(t)
            if self.context.set_input_shape(name, tuple(t.shape)) is False:
                raise UserError(f"input {name} shape {tuple(t.shape)} is outside the engine's profile {self.manifest['profiles'][0].get(name)}; rebuild with a wider range")
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            buf = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, buf.data_ptr())
            outs[name] = buf
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.backend.name} enqueue failed: {self._logger.text()[-1:]}")
        return outs

    def save_runtime_cache(self) -> Path | None:
        """Write TensorRT-RTX's JIT kernel cache (atomically) so the next load skips compilation."""
        if self._cache is None or self.runtime_cache_path is None:
            return None
        with atomic_path(self.runtime_cache_path) as tmp:
            tmp.write_bytes(memoryview(self._cache.serialize()))
        return self.runtime_cache_path

    @property
    def size_bytes(self) -> int:
        return int(self.manifest.get("plan_bytes", 0))


class EngineSet:
    """Static engines of one component, one per served resolution (``build --static-shapes``): each call
    runs the engine whose profile fits the inputs; none fitting is one line naming the resolutions."""

    def __init__(self, engines: dict[str, "TrtEngine"]):
        if not engines:
            raise ValueError("an engine set needs at least one engine")
        self.engines = engines
        first = next(iter(engines.values()))
        self.inputs, self.outputs, self.manifest = first.inputs, first.outputs, first.manifest

    def select(self, shapes: dict[str, Any]) -> "TrtEngine":
        from runtime.manifest import profile_violation

        for engine in self.engines.values():
            if profile_violation((engine.manifest.get("profiles") or [{}])[0], shapes) is None:
                return engine
        comp = self.manifest.get("component", "engine")
        shown = {n: list(s) for n, s in shapes.items()}
        raise UserError(f"the static {comp} engines serve {', '.join(self.engines)} px; no engine takes the inputs {shown}; "
                        f"rebuild with `--resolution` including this size (or without --static-shapes)")

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        return self.select({n: tuple(torch.as_tensor(feeds[n]).shape) for n in self.inputs})(feeds)

    @property
    def size_bytes(self) -> int:
        return sum(e.size_bytes for e in self.engines.values())
