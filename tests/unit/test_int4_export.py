"""`python -m pipeline export --precision int4` on a 2:4 + 4-bit stage-1 directory of a tiny random SD3 transformer:
every quantized layer becomes one ONNX Runtime ``MatMulNBits`` whose packed weights decode to the stored codes
exactly, the parity checks hold (and fail on a wrong packing order or on float activations), the report says what it did."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from export.int4_parity import A8_EFFECT_RANGE, LEVEL0_TOLERANCE, accuracy_level_copy, int4_parity, int8_activations
from export.matmul_nbits import pack_codes, unpack_codes
from obsdiff.weight_quant import WeightQuant, codes_of, rtn_quantize
from pipeline.__main__ import main
from tests.export_helpers import make_nm_sparse, write_model_dir, write_stage1_dir
from tests.factories import tiny_sd3_transformer

GROUP = 128  # > K of the attention projections (64): their one block is padded, as MatMulNBits pads K


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(stage-1 dir, export dir, quantized layer names): a tiny 2-block SD3 transformer, 2:4 along K, then every block
    linear rounded to the 4-bit grid (zeros stay zero), written as `prune --weight-bits 4` writes it, and exported."""
    from safetensors.torch import save_file

    from export.surgery import structured_plan
    from obsdiff.packages import QUANT_FILE

    model = tiny_sd3_transformer(num_layers=2, seed=5)
    names = make_nm_sparse(model)
    wq = WeightQuant(4, GROUP, "rtn")
    tensors = {}
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            w, scales = rtn_quantize(layer.weight, wq)
            layer.weight.copy_(w)
            tensors[f"{name}.codes"], tensors[f"{name}.scales"] = codes_of(w, scales, wq), scales.to(torch.float16)
    plan = structured_plan(model, 0.3)
    for block in plan.blocks:
        block.keep = {}  # nothing cut: a 2:4 plan
    plan.sparsity, plan.method = "2:4", "obs-diff"
    plan.layers = {n: {"density": 0.5, "shape": list(model.get_submodule(n).weight.shape), "weight_bits": 4} for n in names}
    plan.packages, plan.done_packages = [list(names)], 1
    plan.weight_quant = {**wq.to_json(), "file": QUANT_FILE}
    pruned = write_stage1_dir(tmp_path_factory.mktemp("pruned"), model, plan)
    save_file(tensors, str(pruned / "transformer" / QUANT_FILE))
    model_dir = write_model_dir(tmp_path_factory.mktemp("model"), model, plan.model)
    out = tmp_path_factory.mktemp("export") / "out"
    argv = ["export", "--model", str(model_dir), "--pruned", str(pruned), "--out", str(out), "--components", "transformer", "--precision", "int4"]
    assert main(argv) == 0
    return pruned, out, names


def _nbits_nodes(model) -> dict[str, object]:
    return {n.input[1].removesuffix(".weight_Q4"): n for n in model.graph.node if n.op_type == "MatMulNBits"}


def test_every_quantized_layer_is_one_matmul_nbits(exported):
    _, out, names = exported
    model = onnx.load(str(out / "onnx" / "transformer.onnx"))
    nodes = _nbits_nodes(model)
    assert sorted(nodes) == sorted(names)  # one MatMulNBits per quantized layer, no more
    gemm_weights = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    assert not gemm_weights & {f"{n}.weight" for n in names}  # no float copy left
    for node in nodes.values():
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft" and attrs["bits"] == 4 and attrs["block_size"] == GROUP and attrs["accuracy_level"] == 4
        assert len(node.input) == 6 and node.input[5].endswith(".bias")  # the bias Add folded in
    report = json.loads((out / "export_report.json").read_text())
    q = report["quantization"]
    assert q["quantized_layers"] == sorted(names) and q["bits"] == 4 and q["block_size"] == GROUP and q["accuracy_level"] == 4
    assert "stores the 2:4 pattern and 4-bit codes, runs dense 4-bit" in q["nm_note"]
    comp = report["components"]["transformer"]
    assert comp["precision"] == "int4" and comp["bytes"] < comp["float_bytes"]
    parity = comp["parity"]
    assert parity["ok"] and set(parity["per_case"]) == {"1", "3"}
    assert parity["level0_max_rel_error"] <= LEVEL0_TOLERANCE  # float32 compute on the same weights (measured ~5e-7)
    assert A8_EFFECT_RANGE[0] <= parity["level4_median_effect_ratio"] <= A8_EFFECT_RANGE[1]  # W4A8 as torch's (measured ~1.0)


