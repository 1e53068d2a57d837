"""OBS solvers and baselines on synthetic layers with real-like correlated inputs."""

import math

import pytest
import torch

from obsdiff.baselines import magnitude_prune, magnitude_prune_groups, wanda_prune, wanda_prune_groups
from obsdiff.patterns import parse_sparsity
from obsdiff import solvers
from obsdiff.solvers import damped_inverse, inverse_cholesky_upper, obs_prune, obs_prune_groups, reconstruction_error
from tests.prune_helpers import correlated_inputs, output_error, single_thread
from tests.tolerances import sum_rtol


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _layer(rows=64, cols=256, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    X = correlated_inputs(tokens, cols, seed)  # (tokens, cols)
    W = torch.randn(rows, cols, generator=g) * 0.05
    H = X.T @ X / tokens
    return W, H, X


SOLVERS = {"obs": obs_prune, "wanda": wanda_prune, "magnitude": magnitude_prune}


@pytest.mark.parametrize("method", list(SOLVERS))
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_is_exact(method, pattern):
    W, H, _ = _layer(rows=48, cols=192)  # 192 = 1.5 blocks of 128: exercises a partial last block
    sp = parse_sparsity(pattern)
    W_new, keep = SOLVERS[method](W, H, sp)
    groups = (W_new != 0).reshape(48, 192 // sp.m, sp.m).sum(dim=2)
    assert bool((groups == sp.n).all()), f"every group of {sp.m} must keep exactly {sp.n}"
    assert torch.equal(keep, W_new != 0)
    assert W_new.dtype == W.dtype and W_new.shape == W.shape


@pytest.mark.parametrize("method", list(SOLVERS))
@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.77])
def test_unstructured_sparsity_is_exact(method, ratio):
    rows, cols = 37, 200  # odd sizes: rounding spread over blocks/rows must still sum exactly
    W, H, _ = _layer(rows=rows, cols=cols)
    W_new, keep = SOLVERS[method](W, H, parse_sparsity(f"unstructured:{ratio}"), blocksize=64)
    assert int((W_new == 0).sum()) == round(ratio * rows * cols)
    assert int((~keep).sum()) == round(ratio * rows * cols)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured:0.5", "unstructured:0.7"])
def test_obs_reconstruction_beats_wanda_and_magnitude(pattern):
    W, H, X = _layer()
    sp = parse_sparsity(pattern)
    errs = {name: output_error(W, fn(W, H, sp)[0], X) for name, fn in SOLVERS.items()}
    assert errs["obs"] < errs["wanda"], errs
    assert errs["obs"] < errs["magnitude"], errs
    # the closed form used in benchmarks agrees with the explicit product: both are float32 sums over the T = 2048
    # tokens (through H = X^T X / T, or directly), sum_rtol(2048) = 2.4e-4 apart at worst (measured 2.3e-6)
    W_obs = obs_prune(W, H, sp)[0]
    assert reconstruction_error(W, W_obs, H) == pytest.approx(output_error(W, W_obs, X) ** 2 / X.shape[0], rel=4 * sum_rtol(X.shape[0]))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured:0.5"])
def test_identity_hessian_picks_the_magnitude_mask(pattern):
    W, _, _ = _layer(rows=32, cols=128)
    H = torch.eye(128)
    sp = parse_sparsity(pattern)
    # one mask-selection block = the whole layer, as magnitude ranks the whole layer
    W_obs, keep_obs = obs_prune(W, H, sp, blocksize=128)
    W_mag, keep_mag = magnitude_prune(W, H, sp)
    assert torch.equal(keep_obs, keep_mag)
    # H = I has no correlations to exploit: OBS leaves the kept weights unchanged (U is diagonal, so every update adds
    # exact zeros: measured equal; 1e-6 is 2e-5 of the weights' scale)
    assert torch.allclose(W_obs, W_mag, atol=1e-6)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.5"])
