"""Q-Sched scheduler corrections: the file, the scheduler they act on, every runner alike, and the fits."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from common.errors import UserError
from runtime.qsched.apply import apply_correction, correction_of
from runtime.qsched.correction import SchedulerCorrection, artifact_file
from runtime.qsched.reference_free_fit import fit_correction_reference_free
from runtime.qsched.trajectory_fit import fit_correction, record_trajectory, trajectory_error
from tests import runtime_fixtures as fx

STEPS = 4
PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]


def _correction(steps: int = STEPS) -> SchedulerCorrection:
    """Non-identity coefficients, as different per step as a fit makes them."""
    return SchedulerCorrection(
        tuple(1.0 - 0.02 * i for i in range(steps)), tuple(0.85 + 0.05 * i for i in range(steps)), objective="trajectory",
        model="tiny-sd3", guidance=4.0, fit={"calibration": {"n": 2, "seeds": [1, 2]}, "note": "test"},
    )


def test_round_trip_through_the_artifact_file(tmp_path):
    corr = _correction()
    path = artifact_file(tmp_path / "2-4-obs-diff", STEPS, precision="int8")
    assert path == tmp_path / "2-4-obs-diff" / "qsched" / "int8-trajectory-4steps.json"
    corr.save(path)
    assert SchedulerCorrection.load(path) == corr
    assert json.loads(path.read_text())["steps"] == STEPS
    from common.io import MARKER

    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, MARKER])  # written atomically: no temporary left
    ramp = SchedulerCorrection.ramp(0.8, 0.9, 5)
    assert ramp.model_coeff == pytest.approx((0.8, 0.85, 0.9, 0.95, 1.0)) and ramp.sample_coeff[0] == pytest.approx(0.9)
    assert SchedulerCorrection.identity(3).is_identity and not corr.is_identity


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "missing scheduler correction"),
        ("{not json", "corrupt JSON"),
        (json.dumps({"format": "something-else"}), "is not a scheduler correction"),
        (json.dumps({**_correction().to_json(), "model_coeff": [1.0]}), "malformed"),
        (json.dumps({**_correction().to_json(), "sample_coeff": "1,1"}), "malformed"),
        (json.dumps({**_correction().to_json(), "steps": 7}), "says 7 steps but holds 4"),
        (json.dumps({**_correction().to_json(), "objective": "vibes"}), "unknown objective"),
    ],
)
def test_a_bad_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        SchedulerCorrection.load(path)
    assert "\n" not in str(e.value)


def test_identity_changes_nothing_and_only_this_pipeline_is_corrected():
    from families.sampling import sample

    spec, pipe = fx.tiny_sd3()
    other = type(pipe)(**pipe.components)  # shares pipe's scheduler object
    other.set_progress_bar_config(disable=True)
    ref = sample(pipe, spec, PROMPTS, [5, 6], steps=STEPS)
    with apply_correction(pipe, SchedulerCorrection.identity(STEPS)):
        assert np.array_equal(sample(pipe, spec, PROMPTS, [5, 6], steps=STEPS), ref)  # bit-identical
    with apply_correction(pipe, _correction()) as handle:
        assert correction_of(pipe) == _correction() and correction_of(other) is None
        corrected = sample(pipe, spec, PROMPTS, [5, 6], steps=STEPS)
        assert np.abs(corrected - ref).max() > 1e-2
        assert np.array_equal(sample(other, spec, PROMPTS, [5, 6], steps=STEPS), ref)  # the sharer is left alone
        with pytest.raises(UserError, match="already applies"):
            apply_correction(pipe, _correction())
    assert pipe.scheduler is other.scheduler and correction_of(pipe) is None and handle.scheduler is not pipe.scheduler


def test_mismatched_step_count_or_scheduler_is_one_line():
    from families.sampling import sample

    spec, pipe = fx.tiny_sd3()
    with apply_correction(pipe, _correction()):
        with pytest.raises(UserError, match="fitted for 4 sampling steps but this run has 5") as e:
            sample(pipe, spec, PROMPTS[:1], [0], steps=5)
        assert "\n" not in str(e.value)
    wrong = SchedulerCorrection((1.0,) * STEPS, (1.0,) * STEPS, scheduler="EulerDiscreteScheduler")
    with pytest.raises(UserError, match="is for EulerDiscreteScheduler"):
        apply_correction(pipe, wrong)


def test_a_correction_fitted_on_another_model_is_refused_before_loading():
    from families.registry import resolve_model
    from runtime.pipeline_runner import runner_pipeline

    corr = SchedulerCorrection((1.0,) * STEPS, (1.0,) * STEPS, model="tiny-flux")
    corr.check_model(resolve_model("tiny-flux"))
    SchedulerCorrection((1.0,) * STEPS, (1.0,) * STEPS).check_model(resolve_model("tiny-sd3"))  # none recorded: taken as it is
    with pytest.raises(UserError, match="the scheduler correction was fitted on tiny-flux, not on tiny-sd3") as e:
        runner_pipeline(resolve_model("tiny-sd3"), onnx_dir="/nonexistent", correction=corr)  # before any ONNX or weights load
    assert "\n" not in str(e.value)


def test_ort_and_pytorch_runners_change_identically(tmp_path):
    """The correction acts on the scheduler, so ONNX Runtime and PyTorch transformers see it alike."""
    from runtime.pipeline_runner import generate, runner_pipeline

    spec, pipe = fx.tiny_sd3()
    onnx_dir, pruned, _ = fx.pruned_export()
    path = _correction().save(tmp_path / "qsched" / "float-trajectory-4steps.json")
    reference = type(pipe)(**{**pipe.components, "transformer": pruned})
    reference.set_progress_bar_config(disable=True)
    kw = dict(backend="ort", onnx_dir=onnx_dir, base_pipe=pipe, components=["transformer"], threads=1)
    ort_plain = runner_pipeline(spec, **kw)
    ort_corr = runner_pipeline(spec, **kw, correction=path)  # from the artifact file
    assert correction_of(ort_corr) == _correction() and correction_of(pipe) is None and correction_of(ort_plain) is None

    images = {}
    for name, p in (("ort_plain", ort_plain), ("ort_corr", ort_corr), ("torch_plain", reference)):
        images[name] = generate(p, spec, PROMPTS, seed=5, steps=STEPS, output_type="np")
    with apply_correction(reference, _correction()):
        images["torch_corr"] = generate(reference, spec, PROMPTS, seed=5, steps=STEPS, output_type="np")

    change_ort = images["ort_corr"] - images["ort_plain"]
    change_torch = images["torch_corr"] - images["torch_plain"]
    assert np.abs(change_torch).max() > 1e-2  # the coefficients do change the images
    # float32 export: ORT and PyTorch images agree to ~2e-6 (pixels in [0, 1]; measured 1.3e-6..2.1e-6), with or without the
    # correction: the transformers' float32 differences (tests/tolerances.py, ORT_PATHS_REL) carried through 4 steps and the
    # VAE decoder. 1e-5 leaves 5x; the correction itself moves pixels by > 1e-2.
    assert np.abs(images["ort_corr"] - images["torch_corr"]).max() < 1e-5
    assert np.abs(change_ort - change_torch).max() < 1e-5
    with pytest.raises(UserError, match="not a scheduler correction"):
        (tmp_path / "bad.json").write_text("{}")
        runner_pipeline(spec, **kw, correction=tmp_path / "bad.json")


def _biased(pipe, scale: float = 0.9):
    """``pipe`` with its transformer's prediction scaled: a deliberate, scheduler-correctable bias."""
    transformer = copy.deepcopy(pipe.transformer)
    transformer.register_forward_hook(lambda m, args, out: (out[0] * scale, *out[1:]) if isinstance(out, tuple) else out)
    p = type(pipe)(**{**pipe.components, "transformer": transformer})
    p.set_progress_bar_config(disable=True)
    return p


