"""INT8/FP8 on top of 2:4 sparsity (ModelOpt fake quantization on CPU: export.quantize, export.qdq_export, export.int8_parity).

Pruned zeros survive quantization into the ONNX initializers, the N:M checker reads the weights behind
DequantizeLinear (and fails on a broken group), the INT8 ONNX matches the fake-quantized model in ONNX Runtime,
the FP8 ONNX carries TensorRT's FP8 Q/DQ and builds with TensorRT-RTX for FP8 GPUs, and the family's excluded
layers keep no quantizer.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from common.errors import UserError
from export.calibration import record_calibration_inputs
from export.int8_parity import INT8_TOLERANCE, int8_parity
from export.parity import ort_session
from export.qdq_export import export_quantized_onnx, quantized_op_counts
from export.quantize import check_quantized_zeros, enabled_quantizers, excluded_modules, parse_precision, quant_config, quantize_transformer
from export.sparsity_check import check_onnx_sparsity
from families import adapter_for
from tests.export_helpers import make_nm_sparse
from tests.factories import tiny_flux_pipeline, tiny_flux_transformer, tiny_sd3_transformer

LATENT = (8, 8)  # VAE latents of the export example
TEXT = 6  # text tokens

_MODELS = {
    "sd3": lambda: tiny_sd3_transformer(num_layers=2, seed=3),
    "flux": lambda: tiny_flux_transformer(seed=1),  # double + single blocks, per-head RMS norms
}


def prune_2_4(model) -> list[str]:
    """2:4 (magnitude, along K) on the layers stage 1 prunes: the adapter's unit layers (AdaLN stays dense)."""
    adapter = adapter_for(model)
    layers = [f"{prefix}.{name}" for prefix, block in adapter.blocks(model) for _, names in adapter.units(block) for name in names]
    for layer in layers:
        make_nm_sparse(model.get_submodule(layer), prefix="")
    return layers


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """``get(family, precision, fold=True) -> (model, pruned layers, onnx path, float model)``, built once.

    2:4 pruned (:func:`prune_2_4`), then quantized with two random calibration batches of 2.
    """
    cache: dict = {}

    def get(family: str, precision: str, fold: bool = True):
        key = (family, precision, fold)
        if key not in cache:
            model = _MODELS[family]()
            layers = prune_2_4(model)
            dense = copy.deepcopy(model)
            adapter = adapter_for(model)
            calib = [adapter.transformer_inputs(model, 2, LATENT, TEXT, seed=s) for s in (11, 12)]
            quantize_transformer(model, precision, calib)
            path = tmp_path_factory.mktemp(f"{family}-{precision}") / "transformer.onnx"
            export_quantized_onnx(model, path, adapter.transformer_inputs(model, 2, LATENT, TEXT, seed=13), fold_weights=fold)
            cache[key] = (model, tuple(layers), path, dense)
        return cache[key]

    return get


def _shapes(model):
    return adapter_for(model).transformer_input_shapes(model, 2, LATENT, TEXT)


