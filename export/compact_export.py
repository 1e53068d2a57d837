"""Stage 2's compact transformer: cut the pruned heads and neurons out in place (structured plans), check the cut
against the masked model, save and verify ``compact/``, and the FLOP table per served shape for the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.errors import CheckFailed
from common.memory import log_memory, release_to_os

if TYPE_CHECKING:
    from families.shapes import ServedShapes

log = logging.getLogger(__name__)

SURGERY_TOLERANCE = 1e-5


def _transformer_output(model, spec, batch: int = 1):
    """The transformer's output on fixed random inputs at the export shapes, in float32 arithmetic."""
    from export.parity import fp32_compute

    inputs = spec.adapter.transformer_inputs(model, batch, (spec.shapes.latent_height, spec.shapes.latent_width), spec.shapes.text_seq_len, seed=7)
    with torch.no_grad(), fp32_compute(model) as m:
        return spec.adapter.transformer_for_onnx(m)(*inputs.values()).float().numpy()


def save_compact_transformer(spec, plan, holder: list, batches, out: Path, report: dict[str, Any], served: ServedShapes) -> None:
    """Cut the transformer in ``holder[0]`` in place (structured plans), check the cut, save ``compact/``;
    the FLOP table per served shape (2:4-eligible share and bounds) goes to ``report["transformer"]``."""
    from export.checkpoint import save_compact, verify_compact
    from export.parity import rel_error
    from export.report import count_parameters, shape_table, transformer_flops
    from export.surgery import apply_plan
    from obsdiff.packages import build_units
    from obsdiff.patterns import parse_sparsity

    transformer = holder[0]
    shapes = spec.shapes
    latent_hw = (shapes.latent_height, shapes.latent_width)
    step_batch = shapes.batch_opt  # transformer batch per denoising step (2 with classifier-free guidance)
    dense_params = count_parameters(transformer)
    dense_flops = transformer_flops(transformer, step_batch, latent_hw, shapes.text_seq_len)
    # 2:4 can speed up the GEMMs of the layers stage 1 prunes (those of an N:M plan, else all it would prune)
    pattern = parse_sparsity(plan.sparsity) if plan is not None else None
    eligible = set(plan.pruned_layers) if pattern is not None and pattern.is_semi_structured else {n for u in build_units(transformer) for n in u.layers}
    table = shape_table(transformer, served.resolutions, vae_scale=served.vae_scale, batch=step_batch, text_seq_len=served.text_seq_len, eligible=eligible)
    is_cut = plan is not None and any(b.is_cut for b in plan.blocks)
    if is_cut:
        # The masked output is taken first and the cut is made in place: masked and compact never coexist.
        ref = _transformer_output(transformer, spec) if batches else None
        apply_plan(transformer, plan, require_masked=True)
        release_to_os()  # the cut frees the removed rows and columns layer by layer
        surgery: dict[str, Any] = {"tolerance": SURGERY_TOLERANCE}
        if ref is not None:
            err = rel_error(_transformer_output(transformer, spec), ref)
            surgery["max_rel_error"] = err
            if not err <= SURGERY_TOLERANCE:
                raise CheckFailed(f"the compact transformer differs from the masked one: rel. error {err:.2e} > {SURGERY_TOLERANCE:.0e}")
            log.info("surgery: compact vs masked transformer rel. error %.2e (tolerance %.0e)", err, SURGERY_TOLERANCE)
        report["surgery"] = surgery
    elif plan is not None:
        apply_plan(transformer, plan)  # validates the plan against the model; cuts nothing
    save_compact(transformer, out / "compact", plan)
    verify_compact(out / "compact", transformer)
    log_memory("export: compact checkpoint saved and verified", log)
    compact_flops = transformer_flops(transformer, step_batch, latent_hw, shapes.text_seq_len) if is_cut else dense_flops
    if is_cut:
        for row, hw in zip(table, served.resolutions):
            cg = transformer_flops(transformer, step_batch, served.latent(hw), served.text_seq_len)["gemm"]
            row.update(structured_gemm_flops=cg, structured_flop_ratio=cg / row["gemm_flops"], bound_structured_transformer=row["gemm_flops"] / cg)
    report["transformer"] = {
        "params_dense": dense_params,
        "params_compact": count_parameters(transformer),
        "gemm_flops_per_step_dense": dense_flops["gemm"],
        "gemm_flops_per_step": compact_flops["gemm"],
        "flop_ratio": compact_flops["gemm"] / dense_flops["gemm"],
        "compact_bytes": (out / "compact" / "model.safetensors").stat().st_size,
        "compact_dtype": str(next(transformer.parameters()).dtype).removeprefix("torch."),
        "per_shape": table,
    }