def test_trajectory_fit_recovers_a_scaled_prediction():
    spec, pipe = fx.tiny_sd3()
    biased = _biased(pipe, 0.9)
    prompts = ["a handwritten digit 1", "the number 4", "a handwritten seven", "digit 9, handwritten"]
    corr = fit_correction(pipe, biased, spec, prompts, [11, 12, 13, 14], steps=STEPS)
    # Guidance is linear in the prediction, so b = 1/0.9, a = 1 undoes the bias exactly; the float32 trajectories leave the
    # least-squares fit off by rounding only (measured 2.2e-5 at most, default and AVX2 kernels).
    assert corr.model_coeff == pytest.approx((1 / 0.9,) * STEPS, abs=1e-3)
    assert corr.sample_coeff == pytest.approx((1.0,) * STEPS, abs=1e-3)
    err = corr.fit["calibration_error"]
    assert err["uncorrected"]["final"] > 0.05 and err["corrected"]["final"] < 1e-4  # measured 8e-7 (float32 rounding)
    # ... and on prompts and seeds it was not fitted on
    held = (["a handwritten digit 2", "a handwritten digit 8"], [77, 78])
    ref = record_trajectory(pipe, spec, *held, steps=STEPS)
    before = trajectory_error(ref, record_trajectory(biased, spec, *held, steps=STEPS))["final"]
    with apply_correction(biased, corr):
        after = trajectory_error(ref, record_trajectory(biased, spec, *held, steps=STEPS))["final"]
    assert after < 0.01 * before
    assert corr.objective == "trajectory" and corr.fit["calibration"]["seeds"] == [11, 12, 13, 14]


