"""ONNX files on disk: atomic saving (with external data past 2 GB, streamed from the exporter's data file),
embedding small external tensors, initializer sizes, file sizes and the graph's I/O description."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

MAX_IR_VERSION = 10  # what onnxruntime >= 1.20 and TensorRT 10 read
# Bytes of initializers above which weights live in an external data file and the graph is processed without
# them (protobuf's hard limit is 2 GiB). SDD_EXTERNAL_DATA_BYTES lowers it, so tests exercise that path on
# small models.
EXTERNAL_DATA_THRESHOLD = int(os.environ.get("SDD_EXTERNAL_DATA_BYTES", 2 * 1024**3 - 64 * 1024**2))


def load_small_external(model, base_dir: str | os.PathLike, max_bytes: int = 1 << 20) -> int:
    """Embed every externally stored initializer smaller than ``max_bytes`` (norm scales, biases) in the
    graph, so graph passes can read them; big weights stay in the file. Returns the count."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    n = 0
    for t in model.graph.initializer:
        if uses_external_data(t) and tensor_bytes(t) < max_bytes:
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = 0  # DEFAULT: the bytes now live in raw_data
            del t.external_data[:]
            n += 1
    return n


# ONNX's 4-bit element types (UINT4, INT4, FLOAT4E2M1) store two elements per byte
_PACKED_4BIT = (21, 22, 23)


def tensor_bytes(t) -> int:
    """Bytes of an initializer's data (from its dims and type; wherever the data lives; 4-bit types packed)."""
    numel = int(np.prod(t.dims))
    if t.data_type in _PACKED_4BIT:
        return (numel + 1) // 2
    return numel * np.dtype(_np_dtype(t.data_type)).itemsize


def _point_external(t, location: str, offset: int, length: int) -> None:
    """Make tensor ``t`` refer to ``length`` bytes at ``offset`` of the external file ``location``."""
    import onnx

    t.ClearField("raw_data")
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


def append_external(t, data: np.ndarray, base_dir: Path, file_name: str = "extra.onnx.data") -> None:
    """Store ``data`` as the external data of tensor ``t``, appended to ``base_dir/file_name``."""
    with open(base_dir / file_name, "ab") as fh:
        offset = fh.tell()
        fh.write(np.ascontiguousarray(data).tobytes())
    _point_external(t, file_name, offset, data.nbytes)


def initializer_bytes(model) -> int:
    """Bytes of all initializers of ``model``, embedded or external."""
    from onnx.external_data_helper import uses_external_data

    total = 0
    for t in model.graph.initializer:
        if uses_external_data(t):
            total += tensor_bytes(t)
        else:
            total += len(t.raw_data) if t.raw_data else int(np.prod(t.dims)) * 4
    return total


def _np_dtype(elem_type: int):
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def save_onnx(model, path: str | os.PathLike, *, base_dir: str | os.PathLike | None = None) -> Path:
    """Check and save ``model`` atomically; weights go to ``<name>.data`` beside it when over 2 GB.

    ``path`` and its data file are written in a temporary directory and renamed into place, data first.
    base_dir: where ``model``'s not-loaded external data lives; its tensors are then copied into the new data
    file one at a time (page-aligned), so saving never holds the weights in memory.
    """
    import onnx

    path = Path(path)
    streaming = base_dir is not None and _has_external(model)
    external = streaming or initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        if streaming:
            _copy_external_data(model, Path(base_dir), Path(tmp) / data_name)
            onnx.save_model(model, str(tmp_path))
        elif external:
            onnx.save_model(model, str(tmp_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp_path))
        onnx.checker.check_model(str(tmp_path))
        if external:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        elif (path.parent / data_name).exists():
            (path.parent / data_name).unlink()
        os.replace(tmp_path, path)
    return path


def _has_external(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


def _copy_external_data(model, base_dir: Path, data_file: Path, align: int = 4096, chunk: int = 64 << 20) -> None:
    """Copy every external tensor of ``model`` from its file under ``base_dir`` into ``data_file`` (in graph
    order, each at a page-aligned offset) and point the tensor there. Streams at most ``chunk`` bytes at once."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    handles: dict[str, Any] = {}
    try:
        with open(data_file, "wb") as out:
            for t in model.graph.initializer:
                if not uses_external_data(t):
                    continue
                info = ExternalDataInfo(t)
                src = handles.get(info.location) or handles.setdefault(info.location, open(base_dir / info.location, "rb"))
                length = info.length if info.length else tensor_bytes(t)
                pad = (-out.tell()) % align
                out.write(b"\0" * pad)
                offset = out.tell()
                src.seek(info.offset or 0)
                left = length
                while left:
                    block = src.read(min(chunk, left))
                    if not block:
                        raise RuntimeError(f"external data of {t.name} is truncated in {info.location}")
                    out.write(block)
                    left -= len(block)
                _point_external(t, data_file.name, offset, length)
    finally:
        for h in handles.values():
            h.close()


def onnx_size(path: str | os.PathLike) -> int:
    """Bytes of the ONNX file plus its external data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def human_bytes(n: int) -> str:
    """``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def io_spec(path: str | os.PathLike) -> tuple[dict, dict]:
    """``({input: {dtype, shape}}, {output: {dtype, shape}})`` of the ONNX at ``path`` (weights not loaded)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def spec(vs):
        out = {}
        for v in vs:
            tt = v.type.tensor_type
            out[v.name] = {
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in tt.shape.dim],
            }
        return out

    return spec(m.graph.input), spec(m.graph.output)
