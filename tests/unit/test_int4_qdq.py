"""export.int4_qdq: the W4A16 graph for TensorRT (blocked INT4 ``DequantizeLinear`` of stage 1's codes in a float16
graph) on a small module exported by stage 2's exporter: valid ONNX holding exactly the stored codes, run by ONNX
Runtime like the float16 model, refused when the ONNX is not the codes' model, written with external data, and
built by TensorRT-RTX with its weights as INT4 constants."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from common.errors import CheckFailed

GROUP = 64  # K = 256, 128: INT4 in blocks of 64; K = 96: blocks of gcd(96, 64) = 32; K = 99: gcd 1, stays float16


class _Mlp(nn.Module):
    input_names = ["x"]
    output_names = ["y"]

    def __init__(self):
        super().__init__()
        self.proj_in, self.mid, self.cut, self.proj_out = nn.Linear(256, 128), nn.Linear(128, 96), nn.Linear(96, 99), nn.Linear(99, 64)

    def forward(self, x):
        gelu = nn.functional.gelu
        return self.proj_out(gelu(self.cut(gelu(self.mid(gelu(self.proj_in(x)))))))


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory):
    """``(dir, codes by layer, report, feeds, torch reference)``: every linear on the 4-bit grid with its integer weights
    attached and saved as a compact checkpoint saves them, the float16 export, then the W4A16 pass; a copy of the
    float16 ONNX stays in ``dir/fp16``."""
    from export.dynamo_export import export_module
    from export.int4_qdq import int4_dq_onnx
    from export.int_weights import int_state, save_int
    from export.parity import fp32_compute
    from obsdiff.weight_quant import WeightQuant, codes_of, rtn_quantize

    d = tmp_path_factory.mktemp("w4a16")
    torch.manual_seed(0)
    model = _Mlp()
    wq = WeightQuant(4, GROUP, "rtn")
    with torch.no_grad():
        for layer in (model.proj_in, model.mid, model.cut, model.proj_out):
            w, scales = rtn_quantize(layer.weight, wq)
            layer.weight.copy_(w)
            layer.weight_quant, layer.weight_scales, layer.weight_columns = wq, scales, None
    (d / "compact").mkdir()
    assert save_int(model, d / "compact")
    codes = {k.removesuffix(".codes"): v for k, v in int_state(model)[0].items() if k.endswith(".codes")}
    np.save(d / "scales_cut.npy", model.cut.weight_scales.numpy().astype(np.float16))  # (99, 2): groups [0, 64) and [64, 96)
    model.half()
    x = torch.randn(3, 5, 256).half()
    with torch.no_grad(), fp32_compute(model) as m:  # the export's float16 reference: its weights, float32 arithmetic
        ref = m(x.float()).numpy()
    export_module(model, {"x": torch.randn(2, 5, 256).half()}, d / "onnx" / "mlp.onnx", fp32_layernorm=True)
    shutil.copytree(d / "onnx", d / "fp16")
    report = int4_dq_onnx(d / "onnx" / "mlp.onnx", d / "compact")
    return d, codes, report, {"x": x.numpy()}, ref


def test_the_graph_is_valid_onnx_holding_the_stored_codes(w4a16):
    from export.int4_qdq import W4A16_OPSET, int4_codes
    from runtime.trt.onnx_inspect import onnx_precision

    d, codes, report, _, _ = w4a16
    path = d / "onnx" / "mlp.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == W4A16_OPSET and model.ir_version == 10
    dq = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert sorted(dq) == ["cut.weight", "mid.weight", "proj_in.weight"]
    for name, n in dq.items():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"axis": 0, "block_size": 32 if name == "cut.weight" else GROUP} and len(n.input) == 2  # no zero point
    for layer in ("proj_in", "mid", "cut"):
        got, scales = int4_codes(model, layer)
        assert got.dtype == np.int8 and np.array_equal(got, codes[layer].numpy())  # copied, not computed: exact
        assert scales.dtype == np.float16 and scales.shape == (codes[layer].shape[0], codes[layer].shape[1] // (32 if layer == "cut" else GROUP))
    # K=96 in groups of 64: blocks of 32, the first group's scale twice and the short last group's once
    stored = np.load(d / "scales_cut.npy")
    assert np.array_equal(int4_codes(model, "cut")[1], np.repeat(stored, 2, axis=1)[:, :3])
    weights = {t.name: t for t in model.graph.initializer}
    assert weights["proj_in.weight"].data_type == onnx.TensorProto.INT4 and list(weights["proj_in.weight"].dims) == [256, 128]
    assert weights["proj_out.weight"].data_type == onnx.TensorProto.FLOAT16  # K=99: kept, and said why
    assert report["int4_layers"] == 3 and report["smaller_blocks"] == {"cut": 32}
    assert "K=99 is not a multiple of the group size 64 and gcd 1 < 32" in report["fp16_quantized_layers"]["proj_out"]
    assert report["int4_weight_bytes"] == (256 * 128 + 128 * 96 + 96 * 99) // 2 + 2 * (256 * 128 + 128 * 96) // GROUP + 2 * 96 * 99 // 32
    assert onnx_precision(path) == "w4a16" and onnx_precision(d / "fp16" / "mlp.onnx") == "fp16"


def test_onnx_runtime_runs_it_as_the_float16_model(w4a16):
    from export.parity import FP16_TOLERANCE, ort_session, rel_error

    d, _, _, feeds, ref = w4a16
    # as the export's parity check runs a float16 graph: unoptimised, DequantizeLinear then MatMul in float16
    got = ort_session(d / "onnx" / "mlp.onnx", optimize=False).run(None, feeds)[0]
    # each DequantizeLinear returns float16(code x scale), the very weights of the float16 model; what differs is
    # float16 rounding of the activations, as for any float16 export (measured 2.5e-4)
    assert rel_error(got, ref) <= FP16_TOLERANCE
    fp16 = ort_session(d / "fp16" / "mlp.onnx", optimize=False).run(None, feeds)[0]
    assert rel_error(got, fp16) <= FP16_TOLERANCE  # measured 0: the same weights through the same kernels


def test_an_onnx_that_is_not_the_codes_model_is_refused(w4a16, tmp_path):
    from safetensors.torch import load_file, save_file

    from export.int4_qdq import int4_dq_onnx
    from export.int_weights import INT_FILE

    d, _, _, _, _ = w4a16
    shutil.copytree(d / "fp16", tmp_path / "onnx")
    (tmp_path / "compact").mkdir()
    tensors = load_file(str(d / "compact" / INT_FILE))
    tensors["mid.codes"][0, 0] = -tensors["mid.codes"][0, 0] - 1  # another code: another weight
    from safetensors import safe_open

    with safe_open(str(d / "compact" / INT_FILE), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "compact" / INT_FILE), metadata=meta)
    before = (tmp_path / "onnx" / "mlp.onnx").read_bytes()
    with pytest.raises(CheckFailed, match=r"mid\.weight: 1 of 12288 float16 weights in the ONNX are not float16\(codes x scales\)"):
        int4_dq_onnx(tmp_path / "onnx" / "mlp.onnx", tmp_path / "compact")
    assert (tmp_path / "onnx" / "mlp.onnx").read_bytes() == before  # nothing half-written


def test_big_models_write_the_int4_weights_as_external_data(w4a16, tmp_path, monkeypatch):
    import export.onnx_files as onnx_files
    from export.int4_qdq import int4_codes, int4_dq_onnx

    d, codes, _, _, _ = w4a16
    shutil.copytree(d / "fp16", tmp_path / "onnx")
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 1024)  # every weight past 1 KiB is "big"
    path = tmp_path / "onnx" / "mlp.onnx"
    int4_dq_onnx(path, d / "compact")
    assert (tmp_path / "onnx" / "mlp.onnx.data").is_file() and sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    assert np.array_equal(int4_codes(model, "proj_in", base_dir=tmp_path / "onnx")[0], codes["proj_in"].numpy())


def test_tensorrt_rtx_builds_it_with_int4_constants(w4a16, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx)")
    import json

    from runtime.trt.build import build_engine
    from runtime.trt.options import BuildOptions

    d, _, _, _, _ = w4a16
    plan = build_engine(d / "onnx" / "mlp.onnx", tmp_path, BuildOptions(sparsity="dense", opt_level=0, target_cc=("8.6",), batch=(1, 2, 4)),
                        backend="trtrtx", component="transformer")
    assert plan.name.endswith("_w4a16.plan")
    m = json.loads(plan.with_suffix(".json").read_text())
    q = m["precision"], m["quantization"]
    assert q[0] == "w4a16" and q[1]["int4_weights"] == 3
    # the builder's DETAILED layer table: every INT4 weight stays an INT4 constant of the engine, dequantized inside its
    # GEMM or (TensorRT-RTX 1.7, for cut's odd N = 99) by a kernel of its own into a float16 copy
    assert sorted(q[1]["int4_weights_in_engine"] + q[1]["int4_weights_dequantized_apart"]) == ["cut.weight", "mid.weight", "proj_in.weight"]
    assert "mid.weight" in q[1]["int4_weights_in_engine"] and q[1]["int4_weights_not_int4_in_engine"] == []
    assert q[1]["engine_constant_dtypes"]["Int4"] >= 3 and q[1]["engine_weights_bytes"] > 0


@pytest.mark.slow
def test_prune_w4_export_w4a16_and_build_end_to_end(tmp_path):
    """tiny-sd3 through the commands (opt-in, RUN_SLOW=1; ~2 minutes on 2 cores): `prune --sparsity structured:0.3
    --weight-bits 4`, `export --precision w4a16`, `build` with TensorRT-RTX. The structured cut leaves K that are not
    whole groups: some layers in smaller blocks, some float16, every other quantized layer INT4 in the engine."""
    import json

    from export.int4_qdq import int4_codes
    from pipeline.__main__ import main
    from tests.runtime_fixtures import tiny_sd3

    tiny_sd3()  # skips without models/tiny-sd3
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx)")
    pruned, out = tmp_path / "p", tmp_path / "e"
    assert main(["prune", "--model", "tiny-sd3", "--sparsity", "structured:0.3", "--weight-bits", "4", "--samples", "2", "--out", str(pruned)]) == 0
    assert main(["export", "--pruned", str(pruned), "--precision", "w4a16", "--components", "transformer", "--out", str(out)]) == 0
    report = json.loads((out / "export_report.json").read_text())
    q, t = report["quantization"], report["components"]["transformer"]
    assert report["precision"] == "w4a16" and t["precision"] == "w4a16" and t["parity"]["ok"]
    plan = json.loads((pruned / "plan.json").read_text())
    quantized = sorted(n for n, e in plan["layers"].items() if e.get("weight_bits"))
    assert q["int4_layers"] + len(q["fp16_quantized_layers"]) == len(quantized)
    from safetensors.torch import load_file

    stored = load_file(str(out / "compact" / "weights_int.safetensors"))
    model = onnx.load(str(out / "onnx" / "transformer.onnx"))
    for layer in sorted(set(quantized) - set(q["fp16_quantized_layers"])):
        assert np.array_equal(int4_codes(model, layer)[0], stored[f"{layer}.codes"].numpy()), layer
    assert main(["build", "--onnx-dir", str(out / "onnx"), "--opt-level", "0"]) == 0
    plan_file = next((out / "engines" / "transformer").glob("*_w4a16.plan"))
    m = json.loads(plan_file.with_suffix(".json").read_text())["quantization"]
    assert sorted(m["int4_weights_in_engine"] + m["int4_weights_dequantized_apart"]) == sorted(f"{n}.weight" for n in quantized
                                                                                             if n not in q["fp16_quantized_layers"])
