"""Timestep weights for the timestep-aware Hessian of OBS-Diff.

Early denoising steps shape the whole trajectory, so an error made there compounds; OBS-Diff therefore
weights each step's contribution ``X_t^T X_t`` to a layer's Hessian by ``w_t``, decreasing over the
sampling loop. Step ``i`` is the pipeline's loop index (0 = the first, noisiest step).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from common.errors import UserError

Scheme = Literal["log", "linear", "uniform"]
SCHEMES: tuple[str, ...] = ("log", "linear", "uniform")


def timestep_weights(steps: int, scheme: str = "log", w_max: float = 1.2, w_min: float = 0.8) -> torch.Tensor:
    """Weight of each sampling step, shape ``(steps,)``, float32, first step first.

    log (default, the paper's log-decrease): ``v_i = w_min + (w_max - w_min) * ln(1+i) / ln(T)`` for
        ``i = 0..T-1``, then reversed, so step 0 gets ``w_max`` and the last step ``w_min``; the weights
        fall fast over the last steps and slowly over the first ones.
    linear: evenly spaced from ``w_max`` (first step) to ``w_min`` (last step).
    uniform: every step weighs 1.

    ``steps == 1`` gives ``[w_max]`` for ``log``/``linear`` (a single step is the first one).
    """
    if steps < 1:
        raise UserError(f"calibration needs at least one sampling step, got {steps}")
    if scheme not in SCHEMES:
        raise UserError(f"unknown timestep weighting {scheme!r}; accepted: {', '.join(SCHEMES)}")
    if scheme == "uniform":
        return torch.ones(steps, dtype=torch.float32)
    if not (w_max > 0 and w_min > 0):
        raise UserError(f"timestep weights must be positive (got w_max={w_max}, w_min={w_min})")
    if steps == 1:
        return torch.tensor([w_max], dtype=torch.float32)
    if scheme == "linear":
        return torch.linspace(w_max, w_min, steps, dtype=torch.float64).float()
    rising = [w_min + (w_max - w_min) * math.log(1 + i) / math.log(steps) for i in range(steps)]
    return torch.tensor(rising[::-1], dtype=torch.float32)