def test_packed_weights_decode_to_the_stored_codes_exactly(exported):
    from safetensors.torch import load_file

    _, out, names = exported
    stored = load_file(str(out / "compact" / "weights_int.safetensors"))  # the compact checkpoint's codes and scales
    model = onnx.load(str(out / "onnx" / "transformer.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    for name, node in _nbits_nodes(model).items():
        codes, scales = stored[f"{name}.codes"].numpy(), stored[f"{name}.scales"].float().numpy()
        k = {a.name: a.i for a in node.attribute}["K"]
        packed = numpy_helper.to_array(inits[node.input[1]])
        assert packed.shape == (codes.shape[0], -(-k // GROUP), GROUP // 2) and k == codes.shape[1]
        assert np.array_equal(unpack_codes(packed, k), codes), name  # copied data: exact
        assert np.array_equal(numpy_helper.to_array(inits[node.input[2]]), scales), name
        assert (codes != 0).reshape(codes.shape[0], -1, 4).sum(-1).max() <= 2, name  # the 2:4 pattern, as code 0


def test_bits_8_and_padding_round_trip():
    rng = np.random.default_rng(0)
    for bits, k in ((4, 200), (8, 200), (4, 256)):
        codes = torch.from_numpy(rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(3, k)).astype(np.int8))
        scales = torch.rand(3, -(-k // 64))
        p = pack_codes(codes, scales, 64, bits)
        assert p.packed.shape == (3, -(-k // 64), 64 * bits // 8)
        assert np.array_equal(unpack_codes(p.packed, k, bits), codes.numpy())
        assert np.array_equal(p.weight(), (codes.float() * scales.repeat_interleave(64, 1)[:, :k]).numpy())  # exact in float32


def test_the_checks_fail_on_a_wrong_nibble_order_and_on_float_activations(exported, tmp_path):
    from export.checkpoint import load_compact
    from export.int_weights import int_layers
    from families import adapter_for

    pruned, out, names = exported
    compact, _ = load_compact(out / "compact")
    wrapper = adapter_for(compact).transformer_for_onnx(compact)
    shapes = json.loads((out / "export_report.json").read_text())["shapes"]
    feeds, ref32, refa8 = {}, {}, {}
    with torch.no_grad():  # inputs other than the export's own parity cases
        inputs = adapter_for(compact).transformer_inputs(compact, 2, (shapes["latent_height"], shapes["latent_width"]), shapes["text_seq_len"], seed=3)
        args = [inputs[n] for n in wrapper.input_names]
        feeds["2"] = {k: v.numpy() for k, v in inputs.items()}
        ref32["2"] = wrapper(*args).numpy()
        with int8_activations(int_layers(compact), GROUP):
            refa8["2"] = wrapper(*args).numpy()
    path = tmp_path / "transformer.onnx"
    shutil.copy(out / "onnx" / "transformer.onnx", path)
    assert int4_parity(path, feeds, "sample", ref32, refa8)["ok"]
    with accuracy_level_copy(path, 0) as float_activations:  # shipped without INT8 activations: W4A8's error is missing
        bad = int4_parity(float_activations, feeds, "sample", ref32, refa8)
    assert not bad["ok"] and bad["level4_median_effect_ratio"] < 0.05 and "accuracy_level 4" in bad["why"]
    model = onnx.load(str(path))
    t = next(t for t in model.graph.initializer if t.name == f"{names[-1]}.weight_Q4")
    packed = numpy_helper.to_array(t).copy()
    packed = (packed >> 4) | (packed << 4)  # one layer packed high nibble first (the other order)
    t.CopyFrom(numpy_helper.from_array(packed, t.name))
    onnx.save(model, str(path))
    bad = int4_parity(path, feeds, "sample", ref32, refa8)
    assert not bad["ok"] and bad["level0_max_rel_error"] > 10 * LEVEL0_TOLERANCE and "accuracy_level 0" in bad["why"]  # measured 2e-2
