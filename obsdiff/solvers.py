"""Optimal Brain Surgeon solvers: pure functions over tensors, CPU or GPU, float32 inside.

Conventions (all solvers, see also :mod:`obsdiff.baselines`):

- ``W`` is an ``nn.Linear`` weight, shape ``(out_features, in_features)`` = ``(rows, cols)``.
- ``H`` is the layer's input Hessian ``X^T X`` (normalised), shape ``(cols, cols)``; any positive scale.
- The returned ``keep`` mask is boolean, True where a weight survives; ``W_new`` has exact zeros where
  ``keep`` is False, the dtype and device of ``W``, and (with compensation) updated surviving weights.

Unstructured and N:M follow SparseGPT's blocked OBS (Frantar & Alistarh 2023): the upper Cholesky factor
``U`` of ``H^-1`` is walked column by column; pruning column ``i``'s weights to ``q`` spreads the error
``(w - q) / U_ii`` over the not-yet-visited columns through row ``i`` of ``U`` (the OBS update restricted
to the remaining weights), lazily: the errors of a run of columns reach the later columns in one matrix
product (here in recursive halves, see :func:`obs_prune`). Masks are chosen per block of 128 columns
(unstructured) or per group of M columns (N:M) with the OBS saliency ``w^2 / U_ii^2``, on weights already
updated by the previous columns. ``U`` comes from one Cholesky factorisation of the reversed Hessian
(:func:`inverse_cholesky_upper`), or is not formed at all (:func:`obs_prune` then works with that
Cholesky factor, ``U^-1``).

Structured pruning removes whole column groups (an attention head = ``head_dim`` input columns of the
attention output projection; an FFN neuron = one input column of the FFN output projection) with the
group OBS update ``dW = -W[:, S] (Hinv[S, S])^-1 Hinv[S, :]``, greedily, lowest saliency
``tr(W_S (Hinv[S, S])^-1 W_S^T)`` first, downdating ``Hinv`` after each removal. Several weight matrices
that share the groups (the image and text branches of the joint attention) are ranked by the sum of
their saliencies and compensated each with its own Hessian. The groups may tile a column range of the
weights only (the attention heads of Flux's single-block ``proj_out``, whose input is the attention output
followed by the MLP hidden state), with the OBS update still reaching every surviving column; columns
removed earlier (``frozen``) are treated as dead inputs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from obsdiff.patterns import Sparsity
from obsdiff.weight_quant import WeightQuant, round_to_grid, scales_for

DEFAULT_BLOCKSIZE = 128
DEFAULT_PERCDAMP = 0.01
_MAX_DAMP_RETRIES = 8
_OBS_LEAF = 8  # columns per leaf of obs_prune's recursive halving (rounded to whole N:M groups)
_TRIANGULAR_LEAF = 512  # below this size a triangular inverse is one solve against the identity
_CHOLESKY_LEAF = 512  # below this size a Cholesky factorisation is one LAPACK call


def _all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` has no inf or NaN: its sum is finite (one pass instead of ``isfinite``'s several; a
    false alarm needs entries near 1e38 / numel, far beyond any usable factor)."""
    return bool(torch.isfinite(x.sum()))


