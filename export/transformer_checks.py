"""Checks of an exported transformer graph: every block linear is a MatMul/Gemm with a constant weight named
after it (read through its DequantizeLinear in a quantized graph), the N:M pattern of the pruned layers
along K, the GEMM FLOPs against torch's count, and the polygraphy cross-check."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import CheckFailed, UserError

log = logging.getLogger(__name__)


def linear_weight_layout(model) -> dict[str, dict[str, Any]]:
    """For every MatMul/Gemm whose weight (input B) is a constant initializer: ``{init name: {node, op, k_axis, shape}}``.

    MatMul ``Y = X @ W`` with ``W`` ``[K, N]`` -> K is axis 0; Gemm with ``transB=1`` -> ``W`` is ``[N, K]``, axis 1.
    """
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        if len(t.dims) != 2:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
        out[t.name] = {"node": node.name, "op": node.op_type, "k_axis": 1 if trans_b else 0, "shape": list(t.dims)}
    return out


def missing_linear_weights(model, torch_module: nn.Module, prefix: str | tuple[str, ...] | None = None) -> list[str]:
    """Names of ``nn.Linear`` layers under ``prefix`` (default: the family's block lists) with no MatMul/Gemm
    constant weight of that name in ``model``.

    Empty means every such linear became a GEMM with a constant initializer (sparse tactics are eligible).
    """
    if prefix is None:
        from families import adapter_for

        prefix = tuple(f"{a}." for a in adapter_for(torch_module).block_lists)
    have = set(linear_weight_layout(model))
    want = [f"{n}.weight" for n, m in torch_module.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]
    return [w for w in want if w not in have]


def transformer_onnx_checks(path: Path, compact, plan, shapes, step_batch: int, polygraphy: str, res: dict, *, quantized: bool = False) -> dict[str, Any]:
    """GEMM-weight constness, N:M pattern and FLOP share of the exported transformer (a quantized graph's
    weights are read through their DequantizeLinear)."""
    import onnx

    from export.report import transformer_flops
    from export.sparsity_check import check_onnx_sparsity, cross_check_polygraphy, polygraphy_sparsity, report_to_json
    from obsdiff.patterns import parse_sparsity

    model = onnx.load(str(path), load_external_data=False)  # weights are read one at a time by the checker
    missing = missing_linear_weights(model, compact) if not quantized else []  # quantized: from the GEMM table below
    if missing:
        raise CheckFailed(f"{len(missing)} transformer-block linears are not MatMul/Gemm with a constant weight (e.g. {missing[0]})")
    pattern = parse_sparsity(plan.sparsity) if plan is not None else None
    nm = (pattern.n, pattern.m) if pattern is not None and pattern.is_semi_structured else (2, 4)
    expected = sorted(plan.pruned_layers) if pattern is not None and pattern.is_semi_structured else []
    from families import adapter_for

    in_shapes = adapter_for(compact).transformer_input_shapes(compact, step_batch, (shapes.latent_height, shapes.latent_width), shapes.text_seq_len)
    sp = check_onnx_sparsity(model, nm, input_shapes=in_shapes, expected_layers=expected, base_dir=path.parent)
    if quantized:
        have = {g.weight for g in sp.gemms if g.weight is not None}
        prefix = tuple(f"{a}." for a in adapter_for(compact).block_lists)
        missing = [f"{n}.weight" for n, m in compact.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix) and f"{n}.weight" not in have]
        if missing:
            raise CheckFailed(f"{len(missing)} transformer-block linears are not MatMul/Gemm with a constant (quantized) weight (e.g. {missing[0]})")
    if not sp.ok:
        first = (sp.missing_layers or sp.failed_layers)[0]
        raise UserError(
            f"the pruned transformer is not {sp.pattern} along K in {len(sp.failed_layers)} layer(s) and {len(sp.missing_layers)} "
            f"layer(s) are missing from the ONNX (e.g. {first}); re-run `python -m pipeline prune` so plan.json and transformer/ agree"
        )
    out: dict[str, Any] = {"sparsity_check": report_to_json(sp), "gemm_flops_per_step_onnx": sp.total_flops}
    torch_gemm = transformer_flops(compact, step_batch, (shapes.latent_height, shapes.latent_width), shapes.text_seq_len)["gemm"]
    if torch_gemm != sp.total_flops:
        log.warning("GEMM FLOPs differ between torch (%d) and the ONNX graph (%d)", torch_gemm, sp.total_flops)
    run_pg = polygraphy == "on" or (polygraphy == "auto" and res["bytes"] < 256 * 1024**2)
    if quantized:
        out["polygraphy"] = {"skipped": "polygraphy examines only initializers that feed a GEMM directly; quantized weights sit behind a DequantizeLinear"}
    elif run_pg and sp.pattern == "2:4" and expected:
        try:
            pg = polygraphy_sparsity(path)
            disagree = cross_check_polygraphy(sp, pg)
            out["polygraphy"] = {"tensors_checked": len(pg), "sparse": sum(pg.values()), "disagreements": disagree}
            if disagree:
                raise CheckFailed(f"polygraphy and the 2:4 checker disagree on {disagree[:3]}")
        except (OSError, RuntimeError) as e:
            if polygraphy == "on" or "disagree" in str(e):
                raise
            log.warning("polygraphy cross-check skipped: %s", e)
    return out
