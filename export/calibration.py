"""Calibration of a quantized export: which trajectories (:func:`resolve_calibration`: stage 1's prompts,
seeds, steps and guidance) and the transformer's inputs of an even spread of its calls, recorded
on the real sampler (the registry's steps, guidance and size), keyed by the ONNX input names of the family's
wrapper."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from export.int8_parity import PARITY_TRAJECTORIES
from families.registry import REPO_ROOT
from families.sampling import sample, transformer_calls

if TYPE_CHECKING:
    from export.stage import QuantCalibration
    from families.shapes import ServedShapes

log = logging.getLogger(__name__)


def _reference_inputs(adapter, model: nn.Module) -> dict[str, torch.Tensor]:
    """Meta tensors with the rank and dtype of each ONNX input (the adapter's example inputs)."""
    p = adapter.latent_patch(dict(model.config))
    dtype = next(model.parameters()).dtype
    return adapter.transformer_inputs(model, 1, (2 * p, 2 * p), 1, dtype=dtype, device="meta")


def onnx_feeds(arguments: dict[str, Any], names: Sequence[str], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformer call's arguments (by parameter name) as the ONNX wrapper's inputs: CPU tensors in the ONNX
    dtypes, every input batch-major (a per-call constant without a batch dim, such as Flux's position ids, is
    repeated along a new batch dim, as the runtime module does the other way round)."""
    batch = arguments[names[0]].shape[0]
    feeds = {}
    for name in names:
        value = arguments.get(name)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"the transformer call passed no tensor {name!r} (an ONNX input)")
        ref = reference[name]
        if value.dim() == ref.dim() - 1:
            value = value.unsqueeze(0).expand(batch, *value.shape)
        if value.dim() != ref.dim():
            raise ValueError(f"{name}: the transformer call passed shape {list(value.shape)}, the ONNX input has rank {ref.dim()}")
        feeds[name] = value.detach().to("cpu", ref.dtype).contiguous()
    return feeds


def _spread(items: list, k: int) -> list:
    """At most ``k`` of ``items``, evenly spread (first and last kept), in order."""
    if len(items) <= k:
        return list(items)
    idx = sorted(set(np.linspace(0, len(items) - 1, k).round().astype(int).tolist()))
    return [items[i] for i in idx]


def record_calibration_inputs(
    pipe,
    spec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int | None = None,
    guidance: float | None = None,
    max_calls: int = 64,
) -> list[dict[str, torch.Tensor]]:
    """Run the real sampler and keep the transformer's inputs of at most ``max_calls`` of its calls.

    One pipeline run per (prompt, seed), with ``spec``'s size, sequence length and the adapter's guidance
    arguments (classifier-free guidance's doubled batch or second call included); each run keeps an even spread
    of its calls over the trajectory, the runs sharing ``max_calls``. steps / guidance default to ``spec``'s.
    Returns one dict per kept call, by ONNX input name (CPU tensors, ONNX dtypes) — what
    :func:`quantize_transformer` takes. Memory: one run's transformer inputs at a time, plus what is kept.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if max_calls < 1:
        raise ValueError("max_calls must be at least 1")
    steps = spec.steps if steps is None else steps
    guidance = spec.guidance if guidance is None else guidance
    adapter = spec.adapter
    model = pipe.transformer
    names = list(adapter.transformer_for_onnx(model).input_names)
    reference = _reference_inputs(adapter, model)
    n = len(prompts)
    quotas = [max_calls // n + (1 if i < max_calls % n else 0) for i in range(n)]
    kept: list[dict[str, torch.Tensor]] = []
    for prompt, seed, quota in zip(prompts, seeds, quotas):
        if quota == 0:
            continue
        with transformer_calls(model) as calls:
            sample(pipe, spec, [prompt], [seed], steps=steps, guidance=guidance, output_type="latent")
        calls = [onnx_feeds(c.inputs, names, reference) for c in calls]
        kept += _spread(calls, quota)
    log.info("recorded %d transformer calls for calibration (%d prompts x %d steps)", len(kept), n, steps)
    return kept


def resolve_calibration(spec, pruned: Path | None, calib: QuantCalibration, served: ServedShapes | None = None) -> dict[str, Any]:
    """The concrete calibration of a quantized export: prompts, seeds, steps, guidance, image size (the served
    resolution; default the model's), calls kept, and where they come from (stage 1's plan, ``make engine``'s
    prune settings, or the model's prompt file).

    Reads only ``plan.json`` (no weights). Stage 1's prompt list is rebuilt from the model's prompt file and the
    plan's sample count unless ``calib.prompts`` gives it; a plan whose prompts hash does not match is logged
    (stage 1 ran on another prompt file: the model's prompts are used) and recorded in ``source``.
    """
    from obsdiff.packages import calibration_prompts, read_prompts

    rec: dict[str, Any] = {}
    if pruned is not None:
        from obsdiff.plan import PrunePlan

        rec = dict(PrunePlan.load(pruned / "plan.json").calibration or {})
    file_prompts = read_prompts(REPO_ROOT / spec.prompts)
    if calib.prompts is not None:
        stage1, source = list(calib.prompts), "given (stage 1's prompt list)"
    elif rec.get("samples"):
        stage1, source = calibration_prompts(file_prompts, int(rec["samples"])), "stage 1 (plan.json)"
        want = rec.get("prompts_sha256")
        if want and hashlib.sha256("\n".join(stage1).encode()).hexdigest() != want:
            log.warning("stage 1 calibrated on other prompts than %s (prompts hash differs); calibrating the quantizers on the model's prompts", spec.prompts)
            source = f"{spec.prompts} (stage 1 used another prompt file)"
    else:
        stage1, source = list(file_prompts), spec.prompts
    prompts = stage1[: calib.samples]  # the first of stage 1's trajectories (not more: a seed stage 1 never saw)
    seed = calib.seed if calib.seed is not None else int(rec.get("seed", 0))
    # INT8 parity runs on the trajectories right after the calibration ones (held out from it)
    held = [len(prompts) + i for i in range(PARITY_TRAJECTORIES)]
    return {
        "prompts": prompts,
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "prompts_source": source,
        "samples": len(prompts),
        "seeds": [seed + i for i in range(len(prompts))],
        "steps": int(calib.steps if calib.steps is not None else rec.get("steps", spec.steps)),
        "guidance": float(calib.guidance if calib.guidance is not None else rec.get("guidance", spec.guidance)),
        "height": served.resolutions[0][0] if served is not None else spec.height,
        "width": served.resolutions[0][1] if served is not None else spec.width,
        "max_calls": calib.max_calls,
        "method": "max (ModelOpt)",
        "parity_prompts": [stage1[i % len(stage1)] for i in held],
        "parity_seeds": [seed + i for i in held],
    }
