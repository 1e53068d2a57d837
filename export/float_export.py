"""Stage 2's float export of each component: the transformer (after the compact checkpoint, with its graph
checks and engine profiles) and the text encoders and VAE decoder (each loaded alone in its export
precision), each followed by its ONNX Runtime parity check once the torch module is freed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from common.dtypes import precision_dtype
from common.errors import CheckFailed
from common.memory import log_memory, release_to_os
from export.compact_export import save_compact_transformer
from export.dynamo_export import export_component
from export.parity import attention_heads, attention_tokens, plan_parity_shapes
from export.transformer_checks import transformer_onnx_checks
from families.components import Component, find_component

if TYPE_CHECKING:
    from export.stage import ExportSettings
    from families.shapes import ServedShapes

log = logging.getLogger(__name__)


def export_float_transformer(spec, plan, holder: list, batches, settings: ExportSettings, out: Path, path: Path, report: dict[str, Any],
                             graph_pass: Callable[[Path], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Surgery, compact checkpoint, ONNX, 2:4 checks, then ONNX Runtime parity after the torch model is freed.

    graph_pass: rewrites the written ONNX before its checks and parity (the INT4 ``DequantizeLinear`` weights of
    :mod:`export.int4_qdq`); what it returns goes into the component's result, and the graph is checked as a
    quantized one (its GEMM weights read through their ``DequantizeLinear``).

    Peak memory: the transformer in the export precision (loaded straight in it), plus the graph and one
    tensor at a time while the ONNX is post-processed and checked, or ONNX Runtime's copy during parity.
    """
    served = settings.served
    save_compact_transformer(spec, plan, holder, batches, out, report, served)
    compact = holder.pop()
    shapes = spec.shapes
    comp = find_component(spec.adapter, "transformer")
    res, parity_ref = _export(comp, compact, path, settings.precision, batches, served, seq_len=shapes.text_seq_len,
                              latent_hw=(shapes.latent_height, shapes.latent_width), adapter=spec.adapter, parity_memory=settings.parity_memory)
    if graph_pass is not None:
        res.update(graph_pass(path))
    report["transformer"].update(transformer_onnx_checks(path, compact, plan, shapes, shapes.batch_opt, settings.polygraphy, res,
                                                         quantized=graph_pass is not None))
    del compact
    release_to_os()
    log_memory("export: torch transformer freed", log)
    _check_parity("transformer", res, parity_ref)
    return res


def export_other_component(spec, name: str, precision: str, batches, path: Path, served: ServedShapes, parity_memory: int | None = None) -> dict[str, Any]:
    """Export a text encoder or the VAE decoder, loaded by itself in the precision it is exported in.

    precision ``int8``/``int4`` (weight-only, :mod:`export.encoder_quant`): a text encoder is exported in float32,
    checked against torch, then its linear layers quantized and checked against that float ONNX; the VAE decoder
    stays float32."""
    from export.encoder_quant import weight_only_encoder, weight_only_for
    from families.registry import load_component

    comp = find_component(spec.adapter, name)
    recipe = weight_only_for(precision)
    precision = "fp32" if recipe is not None else precision
    shapes = spec.shapes
    module = load_component(spec, comp.attr, dtype=_export_dtype(comp, precision))
    res, parity_ref = _export(comp, module, path, precision, batches, served, seq_len=comp.sequence_length(spec),
                              latent_hw=(shapes.latent_height, shapes.latent_width), adapter=spec.adapter, parity_memory=parity_memory)
    del module
    _check_parity(name, res, parity_ref)
    if recipe is not None and comp.weight_only:
        res = weight_only_encoder(spec, comp, path, recipe, res, check=bool(batches))
    return res


def _export(comp: Component, module, path: Path, precision: str, batches, served: ServedShapes, *, seq_len, latent_hw, adapter=None,
            parity_memory: int | None = None):
    """:func:`export.dynamo_export.export_component` of ``module`` (given up: converted in place) as the family's
    component ``comp`` describes it; a component whose shapes follow the resolution gets dynamic spatial axes,
    parity at every served latent shape that fits the check's memory cap (else at a smaller one, see
    :func:`export.parity.plan_parity_shapes`; the exported range then reaches down to it) and its engine profiles."""
    wrapper = comp.wrapper(module)
    make = comp.example_inputs(module, latent_hw=latent_hw, seq_len=seq_len)
    spatial: dict[str, Any] = {}
    reduced: dict[str, Any] = {}
    if comp.spatial:
        latent_min, latent_max = served.latent_min, served.latent_max
        cases = {str(b): (int(b), tuple(latent_hw)) for b in batches or ()}
        cases.update({f"1@{h}x{w}": (1, (h, w)) for h, w in (served.other_latents if batches else ())})
        heads = attention_heads(module)
        if cases and adapter is not None and heads:  # one line now, not an out-of-memory kill after the export
            config = dict(getattr(module, "config", {}) or {})
            step = max(2, adapter.latent_patch(config)) if comp.kind == "transformer" else 2
            weight_bytes = sum(p.numel() for p in module.parameters()) * torch.finfo(_export_dtype(comp, precision)).bits // 8
            cases, reduced = plan_parity_shapes(comp.name, cases, heads, lambda hw: attention_tokens(module, adapter, hw, seq_len),
                                                weight_bytes=weight_bytes, step=step, memory=parity_memory)
            lows = [hw for _, hw in cases.values()]
            latent_min = (min(latent_min[0], *(h for h, _ in lows)), min(latent_min[1], *(w for _, w in lows)))
        spatial = {"dynamic_shapes": comp.dynamic_shapes(module, latent_min, latent_max),
                   "parity_cases": {k: (b, None if tuple(hw) == tuple(latent_hw) and "@" not in k else hw) for k, (b, hw) in cases.items()}}
    res, parity_ref = export_component(comp.name, wrapper, make, path, precision=precision, parity_batches=batches, keep_fp32=comp.keep_fp32,
                                       in_place=True, **spatial)
    if reduced:
        res["parity_reduced"] = reduced
    if comp.spatial:
        res["profiles"] = served.profiles(lambda b, hw: comp.input_shapes(module, b, hw, served.text_seq_len))
    return res, parity_ref


def _export_dtype(comp: Component, precision: str) -> torch.dtype:
    return torch.float32 if comp.keep_fp32 else precision_dtype(precision)


def _check_parity(name: str, res: dict[str, Any], parity_ref) -> None:
    """Run the ONNX Runtime side of the parity check (the torch module is freed by now) into ``res``."""
    if parity_ref is not None:
        parity = parity_ref.check(name)
        res["parity"] = parity.to_dict()
        if not parity.ok:
            raise CheckFailed(f"{name}: the ONNX in ONNX Runtime differs from torch: {parity.summary()}")
    else:
        res["parity"] = {"skipped": "--parity-batches '': no parity check asked for"}
