"""GPU-only: TensorRT (or TensorRT-RTX) engines built, loaded through the manifest checks and run; parity
with ONNX Runtime through polygraphy; CUDA-event timing; the pipeline on engines vs PyTorch.

Skipped without CUDA: engines run only on an NVIDIA GPU (TensorRT-RTX builds without one, see
tests/unit/test_tensorrt_build.py).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import pytest
import torch

from tests import runtime_fixtures as fx

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA: TensorRT engines run only on a GPU"),
]


def _backend():
    from common.errors import UserError
    from runtime.manifest import current_gpu
    from runtime.trt.backend import RTX_DEFAULT_TARGETS, get_backend

    try:
        be = get_backend("auto")
    except UserError as e:
        pytest.skip(str(e))
    if be.is_rtx:
        cc = current_gpu().compute_capability
        sm = "SM" + cc.replace(".", "")
        if not hasattr(be.module.ComputeCapability, sm):
            pytest.skip(f"TensorRT-RTX {be.version} has no target for this GPU (compute {cc}); install TensorRT from NVIDIA's index")
        os.environ.setdefault("POLYGRAPHY_USE_TENSORRT_RTX", "1")
    assert RTX_DEFAULT_TARGETS
    return be


@lru_cache(maxsize=1)
def _fp16_engine():
    """fp16 export of the 2:4-pruned tiny-sd3 transformer and its engine (SPARSE_WEIGHTS)."""
    import copy

    from tests.export_helpers import export_transformer
    from runtime.trt.build import build_engine
    from runtime.trt.options import BuildOptions

    spec, pipe = fx.tiny_sd3()
    _, pruned, _ = fx.pruned_export()
    sh = spec.shapes
    onnx16 = fx.workdir() / "fp16" / "onnx" / "transformer.onnx"
    export_transformer(copy.deepcopy(pruned), onnx16, latent_hw=(sh.latent_height, sh.latent_width), text_seq_len=sh.text_seq_len,
                       precision="fp16", parity_batches=())
    opts = BuildOptions(batch=(sh.batch_min, sh.batch_opt, sh.batch_max), sparsity="2:4", timing_cache=str(fx.workdir() / "timing.cache"))
    plan = build_engine(onnx16, fx.workdir() / "fp16" / "engines" / "transformer", opts, backend=_backend(), component="transformer")
    return onnx16, plan


def _feeds(spec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    sh = spec.shapes
    g = np.random.default_rng(seed)
    return {
        "hidden_states": g.standard_normal((batch, 4, sh.latent_height, sh.latent_width), dtype=np.float32),  # (B, C, h, w)
        "encoder_hidden_states": g.standard_normal((batch, sh.text_seq_len, 128), dtype=np.float32),  # (B, S, D)
        "pooled_projections": g.standard_normal((batch, 128), dtype=np.float32),  # (B, P)
        "timestep": (g.random(batch) * 1000).astype(np.float32),  # (B,)
    }


def test_engine_loads_through_checks_and_matches_fp32_onnx():
    from export.parity import parity_tolerance, rel_error
    from runtime.manifest import current_gpu
    from runtime.ort import OrtModel
    from runtime.trt.engine import TrtEngine

    spec, _ = fx.tiny_sd3()
    onnx16, plan = _fp16_engine()
    engine = TrtEngine(plan, onnx_path=onnx16)
    m = engine.manifest
    if m["backend"] == "trt":
        assert m["gpu"] == current_gpu().to_dict()
        assert m["builder"]["timing_cache"]["path"] and (fx.workdir() / "timing.cache").is_file()
    ort32 = OrtModel(fx.pruned_export()[0] / "transformer.onnx")
    for batch in (1, 2, 4):
        feeds = _feeds(spec, batch)
        ref = ort32(feeds)["sample"].numpy()
        out = engine({k: torch.from_numpy(v).cuda() for k, v in feeds.items()})["sample"]
        torch.cuda.synchronize()
        assert out.dtype == engine.dtypes["sample"] and tuple(out.shape) == ref.shape
        # fp16 engine vs fp32 ONNX Runtime, relative to the output scale: stage 2's fp16 tolerance.
        assert rel_error(out.float().cpu().numpy(), ref) < parity_tolerance("fp16")


def test_polygraphy_engine_vs_onnxruntime_parity():
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from runtime.manifest import check_engine, current_gpu
    from runtime.trt.backend import get_backend

    spec, _ = fx.tiny_sd3()
    onnx16, plan = _fp16_engine()
    be = get_backend("auto")
    check_engine(plan, backend=be.name, backend_version=be.version, gpu=current_gpu(), onnx_path=onnx16)  # before any deserialisation
    feeds = [{k: (v.astype(np.float16) if k != "timestep" else v) for k, v in _feeds(spec, 2, seed=s).items()} for s in range(2)]
    runners = [TrtRunner(EngineFromBytes(plan.read_bytes())), OnnxrtRunner(SessionFromOnnx(str(onnx16)))]
    results = Comparator.run(runners, data_loader=feeds)
    # both compute in fp16 (u = 4.9e-4) with other kernels and fusions: 2e-2 is ~40 u, as stage 2's fp16 tolerance
    assert bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=2e-2, rtol=2e-2)))


def test_cuda_event_stage_timer():
    from runtime.stage_timer import StageTimer

    timer = StageTimer(cuda=True)
    a = torch.randn(2048, 2048, device="cuda")
    with timer.stage("matmul"):
        for _ in range(10):
            a = a @ a.T / 2048
    ms, calls = timer.collect()
    assert calls == {"matmul": 1} and ms["matmul"] > 0


def test_pipeline_on_engine_close_to_pytorch():
    from runtime.pipeline_runner import generate, with_runners
    from runtime.trt.engine import TrtEngine

    spec, pipe = fx.tiny_sd3()
    onnx16, plan = _fp16_engine()
    _, pruned, _ = fx.pruned_export()
    base = pipe.to("cuda")
    try:
        reference = type(base)(**{**base.components, "transformer": pruned.to("cuda")})
        reference.set_progress_bar_config(disable=True)
        rp = with_runners(base, {"transformer": TrtEngine(plan, onnx_path=onnx16)}, device="cuda")
        ours = generate(rp, spec, ["a handwritten digit 4"], seed=1, steps=8, output_type="np")
        ref = generate(reference, spec, ["a handwritten digit 4"], seed=1, steps=8, output_type="np")
        # fp16 transformer over 8 steps vs fp32 PyTorch: pixels in [0, 1] within 0.05.
        assert np.abs(ours - ref).max() < 0.05
    finally:
        pipe.to("cpu")
        pruned.to("cpu")


def test_dynamic_resolution_engine_runs_at_each_served_shape_and_refuses_others(tmp_path):
    """One fp16 export of tiny-sd3 serving 32x32, 64x64 and 32x64: the engine's profile covers them, each
    runs with parity against ONNX Runtime (fp32 reference), and 96x96 is refused with one line."""
    from common.errors import UserError
    from pipeline.__main__ import main
    from runtime.trt.engine import TrtEngine
    from runtime.trt.plans import find_plan

    out = tmp_path / "export"
    assert main(["export", "--model", "tiny-sd3", "--out", str(out), "--components", "transformer", "--precision", "fp16",
                 "--resolution", "32x32,64x64,32x64", "--parity-batches", "1"]) == 0
    be = _backend()
    assert main(["build", "--onnx-dir", str(out / "onnx"), "--model", "tiny-sd3", "--backend", be.name]) == 0
    engine = TrtEngine(find_plan(out / "engines" / "transformer", be), onnx_path=out / "onnx" / "transformer.onnx")
    from export.parity import ort_session

    sess = ort_session(out / "onnx" / "transformer.onnx", optimize=False)
    for h, w in ((8, 8), (16, 16), (8, 16)):
        g = torch.Generator().manual_seed(h * w)
        feeds = {"hidden_states": torch.randn(2, 4, h, w, generator=g).half(), "encoder_hidden_states": torch.randn(2, 20, 128, generator=g).half(),
                 "pooled_projections": torch.randn(2, 128, generator=g).half(), "timestep": torch.rand(2, generator=g) * 1000}
        got = engine(feeds)["sample"].float().cpu().numpy()
        ref = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0].astype(np.float32)
        assert got.shape == (2, 4, h, w)
        # fp16 engine vs fp16 ONNX Runtime, other kernels and fusions: ~40 u of fp16 (4.9e-4), as above
        assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 2e-2
    with pytest.raises(UserError, match="serves 32x32..64x64 px"):
        engine({**feeds, "hidden_states": torch.randn(2, 4, 24, 24).half()})


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_2_4_engine_runs_close_to_the_fake_quantized_model(precision, tmp_path):
    """A 2:4 tiny transformer fake-quantized with ModelOpt, exported with Q/DQ, built with SPARSE_WEIGHTS for
    this GPU and run: the engine's output stays close to the fake-quantized PyTorch model (FP8 needs SM89+)."""
    from runtime.manifest import current_gpu

    if precision == "fp8" and float(current_gpu().compute_capability) < 8.9:
        pytest.skip("FP8 tensor cores need compute capability 8.9 or later")
    from export.qdq_export import export_quantized_onnx
    from export.quantize import quantize_transformer
    from families import adapter_for
    from runtime.trt.build import build_engine
    from runtime.trt.engine import TrtEngine
    from runtime.trt.options import BuildOptions
    from tests.export_helpers import make_nm_sparse
    from tests.factories import tiny_sd3_transformer

    model = tiny_sd3_transformer(num_layers=2, seed=3)
    make_nm_sparse(model)
    adapter = adapter_for(model)
    quantize_transformer(model, precision, [adapter.transformer_inputs(model, 2, (8, 8), 6, seed=s) for s in (11, 12)])
    path = export_quantized_onnx(model, tmp_path / "transformer.onnx", adapter.transformer_inputs(model, 2, (8, 8), 6, seed=13))
    plan = build_engine(path, tmp_path / "engine", BuildOptions(batch=(1, 2, 4), sparsity="2:4"), backend=_backend(), component="transformer")
    engine = TrtEngine(plan, onnx_path=path)
    feeds = adapter.transformer_inputs(model, 2, (8, 8), 6, seed=21)
    with torch.no_grad():
        ref = adapter.transformer_for_onnx(model)(*feeds.values()).float().numpy()
    got = engine(feeds)["sample"].float().cpu().numpy()
    # the engine quantizes the activations with its own kernels: values near a rounding boundary land one step (1/127
    # of the range for INT8; FP8 E4M3 has 3 mantissa bits) away from the fake-quantized model's, through two blocks
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 5e-2
    assert engine.manifest["precision"] == precision and engine.manifest["builder"]["sparse_weights"]
