"""ONNX Runtime (CPU) latency of INT8 (Q/DQ) and INT4 (``MatMulNBits``, W4A8) vs float32 SD3 transformers: dense,
2:4 and structured.

For each case, three float transformers are built: dense; 2:4 (magnitude, along K, on the layers stage 1 prunes:
the adapter's unit layers); structured (``--ratio`` of the heads and FFN neurons of every block removed, the
first ones kept: latency does not depend on which). The layers stage 1 would quantize are rounded to the 4-bit
grid (round to nearest, group 128: the codes a ``prune --weight-bits 4`` stores, whose values latency does not
depend on). Each is exported as float32 ONNX, as INT8 Q/DQ ONNX (:mod:`export.quantize`, :mod:`export.qdq_export`:
ModelOpt max calibration, weights folded into INT8 constants) and as INT4 ONNX (the float32 ONNX with those layers
in ``MatMulNBits``, ``accuracy_level`` 4, :mod:`export.matmul_nbits`, as ``export --precision int4`` writes it), and
the nine sessions are timed in one process, interleaved (the order rotates every round), after warm-up. Reported
per variant: the median latency, the INT8/fp32, INT4/fp32 and INT4/INT8 ratios (medians over rounds of the two
measured in the same round), and each against the dense float32 transformer.

Calibration: two random input batches (the same numerics as real-sampler calibration; only the scales differ,
which does not change the work). Cases:

- ``tiny-sd3``: the embedded model's transformer at its registry shapes (batch 2 = one CFG step);
- ``sd3-medium-width``: a random ``SD3Transformer2DModel`` with SD3-medium's width (24 heads x 64 = 1536,
  joint_attention_dim 4096, pooled 2048, 16 latent channels) and ``--sd3-blocks`` blocks, at a latent of
  ``--sd3-latent`` and ``--sd3-text`` text tokens (as :mod:`benchmarks.export_latency`).

What to expect on a CPU: ONNX Runtime runs an INT8 GEMM (``DequantizeLinear`` on both inputs of a MatMul) as an
integer GEMM (``MatMulIntegerToFloat``, VNNI/AMX where the CPU has them) with a quantize of the activation in
front; INT4 ``MatMulNBits`` at ``accuracy_level`` 4 quantizes each activation row to INT8 per block and runs an
integer dot product with the unpacked 4-bit weights. The 2:4 zeros are multiplied like any other weight (no speedup
from 2:4 here, in any precision).

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
PRECISIONS = ("fp32", "int8", "int4")
INT4_GROUP = 128


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


def round_to_int4(model) -> dict[str, Any]:
    """Round the weights of the layers stage 1 quantizes (the adapter's unit layers) to the 4-bit grid in place
    (:func:`obsdiff.weight_quant.rtn_quantize`, group :data:`INT4_GROUP`; zeros stay zero); returns each layer's codes
    packed for ``MatMulNBits`` (:func:`export.matmul_nbits.pack_codes`)."""
    import torch

    from export.matmul_nbits import pack_codes
    from obsdiff.packages import build_units
    from obsdiff.weight_quant import WeightQuant, codes_of, rtn_quantize

    wq = WeightQuant(4, INT4_GROUP, "rtn")
    packed = {}
    with torch.no_grad():
        for name in sorted({n for u in build_units(model) for n in u.layers}):
            layer = model.get_submodule(name)
            w, scales = rtn_quantize(layer.weight, wq)
            layer.weight.copy_(w)
            packed[name] = pack_codes(codes_of(w, scales, wq), scales, INT4_GROUP)
    return packed


def int4_copy(fp32: Path, packed: dict[str, Any], path: Path) -> Path:
    """The float32 ONNX ``fp32`` copied to ``path`` with ``packed``'s layers in ``MatMulNBits`` (``accuracy_level`` 4)."""
    import shutil

    from export.int4_export import ACCURACY_LEVEL
    from export.matmul_nbits import to_matmul_nbits

    shutil.copy(fp32, path)
    if fp32.with_name(fp32.name + ".data").exists():  # external data: the copy reads it under its own name
        shutil.copy(fp32.with_name(fp32.name + ".data"), path.with_name(path.name + ".data"))
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = path.name + ".data"
        onnx.save(model, str(path))
    to_matmul_nbits(path, packed, accuracy_level=ACCURACY_LEVEL)
    return path


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
    """Build, export and time the nine variants of one case; returns its JSON entry."""
    latent_hw, text, batch = info["latent_hw"], info["text_seq_len"], info["batch"]
    result: dict[str, Any] = {"case": name, **info, "ratio": ratio, "variants": {}}
    sessions, feeds = {}, {}
    dense_flops = transformer_flops(model, batch, latent_hw, text)["gemm"]
    models = variants(model, name, ratio)
    for sp in list(models):
        m = models.pop(sp)  # each torch model freed once exported (its sessions stay)
        t0 = time.perf_counter()
        tag = f"{name}-{sp.replace(':', '-')}"
        packed = round_to_int4(m)
        paths = export_pair(m, info, workdir, tag)
        paths["int4"] = int4_copy(paths["fp32"], packed, workdir / f"{tag}-int4.onnx")
        del packed
        inputs = {k: v.numpy() for k, v in adapter_for(m).transformer_inputs(m, batch, latent_hw, text, seed=1).items()}
        gemm = transformer_flops(m, batch, latent_hw, text)["gemm"]
        for prec, path in paths.items():
            key = f"{sp} {prec}"
            sessions[key] = ort_session(path, threads=threads)
            feeds[key] = inputs
            result["variants"][key] = {"sparsity": sp, "precision": prec, "onnx_bytes": onnx_size(path), "gemm_flops": gemm,
                                       "flop_ratio": gemm / dense_flops}
        log.info("%s %s: exported fp32 + int8 + int4 in %.1f s", name, sp, time.perf_counter() - t0)
        del m
    times = time_interleaved(sessions, feeds, runs, warmup, min_time)
    dense = times["dense fp32"]
    for key, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        result["variants"][key].update({"latency_ms_median": 1e3 * med, "latency_ms_iqr": [1e3 * q1, 1e3 * q3], "rounds": len(ts),
                                        "vs_dense_fp32": statistics.median(t / d for t, d in zip(ts, dense))})
    for sp in SPARSITIES:
        fp, i8, i4 = times[f"{sp} fp32"], times[f"{sp} int8"], times[f"{sp} int4"]
        result["variants"][f"{sp} int8"]["int8_vs_fp32"] = statistics.median(a / b for a, b in zip(i8, fp))
        result["variants"][f"{sp} int4"]["int4_vs_fp32"] = statistics.median(a / b for a, b in zip(i4, fp))
        result["variants"][f"{sp} int4"]["int4_vs_int8"] = statistics.median(a / b for a, b in zip(i4, i8))
        log.info("%s %s: latency int8/fp32 %.3f, int4/fp32 %.3f, int4/int8 %.3f", name, sp, result["variants"][f"{sp} int8"]["int8_vs_fp32"],
                 result["variants"][f"{sp} int4"]["int4_vs_fp32"], result["variants"][f"{sp} int4"]["int4_vs_int8"])
    return result


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# ONNX Runtime CPU latency: INT8 (Q/DQ) and INT4 (MatMulNBits, W4A8) vs float32 transformer",
        "",
        f"Machine: {m['processor']} ({m['cpus']} CPUs{', ' + m['isa'] if m.get('isa') else ''}, ORT threads {m['ort_threads']}); "
        f"onnxruntime {report['versions']['onnxruntime']}, torch {report['versions']['torch']}, nvidia-modelopt {report['versions']['nvidia-modelopt']}. "
        f"Nine sessions per case, timed interleaved (order rotating each round) for >= {report['runs']} rounds (more for fast cases, "
        f"~{report['min_time']:g} s of timing) after {report['warmup']} warm-up runs; ratios are medians over rounds of the two latencies "
        "measured in the same round.",
        "",
        "| case | shapes (B, latent, text) | sparsity | GEMM FLOPs vs dense | fp32 ms | INT8 ms | INT4 ms | INT8 / fp32 | INT4 / fp32 | "
        "INT4 / INT8 | INT8 vs dense fp32 | INT4 vs dense fp32 | ONNX MiB fp32 / INT8 / INT4 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["cases"]:
        shp = f"{c['batch']}, {c['latent_hw'][0]}x{c['latent_hw'][1]}, {c['text_seq_len']}"
        for sp in SPARSITIES:
            f, q, w4 = c["variants"][f"{sp} fp32"], c["variants"][f"{sp} int8"], c["variants"][f"{sp} int4"]
            label = sp if sp != "structured" else f"structured:{c['ratio']:g}"
            lines.append(
                f"| {c['case']} | {shp} | {label} | {f['flop_ratio']:.3f} | {f['latency_ms_median']:.2f} | {q['latency_ms_median']:.2f} | "
                f"{w4['latency_ms_median']:.2f} | **{q['int8_vs_fp32']:.3f}** | **{w4['int4_vs_fp32']:.3f}** | {w4['int4_vs_int8']:.3f} | "
                f"{q['vs_dense_fp32']:.3f} | {w4['vs_dense_fp32']:.3f} | "
                f"{f['onnx_bytes'] / 2**20:.1f} / {q['onnx_bytes'] / 2**20:.1f} / {w4['onnx_bytes'] / 2**20:.1f} |"
            )
    lines += ["", "Cases: " + "; ".join(f"{c['case']}: {c['source']}" for c in report["cases"]) + "."]
    lines += ["", "2:4 keeps the dense shapes: ONNX Runtime on a CPU multiplies its zeros like any other weight (sparse tensor cores, "
              "through TensorRT, are what turn 2:4 into time); structured removes heads and neurons (smaller GEMMs everywhere). "
              "INT4 stores the 2:4 pattern and 4-bit codes and runs dense 4-bit (no runtime here has a 2:4 x 4-bit kernel); "
              "its weights are the block linears' (group 128, INT8 activations per block), the rest stays float32."]
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
        "int4": f"the layers stage 1 quantizes, rounded to 4 bits (group {INT4_GROUP}, round to nearest) in every variant; MatMulNBits accuracy_level 4",
        "cases": results,
    }
    program.write(args.out / "quant_latency.json", report, to_markdown(report))
    log.info("\n%s", to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
