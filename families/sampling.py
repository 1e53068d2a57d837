"""The one place prompts become images: seeded sampling with a registry model's defaults.

- :func:`pipeline_call`: one call of a diffusers pipeline with one CPU ``torch.Generator`` per image, so the same
  (prompt, seed) starts from the same noise whatever the batch, backend or device; every path that runs a
  pipeline (evaluation, the runner, calibration of stage 1 and of quantization, the scheduler-correction fits,
  the prune comparison, the served pipeline) goes through it.
- :func:`sample`: :func:`pipeline_call` over batches with ``spec``'s defaults (steps, guidance, size, T5 length).
- :func:`transformer_calls`: a context manager that records what the transformer receives (and returns).
- :func:`report_prompt_truncation`: says once how many prompts the text encoders truncate.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from common.errors import UserError
from families.registry import ModelSpec


def pipeline_call(
    pipe,
    adapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    max_sequence_length: int,
    output_type: str = "np",
    **call_kwargs,
):
    """One call of ``pipe`` on ``prompts`` with one CPU generator per image (seeded ``seeds[i]``); returns the
    output's ``images`` (``output_type`` ``"np"``, ``"pil"`` or ``"latent"``). ``adapter``'s guidance arguments
    (classifier-free guidance or Flux's guidance input); ``call_kwargs`` go to the pipeline as they are
    (``latents=`` overrides the generators' noise, ``callback_on_step_end=``, ``negative_prompt=``, ...)."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        return pipe(
            prompt=list(prompts),
            num_inference_steps=steps,
            **{**adapter.guidance_kwargs(pipe, guidance, len(prompts)), **call_kwargs},
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            generator=gens,
            output_type=output_type,
        ).images


def sample(
    pipe,
    spec: ModelSpec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 64,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "np",
    **call_kwargs,
):
    """Generate one image per (prompt, seed) pair.

    Returns (N, H, W, 3) float32 in [0, 1] for ``output_type="np"`` (the default), a list of PIL images for
    ``"pil"``, the concatenated latents for ``"latent"``. The same seed gives the same initial latents whatever
    the batch it runs in (one CPU generator per image), so images are comparable across models, backends and
    batch sizes. steps / guidance / height / width default to the registry's values for ``spec`` (``steps=0`` is
    an error, not the default); ``call_kwargs`` go to the pipeline call as they are (``negative_prompt``: one per
    prompt, sliced like the prompts when a list).
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    steps = spec.steps if steps is None else steps
    guidance = spec.guidance if guidance is None else guidance
    out = []
    for i in range(0, len(prompts), batch_size):
        extra = {k: (v[i : i + batch_size] if k == "negative_prompt" and isinstance(v, list) else v) for k, v in call_kwargs.items()}
        out.append(pipeline_call(
            pipe, spec.adapter, list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size]), steps=steps, guidance=guidance,
            height=spec.height if height is None else height, width=spec.width if width is None else width,
            max_sequence_length=spec.max_sequence_length, output_type=output_type, **extra))
    if output_type == "np":
        return np.concatenate([np.asarray(images, dtype=np.float32) for images in out])
    if output_type == "latent":
        return torch.cat(out)
    return [img for images in out for img in images]


@dataclass
class TransformerCall:
    """What one transformer call received: its arguments by name (positional ones bound to the forward's
    signature) and, when recorded, its first output."""

    inputs: dict[str, Any]
    output: torch.Tensor | None = None


@contextlib.contextmanager
def transformer_calls(transformer: torch.nn.Module, *, outputs: bool = False, to_cpu: bool = False) -> Iterator[list[TransformerCall]]:
    """Record every call of ``transformer`` inside the block: yields the list the calls are appended to.

    outputs: also keep each call's first output (``output[0]`` of a tuple, ``.sample`` of a diffusers output).
    to_cpu: keep detached CPU copies of the tensors (what outlives the pipeline run); otherwise the tensors as
    the transformer received them. The hook is removed on exit, also on an error.
    """
    signature = inspect.signature(transformer.forward)
    calls: list[TransformerCall] = []
    keep = (lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v) if to_cpu else (lambda v: v)

    def hook(module, args, kwargs, output):
        bound = signature.bind_partial(*args, **kwargs).arguments
        out = None
        if outputs:
            out = keep(output[0] if isinstance(output, tuple) else output.sample)
        calls.append(TransformerCall({k: keep(v) for k, v in bound.items()}, out))

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def report_prompt_truncation(pipe, prompts: Sequence[str], max_sequence_length: int, log, *, what: str = "prompts") -> int:
    """Say once how many of ``prompts`` are longer than a text encoder of ``pipe`` reads (CLIP: its
    tokenizer's 77 tokens; T5: ``max_sequence_length``): the encoders see only their beginning. The
    libraries' own per-call warning is silenced (:func:`families.registry.quiet_libraries`). Returns the count."""
    limits = {}
    for name, tok in pipe.components.items():
        if not name.startswith("tokenizer") or tok is None:
            continue
        limit = int(getattr(tok, "model_max_length", 0) or 0)
        if "T5" in type(tok).__name__ or limit > 10_000:
            limit = min(limit, int(max_sequence_length)) if 0 < limit <= 10_000 else int(max_sequence_length)
        if limit > 0:
            limits[name] = (tok, limit)
    unique = list(dict.fromkeys(prompts))
    long = set()
    for _, (tok, limit) in limits.items():
        for p in unique:
            if p not in long and len(tok(p, truncation=False, add_special_tokens=True)["input_ids"]) > limit:
                long.add(p)
    n = sum(p in long for p in prompts)
    if n:
        bounds = ", ".join(f"{name} {limit} tokens" for name, (_, limit) in limits.items())
        log.warning("%d of %d %s are longer than the text encoders read (%s): they are truncated, the encoders see only their beginning",
                    n, len(prompts), what, bounds)
    return n
