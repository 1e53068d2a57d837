"""Shared helpers for the stage-1 (OBS-Diff pruning) tests."""

from __future__ import annotations

import contextlib

import pytest
import torch

from common.paths import REPO_ROOT

TINY_SD3 = REPO_ROOT / "models" / "tiny-sd3"


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: the solvers' many small ops are dominated by thread hand-offs on a busy
    2-core machine; restored afterwards so other tests are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Activations with real-like structure, ``(tokens, features)``: a decaying spectrum (strongly
    correlated channels) and a few large outlier channels, as in transformer layer inputs."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -2, features)  # (features,)
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=g))
    X = (torch.randn(tokens, features, generator=g) * spectrum) @ basis.T
    X[:, torch.randperm(features, generator=g)[:4]] *= 8.0  # outlier channels
    return X + 0.1 * torch.randn(features, generator=g)  # non-zero mean, like post-norm activations


def output_error(W: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor) -> float:
    """``||(W - W') X^T||_F``: the layer-output reconstruction error on inputs ``X`` (tokens, in)."""
    return float(torch.linalg.norm((W - W_new) @ X.T))


def require_tiny_sd3():
    if not (TINY_SD3 / "model_index.json").is_file():
        pytest.skip("needs the embedded models/tiny-sd3 pipeline (built by scripts/train_tiny.py)")


def load_tiny_pipeline():
    """The real tiny-sd3 diffusers pipeline, progress bars off."""
    require_tiny_sd3()
    from families.registry import load_pipeline, resolve_model

    return load_pipeline(resolve_model("tiny-sd3"))


def small_config(sparsity: str, method: str = "obs-diff", groups: int = 3, samples: int = 2, steps: int = 3, batch_size: int = 2, **kw):
    """A quick calibration for tiny-sd3 (32x32 images, 10 T5 tokens)."""
    from obsdiff.packages import CalibrationConfig, PruneConfig
    from obsdiff.patterns import parse_sparsity

    calib = CalibrationConfig(samples=samples, steps=steps, guidance=4.0, height=32, width=32, batch_size=batch_size, seed=0, max_sequence_length=10)
    return PruneConfig(parse_sparsity(sparsity), method=method, groups=groups, calibration=calib, **kw)


def digit_prompts(n: int) -> list[str]:
    from obsdiff.packages import calibration_prompts, read_prompts

    return calibration_prompts(read_prompts(REPO_ROOT / "prompts" / "digits.txt"), n)
