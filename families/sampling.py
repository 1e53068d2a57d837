"""Seeded sampling with a registry model's defaults: the one place prompts become images."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from common.errors import UserError
from families.registry import ModelSpec


def sample(
    pipe,
    spec: ModelSpec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Generate one image per (prompt, seed) pair; returns (N, H, W, 3) float32 in [0, 1].

    The same seed gives the same initial latents whatever the batch it runs in (one CPU generator per
    image), so images are comparable across models, backends and batch sizes.
    steps / guidance default to the registry's values for ``spec``.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    steps = spec.steps if steps is None else steps
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    guidance = spec.guidance if guidance is None else guidance
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        with torch.inference_mode():
            images = pipe(
                prompt=chunk,
                num_inference_steps=steps,
                **spec.adapter.guidance_kwargs(pipe, guidance, len(chunk)),
                height=spec.height,
                width=spec.width,
                max_sequence_length=spec.max_sequence_length,
                generator=gens,
                output_type="np",
            ).images
        out.append(np.asarray(images, dtype=np.float32))
    return np.concatenate(out)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