def test_compensation_lowers_error(pattern):
    W, H, X = _layer()
    sp = parse_sparsity(pattern)
    with_comp = output_error(W, obs_prune(W, H, sp)[0], X)
    without = output_error(W, obs_prune(W, H, sp, compensate=False)[0], X)
    assert with_comp < 0.9 * without


def test_degenerate_hessians_are_damped():
    W, _, _ = _layer(rows=16, cols=64)
    v = torch.randn(64, 1)
    H = v @ v.T  # rank 1: Cholesky fails without enough damping
    H[5, :] = 0
    H[:, 5] = 0  # a dead input channel
    W_new, keep = obs_prune(W, H, parse_sparsity("2:4"), percdamp=0.0)
    assert torch.isfinite(W_new).all()
    assert int(keep.sum()) == W.numel() // 2
    _, Hinv, damp = damped_inverse(H, 0.0)
    assert damp > 0 and torch.isfinite(Hinv).all()


def _dead_layer(dead_cols, rows=64, cols=256, seed=0):
    """``_layer`` with the inputs ``dead_cols`` exactly zero on every token, so ``H_ii = 0`` there."""
    W, _, X = _layer(rows=rows, cols=cols, seed=seed)
    X[:, dead_cols] = 0.0  # (tokens, cols)
    return W, X.T @ X / X.shape[0], X


