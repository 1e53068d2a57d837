"""A pipeline's weights, component by component: bytes on disk and bytes as loaded, for a stage-2 export
directory (its ONNX files, as ONNX Runtime holds them) and for a dense diffusers model directory (its
safetensors, as the registry loads them), and the table that sets the two side by side.

- :func:`export_weights`: an export directory's figures; the export report's ``weights`` section when it still
  describes the files there, else measured now (the entry point of ``make engine``'s summary, the benchmarks
  and a Pareto point);
- :func:`measure_export_weights`: measure them (file sizes, initializers from the graphs, and ONNX Runtime's
  resident memory per session in a fresh process: :func:`measure_loaded`);
- :func:`model_weights`: a dense diffusers directory's (safetensors headers, no weights read);
- :func:`compare`, :func:`format_table`, :func:`markdown_table`: the pipeline next to the dense original.

Every figure is bytes. What each one means and how it is measured: ``docs/memory.md``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from common.errors import UserError

log = logging.getLogger(__name__)

# The precision a component's weights are loaded in by the registry (families.registry.load_pipeline's default).
DENSE_DTYPE = "float32"
# safetensors dtype names -> numpy/torch names and bytes per element
_SAFETENSORS_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
                       "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "I64": ("int64", 8), "I32": ("int32", 4),
                       "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1)}
_ITEMSIZE = {name: size for name, size in _SAFETENSORS_DTYPES.values()}
_FLOATS = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


# ---------------------------------------------------------------------------------------------- exports


def onnx_dir_of(export_dir: str | os.PathLike) -> Path:
    """The ONNX directory of a stage-2 output (``export_dir/onnx``), or ``export_dir`` itself when it holds ONNX."""
    d = Path(export_dir)
    if (d / "onnx").is_dir():
        return d / "onnx"
    if d.is_dir() and any(d.glob("*.onnx")):
        return d
    raise UserError(f"no ONNX files under {export_dir}; give an export directory (`python -m pipeline export --out`) or its onnx/")


def _component_order(names: Sequence[str]) -> list[str]:
    from families import ADAPTERS
    from families.components import component_names

    known = component_names(ADAPTERS.values())
    return sorted(names, key=lambda n: (known.index(n) if n in known else len(known), n))


def onnx_weights(path: str | os.PathLike) -> dict[str, Any]:
    """One ONNX file's weights without reading them: ``disk_bytes`` (the graph and its external data file),
    ``initializer_bytes`` and ``dtypes`` (initializer bytes by element type, 4-bit types packed), and ``linked``
    (the files are hard links shared with another export: on disk once for both)."""
    import onnx

    from export.onnx_files import onnx_size, tensor_bytes

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    dtypes: dict[str, int] = {}
    for t in model.graph.initializer:
        name = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
        dtypes[name] = dtypes.get(name, 0) + tensor_bytes(t)
    return {"file": path.name, "disk_bytes": onnx_size(path), "initializer_bytes": sum(dtypes.values()),
            "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])), "linked": path.stat().st_nlink > 1}


def measure_loaded(paths: Sequence[str | os.PathLike], *, threads: int = 1, timeout: float | None = None) -> dict[str, dict[str, int]]:
    """What ONNX Runtime holds for each model's weights: in one fresh Python process, each session is created
    (CPU, the runtime's session options) and freed in turn, and its resident memory is measured.

    Returns ``{path: {"loaded_bytes": RSS after the session is created (heap trimmed) minus RSS before,
    "load_peak_bytes": the highest RSS while it was created, minus RSS before}}``, or ``{"loaded_error": ...}``
    for a model ONNX Runtime cannot load on a CPU (an FP8 graph). The process first creates
    a one-node session, so ONNX Runtime's environment and thread pools are in the baseline, not in the first
    component's figure. Raises :class:`RuntimeError` when the process fails (for instance killed for memory).
    """
    from common.memory import run_child_json

    args = ["--threads", str(threads), *[str(p) for p in paths]]
    return run_child_json("export.weights", args, timeout=timeout, what="ONNX Runtime load measurement")


def _loaded_here(paths: Sequence[str], threads: int) -> dict[str, dict[str, int]]:
    """:func:`measure_loaded`'s body, in the fresh process."""
    import gc

    import onnxruntime as ort

    from common.memory import hwm_bytes, release_to_os, reset_peak_rss, rss_bytes
    from common.ort_options import session_options

    # the runtime's options (runtime.ort.make_session); making them runs the INT8 probe's session once, so ONNX
    # Runtime's environment is in the baseline. (Not export.parity's session: it imports torch, 3 s here.)
    so = session_options(threads=threads)
    out = {}
    for p in paths:
        release_to_os()
        before = rss_bytes()
        reset_peak_rss()
        try:
            session = ort.InferenceSession(p, sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # a graph this ONNX Runtime cannot run on a CPU (FP8 Q/DQ): that component only
            out[p] = {"loaded_error": (str(e).strip().splitlines() or [type(e).__name__])[0][:300]}
            continue
        peak = hwm_bytes()
        release_to_os()  # the graph's protobuf and the optimizer's temporaries are freed: what is left is held
        out[p] = {"loaded_bytes": rss_bytes() - before, "load_peak_bytes": max(peak, rss_bytes()) - before}
        del session
        gc.collect()
    return out


def measure_export_weights(export_dir: str | os.PathLike, *, loaded: bool = True, precisions: dict[str, str] | None = None,
                           dropped: Sequence[str] = (), timeout: float | None = None) -> dict[str, Any]:
    """Measure an export directory's weights now (see :func:`export_weights` for what is returned).

    loaded: also measure ONNX Runtime's resident memory per component (:func:`measure_loaded`); a failed
    measurement is recorded (``loaded_error``), never raised. precisions: each component's export precision
    (the export report's), recorded as ``precision``. dropped: the components the export leaves out of the
    pipeline (the report's ``dropped``: SD3's T5 after ``--drop-t5``), recorded.
    """
    onnx_dir = onnx_dir_of(export_dir)
    files = {p.stem: p for p in onnx_dir.glob("*.onnx")}
    comps = {name: onnx_weights(files[name]) for name in _component_order(list(files))}
    for name, c in comps.items():
        c["precision"] = (precisions or {}).get(name) or next(iter(c["dtypes"]), None)
    how = None
    if loaded and comps:
        try:
            measured = measure_loaded([files[n] for n in comps], timeout=timeout)
            for name in comps:
                comps[name].update({"loaded_bytes": None, **measured[str(files[name])]})
            how = "ONNX Runtime CPU session per component, RSS after creation minus before, in a fresh process"
        except RuntimeError as e:
            log.warning("could not measure the memory ONNX Runtime holds for %s: %s", onnx_dir, e)
            how = f"not measured: {e}"
            for c in comps.values():
                c["loaded_bytes"] = None
    return {"components": comps, "total": _totals(comps.values()), "loaded_measured": how, "dropped": list(dropped)}


def _totals(rows) -> dict[str, int | None]:
    rows = list(rows)
    out: dict[str, int | None] = {}
    for key in ("disk_bytes", "initializer_bytes", "loaded_bytes"):
        values = [r.get(key) for r in rows]
        out[key] = sum(values) if values and all(v is not None for v in values) else None
    return out


def _current(weights: dict[str, Any] | None, onnx_dir: Path) -> bool:
    """Whether a recorded ``weights`` section still describes the ONNX files in ``onnx_dir`` (same components,
    same sizes on disk)."""
    from export.onnx_files import onnx_size

    if not weights or not weights.get("components"):
        return False
    files = {p.stem: p for p in onnx_dir.glob("*.onnx")}
    comps = weights["components"]
    return set(files) == set(comps) and all(onnx_size(files[n]) == comps[n].get("disk_bytes") for n in files)


def export_weights(export_dir: str | os.PathLike, *, loaded: bool = True) -> dict[str, Any]:
    """The weights of an export directory (``python -m pipeline export --out``, or its ``onnx/``), per component.

    Returns ``{"components": {name: {"file", "disk_bytes", "initializer_bytes", "loaded_bytes",
    "load_peak_bytes", "precision", "dtypes", "linked"}}, "total": {"disk_bytes", "initializer_bytes",
    "loaded_bytes"}, "loaded_measured": how loaded_bytes were measured (None: not asked for), "dropped": the
    components the export leaves out of the pipeline}``.

    The export report's ``weights`` section is returned when it still matches the files on disk; otherwise
    everything is measured now (loaded: ONNX Runtime sessions in a fresh process, seconds for a tiny model).
    """
    from common.io import read_json

    onnx_dir = onnx_dir_of(export_dir)
    report_path = onnx_dir.parent / "export_report.json"
    report = read_json(report_path, what="export report") if report_path.is_file() else {}
    recorded = report.get("weights")
    if _current(recorded, onnx_dir) and (not loaded or recorded.get("total", {}).get("loaded_bytes") is not None):
        return recorded
    precisions = {k: v.get("precision") for k, v in (report.get("components") or {}).items() if isinstance(v, dict)}
    return measure_export_weights(onnx_dir, loaded=loaded, precisions=precisions, dropped=report.get("dropped") or ())


# ---------------------------------------------------------------------------------------------- dense models


def _weight_files(component_dir: Path) -> list[Path]:
    """The safetensors files a component loads from: the plain ones (``model.safetensors`` or its shards), not
    the ``.fp16.`` / ``.bf16.`` variants a hub repository may carry beside them."""
    files = sorted(component_dir.glob("*.safetensors"))
    plain = [f for f in files if len(f.name.split(".")) == 2]  # a variant has its name between: model.fp16.safetensors
    return plain or files


def _keep_fp32(library: str, class_name: str) -> tuple[str, ...]:
    """Module name patterns a class keeps in float32 when loaded in half precision (transformers' and diffusers'
    ``_keep_in_fp32_modules``, e.g. T5's ``wo``)."""
    import importlib

    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return ()
    return tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())


def model_directory(spec) -> Path | None:
    """The diffusers directory of ``spec``: its own for a local model, the Hugging Face cache's snapshot for a
    hub model there; None when the weights are not on this machine."""
    if spec.local and spec.path is not None:
        return Path(spec.path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.source, local_files_only=True))
    except Exception:  # not cached
        return None


