"""The torch backend's CPU-side logic: precisions, hardware refusals, which layers reach the 2:4 kernels (and why
the others do not), torchao's INT8 conversion on CPU, and the dry-run report. The kernels themselves run in
tests/gpu/test_torch_backend_gpu.py."""

from __future__ import annotations

import copy

import pytest
import torch

from common.errors import UserError
from obsdiff.baselines import magnitude_prune_model
from obsdiff.patterns import parse_sparsity
from runtime import torch_backend as tb
from runtime.manifest import GpuInfo
from tests.factories import tiny_sd3_transformer, tiny_transformer_inputs

TORCHAO = "needs torchao (`make setup` installs it: the torch-gpu extra)"

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
L4 = GpuInfo("NVIDIA L4", "8.9")
A10 = GpuInfo("NVIDIA A10", "8.6")
T4 = GpuInfo("Tesla T4", "7.5")


def _plan(layers):
    from obsdiff.plan import PrunePlan

    return PrunePlan(model="tiny", sparsity="2:4", method="magnitude", head_dim=16, num_layers=0, blocks=[],
                     layers={n: {"density": 0.5} for n in layers})


@pytest.fixture(scope="module")
def pruned():
    """A tiny SD3 transformer (hidden 64, FFN 256) pruned 2:4 by magnitude, and its plan."""
    model = tiny_sd3_transformer(num_layers=2, num_heads=4, head_dim=16)
    layers = magnitude_prune_model(model, parse_sparsity("2:4"))
    return model, _plan(layers)


def test_precisions_parse_once():
    assert tb.parse_precision("FP8").quant == "fp8"
    assert tb.parse_precision("bf16").dtype == torch.bfloat16
    with pytest.raises(UserError, match="use one of: bf16, fp16, int8, fp8"):
        tb.parse_precision("fp4")
    with pytest.raises(UserError, match="unknown sparse backend"):
        tb.TorchSettings(sparse_backend="magic")


@pytest.mark.parametrize("gpu, precision, sparse, kernels, message", [
    (None, "bf16", False, True, "CUDA is not available"),
    (T4, "fp16", True, True, "sparse tensor cores .compute capability 8.0"),
    (A10, "fp8", False, True, "fp8 needs compute capability 8.9"),
    (L4, "fp8", True, True, "FP8 \\+ 2:4 runs on torchao's CUTLASS kernel for compute capability 9.0"),
    (T4, "bf16", False, True, "bf16 needs compute capability 8.0 or newer .* use --precision fp16"),
])
def test_hardware_refusals_are_one_line(gpu, precision, sparse, kernels, message):
    settings = tb.TorchSettings(precision=tb.parse_precision(precision), sparse_kernels=kernels)
    with pytest.raises(UserError, match=message) as e:
        tb.check_hardware(settings, sparse, gpu)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("gpu, precision, sparse, kernels", [
    (T4, "fp16", True, False),  # --no-sparse-kernels: 2:4 weights as dense GEMMs
    (T4, "fp16", False, True),
    (A10, "bf16", True, True),
    (A10, "int8", True, True),
    (L4, "fp8", False, True),
    (L4, "fp8", True, False),
    (H100, "fp8", True, True),
])
def test_hardware_accepts(gpu, precision, sparse, kernels):
    tb.check_hardware(tb.TorchSettings(precision=tb.parse_precision(precision), sparse_kernels=kernels), sparse, gpu)


def test_sparse_backend_resolution():
    assert tb.resolve_sparse_backend("auto", True) == "cusparselt"
    assert tb.resolve_sparse_backend("auto", False) == "cutlass"
    assert tb.resolve_sparse_backend("cutlass", True) == "cutlass"
    with pytest.raises(UserError, match="no cuSPARSELt"):
        tb.resolve_sparse_backend("cusparselt", False)


