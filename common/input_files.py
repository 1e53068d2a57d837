"""Input files checked before a stage uses them: readable, complete and of the expected kind.

A file cut short, overwritten with something else or unreadable ends the command with one line naming the
file and what to do, never with the parsing library's traceback (protobuf's ``DecodeError``, safetensors'
``SafetensorError``...):

- :func:`check_safetensors`: the header parses and the file is exactly as long as the header says;
- :func:`check_onnx`: the graph parses, and every tensor in external data points into a file that exists
  and is long enough;
- :func:`check_input_tree`: every safetensors, ONNX and JSON file under a directory (a diffusers model, a
  stage's output), headers only: seconds even for many GiB of weights;
- :func:`safetensors_numel`, :func:`safetensors_tensors`: how many weights a file holds (a stage's disk-space
  estimate), and each tensor's dtype and bytes, header only;
- :func:`reading`: around a library call that parses a file, turns its parse error into that one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Iterator

from common.errors import UserError
from common.io import is_disk_full, read_json

# Exceptions a library raises for a file it cannot parse (bugs of our own are not among them: KeyError,
# TypeError, AttributeError keep their traceback).
_PARSE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, EOFError, struct.error)


def _parse_errors() -> tuple[type[BaseException], ...]:
    extra = []
    with contextlib.suppress(ImportError):
        from google.protobuf.message import DecodeError

        extra.append(DecodeError)
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        extra.append(SafetensorError)
    with contextlib.suppress(ImportError):
        from onnx.onnx_cpp2py_export.checker import ValidationError

        extra.append(ValidationError)
    return (*_PARSE_ERRORS, *extra)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, fix: str) -> Iterator[None]:
    """Turn a parse error raised while the block reads ``path`` into one line: ``cannot read <what> <path>:
    <reason>; <fix>``. A full disk, an interrupt and a :class:`UserError` pass through unchanged."""
    try:
        yield
    except UserError:
        raise
    except _parse_errors() as e:
        if is_disk_full(e):
            raise
        raise UserError(f"cannot read {what} {path}: {_first_line(e)}; {fix}") from None


def check_safetensors(path: str | os.PathLike, *, fix: str = "replace it (rerun the stage that wrote it)") -> dict:
    """One line unless ``path`` is a complete safetensors file: an 8-byte header length, a JSON header, and
    exactly the data bytes its tensors' offsets cover. Returns the header (``{name: {dtype, shape, data_offsets}}``
    and ``__metadata__``)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            n = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else None
            if n is None or n > 100 << 20 or head[8:] != b"{":
                raise UserError(f"{path} is not a safetensors file (no valid header: {size} bytes, truncated or of another kind); {fix}")
            if n > size - 8:
                raise UserError(f"{path} is truncated: {size} bytes, shorter than its {n}-byte header; {fix}")
            header = json.loads((b"{" + f.read(n - 1)).decode("utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}; {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is not a safetensors file (its header is not JSON: truncated or of another kind); {fix}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (its header is not a JSON object); {fix}")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise UserError(f"{path} is not a safetensors file (malformed tensor entries in its header); {fix}") from None
    if size != 8 + n + end:
        raise UserError(f"{path} is truncated or damaged: {size} bytes, its header describes {8 + n + end}; {fix}")
    return header


def safetensors_tensors(path: str | os.PathLike) -> dict[str, tuple[str, int, int]]:
    """``{tensor name: (safetensors dtype, elements, bytes)}`` of a (checked) safetensors file, from its header
    alone (dtype as safetensors names it: ``F32``, ``F16``, ``BF16``, ``I8``...)."""
    out = {}
    for k, v in check_safetensors(path).items():
        if k != "__metadata__":
            count = 1
            for d in v.get("shape", []):
                count *= int(d)
            start, end = v["data_offsets"]
            out[k] = (str(v["dtype"]), count, int(end) - int(start))
    return out


def safetensors_numel(path: str | os.PathLike) -> int:
    """The number of tensor elements a (checked) safetensors file holds, from its header alone."""
    return sum(numel for _, numel, _ in safetensors_tensors(path).values())


def check_onnx(path: str | os.PathLike, *, fix: str = "re-export it (python -m pipeline export)") -> None:
    """One line unless ``path`` is an ONNX model that parses, with every external-data tensor inside a file
    that exists next to it and is long enough (the weights themselves are not read)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model {path} not found; {fix}")
    with reading(path, "ONNX model", fix):
        model = onnx.load(str(path), load_external_data=False)
    if not model.graph.node and not model.graph.initializer:
        raise UserError(f"{path} holds no ONNX graph (empty, truncated or another kind of file); {fix}")
    sizes: dict[str, int] = {}
    base = path.parent
    for t in _tensors(model.graph):
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        data = base / info.location
        if info.location not in sizes:
            try:
                sizes[info.location] = data.stat().st_size
            except OSError:
                raise UserError(f"{path} keeps tensor {t.name} in {data}, which is missing or unreadable; {fix}") from None
        end = (info.offset or 0) + (info.length or 0)
        if end > sizes[info.location]:
            raise UserError(f"external data {data} of {path} is truncated: tensor {t.name} ends at byte {end}, "
                            f"the file has {sizes[info.location]}; {fix}")


def _tensors(graph) -> Iterator:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def check_input_tree(directory: str | os.PathLike, *, fix: str) -> None:
    """Check every ``*.safetensors``, ``*.onnx`` and ``*.json`` file under ``directory`` (see the module
    doc); one line naming the first bad file and ``fix``."""
    directory = Path(directory)
    for p in sorted(directory.rglob("*")):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix == ".safetensors":
            check_safetensors(p, fix=fix)
        elif p.suffix == ".onnx":
            check_onnx(p, fix=fix)
        elif p.suffix == ".json":
            read_json(p, expect=None, what="JSON file")
