"""Physically remove pruned attention heads and FFN neurons from an ``SD3Transformer2DModel``.

Stage 1 leaves a *masked* transformer: same shapes as the dense one, with the input columns of the output
layers (``to_out.0``, ``to_add_out``, ``ff.net.2``, ``ff_context.net.2``) zeroed for every removed head or
neuron. Those heads and neurons contribute nothing, so cutting them out (rows of ``to_q/to_k/to_v``,
``add_q_proj/add_k_proj/add_v_proj`` and ``net.0.proj``; columns of the output layers) gives the same
function with fewer parameters and FLOPs.

The work is done in small functions that slice one ``nn.Linear`` at a time, followed by an explicit fix-up
of the attention's bookkeeping (``attn.heads`` and the derived dims) and asserted invariants. diffusers'
``JointAttnProcessor2_0`` computes ``head_dim = key.shape[-1] // attn.heads`` at run time, so a stale
``attn.heads`` would silently change the model instead of failing.

The per-head q/k norms (``norm_q``, ``norm_k``, ``norm_added_q``, ``norm_added_k``) act on one head's
``head_dim`` channels with weights shared by all heads; they stay as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from common.errors import UserError
from obsdiff.plan import BlockPlan, PrunePlan

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# nn.Linear slicing (pure: returns new modules, never touches the input)
# --------------------------------------------------------------------------------------------------------


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.requires_grad_(weight.requires_grad)
    return lin


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` keeping output features ``rows`` (weight ``(out, in)`` -> ``(len(rows), in)``)."""
    rows = rows.to(linear.weight.device)
    weight = linear.weight.detach().index_select(0, rows)  # (R, in)
    bias = linear.bias.detach().index_select(0, rows) if linear.bias is not None else None
    return _new_linear(weight, bias)


