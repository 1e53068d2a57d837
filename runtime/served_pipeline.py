"""Prompt in, image out: the orchestration a served ``pipeline`` model runs, over any component callables.

:class:`ServedPipeline` takes the model's diffusers pipeline (tokenizers, scheduler, configs) and one
:data:`runtime.pipeline_runner.Runner` per exported component (``{input: tensor} -> {output: tensor}``): ONNX
Runtime sessions or TensorRT engines in-process, or BLS requests to the component models inside Triton's
Python backend. The denoising loop, guidance, scheduler (with the artifact's scheduler correction, when it has
one) and VAE call are diffusers' own, through :func:`families.sampling.sample` (one CPU generator per image), so
the served image and the in-process image come from the same code.

:func:`parse_request` checks one request's values against :class:`ServeLimits` before anything runs and
raises :class:`~common.errors.UserError` with the message the client gets back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from common.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MAX_STEPS = 100


@dataclass(frozen=True)
class ServeLimits:
    """What a served pipeline accepts: ``resolutions`` ((height, width) in pixels, the first is the default),
    ``max_steps`` (a larger ``steps`` is refused: 10,000 steps would hold the server for minutes), ``max_batch``
    (prompts per request)."""

    resolutions: tuple[tuple[int, int], ...]
    max_steps: int = DEFAULT_MAX_STEPS
    max_batch: int = 4

    def to_json(self) -> dict[str, Any]:
        return {"resolutions": [list(r) for r in self.resolutions], "max_steps": self.max_steps, "max_batch": self.max_batch}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ServeLimits":
        return cls(tuple(tuple(int(v) for v in r) for r in d["resolutions"]), int(d["max_steps"]), int(d["max_batch"]))


@dataclass(frozen=True)
class ImageRequest:
    """One image to make. ``negative_prompt`` None: the model's default (empty)."""

    prompt: str
    seed: int = 0
    steps: int = 20
    guidance: float = 4.0
    height: int = 32
    width: int = 32
    negative_prompt: str | None = None

    @property
    def group(self) -> tuple:
        """Requests with the same group run as one batch (same steps, guidance and size)."""
        return (self.steps, self.guidance, self.height, self.width, self.negative_prompt is not None)


def parse_request(values: Mapping[str, Any], spec, limits: ServeLimits) -> ImageRequest:
    """One request's inputs (name -> Python value, absent when not sent) as an :class:`ImageRequest`.

    Defaults: the model's registry steps and guidance, the first served resolution, seed 0.
    """
    prompt = values.get("prompt")
    if prompt is None:
        raise UserError("missing required input 'prompt'")
    prompt = _text(prompt, "prompt")
    if not prompt.strip():
        raise UserError("prompt is empty: send a non-empty TYPE_STRING prompt")
    negative = values.get("negative_prompt")
    negative = None if negative is None else _text(negative, "negative_prompt")
    steps = int(values.get("steps", spec.steps))
    if not 1 <= steps <= limits.max_steps:
        raise UserError(f"steps must be between 1 and {limits.max_steps} (this server's maximum), got {steps}")
    guidance = float(values.get("guidance", spec.guidance))
    if not np.isfinite(guidance) or guidance < 0:
        raise UserError(f"guidance must be a finite number >= 0, got {guidance}")
    h0, w0 = limits.resolutions[0]
    height, width = int(values.get("height", h0)), int(values.get("width", w0))
    if (height, width) not in limits.resolutions:
        served = ", ".join(f"{h}x{w}" for h, w in limits.resolutions)
        raise UserError(f"size {height}x{width} is not served; this repository serves {served} (height x width, pixels)")
    seed = int(values.get("seed", 0))
    if not 0 <= seed < 2**63:
        raise UserError(f"seed must be between 0 and 2**63-1, got {seed}")
    return ImageRequest(prompt, seed, steps, guidance, height, width, negative)


def _text(v: Any, name: str) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{name} is not UTF-8 text") from None
    if isinstance(v, str):
        return v
    raise UserError(f"{name} must be TYPE_STRING text, got {type(v).__name__}")


@dataclass
class ServedImage:
    """One result: ``image`` (H, W, 3) uint8 and whether a text encoder saw only the prompt's beginning."""

    image: np.ndarray
    truncated: bool


@dataclass
class ServedPipeline:
    """``spec``'s pipeline with its networks replaced by ``runners`` (see the module doc).

    base_pipe: the PyTorch pipeline to take tokenizers, scheduler and configs from (default: loaded from
    ``spec``). correction: a :class:`runtime.qsched.SchedulerCorrection` or its JSON path, or None.
    """

    spec: Any
    runners: dict
    correction: Any = None
    base_pipe: Any = None
    pipe: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        from families.registry import load_pipeline
        from runtime.pipeline_runner import with_runners

        base = self.base_pipe if self.base_pipe is not None else load_pipeline(self.spec)
        self.pipe = with_runners(base, self.runners, device="cpu")
        if self.correction is not None:
            from runtime.qsched.apply import apply_correction
            from runtime.qsched.correction import load_correction

            self.correction = load_correction(self.correction)
            apply_correction(self.pipe, self.correction)

    def check(self, request: ImageRequest) -> None:
        """What only the loaded pipeline can refuse: a step count other than the scheduler correction's."""
        if self.correction is not None and request.steps != self.correction.steps:
            raise UserError(f"this pipeline applies a scheduler correction fitted for {self.correction.steps} steps; ask for steps={self.correction.steps}")

    def truncated(self, prompt: str) -> bool:
        """Whether a text encoder reads only the beginning of ``prompt`` (tokenizers truncate; logged once)."""
        from families.sampling import report_prompt_truncation

        return report_prompt_truncation(self.pipe, [prompt], self.spec.max_sequence_length, log, what="prompt") > 0

    def generate(self, requests: Sequence[ImageRequest]) -> list[ServedImage]:
        """Images for ``requests`` in order; requests that share steps, guidance and size run as one batch."""
        from families.sampling import sample, to_uint8

        out: list[ServedImage | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.group, []).append(i)
        for idx in groups.values():
            first = requests[idx[0]]
            extra = {}
            if first.negative_prompt is not None:
                extra["negative_prompt"] = [requests[i].negative_prompt for i in idx]
            images = sample(self.pipe, self.spec, [requests[i].prompt for i in idx], [requests[i].seed for i in idx], steps=first.steps,
                            guidance=first.guidance, height=first.height, width=first.width, **extra)  # (N, H, W, 3) in [0, 1]
            for i, img in zip(idx, to_uint8(images)):
                out[i] = ServedImage(img, self.truncated(requests[i].prompt))
        return out  # type: ignore[return-value]


class ComponentError(RuntimeError):
    """A component model did not answer (unavailable, or it failed): the request gets this message back."""
