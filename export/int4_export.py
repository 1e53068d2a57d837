"""Stage 2's INT4 transformer for ONNX Runtime (``export --precision int4``): the compact checkpoint and the float32
ONNX as a float export writes them, then every layer stage 1 quantized to 4 bits as ``com.microsoft.MatMulNBits``
with its solved codes and scales (:mod:`export.matmul_nbits`; nothing is re-quantized), ``accuracy_level`` 4 (INT8
activations: W4A8), checked in ONNX Runtime against the torch model with the same integer weights
(:mod:`export.int4_parity`), and the report's ``quantization`` entry. Needs a ``prune --weight-bits 4`` directory
(:func:`check_int4_export`). What runs where, and the measured speed: ``docs/low-precision.md``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.errors import CheckFailed, UserError
from common.memory import log_memory, release_to_os

if TYPE_CHECKING:
    from export.stage import ExportSettings

log = logging.getLogger(__name__)

# The ``accuracy_level`` the export writes: 4 quantizes each activation row to INT8 per block (the W4A8 setting of
# Q-Sched); 0 would dequantize the weights and compute in float32.
ACCURACY_LEVEL = 4
BITS = 4
NM_NOTE = "stores the {pattern} pattern and 4-bit codes, runs dense 4-bit (no runtime here has a {pattern} x 4-bit kernel)"


def check_int4_export(pruned: Path | None, components, *, read_plan: bool = True, precision: str = "int4") -> dict[str, Any] | None:
    """One line naming the prune to run when an INT4 export cannot be made: no ``--pruned``, no transformer in
    ``components``, or (``read_plan``; ``make engine`` checks before stage 1 has written it) a plan whose weights are
    float or not 4-bit. ``precision``: the export's (``int4``, or ``w4a16``: :mod:`export.int4_qdq`), for the message.
    Returns the plan's ``weight_quant`` (None when not read)."""
    from obsdiff.plan import PrunePlan

    fix = "prune with --weight-bits 4 (e.g. `python -m pipeline prune --sparsity dense --weight-bits 4 --out DIR`, or 2:4 / structured:<r>) and pass that directory"
    if "transformer" not in components:
        raise UserError(f"--precision {precision} exports the transformer's 4-bit weights; include transformer in --components")
    if pruned is None:
        raise UserError(f"--precision {precision} exports the 4-bit weights stage 1 solved, and no --pruned was given: {fix}")
    if not read_plan:
        return None
    wq = PrunePlan.load(Path(pruned) / "plan.json").weight_quant or {}
    if not wq:
        raise UserError(f"--pruned {pruned} holds float weights (a prune without --weight-bits): {fix}")
    if int(wq.get("bits", 0)) != BITS:
        raise UserError(f"--pruned {pruned} holds {wq.get('bits')}-bit weights; --precision {precision} needs 4-bit ones: {fix}")
    return wq