def model_weights(model: Any, *, dtype: str = DENSE_DTYPE) -> dict[str, Any]:
    """The weights of a dense diffusers pipeline directory (or of a :class:`families.registry.ModelSpec`), per
    component of its ``model_index.json`` that has weight files, read from the safetensors headers alone.

    dtype: the precision the components are loaded in (the registry loads float32): every floating tensor
    counts at it, except modules the class keeps in float32; integer tensors keep their own type.

    Returns ``{"components": {attr: {"class", "disk_bytes", "loaded_bytes", "parameters", "stored_dtypes",
    "dtype"}}, "total": {...}, "directory": str}``; for a hub model not on this machine, ``components`` is
    empty and ``unavailable`` says why.
    """
    from common.input_files import safetensors_tensors
    from common.io import read_json

    root = model if isinstance(model, (str, os.PathLike)) else model_directory(model)
    if root is None:
        return {"components": {}, "total": _totals([]), "directory": None,
                "unavailable": f"{model.source} is not in the Hugging Face cache (its weights are not on this machine)"}
    root = Path(root)
    index = read_json(root / "model_index.json", what="diffusers model index")
    comps: dict[str, Any] = {}
    for attr, entry in index.items():
        if attr.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or not (root / attr).is_dir():
            continue
        files = _weight_files(root / attr)
        if not files:
            continue
        keep = _keep_fp32(*entry) if dtype not in ("float32", "float64") else ()
        stored: dict[str, int] = {}
        loaded = numel = 0
        for f in files:
            for name, (st_dtype, n, nbytes) in safetensors_tensors(f).items():
                np_name, _ = _SAFETENSORS_DTYPES.get(st_dtype, (st_dtype.lower(), 0))
                stored[np_name] = stored.get(np_name, 0) + nbytes
                numel += n
                if np_name in _FLOATS:
                    as_dtype = "float32" if any(f".{k}." in f".{name}" for k in keep) else dtype
                    loaded += n * _ITEMSIZE[as_dtype]
                else:
                    loaded += nbytes
        comps[attr] = {"class": entry[1], "disk_bytes": sum(f.stat().st_size for f in files), "loaded_bytes": loaded, "parameters": numel,
                       "stored_dtypes": stored, "dtype": dtype}
    return {"components": comps, "total": _totals(comps.values()), "directory": str(root)}


