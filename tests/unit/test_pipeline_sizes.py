"""families.pipeline_sizes: the counts it computes from configs are the real models' (the embedded pipelines'
files, a structured cut made by export.surgery), and its byte formulas are ONNX Runtime's own quantized layouts.
Everything here is discrete: compared exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from families import get_adapter
from families.pipeline_sizes import (
    GIB,
    PipelineConfig,
    Precision,
    WeightFormat,
    component_bytes,
    inventory,
    least_aggressive,
    pipeline_bytes,
    pipeline_weights,
    weight_format,
)
from families.registry import MODELS


def _file_numel(directory, prefix: str = "") -> int:
    """Elements the safetensors files of ``directory`` hold (under ``prefix``), read with safetensors itself."""
    from safetensors import safe_open

    total = 0
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            total += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys() if k.startswith(prefix) or
                         (prefix and k.startswith("post_quant_conv.")))
    return total


@pytest.mark.parametrize("model_id", ["tiny-sd3", "tiny-flux"])
def test_counts_are_the_embedded_models_files_and_modules(model_id):
    spec = MODELS[model_id]
    weights = pipeline_weights(spec)
    assert list(weights) == [c.attr for c in spec.adapter.components]
    from families.registry import load_component

    for name, w in weights.items():
        prefix = "decoder." if w.kind == "vae_decoder" else ""
        assert w.numel == _file_numel(spec.path / name, prefix), name
        module = load_component(spec, name)  # the real module, instantiated from the stored weights
        tensors = {id(t): t for k, t in module.state_dict(keep_vars=True).items() if k.startswith(prefix) or (prefix and k.startswith("post_quant_conv."))}
        assert w.numel == sum(t.numel() for t in tensors.values()), name
    roles = weights["transformer"].numel_by_role()
    assert roles["block"] > 0 and roles["modulation"] > 0  # the AdaLN linears are apart from the pruned ones
    if model_id == "tiny-sd3":  # SD3's position table is a persistent buffer, in the files and the count
        assert [k for k, _ in weights["transformer"].buffers] == ["pos_embed.pos_embed"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_structured_shapes_are_the_ones_surgery_cuts(family):
    from export.surgery import apply_plan, structured_plan
    from tests.factories import tiny_flux_transformer, tiny_sd3_transformer

    model = tiny_sd3_transformer(num_layers=3, num_heads=6, dual_attention_layers=(0,)) if family == "sd3" else tiny_flux_transformer(num_heads=6)
    adapter = get_adapter(family)
    before = inventory(model, "transformer", "transformer", adapter=adapter)
    for ratio in (0.3, 0.5):
        cut = apply_plan(tiny_sd3_transformer(num_layers=3, num_heads=6, dual_attention_layers=(0,)) if family == "sd3"
                         else tiny_flux_transformer(num_heads=6), structured_plan(model, ratio))
        after = inventory(cut, "transformer", "transformer", adapter=adapter)
        computed = before.structured(ratio)
        assert {m.name: (m.rows, m.cols) for m in computed.matrices} == {m.name: (m.rows, m.cols) for m in after.matrices}
        assert computed.numel == sum(p.numel() for p in cut.state_dict().values())
        assert component_bytes(computed, Precision("int4-g128")) == component_bytes(after, Precision("int4-g128"))
    assert computed.numel < before.numel


def _matmul_model(k: int, n: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "W")  # (K, N): y = x @ W
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _initializer_bytes(model) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


@pytest.mark.parametrize("bits,block", [(4, 128), (4, 64), (8, 128)])
def test_grouped_formula_is_onnxruntime_matmulnbits_layout(bits, block):
    """ONNX Runtime's MatMulNBits quantizer (symmetric, no zero points; scales in the graph's float32) on a weight
    whose input width is not a multiple of the block: the padded last block is counted."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    k, n = 200, 48
    q = MatMulNBitsQuantizer(_matmul_model(k, n), algo_config=DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits))
    q.process()
    model = q.model.model
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits"]
    fmt = WeightFormat(f"int{bits}-g{block}", bits, block, scale_bytes=4)
    assert _initializer_bytes(model) == fmt.matrix_bytes(n, k)  # rows = N outputs, cols = K inputs (nn.Linear's out x in)


def test_per_channel_int8_formula_is_onnxruntime_layout():
    """ONNX Runtime's dynamic quantizer per channel: INT8 codes, a float32 scale and an INT8 zero point per output."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    k, n = 200, 48
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "f.onnx", Path(d) / "q.onnx"
        onnx.save(_matmul_model(k, n), src)
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
        model = onnx.load(dst)
    assert _initializer_bytes(model) == WeightFormat("int8", 8, None, scale_bytes=4, zero_point_bits=8).matrix_bytes(n, k)


def test_formats_2_4_and_the_goal_search():
    fmt = weight_format("int4-g128")
    assert fmt.matrix_bytes(256, 256) == 256 * 256 // 2 + 256 * 2 * 2
    assert fmt.matrix_bytes(256, 256, "dense") == fmt.matrix_bytes(256, 256)
    assert fmt.matrix_bytes(256, 256, "compressed") == 256 * 256 // 4 + 256 * 256 // 8 + 256 * 2 * 2
    assert weight_format("fp16").matrix_bytes(3, 5) == 30 and weight_format("int8").matrix_bytes(3, 5) == 15 + 6
    from common.errors import UserError

    with pytest.raises(UserError, match="unknown weight format"):
        weight_format("int3")
    spec = MODELS["tiny-sd3"]
    w = pipeline_weights(spec)
    dense = PipelineConfig(encoders=(("clip", Precision()), ("t5", Precision())))
    dropped = PipelineConfig(encoders=(("clip", Precision()), ("t5", None)))
    full, no_t5 = pipeline_bytes(w, dense), pipeline_bytes(w, dropped)
    assert "text_encoder_3" in full and "text_encoder_3" not in no_t5
    assert sum(full.values()) - sum(no_t5.values()) == 2 * w["text_encoder_3"].numel
    budget = sum(no_t5.values())
    fits = least_aggressive(w, budget, [dense, dropped])
    assert [c for c, _ in fits] == [dropped]  # fp16 with T5 is over the budget
    assert budget / GIB < 1


def test_benchmark_writes_the_table_and_the_goal_and_refuses_a_bad_goal(tmp_path, capsys):
    import json

    from benchmarks import pipeline_sizes

    out = tmp_path / "sizes.json"
    assert pipeline_sizes.main(["--models", "tiny-sd3,tiny-flux", "--goal", "tiny-sd3=0.01", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    goal = r["models"]["tiny-sd3"]["goal"]["export_scope"]
    assert goal["least_aggressive"]["total_gib"] <= 0.01 and "goal" not in r["models"]["tiny-flux"]
    assert "## tiny-flux" in out.with_suffix(".md").read_text()
    capsys.readouterr()
    assert pipeline_sizes.main(["--models", "tiny-sd3", "--goal", "tiny-flux=4", "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