def _split(n: int) -> int:
    """Where to halve ``n > 1`` rows for a blocked factorisation: ``0 < h < n``, a multiple of 64 (aligned
    BLAS panels) for large ``n``."""
    return (n // 2 + 63) // 64 * 64 if n >= 256 else n // 2


def _cholesky(A: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """Lower Cholesky factor ``L`` of a symmetric ``A`` ``(n, n)`` (lower triangle read), and whether ``A``
    was positive definite (as ``torch.linalg.cholesky_ex``'s ``info == 0``). out: where to write ``L``
    (default a new tensor).

    Blocked, recursively (LAPACK's ``potrf2`` order): ``L11 = chol(A11)``, ``L21 = A21 L11^-T``,
    ``L22 = chol(A22 - L21 L21^T)``, so the work is in triangular solves and matrix products, which use
    several CPU cores better than one LAPACK ``potrf`` call (up to 2x faster at 6144 on 2 cores).
    """
    n = A.shape[0]
    L = torch.empty_like(A) if out is None else out  # (n, n)
    if n <= _CHOLESKY_LEAF:
        leaf, info = torch.linalg.cholesky_ex(A)
        L.copy_(leaf)
        return L, int(info) == 0
    h = _split(n)
    L[:h, h:].zero_()
    if not _cholesky(A[:h, :h], L[:h, :h])[1]:
        return L, False
    # L21 = A21 L11^-T, solved as L11 L21^T = A21^T: torch hands this orientation to BLAS with fewer copies
    L[h:, :h].copy_(torch.linalg.solve_triangular(L[:h, :h], A[h:, :h].T, upper=False).T)  # (n-h, h)
    schur = torch.addmm(A[h:, h:], L[h:, :h], L[h:, :h].T, alpha=-1.0)  # (n-h, n-h) = A22 - L21 L21^T
    return L, _cholesky(schur, L[h:, h:])[1]


def _damped_cholesky(
    H: torch.Tensor, percdamp: float, damp: float | None, *, reverse: bool, finish: Callable[[torch.Tensor], Any], frozen: torch.Tensor | None = None
) -> tuple[Any, float]:
    """Lower Cholesky factor ``L`` of ``H + damp I`` (of ``J (H + damp I) J`` with ``reverse``, ``J`` the
    reversal permutation), handed to ``finish``; returns ``(finish(L), damp)``.

    frozen: bool ``(cols,)``, inputs already removed from the layer: their rows and columns of (the working
    copy of) ``H`` are zeroed first, which makes them dead inputs, decoupled from the others.
    Dead inputs (``H_ii == 0``) get ``H_ii = 1`` first, as in SparseGPT; ``damp`` defaults to
    ``percdamp * mean(diag(H))`` over the live inputs. When the factorisation fails or ``finish`` returns
    None (a non-finite result), the damping is multiplied by 10 and everything retried, up to 8 times (a
    zero damping starts the retries at 1e-6 of the mean diagonal). ``H`` itself is never modified.
    """
    H = H.detach()
    # One float32 copy of H is the working matrix: the flip copies, and so does the clone.
    Hd = torch.flip(H.to(torch.float32), (0, 1)) if reverse else H.to(torch.float32, copy=True)  # (cols, cols)
    if frozen is not None:
        fz = torch.flip(frozen, (0,)) if reverse else frozen  # (cols,) bool, in Hd's order
        Hd[fz] = 0.0
        Hd[:, fz] = 0.0
    diag = torch.diagonal(Hd)  # (cols,) view into Hd
    dead = diag == 0
    # Unlike SparseGPT, the dead inputs' H_ii = 1 stays out of the mean: it would tie the damping to the
    # scale of H (with H ~ 1e-4 and 2 dead heads of 8, the damping was ~1e4 times too large).
    mean_diag = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    mean_diag = mean_diag if mean_diag > 0 else 1.0
    base = diag.masked_fill(dead, 1.0)  # (cols,) the undamped diagonal, restored before each retry
    if damp is None:
        damp = percdamp * mean_diag
    for _ in range(_MAX_DAMP_RETRIES):
        diag.copy_(base + damp)
        L, ok = _cholesky(Hd)
        if ok:
            out = finish(L)
            if out is not None:
                return out, damp
        damp = damp * 10.0 if damp > 0 else 1e-6 * mean_diag
    raise ValueError(f"Hessian is not positive definite even with damping {damp:g}: the calibration inputs are degenerate")


def damped_inverse(
    H: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP, *, damp: float | None = None, frozen: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Cholesky-invert ``H + damp * I`` with ``damp = percdamp * mean(diag(H))`` (or the ``damp`` given).

    When the factorisation fails (a singular or badly conditioned ``H``), the damping is multiplied by 10
    and the factorisation retried, up to 8 times (a zero damping starts the retries at 1e-6 of the mean
    diagonal). Returns ``(L, Hinv, damp)``: the lower Cholesky factor of the damped ``H``, its inverse
    (float32), and the damping used. Dead inputs (``H_ii == 0``) get ``H_ii = 1`` first, as in SparseGPT;
    ``mean(diag(H))`` is taken over the live inputs only. frozen: bool ``(cols,)``, inputs treated as dead
    (their rows and columns of ``H`` zeroed in the working copy; ``H`` is not modified): the result is then
    the inverse of the problem without them, embedded, with exact zeros coupling them to the other inputs.
    """

    def finish(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        Hinv = torch.cholesky_inverse(L)  # (cols, cols)
        return (L, Hinv) if _all_finite(Hinv) else None

    (L, Hinv), damp = _damped_cholesky(H, percdamp, damp, reverse=False, finish=finish, frozen=frozen)
    return L, Hinv, damp


def _invert_lower(L: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``L^-1`` of a lower-triangular ``L`` ``(n, n)``, blocked: ``n^3 / 3`` flops in triangular solves,
    a third of one solve against the identity (LAPACK's ``trtri``, which torch does not expose).
    out: where to write it (default a new tensor).

    ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``, with the off-diagonal block from two
    triangular solves on the original blocks (no product with the inverses).
    """
    n = L.shape[0]
    Linv = torch.empty_like(L) if out is None else out  # (n, n)
    if n <= _TRIANGULAR_LEAF:
        Linv.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False))
        return Linv
    h = _split(n)
    Linv[:h, h:].zero_()
    _invert_lower(L[:h, :h], Linv[:h, :h])
    _invert_lower(L[h:, h:], Linv[h:, h:])
    BAinv = torch.linalg.solve_triangular(L[:h, :h], L[h:, :h], upper=False, left=False)  # (n-h, h) = B A^-1
    torch.linalg.solve_triangular(L[h:, h:], BAinv, upper=False, out=Linv[h:, :h])
    Linv[h:, :h].neg_()
    return Linv


def inverse_cholesky_upper(H: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``U^T U = (H + damp I)^-1``, positive diagonal),
    with the damping and dead-input policy of :func:`damped_inverse`. Returns ``(U, damp)``, U float32.

    One Cholesky factorisation and one triangular inverse (SparseGPT's Cholesky, inverse and Cholesky of
    the inverse cost twice as much): with ``J`` the reversal permutation and ``J (H + damp I) J = L L^T``,
    ``(H + damp I)^-1 = J L^-T L^-1 J = (J L^-1 J)^T (J L^-1 J)``, and ``U = J L^-1 J`` is upper triangular
    with a positive diagonal, hence the unique such factor. Retried with more damping (as in
    :func:`damped_inverse`) when the factorisation fails or ``U`` is not finite.
    """

    def finish(L: torch.Tensor) -> torch.Tensor | None:
        U = torch.flip(_invert_lower(L), (0, 1))  # (cols, cols) = J L^-1 J
        return U if _all_finite(U) else None

    return _damped_cholesky(H, percdamp, None, reverse=True, finish=finish)


def split_count(total: int, ratio: float, start: int, stop: int) -> int:
    """Share of ``round(ratio * total)`` falling in ``[start, stop)`` so that the shares sum exactly."""
    return int(round(ratio * stop)) - int(round(ratio * start))


def _reversed_factor(H: torch.Tensor, percdamp: float, blocksize: int) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """The factor :func:`obs_prune` works with when no ``U`` is given: ``(V, U_blocks, damp)``.

    V: ``(cols, cols)`` upper, ``V V^T = H + damp I``: ``V = J L J`` for the Cholesky factor of the reversed
    damped Hessian, ``J (H + damp I) J = L L^T``; so ``V = U^-1`` for the ``U`` of
    :func:`inverse_cholesky_upper` (same damping and dead-input policy, retried when the factorisation fails
    or V or a block inverse is not finite). U_blocks: the diagonal blocks of ``U``, ``U_bb = V_bb^-1``, for the
    column blocks ``[k * blocksize, (k + 1) * blocksize)``, each ``(count, count)``.
    One Cholesky factorisation and no inverse of the whole matrix: half the flops of ``U``.
    """

    def finish(L: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        V = torch.flip(L, (0, 1))  # (cols, cols) = J L J, upper
        blocks = []
        for i in range(0, V.shape[0], blocksize):
            Vb = V[i : i + blocksize, i : i + blocksize]  # (count, count)
            blocks.append(torch.linalg.solve_triangular(Vb, torch.eye(Vb.shape[0], dtype=V.dtype, device=V.device), upper=True))
        return (V, blocks) if _all_finite(V) and all(_all_finite(b) for b in blocks) else None

    (V, blocks), damp = _damped_cholesky(H, percdamp, None, reverse=True, finish=finish)
    return V, blocks, damp


def _in_halves(lo: int, hi: int, unit: int, visit: Callable[[int, int], None], update: Callable[[int, int, int], None] | None) -> None:
    """Visit the columns ``[lo, hi)`` left to right in pieces of ``unit`` columns (the last may be shorter),
    halving recursively; between the halves, ``update(lo, mid, hi)`` carries the left half's errors to the
    right half in one product. This is SparseGPT's lazy batch update made recursive: the same sums as its
    column loop, in another order, with large products (BLAS 3) in place of one rank-1 update per column.
    """
    if hi - lo <= unit:
        visit(lo, hi)
        return
    mid = lo + max(unit, (hi - lo) // 2 // unit * unit)  # lo < mid < hi, a whole number of units past lo
    _in_halves(lo, mid, unit, visit, update)
    if update is not None:
        update(lo, mid, hi)
    _in_halves(mid, hi, unit, visit, update)


def _rank_weights(m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (m, m*m), c (m, 1))`` with ``rank = A @ le + c`` for ``le[j*m + k] = (s_j <= s_k)``: the rank
    ``#{j : (s_j, j) < (s_k, k)}`` of each of ``m`` scores (0 = lowest, ties to the lower index), since j
    comes before k when ``s_j <= s_k`` for ``j < k`` and when ``s_j < s_k = 1 - (s_k <= s_j)`` for ``j > k``."""
    A = torch.zeros(m, m, m, device=device)  # (k, j, k')
    for k in range(m):
        A[k, :k, k] = 1.0  # j < k: le[j, k]
        A[k, k, k + 1 :] = -1.0  # j > k: -le[k, j]
    c = torch.arange(m - 1, -1, -1, dtype=torch.float32, device=device).unsqueeze(1)  # (m, 1) = m - 1 - k
    return A.reshape(m, m * m), c


def _obs_leaf(
    W1: torch.Tensor, U1: torch.Tensor, E1: torch.Tensor, K1: torch.Tensor, lo: int, hi: int,
    *, m: int, n_keep: int, ranking: tuple[torch.Tensor, ...] | None, compensate: bool,
    scale: torch.Tensor | None = None, quant: WeightQuant | None = None,
) -> None:
    """SparseGPT's column loop over the columns ``[lo, hi)`` of one block, a few columns, in place.

    W1: ``(count, rows)`` the block's current weights, column i of W as row i; the visited columns end as
        their pruned values ``q``. U1: ``(count, count)`` the block's diagonal block of ``U``.
    E1: ``(count, rows)`` receives the scaled errors ``(w - q) / U_ii`` (each then updates the leaf's later
        columns through row i of U1).
    K1: ``(count, rows)`` float, 1 where a weight is kept, 0 where pruned; set here per group of ``m``
        columns when ``ranking`` is given (N:M: the ``n_keep`` highest ``w^2 / U_ii^2`` of each row in the
        group are kept, on the weights updated by every earlier column), else already set (unstructured).
        Float, as 0/1 products are several times faster than boolean masking on CPU.
    scale, quant: with a :class:`~obsdiff.weight_quant.WeightQuant`, the kept weights are also rounded to its grid
        of scales ``scale`` ``(rows,)`` (one quantization group holds the leaf), ``q = keep * round(w)``.
    """
    inv_d = torch.diagonal(U1)[lo:hi].reciprocal().unsqueeze(1)  # (hi-lo, 1) = 1 / U_ii
    for g1 in range(lo, hi, m):
        g2 = min(g1 + m, hi)
        keep = K1[g1:g2]  # (g, rows) view
        if ranking is not None:
            A, c, le = ranking  # le: (m, m, rows) buffer
            score = (W1[g1:g2] * inv_d[g1 - lo : g2 - lo]).square_()  # (m, rows) = w^2 / U_ii^2
            torch.le(score.unsqueeze(1), score.unsqueeze(0), out=le)  # (m, m, rows) = s_j <= s_k
            torch.ge(torch.addmm(c, A, le.view(m * m, -1)), m - n_keep, out=keep)  # rank >= m - n_keep
        if quant is not None:
            # one buffer for every column's q, in-place steps: the per-column cost on small layers is the number of
            # calls and allocations, not arithmetic (the same operations as round_to_grid(w, s) * keep, the same values)
            q = torch.empty_like(W1[g1])  # (rows,)
            for i in range(g1, g2):
                w = W1[i]  # (rows,) view
                round_to_grid(w, scale, quant, out=q).mul_(keep[i - g1])
                if compensate:
                    e = E1[i]
                    torch.sub(w, q, out=e).mul_(inv_d[i - lo])  # (rows,) = (w - q) / U_ii
                    if i + 1 < hi:
                        W1[i + 1 : hi].addr_(U1[i, i + 1 : hi], e, alpha=-1.0)
                w.copy_(q)
            continue
        if compensate:
            inv_dg = inv_d[g1 - lo : g2 - lo]  # (g, 1)
            pruned = torch.addcmul(inv_dg, keep, inv_dg, value=-1.0)  # (g, rows): 1 / U_ii where pruned, else 0
            for i in range(g1, g2):
                torch.mul(W1[i], pruned[i - g1], out=E1[i])  # (rows,) = (w - q) / U_ii
                if i + 1 < hi:
                    W1[i + 1 : hi].addr_(U1[i, i + 1 : hi], E1[i], alpha=-1.0)
        W1[g1:g2].mul_(keep)  # q: the group's columns are final


def obs_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: Sparsity,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    compensate: bool = True,
    hinv_upper: torch.Tensor | None = None,
    quant: WeightQuant | None = None,
) -> tuple[torch.Tensor, ...]:
    """Prune ``W`` to ``sparsity`` (``nm`` or ``unstructured``; ``dense`` with ``quant``) with blocked OBS, and
    quantize it jointly when ``quant`` is given; returns ``(W_new, keep)``, or ``(W_new, keep, scales)`` with
    ``quant``.

    W: ``(rows, cols)`` weight of ``y = x W^T``; H: ``(cols, cols)`` input Hessian.
    blocksize: columns per unstructured mask-selection block (default 128; rounded down to a multiple of M
        for N:M, where masks are chosen per group of M columns and the result does not depend on it beyond
        float rounding).
    percdamp: damping as a share of the mean Hessian diagonal (default 1%).
    compensate: False keeps the same masks rule but leaves the surviving weights unchanged
        (masks are then chosen on the original weights; dead inputs' weights are zeroed all the same).
    hinv_upper: the factor ``U`` from :func:`inverse_cholesky_upper` of ``H``, when already computed for
        another layer with the same input (q/k/v); ``H`` is then only used for its shape and dead inputs.
        Without it, ``H`` is factorised once and ``U`` never formed (:func:`_reversed_factor`).
    quant: round the kept weights to this grid in the same pass (GPTQ's update, as SparseGPT's joint mode): each
        column's rounding error, like a pruned weight's, is spread over the later columns; the scales of a group
        of ``quant.group_size`` columns come from its weights as updated by every earlier column (and, for
        unstructured, its kept weights), when it is reached (``blocksize`` becomes the group size, so a block is a
        group). ``W_new`` is then exactly ``codes * scales`` (:mod:`obsdiff.weight_quant`); scales:
        ``(rows, groups)`` float32.

    Unstructured: every block of columns loses exactly its share of ``round(ratio * rows * cols)``
    weights, so the layer's sparsity is exact. N:M: in every row and every group of M consecutive input
    columns, exactly M - N weights are pruned (ties in the saliency go to the lower column).

    Dead inputs (``H_ii == 0``: zero on every calibration token) carry no signal: their weights are zeroed
    first, as in SparseGPT's ``fasterprune`` (``W[:, dead] = 0``). They then have saliency 0, so they fill
    the pruned slots before any live weight and count towards the quota, as in SparseGPT: a dead weight
    pruned is one live weight kept. ``keep`` stays exact; where a group (N:M) or block (unstructured) has
    more dead weights than pruned slots, the surplus is kept as zeros, so ``W_new`` then has more zeros
    than the pattern asks.

    The algorithm is SparseGPT's (masks, OBS updates and their sums are the same, in another order):
    column blocks are visited in recursive halves (:func:`_in_halves`), and so are the columns inside a
    block, down to a few columns updated one by one (:func:`_obs_leaf`). With ``U`` given, the errors
    ``E = (W - Q) / diag(U)`` of the visited columns reach the later ones as ``E U``. Without it, the
    earlier blocks' effect on block b, ``E_<b U_<b,b``, is ``-D_<b V_<b,b U_bb`` for the final changes
    ``D = W - Q`` (from ``E U = D`` and ``U V = I``, ``V = U^-1``): products with the Cholesky factor ``V``
    gathered as the halves are visited, then one product with the small ``U_bb`` when block b is reached.
    """
    if sparsity.kind not in ("nm", "unstructured") and not (sparsity.kind == "dense" and quant is not None):
        raise ValueError(f"obs_prune handles N:M and unstructured patterns (and dense with quant), not {sparsity}")
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight columns {cols}")
    nm = sparsity.kind == "nm"
    if nm:
        m = sparsity.m
        if cols % m:
            raise ValueError(f"{sparsity} needs in_features divisible by {m}, got {cols}")
        blocksize = max(m, (blocksize // m) * m)
        leaf = m * max(1, _OBS_LEAF // m)
    else:
        m, leaf = _OBS_LEAF, _OBS_LEAF
    if quant is not None:
        blocksize = quant.group_size
    # Transposed, (cols, rows): column i of W is a contiguous row, which makes the per-column OBS updates
    # cache-friendly on CPU (and no slower on GPU).
    WT = W.detach().to(torch.float32).T.contiguous()  # (cols, rows)
    # SparseGPT zeroes dead inputs' weights before choosing masks; left in place, they would take N:M and
    # unstructured slots from live weights (H_ii = 1 set by the damping gives them a large score).
    WT[torch.diagonal(H).to(WT.device) == 0] = 0.0
    if hinv_upper is not None:
        U = hinv_upper.to(device=WT.device, dtype=torch.float32)  # (cols, cols), upper
        V = U_blocks = None
        E = torch.empty_like(WT)  # (cols, rows) the scaled errors (w - q) / U_ii of the visited columns
    else:
        V, U_blocks, _ = _reversed_factor(H.to(WT.device), percdamp, blocksize)  # V (cols, cols) upper, V = U^-1
        U = E = None
        # D: (cols, rows), the final changes w - q of the visited columns; for the others, the products
        # sum_a V_ab^T D_a gathered so far from the visited blocks a
        D = torch.zeros_like(WT) if compensate else None
    K = torch.ones_like(WT)  # (cols, rows) 1 = kept, 0 = pruned
    scales = torch.empty(rows, quant.groups(cols), device=WT.device) if quant is not None else None  # (rows, groups)
    ranking = (*_rank_weights(m, WT.device), torch.empty(m, m, rows, device=WT.device)) if nm else None

    def visit_block(lo: int, hi: int) -> None:
        W1 = WT[lo:hi]  # (count, rows) view
        if U_blocks is None:
            U1, E1 = U[lo:hi, lo:hi], E[lo:hi]
        else:
            U1, E1 = U_blocks[lo // blocksize], torch.empty_like(W1)
            if compensate:
                W0 = W1.clone()
                W1.addmm_(U1.T, D[lo:hi])  # w = w0 - E_<b U_<b,b = w0 + U_bb^T (V_<b,b^T D_<b)
        if sparsity.kind == "unstructured":  # the block's mask, on weights updated by every earlier block
            k = split_count(rows * cols, sparsity.ratio, rows * lo, rows * hi)
            if k > 0:
                score = (W1 / torch.diagonal(U1).unsqueeze(1)).square_()  # (count, rows) = w^2 / U_ii^2
                K[lo:hi].view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = 0.0
        s = None
        if quant is not None:  # the group's scales, on weights updated by every earlier group (kept ones if known)
            s = scales_for((W1 if nm else W1 * K[lo:hi]).T, quant)  # (rows,)
            scales[:, lo // blocksize] = s

        def visit_leaf(a: int, b: int) -> None:
            _obs_leaf(W1, U1, E1, K[lo:hi], a, b, m=m, n_keep=sparsity.n if nm else 0, ranking=ranking, compensate=compensate,
                      scale=s, quant=quant)

        def update_in_block(a: int, mid: int, b: int) -> None:
            W1[mid:b].addmm_(U1[a:mid, mid:b].T, E1[a:mid], alpha=-1.0)  # (b-mid, rows) -= (b-mid, mid-a) @ (mid-a, rows)

        _in_halves(0, hi - lo, leaf, visit_leaf, update_in_block if compensate else None)
        if U_blocks is not None and compensate:
            torch.sub(W0, W1, out=D[lo:hi])  # d = w0 - q

    def update(lo: int, mid: int, hi: int) -> None:
        if U_blocks is None:
            WT[mid:hi].addmm_(U[lo:mid, mid:hi].T, E[lo:mid], alpha=-1.0)  # w -= U^T e
        else:
            D[mid:hi].addmm_(V[lo:mid, mid:hi].T, D[lo:mid])  # gather V^T d

    _in_halves(0, cols, blocksize, visit_block, update if compensate else None)
    W_new, keep = WT.T.contiguous().to(W.dtype), K.bool().T.contiguous()
    return (W_new, keep) if quant is None else (W_new, keep, scales)


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
    if group_size == 1:  # single columns (FFN neurons): ||W[:, j]||^2 / Hinv_jj, without gathering W's columns
        return W.square().sum(dim=0)[present] / torch.diagonal(Hinv)[present]
    Hgg = _group_diag_blocks(Hinv, groups, group_size)[present]  # (P, gs, gs)
    Wg = W.reshape(rows, groups, group_size).permute(1, 0, 2)[present]  # (P, rows, gs)
    # Symmetrise before the batched solve: the downdates leave tiny asymmetries.
    Hgg = 0.5 * (Hgg + Hgg.transpose(1, 2))
    sol = torch.linalg.solve(Hgg, Wg.transpose(1, 2))  # (P, gs, rows) = Hgg^-1 W_g^T
    return (Wg.transpose(1, 2) * sol).sum(dim=(1, 2))


def group_columns(
    width: int, group_size: int, cols: tuple[int, int] | None, frozen: Sequence[int] | torch.Tensor | None, device: torch.device
) -> tuple[int, int, torch.Tensor | None]:
    """Where the column groups of a weight with ``width`` input columns lie: ``(start, stop, frozen_mask)``.

    cols: the range ``[start, stop)`` the groups tile (default the whole width); it must hold whole groups.
    frozen: absolute indices of columns already removed (or a bool mask ``(width,)``); returned as a bool
        mask ``(width,)`` on ``device``, None when there are none (the solvers then run exactly as without).
    """
    start, stop = (0, width) if cols is None else (int(cols[0]), int(cols[1]))
    if not 0 <= start < stop <= width or (stop - start) % group_size:
        raise ValueError(f"column range [{start}, {stop}) of in_features={width} must hold whole groups of group_size={group_size}")
    if frozen is None:
        return start, stop, None
    idx = torch.as_tensor(frozen, device=device)
    if idx.dtype == torch.bool:
        if idx.shape != (width,):
            raise ValueError(f"a frozen mask must have shape ({width},), got {tuple(idx.shape)}")
        mask = idx.clone()
    else:
        idx = idx.long().flatten()
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < width):
            raise ValueError(f"frozen columns must lie in [0, {width})")
        mask = torch.zeros(width, dtype=torch.bool, device=device)
        mask[idx] = True
    return start, stop, (mask if bool(mask.any()) else None)


def obs_prune_groups(
    Ws: Sequence[torch.Tensor],
    Hs: Sequence[torch.Tensor],
    group_size: int,
    n_remove: int,
    *,
    percdamp: float = DEFAULT_PERCDAMP,
    compensate: bool = True,
    max_iters: int = 512,
    cols: tuple[int, int] | None = None,
    frozen: Sequence[int] | torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """Remove ``n_remove`` input-column groups shared by every ``W`` in ``Ws``, with group OBS.

    Ws: weights ``(rows_b, width)`` with the same ``width`` (e.g. ``attn.to_out.0`` and ``attn.to_add_out``
        for heads, ``group_size = head_dim``; ``ff.net.2`` alone for neurons, size 1).
    Hs: their input Hessians ``(width, width)``, one per weight.
    n_remove: groups to remove (``0 <= n_remove < groups``).
    compensate: update the surviving columns with the OBS correction (default True); False only zeroes the
        removed groups (ranked by the same saliency, computed once) and the dead inputs.
    max_iters: greedy iterations at most; with more groups to remove than this, the
        ``ceil(n_remove / max_iters)`` lowest-saliency groups go together in one iteration.
    cols: ``(start, stop)``, the column range the groups tile, ``groups = (stop - start) / group_size``
        numbered from ``start`` (default the whole width). Only groups in the range are removed, but the
        Hessian and the OBS update span the whole width: removing a group compensates through every
        surviving column, inside and outside the range (Flux's single-block ``proj_out``, whose input is
        the attention output then the MLP hidden state: heads in the first range, neurons in the second).
    frozen: absolute indices of columns already removed (e.g. the heads cut from ``proj_out`` before its
        neurons), or a bool mask ``(width,)``. They are treated as dead inputs: zeroed in every weight, and
        their rows and columns of each ``H`` zeroed before the inversion (:func:`damped_inverse`), so their
        ``Hinv`` rows and columns are decoupled (exact zeros off the diagonal): no update reaches them, they
        stay exactly zero, and the result is that of the problem with those columns deleted. A group in the
        range whose columns are all frozen costs nothing and is removed first, counting towards ``n_remove``.

    Returns ``(Ws_new, keep)``: the updated weights (removed columns exactly zero, only kept columns changed,
    same dtypes/devices as given) and the sorted kept group indices, relative to the range.

    Dead inputs (``H_ii == 0`` in a weight's Hessian) have their columns of that weight zeroed first, as in
    SparseGPT: a group whose inputs are all dead then has saliency 0 and is removed first, with no update
    to the other columns (its ``Hinv`` block is decoupled).
    """
    if len(Ws) != len(Hs) or not Ws:
        raise ValueError("obs_prune_groups needs one Hessian per weight and at least one weight")
    width = Ws[0].shape[1]
    if any(W.shape[1] != width for W in Ws):
        raise ValueError("weights must share in_features")
    start, stop, frozen_mask = group_columns(width, group_size, cols, frozen, Ws[0].device)
    groups = (stop - start) // group_size
    if not 0 <= n_remove < groups:
        raise ValueError(f"cannot remove {n_remove} of {groups} groups")
    dtypes = [W.dtype for W in Ws]
    Wf = [W.detach().to(torch.float32).clone() for W in Ws]
    Hinvs = []
    for W, H in zip(Wf, Hs):  # SparseGPT zeroes dead inputs: their H_ii = 1 would otherwise inflate the saliency
        fz = None if frozen_mask is None else frozen_mask.to(W.device)  # (width,) bool
        dead = torch.diagonal(H).to(W.device) == 0  # (width,)
        W[:, dead if fz is None else dead | fz] = 0.0
        Hinvs.append(damped_inverse(H.to(W.device), percdamp, frozen=fz)[1])  # frozen inputs decoupled, as dead ones
    removed = torch.zeros(groups, dtype=torch.bool, device=Wf[0].device)
    per_iter = max(1, math.ceil(n_remove / max(1, max_iters)))
    done = 0
    while done < n_remove:
        # Score only the groups still present: a removed group's Hinv block is downdated to zero (singular).
        present = (~removed).nonzero().flatten()  # (P,)
        score = sum(group_saliency(W[:, start:stop], Hinv[start:stop, start:stop], group_size, present) for W, Hinv in zip(Wf, Hinvs))  # (P,)
        k = min(per_iter, n_remove - done)
        chosen = present[torch.topk(score, k, largest=False).indices].sort().values  # (k,)
        cols_s = (start + chosen.unsqueeze(1) * group_size + torch.arange(group_size, device=chosen.device)).flatten()  # (k*gs,) absolute
        for b in range(len(Wf)):
            if compensate:
                Hinv = Hinvs[b]
                Hss = Hinv[cols_s][:, cols_s]  # (k*gs, k*gs)
                Hss = 0.5 * (Hss + Hss.T)
                A = torch.linalg.solve(Hss, Hinv[cols_s, :])  # (k*gs, width) = Hss^-1 Hinv[S, :]
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