# ---------------------------------------------------------------------------------------------- side by side


def compare(exported: dict[str, Any], dense: dict[str, Any], components: Sequence[Any]) -> dict[str, Any]:
    """The served pipeline next to the dense original, one row per family component (``components``:
    :attr:`families.base.FamilyAdapter.components`, each with ``name`` and the pipeline ``attr``).

    A component the export lacks runs in PyTorch from the dense weights (:func:`runtime.pipeline_runner.with_runners`
    keeps it), so it counts there at its dense loaded size (``runtime: "pytorch"``); one it leaves out of the pipeline
    (``exported["dropped"]``) counts 0 (``runtime: "dropped"``). Returns ``{"rows": [{"component",
    "precision", "runtime", "disk_bytes", "loaded_bytes", "dense_bytes", "ratio"}], "total": {...}}``; ``ratio`` is
    loaded over dense (None where either is unknown).
    """
    rows = []
    for c in components:
        e = exported["components"].get(c.name)
        d = dense["components"].get(c.attr) or {}
        if e is None and not d:
            continue
        if c.name in (exported.get("dropped") or ()):
            row = {"component": c.name, "precision": None, "runtime": "dropped", "disk_bytes": 0, "loaded_bytes": 0}
        elif e is not None:
            row = {"component": c.name, "precision": e.get("precision"), "runtime": "onnx", "disk_bytes": e.get("disk_bytes"),
                   "loaded_bytes": e.get("loaded_bytes")}
        else:
            row = {"component": c.name, "precision": d.get("dtype"), "runtime": "pytorch", "disk_bytes": d.get("disk_bytes"),
                   "loaded_bytes": d.get("loaded_bytes")}
        row["dense_component"] = c.attr
        row["dense_bytes"] = d.get("loaded_bytes")
        row["ratio"] = _ratio(row["loaded_bytes"], row["dense_bytes"])
        rows.append(row)
    total = {k: sum(r[k] for r in rows) if rows and all(r.get(k) is not None for r in rows) else None
             for k in ("disk_bytes", "loaded_bytes", "dense_bytes")}
    total["ratio"] = _ratio(total["loaded_bytes"], total["dense_bytes"])
    dense_dtype = next((d.get("dtype") for d in dense["components"].values()), DENSE_DTYPE)
    return {"rows": rows, "total": total, "dense_dtype": dense_dtype, "dense_directory": dense.get("directory"),
            "dense_unavailable": dense.get("unavailable")}


