"""Trajectory matching (:func:`fit_correction`): per-step coefficients, in closed form, that make the compressed
pipeline track the dense one from the same noise; :func:`record_trajectory` and :func:`trajectory_error` measure it."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

import torch

from common.errors import UserError
from runtime.qsched.apply import correction_of, replaced_step, scaled_step, step_index
from runtime.qsched.calibration import calibration_record, sample_calibration
from runtime.qsched.correction import SchedulerCorrection

log = logging.getLogger(__name__)

DEFAULT_BOUNDS = (0.8, 1.25)  # the trajectory fit's box: about the paper's search range; the last steps hit it (see fit_correction)


def _check_euler(pipe) -> None:
    sched = pipe.scheduler
    if getattr(sched, "sigmas", None) is None or not hasattr(sched, "_init_step_index"):
        raise UserError(f"trajectory fitting needs a flow-matching Euler scheduler (sigmas), not {type(sched).__name__}")
    if getattr(sched.config, "stochastic_sampling", False):
        raise UserError("trajectory fitting needs the deterministic Euler update; the scheduler samples stochastically")


def record_trajectory(pipe, spec, prompts: Sequence[str], seeds: Sequence[int], *, steps: int | None = None, guidance: float | None = None,
                      correction: SchedulerCorrection | None = None) -> list[torch.Tensor]:
    """Sample ``prompts`` x ``seeds`` (one batch, through :func:`families.sampling.sample`) and return the
    latents after every scheduler step: ``[x_1, ..., x_N]`` (float32, CPU; the pipeline's latent layout).

    correction: coefficients to sample with (default: the one installed on ``pipe``, if any)."""
    out: list[torch.Tensor] = []
    installed = correction_of(pipe)
    if correction is not None and installed is not None:
        raise UserError("this pipeline's scheduler already applies a correction; remove it or pass none")
    corr = correction if correction is not None else installed

    def step(sched, model_output, timestep, sample, rest, kwargs):
        i = step_index(sched, timestep)
        a, b = (corr.sample_coeff[i], corr.model_coeff[i]) if corr is not None else (1.0, 1.0)
        res = scaled_step(sched, a, b, model_output, timestep, sample, rest, kwargs)
        out.append((res[0] if isinstance(res, tuple) else res.prev_sample).detach().float().cpu().clone())
        return res

    steps = spec.steps if steps is None else steps
    if corr is not None:
        corr.check_steps(steps)
    with replaced_step(pipe, step):
        sample_calibration(pipe, spec, prompts, seeds, steps, guidance)
    return out


def trajectory_error(reference: Sequence[torch.Tensor], trajectory: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Relative error ``||x̂_i - x_i|| / ||x_i||`` of a trajectory against the reference, per step and final."""
    per_step = [float((t - r).norm() / r.norm().clamp_min(1e-12)) for r, t in zip(reference, trajectory)]
    return {"final": per_step[-1], "per_step": per_step}


def _solve_step(x: torch.Tensor, u: torch.Tensor, y: torch.Tensor, terms: str, ridge: float,
                bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float]:
    """``argmin_{a,b in bounds} ||a x + b u - y||² + ridge (||x||² (a-1)² + ||u||² (b-1)²)`` (float64, exact).

    terms: ``both``, ``model`` (a = 1) or ``sample`` (b = 1). The objective is a convex quadratic in (a, b), so its
    minimum over the box is the unconstrained one when inside, else the best of the edges' clamped 1-D minima.
    """
    x, u, y = x.double().reshape(-1), u.double().reshape(-1), y.double().reshape(-1)
    xx, uu, xu, xy, uy = float(x @ x), float(u @ u), float(x @ u), float(x @ y), float(u @ y)
    lo, hi = bounds
    # objective up to a constant: q(a, b) = A a² + B b² + 2 C a b - 2 D a - 2 E b
    A, B, C, D, E = xx * (1 + ridge), uu * (1 + ridge), xu, xy + ridge * xx, uy + ridge * uu

    def q(a: float, b: float) -> float:
        return A * a * a + B * b * b + 2 * C * a * b - 2 * D * a - 2 * E * b

    def clamp(v: float) -> float:
        return min(max(v, lo), hi)

    def best_b(a: float) -> float:  # 1-D minimum over b at fixed a
        return clamp((E - C * a) / B) if B > 0 else 1.0

    def best_a(b: float) -> float:
        return clamp((D - C * b) / A) if A > 0 else 1.0

    if terms == "model":
        return 1.0, best_b(1.0)
    if terms == "sample":
        return best_a(1.0), 1.0
    det = A * B - C * C
    if A > 0 and B > 0 and det > 1e-12 * A * B:
        a, b = (D * B - C * E) / det, (A * E - C * D) / det
        if lo <= a <= hi and lo <= b <= hi:
            return a, b
    elif A <= 0 or B <= 0:  # dt = 0 or an empty batch: keep the step as it is
        return 1.0, 1.0
    edges = [(a, best_b(a)) for a in (lo, hi) if math.isfinite(a)] + [(best_a(b), b) for b in (lo, hi) if math.isfinite(b)]
    return min(edges, key=lambda ab: q(*ab)) if edges else (1.0, 1.0)


def fit_correction(
    reference_pipe,
    pipe,
    spec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    terms: str = "both",
    ridge: float = 0.0,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    reference: Sequence[torch.Tensor] | None = None,
) -> SchedulerCorrection:
    """Fit per-step ``(a_i, b_i)`` so that ``pipe`` (compressed) tracks ``reference_pipe`` (dense).

    Both sample ``prompts`` x ``seeds`` from the same noise (``spec``'s sampler, ``steps``/``guidance`` default to
    the registry's), all calibration samples in one batch. Step by step, on the *corrected* compressed trajectory,
    ``(a_i, b_i)`` minimise ``||a_i x̂_i + Δσ_i b_i v̂_i - x_{i+1}||²`` over every latent element (closed form).
    terms: ``both`` (default), ``model`` (only ``b``) or ``sample`` (only ``a``). ridge: pulls the coefficients
    towards 1, relative to the data's scale (0 = plain least squares). bounds: coefficients are clamped into it.
    reference: the dense trajectory when already recorded (:func:`record_trajectory`, same prompts/seeds/steps).
    Greedy per-step optima need not lower the *final* error: when they do not on the calibration set, the
    coefficients are taken half-way to 1, and failing that the identity is returned (``fit["shrink"]``: 1, 0.5, 0).
    Cost: four to five sampling runs of the calibration batch (dense, uncorrected, corrected-while-fitting, one or
    two checks). Returns the correction; ``fit`` holds the calibration trajectory errors before and after.
    """
    if terms not in ("both", "model", "sample"):
        raise ValueError(f"terms must be both, model or sample, not {terms!r}")
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError("one seed per prompt, at least one prompt")
    if correction_of(pipe) is not None:
        raise UserError("the pipeline to fit already applies a scheduler correction; fit on the pipeline without it")
    _check_euler(pipe)
    steps = spec.steps if steps is None else steps
    guidance = spec.guidance if guidance is None else guidance
    t0 = time.perf_counter()
    if reference is None:
        reference = record_trajectory(reference_pipe, spec, prompts, seeds, steps=steps, guidance=guidance)
    if len(reference) != steps:
        raise ValueError(f"the reference trajectory has {len(reference)} steps, not {steps}")
    before = trajectory_error(reference, record_trajectory(pipe, spec, prompts, seeds, steps=steps, guidance=guidance))

    a_fit: list[float] = []
    b_fit: list[float] = []
    clamped: list[int] = []

    def step(sched, model_output, timestep, sample, rest, kwargs):
        i = step_index(sched, timestep)
        dt = float(sched.sigmas[i + 1] - sched.sigmas[i])
        x = sample.detach().float().cpu()  # (B, ...) the corrected trajectory so far
        u = dt * model_output.detach().float().cpu()  # (B, ...) the uncorrected Euler increment
        a, b = _solve_step(x, u, reference[i], terms, ridge, bounds)
        if a in bounds or b in bounds:
            clamped.append(i)
        a_fit.append(a)
        b_fit.append(b)
        return scaled_step(sched, a, b, model_output, timestep, sample, rest, kwargs)

    with replaced_step(pipe, step):
        sample_calibration(pipe, spec, prompts, seeds, steps, guidance)
    if clamped:
        log.info("trajectory fit: the coefficients of steps %s are on the bounds %s", clamped, bounds)
    # Greedy is not globally optimal: when the fitted coefficients do not lower the final calibration error, take
    # them half-way to 1, and failing that keep the identity (the fit never leaves the calibration set worse).
    shrink, after = 1.0, None
    for t in (1.0, 0.5):
        cand = _towards_identity(a_fit, b_fit, t, scheduler=type(pipe.scheduler).__name__)
        err = trajectory_error(reference, record_trajectory(pipe, spec, prompts, seeds, steps=steps, guidance=guidance, correction=cand))
        if err["final"] < before["final"]:
            corr, shrink, after = cand, t, err
            break
    if after is None:
        log.warning("trajectory fit: per-step coefficients do not lower the calibration trajectory error (%.4f); keeping the identity", before["final"])
        corr, shrink, after = _towards_identity(a_fit, b_fit, 0.0, scheduler=type(pipe.scheduler).__name__), 0.0, before
    fit = {
        "method": "greedy per-step least squares on the latent update against the dense trajectory",
        "terms": terms, "ridge": ridge, "bounds": list(bounds), "clamped_steps": clamped, "shrink": shrink,
        "greedy_coefficients": {"sample_coeff": a_fit, "model_coeff": b_fit},
        "calibration": calibration_record(prompts, seeds),
        "calibration_error": {"uncorrected": before, "corrected": after},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("trajectory fit (%d steps, %d samples): final latent error %.4f -> %.4f", steps, len(prompts), before["final"], after["final"])
    return SchedulerCorrection(corr.sample_coeff, corr.model_coeff, objective="trajectory", scheduler=corr.scheduler,
                               model=getattr(spec, "id", None), guidance=guidance, fit=fit)


def _towards_identity(a: Sequence[float], b: Sequence[float], t: float, **kwargs) -> SchedulerCorrection:
    """Coefficients ``1 + t (c - 1)``: t = 1 as fitted, 0 the identity."""
    return SchedulerCorrection(tuple(1 + t * (v - 1) for v in a), tuple(1 + t * (v - 1) for v in b), objective="trajectory", **kwargs)
