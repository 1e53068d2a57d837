"""Structured solvers on a column range of a fused weight (Flux's single-block ``proj_out``: attention
output then MLP hidden state), and with columns frozen by an earlier removal."""

import pytest
import torch

from obsdiff.baselines import magnitude_prune_groups, wanda_prune_groups
from obsdiff.solvers import damped_inverse, obs_prune_groups, reconstruction_error
from tests.prune_helpers import correlated_inputs, single_thread

HEADS, HEAD_DIM, NEURONS = 8, 16, 64
A = HEADS * HEAD_DIM  # attention part of the fused input: columns [0, A)
WIDTH = A + NEURONS  # MLP part: columns [A, WIDTH)
GROUP_FNS = {"obs": obs_prune_groups, "wanda": wanda_prune_groups, "magnitude": magnitude_prune_groups}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _fused(rows=48, width=WIDTH, tokens=2048, seed=0):
    """A fused output projection ``(rows, width)`` and its correlated input Hessian ``(width, width)``."""
    X = correlated_inputs(tokens, width, seed)  # (tokens, width)
    W = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed + 100)) * 0.05
    return W, X.T @ X / tokens


def _removed_cols(keep, start, stop, group_size):
    """Absolute columns of the groups of ``[start, stop)`` not in ``keep`` (relative group indices)."""
    return [c for c in range(start, stop) if (c - start) // group_size not in keep]


def _least_squares(W, H, removed, damp):
    """The optimum for a fixed removed set S: minimise ``tr((W - W') Hd (W - W')^T)`` with ``W'[:, S] = 0``,
    ``Hd = H + damp I``. Setting the gradient over the kept columns K to zero, ``(W' - W) Hd[:, K] = 0``, gives
    ``W'[:, K] Hd[K, K] = W Hd[:, K]``, i.e. ``W'[:, K] = W Hd[:, K] Hd[K, K]^-1`` (float64)."""
    Hd = H.double() + damp * torch.eye(H.shape[0], dtype=torch.float64)
    K = [c for c in range(H.shape[0]) if c not in set(removed)]
    out = torch.zeros_like(W, dtype=torch.float64)
    out[:, K] = torch.linalg.solve(Hd[K][:, K], (W.double() @ Hd[:, K]).T).T  # Hd[K, K] symmetric
    return out


@pytest.mark.parametrize("method", list(GROUP_FNS))
def test_whole_range_is_bit_identical_to_the_default(method):
    fn = GROUP_FNS[method]
    Ws = [_fused(seed=0)[0], _fused(seed=1)[0]]
    Hs = [_fused(seed=0)[1], _fused(seed=1)[1]]
    for group_size, n_remove in ((HEAD_DIM, 3), (1, 40)):
        ref, keep_ref = fn(Ws, Hs, group_size, n_remove)
        for kwargs in ({"cols": (0, WIDTH)}, {"frozen": []}, {"cols": (0, WIDTH), "frozen": torch.zeros(WIDTH, dtype=torch.bool)}):
            # exact: the defaults run these very operations (no frozen mask, the whole range), one computation twice
            new, keep = fn(Ws, Hs, group_size, n_remove, **kwargs)
            assert keep == keep_ref
            assert all(torch.equal(a, b) for a, b in zip(new, ref)), kwargs


@pytest.mark.parametrize("method", list(GROUP_FNS))
@pytest.mark.parametrize("group_size, cols, n_remove", [(HEAD_DIM, (0, A), 3), (1, (A, WIDTH), 20), (HEAD_DIM, (32, 160), 3)], ids=["heads", "neurons", "middle"])
def test_column_range_removes_only_groups_inside_it(method, group_size, cols, n_remove):
    W, H = _fused()
    start, stop = cols
    groups = (stop - start) // group_size
    outside = [c for c in range(WIDTH) if not start <= c < stop]
    (W_new,), keep = GROUP_FNS[method]([W], [H], group_size, n_remove, cols=cols)
    assert len(keep) == groups - n_remove and keep == sorted(keep) and all(0 <= g < groups for g in keep)
    removed = _removed_cols(keep, start, stop, group_size)
    assert len(removed) == n_remove * group_size
    assert bool((W_new[:, removed] == 0).all())
    assert bool((W_new.abs().sum(dim=0) == 0).sum() == len(removed)), "no other column may be zeroed"
    if method == "obs":  # the OBS update reaches the columns outside the range (correlated H)
        assert not torch.equal(W_new[:, outside], W[:, outside])
        (W_nc,), keep_nc = obs_prune_groups([W], [H], group_size, n_remove, cols=cols, compensate=False)
        removed_nc = _removed_cols(keep_nc, start, stop, group_size)  # one-shot ranking: may differ from the greedy's
        kept_nc = [c for c in range(WIDTH) if c not in set(removed_nc)]
        assert torch.equal(W_nc[:, kept_nc], W[:, kept_nc]) and bool((W_nc[:, removed_nc] == 0).all())
    else:  # saliency only: nothing but the removed columns changes
        kept = [c for c in range(WIDTH) if c not in set(removed)]
        assert torch.equal(W_new[:, kept], W[:, kept])


@pytest.mark.parametrize("group_size, cols, n_remove", [(HEAD_DIM, (0, A), 3), (1, (A, WIDTH), 20)], ids=["heads", "neurons"])
def test_column_range_compensation_over_the_rest_helps(group_size, cols, n_remove):
    W, H = _fused()
    (W_obs,), keep = obs_prune_groups([W], [H], group_size, n_remove, cols=cols)
    (W_nc,), keep_nc = obs_prune_groups([W], [H], group_size, n_remove, cols=cols, compensate=False)
    err, err_nc = reconstruction_error(W, W_obs, H), reconstruction_error(W, W_nc, H)
    assert err < 0.5 * err_nc, (err, err_nc)
    # the compensation through the columns outside the range is part of it: without them it is worse
    start, stop = cols
    inside = slice(start, stop)
    (W_in,), _ = obs_prune_groups([W[:, inside]], [H[inside, inside]], group_size, n_remove)
    W_in_full = W.clone()
    W_in_full[:, inside] = W_in
    err_in = reconstruction_error(W, W_in_full, H)
    assert err < 0.9 * err_in, (err, err_in)


@pytest.mark.parametrize("group_size, cols, n_remove, max_iters", [(HEAD_DIM, (0, A), 3, 512), (HEAD_DIM, (32, 160), 4, 1), (1, (A, WIDTH), 24, 6)])
def test_column_range_obs_equals_the_least_squares_refit(group_size, cols, n_remove, max_iters):
    # greedy OBS removals with downdates compose exactly: the result is the optimum for the removed set
    W, H = _fused()
    (W_new,), keep = obs_prune_groups([W], [H], group_size, n_remove, cols=cols, max_iters=max_iters)
    damp = damped_inverse(H)[2]
    W_ls = _least_squares(W, H, _removed_cols(keep, *cols, group_size), damp)
    rel = float((W_new.double() - W_ls).norm() / W.double().norm())
    # float32 solver vs float64 refit: kappa(Hd[K, K]) ~ 3.5e3 bounds the error by kappa u ~ 2e-4 to first order;
    # measured 3.8e-6 (3.6e-6 under AVX2 kernels), 3e-5 leaves 8x
    assert rel < 3e-5, rel


def _heads_then_neurons(W, H, n_heads, n_neurons, **kwargs):
    """The Flux ``proj_out`` sequence: heads of ``[0, A)`` first, then neurons of ``[A, WIDTH)`` with the
    removed heads' columns frozen. Returns the two results and the frozen columns."""
    (W1,), keep_heads = obs_prune_groups([W], [H], HEAD_DIM, n_heads, cols=(0, A), **kwargs)
    frozen = _removed_cols(keep_heads, 0, A, HEAD_DIM)
    (W2,), keep_neurons = obs_prune_groups([W1], [H], 1, n_neurons, cols=(A, WIDTH), frozen=frozen, **kwargs)
    return W1, W2, keep_neurons, frozen


def test_frozen_columns_stay_zero_and_equal_the_reduced_problem():
    W, H = _fused()
    H0 = H.clone()
    W1, W2, keep, frozen = _heads_then_neurons(W, H, 3, 20)
    assert torch.equal(H, H0), "H is not modified"
    assert bool((W2[:, frozen] == 0).all()), "frozen columns stay exactly zero"
    assert len(keep) == NEURONS - 20 and all(0 <= j < NEURONS for j in keep)
    assert bool((W2[:, [A + j for j in range(NEURONS) if j not in keep]] == 0).all())
    # the reduced problem: the frozen columns deleted from the weight and the Hessian
    live = [c for c in range(WIDTH) if c not in set(frozen)]
    a_live = A - len(frozen)
    (W_ref,), keep_ref = obs_prune_groups([W1[:, live]], [H[live][:, live]], 1, 20, cols=(a_live, a_live + NEURONS))
    # the frozen columns decoupled vs deleted: float32 rounding apart (measured 1.6e-6 of max|W|; the kept neurons are
    # decided with a margin, tests/tolerances.py MASK_MARGIN)
    assert keep == keep_ref
    torch.testing.assert_close(W2[:, live], W_ref, rtol=0, atol=1e-5 * float(W_ref.abs().max()))
    # and the neurons' compensation reaches the surviving heads, not the frozen ones
    assert not torch.equal(W2[:, :A], W1[:, :A])


def test_frozen_columns_receive_no_update_even_when_nonzero_in_w():
    # frozen columns that still hold values (not yet zeroed by the caller) are zeroed and decoupled
    W, H = _fused()
    frozen = torch.tensor([5, 17, 18, 100, 150])  # spread over both parts of the fused input
    (W_new,), keep = obs_prune_groups([W], [H], 1, 20, cols=(A, WIDTH), frozen=frozen)
    assert bool((W_new[:, frozen] == 0).all())
    live = [c for c in range(WIDTH) if c not in set(frozen.tolist())]
    n_in_range = int(((frozen >= A) & (frozen < WIDTH)).sum())  # frozen neurons: saliency 0, removed first
    assert set(int(c) - A for c in frozen if c >= A).isdisjoint(keep)
    a_live = A - (len(frozen) - n_in_range)
    (W_ref,), keep_ref = obs_prune_groups([W[:, live]], [H[live][:, live]], 1, 20 - n_in_range, cols=(a_live, a_live + NEURONS - n_in_range))
    live_neurons = [j for j in range(NEURONS) if A + j not in set(frozen.tolist())]
    assert keep == [live_neurons[j] for j in keep_ref]  # with a margin (tests/tolerances.py MASK_MARGIN)
    # decoupled vs deleted, float32 rounding apart: measured 3.7e-6 of max|W| (2.9e-6 under AVX2 kernels)
    torch.testing.assert_close(W_new[:, live], W_ref, rtol=0, atol=1e-5 * float(W_ref.abs().max()))
    # the frozen inputs are decoupled in the inverse: exact zeros between them and the others
    mask = torch.zeros(WIDTH, dtype=torch.bool)
    mask[frozen] = True
    Hinv = damped_inverse(H, frozen=mask)[1]
    assert bool((Hinv[mask][:, ~mask] == 0).all()) and bool((Hinv[~mask][:, mask] == 0).all())


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_baselines_accept_cols_and_frozen(method):
    fn = GROUP_FNS[method]
    W, H = _fused()
    (W1,), keep_heads = fn([W], [H], HEAD_DIM, 3, cols=(0, A))
    frozen = _removed_cols(keep_heads, 0, A, HEAD_DIM)
    (W2,), keep = fn([W1], [H], 1, 20, cols=(A, WIDTH), frozen=frozen)
    assert bool((W2[:, frozen] == 0).all()) and len(keep) == NEURONS - 20
    live = [c for c in range(WIDTH) if c not in set(frozen)]
    a_live = A - len(frozen)
    (W_ref,), keep_ref = fn([W1[:, live]], [H[live][:, live]], 1, 20, cols=(a_live, a_live + NEURONS))
    assert keep == keep_ref and torch.equal(W2[:, live], W_ref)
    # frozen columns that still hold values are zeroed; inside the range they score 0 and go first
    (W3,), keep3 = fn([W], [H], 1, 20, cols=(A, WIDTH), frozen=[3, A + 7, A + 9])
    assert bool((W3[:, [3, A + 7, A + 9]] == 0).all()) and {7, 9}.isdisjoint(keep3)


@pytest.mark.parametrize("method", list(GROUP_FNS))
def test_bad_column_ranges_and_frozen_indices_raise(method):
    fn = GROUP_FNS[method]
    W, H = _fused()
    for kwargs in ({"cols": (0, A + 8)}, {"cols": (A, WIDTH + 16)}, {"cols": (64, 64)}, {"frozen": [WIDTH]}, {"frozen": [-1]}):
        with pytest.raises(ValueError):
            fn([W], [H], HEAD_DIM, 1, **kwargs)
    with pytest.raises(ValueError):
        fn([W], [H], HEAD_DIM, 2, cols=(0, 2 * HEAD_DIM))  # cannot remove every group of the range
