"""ONNX export: ORT (CPU) parity with torch at batch 1 and 3, dynamic batch, constant GEMM weights."""

from __future__ import annotations

import onnx
import pytest
import torch

from export.dynamo_export import OPSET
from export.onnx_files import MAX_IR_VERSION
from export.parity import FP32_TOLERANCE, check_parity, ort_session
from export.transformer_checks import linear_weight_layout, missing_linear_weights
from families import adapter_for
from tests.export_helpers import EXPORT_LATENT, EXPORT_TEXT, export_and_check, exported_compact, exported_sparse_dense, family_component, rel_err, run
from tests.tolerances import ORT_PATHS_REL


def transformer_inputs(model, batch, latent_hw, text_seq_len, *, seed=0):
    return adapter_for(model).transformer_inputs(model, batch, latent_hw, text_seq_len, seed=seed)


def _check_graph(path, model):
    m = onnx.load(str(path))
    assert m.ir_version <= MAX_IR_VERSION
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
    for v in [*m.graph.input, *m.graph.output]:
        assert v.type.tensor_type.shape.dim[0].dim_param == "batch", v.name
    assert [v.name for v in m.graph.input] == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    assert [v.name for v in m.graph.output] == ["sample"]
    # every transformer-block linear is a MatMul/Gemm whose weight is a constant initializer ...
    assert missing_linear_weights(m, model) == []
    # ... and no Transpose sits between an initializer and a MatMul
    inits = {t.name for t in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.input[1] in producers:
            p = producers[n.input[1]]
            assert not (p.op_type == "Transpose" and p.input[0] in inits), n.name
    return m


@pytest.mark.parametrize("which", ["dense", "compact"])
def test_transformer_parity_batch_1_and_3(which):
    if which == "dense":
        model, _, path, summary = exported_sparse_dense()
    else:
        plan, masked, model, path, summary = exported_compact()
    par = summary["parity"]
    assert par["ok"] and set(par["per_batch"]) == {"1", "3"}
    assert par["max_rel_error"] <= FP32_TOLERANCE
    _check_graph(path, model)
    # independent re-check with fresh inputs (not the ones export_and_check drew)
    sess = ort_session(path)
    for batch in (1, 3):
        inputs = transformer_inputs(model, batch, EXPORT_LATENT, EXPORT_TEXT, seed=100 + batch)
        (got,) = sess.run(["sample"], {k: v.numpy() for k, v in inputs.items()})
        ref = run(model, tuple(inputs.values()))
        assert got.shape == tuple(ref.shape)
        assert rel_err(got, ref) <= ORT_PATHS_REL  # measured <= 5e-7


def test_compact_onnx_matches_masked_model():
    """End to end: ONNX of the compact model vs the stage-1 masked torch model."""
    plan, masked, compact, path, _ = exported_compact()
    layout = linear_weight_layout(onnx.load(str(path)))
    kept = len(plan.blocks[0].keep["attn"]) * 16
    assert layout["transformer_blocks.0.attn.to_q.weight"]["shape"][1 - layout["transformer_blocks.0.attn.to_q.weight"]["k_axis"]] == kept
    inputs = transformer_inputs(masked, 3, EXPORT_LATENT, EXPORT_TEXT, seed=9)
    (got,) = ort_session(path).run(["sample"], {k: v.numpy() for k, v in inputs.items()})
    assert rel_err(got, run(masked, tuple(inputs.values()))) <= ORT_PATHS_REL  # measured 5e-7


def test_parity_check_detects_a_wrong_model():
    """The parity check is not vacuous: a different reference fails it."""
    model, _, path, _ = exported_sparse_dense()
    perturbed = lambda inp: [run(model, tuple(inp.values())) * 1.001]  # noqa: E731
    par = check_parity(path, perturbed, lambda b: transformer_inputs(model, b, EXPORT_LATENT, EXPORT_TEXT, seed=b), ["sample"])
    assert not par.ok and par.max_error > FP32_TOLERANCE


def test_text_encoders_and_vae_decoder(tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       projection_dim=24, max_position_embeddings=10, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    ).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, layers_per_block=1,
    ).eval()
    modules = {"text_encoder": (clip, {"seq_len": 10}), "text_encoder_3": (t5, {"seq_len": 10}), "vae_decoder": (vae, {"latent_hw": (8, 8)})}
    results = {name: export_and_check(family_component("sd3", name), module, tmp_path / f"{name}.onnx", **kw) for name, (module, kw) in modules.items()}
    for name, res in results.items():
        assert res["parity"]["ok"], (name, res["parity"])
        assert set(res["parity"]["per_batch"]) == {"1", "3"}
        for spec in [*res["inputs"].values(), *res["outputs"].values()]:
            assert spec["shape"][0] == "batch"
    assert list(results["text_encoder"]["outputs"]) == ["text_embeds", "penultimate_hidden_states"]
    assert results["text_encoder"]["outputs"]["penultimate_hidden_states"]["shape"] == ["batch", 10, 32]
    assert results["text_encoder"]["inputs"]["input_ids"]["dtype"] == "int64"
    assert list(results["text_encoder_3"]["outputs"]) == ["last_hidden_state"]
    assert results["vae_decoder"]["outputs"]["sample"]["shape"] == ["batch", 3, 16, 16]


def test_weight_transpose_is_folded_into_the_initializer():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from export.graph_passes import cleanup, fold_weight_transposes

    w = np.arange(12, dtype=np.float32).reshape(3, 4)  # torch layout (N=3, K=4)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert fold_weight_transposes(model) == 1
    model = cleanup(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    (init,) = model.graph.initializer
    assert np.array_equal(numpy_helper.to_array(init), w.T)
    assert linear_weight_layout(model)[init.name]["k_axis"] == 0