def test_two_four_check_is_exact():
    w = torch.zeros(8, 16)
    w[:, 0::4] = 1.0
    w[:, 1::4] = -2.0
    assert tb.two_four_violation(w) is None
    w[3, 6] = 0.5  # a third non-zero in one group
    assert "1 of 32 groups of 4 hold more than 2 non-zeros" in tb.two_four_violation(w)
    assert "not a multiple of 4" in tb.two_four_violation(torch.zeros(8, 18))


def test_shape_rules_are_pytorchs_own():
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    r = SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS[torch.bfloat16]
    assert tb.semi_structured_shape_violation((r.sparse_min_rows, r.sparse_min_cols), torch.bfloat16, "cutlass") is None
    why = tb.semi_structured_shape_violation((r.sparse_min_rows, r.sparse_min_cols // 2), torch.bfloat16, "cutlass")
    assert f"CUTLASS bfloat16 needs both at least and multiples of {r.sparse_min_rows}x{r.sparse_min_cols}" in why
    assert "take no float32 weights" in tb.semi_structured_shape_violation((64, 64), torch.float32, "cusparselt")
    c = SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[torch.float16]
    assert tb.semi_structured_shape_violation((c.sparse_min_rows * 3, c.sparse_min_cols * 5), torch.float16, "cusparselt") is None


def test_choose_layers_bf16(pruned):
    model, plan = pruned
    m = copy.deepcopy(model).to(torch.bfloat16)
    choice = tb.choose_layers(m, plan, tb.TorchSettings(), sparse=True, sparse_backend="cusparselt")
    assert sorted(choice.sparse) == sorted(plan.layers) and not choice.refused and not choice.quantized
    assert choice.kernel == "cusparselt"
    # CUTLASS wants in_features >= 64 for bf16: the 64-wide layers pass, and every refusal says why
    cutlass = tb.choose_layers(m, plan, tb.TorchSettings(sparse_backend="cutlass"), sparse=True, sparse_backend="cutlass")
    assert set(cutlass.sparse) | set(cutlass.refused) == set(plan.layers)
    assert all("CUTLASS bfloat16" in why for why in cutlass.refused.values())


def test_choose_layers_refuses_what_is_not_2_4(pruned):
    model, plan = pruned
    m = copy.deepcopy(model).to(torch.bfloat16)
    name = next(iter(plan.layers))
    with torch.no_grad():
        m.get_submodule(name).weight.fill_(1.0)  # a plan layer whose weights are not 2:4 (a stale plan)
    extra = _plan(list(plan.layers) + ["transformer_blocks.0.no_such_layer"])
    choice = tb.choose_layers(m, extra, tb.TorchSettings(), sparse=True)
    assert "not 2:4 along the input dimension" in choice.refused[name]
    assert choice.refused["transformer_blocks.0.no_such_layer"] == "not an nn.Linear of this model"
    assert len(choice.sparse) == len(plan.layers) - 1
    none = tb.choose_layers(m, plan, tb.TorchSettings(sparse_kernels=False), sparse=True)
    assert not none.sparse and any("--no-sparse-kernels" in n for n in none.notes)


def test_choose_layers_fp8_and_int8(pruned):
    pytest.importorskip("torchao", reason=TORCHAO)
    model, plan = pruned
    m = copy.deepcopy(model).to(torch.bfloat16)
    fp8 = tb.choose_layers(m, plan, tb.TorchSettings(precision=tb.PRECISIONS["fp8"]), sparse=True)
    assert fp8.kernel == tb.FP8_SPARSE_KERNEL and sorted(fp8.sparse) == sorted(plan.layers)
    assert not set(fp8.sparse) & set(fp8.quantized)
    # the family adapter's quant_exclude (embedders, AdaLN, proj_out) stays bf16, with the reason
    assert "proj_out" in fp8.high_precision and "quant_exclude" in fp8.high_precision["proj_out"]
    assert not any(n in fp8.quantized for n in fp8.high_precision)
    # context_embedder reads joint_attention_dim=32 -> fine; a 24-wide pooled projection is not a multiple of 16
    int8 = tb.choose_layers(m, plan, tb.TorchSettings(precision=tb.PRECISIONS["int8"]), sparse=True)
    assert not int8.sparse and set(int8.refused) == set(plan.layers) and int8.kernel is None
    assert all("INT8 + 2:4" in why for why in int8.refused.values())
    assert set(plan.layers) <= set(int8.quantized)


def test_int8_conversion_on_cpu_matches_bf16(pruned):
    """torchao's INT8 dynamic quantization runs on CPU too: the converted transformer stays close to bf16."""
    pytest.importorskip("torchao", reason=TORCHAO)
    model, plan = pruned
    ref = copy.deepcopy(model).to(torch.bfloat16)
    m = copy.deepcopy(model).to(torch.bfloat16)
    settings = tb.TorchSettings(precision=tb.PRECISIONS["int8"], compile=False)
    done = tb.convert(m, tb.choose_layers(m, plan, settings, sparse=True), settings)
    assert len(done.quantized) >= len(plan.layers) and not done.sparse
    assert type(m.get_submodule(next(iter(plan.layers))).weight).__name__ == "Int8Tensor"
    assert tb.weight_bytes(m) < tb.weight_bytes(ref)
    inputs = [t.to(torch.bfloat16) for t in tiny_transformer_inputs(m)]
    with torch.no_grad():
        want = ref(*inputs, return_dict=False)[0].float()
        got = m(*inputs, return_dict=False)[0].float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.05, rel  # INT8 per-token x per-channel on a 2-block model: ~1e-2


def test_dry_run_report(pruned):
    model, plan = pruned
    m, report = tb.prepare_transformer(copy.deepcopy(model), plan, tb.TorchSettings(), sparse=True, device="cpu", apply=False)
    assert report["converted"] is False and report["compiled"] is False
    assert report["layers"]["sparse_layers"] == len(plan.layers)
    assert any("dry run" in n for n in report["layers"]["notes"])
    assert next(m.parameters()).dtype == torch.bfloat16
    assert tb.layers_by_kind(plan.layers)["transformer_blocks.attn.to_q"] == 2


# ------------------------------------------------------------------------------------------ package manifest


def _fake_package(tmp_path, gpu=H100):
    """A package file and its manifest (the checks hash the file; they never load it)."""
    from runtime import torch_package as tp

    d = tmp_path / "torch"
    d.mkdir()
    pkg = d / tp.PACKAGE
    pkg.write_bytes(b"aoti package bytes")
    tp.write_manifest(d, package=pkg, gpu=gpu, report={"settings": {"precision": "bf16"}},
                      inputs={"hidden_states": torch.zeros(2, 16, 8, 8, dtype=torch.bfloat16)}, source_sha256="abc",
                      versions={"python": "3.12", "torch": "2.11.0", "torchao": "0.18.0", "diffusers": "0.42.1"})
    return pkg


RUNNING = {"python": "3.12", "torch": "2.11.0", "torchao": "0.18.0", "diffusers": "0.42.1"}


def test_package_manifest_accepts_its_own(tmp_path):
    from runtime import torch_package as tp

    m = tp.check_package(_fake_package(tmp_path), gpu=H100, versions=RUNNING)
    assert m["inputs"]["hidden_states"] == {"shape": [2, 16, 8, 8], "dtype": "bfloat16"}
    assert m["backend"] == "torch" and m["gpu"]["compute_capability"] == "9.0"


@pytest.mark.parametrize("change, message", [
    ("bytes", "does not match the sha256 in its manifest"),
    ("torch", "was compiled with torch 2.11.0 but this is torch 2.12.0"),
    ("torchao", "was compiled with torchao 0.18.0 but this is torchao absent"),
    ("gpu", "was compiled for NVIDIA H100 80GB HBM3 .compute 9.0. but this GPU is NVIDIA L4 .compute 8.9."),
    ("no-gpu", "none is visible"),
    ("no-manifest", "has no manifest"),
    ("missing", "does not exist"),
])
def test_package_mismatch_is_one_line(tmp_path, change, message):
    from runtime import torch_package as tp

    pkg = _fake_package(tmp_path)
    versions, gpu = dict(RUNNING), H100
    if change == "bytes":
        pkg.write_bytes(b"aoti package bytes, truncated")
    elif change in ("torch", "torchao"):
        versions[change] = {"torch": "2.12.0", "torchao": "absent"}[change]
    elif change == "gpu":
        gpu = L4
    elif change == "no-gpu":
        gpu = None
    elif change == "no-manifest":
        (pkg.parent / tp.MANIFEST).unlink()
    elif change == "missing":
        pkg.unlink()
    with pytest.raises(UserError, match=message) as e:
        tp.check_package(pkg, gpu=gpu, versions=versions)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_aoti_package_round_trip_on_cpu(tmp_path):
    """torch.export + AOTInductor package the dense bf16 transformer on CPU (minutes: a C++ build), and the
    loaded package gives the module's output."""
    from runtime import torch_package as tp

    m = tiny_sd3_transformer(num_layers=1).to(torch.bfloat16)
    h, c, p, t = [x.to(torch.bfloat16) if x.is_floating_point() and x.dim() > 1 else x for x in tiny_transformer_inputs(m)]
    inputs = dict(hidden_states=h, encoder_hidden_states=c, pooled_projections=p, timestep=t)
    res = tp.package_transformer(m, inputs, tmp_path / "torch", gpu=H100, report={})
    assert res.reason is None and res.path.is_file()
    manifest = tp.check_package(res.path, gpu=H100)
    assert manifest["versions"]["torch"] == torch.__version__
    loaded = torch._inductor.aoti_load_package(str(res.path))
    with torch.no_grad():
        want = m(**inputs, return_dict=False)[0]
    got = loaded(**inputs, return_dict=False)[0]
    # bf16 (u = 2^-9 = 2e-3): the compiled kernels fuse and reorder the bf16 roundings; 2e-2 is ~10 u
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_compile_scopes(pruned):
    """Regional compilation wraps every block of the family adapter in place (the compile itself happens at the
    first call, timed on the GPU); the whole-model scope wraps the transformer."""
    from families import adapter_for

    model, _ = pruned
    m = tb.compile_transformer(copy.deepcopy(model), tb.TorchSettings())
    blocks = adapter_for(m).blocks(m)
    assert blocks and all(b._compiled_call_impl is not None for _, b in blocks) and m._compiled_call_impl is None
    whole = tb.compile_transformer(copy.deepcopy(model), tb.TorchSettings(compile_scope="model"))
    assert whole._compiled_call_impl is not None and hasattr(whole, "config")
    with pytest.raises(UserError, match="unknown compile scope"):
        tb.TorchSettings(compile_scope="layers")


# ------------------------------------------------------------------------------------------- stage wiring


def test_build_backend_torch_without_a_gpu_is_one_line(tmp_path, capsys):
    from pipeline.__main__ import main

    status = main(["build", "--onnx-dir", str(tmp_path / "export" / "onnx"), "--backend", "torch", "--sparsity", "2:4", "--torch-precision", "fp8"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert status == 2 and len(err) == 1 and "CUDA is not available" in err[0]
    assert not (tmp_path / "export").exists()


def test_build_settings_carry_the_torch_settings(tmp_path):
    import argparse

    from pipeline import cmd_build

    p = argparse.ArgumentParser()
    cmd_build.add_parser(p.add_subparsers())
    args = p.parse_args(["build", "--onnx-dir", str(tmp_path / "onnx"), "--backend", "torch", "--sparsity", "2:4",
                         "--torch-precision", "int8", "--no-compile", "--no-sparse-weights"])
    s = cmd_build.settings_from_args(args)
    assert s.torch_settings == tb.TorchSettings(precision=tb.PRECISIONS["int8"], sparse_kernels=False, compile=False)
    assert s.to_json()["torch"]["precision"] == "int8"


@pytest.mark.parametrize("gpu, message", [(T4, "sparse tensor cores"), (H100, "no compact checkpoint at")])
def test_torch_build_checks_gpu_then_checkpoint(tmp_path, gpu, message):
    from runtime.torch_stage import check_torch_build

    with pytest.raises(UserError, match=message):
        check_torch_build(parse_sparsity("2:4"), tmp_path / "export" / "onnx", tb.TorchSettings(precision=tb.PRECISIONS["fp16"]), gpu=gpu)
    check_torch_build(parse_sparsity("2:4"), tmp_path / "export" / "onnx", tb.TorchSettings(), gpu=H100, check_input=False)


@pytest.mark.parametrize("extra, message", [
    ([], "CUDA is not available"),
    (["--precision", "int8"], "with --backend torch use --torch-precision int8"),
])
def test_make_engine_backend_torch_refuses_before_any_stage(tmp_path, capsys, extra, message):
    from pipeline.__main__ import main

    status = main(["engine", "--backend", "torch", "--artifacts", str(tmp_path / "art"), *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert status == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "art").exists()


def test_make_engine_torch_plans_float_exports_and_no_engines(tmp_path):
    from families.registry import resolve_model
    from pipeline.artifacts import config_dirs
    from pipeline.engine import parse_args, plan_bench, plan_stages

    args = parse_args(["--backend", "torch", "--torch-precision", "fp8", "--artifacts", str(tmp_path)])
    spec, sparsity = resolve_model("tiny-sd3"), parse_sparsity("2:4")
    cfg, dense = config_dirs(spec, "2-4-obs-diff", tmp_path), config_dirs(spec, "dense", tmp_path)
    assert [st.name for st in plan_stages(args, spec, sparsity, cfg, dense, True, "torch")] == ["prune", "export_dense", "export_pruned"]
    bench = plan_bench(args, spec, sparsity, cfg, dense, True, "torch")
    assert bench.engines is None and bench.pruned_export == cfg.export_for("fp32")
    assert bench.torch_settings == tb.TorchSettings(precision=tb.PRECISIONS["fp8"]) and bench.to_json()["torch"]["precision"] == "fp8"


def test_e2e_also_torch_needs_the_engines(capsys):
    from benchmarks.e2e import main

    with pytest.raises(SystemExit) as e:
        main(["--dense", "d", "--pruned", "p", "--out", "o", "--also-torch"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--also-torch puts the torch backend next to TensorRT engines" in err[0]


def test_torch_components_are_one_copy_in_the_precision(tiny_pipe):
    """The torch pipelines share one bf16 copy of the text encoders and VAE; the base pipeline is left as it was."""
    from runtime.torch_stage import torch_components

    comps = torch_components(tiny_pipe, torch.bfloat16, device="cpu")
    assert comps["transformer"] is tiny_pipe.transformer  # replaced per pipeline by the converted one
    assert next(comps["vae"].parameters()).dtype == torch.bfloat16 and comps["vae"] is not tiny_pipe.vae
    assert next(tiny_pipe.vae.parameters()).dtype == torch.float32
    assert comps["tokenizer"] is tiny_pipe.tokenizer and comps["scheduler"] is tiny_pipe.scheduler


def test_torchao_configs_per_precision():
    pytest.importorskip("torchao", reason=TORCHAO)
    names = {p: tuple(type(c).__name__ if c is not None else None for c in tb.torchao_configs(tb.TorchSettings(precision=tb.PRECISIONS[p])))
             for p in tb.PRECISIONS}
    assert names == {"bf16": ("SemiSparseWeightConfig", None), "fp16": ("SemiSparseWeightConfig", None),
                     "int8": (None, "Int8DynamicActivationInt8WeightConfig"),
                     "fp8": ("Float8DynamicActivationFloat8WeightConfig", "Float8DynamicActivationFloat8WeightConfig")}
    sparse, dense = tb.torchao_configs(tb.TorchSettings(precision=tb.PRECISIONS["fp8"]))
    assert sparse.packing_format.name == "SPARSE_2D_DATA_2D_METADATA" and type(sparse.granularity[1]).__name__ == "PerRow"
    assert dense.packing_format.name == "PLAIN" and type(dense.granularity[1]).__name__ == "PerRow"
    assert "INT8 + 2:4" in tb.int8_sparse_unavailable()
