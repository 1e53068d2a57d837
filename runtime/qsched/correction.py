"""The scheduler correction itself: :class:`SchedulerCorrection` (per-step sample and model coefficients), its
JSON file (format ``qsched-correction/1``) and where a configuration stores it (:func:`artifact_file`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError

FORMAT = "qsched-correction/1"
OBJECTIVES = ("identity", "trajectory", "reference-free")


@dataclass(frozen=True)
class SchedulerCorrection:
    """Per-step pre-conditioning coefficients of the sampler update (see docs/qsched.md).

    The corrected update of step ``i``: ``x_{i+1} = a_i * x_i + (sigma_{i+1} - sigma_i) * b_i * v(x_i, t_i)``.

    sample_coeff: ``a_i``, one per step (multiplies the latents the step receives).
    model_coeff: ``b_i``, one per step (multiplies the guided model prediction the step receives).
    objective: how they were fitted: ``identity``, ``trajectory`` (matching the dense model's trajectory) or
        ``reference-free`` (a quality score; its name is in ``fit["score"]``).
    scheduler: the scheduler class they are for (``FlowMatchEulerDiscreteScheduler``).
    model, guidance: the registry model and guidance scale of the calibration runs (a runner for another model
        refuses the correction: :meth:`check_model`).
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
                f"run {self.steps} steps or fit a correction for {steps} (runtime.qsched.trajectory_fit.fit_correction, cheap)"
            )

    def check_model(self, spec) -> None:
        """One-line :class:`UserError` when the coefficients were fitted on another model than ``spec`` (a
        registry :class:`~families.registry.ModelSpec`; a correction that records no model is taken as it is)."""
        if self.model is not None and self.model != spec.id:
            raise UserError(f"the scheduler correction was fitted on {self.model}, not on {spec.id}: its coefficients follow that model's "
                            f"trajectories; pass --model {self.model}, or fit one for {spec.id} (runtime.qsched)")

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