def test_config_quantizes_linear_and_conv_only_and_parses_precision():
    cfg = quant_config("int8", ("proj_out", "*norm*"))
    entries = cfg["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False}  # everything off first (attention BMMs, norms)
    enabled = [e for e in entries if "cfg" in e]
    assert {e["parent_class"] for e in enabled} == {"nn.Linear", "nn.Conv2d"}
    w = next(e["cfg"] for e in enabled if e["quantizer_name"] == "*weight_quantizer")
    assert w["num_bits"] == 8 and w["axis"] == 0  # ModelOpt's INT8: per output channel
    assert entries[-2:] == [{"quantizer_name": "proj_out.*", "enable": False}, {"quantizer_name": "*norm*.*", "enable": False}]
    fp8 = next(e["cfg"] for e in quant_config("FP8")["quant_cfg"] if e.get("quantizer_name") == "*input_quantizer")
    assert tuple(fp8["num_bits"]) == (4, 3)  # E4M3
    with pytest.raises(UserError, match="int8, fp8"):
        parse_precision("int4")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_int8_keeps_2_4_into_the_onnx_initializers(quantized, family):
    model, layers, path, _ = quantized(family, "int8")
    assert check_quantized_zeros(model, (2, 4)) == {}  # in torch: every zero is still zero, every group 2:4
    rep = check_onnx_sparsity(path, input_shapes=_shapes(model), expected_layers=layers)
    assert rep.ok, rep.summary()
    inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    by_layer = {g.layer: g for g in rep.gemms}
    for layer in layers:  # each pruned weight reaches its GEMM as DequantizeLinear(int8 [K, N])
        g = by_layer[layer]
        assert g.quant == "DequantizeLinear" and g.k_axis == 0, (layer, g)
        assert inits[g.weight].data_type == onnx.TensorProto.INT8
    if family == "flux":  # the pruned single-block proj_out is quantized (the model's own proj_out is not)
        assert by_layer["single_transformer_blocks.0.proj_out"].quant == "DequantizeLinear"
        assert by_layer["proj_out"].quant is None


def _zero_in_a_two_of_four_group(values: np.ndarray, k_axis: int) -> tuple:
    """Index of a zero in a group of 4 along K that holds exactly 2 non-zeros."""
    wk = np.moveaxis(values, k_axis, -1)  # (N, K)
    groups = (wk.reshape(wk.shape[0], -1, 4) != 0).sum(-1)
    row, grp = np.argwhere(groups == 2)[0]
    col = grp * 4 + int(np.flatnonzero(wk[row, grp * 4 : grp * 4 + 4] == 0)[0])
    return (row, col) if k_axis == 1 else (col, row)


def test_checker_fails_when_a_quantized_group_is_broken(quantized, tmp_path):
    model, layers, path, _ = quantized("sd3", "int8")
    shapes = _shapes(model)
    layer = layers[0]
    m = onnx.load(str(path))
    init = next(t for t in m.graph.initializer if t.name == f"{layer}.weight")
    q = numpy_helper.to_array(init).copy()  # int8 (K, N)
    q[_zero_in_a_two_of_four_group(q, 0)] = 1  # one INT8 step: 3 non-zeros in that group of 4
    init.CopyFrom(numpy_helper.from_array(q, init.name))
    onnx.save(m, str(tmp_path / "broken.onnx"))
    rep = check_onnx_sparsity(tmp_path / "broken.onnx", input_shapes=shapes, expected_layers=layers)
    assert not rep.ok and rep.failed_layers == [layer]
    assert "1 of" in rep.summary()["failed_layers"][layer]

    # ModelOpt's unfolded graph (QuantizeLinear on the float weight): the check runs on the quantized values
    model_u, layers_u, path_u, _ = quantized("sd3", "int8", fold=False)
    assert check_onnx_sparsity(path_u, input_shapes=shapes, expected_layers=layers_u).ok
    m = onnx.load(str(path_u))
    init = next(t for t in m.graph.initializer if t.name == f"{layer}.weight")
    w = numpy_helper.to_array(init).copy()  # float (N, K), torch layout
    idx = _zero_in_a_two_of_four_group(w, 1)
    step = float(model_u.get_submodule(layer).weight_quantizer.amax.flatten()[idx[0]]) / 127
    for value, ok in ((0.4 * step, True), (0.6 * step, False)):  # rounds to 0 / to one INT8 step
        w2 = w.copy()
        w2[idx] = value
        init.CopyFrom(numpy_helper.from_array(w2, init.name))
        onnx.save(m, str(tmp_path / "edited.onnx"))
        rep = check_onnx_sparsity(tmp_path / "edited.onnx", input_shapes=shapes, expected_layers=layers_u)
        assert rep.ok is ok and rep.failed_layers == ([] if ok else [layer])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_int8_onnx_runtime_matches_the_fake_quantized_model(quantized, family):
    model, _, path, dense = quantized(family, "int8")
    # batches 1 and 3 against a batch-2 export: the batch is dynamic (Flux's ids included)
    parity = int8_parity(path, model, latent_hw=LATENT, text_seq_len=TEXT, batches=(1, 3))
    assert parity.ok, parity.to_dict()
    assert parity.tolerance == INT8_TOLERANCE
    # and it runs the quantized model, not the float one: its RMS distance to the fake-quantized output is a
    # fraction of its distance to the float output (measured: 4e-4 SD3, 3e-3 Flux here; <= 0.04 over 11 inputs)
    adapter = adapter_for(model)
    inputs = adapter.transformer_inputs(model, 3, LATENT, TEXT, seed=21)
    got = ort_session(path).run(None, {k: v.numpy() for k, v in inputs.items()})[0].astype(np.float64)
    with torch.no_grad():
        fake = adapter.transformer_for_onnx(model)(*inputs.values()).double().numpy()
        flt = adapter.transformer_for_onnx(dense)(*inputs.values()).double().numpy()
    rms = lambda a, ref: float(np.sqrt(((a - ref) ** 2).mean() / (ref**2).mean()))  # noqa: E731
    assert rms(got, fake) < rms(got, flt) / 3, (rms(got, fake), rms(got, flt))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_excluded_layers_keep_no_quantizer(quantized, family):
    model, layers, path, _ = quantized(family, "int8")
    adapter = adapter_for(model)
    excluded = set(excluded_modules(model, adapter.quant_exclude))
    assert {"proj_out", "context_embedder", "time_text_embed.timestep_embedder.linear_1", "norm_out.linear"} <= excluded
    enabled = enabled_quantizers(model)
    assert not [q for q in enabled if q.rsplit(".", 1)[0] in excluded]
    # quantizers sit on Linear/Conv inputs and weights only: no LayerNorm input, no attention BMM or softmax
    for q in enabled:
        parent = model.get_submodule(q.rsplit(".", 1)[0])
        assert isinstance(parent, (torch.nn.Linear, torch.nn.Conv2d)) and q.endswith(("weight_quantizer", "input_quantizer")), q
    assert {f"{layer}.{k}_quantizer" for layer in layers for k in ("weight", "input")} <= set(enabled)
    # no prunable layer of the adapter is excluded
    units = {f"{prefix}.{name}" for prefix, block in adapter.blocks(model) for _, names in adapter.units(block) for name in names}
    assert not units & excluded
    # in the ONNX the excluded GEMMs keep float weights
    rep = check_onnx_sparsity(path, input_shapes=_shapes(model))
    quant = {g.layer: g.quant for g in rep.gemms if g.layer}
    assert quant["proj_out"] is None and quant["context_embedder"] is None and quant["norm_out.linear"] is None


def test_fp8_export_has_trt_fp8_qdq_and_keeps_2_4(quantized):
    model, layers, path, _ = quantized("sd3", "fp8")
    counts = quantized_op_counts(path)
    assert counts.get("TRT_FP8QuantizeLinear", 0) > 0 and counts.get("TRT_FP8DequantizeLinear", 0) > counts["TRT_FP8QuantizeLinear"]
    assert "QuantizeLinear" not in counts and "DequantizeLinear" not in counts
    m = onnx.load(str(path))
    assert {n.domain for n in m.graph.node if n.op_type.startswith("TRT_FP8")} == {"trt"}
    assert m.ir_version <= 10
    rep = check_onnx_sparsity(path, input_shapes=_shapes(model), expected_layers=layers)
    assert rep.ok, rep.summary()
    inits = {t.name: t for t in m.graph.initializer}
    assert all(inits[f"{layer}.weight"].data_type == onnx.TensorProto.FLOAT8E4M3FN for layer in layers)


def test_tensorrt_rtx_builds_fp8_for_ada_and_later_and_refuses_ampere(quantized, tmp_path):
    """TensorRT-RTX 1.7 builds without a GPU: FP8 for SM89/SM120; for SM86 Myelin refuses (no FP8 there)."""
    pytest.importorskip("tensorrt_rtx")
    from runtime.trt.build import build_engine
    from runtime.trt.options import BuildOptions

    _, _, fp8, _ = quantized("sd3", "fp8")
    plan = build_engine(fp8, tmp_path / "fp8", BuildOptions(batch=(1, 2, 4), sparsity="2:4", target_cc=("8.9", "12.0")), backend="trtrtx")
    assert plan.stat().st_size > 0
    with pytest.raises(UserError, match="fp8_e4m3"):
        build_engine(fp8, tmp_path / "fp8-sm86", BuildOptions(batch=(1, 2, 4), target_cc=("8.6",)), backend="trtrtx")
    _, _, int8, _ = quantized("sd3", "int8")  # INT8 Q/DQ: every default target
    assert build_engine(int8, tmp_path / "int8", BuildOptions(batch=(1, 2, 4), sparsity="2:4"), backend="trtrtx").stat().st_size > 0


def test_calibration_inputs_from_real_flux_sampling():
    """Inputs recorded on a real FluxPipeline (true CFG: two calls per step) feed the ONNX wrapper and calibrate."""
    from families.registry import resolve_model

    pipe = tiny_flux_pipeline()
    spec = dataclasses.replace(resolve_model("tiny-sd3"), id="tiny-flux-test", family="flux", pipeline_class="FluxPipeline")
    calib = record_calibration_inputs(pipe, spec, ["a handwritten digit 3", "a handwritten digit 7"], [0, 1], steps=2, guidance=3.0, max_calls=3)
    adapter = adapter_for(pipe.transformer)
    wrapper = adapter.transformer_for_onnx(pipe.transformer)
    assert len(calib) == 3 and all(list(c) == list(wrapper.input_names) for c in calib)
    ref = adapter.transformer_inputs(pipe.transformer, 1, LATENT, 10)
    for c in calib:
        assert c["img_ids"].shape[:2] == c["hidden_states"].shape[:2]  # ids got the batch dim
        assert all(c[k].dtype == ref[k].dtype and c[k].dim() == ref[k].dim() for k in ref)
    assert len({float(c["timestep"][0]) for c in calib}) > 1  # spread over the trajectory
    quantize_transformer(pipe.transformer, "int8", calib)
    assert enabled_quantizers(pipe.transformer)


def test_calibration_inputs_from_real_sd3_sampling():
    """SD3's classifier-free guidance doubles the batch of each call; the recorded calls calibrate the model."""
    from families.registry import resolve_model
    from tests.prune_helpers import load_tiny_pipeline

    pipe = load_tiny_pipeline()
    spec = resolve_model("tiny-sd3")
    calib = record_calibration_inputs(pipe, spec, ["a handwritten digit 5"], [3], steps=3, max_calls=2)
    assert len(calib) == 2 and [c["hidden_states"].shape[0] for c in calib] == [2, 2]  # cond + uncond
    assert calib[0]["timestep"].dtype == torch.float32 and float(calib[0]["timestep"][0]) > float(calib[1]["timestep"][0])
    model = quantize_transformer(pipe.transformer, "fp8", calib)
    assert check_quantized_zeros(model) == {} and enabled_quantizers(model)
