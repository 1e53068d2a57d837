"""Write a Triton model repository that serves prompts: the component models and a Python-backend ``pipeline``.

Layout (``prefix`` before every model name, so one repository can hold several variants)::

    <repo>/<prefix>pipeline/config.pbtxt            backend "python": prompt (TYPE_STRING) -> image (UINT8 H x W x 3)
    <repo>/<prefix>pipeline/1/model.py              runtime/triton_models/pipeline_model.py
    <repo>/<prefix>pipeline/1/pipeline.json         model, component models and their I/O, limits, correction file
    <repo>/<prefix><component>/config.pbtxt         one per exported component
    <repo>/<prefix><component>/1/model.onnx, model.py, manifest.json   (components_kind "python")

components_kind ``"python"``: each component is a Python-backend model running the ONNX in ONNX Runtime
(:mod:`runtime.triton_models.component_model`), for servers without an ONNX Runtime backend such as the one
``nvidia-pytriton`` bundles. ``"onnxruntime"`` / ``"tensorrt_plan"``: the component models are the ones
:func:`runtime.triton.write_model_repository` writes (a full Triton container), and only the pipeline model is
added. The pipeline model is the same in every case.

:func:`check_component` is the load-time manifest check of a Python component: file sizes and sha256 as written.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from common.dtypes import from_onnx_type
from common.errors import UserError
from common.io import atomic_path, link_or_copy, read_json, sha256_file, write_json
from runtime.served_pipeline import ServeLimits
from runtime.triton import TensorSpec, io_from_onnx, model_config_text

log = logging.getLogger(__name__)

MODELS_SRC = Path(__file__).resolve().parent / "triton_models"
PIPELINE_INPUTS = (  # name, Triton type, required
    ("prompt", "TYPE_STRING", True),
    ("negative_prompt", "TYPE_STRING", False),
    ("seed", "TYPE_INT64", False),
    ("steps", "TYPE_INT32", False),
    ("guidance", "TYPE_FP32", False),
    ("height", "TYPE_INT32", False),
    ("width", "TYPE_INT32", False),
)


def pipeline_config_text(name: str, *, max_batch: int, dynamic_batching: bool, instances: int, max_queue_delay_us: int) -> str:
    """``config.pbtxt`` of the ``pipeline`` model (Python backend, CPU instances)."""
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {int(max_batch)}"]
    for n, t, required in PIPELINE_INPUTS:
        lines += ["input [", "  {", f'    name: "{n}"', f"    data_type: {t}", "    dims: [ 1 ]"]
        lines += [] if required else ["    optional: true"]
        lines += ["  }", "]"]
    lines += ["output [", "  {", '    name: "image"', "    data_type: TYPE_UINT8", "    dims: [ -1, -1, 3 ]", "  }", "]"]
    lines += ["output [", "  {", '    name: "truncated"', "    data_type: TYPE_BOOL", "    dims: [ 1 ]", "  }", "]"]
    if dynamic_batching:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}", "}"]
    lines += ["instance_group [", "  {", f"    count: {int(instances)}", "    kind: KIND_CPU", "  }", "]"]
    return "\n".join(lines) + "\n"


def limits_from_export(spec, export_dir: str | os.PathLike, *, max_steps: int | None = None, max_batch: int | None = None) -> ServeLimits:
    """The limits a pipeline over stage 2's ``export_dir`` enforces: the resolutions its report says it serves (the
    first is the default size), ``max_steps`` (default :data:`runtime.served_pipeline.DEFAULT_MAX_STEPS`) and
    ``max_batch`` prompts per request (default: the export's largest batch)."""
    from runtime.served_pipeline import DEFAULT_MAX_STEPS

    report_file = Path(export_dir) / "export_report.json"
    served = (read_json(report_file).get("served_shapes") if report_file.is_file() else None) or {}
    resolutions = tuple(tuple(int(v) for v in r) for r in served.get("resolutions") or [(spec.height, spec.width)])
    batch_max = int((served.get("batch") or [1, 1, spec.shapes.batch_max])[2])
    return ServeLimits(resolutions, max_steps or DEFAULT_MAX_STEPS, max_batch or max(1, batch_max))


def check_component(version_dir: str | os.PathLike) -> None:
    """Raise :class:`UserError` (one line) unless ``version_dir``'s files match its ``manifest.json``."""
    version_dir = Path(version_dir)
    mpath = version_dir / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"{mpath} is missing; rewrite the repository with `python -m pipeline serve`")
    manifest = read_json(mpath)
    for name, want in manifest.get("files", {}).items():
        f = version_dir / name
        if not f.is_file():
            raise UserError(f"{name} is missing from {version_dir}; rewrite the repository with `python -m pipeline serve`")
        if f.stat().st_size != want["bytes"] or sha256_file(f) != want["sha256"]:
            raise UserError(f"{name} does not match its manifest (size or sha256 changed since the repository was written); "
                            f"re-run the export and `python -m pipeline serve`")


