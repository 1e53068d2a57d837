"""ONNX Runtime (CPU) latency of dense vs compact (structured-pruned) SD3 transformers.

For each case, a structured plan removes ``--ratio`` of the heads and FFN neurons of every block (keeping
the first ones: latency does not depend on which), the dense and the compact transformer are exported to
ONNX (fp32) and timed in one process, interleaved (dense, compact, compact, dense, ...), after warm-up.
The median latency ratio compact/dense is compared with the GEMM-FLOP ratio.

Cases:
- ``tiny-sd3``: the embedded model's transformer (``models/tiny-sd3``; a random one of the same
  architecture if absent) at its registry shapes;
- ``sd3-medium-width``: a random ``SD3Transformer2DModel`` with SD3-medium's width (24 heads x 64 = 1536,
  joint_attention_dim 4096, pooled 2048, 16 latent channels) and ``--sd3-blocks`` blocks, at a latent of
  ``--sd3-latent`` and ``--sd3-text`` text tokens (smaller than 128x128 so it runs in minutes on a CPU).

Usage: ``python -m benchmarks.export_latency [--out artifacts/bench] [--runs 10] [--ratio 0.3]``.
Writes ``export_latency.json`` and ``export_latency.md``.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks import program
from common.errors import UserError
from common.paths import REPO_ROOT
from common.versions import library_versions
from export.dynamo_export import export_module
from export.onnx_files import onnx_size
from export.parity import ort_session
from export.report import count_parameters, transformer_flops
from export.surgery import apply_plan, structured_plan
from families import adapter_for

log = logging.getLogger("benchmarks.export_latency")


def _sd3_class():
    """The diffusers class of the SD3 family (this benchmark compares SD3-shaped transformers)."""
    import diffusers

    from families import get_adapter

    return getattr(diffusers, get_adapter("sd3").transformer_class)


def tiny_sd3_case() -> tuple[Any, dict[str, Any]]:
    sd3_class = _sd3_class()

    from families.registry import MODELS

    spec = MODELS["tiny-sd3"]
    path = spec.path / "transformer"
    if (path / "config.json").is_file():
        model = sd3_class.from_pretrained(str(path), torch_dtype=torch.float32)
        source = str(path.relative_to(REPO_ROOT))
    else:
        torch.manual_seed(0)
        model = sd3_class(
            sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=64, num_attention_heads=4,
            joint_attention_dim=128, caption_projection_dim=256, pooled_projection_dim=128, out_channels=4, pos_embed_max_size=8,
        )
        source = "random (tiny-sd3 architecture; models/tiny-sd3 absent)"
    s = spec.shapes
    return model.eval(), {"source": source, "latent_hw": (s.latent_height, s.latent_width), "text_seq_len": s.text_seq_len, "batch": s.batch_opt}


def sd3_medium_width_case(blocks: int, latent: int, text: int, batch: int) -> tuple[Any, dict[str, Any]]:
    from families import published_config

    adapter, config = published_config("sd3-medium")
    config.update(num_layers=blocks, pos_embed_max_size=max(latent, 96))  # fewer blocks, a smaller position table: faster runs
    torch.manual_seed(0)
    model = _sd3_class()(sample_size=latent, **config)
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-inits AdaLN/outputs; random weights keep every path busy
            p.normal_(0.0, 0.02)
    return model.eval(), {"source": f"random SD3-medium width, {blocks} blocks", "latent_hw": (latent, latent), "text_seq_len": text, "batch": batch}


def time_interleaved(sessions: dict[str, Any], feeds: dict[str, dict], runs: int, warmup: int, min_time: float = 0.0) -> dict[str, list[float]]:
    """Run each session ``warmup`` times, then rounds in which every session runs once, the order rotating by
    one each round (no session always follows the same one; with two sessions the order alternates); seconds
    per run. Rounds: at least ``runs``, more for fast models so the timed rounds take about ``min_time`` seconds.
    """
    t0 = time.perf_counter()
    for name, sess in sessions.items():
        for _ in range(warmup):
            sess.run(None, feeds[name])
    per_round = (time.perf_counter() - t0) / max(warmup, 1)
    runs = max(runs, int(min_time / max(per_round, 1e-6)))
    times: dict[str, list[float]] = {n: [] for n in sessions}
    order = list(sessions)
    for r in tqdm(range(runs), desc="timing", unit="round", leave=False, disable=None):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            t0 = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append(time.perf_counter() - t0)
    return times


def bench_case(
    name: str, model, info: dict[str, Any], ratio: float, runs: int, warmup: int, workdir: Path, threads: int | None, min_time: float = 0.0
) -> dict[str, Any]:
    plan = structured_plan(model, ratio, model_id=name)
    compact = apply_plan(copy.deepcopy(model), plan)
    latent_hw, text, batch = info["latent_hw"], info["text_seq_len"], info["batch"]
    variants = {"dense": model, "compact": compact}
    result: dict[str, Any] = {"case": name, **info, "ratio": ratio, "plan": f"structured:{ratio:g} (first {1 - ratio:.0%} of heads/neurons kept)"}
    sessions, feeds = {}, {}
    for vname, m in variants.items():
        path = workdir / f"{name}-{vname}.onnx"
        ex = adapter_for(m).transformer_inputs(m, 2, latent_hw, text)
        export_module(adapter_for(m).transformer_for_onnx(m), ex, path)
        flops = transformer_flops(m, batch, latent_hw, text)
        result[vname] = {"params": count_parameters(m)["total"], "gemm_flops": flops["gemm"], "total_flops": flops["total"], "onnx_bytes": onnx_size(path)}
        sessions[vname] = ort_session(path, threads=threads)
        feeds[vname] = {k: v.numpy() for k, v in adapter_for(m).transformer_inputs(m, batch, latent_hw, text, seed=1).items()}
    times = time_interleaved(sessions, feeds, runs, warmup, min_time)
    for vname, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        result[vname].update({"latency_ms_median": 1e3 * med, "latency_ms_iqr": [1e3 * q1, 1e3 * q3], "latency_ms_min": 1e3 * min(ts), "rounds": len(ts)})
    # per-round ratios (same round = same machine load) and their median
    round_ratios = [c / d for c, d in zip(times["compact"], times["dense"])]
    lat_ratio = statistics.median(round_ratios)
    flop_ratio = result["compact"]["gemm_flops"] / result["dense"]["gemm_flops"]
    result.update(
        {
            "flop_ratio": flop_ratio,
            "param_ratio": result["compact"]["params"] / result["dense"]["params"],
            "latency_ratio": lat_ratio,
            "latency_ratio_of_medians": result["compact"]["latency_ms_median"] / result["dense"]["latency_ms_median"],
            "latency_vs_flop": lat_ratio / flop_ratio,
            "within_10pct": abs(lat_ratio / flop_ratio - 1) <= 0.10,
        }
    )
    log.info("%s: FLOP ratio %.3f, latency ratio %.3f (x%.3f of FLOP ratio)", name, flop_ratio, lat_ratio, lat_ratio / flop_ratio)
    return result


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# ONNX Runtime CPU latency: dense vs compact transformer",
        "",
        f"Machine: {report['machine']['processor']} ({report['machine']['cpus']} CPUs, ORT threads {report['machine']['ort_threads']}); "
        f"onnxruntime {report['versions']['onnxruntime']}, torch {report['versions']['torch']}. "
        f"Median of >= {report['runs']} interleaved rounds (more for fast cases, ~{report['min_time']:g} s of timing) after "
        f"{report['warmup']} warm-up runs; latency ratio = median over rounds of compact/dense in the same round.",
        "",
        "| case | shapes (B, latent, text) | variant | params | GEMM FLOPs / call | ONNX size | latency median (IQR) ms |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for c in report["cases"]:
        shp = f"{c['batch']}, {c['latent_hw'][0]}x{c['latent_hw'][1]}, {c['text_seq_len']}"
        for v in ("dense", "compact"):
            r = c[v]
            lines.append(
                f"| {c['case']} | {shp} | {v} | {r['params'] / 1e6:.2f} M | {r['gemm_flops'] / 1e9:.2f} G | {r['onnx_bytes'] / 2**20:.1f} MiB | "
                f"{r['latency_ms_median']:.2f} ({r['latency_ms_iqr'][0]:.2f}-{r['latency_ms_iqr'][1]:.2f}) |"
            )
    lines += ["", "| case | FLOP ratio | latency ratio | latency / FLOP ratio | within 10% |", "|---|---:|---:|---:|:---:|"]
    for c in report["cases"]:
        lines.append(f"| {c['case']} | {c['flop_ratio']:.3f} | {c['latency_ratio']:.3f} | {c['latency_vs_flop']:.3f} | {'yes' if c['within_10pct'] else 'no'} |")
    return "\n".join(lines) + "\n"


CASES = ("tiny-sd3", "sd3-medium-width")


def add_case_args(p, *, sd3_blocks: int) -> None:
    """The options this benchmark and :mod:`benchmarks.quant_latency` share: output directory, timing,
    cases and the SD3-medium-width shape (``sd3_blocks``: that case's default block count)."""
    p.add_argument("--out", type=Path, default=REPO_ROOT / "artifacts" / "bench", help="output directory (default artifacts/bench)")
    p.add_argument("--ratio", type=float, default=0.3, help="structured ratio of heads/neurons removed (default 0.3)")
    p.add_argument("--runs", type=int, default=10, help="timed rounds per case (default 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-time", type=float, default=20.0, help="fast cases get more rounds, about this many seconds of timing (default 20)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--sd3-blocks", type=int, default=sd3_blocks,
                   help=f"blocks of the SD3-medium-width model (default {sd3_blocks}; the last one has no text-branch outputs)")
    p.add_argument("--sd3-latent", type=int, default=32, help="latent height=width of the SD3-medium-width case (default 32 = 256 px)")
    p.add_argument("--sd3-text", type=int, default=333, help="text tokens (77 CLIP + 256 T5 = SD3's default)")
    p.add_argument("--sd3-batch", type=int, default=2, help="batch per call (2 = one CFG denoising step)")


def selected_cases(args) -> list[str]:
    """``--cases`` as a list; one line naming the known cases for an unknown one."""
    cases = program.split_list(args.cases)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise UserError(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    return cases


def load_case(case: str, args) -> tuple[Any, dict[str, Any]]:
    """The model and its facts for one of :data:`CASES`, shaped by ``args`` (:func:`add_case_args`)."""
    if case == "tiny-sd3":
        return tiny_sd3_case()
    return sd3_medium_width_case(args.sd3_blocks, args.sd3_latent, args.sd3_text, args.sd3_batch)


def timing(args) -> dict[str, Any]:
    """The timing settings a report records (:func:`add_case_args`)."""
    return {"runs": args.runs, "warmup": args.warmup, "min_time": args.min_time}


def host(threads: int | None) -> dict[str, Any]:
    """The CPU the sessions ran on and their thread setting."""
    return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "ort_threads": threads or "default"}


def main(argv: list[str] | None = None) -> int:
    ap = program.parser("export_latency", __doc__)
    add_case_args(ap, sd3_blocks=3)
    return program.run(ap, argv, run)


def run(args) -> int:
    import onnxruntime as ort

    cases = selected_cases(args)
    program.check_out(args.out / "export_latency.json")
    results = []
    with tempfile.TemporaryDirectory(prefix="export-latency-") as tmp:
        for case in cases:
            model, info = load_case(case, args)
            results.append(bench_case(case, model, info, args.ratio, args.runs, args.warmup, Path(tmp), args.threads, args.min_time))
            del model
    report = {
        "benchmark": "export_latency",
        **timing(args),
        "machine": host(args.threads),
        "versions": library_versions(("torch", "diffusers", "onnx", "onnxruntime")) | {"ort_build": ort.get_device()},
        "cases": results,
    }
    program.write(args.out / "export_latency.json", report, to_markdown(report))
    log.info("\n%s", to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
