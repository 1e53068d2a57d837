"""ONNX Runtime (CPU) latency of INT8 (Q/DQ) vs float32 SD3 transformers: dense, 2:4 and structured.

For each case, three float transformers are built: dense; 2:4 (magnitude, along K, on the layers stage 1 prunes:
the adapter's unit layers); structured (``--ratio`` of the heads and FFN neurons of every block removed, the
first ones kept: latency does not depend on which). Each is exported as float32 ONNX and as INT8 Q/DQ ONNX
(:mod:`export.quantize`, :mod:`export.qdq_export`: ModelOpt max calibration, weights folded into INT8 constants), and the six sessions are
timed in one process, interleaved (the order rotates every round), after warm-up. Reported per variant: the
median latency and the INT8/fp32 ratio (median over rounds of the two measured in the same round), and each
against the dense float32 transformer.

Calibration: two random input batches (the same numerics as real-sampler calibration; only the scales differ,
which does not change the work). Cases:

- ``tiny-sd3``: the embedded model's transformer at its registry shapes (batch 2 = one CFG step);
- ``sd3-medium-width``: a random ``SD3Transformer2DModel`` with SD3-medium's width (24 heads x 64 = 1536,
  joint_attention_dim 4096, pooled 2048, 16 latent channels) and ``--sd3-blocks`` blocks, at a latent of
  ``--sd3-latent`` and ``--sd3-text`` text tokens (as :mod:`benchmarks.export_latency`).

What to expect on a CPU: ONNX Runtime runs an INT8 GEMM (``DequantizeLinear`` on both inputs of a MatMul) as an
integer GEMM (``MatMulIntegerToFloat``, VNNI/AMX where the CPU has them) with a quantize of the activation in
front; the 2:4 zeros are multiplied like any other weight (no speedup from 2:4 here).

Usage: ``python -m benchmarks.quant_latency [--out artifacts/bench] [--runs 10] [--ratio 0.3]``.
Writes ``quant_latency.json`` and ``quant_latency.md``.
"""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import program
from benchmarks.export_latency import add_case_args, host, load_case, selected_cases, time_interleaved, timing
from common.versions import library_versions
from export.dynamo_export import export_module
from export.onnx_files import onnx_size
from export.parity import ort_session
from export.report import transformer_flops
from export.surgery import apply_plan, structured_plan
from families import adapter_for

log = logging.getLogger("benchmarks.quant_latency")

SPARSITIES = ("dense", "2:4", "structured")
PRECISIONS = ("fp32", "int8")


def magnitude_2_4(model) -> list[str]:
    """2:4 by magnitude along K (:func:`obsdiff.baselines.magnitude_prune`) on the layers stage 1 prunes, in
    place; returns their names."""
    from obsdiff.baselines import magnitude_prune_model
    from obsdiff.patterns import parse_sparsity

    return magnitude_prune_model(model, parse_sparsity("2:4"))


def variants(model, name: str, ratio: float) -> dict[str, Any]:
    """``{"dense": model, "2:4": copy, "structured": compact copy}`` (float32)."""
    sparse = copy.deepcopy(model)
    magnitude_2_4(sparse)
    compact = apply_plan(copy.deepcopy(model), structured_plan(model, ratio, model_id=name))
    return {"dense": model, "2:4": sparse, "structured": compact}


def export_pair(model, info: dict[str, Any], workdir: Path, tag: str, calib_batches: int = 2) -> dict[str, Path]:
    """Export ``model`` as float32 ONNX and (a deep copy, fake-quantized with ModelOpt) as INT8 Q/DQ ONNX."""
    from export.qdq_export import export_quantized_onnx
    from export.quantize import quantize_transformer

    adapter = adapter_for(model)
    latent_hw, text = info["latent_hw"], info["text_seq_len"]
    fp32 = workdir / f"{tag}-fp32.onnx"
    export_module(adapter.transformer_for_onnx(model), adapter.transformer_inputs(model, 2, latent_hw, text), fp32)
    quantized = copy.deepcopy(model)
    calib = [adapter.transformer_inputs(quantized, info["batch"], latent_hw, text, seed=100 + i) for i in range(calib_batches)]
    quantize_transformer(quantized, "int8", calib, adapter=adapter)
    int8 = workdir / f"{tag}-int8.onnx"
    export_quantized_onnx(quantized, int8, adapter.transformer_inputs(quantized, 2, latent_hw, text, seed=13), adapter=adapter)
    del quantized
    return {"fp32": fp32, "int8": int8}