def test_damping_ignores_dead_inputs():
    W, H, _ = _dead_layer([3, 40], rows=8, cols=64)
    live = torch.diagonal(H) != 0
    _, _, damp = damped_inverse(H, 0.01)
    # float32 means of the 62 live diagonal entries (scaled by 1e-4 below, each rounded): sum_rtol(62) apart at worst;
    # counting the dead inputs' H_ii = 1 would move the damping by orders of magnitude
    assert damp == pytest.approx(0.01 * float(torch.diagonal(H)[live].mean()), rel=sum_rtol(62))
    # the dead inputs' H_ii = 1 (SparseGPT) must not tie the damping, hence the solution, to the scale of H
    assert damped_inverse(1e-4 * H, 0.01)[2] == pytest.approx(1e-4 * damp, rel=sum_rtol(62))
    W1, keep1 = obs_prune(W, H, parse_sparsity("2:4"))
    W2, keep2 = obs_prune(W, 1e-4 * H, parse_sparsity("2:4"))
    # masks: decided with a margin (tests/tolerances.py, MASK_MARGIN); weights: 1e-4 * H rounds every entry (u), and the
    # solve multiplies that by kappa(H + 1% damping) = 2e3 (measured 1.5e-7, 5% of the tolerance)
    assert torch.equal(keep1, keep2) and torch.allclose(W1, W2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured:0.5"])
@pytest.mark.parametrize("dead", [[3, 70, 130, 200], [0, 1, 2, 3]], ids=["spread", "one-group"])
def test_obs_zeroes_dead_inputs_first(pattern, dead):
    rows, cols = 64, 256
    W, H, X = _dead_layer(dead, rows, cols)
    sp = parse_sparsity(pattern)
    # reference: SparseGPT's fasterprune zeroes the dead columns (W[:, dead] = 0) before choosing masks
    W_dead0 = W.clone()
    W_dead0[:, dead] = 0.0
    W_ref, keep_ref = obs_prune(W_dead0, H, sp)
    err_ref = reconstruction_error(W, W_ref, H)
    for hinv_upper in (None, inverse_cholesky_upper(H)[0]):  # the dead columns come from H in both cases
        W_new, keep = obs_prune(W, H, sp, hinv_upper=hinv_upper)
        # None: the reference's computation itself; U given: another factorisation of H, float32 rounding apart
        # (measured 7.5e-8 on weights of scale 0.05; masks decided with a margin, tests/tolerances.py MASK_MARGIN)
        assert torch.equal(keep, keep_ref)
        assert torch.allclose(W_new, W_ref, rtol=0, atol=1e-6)
        assert reconstruction_error(W, W_new, H) == pytest.approx(err_ref, rel=1e-5)  # measured 1e-7
        assert reconstruction_error(W, W_new, H) == pytest.approx(output_error(W, W_new, X) ** 2 / X.shape[0], rel=4 * sum_rtol(X.shape[0]))
        assert bool((W_new[:, dead] == 0).all()) and bool((W_new[~keep] == 0).all())
    # the pattern stays exact, and every dead weight takes a pruned slot while its group (block) has one
    if sp.kind == "nm":
        assert bool((keep.reshape(rows, cols // sp.m, sp.m).sum(dim=2) == sp.n).all())
        assert bool(((W_new != 0).reshape(rows, cols // sp.m, sp.m).sum(dim=2) <= sp.n).all())
        dead_per_group = torch.bincount(torch.tensor(dead) // sp.m)
        pruned_dead = int(dead_per_group.clamp(max=sp.m - sp.n).sum())  # per row
    else:
        # SparseGPT counts the dead zeros towards the quota: the layer's sparsity is exact, dead included
        assert int((~keep).sum()) == round(sp.ratio * rows * cols) == int((W_new == 0).sum())
        pruned_dead = len(dead)
    assert int((~keep[:, dead]).sum()) == rows * pruned_dead


# -- structured: column groups (heads of head_dim columns, FFN neurons of one column) -----------------
def _two_branches(heads=8, head_dim=16, seed=0):
    cols = heads * head_dim
    Wa, Ha, Xa = _layer(rows=96, cols=cols, seed=seed)
    Wb, Hb, Xb = _layer(rows=96, cols=cols, seed=seed + 1)
    return (Wa, Wb), (Ha, Hb), (Xa, Xb)


@pytest.mark.parametrize("fn", [obs_prune_groups, wanda_prune_groups, magnitude_prune_groups])
def test_structured_removes_exactly_the_requested_heads(fn):
    Ws, Hs, _ = _two_branches()
    new, keep = fn(Ws, Hs, 16, 3)
    assert len(keep) == 5 and keep == sorted(keep) and len(set(keep)) == 5
    removed = sorted(set(range(8)) - set(keep))
    for W_old, W_new in zip(Ws, new):
        cols = W_new.reshape(96, 8, 16)
        assert bool((cols[:, removed] == 0).all()), "removed heads' columns must be exactly zero"
        assert bool((cols[:, keep] != 0).all())
        assert W_new.shape == W_old.shape


def test_structured_neurons_and_chunked_greedy():
    W, H, X = _layer(rows=32, cols=256)
    for max_iters in (512, 10):  # 10 iterations: 8 neurons per iteration
        (W_new,), keep = obs_prune_groups([W], [H], 1, 77, max_iters=max_iters)
        assert len(keep) == 256 - 77
        assert int((W_new.abs().sum(dim=0) == 0).sum()) == 77


def test_structured_obs_compensates_and_beats_baselines():
    Ws, Hs, Xs = _two_branches()

    def err(new):
        return sum(output_error(W, Wn, X) ** 2 for W, Wn, X in zip(Ws, new, Xs))

    obs = err(obs_prune_groups(Ws, Hs, 16, 3)[0])
    no_comp = err(obs_prune_groups(Ws, Hs, 16, 3, compensate=False)[0])
    wanda = err(wanda_prune_groups(Ws, Hs, 16, 3)[0])
    mag = err(magnitude_prune_groups(Ws, Hs, 16, 3)[0])
    assert obs < no_comp and obs < wanda and obs < mag, (obs, no_comp, wanda, mag)


def test_joint_heads_are_ranked_over_both_branches():
    Ws, Hs, _ = _two_branches()
    Wa, Wb = Ws
    Wa = Wa.clone()
    Wb = Wb.clone()
    # head 2 is negligible in branch a but the largest in branch b: a joint ranking must keep it
    Wa[:, 32:48] *= 1e-3
    Wb[:, 32:48] *= 50.0
    _, keep_a_only = obs_prune_groups([Wa], [Hs[0]], 16, 3)
    _, keep_joint = obs_prune_groups([Wa, Wb], list(Hs), 16, 3)
    assert 2 not in keep_a_only and 2 in keep_joint


# -- structured with dead inputs: heads / neurons whose inputs are exactly zero in calibration ---------
def _dead_groups(branches, groups, group_size, dead, rows=96):
    cols = groups * group_size
    dead_cols = [g * group_size + j for g in dead for j in range(group_size)]
    layers = [_dead_layer(dead_cols, rows=rows, cols=cols, seed=b) for b in range(branches)]
    return [W for W, _, _ in layers], [H for _, H, _ in layers]


def _check_against_live_only(Ws, Hs, group_size, n_remove, dead, max_iters):
    """Run obs_prune_groups with dead groups and check it against the same call on the live groups alone."""
    groups = Ws[0].shape[1] // group_size
    dead_cols = [g * group_size + j for g in dead for j in range(group_size)]
    new, keep = obs_prune_groups(Ws, Hs, group_size, n_remove, max_iters=max_iters)  # must not raise
    assert set(dead).isdisjoint(keep), "dead groups cost nothing: they go first"
    assert len(keep) == groups - n_remove
    removed_cols = [c for c in range(Ws[0].shape[1]) if c // group_size not in keep]
    for W_new in new:
        assert bool((W_new[:, removed_cols] == 0).all()) and bool(torch.isfinite(W_new).all())
    # reference: dead groups cut out beforehand, the rest removed in the same chunks per iteration
    live_groups = [g for g in range(groups) if g not in dead]
    live_cols = [c for c in range(Ws[0].shape[1]) if c not in set(dead_cols)]
    per_iter = math.ceil(n_remove / max_iters)
    assert len(dead) % per_iter == 0, "the dead groups must fill whole iterations for the chunks to line up"
    ref_iters = max(1, math.ceil((n_remove - len(dead)) / per_iter))
    Ws_live = [W[:, live_cols] for W in Ws]
    Hs_live = [H[live_cols][:, live_cols] for H in Hs]
    ref, keep_ref = obs_prune_groups(Ws_live, Hs_live, group_size, n_remove - len(dead), max_iters=ref_iters)
    assert keep == [live_groups[g] for g in keep_ref]  # greedy choices with a margin (tests/tolerances.py MASK_MARGIN)
    # the same solve with and without the dead (decoupled) columns: float32 rounding apart, times the downdates'
    # conditioning (measured 1.2e-6 on weights of scale 0.05, 12% of the tolerance)
    err = sum(reconstruction_error(W, W_new, H) for W, W_new, H in zip(Ws, new, Hs))
    err_ref = sum(reconstruction_error(W, W_new, H) for W, W_new, H in zip(Ws_live, ref, Hs_live))
    assert err <= err_ref * (1 + 1e-4), (err, err_ref)
    for W_new, W_ref in zip(new, ref):
        assert torch.allclose(W_new[:, live_cols], W_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("branches", [1, 2])
@pytest.mark.parametrize("n_remove, max_iters", [(3, 512), (4, 512), (5, 512), (3, 3), (4, 2), (5, 3)])
def test_structured_obs_removes_dead_heads(branches, n_remove, max_iters):
    # 8 heads of 16 columns, heads 2 and 5 with all-zero inputs (in every branch); several greedy rounds,
    # so groups are scored again after a dead head's Hinv block has been downdated to zero
    Ws, Hs = _dead_groups(branches, groups=8, group_size=16, dead=[2, 5])
    _check_against_live_only(Ws, Hs, 16, n_remove, [2, 5], max_iters)


@pytest.mark.parametrize("max_iters", [512, 4])  # 4 iterations: 8 neurons per iteration
def test_structured_obs_removes_dead_neurons(max_iters):
    dead = [0, 17, 18, 64, 100, 101, 200, 255]
    Ws, Hs = _dead_groups(1, groups=256, group_size=1, dead=dead, rows=32)
    _check_against_live_only(Ws, Hs, 1, 32, dead, max_iters)


# -- the single-factorisation U and the recursive solver against the constructions they replace -------------
def _old_inverse_cholesky_upper(H, percdamp=0.01):
    """The previous construction of U: Cholesky of the damped H, its inverse, the Cholesky of the inverse."""
    damp = None
    for _ in range(8):
        _, Hinv, damp = damped_inverse(H, percdamp, damp=damp)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            return U, damp
        damp = damp * 10.0 if damp > 0 else 1e-6
    raise ValueError("not positive definite")


def _columnwise_obs(W, H, sp, blocksize=128, compensate=True):
    """obs_prune as it was: SparseGPT's column loop (one rank-1 update per column, lazy updates per block)
    with the old U; N:M ties to the lower column."""
    rows, cols = W.shape
    Wf = W.float().clone()
    Wf[:, torch.diagonal(H) == 0] = 0.0
    U, _ = _old_inverse_cholesky_upper(H)
    nm = sp.kind == "nm"
    if nm:
        blocksize = max(sp.m, blocksize // sp.m * sp.m)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = Wf[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        Q1, Err1, mask1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1, dtype=torch.bool)
        if not nm:
            k = round(sp.ratio * rows * i2) - round(sp.ratio * rows * i1)
            mask1.view(-1)[torch.topk((W1**2 / d**2).flatten(), k, largest=False).indices] = True
        for i in range(i2 - i1):
            if nm and i % sp.m == 0:
                order = torch.sort(W1[:, i : i + sp.m] ** 2 / d[i : i + sp.m] ** 2, dim=1, stable=True).indices
                mask1[:, i : i + sp.m].scatter_(1, order[:, : sp.m - sp.n], True)
            q = W1[:, i].masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            if compensate:
                Err1[:, i] = (W1[:, i] - q) / d[i]
                W1[:, i:] -= Err1[:, i : i + 1] * U1[i, i:]
        Wf[:, i1:i2], pruned[:, i1:i2] = Q1, mask1
        if compensate:
            Wf[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Wf.masked_fill(pruned, 0.0), ~pruned


def _indefinite(H, share=0.05):
    """``H`` less ``share * mean(diag H)`` along its weakest direction: not positive definite, so the
    default damping (1%) fails and one retry (10%) succeeds, on a well-conditioned matrix."""
    _, vecs = torch.linalg.eigh(H.double())
    v = vecs[:, 0].float()
    return H - share * float(torch.diagonal(H).mean()) * torch.outer(v, v)


@pytest.mark.parametrize("case", ["correlated", "dead", "retry", "blocked"])
def test_inverse_cholesky_upper_equals_the_old_construction(case, monkeypatch):
    cols = 200
    if case == "dead":
        _, H, _ = _dead_layer([0, 3, 70, 199], rows=8, cols=cols)
    else:
        _, H, _ = _layer(rows=8, cols=cols)
    if case == "retry":
        H = _indefinite(H)
    if case == "blocked":  # the blocked Cholesky and triangular inverse, with uneven splits, on a small matrix
        monkeypatch.setattr(solvers, "_TRIANGULAR_LEAF", 24)
        monkeypatch.setattr(solvers, "_CHOLESKY_LEAF", 24)
    U_old, damp_old = _old_inverse_cholesky_upper(H)
    U, damp = inverse_cholesky_upper(H)
    mean_live = float(torch.diagonal(H)[torch.diagonal(H) != 0].mean())
    # float32 means of the live diagonal, the new construction's over the reversed matrix: sum_rtol(cols) apart at worst
    assert damp == pytest.approx(damp_old, rel=sum_rtol(cols))
    assert damp == pytest.approx((0.1 if case == "retry" else 0.01) * mean_live, rel=sum_rtol(cols))
    assert U.dtype == torch.float32 and torch.equal(U, U.triu()) and bool((torch.diagonal(U) > 0).all())
    # U is unique given a positive diagonal: the two constructions agree to float32 rounding times the conditioning of
    # H + 1% damping, 5e3 (measured 5.8e-6 of max|U|, default and AVX2 kernels; a damping of 1.01% moves U by 3.7e-3)
    torch.testing.assert_close(U, U_old, rtol=0, atol=1e-4 * float(U_old.abs().max()))
    Hd = H.double().clone()
    torch.diagonal(Hd)[torch.diagonal(Hd) == 0] = 1.0
    torch.diagonal(Hd).add_(damp)
    # a float32 U in a float64 product: ~kappa(Hd) u (measured 4.4e-5)
    torch.testing.assert_close(U.double().T @ U.double() @ Hd, torch.eye(cols, dtype=torch.float64), rtol=0, atol=1e-3)


def test_blocked_cholesky_equals_lapack_and_detects_indefinite(monkeypatch):
    monkeypatch.setattr(solvers, "_CHOLESKY_LEAF", 24)
    _, H, _ = _layer(rows=8, cols=200)
    H = H + 0.01 * float(torch.diagonal(H).mean()) * torch.eye(200)
    L, ok = solvers._cholesky(H)
    assert ok and torch.equal(L, L.tril())
    # two float32 factorisations blocked in other orders: sums of up to 200 terms (sum_rtol(200) = 2.4e-5 at worst)
    # through a well-conditioned factor (H + 1% damping); measured 1.4e-6 of max|L|
    torch.testing.assert_close(L, torch.linalg.cholesky(H), rtol=0, atol=1e-5 * float(L.abs().max()))
    # indefinite only through the last columns: the failure shows in a Schur complement, not the first leaf
    H_bad = H.clone()
    H_bad[199, 199] = -1.0
    assert not solvers._cholesky(H_bad)[1]
    assert not solvers._cholesky(_indefinite(H, share=0.5))[1]


def test_inverse_cholesky_upper_retries_like_the_old_construction_when_singular():
    # A duplicated input (columns 4 and 9 always equal) and a dead one (5). The duplicated pair is uncoupled from the
    # others, with entries 1.0, so its elimination is exact in float32: without damping its second pivot is exactly 0
    # (the factorisation fails on every CPU), and with the first retry's damping d = 1e-6 * mean diag it is ~2d, 16x
    # float32's spacing at 1, so that retry succeeds on every CPU too. (A rank-1 H instead leaves both decisions to
    # rounding: one of three seeds then ends at different retries in the two constructions.)
    X = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    H = X.T @ X / 512  # (64, 64), well conditioned
    H[[4, 5, 9], :] = 0
    H[:, [4, 5, 9]] = 0
    H[4, 4] = H[9, 9] = H[4, 9] = H[9, 4] = 1.0
    U_old, damp_old = _old_inverse_cholesky_upper(H, 0.0)
    U, damp = inverse_cholesky_upper(H, 0.0)
    # retried once, from 0 to 1e-6 of the mean live diagonal; each construction sums the 63 live entries in its own
    # order (the new one reversed): sum_rtol(63)
    mean_live = float(torch.diagonal(H)[torch.diagonal(H) != 0].double().mean())
    assert damp == pytest.approx(damp_old, rel=sum_rtol(63)) and damp == pytest.approx(1e-6 * mean_live, rel=sum_rtol(63))
    assert torch.isfinite(U).all() and torch.equal(U, U.triu())
    # the pair's damped block has condition ~2/d = 2e6, but both constructions compute its pivot 2d the same way (the
    # same first elimination step); the rest is well conditioned. Measured 4.3e-5 of max|U| (three kernel sets, 40
    # seeds); a damping off by 10x changes the pair's entries ~3x.
    torch.testing.assert_close(U, U_old, rtol=0, atol=1e-3 * float(U_old.abs().max()))


def test_reversed_factor_is_the_inverse_of_u():
    _, H, _ = _dead_layer([3, 40], rows=8, cols=200)
    V, blocks, damp = solvers._reversed_factor(H, 0.01, 64)
    U, damp_u = inverse_cholesky_upper(H)
    assert damp == damp_u and torch.equal(V, V.triu())
    Hd = H.clone()
    torch.diagonal(Hd)[torch.diagonal(Hd) == 0] = 1.0
    torch.diagonal(Hd).add_(damp)
    # float32 products of 200 terms: sum_rtol(200) = 2.4e-5 of the scale at worst (measured 2.4e-7); U V = I to the
    # conditioning of Hd times u (measured 1.6e-6)
    torch.testing.assert_close(V @ V.T, Hd, rtol=0, atol=1e-5 * float(Hd.abs().max()))
    torch.testing.assert_close(U @ V, torch.eye(200), rtol=0, atol=1e-4)
    assert [b.shape[0] for b in blocks] == [64, 64, 64, 8]
    for k, b in enumerate(blocks):  # a 64x64 triangular inverse vs the whole one's block (measured 6e-8 of max|U|)
        torch.testing.assert_close(b, U[64 * k : 64 * k + b.shape[0], 64 * k : 64 * k + b.shape[0]], rtol=0, atol=1e-4 * float(U.abs().max()))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured:0.5", "unstructured:0.3"])
@pytest.mark.parametrize("dead", [[], [3, 70, 130, 190]], ids=["live", "dead"])
@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("shared_factor", [False, True], ids=["own-factor", "hinv_upper"])
def test_obs_prune_equals_the_column_loop(pattern, dead, compensate, shared_factor):
    rows, cols, blocksize = 48, 200, 64  # 200 = 3 blocks of 64 and a partial one of 8
    W, H, _ = _dead_layer(dead, rows, cols) if dead else _layer(rows=rows, cols=cols)
    sp = parse_sparsity(pattern)
    W_ref, keep_ref = _columnwise_obs(W, H, sp, blocksize, compensate)
    W_new, keep = obs_prune(W, H, sp, blocksize=blocksize, compensate=compensate, hinv_upper=inverse_cholesky_upper(H)[0] if shared_factor else None)
    # the same sums in another order, with another factorisation: masks decided with a margin (tests/tolerances.py
    # MASK_MARGIN); weights of scale 0.05 within float32 rounding times kappa(H + 1%) (measured 6.5e-7, 7% of the
    # tolerance; a halved update, a skipped block update or a flipped sign: >= 8e-2 and hundreds of flipped masks)
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(W_new, W_ref, rtol=0, atol=1e-5)
    assert reconstruction_error(W, W_new, H) == pytest.approx(reconstruction_error(W, W_ref, H), rel=1e-4)  # measured 5e-7


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_ties_go_to_the_lower_column(pattern):
    sp = parse_sparsity(pattern)
    W = torch.ones(6, 4 * sp.m, dtype=torch.bfloat16)  # every score equal (H = I: no updates either)
    W_new, keep = obs_prune(W, torch.eye(4 * sp.m), sp)
    first = (torch.arange(4 * sp.m) % sp.m) < sp.m - sp.n
    assert torch.equal(keep, ~first.expand(6, -1)) and W_new.dtype == torch.bfloat16
    assert torch.equal(W_new, W * keep)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_rank_weights_rank_like_a_stable_sort(m):
    score = torch.randint(0, 3, (m, 500), generator=torch.Generator().manual_seed(m)).float()  # many ties
    A, c = solvers._rank_weights(m, score.device)
    le = (score.unsqueeze(1) <= score.unsqueeze(0)).float().reshape(m * m, -1)
    rank = A @ le + c  # (m, 500)
    expected = torch.sort(score, dim=0, stable=True).indices.argsort(dim=0).float()
    assert torch.equal(rank, expected)