def _ratio(a: int | None, b: int | None) -> float | None:
    return a / b if a is not None and b else None


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _cells(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["component", "precision", "on disk MiB", "loaded MiB", f"dense {table['dense_dtype']} MiB", "loaded/dense"]
    body = []
    for r in [*table["rows"], {"component": "total", "precision": "", **table["total"]}]:
        prec = r["precision"] or "-"
        if r.get("runtime") in ("pytorch", "dropped"):
            prec = "dropped" if r["runtime"] == "dropped" else prec + " (pytorch)"
        body.append([r["component"], prec, _mib(r["disk_bytes"]), _mib(r["loaded_bytes"]), _mib(r["dense_bytes"]),
                     "-" if r["ratio"] is None else f"{r['ratio']:.3f}x"])
    return head, body


def _notes(table: dict[str, Any]) -> list[str]:
    notes = [f"{r['component']}: the dense figure is all of {r['dense_component']} (the served pipeline runs only the part it exports)"
             for r in table["rows"] if r["dense_component"] != r["component"] and r["runtime"] == "onnx"]
    if table.get("dense_unavailable"):
        notes.append(f"dense original: {table['dense_unavailable']}")
    return notes


def format_table(table: dict[str, Any]) -> str:
    """:func:`compare`'s table as aligned text lines (what ``make engine`` prints)."""
    head, body = _cells(table)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in [head, *body]]
    return "\n".join(lines + _notes(table))


def markdown_table(table: dict[str, Any]) -> str:
    """:func:`compare`'s table in Markdown (the benchmarks' ``.md``)."""
    head, body = _cells(table)
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    rows += ["| " + " | ".join(r) + " |" for r in body]
    notes = _notes(table)
    return "\n".join(rows + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m export.weights [--threads N] MODEL.onnx ...``: :func:`measure_loaded`'s child; one JSON line."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m export.weights", description="ONNX Runtime's resident memory per model (one JSON line)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("paths", nargs="+")
    args = p.parse_args(argv)
    sys.stdout.write(json.dumps(_loaded_here(args.paths, args.threads)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
