"""The memory section of the end-to-end benchmark (:func:`measure.e2e.run_e2e`): for each variant, the pipeline's
weights per component, on disk and as loaded, next to the dense original's (:mod:`export.weights`), and the peak
memory of generating one image at the served shape in a fresh process (:mod:`runtime.generation_memory`); and the
Markdown that shows them. What each figure means: ``docs/memory.md``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def variant_memory(spec, dense: dict[str, Any], *, backend: str, onnx_dir: str | os.PathLike | None = None,
                   engine_dir: str | os.PathLike | None = None, provider: str = "cpu", height: int, width: int, steps: int | None,
                   threads: int | None) -> dict[str, Any]:
    """One variant's memory: ``{"weights": export.weights.compare(...) table, "generation": runtime.generation_memory
    figures}``. ``backend`` ``ort``/``trt``: the export in ``onnx_dir`` (ONNX Runtime's loaded bytes are measured for
    ``ort`` on a CPU only; TensorRT holds its engines instead); ``pytorch``: the dense model itself. ``dense``:
    :func:`export.weights.model_weights` of the model. A failed measurement is recorded as ``{"error": ...}``."""
    from export.weights import compare, export_weights
    from runtime.generation_memory import generation_peak

    if backend == "pytorch":
        exported = {"components": {}}
    else:
        exported = export_weights(onnx_dir, loaded=backend == "ort" and provider == "cpu")
    out: dict[str, Any] = {"weights": compare(exported, dense, spec.adapter.components)}
    try:
        out["generation"] = generation_peak(spec, backend=backend, onnx_dir=onnx_dir if backend == "ort" else None, engine_dir=engine_dir,
                                            provider=provider, height=height, width=width, steps=steps, threads=threads)
    except RuntimeError as e:
        log.warning("%s", e)
        out["generation"] = {"error": str(e)}
    return out


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def memory_markdown(bench: dict[str, Any], variants: list[str]) -> str:
    """The ``## Memory`` section of ``bench.md``: one row per variant (weights in all, and the one-image peaks),
    then the pruned pipeline's weights per component next to the dense original's. Empty without measurements."""
    from export.weights import markdown_table

    rows = [(v, bench[v]["memory"]) for v in variants if isinstance(bench[v].get("memory"), dict)]
    if not rows:
        return ""
    gen0 = next((m["generation"] for _, m in rows if "peak_rss_bytes" in m.get("generation", {})), {})
    shape = f"{gen0.get('height')}x{gen0.get('width')}, {gen0.get('steps')} steps" if gen0 else "the served shape"
    head = ["variant", "weights on disk MiB", "weights loaded MiB", "loaded / dense", f"peak RSS MiB (one image, {shape})",
            "peak above the libraries MiB", "device peak MiB"]
    lines = ["", "## Memory", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for v, m in rows:
        total, gen = m["weights"]["total"], m.get("generation", {})
        ratio = "-" if total.get("ratio") is None else f"{total['ratio']:.3f}x"
        lines.append("| " + " | ".join([v, _mib(total.get("disk_bytes")), _mib(total.get("loaded_bytes")), ratio,
                                        _mib(gen.get("peak_rss_bytes")) if "error" not in gen else "failed",
                                        _mib(gen.get("peak_above_baseline_bytes")), _mib(gen.get("cuda_peak_bytes"))]) + " |")
    focus = next((m for v, m in rows if v == "pruned"), rows[0][1])
    lines += ["", f"Weights per component (pruned pipeline; dense = the original as the registry loads it, "
                  f"{focus['weights']['dense_dtype']}):", "", markdown_table(focus["weights"]).rstrip()]
    failed = [f"{v}: {m['generation']['error']}" for v, m in rows if "error" in m.get("generation", {})]
    if failed:
        lines += ["", "One-image measurement failed: " + "; ".join(failed)]
    return "\n".join(lines) + "\n"
