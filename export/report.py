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


def transformer_flops(model: nn.Module, batch: int, latent_hw: tuple[int, int], text_seq_len: int) -> dict[str, Any]:
    """FLOPs of one transformer call at ``batch`` (2 x multiply-adds), by aten op, from a meta-device run.

    Returns ``{"gemm": int, "conv": int, "total": int, "by_op": {op: int}}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    replica = meta_replica(model)
    adapter = adapter_for(model)
    with torch.device("meta"):
        args = tuple(adapter.transformer_inputs(model, batch, latent_hw, text_seq_len, device="meta").values())
        wrapper = adapter.transformer_for_onnx(replica)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        wrapper(*args)
    by_op = {str(k).removeprefix("aten."): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    gemm = sum(v for k, v in by_op.items() if k.startswith(_GEMM_OPS))
    conv = sum(v for k, v in by_op.items() if "conv" in k)
    return {"gemm": gemm, "conv": conv, "total": int(counter.get_total_flops()), "by_op": by_op}
