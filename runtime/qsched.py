"""Scheduler-side correction of a compressed model (after Q-Sched, arXiv 2509.01624).

Pruning and quantization bias the transformer's prediction, and over a few-step sampler the error adds up.
Q-Sched leaves the weights alone and corrects the *sampler*: two pre-conditioning coefficients per step scale
what the scheduler's update receives. For the rectified-flow Euler sampler of SD3 and Flux
(``FlowMatchEulerDiscreteScheduler``) the corrected update of step ``i`` is::

    x_{i+1} = a_i * x_i + (sigma_{i+1} - sigma_i) * b_i * v_theta(x_i, t_i)        # identity: a_i = b_i = 1

``a`` is the *sample* coefficient and ``b`` the *model* coefficient, exactly the form of the authors' code
(``enyac-group/q-sched``, ``src/flux/scheduling_flow_match_euler_discrete.py``: ``model_output *= model_coeff[i]``,
``sample *= sample_coeff[i]`` before the Euler update). ``v`` is what the scheduler receives: the guided
prediction after classifier-free guidance. Because the correction scales the scheduler's inputs, it is the same
whatever computes ``v`` (a PyTorch module, an ONNX Runtime session or a TensorRT engine behind
:mod:`runtime.pipeline_runner`'s adapters) and whatever the family (SD3, Flux: the adapter's pipeline calls
``scheduler.step`` in both).

Two ways to fit the coefficients, both training-free and cheap next to compression itself:

- :func:`fit_correction` — **trajectory matching**, when the dense model is at hand. The dense and the
  compressed pipelines start from the same noise on calibration prompts; step by step, ``(a_i, b_i)`` is the
  closed-form least-squares solution of ``min ||a x̂_i + Δσ_i b v̂_i - x_{i+1}||²`` over every latent element of
  the calibration batch, where ``x̂_i`` is the *corrected* compressed trajectory so far and ``x_{i+1}`` the dense
  one. Greedy (each step sees the earlier corrections), so it undoes accumulated drift, not just the local bias;
  the box ``DEFAULT_BOUNDS`` keeps the last, smallest updates from soaking up the accumulated error, and a fit that
  does not lower the final calibration error is shrunk towards (or back to) the identity.
  Why this objective: the dense model's trajectory is what compression should not change; matching it needs no
  quality model, costs a few sampling runs, and has a unique closed-form optimum per step (2 unknowns).
- :func:`fit_correction_reference_free` — **a reference-free quality objective**, the paper's setting (no
  full-precision inference). The paper's parametrisation: ``b_i`` ramps linearly from ``m0`` at the first step to
  1 at the last, ``a_i`` from ``s0`` to 1 (``torch.linspace(m0, 1, N)`` in the authors' search); ``(m0, s0)`` is
  searched on a small grid (coordinate search by default: 2G-1 sampling runs) maximising a score of the
  calibration images. The paper's JAQ score is ``log(CLIP score) + k * CLIP-IQA`` (text-image alignment plus image
  quality); :func:`evaluation.jaq.clip_jaq` is that score with locally cached CLIP weights. For the embedded ``tiny-sd3``
  (handwritten digits, no CLIP) :func:`evaluation.jaq.digits_jaq` is its analogue on the committed digit classifier:
  ``mean log p(prompted digit)`` (alignment) ``- k * log FD`` (quality: Fréchet distance of the classifier's
  features to the real digits of the classifier's own training split, not the held-out split the evaluation
  uses). Why: it is the only option when no dense model can run (the paper's motivation: full precision does not
  fit the device), and it optimises what is measured rather than a proxy of it.

The coefficients live in a :class:`SchedulerCorrection` (JSON, stored next to the compressed artifact, see
:func:`artifact_file`); :func:`apply_correction` installs them on one pipeline's own copy of the scheduler and
:func:`runtime.pipeline_runner.runner_pipeline` takes ``correction=``. Coefficients are per step of one schedule:
applying coefficients fitted for N steps to a run of M != N steps is refused with one line (refit: it is cheap)
rather than interpolated, because the per-step errors of different schedules are not samples of one curve.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from common.errors import UserError
from evaluation.jaq import ScoreFn, default_score_fn

log = logging.getLogger(__name__)

FORMAT = "qsched-correction/1"
OBJECTIVES = ("identity", "trajectory", "reference-free")
DEFAULT_GRID = (0.8, 0.9, 1.0, 1.1, 1.2)  # the paper's search range is [0.8, 1.1..1.2]
DEFAULT_BOUNDS = (0.8, 1.25)  # the trajectory fit's box: about the paper's search range; the last steps hit it (see fit_correction)



# --------------------------------------------------------------------------------------------- the coefficients


@dataclass(frozen=True)
class SchedulerCorrection:
    """Per-step pre-conditioning coefficients of the sampler update (see the module docstring).

    sample_coeff: ``a_i``, one per step (multiplies the latents the step receives).
    model_coeff: ``b_i``, one per step (multiplies the guided model prediction the step receives).
    objective: how they were fitted: ``identity``, ``trajectory`` (matching the dense model's trajectory) or
        ``reference-free`` (a quality score; its name is in ``fit["score"]``).
    scheduler: the scheduler class they are for (``FlowMatchEulerDiscreteScheduler``).
    model, guidance: the registry model and guidance scale of the calibration runs (informative).
    fit: what the fit did and measured (calibration prompts' hash, seeds, errors or scores before/after...).
    """

    sample_coeff: tuple[float, ...]
    model_coeff: tuple[float, ...]
    objective: str = "identity"
    scheduler: str = "FlowMatchEulerDiscreteScheduler"
    model: str | None = None
    guidance: float | None = None
    fit: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_coeff", tuple(float(v) for v in self.sample_coeff))
        object.__setattr__(self, "model_coeff", tuple(float(v) for v in self.model_coeff))
        problem = _problem(self)
        if problem:
            raise ValueError(problem)

    @property
    def steps(self) -> int:
        """The number of sampling steps the coefficients were fitted for."""
        return len(self.sample_coeff)

    @property
    def is_identity(self) -> bool:
        return all(v == 1.0 for v in self.sample_coeff + self.model_coeff)

    @classmethod
    def identity(cls, steps: int, **kwargs) -> "SchedulerCorrection":
        return cls((1.0,) * steps, (1.0,) * steps, objective="identity", **kwargs)

    @classmethod
    def ramp(cls, m0: float, s0: float, steps: int, **kwargs) -> "SchedulerCorrection":
        """The paper's parametrisation: ``b`` from ``m0`` to 1 and ``a`` from ``s0`` to 1, linearly over the steps."""
        return cls(_linspace(s0, steps), _linspace(m0, steps), **kwargs)

    def check_steps(self, steps: int) -> None:
        """One-line :class:`UserError` unless the coefficients are for ``steps`` steps."""
        if steps != self.steps:
            raise UserError(
                f"the scheduler correction was fitted for {self.steps} sampling steps but this run has {steps}; "
                f"run {self.steps} steps or fit a correction for {steps} (runtime.qsched.fit_correction, cheap)"
            )

    # ------------------------------------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "steps": self.steps,
            "objective": self.objective,
            "scheduler": self.scheduler,
            "model": self.model,
            "guidance": self.guidance,
            "sample_coeff": list(self.sample_coeff),
            "model_coeff": list(self.model_coeff),
            "fit": self.fit,
        }

    @classmethod
    def from_json(cls, obj: Any, *, source: str = "scheduler correction") -> "SchedulerCorrection":
        """Parse :meth:`to_json`'s dict; one-line :class:`UserError` naming ``source`` if it is not one."""
        fix = "refit it (runtime.qsched) or delete it"
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{source} is not a scheduler correction (format {found!r}, expected {FORMAT!r}); {fix}")
        try:
            sample, model = obj["sample_coeff"], obj["model_coeff"]
            if not (isinstance(sample, list) and isinstance(model, list)):
                raise TypeError("coefficients must be lists")
            corr = cls(
                tuple(float(v) for v in sample),
                tuple(float(v) for v in model),
                objective=str(obj["objective"]),
                scheduler=str(obj["scheduler"]),
                model=obj.get("model"),
                guidance=None if obj.get("guidance") is None else float(obj["guidance"]),
                fit=dict(obj.get("fit") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source} is malformed ({_one_line(e)}); {fix}") from None
        if obj.get("steps") != corr.steps:
            raise UserError(f"{source} says {obj.get('steps')} steps but holds {corr.steps} coefficients per kind; {fix}")
        return corr

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (a killed run never leaves a file that looks finished)."""
        from common.io import write_json

        write_json(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SchedulerCorrection":
        from common.io import read_json

        return cls.from_json(read_json(path, what="scheduler correction"), source=str(path))


def _problem(c: SchedulerCorrection) -> str | None:
    if c.objective not in OBJECTIVES:
        return f"unknown objective {c.objective!r} (accepted: {', '.join(OBJECTIVES)})"
    if len(c.sample_coeff) != len(c.model_coeff):
        return f"{len(c.sample_coeff)} sample coefficients but {len(c.model_coeff)} model coefficients"
    if not c.sample_coeff:
        return "no coefficients (a correction is for at least one step)"
    if not all(math.isfinite(v) for v in c.sample_coeff + c.model_coeff):
        return "a coefficient is not finite"
    return None


def _one_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _linspace(start: float, steps: int) -> tuple[float, ...]:
    # torch.linspace(start, 1, steps) as the authors' search builds it; one step keeps ``start``
    if steps == 1:
        return (float(start),)
    return tuple(float(start + (1.0 - start) * i / (steps - 1)) for i in range(steps))


def artifact_file(config_dir: str | os.PathLike, steps: int, *, precision: str | None = None, objective: str = "trajectory") -> Path:
    """Where a configuration's correction is stored: ``<config_dir>/qsched/<precision>-<objective>-<steps>steps.json``.

    config_dir: the artifact directory of the compressed model (``artifacts/<model>/<config-id>/``).
    precision: ``int8``/``fp8`` for a quantized transformer, None for the float one (``float``).
    """
    return Path(config_dir) / "qsched" / f"{precision or 'float'}-{objective}-{int(steps)}steps.json"


def load_correction(correction: "SchedulerCorrection | str | os.PathLike | None") -> SchedulerCorrection | None:
    """A :class:`SchedulerCorrection` as given, or loaded from its JSON path; None stays None."""
    if correction is None or isinstance(correction, SchedulerCorrection):
        return correction
    return SchedulerCorrection.load(correction)


# ------------------------------------------------------------------------------------------------ applying them


def _step_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any, torch.Tensor, tuple, dict]:
    """Split ``scheduler.step``'s arguments into ``(model_output, timestep, sample, rest, kwargs)``."""
    names = ("model_output", "timestep", "sample")
    args = list(args)
    got = [args.pop(0) if args else kwargs.pop(n) for n in names]
    if kwargs.get("per_token_timesteps") is not None:
        raise UserError("the scheduler correction does not support per-token timesteps; sample without them")
    return got[0], got[1], got[2], tuple(args), kwargs


def _step_index(sched, timestep) -> int:
    if sched.step_index is None:  # what the scheduler's own step does on its first call
        sched._init_step_index(timestep)
    return int(sched.step_index)


def _scaled_step(sched, a: float, b: float, model_output, timestep, sample, rest, kwargs):
    # The scheduler upcasts the sample to float32 itself and casts its result to model_output's dtype, so scaling
    # the sample in float32 and the prediction in its own dtype keeps its numerics (and a = b = 1 is bit-exact).
    return type(sched).step(sched, model_output * b, timestep, sample.to(torch.float32) * a, *rest, **kwargs)


def _corrected_step(self, *args, **kwargs):
    """``scheduler.step`` with the installed :class:`SchedulerCorrection` (bound to a scheduler instance)."""
    corr: SchedulerCorrection = self._qsched_correction
    model_output, timestep, sample, rest, kwargs = _step_args(args, kwargs)
    i = _step_index(self, timestep)
    n = len(self.timesteps) if getattr(self, "timesteps", None) is not None else corr.steps
    corr.check_steps(n)
    return _scaled_step(self, corr.sample_coeff[i], corr.model_coeff[i], model_output, timestep, sample, rest, kwargs)


def _checked_set_timesteps(self, *args, **kwargs):
    """``scheduler.set_timesteps`` that refuses a step count the installed correction was not fitted for
    (before the denoising loop starts)."""
    out = type(self).set_timesteps(self, *args, **kwargs)
    self._qsched_correction.check_steps(len(self.timesteps))
    return out


def _override(sched, name: str, fn: Callable) -> None:
    """Bind ``fn`` as ``sched.<name>`` on this instance only, showing the class method's signature: pipelines
    inspect it (Flux's ``retrieve_timesteps`` looks for ``sigmas`` in ``set_timesteps``'s parameters)."""
    @functools.wraps(getattr(type(sched), name))
    def method(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    setattr(sched, name, types.MethodType(method, sched))


def correction_of(pipe) -> SchedulerCorrection | None:
    """The correction installed on ``pipe``'s scheduler, if any."""
    return getattr(pipe.scheduler, "_qsched_correction", None)


class AppliedCorrection:
    """Handle of :func:`apply_correction`: ``remove()`` (or leaving its ``with`` block) restores the scheduler."""

    def __init__(self, pipe, original, scheduler) -> None:
        self.pipe, self._original, self.scheduler = pipe, original, scheduler

    def remove(self) -> None:
        if self.pipe.scheduler is self.scheduler:
            self.pipe.scheduler = self._original

    def __enter__(self) -> "AppliedCorrection":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_correction(pipe, correction: "SchedulerCorrection | str | os.PathLike") -> AppliedCorrection:
    """Make ``pipe``'s scheduler apply ``correction`` (a :class:`SchedulerCorrection` or its JSON path).

    ``pipe`` gets its own copy of its scheduler with a corrected ``step`` (pipelines built from another's
    components share one scheduler object; the others are left alone). The step index picks the coefficients;
    a run with another step count than the correction's fails with one line before the denoising loop. Works
    for any transformer behind the pipeline (PyTorch, ONNX Runtime, TensorRT): only the scheduler changes.
    Copies of the corrected pipeline's scheduler (:func:`runtime.pipeline_runner.with_runners`) keep it.

    Returns a handle: use it as a context manager, or call ``remove()``; without either the correction stays.
    """
    corr = load_correction(correction)
    original = pipe.scheduler
    if getattr(original, "_qsched_correction", None) is not None:
        raise UserError("this pipeline's scheduler already applies a correction; remove it first")
    if type(original).__name__ != corr.scheduler:
        raise UserError(f"the scheduler correction is for {corr.scheduler}, but this pipeline samples with {type(original).__name__}; fit one for it")
    if getattr(original.config, "stochastic_sampling", False):
        log.warning("the scheduler samples stochastically: the correction scales its inputs, but was defined for the deterministic update")
    sched = copy.deepcopy(original)
    sched._qsched_correction = corr
    _override(sched, "step", _corrected_step)
    _override(sched, "set_timesteps", _checked_set_timesteps)
    pipe.scheduler = sched
    return AppliedCorrection(pipe, original, sched)


@contextlib.contextmanager
def _scheduler_step(pipe, step: Callable) -> Iterator[Any]:
    """Run ``pipe`` with ``step(scheduler, model_output, timestep, sample, rest, kwargs)`` as its scheduler's step
    (on a private copy of the scheduler; restored on exit)."""
    original = pipe.scheduler
    sched = copy.deepcopy(original)

    def wrapped(self, *args, **kwargs):
        model_output, timestep, sample, rest, kw = _step_args(args, kwargs)
        return step(self, model_output, timestep, sample, rest, kw)

    _override(sched, "step", wrapped)
    pipe.scheduler = sched
    try:
        yield sched
    finally:
        if pipe.scheduler is sched:
            pipe.scheduler = original


# ------------------------------------------------------------------------------------------- trajectory matching


def _check_euler(pipe) -> None:
    sched = pipe.scheduler
    if getattr(sched, "sigmas", None) is None or not hasattr(sched, "_init_step_index"):
        raise UserError(f"trajectory fitting needs a flow-matching Euler scheduler (sigmas), not {type(sched).__name__}")
    if getattr(sched.config, "stochastic_sampling", False):
        raise UserError("trajectory fitting needs the deterministic Euler update; the scheduler samples stochastically")


def _sample(pipe, spec, prompts, seeds, steps, guidance) -> np.ndarray:
    from families.sampling import sample

    # one batch: every calibration sample shares each step's coefficients
    return sample(pipe, spec, list(prompts), list(seeds), steps=steps, guidance=guidance, batch_size=len(prompts))


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
        i = _step_index(sched, timestep)
        a, b = (corr.sample_coeff[i], corr.model_coeff[i]) if corr is not None else (1.0, 1.0)
        res = _scaled_step(sched, a, b, model_output, timestep, sample, rest, kwargs)
        out.append((res[0] if isinstance(res, tuple) else res.prev_sample).detach().float().cpu().clone())
        return res

    steps = spec.steps if steps is None else steps
    if corr is not None:
        corr.check_steps(steps)
    with _scheduler_step(pipe, step):
        _sample(pipe, spec, prompts, seeds, steps, guidance)
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
        i = _step_index(sched, timestep)
        dt = float(sched.sigmas[i + 1] - sched.sigmas[i])
        x = sample.detach().float().cpu()  # (B, ...) the corrected trajectory so far
        u = dt * model_output.detach().float().cpu()  # (B, ...) the uncorrected Euler increment
        a, b = _solve_step(x, u, reference[i], terms, ridge, bounds)
        if a in bounds or b in bounds:
            clamped.append(i)
        a_fit.append(a)
        b_fit.append(b)
        return _scaled_step(sched, a, b, model_output, timestep, sample, rest, kwargs)

    with _scheduler_step(pipe, step):
        _sample(pipe, spec, prompts, seeds, steps, guidance)
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
        "calibration": _calibration_record(prompts, seeds),
        "calibration_error": {"uncorrected": before, "corrected": after},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("trajectory fit (%d steps, %d samples): final latent error %.4f -> %.4f", steps, len(prompts), before["final"], after["final"])
    return SchedulerCorrection(corr.sample_coeff, corr.model_coeff, objective="trajectory", scheduler=corr.scheduler,
                               model=getattr(spec, "id", None), guidance=guidance, fit=fit)


def _towards_identity(a: Sequence[float], b: Sequence[float], t: float, **kwargs) -> SchedulerCorrection:
    """Coefficients ``1 + t (c - 1)``: t = 1 as fitted, 0 the identity."""
    return SchedulerCorrection(tuple(1 + t * (v - 1) for v in a), tuple(1 + t * (v - 1) for v in b), objective="trajectory", **kwargs)


def _calibration_record(prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    import hashlib

    return {"n": len(prompts), "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "seeds": [int(s) for s in seeds]}


# ------------------------------------------------------------------------------------------------ reference-free


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
                images = _sample(pipe, spec, prompts, seeds, steps, guidance)
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
        "calibration": _calibration_record(prompts, seeds),
        "calibration_score": {"uncorrected": scores[(1.0, 1.0)], "corrected": best},
        "evaluated": [{"m0": k[0], "s0": k[1], "score": v} for k, v in scores.items()],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("reference-free fit (%s, %d steps): m0=%.3f s0=%.3f, score %.4f -> %.4f", name, steps, m0, s0, scores[(1.0, 1.0)], best)
    return SchedulerCorrection.ramp(m0, s0, steps, objective="reference-free", scheduler=scheduler, model=getattr(spec, "id", None),
                                    guidance=guidance, fit=fit)
