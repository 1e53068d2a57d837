"""``build --backend openvino``: each component of stage 2's ONNX compiled by OpenVINO for this CPU, once per served
shape, saved with a manifest that is checked before the compiled model is used (as TensorRT engines are,
:mod:`runtime.manifest`).

Layout: ``<out>/<component>/<label>/engine_openvino<version>_<hint>.blob`` and its manifest ``.json`` beside it, where
``label`` is a served resolution (``512x512``: the component's inputs made static to that resolution's shapes, the
batch too where the export serves one batch size, else left dynamic) or ``dynamic`` for a component whose shapes do
not follow the resolution (the text encoders: compiled as exported). The hint is in the name: f32 and bf16 builds of
one export sit side by side. A blob is OpenVINO's ``CompiledModel.export_model``: the transformed graph with its
weights, its precision fixed; the thread count is given when it is loaded.

The manifest records the OpenVINO version, the hint (and why), the precision OpenVINO reports after compiling, the
CPU, the input shapes, the sha256 of the source ONNX (with its external data) and of the blob, the export's model
and weights fingerprint, and the build time. :func:`check_compiled` refuses, in one line saying to rebuild, a blob
that is missing, altered, of another OpenVINO version, made from an ONNX that has changed since, or for a precision
this CPU cannot run. :func:`compiled_is_current` decides reuse.
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from common.errors import UserError
from common.io import atomic_path, sha256_file, write_json
from runtime.manifest import check_source_onnx, manifest_path_for, read_manifest_of, sha256_onnx
from runtime.openvino.library import core, cpu_name, full_version, version
from runtime.openvino.precision import Hint, resolve_hint
from runtime.openvino.session import DEVICE, OvModel, compile_config, compile_onnx, effective_precision

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
BACKEND = "openvino"
DYNAMIC = "dynamic"  # the label of a component compiled with its exported (dynamic) shapes
REBUILD = "rebuild it with `python -m pipeline build --backend openvino`"


def rebuild_at(hint: str) -> str:
    """What to run for a compiled model at ``hint``."""
    return f"build it with `python -m pipeline build --backend openvino --ov-precision {hint}`"


def blob_name(hint: str) -> str:
    """``engine_openvino<version>_<hint>.blob``: the file a build writes for ``hint`` with this OpenVINO."""
    return f"engine_{BACKEND}{version()}_{hint}.blob"


def static_shapes(per_resolution: dict[str, list[list[int]]]) -> dict[str, list[int]]:
    """Input shapes for one served resolution from its ``[min, opt, max]`` profile (the export report's
    ``per_resolution`` entry): a dimension whose min and max agree is static, the others (the batch, where the export
    serves a range) dynamic (-1)."""
    return {name: [lo if lo == hi else -1 for lo, hi in zip(mn, mx)] for name, (mn, _, mx) in per_resolution.items()}


def build_compiled(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, *, component: str, hint: Hint, label: str = DYNAMIC,
                   shapes: dict[str, list[int]] | None = None, model: str | None = None, model_weights: Any = None,
                   served: dict[str, Any] | None = None) -> Path:
    """Compile ``onnx_path`` (inputs made ``shapes`` when given) for this CPU at ``hint`` into
    ``out_dir/<blob_name>`` with its manifest (the blob first, the manifest last, each written atomically).
    Returns the blob's path."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    t0 = time.perf_counter()
    onnx_sha = sha256_onnx(onnx_path)
    compiled = compile_onnx(onnx_path, hint, 0, shapes)
    precision = effective_precision(compiled)
    if precision != hint.name:
        raise UserError(f"{onnx_path.name}: OpenVINO compiled it for {precision}, not the {hint.name} asked for ({hint.why})")
    out_dir.mkdir(parents=True, exist_ok=True)
    blob = out_dir / blob_name(hint.name)
    stream = io.BytesIO()  # OpenVINO writes only to memory: the blob is held once, beside the compiled model
    compiled.export_model(stream)
    with atomic_path(blob) as tmp:
        tmp.write_bytes(stream.getbuffer())
    del stream
    build_s = time.perf_counter() - t0
    manifest = {
        "format": MANIFEST_FORMAT,
        "component": component,
        "label": label,
        "backend": BACKEND,
        "backend_version": full_version(),
        "device": DEVICE,
        "cpu": cpu_name(),
        "hint": hint.name,
        "hint_why": hint.why,
        "precision": precision,
        "config": {k: str(v) for k, v in compile_config(hint).items()},
        "shapes": shapes,
        "io": {"inputs": {i.get_any_name(): str(i.get_partial_shape()) for i in compiled.inputs},
               "outputs": [o.get_any_name() for o in compiled.outputs]},
        "blob": blob.name,
        "blob_sha256": sha256_file(blob),
        "blob_bytes": blob.stat().st_size,
        "onnx": str(onnx_path.resolve()),
        "onnx_sha256": onnx_sha,
        "served": served,
        "model": model,
        "model_weights": model_weights,
        "build_seconds": round(build_s, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(manifest_path_for(blob), manifest)
    log.info("wrote %s (%s, %s, %.1f MiB, %.1f s)", blob, label, precision, blob.stat().st_size / 2**20, build_s)
    return blob


def check_compiled(blob: str | os.PathLike, *, onnx_path: str | os.PathLike | None = None, hint: Hint | None = None) -> dict[str, Any]:
    """The manifest of ``blob``, after checking it against the file, this OpenVINO, the source ONNX (``onnx_path``,
    default the one it records, where that still exists) and this CPU's precision (``hint``, default the recorded
    one resolved here). One line saying to rebuild on any mismatch."""
    blob = Path(blob)
    where = f"compiled model {blob}"
    mpath, m = read_manifest_of(blob, where, REBUILD, what="OpenVINO manifest")
    if m.get("format") != MANIFEST_FORMAT or m.get("backend") != BACKEND or "blob_sha256" not in m:
        raise UserError(f"{where}: {mpath.name} is not a version-{MANIFEST_FORMAT} OpenVINO manifest; {REBUILD}")
    if m.get("backend_version") != full_version():
        raise UserError(f"{where} was compiled by OpenVINO {m.get('backend_version')} but this is OpenVINO {full_version()}; {REBUILD}")
    if sha256_file(blob) != m["blob_sha256"]:
        raise UserError(f"{where} does not match the sha256 in its manifest (modified or truncated); {REBUILD}")
    check_source_onnx(m, onnx_path, where=where, rebuild_hint=REBUILD, built="it was compiled")
    want = hint or resolve_hint(m.get("hint", "auto"))  # bf16 compiled elsewhere, on a CPU without it: one line
    if want.name != m.get("precision"):
        raise UserError(f"{where} runs {m.get('precision')}, not {want.name} ({want.why}); {rebuild_at(want.name)}")
    return m


def compiled_is_current(blob: str | os.PathLike, onnx_path: str | os.PathLike, hint: Hint, shapes: dict[str, list[int]] | None) -> bool:
    """Whether ``blob`` and its manifest are intact and were compiled by this OpenVINO, at ``hint``, with ``shapes``,
    from the ONNX now at ``onnx_path``."""
    try:
        m = check_compiled(blob, onnx_path=onnx_path, hint=hint)
    except UserError:
        return False
    return m.get("shapes") == shapes


def build_all(onnx_dir: str | os.PathLike, out: str | os.PathLike, *, hint: Hint, components: Iterable[str] | None = None,
              profiles: dict[str, dict[str, Any]] | None = None, force: bool = False, model: str | None = None, model_weights: Any = None,
              served: dict[str, Any] | None = None) -> dict[str, Path]:
    """Compile every component ONNX of ``onnx_dir`` (or ``components``) into ``out``: one blob per served resolution for
    a component with ``profiles[c]`` (the export report's ``per_resolution`` profiles), one dynamic blob otherwise.
    A blob whose manifest matches is reused unless ``force``. Returns ``{"<component>@<label>": blob}``."""
    from runtime.trt.build import exported_components

    onnx_dir = Path(onnx_dir)
    names = exported_components(onnx_dir, components)
    blobs: dict[str, Path] = {}
    for comp in names:
        src = onnx_dir / f"{comp}.onnx"
        per = (profiles or {}).get(comp) or {DYNAMIC: None}
        for label, profile in per.items():
            shapes = static_shapes(profile) if profile else None
            blob = Path(out) / comp / label / blob_name(hint.name)
            if not force and compiled_is_current(blob, src, hint, shapes):
                log.info("reusing %s (ONNX, OpenVINO and shapes unchanged)", blob)
            else:
                blob = build_compiled(src, blob.parent, component=comp, hint=hint, label=label, shapes=shapes, model=model,
                                      model_weights=model_weights, served=served)
            blobs[f"{comp}@{label}"] = blob
    return blobs


class OvModelSet:
    """A component's compiled models, one per served shape: each call runs the one whose input shapes take the inputs;
    none is one line naming the shapes built."""

    def __init__(self, models: dict[str, OvModel]):
        if not models:
            raise ValueError("a compiled-model set needs at least one model")
        self.models = models
        first = next(iter(models.values()))
        self.path, self.inputs, self.outputs, self.hint, self.precision = first.path, first.inputs, first.outputs, first.hint, first.precision
        self.label, self.providers, self.on_cuda = first.label, first.providers, False

    def select(self, shapes: dict[str, tuple[int, ...]]) -> OvModel:
        from runtime.openvino.library import openvino

        ov = openvino()
        for model in self.models.values():
            if all(i.get_partial_shape().compatible(ov.PartialShape(list(shapes[i.get_any_name()]))) for i in model.compiled.inputs):
                return model
        shown = {n: list(s) for n, s in shapes.items()}
        raise UserError(f"the compiled {self.path.stem} serves {', '.join(self.models)}; none takes the inputs {shown}: "
                        f"rebuild with `--resolution`/`--batch` covering them (export, then build --backend openvino)")

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        return self.select({n: tuple(np.shape(feeds[n])) for n in self.inputs if n in feeds})(feeds)

    @property
    def size_bytes(self) -> int:
        return next(iter(self.models.values())).size_bytes  # one ONNX behind every shape


def import_blob(blob: Path, hint: Hint, threads: int = 0):
    """``(compiled model, mapped file)`` of ``blob``: mapped from the file rather than read into memory (OpenVINO's
    weights point into the mapping: the caller keeps it as long as the compiled model). The blob holds the compiled
    graph but not its settings: OpenVINO applies the precision hint given here (without one, its own default), so the
    project's :func:`~runtime.openvino.session.compile_config` goes with it."""
    import numpy as np

    from runtime.openvino.library import openvino

    data = np.memmap(blob, dtype=np.uint8, mode="c")  # copy-on-write: OpenVINO wants a writable buffer, the file stays as it is
    try:
        return core().import_model(openvino().Tensor(data, shared_memory=True), DEVICE, compile_config(hint, threads)), data
    except RuntimeError as e:
        raise UserError(f"OpenVINO {version()} cannot load {blob}: {str(e).splitlines()[0][:200]}; {REBUILD}") from None


def holds_compiled(out: str | os.PathLike, hint: Hint) -> bool:
    """Whether a ``build --backend openvino`` directory holds models compiled at ``hint`` by this OpenVINO."""
    return any(Path(out).glob(f"*/*/{blob_name(hint.name)}"))


def load_compiled(component_dir: str | os.PathLike, *, onnx_path: str | os.PathLike | None, hint: Hint, threads: int = 0) -> OvModelSet:
    """The checked blobs of one component (``<out>/<component>/<label>/``) at ``hint``, loaded with ``threads``
    inference threads (0: one per physical core)."""
    component_dir = Path(component_dir)
    blobs = sorted(component_dir.glob(f"*/{blob_name(hint.name)}"))
    if not blobs:
        raise UserError(f"no {hint.name} model compiled by OpenVINO {version()} in {component_dir}; {rebuild_at(hint.name)}")
    models = {}
    for blob in blobs:
        m = check_compiled(blob, onnx_path=onnx_path, hint=hint)
        src = Path(onnx_path) if onnx_path is not None else Path(m["onnx"])
        compiled, mapped = import_blob(blob, hint, threads)
        models[blob.parent.name] = OvModel(src, compiled=compiled, hint=hint, threads=threads, keep=mapped)
    return OvModelSet(models)