def write_serving_repository(
    repo_dir: str | os.PathLike,
    spec,
    onnx_dir: str | os.PathLike,
    *,
    limits: ServeLimits,
    prefix: str = "",
    components_kind: str = "python",
    dynamic_batching: bool = False,
    instances: int = 1,
    max_queue_delay_us: int = 2000,
    correction: str | os.PathLike | None = None,
    intra_op_threads: int = 0,
    component_files: dict[str, Path] | None = None,
) -> Path:
    """Write (or rewrite) the models of one served variant into ``repo_dir``; returns ``repo_dir``.

    spec: the model (its registry id is what the pipeline model loads tokenizers, scheduler and configs from).
    onnx_dir: stage 2's ``onnx/``. limits: resolutions, steps and batch the pipeline accepts. dynamic_batching:
    Triton's dynamic batcher on the pipeline and component models (off: each request runs as it came).
    instances: instances of the pipeline model. correction: a scheduler-correction JSON to apply.
    component_files: for ``tensorrt_plan`` / ``onnxruntime``, the ``{component: file}`` already written by
    :func:`runtime.triton.write_model_repository` (their I/O comes from the ONNX either way); components
    without a model stay PyTorch inside the pipeline model, as in the in-process runner.
    Each model directory is replaced atomically.
    """
    from runtime.pipeline_runner import KNOWN_COMPONENTS

    repo_dir, onnx_dir = Path(repo_dir), Path(onnx_dir)
    if components_kind not in ("python", "onnxruntime", "tensorrt_plan"):
        raise UserError(f"unknown component kind {components_kind!r}; use python, onnxruntime or tensorrt_plan")
    found = {c: onnx_dir / f"{c}.onnx" for c in KNOWN_COMPONENTS if (onnx_dir / f"{c}.onnx").is_file()}
    if component_files is not None:  # the components served by the other backend's models; the rest stay PyTorch
        found = {c: f for c, f in found.items() if c in component_files}
    if "transformer" not in found:
        raise UserError(f"no transformer.onnx in {onnx_dir}; run the export stage first")
    from runtime.pipeline_runner import check_runner_inputs
    check_runner_inputs(spec, onnx_dir=onnx_dir, correction=correction)  # an export or a correction made for another model: one line before writing
    component_batch = 2 * limits.max_batch  # classifier-free guidance doubles the prompts
    components: dict[str, dict[str, Any]] = {}
    for c, onnx in found.items():
        inputs, outputs = io_from_onnx(onnx)
        name = f"{prefix}{c}"
        components[c] = {"model": name, "inputs": {t.name: [from_onnx_type(f"tensor({t.dtype})"), len(t.shape)] for t in inputs}, "outputs": [t.name for t in outputs]}
        if components_kind == "python":
            _write_python_component(repo_dir / name, name, onnx, inputs, outputs, max_batch=component_batch, dynamic_batching=dynamic_batching,
                                    intra_op_threads=intra_op_threads)
    name = f"{prefix}pipeline"
    from families.registry import MODELS

    model = spec.id if MODELS.get(spec.id) == spec else str(spec.path.resolve() if spec.path else spec.source)
    settings = {"model": model, "limits": limits.to_json(),
                "components": components, "components_kind": components_kind, "correction": None}
    with atomic_path(repo_dir / name) as tmp:
        (tmp / "1").mkdir(parents=True)
        (tmp / "config.pbtxt").write_text(pipeline_config_text(name, max_batch=limits.max_batch, dynamic_batching=dynamic_batching,
                                                               instances=instances, max_queue_delay_us=max_queue_delay_us))
        shutil.copy2(MODELS_SRC / "pipeline_model.py", tmp / "1" / "model.py")
        if correction is not None:
            shutil.copy2(correction, tmp / "1" / "correction.json")
            settings["correction"] = "correction.json"
        write_json(tmp / "1" / "pipeline.json", settings)
    log.info("Triton serving models %s (%s components, dynamic batching %s) -> %s", name, components_kind, "on" if dynamic_batching else "off", repo_dir)
    return repo_dir


def _write_python_component(model_dir: Path, name: str, onnx: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], *, max_batch: int,
                            dynamic_batching: bool, intra_op_threads: int) -> None:
    from runtime.manifest import onnx_files

    text = model_config_text(name, kind="python", inputs=inputs, outputs=outputs, max_batch_size=max_batch, preferred_batch_sizes=(),
                             instance_kind="KIND_CPU", dynamic_batching=dynamic_batching,
                             parameters={"intra_op_threads": str(int(intra_op_threads))})
    with atomic_path(model_dir) as tmp:
        version = tmp / "1"
        version.mkdir(parents=True)
        (tmp / "config.pbtxt").write_text(text)
        files = {}
        for src in onnx_files(onnx):
            dst = version / ("model.onnx" if src == onnx else src.name)
            link_or_copy(src, dst)
            files[dst.name] = {"bytes": dst.stat().st_size, "sha256": sha256_file(dst)}
        shutil.copy2(MODELS_SRC / "component_model.py", version / "model.py")
        write_json(version / "manifest.json", {"component": name, "source": str(onnx), "files": files})