def bench_case(name: str, model, info: dict[str, Any], ratio: float, runs: int, warmup: int, workdir: Path, threads: int | None,
               min_time: float = 0.0) -> dict[str, Any]:
    """Build, export and time the six variants of one case; returns its JSON entry."""
    latent_hw, text, batch = info["latent_hw"], info["text_seq_len"], info["batch"]
    result: dict[str, Any] = {"case": name, **info, "ratio": ratio, "variants": {}}
    sessions, feeds = {}, {}
    dense_flops = transformer_flops(model, batch, latent_hw, text)["gemm"]
    for sp, m in variants(model, name, ratio).items():
        t0 = time.perf_counter()
        paths = export_pair(m, info, workdir, f"{name}-{sp.replace(':', '-')}")
        inputs = {k: v.numpy() for k, v in adapter_for(m).transformer_inputs(m, batch, latent_hw, text, seed=1).items()}
        gemm = transformer_flops(m, batch, latent_hw, text)["gemm"]
        for prec, path in paths.items():
            key = f"{sp} {prec}"
            sessions[key] = ort_session(path, threads=threads)
            feeds[key] = inputs
            result["variants"][key] = {"sparsity": sp, "precision": prec, "onnx_bytes": onnx_size(path), "gemm_flops": gemm,
                                       "flop_ratio": gemm / dense_flops}
        log.info("%s %s: exported fp32 + int8 in %.1f s", name, sp, time.perf_counter() - t0)
        del m
    times = time_interleaved(sessions, feeds, runs, warmup, min_time)
    dense = times["dense fp32"]
    for key, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        result["variants"][key].update({"latency_ms_median": 1e3 * med, "latency_ms_iqr": [1e3 * q1, 1e3 * q3], "rounds": len(ts),
                                        "vs_dense_fp32": statistics.median(t / d for t, d in zip(ts, dense))})
    for sp in SPARSITIES:
        fp, i8 = times[f"{sp} fp32"], times[f"{sp} int8"]
        result["variants"][f"{sp} int8"]["int8_vs_fp32"] = statistics.median(a / b for a, b in zip(i8, fp))
        log.info("%s %s: int8/fp32 latency %.3f", name, sp, result["variants"][f"{sp} int8"]["int8_vs_fp32"])
    return result


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# ONNX Runtime CPU latency: INT8 (Q/DQ) vs float32 transformer",
        "",
        f"Machine: {m['processor']} ({m['cpus']} CPUs{', ' + m['isa'] if m.get('isa') else ''}, ORT threads {m['ort_threads']}); "
        f"onnxruntime {report['versions']['onnxruntime']}, torch {report['versions']['torch']}, nvidia-modelopt {report['versions']['nvidia-modelopt']}. "
        f"Six sessions per case, timed interleaved (order rotating each round) for >= {report['runs']} rounds (more for fast cases, "
        f"~{report['min_time']:g} s of timing) after {report['warmup']} warm-up runs; ratios are medians over rounds of the two latencies "
        "measured in the same round.",
        "",
        "| case | shapes (B, latent, text) | sparsity | GEMM FLOPs vs dense | fp32 ms | INT8 ms | INT8 / fp32 | fp32 vs dense fp32 | INT8 vs dense fp32 | ONNX MiB fp32 / INT8 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["cases"]:
        shp = f"{c['batch']}, {c['latent_hw'][0]}x{c['latent_hw'][1]}, {c['text_seq_len']}"
        for sp in SPARSITIES:
            f, q = c["variants"][f"{sp} fp32"], c["variants"][f"{sp} int8"]
            label = sp if sp != "structured" else f"structured:{c['ratio']:g}"
            lines.append(
                f"| {c['case']} | {shp} | {label} | {f['flop_ratio']:.3f} | {f['latency_ms_median']:.2f} | {q['latency_ms_median']:.2f} | "
                f"**{q['int8_vs_fp32']:.3f}** | {f['vs_dense_fp32']:.3f} | {q['vs_dense_fp32']:.3f} | "
                f"{f['onnx_bytes'] / 2**20:.1f} / {q['onnx_bytes'] / 2**20:.1f} |"
            )
    lines += ["", "Cases: " + "; ".join(f"{c['case']}: {c['source']}" for c in report["cases"]) + "."]
    lines += ["", "2:4 keeps the dense shapes: ONNX Runtime on a CPU multiplies its zeros like any other weight (sparse tensor cores, "
              "through TensorRT, are what turn 2:4 into time); structured removes heads and neurons (smaller GEMMs everywhere)."]
    return "\n".join(lines) + "\n"


def _isa() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ""
    return ", ".join(f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags)


def main(argv: list[str] | None = None) -> int:
    ap = program.parser("quant_latency", __doc__)
    add_case_args(ap, sd3_blocks=2)
    return program.run(ap, argv, run)


def run(args) -> int:
    for name in ("modelopt", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)

    import onnxruntime as ort

    cases = selected_cases(args)
    results = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quant-latency-") as tmp:
        for case in cases:
            model, info = load_case(case, args)
            info["latent_hw"] = list(info["latent_hw"])
            results.append(bench_case(case, model, info, args.ratio, args.runs, args.warmup, Path(tmp), args.threads, args.min_time))
            del model
    report = {
        "benchmark": "quant_latency",
        **timing(args),
        "elapsed_s": round(time.perf_counter() - t_all, 1),
        "machine": {**host(args.threads), "isa": _isa()},
        "versions": library_versions(("torch", "diffusers", "onnx", "onnxruntime", "nvidia-modelopt")) | {"ort_build": ort.get_device()},
        "calibration": "2 random input batches per model (max calibration; ModelOpt INT8: weights per output channel, activations per tensor)",
        "cases": results,
    }
    program.write(args.out / "quant_latency.json", report, to_markdown(report))
    log.info("\n%s", to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
