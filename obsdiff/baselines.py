"""Baseline pruning rules with the solvers' interface: magnitude and Wanda (no weight update).

Same conventions as :mod:`obsdiff.solvers`: ``W`` is ``(rows, cols)``, ``H`` is the ``(cols, cols)`` input
Hessian (only its diagonal, ``||X_j||^2`` up to scale, is used by Wanda; magnitude ignores it), the
returned ``keep`` is True where a weight survives, and the pruned weights are exact zeros.

- magnitude: score ``|W_ij|``; unstructured ranks the whole layer, N:M each group of M input columns.
- Wanda (Sun et al. 2024): score ``|W_ij| * ||X_j||``; unstructured ranks within each output row (Wanda's
  per-output comparison group), N:M each group of M input columns.
- structured (column groups): magnitude ``sum ||W_g||^2``, Wanda ``sum_j ||W_j||^2 ||X_j||^2`` over the
  group's columns, summed over the weights sharing the groups; the lowest groups are zeroed. As in
  :func:`obsdiff.solvers.obs_prune_groups`, the groups may tile a column range only (``cols``), and columns
  removed earlier (``frozen``) are zeroed and score 0.
"""

from __future__ import annotations

from typing import Sequence

import torch

from obsdiff.patterns import Sparsity
from obsdiff.solvers import group_columns, split_count


