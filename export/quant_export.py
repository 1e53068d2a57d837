"""Stage 2's quantized (INT8 / FP8) transformer export: the compact checkpoint as for a float export, then
calibration inputs recorded on the real sampler, ModelOpt fake quantization, the pruned-zero and N:M checks,
the Q/DQ ONNX with its graph checks, INT8 parity in ONNX Runtime, and the report's ``quantization`` entry."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.errors import CheckFailed
from common.memory import log_memory, release_to_os
from export.calibration import record_calibration_inputs
from export.compact_export import save_compact_transformer
from export.fingerprint import versions
from export.int8_parity import INT8_RMS_RATIO, PARITY_CALLS, int8_parity, onnx_weights, parity_cases, rms_parity
from export.onnx_files import io_spec, onnx_size
from export.parity import attention_heads, attention_tokens, plan_parity_memory
from export.qdq_export import export_quantized_onnx, quantized_op_counts
from export.quantize import check_quantized_zeros, enabled_quantizers, excluded_modules, quantize_transformer
from export.transformer_checks import transformer_onnx_checks
from families.components import find_component

if TYPE_CHECKING:
    from export.stage import ExportSettings

log = logging.getLogger(__name__)


def export_quantized_transformer(spec, plan, holder: list, batches, settings: ExportSettings, out: Path, path: Path, report: dict[str, Any],
                                  calibration: dict[str, Any]) -> dict[str, Any]:
    """Surgery and the (float) compact checkpoint as for a float export, then: record calibration inputs on the
    real sampler with the compact transformer in the pipeline, fake-quantize with ModelOpt, check that every
    pruned zero (and the N:M pattern) survived in torch, export the Q/DQ ONNX, check it (GEMM weights, N:M
    through the DequantizeLinear) and, for INT8, compare it in ONNX Runtime with the fake-quantized model.

    Peak memory: the float32 pipeline with the compact transformer while calibrating, then the transformer and
    the TorchScript exporter's in-memory graph (:mod:`export.qdq_export`'s limits).
    """
    from dataclasses import replace

    from families.registry import load_pipeline
    from obsdiff.patterns import parse_sparsity

    served = settings.served
    save_compact_transformer(spec, plan, holder, batches, out, report, served)
    compact = holder.pop()
    adapter = spec.adapter
    shapes = spec.shapes
    latent_hw = (shapes.latent_height, shapes.latent_width)
    check_int8 = settings.precision == "int8" and bool(batches)
    heads = attention_heads(compact)
    if check_int8 and heads:  # the INT8 check runs real-sampler calls at the served shape: one line now if it cannot
        tokens = attention_tokens(compact, adapter, latent_hw, shapes.text_seq_len)
        plan_parity_memory("transformer (INT8)", {str(b): (int(b), tokens) for b in batches}, heads)
    t0 = time.perf_counter()
    pipe = load_pipeline(spec, transformer=compact)
    at = replace(spec, height=calibration["height"], width=calibration["width"])  # the served resolution
    sampler = dict(steps=calibration["steps"], guidance=calibration["guidance"])
    calib = record_calibration_inputs(pipe, at, calibration["prompts"], calibration["seeds"], max_calls=calibration["max_calls"], **sampler)
    held = record_calibration_inputs(pipe, at, calibration["parity_prompts"], calibration["parity_seeds"], max_calls=PARITY_CALLS,
                                     **sampler) if check_int8 else []
    del pipe  # the other components are not needed any more
    release_to_os()
    record_s = time.perf_counter() - t0
    cases = parity_cases(held, batches)
    wrapper = adapter.transformer_for_onnx(compact)
    names = list(wrapper.input_names)
    with torch.no_grad():  # the float model's outputs: how far quantization itself moves them
        float_out = {label: wrapper(*(inputs[n] for n in names)).float().numpy() for label, inputs in cases.items()}
    quantize_transformer(compact, settings.precision, calib, adapter=adapter)
    n_calls = len(calib)
    del calib
    pattern = parse_sparsity(plan.sparsity) if plan is not None else None
    nm = (pattern.n, pattern.m) if pattern is not None and pattern.is_semi_structured else None
    broken = check_quantized_zeros(compact, nm)
    if broken:
        raise CheckFailed(f"quantization broke the pruned weights of {len(broken)} layer(s): {next(iter(broken.items()))}")
    quant_layers = sorted({q.rsplit(".", 1)[0] for q in enabled_quantizers(compact) if q.endswith("weight_quantizer")})
    log_memory("export: transformer quantized", log)
    t1 = time.perf_counter()
    example = adapter.transformer_inputs(compact, max(2, shapes.batch_opt), latent_hw, shapes.text_seq_len, seed=13)
    export_quantized_onnx(compact, path, example, adapter=adapter)
    res: dict[str, Any] = {"file": path.name, "bytes": onnx_size(path), "precision": settings.precision, "export_s": round(time.perf_counter() - t1, 1)}
    res["inputs"], res["outputs"] = io_spec(path)
    checks = transformer_onnx_checks(path, compact, plan, shapes, shapes.batch_opt, "off", res, quantized=True)
    report["transformer"].update(checks)
    sp = checks["sparsity_check"]
    expected_nm = set(plan.pruned_layers) if nm is not None else set()
    quant_nm = sorted(set(quant_layers) & expected_nm & set(sp["sparse_layers"]))
    comp = find_component(adapter, "transformer")
    res["profiles"] = served.profiles(lambda b, hw: comp.input_shapes(compact, b, hw, served.text_seq_len))
    parity = None
    if check_int8:
        with onnx_weights(compact, path) as weights:
            parity = rms_parity(path, wrapper, cases, float_out)
        parity["weights"] = weights
        parity["random_inputs"] = int8_parity(path, compact, latent_hw=latent_hw, text_seq_len=shapes.text_seq_len, adapter=adapter,
                                              batches=batches).to_dict()
        parity["random_inputs"]["note"] = "informational: random inputs, max over elements (one flipped INT8 step shows; see export.int8_parity.rms_parity)"
        res["parity"] = parity
        if not parity["ok"]:
            log.info("INT8 parity per case: %s", {k: {m: f"{v:.1e}" for m, v in c.items()} for k, c in parity["per_case"].items()})
            raise CheckFailed(f"transformer: the INT8 ONNX in ONNX Runtime against the fake-quantized torch model on {len(cases)} held-out "
                              f"real-sampler inputs: {parity['why']}")
        log.info("transformer: INT8 ONNX Runtime vs fake-quantized torch on %d real-sampler inputs: RMS distance %.2f (median; worst %.2f) of "
                 "the quantization's own (tolerance %.2f); max-rel. error within %.0e in %s cases", len(cases), parity["median_rms_ratio"],
                 parity["worst_rms_ratio"], INT8_RMS_RATIO, parity["int8_tolerance"], parity["cases_within_int8_tolerance"])
    elif settings.precision == "fp8":
        res["parity"] = {"skipped": "ONNX Runtime cannot run TensorRT's FP8 Q/DQ (trt::TRT_FP8QuantizeLinear); "
                                    "TensorRT-RTX builds it for SM89/SM120 GPUs"}
    else:
        res["parity"] = {"skipped": "--parity-batches '': no parity check asked for"}
    report["quantization"] = {
        "precision": settings.precision,
        "tool": "nvidia-modelopt " + versions().get("nvidia-modelopt", "?"),
        "calibration": {**{k: v for k, v in calibration.items() if k != "prompts"}, "prompts": calibration["prompts"],
                        "calls_recorded": n_calls,
                        "record_s": round(record_s, 1)},
        "quantized_layers": quant_layers,
        "excluded_modules": sorted(excluded_modules(compact, adapter.quant_exclude)),
        "quantized_nm_layers": quant_nm,
        "nm_pattern": f"{nm[0]}:{nm[1]}" if nm is not None else None,
        "nm_check": {"ok": sp["ok"], "expected_layers": sp["expected_layers"], "failed_layers": sp["failed_layers"],
                     "missing_layers": sp["missing_layers"], "through": "DequantizeLinear" if settings.precision == "int8" else "TRT_FP8DequantizeLinear"},
        "qdq_nodes": quantized_op_counts(path),
        "parity": parity if parity is not None else res["parity"],
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    log.info("transformer: %d layers %s (%d of them %s), calibrated on %d trajectories", len(quant_layers), settings.precision,
             len(quant_nm), report["quantization"]["nm_pattern"] or "-", calibration["samples"])
    del wrapper, compact
    release_to_os()
    return res
