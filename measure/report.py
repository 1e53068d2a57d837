"""Turn a benchmark JSON into a Markdown table, a PNG plot and a PNG image grid (matplotlib Agg, Pillow).

Input is the dict :func:`measure.e2e.run_e2e` writes to ``bench.json``: variant entries (``dense``,
``pruned``, optionally ``eager``) each with ``latency_ms`` {median, p90}, ``stages_ms`` {stage: {median,
p90}}, ``images_per_s``, ``peak_memory_mib``, ``size_mib`` and ``quality``; plus ``speedup``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

VARIANTS = ("dense", "pruned", "torch_dense", "torch_pruned", "eager")  # torch_*: e2e --also-torch, next to the engines
STAGE_LABELS = {"text_encoders": "text encoders", "transformer": "transformer (all steps)", "vae_decode": "VAE decode"}


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def variants_of(bench: dict[str, Any]) -> list[str]:
    return [v for v in VARIANTS if isinstance(bench.get(v), dict)]


def markdown_table(bench: dict[str, Any]) -> str:
    """One row per variant: backend, end-to-end median/p90, stage medians, images/s, memory, size, quality."""
    qkeys: list[str] = []
    for v in variants_of(bench):
        for k, val in (bench[v].get("quality") or {}).items():
            if isinstance(val, (int, float)) and not isinstance(val, bool) and k in ("prompt_accuracy", "frechet_distance", "clip_score") and k not in qkeys:
                qkeys.append(k)
    head = ["variant", "backend", "e2e median ms", "e2e p90 ms", "text enc ms", "transformer ms", "per step ms", "VAE ms", "images/s", "peak mem MiB", "transformer MiB", *qkeys]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for v in variants_of(bench):
        e = bench[v]
        st = e.get("stages_ms", {})
        q = e.get("quality") or {}
        row = [
            v,
            e.get("backend", "-"),
            _fmt(e["latency_ms"]["median"]),
            _fmt(e["latency_ms"]["p90"]),
            _fmt(st.get("text_encoders", {}).get("median")),
            _fmt(st.get("transformer", {}).get("median")),
            _fmt(e.get("transformer_step_ms"), 2),
            _fmt(st.get("vae_decode", {}).get("median")),
            _fmt(e.get("images_per_s"), 2),
            _fmt(e.get("peak_memory_mib"), 0),
            _fmt((e.get("size_mib") or {}).get("transformer"), 2),
            *[_fmt(q.get(k), 3) for k in qkeys],
        ]
        rows.append("| " + " | ".join(row) + " |")
    lines = rows
    s = bench.get("speedup")
    if s is not None:
        lines.append("")
        lines.append(
            f"Speedup dense/pruned: **{s:.3f}x** end to end, {_fmt(bench.get('speedup_transformer'), 3)}x on the transformer stage "
            f"(paired per-iteration median {_fmt(bench.get('speedup_paired'), 3)}x)."
        )
    if bench.get("note"):
        lines.append("")
        lines.append(f"Note: {bench['note']}")
    ov = bench.get("ov_precision")
    if ov:
        lines.append("")
        lines.append(f"OpenVINO ran {ov['precision']} (precision hint {ov['hint']}: {ov['why']}).")
    st = bench.get("settings", {})
    if st:
        lines.append("")
        lines.append(
            f"{bench.get('model')} {bench.get('sparsity')}{', transformer ' + bench['precision'] if bench.get('precision') else ''}, {st.get('steps')} steps, {st.get('runs')} timed runs after {st.get('warmup')} warm-up, "
            f"variants interleaved; {bench.get('device', {}).get('summary', '')}."
        )
    from measure.memory import memory_markdown

    return "\n".join(lines) + "\n" + memory_markdown(bench, variants_of(bench))


def plot(bench: dict[str, Any], path: str | os.PathLike) -> Path:
    """Stacked bars of stage medians per variant, with the end-to-end p90 as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_path

    names = variants_of(bench)
    fig, ax = plt.subplots(figsize=(7.6, 3.6), dpi=120)
    bottom = [0.0] * len(names)
    for stage, label in STAGE_LABELS.items():
        vals = [bench[v].get("stages_ms", {}).get(stage, {}).get("median", 0.0) or 0.0 for v in names]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + x for b, x in zip(bottom, vals)]
    p90 = [bench[v]["latency_ms"]["p90"] for v in names]
    med = [bench[v]["latency_ms"]["median"] for v in names]
    ax.scatter(names, p90, marker="_", s=400, color="black", label="end-to-end p90", zorder=3)
    ax.scatter(names, med, marker="o", s=18, color="black", label="end-to-end median", zorder=3)
    ax.set_ylabel("ms per image")
    title = f"{bench.get('model', '')} {bench.get('sparsity', '')}: speedup {bench.get('speedup', float('nan')):.2f}x"
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


GRID_MAX_COLS = 10  # columns per band of the image grid; more prompts wrap into further bands


def image_grid(rows: dict[str, Sequence[Any]], path: str | os.PathLike, *, col_labels: Sequence[str] | None = None, cell: int = 96,
               max_cols: int | None = GRID_MAX_COLS) -> Path:
    """Save a grid: one labelled row per variant (``{label: [PIL images or HxWx3 arrays in [0,1]]}``).

    Every row must have the same number of images (same prompts and seeds), and every image is shown: with
    more than ``max_cols`` (None: no limit) the columns wrap into bands, each with its column labels and one
    row per variant. Cells are resized to ``cell`` pixels with nearest-neighbour so small images stay legible.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from common.io import atomic_path

    labels = list(rows)
    n = {len(v) for v in rows.values()}
    if len(n) != 1:
        raise ValueError(f"every row needs the same number of images, got {n}")
    ncol = n.pop()
    if ncol == 0:
        raise ValueError("the grid has no images")
    if col_labels is not None and len(col_labels) != ncol:
        raise ValueError(f"{len(col_labels)} column labels for {ncol} columns")
    per_band = ncol if not max_cols else min(ncol, max_cols)
    bands = -(-ncol // per_band)
    label_w, head_h = 70, 14 if col_labels else 0
    band_h = head_h + len(labels) * cell
    grid = Image.new("RGB", (label_w + per_band * cell, bands * band_h), "white")
    draw = ImageDraw.Draw(grid)
    for c in range(ncol):
        band, x = divmod(c, per_band)
        x0, y0 = label_w + x * cell, band * band_h
        if col_labels:
            draw.text((x0 + 2, y0 + 1), str(col_labels[c])[:16], fill="black")
        for r, lab in enumerate(labels):
            img = rows[lab][c]
            if not isinstance(img, Image.Image):
                arr = np.asarray(img)
                img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype("uint8") if arr.dtype != np.uint8 else arr)
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x0, y0 + head_h + r * cell))
    for band in range(bands):
        for r, lab in enumerate(labels):
            draw.text((2, band * band_h + head_h + r * cell + cell // 2 - 5), lab, fill="black")
    path = Path(path)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def write_reports(bench: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``bench.md`` and ``bench.png`` next to ``bench.json``; returns their paths."""
    from common.report import write_markdown

    out_dir = Path(out_dir)
    md = write_markdown(out_dir / "bench.md", markdown_table(bench))
    return {"markdown": md, "plot": plot(bench, out_dir / "bench.png")}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from common.io import read_json

    p = argparse.ArgumentParser(description="bench.json -> bench.md + bench.png")
    p.add_argument("bench_json")
    args = p.parse_args(argv)
    bench = read_json(args.bench_json)
    out = write_reports(bench, Path(args.bench_json).parent)
    print(out["markdown"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