def keep_cols(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` keeping input features ``cols`` (weight ``(out, in)`` -> ``(out, len(cols))``).

    The bias is unchanged: removed inputs contributed ``W[:, j] * x_j``, never bias.
    """
    cols = cols.to(linear.weight.device)
    weight = linear.weight.detach().index_select(1, cols)  # (out, C)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return _new_linear(weight, bias)


def head_channels(keep_heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Channel indices ``[h*head_dim, (h+1)*head_dim)`` of every kept head, in order (int64)."""
    heads = torch.as_tensor(list(keep_heads), dtype=torch.long)  # (H',)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)  # (H' * head_dim,)


# --------------------------------------------------------------------------------------------------------
# Module-level surgery
# --------------------------------------------------------------------------------------------------------


def attention_head_dim(attn: nn.Module) -> int:
    """Head size of a diffusers ``Attention`` as its processor sees it (``to_k.out_features // heads``)."""
    return attn.to_k.out_features // attn.heads


def cut_attention(attn: nn.Module, keep_heads: Sequence[int]) -> None:
    """Keep only ``keep_heads`` of a diffusers ``Attention`` (in place), then fix its bookkeeping.

    Slices the head rows of ``to_q/to_k/to_v`` and, for joint attention, ``add_q_proj/add_k_proj/add_v_proj``;
    the matching input columns of ``to_out.0`` and (unless ``context_pre_only``) ``to_add_out``.
    Sets ``attn.heads``, ``inner_dim``, ``inner_kv_dim`` and ``sliceable_head_dim``; ``out_dim`` (the output
    width) is unchanged. ``keep_heads`` are indices into the attention's current heads, sorted, unique.
    """
    head_dim = attention_head_dim(attn)
    channels = head_channels(keep_heads, head_dim)
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        lin = getattr(attn, name, None)
        if lin is not None:
            setattr(attn, name, keep_rows(lin, channels))
    attn.to_out[0] = keep_cols(attn.to_out[0], channels)
    if getattr(attn, "to_add_out", None) is not None:
        attn.to_add_out = keep_cols(attn.to_add_out, channels)

    n_heads = len(keep_heads)
    attn.heads = n_heads
    attn.sliceable_head_dim = n_heads
    attn.inner_dim = n_heads * head_dim
    attn.inner_kv_dim = n_heads * head_dim
    check_attention(attn, head_dim)


def check_attention(attn: nn.Module, head_dim: int) -> None:
    """Assert that every projection of ``attn`` agrees with ``attn.heads * head_dim``."""
    inner = attn.heads * head_dim
    assert attn.inner_dim == inner and attn.inner_kv_dim == inner, (attn.inner_dim, attn.inner_kv_dim, inner)
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        lin = getattr(attn, name, None)
        if lin is not None:
            assert lin.out_features == inner, f"{name}.out_features={lin.out_features} != heads*head_dim={inner}"
    assert attn.to_out[0].in_features == inner, f"to_out.0.in_features={attn.to_out[0].in_features} != {inner}"
    assert attn.to_out[0].out_features == attn.out_dim
    if getattr(attn, "to_add_out", None) is not None:
        assert attn.to_add_out.in_features == inner, f"to_add_out.in_features={attn.to_add_out.in_features} != {inner}"
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        norm = getattr(attn, name, None)
        w = getattr(norm, "weight", None) if norm is not None else None
        if w is not None:
            assert w.shape[-1] == head_dim, f"{name} acts on {w.shape[-1]} channels, head_dim is {head_dim}"


def cut_feedforward(ff: nn.Module, keep: Sequence[int]) -> None:
    """Keep only hidden neurons ``keep`` of a diffusers ``FeedForward`` (GELU-tanh, in place).

    ``ff.net[0].proj`` (dim -> hidden) loses rows, ``ff.net[2]`` (hidden -> dim) loses columns.
    """
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    ff.net[0].proj = keep_rows(ff.net[0].proj, idx)
    ff.net[2] = keep_cols(ff.net[2], idx)
    assert ff.net[0].proj.out_features == ff.net[2].in_features == len(idx)


# --------------------------------------------------------------------------------------------------------
# Plan validation and application
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockShape:
    """Kept sizes of one block after surgery (what the compact checkpoint records)."""

    index: int
    heads: int
    heads_attn2: int | None
    ff_dim: int
    ff_context_dim: int | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def block_shapes(model: nn.Module) -> list[BlockShape]:
    """Current per-block head and FFN sizes of ``model``."""
    out = []
    for i, blk in enumerate(model.transformer_blocks):
        out.append(
            BlockShape(
                index=i,
                heads=int(blk.attn.heads),
                heads_attn2=int(blk.attn2.heads) if blk.attn2 is not None else None,
                ff_dim=int(blk.ff.net[0].proj.out_features),
                ff_context_dim=int(blk.ff_context.net[0].proj.out_features) if blk.ff_context is not None else None,
            )
        )
    return out


def _check_keep(keep: list[int] | None, size: int, what: str) -> None:
    if keep is None:
        return
    if not keep:
        raise UserError(f"plan: {what} keeps nothing; surgery needs at least one kept index (re-run the prune stage)")
    if sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= size:
        raise UserError(f"plan: {what} must be sorted unique indices in [0, {size}); got {keep[:8]}{'...' if len(keep) > 8 else ''}")


def validate_plan(model: nn.Module, plan: PrunePlan) -> None:
    """Raise :class:`UserError` (one line) if ``plan`` does not describe ``model``'s dense structure."""
    blocks = list(model.transformer_blocks)
    if plan.num_layers != len(blocks) or len(plan.blocks) != len(blocks):
        raise UserError(f"plan has {plan.num_layers} blocks but the transformer has {len(blocks)}; the plan belongs to another model")
    head_dim = int(model.config.attention_head_dim)
    if plan.head_dim != head_dim:
        raise UserError(f"plan head_dim {plan.head_dim} != transformer head_dim {head_dim}; the plan belongs to another model")
    for bp, blk in zip(plan.blocks, blocks):
        where = f"block {bp.index}"
        if bp.num_heads != blk.attn.heads or bp.ff_dim != blk.ff.net[0].proj.out_features:
            raise UserError(
                f"plan {where} has {bp.num_heads} heads / FFN {bp.ff_dim} but the transformer has "
                f"{blk.attn.heads} / {blk.ff.net[0].proj.out_features}; the plan belongs to another model (or it is already compact)"
            )
        _check_keep(bp.keep_heads, bp.num_heads, f"{where} keep_heads")
        _check_keep(bp.keep_ff, bp.ff_dim, f"{where} keep_ff")
        if bp.keep_heads_attn2 is not None:
            if blk.attn2 is None:
                raise UserError(f"plan {where} cuts attn2 heads but the block has no second attention; the plan belongs to another model")
            _check_keep(bp.keep_heads_attn2, blk.attn2.heads, f"{where} keep_heads_attn2")
        if bp.keep_ff_context is not None:
            if blk.ff_context is None:
                raise UserError(f"plan {where} cuts ff_context but the block (context_pre_only) has none; the plan belongs to another model")
            _check_keep(bp.keep_ff_context, blk.ff_context.net[0].proj.out_features, f"{where} keep_ff_context")


def _removed(keep: list[int], size: int) -> list[int]:
    kept = set(keep)
    return [i for i in range(size) if i not in kept]


def removed_column_norms(model: nn.Module, plan: PrunePlan) -> dict[str, float]:
    """Max |weight| over the output-layer input columns the plan removes, per layer (0.0 = truly masked).

    Surgery is exact only if these are zero: a non-zero value means ``model`` is not the masked model the
    plan was written for.
    """
    out: dict[str, float] = {}

    def record(name: str, lin: nn.Linear, cols: list[int]) -> None:
        if cols:
            w = lin.weight.detach()[:, torch.as_tensor(cols, dtype=torch.long)]  # (out, removed)
            out[name] = float(w.abs().max())

    for bp, blk in zip(plan.blocks, model.transformer_blocks):
        p = f"transformer_blocks.{bp.index}"
        if bp.keep_heads is not None:
            hd = attention_head_dim(blk.attn)
            cols = head_channels(_removed(bp.keep_heads, blk.attn.heads), hd).tolist()
            record(f"{p}.attn.to_out.0", blk.attn.to_out[0], cols)
            if blk.attn.to_add_out is not None:
                record(f"{p}.attn.to_add_out", blk.attn.to_add_out, cols)
        if bp.keep_heads_attn2 is not None:
            hd = attention_head_dim(blk.attn2)
            cols = head_channels(_removed(bp.keep_heads_attn2, blk.attn2.heads), hd).tolist()
            record(f"{p}.attn2.to_out.0", blk.attn2.to_out[0], cols)
        if bp.keep_ff is not None:
            record(f"{p}.ff.net.2", blk.ff.net[2], _removed(bp.keep_ff, blk.ff.net[2].in_features))
        if bp.keep_ff_context is not None:
            record(f"{p}.ff_context.net.2", blk.ff_context.net[2], _removed(bp.keep_ff_context, blk.ff_context.net[2].in_features))
    return out


def check_masked(model: nn.Module, plan: PrunePlan) -> None:
    """Raise :class:`UserError` unless every column the plan removes is exactly zero in ``model``."""
    bad = {k: v for k, v in removed_column_norms(model, plan).items() if v != 0.0}
    if bad:
        name, val = next(iter(bad.items()))
        raise UserError(
            f"pruned transformer does not match its plan: {len(bad)} layer(s) have non-zero weights in removed "
            f"columns (e.g. {name}, max |w| = {val:.3g}); re-run the prune stage so plan.json and transformer/ agree"
        )


def apply_block_plan(block: nn.Module, bp: BlockPlan) -> None:
    """Cut one ``JointTransformerBlock`` in place according to ``bp``."""
    if bp.keep_heads is not None:
        cut_attention(block.attn, bp.keep_heads)
    if bp.keep_heads_attn2 is not None:
        cut_attention(block.attn2, bp.keep_heads_attn2)
    if bp.keep_ff is not None:
        cut_feedforward(block.ff, bp.keep_ff)
    if bp.keep_ff_context is not None:
        cut_feedforward(block.ff_context, bp.keep_ff_context)


def apply_plan(model: nn.Module, plan: PrunePlan, *, require_masked: bool = False) -> nn.Module:
    """Remove every head and neuron ``plan`` prunes from ``model`` (in place) and return it.

    require_masked: first check that the removed columns are exactly zero (default False: the caller may
        be cutting a dense model on purpose, e.g. a benchmark).
    Plans without structured decisions (2:4, unstructured, dense) leave the model unchanged.
    """
    validate_plan(model, plan)
    if require_masked:
        check_masked(model, plan)
    for bp, blk in zip(plan.blocks, model.transformer_blocks):
        apply_block_plan(blk, bp)
    check_model(model)
    n_cut = sum(bp.is_cut for bp in plan.blocks)
    log.info("surgery: cut %d of %d blocks; %d parameters remain", n_cut, len(plan.blocks), sum(p.numel() for p in model.parameters()))
    return model


def cut_to_shapes(model: nn.Module, shapes: Sequence[BlockShape]) -> nn.Module:
    """Resize ``model`` in place to ``shapes`` (keeping the first heads/neurons; weights are loaded after)."""
    blocks = list(model.transformer_blocks)
    if len(shapes) != len(blocks):
        raise UserError(f"compact description lists {len(shapes)} blocks, the config builds {len(blocks)}; the checkpoint is corrupt")
    for s, blk in zip(shapes, blocks):
        bp = BlockPlan(index=s.index, num_heads=blk.attn.heads, ff_dim=blk.ff.net[0].proj.out_features)
        if s.heads != blk.attn.heads:
            bp.keep_heads = list(range(s.heads))
        if (s.heads_attn2 is None) != (blk.attn2 is None) or (s.ff_context_dim is None) != (blk.ff_context is None):
            raise UserError(f"compact description of block {s.index} does not match the config's block layout; the checkpoint is corrupt")
        if blk.attn2 is not None and s.heads_attn2 != blk.attn2.heads:
            bp.keep_heads_attn2 = list(range(s.heads_attn2))
        if s.ff_dim != bp.ff_dim:
            bp.keep_ff = list(range(s.ff_dim))
        if blk.ff_context is not None and s.ff_context_dim != blk.ff_context.net[0].proj.out_features:
            bp.keep_ff_context = list(range(s.ff_context_dim))
        for keep, size, what in (
            (bp.keep_heads, blk.attn.heads, "heads"),
            (bp.keep_heads_attn2, blk.attn2.heads if blk.attn2 is not None else 0, "heads_attn2"),
            (bp.keep_ff, bp.ff_dim, "ff_dim"),
            (bp.keep_ff_context, blk.ff_context.net[0].proj.out_features if blk.ff_context is not None else 0, "ff_context_dim"),
        ):
            if keep is not None and not (0 < len(keep) <= size):
                raise UserError(f"compact description of block {s.index}: {what}={len(keep)} is outside 1..{size}; the checkpoint is corrupt")
        apply_block_plan(blk, bp)
    check_model(model)
    return model


def check_model(model: nn.Module) -> None:
    """Assert the invariants of every block (attention bookkeeping, FFN widths, residual widths)."""
    dim = model.inner_dim if hasattr(model, "inner_dim") else model.config.num_attention_heads * model.config.attention_head_dim
    head_dim = int(model.config.attention_head_dim)
    for i, blk in enumerate(model.transformer_blocks):
        for attn in (blk.attn, blk.attn2):
            if attn is None:
                continue
            check_attention(attn, head_dim)
            assert attn.to_q.in_features == dim and attn.to_out[0].out_features == dim, f"block {i}: residual width changed"
        assert blk.ff.net[0].proj.out_features == blk.ff.net[2].in_features, f"block {i}: ff hidden widths disagree"
        assert blk.ff.net[2].out_features == dim
        if blk.ff_context is not None:
            assert blk.ff_context.net[0].proj.out_features == blk.ff_context.net[2].in_features, f"block {i}: ff_context widths disagree"
        else:
            assert blk.context_pre_only and blk.attn.to_add_out is None, f"block {i}: only the context_pre_only block lacks ff_context"


def mask_like_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Zero the output-layer columns ``plan`` removes (in place): the stage-1 masked model, for tests/benchmarks."""
    validate_plan(model, plan)
    with torch.no_grad():
        for bp, blk in zip(plan.blocks, model.transformer_blocks):
            if bp.keep_heads is not None:
                cols = head_channels(_removed(bp.keep_heads, blk.attn.heads), attention_head_dim(blk.attn))
                blk.attn.to_out[0].weight[:, cols] = 0
                if blk.attn.to_add_out is not None:
                    blk.attn.to_add_out.weight[:, cols] = 0
            if bp.keep_heads_attn2 is not None:
                cols = head_channels(_removed(bp.keep_heads_attn2, blk.attn2.heads), attention_head_dim(blk.attn2))
                blk.attn2.to_out[0].weight[:, cols] = 0
            if bp.keep_ff is not None:
                blk.ff.net[2].weight[:, _removed(bp.keep_ff, bp.ff_dim)] = 0
            if bp.keep_ff_context is not None:
                blk.ff_context.net[2].weight[:, _removed(bp.keep_ff_context, blk.ff_context.net[2].in_features)] = 0
    return model


def structured_plan(
    model: nn.Module, ratio: float, *, model_id: str = "random", generator: torch.Generator | None = None, ff_context: bool = True
) -> PrunePlan:
    """A structured plan removing ``round(ratio * n)`` heads (every attention) and FFN neurons per block.

    Kept indices are random if ``generator`` is given, else the first ones. Meant for benchmarks and tests
    (latency does not depend on which heads are kept); real plans come from stage 1.
    """

    def pick(n: int) -> list[int]:
        k = max(1, n - int(round(ratio * n)))
        if generator is None:
            return list(range(k))
        return sorted(torch.randperm(n, generator=generator)[:k].tolist())

    cfg = model.config
    blocks = []
    for i, blk in enumerate(model.transformer_blocks):
        ffd = blk.ff.net[0].proj.out_features
        blocks.append(
            BlockPlan(
                index=i,
                num_heads=blk.attn.heads,
                ff_dim=ffd,
                keep_heads=pick(blk.attn.heads),
                keep_heads_attn2=pick(blk.attn2.heads) if blk.attn2 is not None else None,
                keep_ff=pick(ffd),
                keep_ff_context=pick(blk.ff_context.net[0].proj.out_features) if (ff_context and blk.ff_context is not None) else None,
            )
        )
    return PrunePlan(
        model=model_id,
        sparsity=f"structured:{ratio:g}",
        method="synthetic",
        head_dim=int(cfg.attention_head_dim),
        num_layers=len(blocks),
        blocks=blocks,
    )