def export_int4_transformer(spec, plan, holder: list, batches, settings: ExportSettings, out: Path, path: Path,
                            report: dict[str, Any]) -> dict[str, Any]:
    """Surgery and the compact checkpoint, the torch references on the parity inputs (float32 and INT8 activations),
    the float32 ONNX and its graph checks, then the ``MatMulNBits`` pass and the parity check in ONNX Runtime.

    Peak memory: as a float32 export (the transformer, then the graph and one weight at a time), plus the codes of the
    quantized layers packed (half a byte a weight) and the parity cases' outputs.
    """
    from export.compact_export import save_compact_transformer
    from export.float_export import _export
    from export.int4_parity import int4_parity, int8_activations
    from export.int_weights import int_layers, layer_codes
    from export.matmul_nbits import pack_codes, to_matmul_nbits
    from export.onnx_files import onnx_size
    from export.parity import attention_heads, attention_tokens, plan_parity_memory
    from export.transformer_checks import transformer_onnx_checks
    from families.components import find_component
    from obsdiff.patterns import parse_sparsity

    t0 = time.perf_counter()
    served = settings.served
    save_compact_transformer(spec, plan, holder, batches, out, report, served)
    compact = holder.pop()
    shapes = spec.shapes
    latent_hw = (shapes.latent_height, shapes.latent_width)
    comp = find_component(spec.adapter, "transformer")
    layers = int_layers(compact)
    expected = {n for n, e in plan.layers.items() if e.get("weight_bits")}
    if not layers or set(layers) != expected:
        raise CheckFailed(f"the compact transformer carries integer weights for {len(layers)} layers, the plan quantized {len(expected)}")
    grid = None
    packed = {}
    for name, layer in layers.items():
        codes, scales, grid = layer_codes(layer)
        packed[name] = pack_codes(codes, scales, grid.group_size, grid.bits)
    heads = attention_heads(compact)
    if batches and heads:  # the check runs at the export shape: one line now if it cannot
        plan_parity_memory("transformer (INT4)", {str(b): (int(b), attention_tokens(compact, spec.adapter, latent_hw, shapes.text_seq_len))
                                                  for b in batches}, heads)
    wrapper = comp.wrapper(compact)
    make = comp.example_inputs(compact, latent_hw=latent_hw, seq_len=shapes.text_seq_len)
    feeds, ref_fp32, ref_a8 = {}, {}, {}
    with torch.no_grad():  # the torch side, before the export gives the weights up
        for b in batches:
            inputs = make(int(b), torch.float32)
            args = [inputs[n] for n in wrapper.input_names]
            feeds[str(b)] = {k: v.numpy() for k, v in inputs.items()}
            ref_fp32[str(b)] = wrapper(*args).float().numpy()
            with int8_activations(layers, grid.group_size):
                ref_a8[str(b)] = wrapper(*args).float().numpy()
    del layers, wrapper
    res, _ = _export(comp, compact, path, "fp32", (), served, seq_len=shapes.text_seq_len, latent_hw=latent_hw, adapter=spec.adapter)
    report["transformer"].update(transformer_onnx_checks(path, compact, plan, shapes, shapes.batch_opt, settings.polygraphy, res))
    del compact
    release_to_os()
    log_memory("export: torch transformer freed", log)
    float_bytes = res["bytes"]
    replaced = to_matmul_nbits(path, packed, accuracy_level=ACCURACY_LEVEL)
    del packed
    res.update(bytes=onnx_size(path), float_bytes=float_bytes, precision="int4")
    if batches:
        parity = int4_parity(path, feeds, list(res["outputs"])[0], ref_fp32, ref_a8)
        res["parity"] = parity
        if not parity["ok"]:
            raise CheckFailed(f"transformer: the INT4 (MatMulNBits) ONNX in ONNX Runtime against the torch model with the same integer weights: {parity['why']}")
        log.info("transformer: INT4 ONNX Runtime vs torch (same integer weights): accuracy_level 0 max rel. error %.1e (tolerance %.0e); "
                 "accuracy_level 4 moves the output %.2fx as far as torch's W4A8 model does (median; expected %.1f..%.1f)",
                 parity["level0_max_rel_error"], parity["level0_tolerance"], parity["level4_median_effect_ratio"], *parity["level4_effect_range"])
    else:
        res["parity"] = {"skipped": "--parity-batches '': no parity check asked for"}
    pattern = parse_sparsity(plan.sparsity)
    report["quantization"] = {
        "precision": "int4",
        "format": "com.microsoft MatMulNBits (ONNX Runtime)",
        "bits": grid.bits,
        "block_size": grid.group_size,
        "accuracy_level": ACCURACY_LEVEL,
        "activations": "INT8 per block of block_size along K (W4A8)",
        "weights": f"stage 1's codes and scales ({plan.weight_quant.get('method', 'obs')}), packed as they are: never re-quantized",
        "quantized_layers": sorted(replaced),
        "replaced": replaced,
        "float_gemm_weights": "the layers stage 1 did not quantize stay float32 MatMul/Gemm (embeddings, AdaLN modulations, the output projection)",
        "transformer_onnx_bytes": res["bytes"],
        "transformer_float_onnx_bytes": float_bytes,
        "nm_note": NM_NOTE.format(pattern=str(pattern)) if pattern.is_semi_structured else None,
        "parity": res["parity"],
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    log.info("transformer: %d layers INT4 MatMulNBits (block %d, accuracy_level %d); ONNX %.1f MiB (float32: %.1f MiB)%s", len(replaced), grid.group_size,
             ACCURACY_LEVEL, res["bytes"] / 2**20, float_bytes / 2**20, "; " + report["quantization"]["nm_note"] if report["quantization"]["nm_note"] else "")
    release_to_os()
    return res
