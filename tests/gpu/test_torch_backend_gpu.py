"""GPU-only: the torch backend's real kernels against the masked-dense model they replace.

A small SD3 transformer from the real class (4 heads of 64, FFN 1024: every pruned linear meets PyTorch's and
torchao's shape rules) is pruned 2:4 by magnitude; the masked-dense model (the same zeros, dense GEMMs) is the
reference. Tolerances, relative L2 error of the step output:

- 2:4 bf16 / fp16 on cuSPARSELt and on CUTLASS vs masked dense in the same dtype: 2e-2 / 1e-2 (summation order);
- FP8 + 2:4 (torchao's SM90 CUTLASS kernel) vs FP8 dense on the same quantized weights: 3e-2; vs bf16: 0.1;
- INT8 (2:4 layers as dense INT8: torchao has no sparse INT8) vs bf16 masked dense: 5e-2;
- compiled 2:4 bf16 vs eager 2:4 bf16: 1e-2.

Skipped without CUDA (and per test without the compute capability or library it needs, with the reason).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA: the 2:4, INT8 and FP8 kernels run only there"),
]

TOL = {"bf16": 2e-2, "fp16": 1e-2, "fp8_vs_fp8": 3e-2, "fp8_vs_bf16": 0.1, "int8": 5e-2, "compiled": 1e-2}


def _cc() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(scope="module")
def masked():
    """(masked-dense bf16 transformer on the GPU, its step inputs, the 2:4 layer names)."""
    pytest.importorskip("torchao", reason="the torch backend needs torchao (make gpu-check installs it from WHEELS)")
    from obsdiff.baselines import magnitude_prune_model
    from obsdiff.patterns import parse_sparsity
    from tests.factories import tiny_sd3_transformer, tiny_transformer_inputs

    model = tiny_sd3_transformer(num_layers=2, num_heads=4, head_dim=64, joint_attention_dim=256, pooled_projection_dim=128,
                                 sample_size=32, in_channels=16)
    layers = magnitude_prune_model(model, parse_sparsity("2:4"))
    model = model.to("cuda", torch.bfloat16)
    h, c, p, t = tiny_transformer_inputs(model, batch=2, text_len=77)
    inputs = {"hidden_states": h.to("cuda", torch.bfloat16), "encoder_hidden_states": c.to("cuda", torch.bfloat16),
              "pooled_projections": p.to("cuda", torch.bfloat16), "timestep": t.to("cuda")}
    return model, inputs, layers


def _run(model, inputs, dtype=torch.bfloat16):
    with torch.inference_mode():
        return model(**{k: v.to(dtype) if v.dim() > 1 else v for k, v in inputs.items()}, return_dict=False)[0]


def _prepare(model, precision: str, *, sparse=True, backend="auto", kernels=True, compile=False):
    from runtime import torch_backend as tb
    from runtime.manifest import current_gpu

    settings = tb.TorchSettings(precision=tb.PRECISIONS[precision], sparse_backend=backend, sparse_kernels=kernels, compile=compile)
    return tb.prepare_transformer(copy.deepcopy(model), None, settings, sparse=sparse, gpu=current_gpu())


@pytest.mark.parametrize("precision, backend", [("bf16", "cusparselt"), ("bf16", "cutlass"), ("fp16", "cusparselt"), ("fp16", "cutlass")])
def test_2_4_kernels_match_masked_dense(masked, precision, backend):
    if _cc() < (8, 0):
        pytest.skip(f"2:4 kernels need compute capability 8.0+, this GPU is {_cc()}")
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("this PyTorch build has no cuSPARSELt")
    model, inputs, layers = masked
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    ref = _run(copy.deepcopy(model).to(dtype), inputs, dtype)
    sparse, report = _prepare(model, precision, backend=backend)
    assert report["layers"]["kernel"] == backend
    assert report["layers"]["sparse_layers"] == len(layers), report["layers"]["refused"]
    assert isinstance(sparse.get_submodule(layers[0]).weight, torch.sparse.SparseSemiStructuredTensor)
    assert _rel(_run(sparse, inputs, dtype), ref) < TOL[precision]


def test_fp8_2_4_matches_fp8_dense(masked):
    from runtime.torch_backend import fp8_sparse_kernel_loaded

    if _cc() != (9, 0):
        pytest.skip(f"torchao's FP8 + 2:4 kernel is built for compute capability 9.0 only, this GPU is {_cc()}")
    if not fp8_sparse_kernel_loaded():
        pytest.skip("torchao's CUDA kernels did not load (a CUDA build of torch >= 2.11 is needed)")
    model, inputs, layers = masked
    ref = _run(model, inputs)
    sparse, report = _prepare(model, "fp8")
    dense_fp8, _ = _prepare(model, "fp8", kernels=False)
    assert report["layers"]["sparse_layers"] == len(layers), report["layers"]["refused"]
    got = _run(sparse, inputs)
    assert _rel(got, _run(dense_fp8, inputs)) < TOL["fp8_vs_fp8"]
    assert _rel(got, ref) < TOL["fp8_vs_bf16"]


def test_int8_runs_2_4_layers_dense_and_matches_bf16(masked):
    if _cc() < (8, 0):
        pytest.skip(f"torchao INT8 GEMMs need compute capability 8.0+, this GPU is {_cc()}")
    model, inputs, layers = masked
    int8, report = _prepare(model, "int8")
    assert report["layers"]["sparse_layers"] == 0 and set(report["layers"]["refused"]) == set(layers)
    assert _rel(_run(int8, inputs), _run(model, inputs)) < TOL["int8"]


def test_compiled_2_4_matches_eager(masked):
    if _cc() < (8, 0):
        pytest.skip(f"2:4 kernels need compute capability 8.0+, this GPU is {_cc()}")
    model, inputs, _ = masked
    eager, _ = _prepare(model, "bf16")
    compiled, report = _prepare(model, "bf16", compile=True)
    assert report["compiled"]
    assert _rel(_run(compiled, inputs), _run(eager, inputs)) < TOL["compiled"]


@pytest.mark.slow
def test_aoti_package_of_2_4_model_or_reason(masked, tmp_path):
    """AOTInductor packages the 2:4 model and the loaded package matches it, or packaging says why not."""
    from runtime import torch_package as tp
    from runtime.manifest import current_gpu

    model, inputs, _ = masked
    sparse, report = _prepare(model, "bf16")
    res = tp.package_transformer(sparse, inputs, tmp_path / "torch", gpu=current_gpu(), report=report)
    if res.path is None:
        assert res.reason and "\n" not in res.reason
        pytest.skip(f"not packaged: {res.reason}")
    loaded = tp.load_package(res.path, gpu=current_gpu())
    assert _rel(loaded(**inputs, return_dict=False)[0], _run(sparse, inputs)) < TOL["compiled"]


def test_torch_pipeline_on_2_4_kernels_draws_what_the_masked_model_draws(tmp_path):
    """tiny-sd3 end to end: the pipeline whose transformer is stage 2's compact checkpoint on the 2:4 kernels
    against the same pipeline with the 2:4 weights as dense GEMMs (both bf16, text encoders and VAE bf16): mean
    absolute pixel difference below 0.02 (images in [0, 1], 20 steps)."""
    import numpy as np

    from export.checkpoint import save_compact
    from obsdiff.baselines import magnitude_prune_model
    from obsdiff.patterns import parse_sparsity
    from runtime import torch_backend as tb
    from runtime.pipeline_runner import generate
    from runtime.torch_stage import torch_pipeline
    from tests import runtime_fixtures as fx

    if _cc() < (8, 0):
        pytest.skip(f"2:4 kernels need compute capability 8.0+, this GPU is {_cc()}")
    spec, base = fx.tiny_sd3()
    base = copy.deepcopy(base)
    layers = magnitude_prune_model(base.transformer, parse_sparsity("2:4"))
    save_compact(base.transformer, tmp_path / "export" / "compact")
    pipe, report = torch_pipeline(base, tmp_path / "export", tb.TorchSettings(compile=False), sparsity=parse_sparsity("2:4"))
    assert report["layers"]["sparse_layers"] == len(layers), report["layers"]["refused"]
    assert pipe.scheduler is not base.scheduler and next(base.text_encoder.parameters()).dtype == torch.float32
    masked, dense_report = torch_pipeline(base, tmp_path / "export", tb.TorchSettings(compile=False, sparse_kernels=False),
                                          sparsity=parse_sparsity("2:4"))
    assert dense_report["layers"]["sparse_layers"] == 0
    want = generate(masked, spec, "a handwritten digit 7", seed=0, output_type="np")
    got = generate(pipe, spec, "a handwritten digit 7", seed=0, output_type="np")
    assert float(np.abs(np.asarray(got, dtype=np.float32) - np.asarray(want, dtype=np.float32)).mean()) < 0.02
