"""Write a Triton Inference Server model repository for built engines or exported ONNX models.

Layout (Triton's): ``<repo>/<model name>/config.pbtxt`` and ``<repo>/<model name>/1/model.plan`` (TensorRT,
``platform: "tensorrt_plan"``) or ``.../1/model.onnx`` (``backend: "onnxruntime"``, external data copied next
to it). Inputs and outputs come from the ONNX graph (or the engine manifest, which records the ONNX's I/O):
the leading ``batch`` dim becomes Triton's implicit batch (``max_batch_size`` = the profile's max batch),
the other dims are listed. Dynamic batching is on with the profile's opt batch as preferred size.

Triton's TensorRT backend runs TensorRT engines, not TensorRT-RTX ones (a different runtime library), so a
``tensorrt_plan`` repository needs engines built with ``--backend trt`` on the serving GPU's type.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from common.dtypes import TRITON_TYPES
from common.errors import UserError
from common.io import atomic_path, link_or_copy, read_json

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TensorSpec:
    """One model input/output: name, ONNX element type name (``float``, ``int64``...), full shape with the
    batch dim first (a string or -1 where dynamic)."""

    name: str
    dtype: str
    shape: tuple[Any, ...]


def io_from_onnx(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in t.shape.dim)
        return TensorSpec(v.name, onnx.TensorProto.DataType.Name(t.elem_type).lower(), shape)

    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def _dims_without_batch(t: TensorSpec, model: str) -> list[int]:
    if not t.shape:
        raise UserError(f"{model}: {t.name} is a scalar; Triton batching needs a leading batch dim")
    dims = []
    for d in t.shape[1:]:
        dims.append(int(d) if isinstance(d, int) and d > 0 else -1)
    return dims


def model_config_text(
    name: str,
    *,
    kind: str,
    inputs: Iterable[TensorSpec],
    outputs: Iterable[TensorSpec],
    max_batch_size: int,
    preferred_batch_sizes: Iterable[int] = (),
    max_queue_delay_us: int = 100,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
    dynamic_batching: bool = True,
    parameters: dict[str, str] | None = None,
) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``).

    kind: ``"tensorrt_plan"``, ``"onnxruntime"`` or ``"python"`` (a Python-backend model). max_batch_size:
    largest batch (0 disables Triton batching; then dims keep their batch dim). preferred_batch_sizes: dynamic
    batcher targets; dynamic_batching False leaves the batcher out (each request runs as it came).
    parameters: the config's string ``parameters`` (a Python model reads them at initialisation).
    """
    if kind not in ("tensorrt_plan", "onnxruntime", "python"):
        raise UserError(f"unknown Triton backend {kind!r}; use tensorrt_plan, onnxruntime or python")
    lines = [f'name: "{name}"']
    lines.append('platform: "tensorrt_plan"' if kind == "tensorrt_plan" else f'backend: "{kind}"')
    lines.append(f"max_batch_size: {int(max_batch_size)}")

    def tensor_block(section: str, t: TensorSpec) -> list[str]:
        if t.dtype not in TRITON_TYPES:
            raise UserError(f"{name}: {t.name} has type {t.dtype}, which Triton config has no TYPE_ for")
        dims = _dims_without_batch(t, name) if max_batch_size > 0 else [int(d) if isinstance(d, int) and d > 0 else -1 for d in t.shape]
        block = [f"{section} [", "  {", f'    name: "{t.name}"', f"    data_type: {TRITON_TYPES[t.dtype]}"]
        if not dims:
            # A tensor that is only the batch dim (the timestep): Triton wants dims [1] reshaped to [].
            block += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        else:
            block.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
        return block + ["  }", "]"]

    for t in inputs:
        lines += tensor_block("input", t)
    for t in outputs:
        lines += tensor_block("output", t)
    if max_batch_size > 0 and dynamic_batching:
        pref = sorted({int(b) for b in preferred_batch_sizes if 0 < int(b) <= max_batch_size})
        lines.append("dynamic_batching {")
        if pref:
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, pref))} ]")
        lines.append(f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}")
        lines.append("}")
    lines += ["instance_group [", "  {", f"    count: {int(instance_count)}", f"    kind: {instance_kind}", "  }", "]"]
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def write_model_repository(
    repo_dir: str | os.PathLike,
    models: dict[str, str | os.PathLike],
    *,
    kind: str,
    batch: tuple[int, int, int] = (1, 2, 4),
    prefix: str = "",
    instance_kind: str | None = None,
) -> list[Path]:
    """Write one Triton model per entry of ``models`` (``{component: file}``) under ``repo_dir``.

    kind ``"onnxruntime"``: files are ``.onnx`` (their external data is copied too). kind
    ``"tensorrt_plan"``: files are ``.plan`` with their manifests (which give the I/O and profile; only
    TensorRT engines, see the module doc). batch: (min, opt, max) of the engines' profile; for ONNX the
    max batch Triton may form. prefix: prepended to model names (``"sd3_"``). Each model directory is
    written atomically. Returns the ``config.pbtxt`` paths.
    """
    repo_dir = Path(repo_dir)
    written = []
    for component, f in models.items():
        f = Path(f)
        name = f"{prefix}{component}"
        max_batch, pref = batch[2], [batch[1]]
        if kind == "onnxruntime":
            if f.suffix != ".onnx" or not f.is_file():
                raise UserError(f"Triton onnxruntime model {component}: {f} is not an ONNX file; run the export stage")
            inputs, outputs = io_from_onnx(f)
            from runtime.manifest import onnx_files

            payload = [(p, ("model.onnx" if p == f else p.name)) for p in onnx_files(f)]
        elif kind == "tensorrt_plan":
            from runtime.manifest import manifest_path_for

            mpath = manifest_path_for(f)
            if f.suffix != ".plan" or not f.is_file() or not mpath.is_file():
                raise UserError(f"Triton tensorrt_plan model {component}: {f} is not an engine with a manifest; run `python -m pipeline build`")
            m = read_json(mpath)
            if m.get("backend") != "trt":
                raise UserError(
                    f"{f.name} is a {m.get('backend')} engine; Triton's TensorRT backend runs TensorRT engines only: "
                    f"build with --backend trt on a GPU host, or write an onnxruntime repository"
                )
            io = m["io"]
            inputs = [TensorSpec(d["name"], d["dtype"], tuple(d["shape"])) for d in io["inputs"]]
            outputs = [TensorSpec(d["name"], d["dtype"], tuple(d["shape"])) for d in io["outputs"]]
            lo, opt, hi = m.get("builder", {}).get("batch", batch)
            max_batch, pref = hi, [opt]
            payload = [(f, "model.plan")]
        else:
            raise UserError(f"unknown Triton backend {kind!r}; use tensorrt_plan or onnxruntime")
        text = model_config_text(
            name,
            kind=kind,
            inputs=inputs,
            outputs=outputs,
            max_batch_size=max_batch,
            preferred_batch_sizes=pref,
            instance_kind=instance_kind or ("KIND_GPU" if kind == "tensorrt_plan" else "KIND_AUTO"),
        )
        with atomic_path(repo_dir / name) as tmp:
            (tmp / "1").mkdir(parents=True)
            (tmp / "config.pbtxt").write_text(text)
            for src, dst in payload:
                link_or_copy(src, tmp / "1" / dst)
        written.append(repo_dir / name / "config.pbtxt")
        log.info("Triton model %s -> %s", name, repo_dir / name)
    return written
