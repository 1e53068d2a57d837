"""Parameter and FLOP accounting for transformers, independent of ONNX (a cross-check for the exported graph).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a ``meta``-device replica (no memory,
no compute), so any model size is cheap. "GEMM FLOPs" are matrix products: linear layers and the attention's
``Q K^T`` / ``P V``; the patch-embedding convolution is reported apart. One denoising step runs the
transformer once at the per-step batch (2 with classifier-free guidance).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from export.surgery import block_shapes, cut_to_shapes
from families import adapter_for

_GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "_scaled_dot_product", "scaled_dot_product")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total": ..., "transformer_blocks": ...}`` parameter counts (blocks: every block list of the family)."""
    total = sum(p.numel() for p in model.parameters())
    prefixes = tuple(f"{a}." for a in adapter_for(model).block_lists)
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
    return {"total": int(total), "transformer_blocks": int(blocks)}


def meta_replica(model: nn.Module) -> nn.Module:
    """The same architecture and block shapes as ``model`` on the ``meta`` device (weights not copied)."""
    with torch.device("meta"):
        replica = type(model).from_config(model.config)
    cut_to_shapes(replica, block_shapes(model))
    return replica.eval()


def _count(model: nn.Module, batch: int, latent_hw: tuple[int, int], text_seq_len: int):
    """Run ``model``'s family ONNX wrapper once on a meta-device replica under ``FlopCounterMode``; returns
    ``(counter, wrapper, replica)``."""
    from torch.utils.flop_counter import FlopCounterMode

    replica = meta_replica(model)
    adapter = adapter_for(model)
    with torch.device("meta"):
        args = tuple(adapter.transformer_inputs(model, batch, latent_hw, text_seq_len, device="meta").values())
        wrapper = adapter.transformer_for_onnx(replica)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        wrapper(*args)
    return counter, wrapper, replica


def transformer_flops(model: nn.Module, batch: int, latent_hw: tuple[int, int], text_seq_len: int) -> dict[str, Any]:
    """FLOPs of one transformer call at ``batch`` (2 x multiply-adds), by aten op, from a meta-device run.

    Returns ``{"gemm": int, "conv": int, "total": int, "by_op": {op: int}}``.
    """
    counter, _, _ = _count(model, batch, latent_hw, text_seq_len)
    by_op = {str(k).removeprefix("aten."): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    gemm = sum(v for k, v in by_op.items() if k.startswith(_GEMM_OPS))
    conv = sum(v for k, v in by_op.items() if "conv" in k)
    return {"gemm": gemm, "conv": conv, "total": int(counter.get_total_flops()), "by_op": by_op}


def linear_flops(model: nn.Module, batch: int, latent_hw: tuple[int, int], text_seq_len: int) -> tuple[int, dict[str, int]]:
    """``(gemm FLOPs of one call, {linear name: FLOPs})`` at ``batch`` and the given shapes (meta-device run).

    Linear names are the module names inside the transformer (``transformer_blocks.0.attn.to_q``).
    """
    counter, wrapper, replica = _count(model, batch, latent_hw, text_seq_len)
    counts = counter.get_flop_counts()
    gemm = sum(int(v) for k, v in counts["Global"].items() if str(k).removeprefix("aten.").startswith(_GEMM_OPS))
    prefix = f"{type(wrapper).__name__}.model."
    linears = {n for n, m in replica.named_modules() if isinstance(m, nn.Linear)}
    per = {k[len(prefix):]: int(sum(v.values())) for k, v in counts.items() if k.startswith(prefix) and k[len(prefix):] in linears}
    return gemm, per


def amdahl_bound(share: float, factor: float = 2.0) -> float:
    """Best speedup when a ``share`` of the work runs ``factor`` times faster and the rest does not."""
    return 1.0 / ((1.0 - share) + share / factor)


def shape_table(
    dense: nn.Module,
    shapes_px: list[tuple[int, int]],
    *,
    vae_scale: int,
    batch: int,
    text_seq_len: int,
    eligible: set[str],
    compact: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Per served shape (pixels): the transformer's GEMM FLOPs per denoising step, the share in GEMMs that
    2:4 can accelerate (constant-weight block linears, ``eligible``: the layers stage 1 prunes), the Amdahl
    bound on the transformer's 2:4 speedup with those GEMMs at most 2x faster (the rest, attention's
    activation x activation products, modulations, embedders and the final projection, unchanged), and, with
    ``compact`` (a structured plan's cut model), its FLOP ratio and the FLOP-based bound ``dense / compact``.
    """
    rows = []
    for h, w in shapes_px:
        latent = (h // vae_scale, w // vae_scale)
        gemm, per = linear_flops(dense, batch, latent, text_seq_len)
        elig = sum(v for k, v in per.items() if k in eligible)
        share = elig / gemm if gemm else 0.0
        row: dict[str, Any] = {
            "height": h, "width": w, "latent": list(latent), "batch": batch,
            "gemm_flops": gemm, "eligible_2of4_flops": elig, "eligible_2of4_share": share,
            "bound_2of4_transformer": amdahl_bound(share),
        }
        if compact is not None:
            cg = linear_flops(compact, batch, latent, text_seq_len)[0]
            row.update(structured_gemm_flops=cg, structured_flop_ratio=cg / gemm, bound_structured_transformer=gemm / cg)
        rows.append(row)
    return rows
