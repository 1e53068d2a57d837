"""INT8/FP8 through the stages: the export stage quantizes the pruned tiny-sd3 transformer on stage 1's real-sampler
trajectories (report fields, N:M through the DequantizeLinear, ONNX Runtime parity, reuse), engines and their
manifests carry the precision (TensorRT-RTX: INT8 on CPU, FP8 for SM89/SM120 with the SM80/SM86 refusal
recorded), and ``make engine --precision`` plans the right stages."""

from __future__ import annotations

import json
import logging

import onnx
import pytest

from common.errors import UserError


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A real stage-1 directory of tiny-sd3 at 2:4 (magnitude: no Hessians, seconds), calibrated on 3 prompts x 3 steps."""
    from obsdiff.patterns import parse_sparsity
    from obsdiff.stage import prune_settings, run_prune
    from tests.runtime_fixtures import tiny_sd3

    spec, _ = tiny_sd3()
    out = tmp_path_factory.mktemp("stage1") / "prune"
    settings = prune_settings(spec, parse_sparsity("2:4"), out, method="magnitude", samples=3, steps=3, progress=False)
    plan = run_prune(settings)
    return spec, out, plan, settings


@pytest.fixture(scope="module")
def int8_export(stage1, tmp_path_factory):
    from export.stage import ExportSettings, QuantCalibration, run_export

    spec, pruned, plan, _ = stage1
    out = tmp_path_factory.mktemp("export") / "export-int8"
    settings = ExportSettings(spec=spec, out=out, pruned=pruned, precision="int8", components=("transformer",), parity_batches=(1, 3),
                              calibration=QuantCalibration(samples=2, max_calls=6))
    return settings, run_export(settings)


@pytest.mark.parametrize("precision", ["int8"])  # the float path takes the same branch in export.float_export._check_parity
def test_an_export_without_parity_batches_completes_and_says_it_skipped_the_check(stage1, precision, tmp_path):
    """``--parity-batches ''`` for every precision (an INT8 export used to end in KeyError: 'parity' after its work)."""
    from export.stage import ExportSettings, QuantCalibration, run_export

    spec, pruned, _, _ = stage1
    settings = ExportSettings(spec=spec, out=tmp_path / "e", pruned=pruned, precision=precision, components=("transformer",), parity_batches=(),
                              calibration=QuantCalibration(samples=1, max_calls=2))
    report = run_export(settings)
    assert "no parity check" in report["components"]["transformer"]["parity"]["skipped"]
    assert (tmp_path / "e" / "onnx" / "transformer.onnx").is_file()
    if precision == "int8":
        assert report["quantization"]["parity"] == report["components"]["transformer"]["parity"]


def test_int8_export_report_onnx_and_reuse(stage1, int8_export, caplog):
    from export.sparsity_check import check_onnx_sparsity
    from export.stage import run_export

    spec, pruned, plan, _ = stage1
    settings, report = int8_export
    assert report["precision"] == "int8" and report["others_precision"] == "int8"  # weight-only INT8 encoders by default (none exported here)
    q = report["quantization"]
    layers = sorted(plan.layers)
    # every pruned layer is quantized and still 2:4 in the INT8 initializers
    assert set(layers) <= set(q["quantized_layers"]) and q["quantized_nm_layers"] == layers and q["nm_pattern"] == "2:4"
    assert q["nm_check"]["ok"] and q["nm_check"]["through"] == "DequantizeLinear"
    assert "proj_out" in q["excluded_modules"] and "proj_out" not in q["quantized_layers"]
    # calibrated on stage 1's first trajectories: its prompts and seeds, its steps, the model's guidance
    c = q["calibration"]
    assert c["prompts"] == ["a handwritten digit 0", "a handwritten digit 1"] and c["seeds"] == [0, 1]
    assert (c["steps"], c["guidance"], c["max_calls"]) == (3, spec.guidance, 6) and c["prompts_source"] == "stage 1 (plan.json)"
    assert c["parity_seeds"] == [2, 3]  # parity on trajectories held out from calibration
    p = q["parity"]
    assert p["ok"] and p["median_rms_ratio"] <= p["rms_ratio_tolerance"] and len(p["per_case"]) == 2 * 2 * 3  # 2 trajectories x 3 calls x batches
    assert len(p["cases_closer_to_float"]) < len(p["per_case"]) / 2
    assert p["weights"]["layers"] == len(q["quantized_layers"]) and p["weights"]["share_one_step_apart"] < 0.05
    assert report["components"]["transformer"]["parity"] == p
    # the ONNX: Q/DQ, each pruned weight an INT8 constant read by a DequantizeLinear, still 2:4
    path = settings.out / "onnx" / "transformer.onnx"
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    assert all(inits[f"{layer}.weight"].data_type == onnx.TensorProto.INT8 for layer in layers)
    shapes = spec.adapter.transformer_input_shapes
    sh = spec.shapes
    from families.registry import load_component

    rep = check_onnx_sparsity(path, input_shapes=shapes(load_component(spec, "transformer"), 2, (sh.latent_height, sh.latent_width), sh.text_seq_len),
                              expected_layers=layers)
    assert rep.ok
    # the fingerprint has the precision and the calibration; a rerun reuses the export
    inputs = report["inputs"]
    assert inputs["precision"] == "int8" and inputs["calibration"]["samples"] == 2 and "prompts" not in inputs["calibration"]
    stamp = (settings.out / "export_report.json").stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="export.stage")
    again = run_export(settings)
    assert "reusing the existing export" in caplog.text and again["inputs"] == inputs
    assert (settings.out / "export_report.json").stat().st_mtime_ns == stamp


def test_fingerprint_follows_precision_and_calibration(stage1):
    from export.calibration import resolve_calibration
    from export.fingerprint import covers, fingerprint
    from export.stage import QuantCalibration

    spec, pruned, _, prune = stage1
    calib = resolve_calibration(spec, pruned, QuantCalibration(samples=2, max_calls=6))
    # make engine passes stage 1's prompt list itself: the same calibration as the one read back from the plan
    given = resolve_calibration(spec, pruned, QuantCalibration(samples=2, max_calls=6, prompts=prune.prompts))
    assert {k: v for k, v in given.items() if k != "prompts_source"} == {k: v for k, v in calib.items() if k != "prompts_source"}
    base = fingerprint(spec, pruned, "int8", ["transformer"], calibration=calib)
    assert base == fingerprint(spec, pruned, "int8", ["transformer"], calibration=given)  # so either command reuses the other's export
    assert base != fingerprint(spec, pruned, "fp32", ["transformer"])
    assert base != fingerprint(spec, pruned, "int8", ["transformer"], calibration=resolve_calibration(spec, pruned, QuantCalibration(samples=3)))
    assert base != fingerprint(spec, pruned, "int8", ["transformer"], calibration=resolve_calibration(spec, pruned, QuantCalibration(samples=2, max_calls=7)))
    # a full export serves a transformer-only request with the same inputs, not the other way round
    full = fingerprint(spec, pruned, "int8", ["transformer", "vae_decoder"], calibration=calib)
    assert covers(full, base) and not covers(base, full) and not covers(fingerprint(spec, pruned, "fp32", ["transformer", "vae_decoder"]), base)


def test_quantized_export_settings_are_checked(stage1, tmp_path):
    from export.stage import ExportSettings, QuantCalibration, check_export
    from families.shapes import served_shapes

    spec = stage1[0]

    def fails(match, **kw):
        with pytest.raises(UserError, match=match):
            check_export(ExportSettings(spec=spec, out=tmp_path / "o", **kw))

    fails("unknown export precision", precision="int3")
    fails("one resolution", precision="int8", shapes=served_shapes(spec, [(32, 32), (64, 64)]))
    fails("include it in --components", precision="int8", components=("vae_decoder",))
    fails("at least 1", precision="fp8", calibration=QuantCalibration(samples=0))
    fails("unknown precision 'int2' for the other components", precision="int8", others_precision="int2")
    ok = ExportSettings(spec=spec, out=tmp_path / "o", precision="fp8")
    assert ok.other_precision == "fp16" and ok.quant_calibration == QuantCalibration() and ok.to_json()["calibration"]["samples"] == 8
    assert ExportSettings(spec=spec, out=tmp_path / "o").quant_calibration is None


def test_int8_engine_name_and_manifest_carry_the_precision(stage1, int8_export, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from runtime.manifest import manifest_path_for
    from runtime.manifest import manifest_summary
    from runtime.trt.backend import get_backend
    from runtime.trt.build import build_engines
    from runtime.trt.options import BuildOptions
    from runtime.trt.plans import find_plan

    _, _, plan, _ = stage1
    settings, _ = int8_export
    be = get_backend("trtrtx")
    plans = build_engines(settings.out / "onnx", tmp_path / "engines", BuildOptions(batch=(1, 2, 4), sparsity="2:4"), backend=be)
    path = plans["transformer"]
    assert path.name == f"engine_trtrtx{be.version}_int8.plan"
    m = json.loads(manifest_path_for(path).read_text())
    assert m["precision"] == "int8" and m["builder"]["sparse_weights"] and m["refused_targets"] is None
    weights = sorted(f"{layer}.weight" for layer in plan.layers)
    assert sorted(m["quantization"]["quantized_nm_layers"]) == weights
    assert sorted(m["onnx_nm_weights"]["eligible"]) == weights  # read through the DequantizeLinear
    assert find_plan(path.parent, be) == path and manifest_summary(path)["quantized_nm_layers"] == len(weights)


@pytest.fixture(scope="module")
def fp8_onnx(tmp_path_factory):
    from export.qdq_export import export_quantized_onnx
    from export.quantize import quantize_transformer
    from families import adapter_for
    from tests.export_helpers import make_nm_sparse
    from tests.factories import tiny_sd3_transformer

    model = tiny_sd3_transformer(num_layers=2, seed=3)
    layers = make_nm_sparse(model)
    adapter = adapter_for(model)
    quantize_transformer(model, "fp8", [adapter.transformer_inputs(model, 2, (8, 8), 6, seed=s) for s in (11, 12)])
    path = tmp_path_factory.mktemp("fp8") / "transformer.onnx"
    export_quantized_onnx(model, path, adapter.transformer_inputs(model, 2, (8, 8), 6, seed=13))
    return path, layers


def test_fp8_engine_drops_and_records_the_targets_the_builder_refuses(fp8_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from runtime.manifest import current_gpu, manifest_path_for
    from runtime.trt.backend import get_backend
    from runtime.trt.build import build_engine
    from runtime.trt.onnx_inspect import onnx_precision
    from runtime.trt.options import BuildOptions

    if current_gpu() is not None:
        pytest.skip("the default targets are this GPU's on a GPU host")
    path, layers = fp8_onnx
    assert onnx_precision(path) == "fp8"
    be = get_backend("trtrtx")
    plan = build_engine(path, tmp_path / "default", BuildOptions(batch=(1, 2, 4), sparsity="2:4"), backend=be)
    assert plan.name == f"engine_trtrtx{be.version}_fp8.plan"
    m = json.loads(manifest_path_for(plan).read_text())
    assert m["precision"] == "fp8" and m["target_compute_capabilities"] == ["SM89", "SM120"]
    refused = m["refused_targets"]
    assert refused["targets"] == ["SM80", "SM86"] and "fp8_e4m3" in refused["builder"] and refused["requested"] == ["SM80", "SM86", "SM89", "SM120"]
    q = m["quantization"]  # the AdaLN linears are 2:4 here but stay float (the adapter's quant_exclude)
    assert q["quantized_nm_layers"] and sorted(q["quantized_nm_layers"]) == sorted(w for w in q["quantized_layers"] if w[: -len(".weight")] in layers)
    assert not [w for w in q["quantized_layers"] if ".norm" in w]
    explicit = build_engine(path, tmp_path / "ada", BuildOptions(batch=(1, 2, 4), target_cc=("8.9", "12.0")), backend=be)
    assert json.loads(manifest_path_for(explicit).read_text())["refused_targets"] is None
    with pytest.raises(UserError, match="fp8_e4m3.*8.9 or later"):  # asked for explicitly: build it or fail
        build_engine(path, tmp_path / "ampere", BuildOptions(batch=(1, 2, 4), target_cc=("8.6",)), backend=be)


def _plan(tmp_path, *argv, cuda=False, backend="ort"):
    from tests.unit.test_engine_cli import _plan as plan

    return plan(tmp_path, *argv, cuda=cuda, backend=backend)


def test_make_engine_int8_plans_quantized_exports_and_engines(tmp_path):
    from export.stage import QuantCalibration

    _, cfg, _, stages = _plan(tmp_path, "--samples", "2", "--calib-steps", "4", "--precision", "int8", "--quant-samples", "2")
    assert [s.name for s in stages] == ["prune", "export_dense_int8", "engines_dense_int8", "export_pruned_int8", "engines_pruned_int8"]
    by = {s.name: s.settings for s in stages}
    prune = by["prune"]
    ex = by["export_pruned_int8"]
    assert ex.out == cfg.root / "export-int8" and ex.precision == "int8" and ex.other_precision == "int8" and ex.components is None
    assert ex.calibration == QuantCalibration(samples=2, max_calls=64, prompts=prune.prompts, steps=4, guidance=prune.config.calibration.guidance,
                                              seed=0)
    assert by["export_dense_int8"].calibration == ex.calibration and by["export_dense_int8"].pruned is None
    eng = by["engines_pruned_int8"]
    assert eng.onnx_dir == cfg.root / "export-int8" / "onnx" and eng.out == cfg.root / "engines-int8" and eng.components == ("transformer",)
    # the same export through `python -m pipeline export`
    from tests.unit.test_engine_cli import _command_settings

    cmd = _command_settings("export", ["--model", "tiny-sd3", "--out", str(ex.out), "--pruned", str(cfg.prune), "--precision", "int8",
                                       "--calib-samples", "2"])
    assert (cmd.precision, cmd.other_precision, cmd.out, cmd.calibration.samples) == ("int8", "int8", ex.out, 2)


def test_make_engine_fp8_needs_a_gpu_bench_or_no_bench(tmp_path):
    from pipeline import engine

    args = engine.parse_args(["--artifacts", str(tmp_path / "art"), "--precision", "fp8"])
    with pytest.raises(UserError, match="--no-bench"):
        engine.check_precision(args, cuda=False, bench_backend="ort")
    with pytest.raises(UserError, match="--precision int8 or fp8"):
        engine.check_precision(engine.parse_args(["--quant-samples", "2"]), cuda=False, bench_backend="ort")
    _, cfg, _, stages = _plan(tmp_path, "--precision", "fp8", "--no-bench")
    assert [s.name for s in stages] == ["prune", "export_dense_fp8", "engines_dense_fp8", "export_pruned_fp8", "engines_pruned_fp8"]
    ex = stages[3].settings
    assert ex.out == cfg.root / "export-fp8" and ex.components == ("transformer",) and ex.other_precision == "fp16"
    assert stages[4].settings.out == cfg.root / "engines-fp8"
    assert not (tmp_path / "art").exists()


def test_int8_parity_passes_the_int8_graph_and_fails_a_float_one(tmp_path):
    """The stage's parity criterion (median RMS distance relative to the quantization's own) on a 2:4 factory model:
    the INT8 ONNX passes, the float ONNX of the same model (what a graph that lost its Q/DQ would compute) fails."""
    import copy

    import torch

    from export.int8_parity import INT8_RMS_RATIO, onnx_weights, parity_cases, rms_parity
    from export.qdq_export import export_quantized_onnx
    from export.quantize import quantize_transformer
    from families import adapter_for
    from tests.export_helpers import exported_sparse_dense

    model, _, float_onnx, _ = exported_sparse_dense()  # float32 ONNX of a 2:4 tiny SD3 transformer
    adapter = adapter_for(model)
    calls = [adapter.transformer_inputs(model, 2, (8, 8), 6, seed=s) for s in (21, 22, 23)]
    cases = parity_cases(calls, (1, 3))
    wrapper_f = adapter.transformer_for_onnx(model)
    with torch.no_grad():
        float_out = {k: wrapper_f(*inp.values()).float().numpy() for k, inp in cases.items()}
    quantized = copy.deepcopy(model)
    quantize_transformer(quantized, "int8", [adapter.transformer_inputs(model, 2, (8, 8), 6, seed=s) for s in (11, 12)])
    int8_onnx = export_quantized_onnx(quantized, tmp_path / "transformer.onnx", adapter.transformer_inputs(model, 2, (8, 8), 6, seed=13))
    wrapper_q = adapter.transformer_for_onnx(quantized)
    with onnx_weights(quantized, int8_onnx) as weights:
        good = rms_parity(int8_onnx, wrapper_q, cases, float_out)
        bad = rms_parity(float_onnx, wrapper_q, cases, float_out)
    assert weights["layers"] > 0 and quantized.transformer_blocks[0].attn.to_q.weight_quantizer.is_enabled  # restored
    assert good["ok"] and good["median_rms_ratio"] < INT8_RMS_RATIO / 2, good["median_rms_ratio"]
    assert not bad["ok"] and bad["median_rms_ratio"] > 0.9 and "closer to the float model" in bad["why"]
