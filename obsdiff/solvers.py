"""Optimal Brain Surgeon solvers: pure functions over tensors, CPU or GPU, float32 inside.

Conventions (all solvers, see also :mod:`obsdiff.baselines`):

- ``W`` is an ``nn.Linear`` weight, shape ``(out_features, in_features)`` = ``(rows, cols)``.
- ``H`` is the layer's input Hessian ``X^T X`` (normalised), shape ``(cols, cols)``; any positive scale.
- The returned ``keep`` mask is boolean, True where a weight survives; ``W_new`` has exact zeros where
  ``keep`` is False, the dtype and device of ``W``, and (with compensation) updated surviving weights.

Unstructured and N:M follow SparseGPT's blocked OBS (Frantar & Alistarh 2023): the upper Cholesky factor
``U`` of ``H^-1`` is walked column by column; pruning column ``i``'s weights to ``q`` spreads the error
``(w - q) / U_ii`` over the not-yet-visited columns through row ``i`` of ``U`` (the OBS update restricted
to the remaining weights), lazily per block of 128 columns. Masks are chosen per block (unstructured) or
per group of M columns (N:M) with the OBS saliency ``w^2 / U_ii^2``, on weights already updated by the
previous columns.

Structured pruning removes whole column groups (an attention head = ``head_dim`` input columns of the
attention output projection; an FFN neuron = one input column of the FFN output projection) with the
group OBS update ``dW = -W[:, S] (Hinv[S, S])^-1 Hinv[S, :]``, greedily, lowest saliency
``tr(W_S (Hinv[S, S])^-1 W_S^T)`` first, downdating ``Hinv`` after each removal. Several weight matrices
that share the groups (the image and text branches of the joint attention) are ranked by the sum of
their saliencies and compensated each with its own Hessian.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from obsdiff.patterns import Sparsity

DEFAULT_BLOCKSIZE = 128
DEFAULT_PERCDAMP = 0.01
_MAX_DAMP_RETRIES = 8


def damped_inverse(H: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP, *, damp: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Cholesky-invert ``H + damp * I`` with ``damp = percdamp * mean(diag(H))`` (or the ``damp`` given).

    When the factorisation fails (a singular or badly conditioned ``H``), the damping is multiplied by 10
    and the factorisation retried, up to 8 times (a zero damping starts the retries at 1e-6 of the mean
    diagonal). Returns ``(L, Hinv, damp)``: the lower Cholesky factor of the damped ``H``, its inverse
    (float32), and the damping used. Dead inputs (``H_ii == 0``) get ``H_ii = 1`` first, as in SparseGPT;
    ``mean(diag(H))`` is taken over the live inputs only.
    """
    H = H.detach().to(torch.float32).clone()  # (cols, cols)
    diag = torch.diagonal(H)
    dead = diag == 0  # (cols,)
    # Unlike SparseGPT, the dead inputs' H_ii = 1 stays out of the mean: it would tie the damping to the
    # scale of H (with H ~ 1e-4 and 2 dead heads of 8, the damping was ~1e4 times too large).
    mean_diag = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    mean_diag = mean_diag if mean_diag > 0 else 1.0
    diag[dead] = 1.0
    if damp is None:
        damp = percdamp * mean_diag
    for _ in range(_MAX_DAMP_RETRIES):
        Hd = H.clone()
        torch.diagonal(Hd).add_(damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            if torch.isfinite(Hinv).all():
                return L, Hinv, damp
        damp = damp * 10.0 if damp > 0 else 1e-6 * mean_diag
    raise ValueError(f"Hessian is not positive definite even with damping {damp:g}: the calibration inputs are degenerate")


def inverse_cholesky_upper(H: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``U^T U = H^-1``), with the retry policy of
    :func:`damped_inverse` (also retried when ``H^-1`` itself does not factorise). Returns ``(U, damp)``."""
    damp = None
    for _ in range(_MAX_DAMP_RETRIES):
        _, Hinv, damp = damped_inverse(H, percdamp, damp=damp)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if int(info) == 0 and torch.isfinite(U).all():
            return U, damp
        damp = damp * 10.0 if damp > 0 else 1e-6
    raise ValueError(f"inverse Hessian is not positive definite even with damping {damp:g}")


def _split_count(total: int, ratio: float, start: int, stop: int) -> int:
    """Share of ``round(ratio * total)`` falling in ``[start, stop)`` so that the shares sum exactly."""
    return int(round(ratio * stop)) - int(round(ratio * start))


def obs_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: Sparsity,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    compensate: bool = True,
    hinv_upper: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` to ``sparsity`` (``nm`` or ``unstructured``) with blocked OBS; returns ``(W_new, keep)``.

    W: ``(rows, cols)`` weight of ``y = x W^T``; H: ``(cols, cols)`` input Hessian.
    blocksize: columns per lazy-update block and per unstructured mask-selection block (default 128;
        rounded down to a multiple of M for N:M).
    percdamp: damping as a share of the mean Hessian diagonal (default 1%).
    compensate: False keeps the same masks rule but leaves the surviving weights unchanged
        (masks are then chosen on the original weights; dead inputs' weights are zeroed all the same).
    hinv_upper: the factor ``U`` from :func:`inverse_cholesky_upper` of ``H``, when already computed for
        another layer with the same input (q/k/v); ``H`` is then only used for its shape and dead inputs.

    Unstructured: every block of columns loses exactly its share of ``round(ratio * rows * cols)``
    weights, so the layer's sparsity is exact. N:M: in every row and every group of M consecutive input
    columns, exactly M - N weights are pruned.

    Dead inputs (``H_ii == 0``: zero on every calibration token) carry no signal: their weights are zeroed
    first, as in SparseGPT's ``fasterprune`` (``W[:, dead] = 0``). They then have saliency 0, so they fill
    the pruned slots before any live weight and count towards the quota, as in SparseGPT: a dead weight
    pruned is one live weight kept. ``keep`` stays exact; where a group (N:M) or block (unstructured) has
    more dead weights than pruned slots, the surplus is kept as zeros, so ``W_new`` then has more zeros
    than the pattern asks.
    """
    if sparsity.kind not in ("nm", "unstructured"):
        raise ValueError(f"obs_prune handles N:M and unstructured patterns, not {sparsity}")
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight columns {cols}")
    out_dtype = W.dtype
    Wf = W.detach().to(torch.float32).clone()  # (rows, cols)
    # SparseGPT zeroes dead inputs' weights before choosing masks; left in place, they would take N:M and
    # unstructured slots from live weights (H_ii = 1 set by damped_inverse gives them a large score).
    Wf[:, torch.diagonal(H).to(Wf.device) == 0] = 0.0
    if hinv_upper is not None:
        U = hinv_upper.to(device=Wf.device, dtype=torch.float32)
    else:
        U, _ = inverse_cholesky_upper(H.to(Wf.device), percdamp)  # (cols, cols), upper
    nm = sparsity.kind == "nm"
    if nm:
        m, n_drop = sparsity.m, sparsity.m - sparsity.n
        if cols % m:
            raise ValueError(f"{sparsity} needs in_features divisible by {m}, got {cols}")
        blocksize = max(m, (blocksize // m) * m)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=Wf.device)

    # Blocks are processed transposed, (count, rows): column i of W is then a contiguous row, which makes
    # the per-column rank-1 OBS updates cache-friendly on CPU (and no slower on GPU).
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wf[:, i1:i2].T.contiguous()  # (count, rows)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]  # (count, count)
        d1 = torch.diagonal(U1).reshape(-1, 1)  # (count, 1)
        mask1 = torch.zeros(count, rows, dtype=torch.bool, device=Wf.device)  # True = pruned
        if not nm:
            k = _split_count(rows * cols, sparsity.ratio, rows * i1, rows * i2)
            if k > 0:
                score = (W1**2 / d1**2).flatten()
                mask1.view(-1)[torch.topk(score, k, largest=False).indices] = True
        for i in range(count):
            w = W1[i]  # (rows,)
            if nm and i % m == 0:
                score = W1[i : i + m] ** 2 / d1[i : i + m] ** 2  # (m, rows)
                mask1.scatter_(0, i + torch.topk(score, n_drop, dim=0, largest=False).indices, True)
            q = w.masked_fill(mask1[i], 0.0)
            Q1[i] = q
            if compensate:
                err = (w - q) / U1[i, i]  # (rows,)
                W1[i:].addr_(U1[i, i:], err, alpha=-1.0)  # OBS update of the block's later columns
                Err1[i] = err
        Wf[:, i1:i2] = Q1.T
        pruned[:, i1:i2] = mask1.T
        if compensate and i2 < cols:
            Wf[:, i2:].addmm_(Err1.T, U[i1:i2, i2:], alpha=-1.0)  # lazy update of the later blocks
    Wf[pruned] = 0.0
    return Wf.to(out_dtype), ~pruned


def _group_diag_blocks(Hinv: torch.Tensor, groups: int, group_size: int) -> torch.Tensor:
    """Diagonal ``(group_size, group_size)`` blocks of ``Hinv``, shape ``(groups, gs, gs)``."""
    blocks = Hinv.reshape(groups, group_size, groups, group_size)
    idx = torch.arange(groups, device=Hinv.device)
    return blocks[idx, :, idx, :]  # (groups, gs, gs)


def group_saliency(W: torch.Tensor, Hinv: torch.Tensor, group_size: int, present: torch.Tensor | None = None) -> torch.Tensor:
    """OBS error of removing each column group alone: ``tr(W_g (Hinv_gg)^-1 W_g^T)``, shape ``(groups,)``.

    present: indices of the groups to score, shape ``(P,)`` (default all); the result is then ``(P,)``.
    Groups already removed must be left out: their downdated ``Hinv`` blocks are zero (singular).
    """
    rows, cols = W.shape
    groups = cols // group_size
    if present is None:
        present = torch.arange(groups, device=W.device)
    Hgg = _group_diag_blocks(Hinv, groups, group_size)[present]  # (P, gs, gs)
    Wg = W.reshape(rows, groups, group_size).permute(1, 0, 2)[present]  # (P, rows, gs)
    if group_size == 1:
        return (Wg.squeeze(-1) ** 2).sum(dim=1) / Hgg.reshape(-1)
    # Symmetrise before the batched solve: the downdates leave tiny asymmetries.
    Hgg = 0.5 * (Hgg + Hgg.transpose(1, 2))
    sol = torch.linalg.solve(Hgg, Wg.transpose(1, 2))  # (P, gs, rows) = Hgg^-1 W_g^T
    return (Wg.transpose(1, 2) * sol).sum(dim=(1, 2))


def obs_prune_groups(
    Ws: Sequence[torch.Tensor],
    Hs: Sequence[torch.Tensor],
    group_size: int,
    n_remove: int,
    *,
    percdamp: float = DEFAULT_PERCDAMP,
    compensate: bool = True,
    max_iters: int = 512,
) -> tuple[list[torch.Tensor], list[int]]:
    """Remove ``n_remove`` input-column groups shared by every ``W`` in ``Ws``, with group OBS.

    Ws: weights ``(rows_b, cols)`` with the same ``cols = groups * group_size`` (e.g. ``attn.to_out.0`` and
        ``attn.to_add_out`` for heads, ``group_size = head_dim``; ``ff.net.2`` alone for neurons, size 1).
    Hs: their input Hessians ``(cols, cols)``, one per weight.
    n_remove: groups to remove (``0 <= n_remove < groups``).
    compensate: update the surviving columns with the OBS correction (default True); False only zeroes the
        removed groups (ranked by the same saliency, computed once) and the dead inputs.
    max_iters: greedy iterations at most; with more groups to remove than this, the
        ``ceil(n_remove / max_iters)`` lowest-saliency groups go together in one iteration.

    Returns ``(Ws_new, keep)``: the updated weights (removed columns exactly zero, only kept columns changed,
    same dtypes/devices as given) and the sorted kept group indices.

    Dead inputs (``H_ii == 0`` in a weight's Hessian) have their columns of that weight zeroed first, as in
    SparseGPT: a group whose inputs are all dead then has saliency 0 and is removed first, with no update
    to the other columns (its ``Hinv`` block is decoupled).
    """
    if len(Ws) != len(Hs) or not Ws:
        raise ValueError("obs_prune_groups needs one Hessian per weight and at least one weight")
    cols = Ws[0].shape[1]
    if cols % group_size or any(W.shape[1] != cols for W in Ws):
        raise ValueError(f"weights must share in_features divisible by group_size={group_size}")
    groups = cols // group_size
    if not 0 <= n_remove < groups:
        raise ValueError(f"cannot remove {n_remove} of {groups} groups")
    dtypes = [W.dtype for W in Ws]
    Wf = [W.detach().to(torch.float32).clone() for W in Ws]
    for W, H in zip(Wf, Hs):  # SparseGPT zeroes dead inputs: their H_ii = 1 would otherwise inflate the saliency
        W[:, torch.diagonal(H).to(W.device) == 0] = 0.0
    Hinvs = [damped_inverse(H.to(W.device), percdamp)[1] for W, H in zip(Wf, Hs)]
    removed = torch.zeros(groups, dtype=torch.bool, device=Wf[0].device)
    per_iter = max(1, math.ceil(n_remove / max(1, max_iters)))
    done = 0
    while done < n_remove:
        # Score only the groups still present: a removed group's Hinv block is downdated to zero (singular).
        present = (~removed).nonzero().flatten()  # (P,)
        score = sum(group_saliency(W, Hinv, group_size, present) for W, Hinv in zip(Wf, Hinvs))  # (P,)
        k = min(per_iter, n_remove - done)
        chosen = present[torch.topk(score, k, largest=False).indices].sort().values  # (k,)
        cols_s = (chosen.unsqueeze(1) * group_size + torch.arange(group_size, device=chosen.device)).flatten()
        for b in range(len(Wf)):
            if compensate:
                Hinv = Hinvs[b]
                Hss = Hinv[cols_s][:, cols_s]  # (k*gs, k*gs)
                Hss = 0.5 * (Hss + Hss.T)
                A = torch.linalg.solve(Hss, Hinv[cols_s, :])  # (k*gs, cols) = Hss^-1 Hinv[S, :]
                Wf[b].addmm_(Wf[b][:, cols_s], A, alpha=-1.0)  # W -= W[:, S] A
                Hinv.addmm_(Hinv[:, cols_s], A, alpha=-1.0)  # Hinv -= Hinv[:, S] A (downdate)
                # The downdated rows/columns of S are zero up to rounding: make them exact, so that later
                # updates (through Hinv[S', :]) leave the removed columns exactly zero.
                Hinv[cols_s, :] = 0.0
                Hinv[:, cols_s] = 0.0
            Wf[b][:, cols_s] = 0.0
        removed[chosen] = True
        done += k
    keep = (~removed).nonzero().flatten().tolist()
    return [W.to(dt) for W, dt in zip(Wf, dtypes)], keep


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``: the squared output error ``||(W - W') X^T||^2`` for ``H = X^T X``."""
    D = (W.float() - W_new.float()).to(H.device)
    return float(((D @ H.float()) * D).sum())
