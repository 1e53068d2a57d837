"""Applying coefficients to a pipeline: a private copy of its scheduler whose ``step`` scales what it receives.

:func:`apply_correction` installs a :class:`~runtime.qsched.correction.SchedulerCorrection`; :func:`replaced_step`
runs a pipeline with any step function (the fits record and fit through it); :func:`scaled_step` is the
corrected Euler update ``a * x`` / ``b * v`` both use.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import types
from typing import Any, Callable, Iterator

import torch

from common.errors import UserError
from runtime.qsched.correction import SchedulerCorrection, load_correction

log = logging.getLogger(__name__)


def split_step_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any, torch.Tensor, tuple, dict]:
    """Split ``scheduler.step``'s arguments into ``(model_output, timestep, sample, rest, kwargs)``."""
    names = ("model_output", "timestep", "sample")
    args = list(args)
    got = [args.pop(0) if args else kwargs.pop(n) for n in names]
    if kwargs.get("per_token_timesteps") is not None:
        raise UserError("the scheduler correction does not support per-token timesteps; sample without them")
    return got[0], got[1], got[2], tuple(args), kwargs


def step_index(sched, timestep) -> int:
    if sched.step_index is None:  # what the scheduler's own step does on its first call
        sched._init_step_index(timestep)
    return int(sched.step_index)


def scaled_step(sched, a: float, b: float, model_output, timestep, sample, rest, kwargs):
    # The scheduler upcasts the sample to float32 itself and casts its result to model_output's dtype, so scaling
    # the sample in float32 and the prediction in its own dtype keeps its numerics (and a = b = 1 is bit-exact).
    return type(sched).step(sched, model_output * b, timestep, sample.to(torch.float32) * a, *rest, **kwargs)


def _corrected_step(self, *args, **kwargs):
    """``scheduler.step`` with the installed :class:`SchedulerCorrection` (bound to a scheduler instance)."""
    corr: SchedulerCorrection = self._qsched_correction
    model_output, timestep, sample, rest, kwargs = split_step_args(args, kwargs)
    i = step_index(self, timestep)
    n = len(self.timesteps) if getattr(self, "timesteps", None) is not None else corr.steps
    corr.check_steps(n)
    return scaled_step(self, corr.sample_coeff[i], corr.model_coeff[i], model_output, timestep, sample, rest, kwargs)


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
def replaced_step(pipe, step: Callable) -> Iterator[Any]:
    """Run ``pipe`` with ``step(scheduler, model_output, timestep, sample, rest, kwargs)`` as its scheduler's step
    (on a private copy of the scheduler; restored on exit)."""
    original = pipe.scheduler
    sched = copy.deepcopy(original)

    def wrapped(self, *args, **kwargs):
        model_output, timestep, sample, rest, kw = split_step_args(args, kwargs)
        return step(self, model_output, timestep, sample, rest, kw)

    _override(sched, "step", wrapped)
    pipe.scheduler = sched
    try:
        yield sched
    finally:
        if pipe.scheduler is sched:
            pipe.scheduler = original
