"""Seeded sampling with a registry model's defaults: the one place prompts become images."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.cli import float_range, int_at_least
from common.errors import UserError
from pipeline.models import ModelSpec


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
                guidance_scale=guidance,
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


TRANSFORMER_HELP = ("use this transformer instead of the model's: a `prune` output directory (or its transformer/), "
                    "an `export` output directory (or its compact/)")


def add_sampler_args(p) -> None:
    """``--steps`` and ``--guidance`` (default: the model's registry values), range-checked at parse time."""
    p.add_argument("--steps", type=int_at_least(1), help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float_range(0.0), help="guidance scale (default: the model's)")


def add_pipeline_args(p) -> None:
    """The CLI options that choose which pipeline samples: ``--no-t5`` and ``--transformer``."""
    p.add_argument("--no-t5", action="store_true", help="drop the T5 encoder (text_encoder_3=None)")
    p.add_argument("--transformer", metavar="DIR", help=TRANSFORMER_HELP)


def check_pipeline_args(args) -> tuple[ModelSpec, "Path | None"]:
    """Validate ``--model`` and ``--transformer`` without loading weights: ``(spec, transformer_dir)``."""
    from export.checkpoint import find_transformer_dir
    from pipeline.models import resolve_model

    spec = resolve_model(args.model)
    return spec, find_transformer_dir(args.transformer) if args.transformer else None


def pipeline_from_args(args, checked: tuple[ModelSpec, "Path | None"] | None = None):
    """``(spec, pipe)`` for ``args.model`` with the options of :func:`add_pipeline_args`.

    checked: what :func:`check_pipeline_args` already returned for ``args`` (default: check them now).
    """
    from export.checkpoint import load_any_transformer
    from pipeline.models import load_pipeline

    spec, tdir = checked if checked is not None else check_pipeline_args(args)
    transformer = load_any_transformer(tdir) if tdir is not None else None
    return spec, load_pipeline(spec, drop_t5=args.no_t5, transformer=transformer)
