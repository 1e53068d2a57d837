"""Shared helpers for the stage-2 (export) tests: masked models, plans, relative errors."""

from __future__ import annotations

import copy

import torch

from export.surgery import apply_plan, mask_like_plan, structured_plan
from tests.factories import tiny_sd3_transformer


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (error relative to the reference's scale; works for torch or numpy)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def masked_and_compact(ratio: float = 0.3, seed: int = 0, **factory_kwargs):
    """(plan, masked model, compact model) for a tiny transformer with a random structured plan."""
    dense = tiny_sd3_transformer(seed=seed, **factory_kwargs)
    plan = structured_plan(dense, ratio, generator=torch.Generator().manual_seed(seed + 100))
    masked = mask_like_plan(dense, plan)
    compact = apply_plan(copy.deepcopy(masked), plan, require_masked=True)
    return plan, masked, compact


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


def make_nm_sparse(model, n: int = 2, m: int = 4, prefix: str = "transformer_blocks."):
    """Magnitude N:M masking along K (``nn.Linear`` input dim) of every linear under ``prefix`` (in place).

    Returns the pruned layer names. A stand-in for stage 1's OBS output: the export side only sees zeros.
    """
    names = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith(prefix):
                w = mod.weight  # (out, K)
                groups = w.reshape(w.shape[0], -1, m)  # (out, K/m, m)
                drop = groups.abs().argsort(dim=-1)[..., : m - n]  # smallest m-n per group
                groups.scatter_(-1, drop, 0.0)
                names.append(name)
    return names
