"""Physical removal of pruned attention heads and FFN neurons from a transformer of any supported family:
small functions that slice one ``nn.Linear`` at a time along the family adapter's spans, then the adapter's
fix-up of the block's bookkeeping and its invariants. Design notes: ``docs/export.md``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from common.errors import UserError
from families import adapter_for
from families.base import FamilyAdapter, StructuredGroup, get_module, set_module
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


def _carry_quant(old: nn.Linear, new: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """Carry the integer grid of a quantized layer (:mod:`export.int_weights`) to its cut copy: the scales of the kept
    rows; for a column cut, the kept columns must include every column stage 1 quantized (``weight_columns``, indices
    into ``old``'s columns), which become indices into ``new``'s (None once they are all of them)."""
    scales = getattr(old, "weight_scales", None)
    if scales is None:
        return new
    columns = old.weight_columns
    if rows is not None:
        scales = scales.index_select(0, rows.cpu())
    if cols is not None:
        where = {int(c): i for i, c in enumerate(cols.tolist())}
        kept = columns.tolist() if columns is not None else list(range(old.in_features))
        if any(c not in where for c in kept):
            raise UserError("the plan cuts columns that stage 1 quantized: the plan and the integer weights disagree; re-run `python -m pipeline prune`")
        columns = torch.as_tensor([where[c] for c in kept], dtype=torch.long)
        columns = None if len(kept) == new.in_features else columns
    new.weight_quant, new.weight_scales, new.weight_columns = old.weight_quant, scales, columns
    return new


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` keeping output features ``rows`` (weight ``(out, in)`` -> ``(len(rows), in)``)."""
    rows = rows.to(linear.weight.device)
    weight = linear.weight.detach().index_select(0, rows)  # (R, in)
    bias = linear.bias.detach().index_select(0, rows) if linear.bias is not None else None
    return _carry_quant(linear, _new_linear(weight, bias), rows=rows)


def keep_cols(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` keeping input features ``cols`` (weight ``(out, in)`` -> ``(out, len(cols))``).

    The bias is unchanged: removed inputs contributed ``W[:, j] * x_j``, never bias.
    """
    cols = cols.to(linear.weight.device)
    weight = linear.weight.detach().index_select(1, cols)  # (out, C)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return _carry_quant(linear, _new_linear(weight, bias), cols=cols)


def head_channels(keep_heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Channel indices ``[h*head_dim, (h+1)*head_dim)`` of every kept head, in order (int64)."""
    heads = torch.as_tensor(list(keep_heads), dtype=torch.long)  # (H',)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)  # (H' * head_dim,)


def _removed(keep: Sequence[int], size: int) -> list[int]:
    kept = set(keep)
    return [i for i in range(size) if i not in kept]


def _keep_along(dim: int, group: StructuredGroup, offsets: Sequence[int], keep: Sequence[int]) -> torch.Tensor:
    """Indices ``0..dim`` without the channels of ``group``'s removed units in each of its spans (starting
    at ``offsets``: a fused projection holds several spans of one group, e.g. q, k and v rows)."""
    mask = torch.ones(dim, dtype=torch.bool)
    gone = _removed(keep, group.size)
    for offset in offsets:
        mask[group.channels(gone, offset)] = False
    return mask.nonzero().flatten()


# --------------------------------------------------------------------------------------------------------
# Group-level surgery
# --------------------------------------------------------------------------------------------------------


def cut_group(block: nn.Module, group: StructuredGroup, keep: Sequence[int], adapter: FamilyAdapter) -> None:
    """Keep only units ``keep`` of ``group`` in ``block`` (in place), then let the adapter fix the bookkeeping.

    Producing layers lose the rows of the removed units, consuming layers their columns; channels of the
    same linear outside the group's spans (another group's range of a fused projection) are untouched. All
    spans of one linear are cut at once, since every offset refers to the shape before the cut.
    """
    by_layer: dict[tuple[str, int], list[int]] = {}
    for span in group.inputs + group.outputs:
        by_layer.setdefault((span.layer, span.axis), []).append(span.offset)
    for (layer, axis), offsets in by_layer.items():
        lin = get_module(block, layer)
        idx = _keep_along(lin.out_features if axis == 0 else lin.in_features, group, offsets, keep)
        set_module(block, layer, keep_rows(lin, idx) if axis == 0 else keep_cols(lin, idx))
    adapter.set_group_size(block, group.name, len(keep))


def _group(adapter: FamilyAdapter, block: nn.Module, name: str) -> StructuredGroup | None:
    return next((g for g in adapter.structured_groups(block) if g.name == name), None)


def apply_block_plan(block: nn.Module, bp: BlockPlan, adapter: FamilyAdapter) -> None:
    """Cut one block in place according to ``bp`` (groups in the adapter's order; spans are re-read after
    each cut, since cutting one group of a fused projection moves the next group's offset)."""
    order = [g.name for g in adapter.structured_groups(block)]
    for name in sorted(bp.keep, key=order.index):
        cut_group(block, _group(adapter, block, name), bp.keep[name], adapter)


# --------------------------------------------------------------------------------------------------------
# Plan validation and application
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockShape:
    """Units of every structured group of one block (what the compact checkpoint records)."""

    index: int
    sizes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"index": self.index, "sizes": dict(self.sizes)}


def block_shapes(model: nn.Module) -> list[BlockShape]:
    """Current per-block group sizes of ``model``."""
    adapter = adapter_for(model)
    return [BlockShape(i, {g.name: g.size for g in adapter.structured_groups(b)}) for i, (_, b) in enumerate(adapter.blocks(model))]


def _check_keep(keep: list[int] | None, size: int, what: str) -> None:
    if keep is None:
        return
    if not keep:
        raise UserError(f"plan: {what} keeps nothing; surgery needs at least one kept index (re-run the prune stage)")
    if sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= size:
        raise UserError(f"plan: {what} must be sorted unique indices in [0, {size}); got {keep[:8]}{'...' if len(keep) > 8 else ''}")


def validate_plan(model: nn.Module, plan: PrunePlan) -> None:
    """Raise :class:`UserError` (one line) if ``plan`` does not describe ``model``'s dense structure."""
    adapter = adapter_for(model)
    if plan.family != adapter.name:
        raise UserError(f"the plan is for a {plan.family} transformer but the model is {type(model).__name__} ({adapter.name}); the plan belongs to another model")
    blocks = adapter.blocks(model)
    if plan.num_layers != len(blocks) or len(plan.blocks) != len(blocks):
        raise UserError(f"plan has {plan.num_layers} blocks but the transformer has {len(blocks)}; the plan belongs to another model")
    head_dim = adapter.head_dim(model)
    if plan.head_dim != head_dim:
        raise UserError(f"plan head_dim {plan.head_dim} != transformer head_dim {head_dim}; the plan belongs to another model")
    for bp, (_, blk) in zip(plan.blocks, blocks):
        where = f"block {bp.index}"
        groups = {g.name: g for g in adapter.structured_groups(blk)}
        for name, size in bp.sizes.items():
            if name not in groups or groups[name].size != size:
                have = ", ".join(f"{g.name} {g.size}" for g in groups.values())
                raise UserError(f"plan {where} has {name} {size} but the transformer's block has {have}; the plan belongs to another model (or it is already compact)")
        for name, keep in bp.keep.items():
            if name not in groups:
                raise UserError(f"plan {where} cuts {name!r} but the block has only {', '.join(groups) or 'no groups'}; the plan belongs to another model")
            _check_keep(keep, groups[name].size, f"{where} {name}")


def removed_column_norms(model: nn.Module, plan: PrunePlan) -> dict[str, float]:
    """Max |weight| over the consuming layers' input columns the plan removes, per layer (0.0 = truly masked).

    Surgery is exact only if these are zero: a non-zero value means ``model`` is not the masked model the
    plan was written for.
    """
    adapter = adapter_for(model)
    out: dict[str, float] = {}
    for bp, (prefix, blk) in zip(plan.blocks, adapter.blocks(model)):
        for g in adapter.structured_groups(blk):
            if g.name not in bp.keep:
                continue
            for span in g.outputs:
                cols = g.channels(_removed(bp.keep[g.name], g.size), span.offset)
                if len(cols):
                    w = get_module(blk, span.layer).weight.detach()[:, cols]  # (out, removed)
                    name = f"{prefix}.{span.layer}"
                    out[name] = max(out.get(name, 0.0), float(w.abs().max()))
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


def apply_plan(model: nn.Module, plan: PrunePlan, *, require_masked: bool = False) -> nn.Module:
    """Remove every head and neuron ``plan`` prunes from ``model`` (in place) and return it.

    require_masked: first check that the removed columns are exactly zero (default False: the caller may
        be cutting a dense model on purpose, e.g. a benchmark).
    Plans without structured decisions (2:4, unstructured, dense) leave the model unchanged.
    """
    validate_plan(model, plan)
    if require_masked:
        check_masked(model, plan)
    adapter = adapter_for(model)
    for bp, (_, blk) in zip(plan.blocks, adapter.blocks(model)):
        apply_block_plan(blk, bp, adapter)
    check_model(model)
    n_cut = sum(bp.is_cut for bp in plan.blocks)
    log.info("surgery: cut %d of %d blocks; %d parameters remain", n_cut, len(plan.blocks), sum(p.numel() for p in model.parameters()))
    return model


def cut_to_shapes(model: nn.Module, shapes: Sequence[BlockShape]) -> nn.Module:
    """Resize ``model`` in place to ``shapes`` (keeping the first units; weights are loaded after)."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    if len(shapes) != len(blocks):
        raise UserError(f"compact description lists {len(shapes)} blocks, the config builds {len(blocks)}; the checkpoint is corrupt")
    for s, (_, blk) in zip(shapes, blocks):
        groups = {g.name: g.size for g in adapter.structured_groups(blk)}
        if set(s.sizes) != set(groups):
            raise UserError(f"compact description of block {s.index} does not match the config's block layout; the checkpoint is corrupt")
        bp = BlockPlan(index=s.index, sizes=groups)
        for name, size in s.sizes.items():
            if not (isinstance(size, int) and 0 < size <= groups[name]):
                raise UserError(f"compact description of block {s.index}: {name}={size} is outside 1..{groups[name]}; the checkpoint is corrupt")
            if size != groups[name]:
                bp.keep[name] = list(range(size))
        apply_block_plan(blk, bp, adapter)
    check_model(model)
    return model


def check_model(model: nn.Module) -> None:
    """Assert the invariants of every block (the adapter's: attention bookkeeping, FFN and residual widths)."""
    adapter = adapter_for(model)
    for prefix, blk in adapter.blocks(model):
        try:
            adapter.check_block(blk, model)
        except AssertionError as e:
            raise AssertionError(f"{prefix}: {e}") from None


def mask_like_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Zero the consuming columns ``plan`` removes (in place): the stage-1 masked model, for tests/benchmarks."""
    validate_plan(model, plan)
    adapter = adapter_for(model)
    with torch.no_grad():
        for bp, (_, blk) in zip(plan.blocks, adapter.blocks(model)):
            for g in adapter.structured_groups(blk):
                if g.name in bp.keep:
                    for span in g.outputs:
                        get_module(blk, span.layer).weight[:, g.channels(_removed(bp.keep[g.name], g.size), span.offset)] = 0
    return model


def structured_plan(
    model: nn.Module, ratio: float, *, model_id: str = "random", generator: torch.Generator | None = None, groups: Sequence[str] | None = None
) -> PrunePlan:
    """A structured plan removing ``round(ratio * n)`` units of every structured group of every block.

    Kept indices are random if ``generator`` is given, else the first ones. groups: only these group names
    (default all). Meant for benchmarks and tests (latency does not depend on which heads are kept); real
    plans come from stage 1.
    """

    def pick(n: int) -> list[int]:
        k = max(1, n - int(round(ratio * n)))
        if generator is None:
            return list(range(k))
        return sorted(torch.randperm(n, generator=generator)[:k].tolist())

    adapter = adapter_for(model)
    blocks = []
    for i, (_, blk) in enumerate(adapter.blocks(model)):
        gs = adapter.structured_groups(blk)
        blocks.append(BlockPlan(index=i, sizes={g.name: g.size for g in gs}, keep={g.name: pick(g.size) for g in gs if groups is None or g.name in groups}))
    return PrunePlan(
        model=model_id,
        family=adapter.name,
        sparsity=f"structured:{ratio:g}",
        method="synthetic",
        head_dim=adapter.head_dim(model),
        num_layers=len(blocks),
        blocks=blocks,
    )