def _prune_by_score(W: torch.Tensor, score: torch.Tensor, sparsity: Sparsity, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = W.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    if sparsity.kind == "nm":
        m, n_drop = sparsity.m, sparsity.m - sparsity.n
        if cols % m:
            raise ValueError(f"{sparsity} needs in_features divisible by {m}, got {cols}")
        s = score.reshape(rows, cols // m, m)
        idx = torch.topk(s, n_drop, dim=2, largest=False).indices  # (rows, cols/m, n_drop)
        pruned.view(rows, cols // m, m).scatter_(2, idx, True)
    elif sparsity.kind == "unstructured":
        if per_row:
            ks = [split_count(rows * cols, sparsity.ratio, r * cols, (r + 1) * cols) for r in range(rows)]
            if len(set(ks)) == 1:  # the usual case: every row loses the same count, one batched top-k
                if ks[0] > 0:
                    pruned.scatter_(1, torch.topk(score, ks[0], dim=1, largest=False).indices, True)
            else:
                for r, k in enumerate(ks):
                    if k > 0:
                        pruned[r, torch.topk(score[r], k, largest=False).indices] = True
        else:
            k = int(round(sparsity.ratio * rows * cols))
            if k > 0:
                pruned.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
    else:
        raise ValueError(f"baseline weight pruning handles N:M and unstructured patterns, not {sparsity}")
    W_new = W.masked_fill(pruned, 0)
    return W_new, ~pruned


def magnitude_prune(W: torch.Tensor, H: torch.Tensor | None, sparsity: Sparsity, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the smallest ``|W|`` (layer-wise for unstructured, per M-group for N:M). ``H`` is ignored."""
    return _prune_by_score(W, W.detach().float().abs(), sparsity, per_row=False)


def magnitude_prune_model(model: torch.nn.Module, sparsity: Sparsity) -> list[str]:
    """Prune every layer stage 1 prunes (the family adapter's units) by magnitude, in place, with no Hessian:
    the timing stand-in for a stage-1 plan. Returns the layer names (qualified inside ``model``)."""
    from obsdiff.packages import build_units

    layers = [n for u in build_units(model) for n in u.layers]
    with torch.no_grad():
        for name in layers:
            w = model.get_submodule(name).weight  # (N, K)
            w.copy_(magnitude_prune(w, None, sparsity)[0])
    return layers


def wanda_prune(W: torch.Tensor, H: torch.Tensor, sparsity: Sparsity, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the smallest ``|W_ij| * ||X_j||`` (per output row for unstructured, per M-group for N:M)."""
    norms = torch.sqrt(torch.diagonal(H.float()).clamp_min(0)).to(W.device)  # (cols,)
    return _prune_by_score(W, W.detach().float().abs() * norms.unsqueeze(0), sparsity, per_row=True)


def _range_columns(W: torch.Tensor, start: int, stop: int, frozen: torch.Tensor | None) -> torch.Tensor:
    """``W``'s columns ``[start, stop)`` as float32, frozen columns zeroed: ``(rows, stop - start)``."""
    Wf = W.detach().float()
    if frozen is not None:
        Wf = Wf.masked_fill(frozen.to(W.device).unsqueeze(0), 0.0)
    return Wf[:, start:stop]


def _prune_groups_by_score(
    Ws: Sequence[torch.Tensor], score: torch.Tensor, group_size: int, n_remove: int, start: int, frozen: torch.Tensor | None
) -> tuple[list[torch.Tensor], list[int]]:
    """Zero the ``n_remove`` lowest-``score`` groups ``(groups,)`` of the range starting at column ``start``,
    and the frozen columns; the kept group indices are relative to the range."""
    groups = score.numel()
    if not 0 <= n_remove < groups:
        raise ValueError(f"cannot remove {n_remove} of {groups} groups")
    removed = torch.zeros(groups, dtype=torch.bool)
    removed[torch.topk(score.cpu(), n_remove, largest=False).indices] = True
    col_removed = torch.zeros(Ws[0].shape[1], dtype=torch.bool) if frozen is None else frozen.clone()  # (width,)
    col_removed[start : start + groups * group_size] |= removed.repeat_interleave(group_size)
    out = [W.masked_fill(col_removed.to(W.device).unsqueeze(0), 0) for W in Ws]
    return out, (~removed).nonzero().flatten().tolist()


def magnitude_prune_groups(
    Ws: Sequence[torch.Tensor],
    Hs: Sequence[torch.Tensor] | None,
    group_size: int,
    n_remove: int,
    *,
    cols: tuple[int, int] | None = None,
    frozen: Sequence[int] | torch.Tensor | None = None,
    **_: object,
) -> tuple[list[torch.Tensor], list[int]]:
    """Zero the ``n_remove`` column groups with the smallest summed ``||W_g||_F^2``. ``Hs`` is ignored.

    cols, frozen: as in :func:`obsdiff.solvers.obs_prune_groups`: only the groups tiling ``[start, stop)``
    are scored and removed (``keep`` relative to the range); frozen columns score 0 and are zeroed.
    """
    start, stop, fz = group_columns(Ws[0].shape[1], group_size, cols, frozen, torch.device("cpu"))
    score = sum(_range_columns(W, start, stop, fz).reshape(W.shape[0], -1, group_size).pow(2).sum(dim=(0, 2)).cpu() for W in Ws)
    return _prune_groups_by_score(Ws, score, group_size, n_remove, start, fz)


def wanda_prune_groups(
    Ws: Sequence[torch.Tensor],
    Hs: Sequence[torch.Tensor],
    group_size: int,
    n_remove: int,
    *,
    cols: tuple[int, int] | None = None,
    frozen: Sequence[int] | torch.Tensor | None = None,
    **_: object,
) -> tuple[list[torch.Tensor], list[int]]:
    """Zero the ``n_remove`` column groups with the smallest summed ``sum_j ||W_j||^2 ||X_j||^2``.

    cols, frozen: as in :func:`magnitude_prune_groups`.
    """
    start, stop, fz = group_columns(Ws[0].shape[1], group_size, cols, frozen, torch.device("cpu"))
    score = 0
    for W, H in zip(Ws, Hs):
        col = _range_columns(W, start, stop, fz).pow(2).sum(dim=0) * torch.diagonal(H.float())[start:stop].to(W.device)  # (stop-start,)
        score = score + col.reshape(-1, group_size).sum(dim=1).cpu()
    return _prune_groups_by_score(Ws, score, group_size, n_remove, start, fz)