def test_a_fit_that_cannot_help_is_the_identity():
    spec, pipe = fx.tiny_sd3()
    corr = fit_correction(pipe, pipe, spec, PROMPTS, [3, 4], steps=2)  # the compressed model is the dense one
    assert corr.is_identity and corr.fit["shrink"] == 0.0
    assert corr.fit["calibration_error"]["corrected"]["final"] == corr.fit["calibration_error"]["uncorrected"]["final"] == 0.0


def test_reference_free_search_keeps_the_best_ramp():
    spec, pipe = fx.tiny_sd3()
    seen = []

    def brightness(images, prompts):  # any reference-free score: here, brighter is better
        seen.append(float(images.mean()))
        return seen[-1]

    brightness.name = "brightness"
    corr = fit_correction_reference_free(pipe, spec, PROMPTS, [3, 4], brightness, steps=2, grid=(0.9, 1.1))
    assert len(seen) == 5  # coordinate search over {0.9, 1.0, 1.1}: 3 values of m0, then 2 new values of s0
    fit = corr.fit
    assert fit["calibration_score"]["corrected"] == max(seen) >= fit["calibration_score"]["uncorrected"]
    assert corr == SchedulerCorrection.ramp(fit["m0"], fit["s0"], 2, objective="reference-free", model="tiny-sd3", guidance=spec.guidance, fit=fit)
    assert fit["score"] == "brightness" and correction_of(pipe) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA: TensorRT engines run only on a GPU")
def test_tensorrt_runner_changes_like_pytorch():
    """The TensorRT(-RTX) runner takes the same correction through ``runner_pipeline(correction=...)``."""
    from runtime.pipeline_runner import generate, runner_pipeline

    spec, pipe = fx.tiny_sd3()
    onnx_dir, pruned, _ = fx.pruned_export()
    plan = fx.rtx_engine()  # engines/transformer/<plan> of the fp32 2:4 export
    try:
        kw = dict(backend="trt", onnx_dir=onnx_dir, engine_dir=plan.parent.parent, base_pipe=pipe, components=["transformer"], device="cuda")
        trt_plain, trt_corr = runner_pipeline(spec, **kw), runner_pipeline(spec, **kw, correction=_correction())
        reference = type(trt_plain)(**{**trt_plain.components, "transformer": pruned.to("cuda")})
        reference.set_progress_bar_config(disable=True)
        run = lambda p: generate(p, spec, PROMPTS, seed=5, steps=STEPS, output_type="np")  # noqa: E731
        plain, corr, torch_plain = run(trt_plain), run(trt_corr), run(reference)
        with apply_correction(reference, _correction()):
            torch_corr = run(reference)
        # The engine may compute in reduced precision (TF32/fp16 tactics): the same bound as the fp16 pipeline test.
        assert np.abs(corr - torch_corr).max() < 0.05
        assert np.abs((corr - plain) - (torch_corr - torch_plain)).max() < 0.05
        assert np.abs(corr - plain).max() > 1e-2 and np.abs(torch_corr - torch_plain).max() > 1e-2
    finally:
        pipe.to("cpu")
        pruned.to("cpu")


def test_flux_pipeline_takes_and_fits_corrections_too():
    """Flux's pipeline inspects ``set_timesteps`` (custom sigmas) and packs its latents: neither gets in the way."""
    from families.registry import load_pipeline, resolve_model
    from families.sampling import sample

    spec = resolve_model("tiny-flux")
    if not (spec.path / "model_index.json").is_file():
        pytest.skip("models/tiny-flux is not built yet")
    pipe = load_pipeline(spec)
    ref = sample(pipe, spec, PROMPTS, [1, 2], steps=2)
    with apply_correction(pipe, SchedulerCorrection.identity(2)):
        assert np.array_equal(sample(pipe, spec, PROMPTS, [1, 2], steps=2), ref)
    corr = fit_correction(pipe, _biased(pipe, 0.9), spec, PROMPTS, [1, 2], steps=2)
    # exact up to float32 rounding, as for tiny-sd3 above
    assert corr.model_coeff == pytest.approx((1 / 0.9,) * 2, abs=1e-3) and corr.sample_coeff == pytest.approx((1.0,) * 2, abs=1e-3)
