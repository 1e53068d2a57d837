"""The reference-free fit (:func:`fit_correction_reference_free`): the paper's linear ramps searched on a small
grid for the best quality score of the calibration images (the scores are :mod:`evaluation.jaq`'s); no dense model."""

from __future__ import annotations

import logging
import time
from typing import Sequence

from evaluation.jaq import ScoreFn, default_score_fn
from runtime.qsched.apply import apply_correction
from runtime.qsched.calibration import calibration_record, sample_calibration
from runtime.qsched.correction import SchedulerCorrection

log = logging.getLogger(__name__)

DEFAULT_GRID = (0.8, 0.9, 1.0, 1.1, 1.2)  # the paper's search range is [0.8, 1.1..1.2]


def fit_correction_reference_free(
    pipe,
    spec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    score_fn: ScoreFn | None = None,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    search: str = "coordinate",
) -> SchedulerCorrection:
    """Search the paper's ramps ``(m0, s0)`` (see :meth:`SchedulerCorrection.ramp`) maximising ``score_fn``.

    No dense model is run. score_fn: ``(images (N, H, W, 3) in [0, 1], prompts) -> float``, higher is better
    (default: :func:`default_score_fn` for ``spec``: :func:`evaluation.jaq.digits_jaq` for tiny-sd3, :func:`evaluation.jaq.clip_jaq` otherwise).
    grid: candidate values of ``m0`` and ``s0`` (1.0 is always added, so the result never scores below the
    uncorrected sampler on the calibration set). search: ``coordinate`` (``m0`` with ``s0 = 1``, then ``s0`` at the
    best ``m0``: 2G-1 sampling runs) or ``grid`` (all G² pairs, the paper's search).
    """
    if search not in ("coordinate", "grid"):
        raise ValueError(f"search must be coordinate or grid, not {search!r}")
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError("one seed per prompt, at least one prompt")
    score_fn = score_fn or default_score_fn(spec)
    steps = spec.steps if steps is None else steps
    guidance = spec.guidance if guidance is None else guidance
    values = sorted({float(v) for v in grid} | {1.0})
    scheduler = type(pipe.scheduler).__name__
    scores: dict[tuple[float, float], float] = {}
    t0 = time.perf_counter()

    def score(m0: float, s0: float) -> float:
        key = (round(m0, 6), round(s0, 6))
        if key not in scores:
            corr = SchedulerCorrection.ramp(m0, s0, steps, objective="reference-free", scheduler=scheduler)
            with apply_correction(pipe, corr):
                images = sample_calibration(pipe, spec, prompts, seeds, steps, guidance)
            scores[key] = float(score_fn(images, list(prompts)))
            log.debug("reference-free fit: m0=%.3f s0=%.3f score %.4f", m0, s0, scores[key])
        return scores[key]

    if search == "grid":
        for m0 in values:
            for s0 in values:
                score(m0, s0)
    else:
        best_m = max(values, key=lambda m: (score(m, 1.0), m == 1.0))
        max(values, key=lambda s: (score(best_m, s), s == 1.0))
    (m0, s0), best = max(scores.items(), key=lambda kv: (kv[1], kv[0] == (1.0, 1.0)))
    name = getattr(score_fn, "name", getattr(score_fn, "__name__", "score"))
    fit = {
        "method": f"{search} search of the paper's linear ramps (m0, s0) -> 1 over the steps",
        "score": name, "m0": m0, "s0": s0, "grid": values,
        "calibration": calibration_record(prompts, seeds),
        "calibration_score": {"uncorrected": scores[(1.0, 1.0)], "corrected": best},
        "evaluated": [{"m0": k[0], "s0": k[1], "score": v} for k, v in scores.items()],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("reference-free fit (%s, %d steps): m0=%.3f s0=%.3f, score %.4f -> %.4f", name, steps, m0, s0, scores[(1.0, 1.0)], best)
    return SchedulerCorrection.ramp(m0, s0, steps, objective="reference-free", scheduler=scheduler, model=getattr(spec, "id", None),
                                    guidance=guidance, fit=fit)
