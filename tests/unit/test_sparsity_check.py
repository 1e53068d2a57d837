"""The N:M checker: exact along K, K axis from the node, FLOP shares, agreement with polygraphy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.sparsity_check import check_nm, check_onnx_sparsity, cross_check_polygraphy, polygraphy_sparsity
from tests.export_helpers import EXPORT_LATENT, EXPORT_TEXT, exported_sparse_dense


def _nm_weight(k: int, n_out: int, n: int = 2, m: int = 4, seed: int = 0) -> np.ndarray:
    """A [K, N] weight with exactly n non-zeros per group of m along K (axis 0)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n_out)).astype(np.float32)
    for g in range(0, k, m):
        for col in range(n_out):
            drop = rng.permutation(m)[: m - n]
            w[g + drop, col] = 0.0
    return w


def test_check_nm_exact_and_axis_sensitive():
    w = _nm_weight(16, 8)  # (K, N), 2:4 along axis 0
    assert check_nm(w, 0).ok
    assert check_nm(w.T, 1).ok
    assert not check_nm(w, 1).ok  # along the wrong axis the pattern is (almost surely) not 2:4
    assert check_nm(w, 0, 4, 8).ok  # 2:4 implies 4:8
    broken = w.copy()
    zero = np.argwhere(broken[:4, 0] == 0)[0, 0]
    broken[zero, 0] = 1e-8  # one tiny non-zero breaks the pattern: the check is exact, not a threshold
    res = check_nm(broken, 0)
    assert not res.ok and res.bad_groups == 1 and "exceed 2:4" in res.reason
    assert not check_nm(np.zeros((6, 4)), 0).ok  # K not divisible by M


def _toy_model(w_matmul: np.ndarray, w_gemm_nk: np.ndarray) -> onnx.ModelProto:
    """x [B,T,K] -MatMul W[K,H]-> [B,T,H] -reshape-> [B*T,H] -Gemm(transB=1, W2 [N,H])-> [B*T,N]."""
    k, h = w_matmul.shape
    n = w_gemm_nk.shape[0]
    nodes = [
        helper.make_node("MatMul", ["x", "blocks.0.up.weight"], ["y"], name="mm"),
        helper.make_node("Reshape", ["y", "shape"], ["y2"], name="rs"),
        helper.make_node("Gemm", ["y2", "blocks.0.down.weight"], ["z"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, k])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, n])],
        initializer=[
            numpy_helper.from_array(w_matmul, "blocks.0.up.weight"),
            numpy_helper.from_array(w_gemm_nk, "blocks.0.down.weight"),
            numpy_helper.from_array(np.array([-1, h], dtype=np.int64), "shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_onnx_checker_uses_node_k_axis_and_counts_flops():
    w1 = _nm_weight(16, 8, seed=1)  # MatMul: [K=16, N=8], 2:4 along axis 0
    w2 = _nm_weight(8, 12, seed=2).T.copy()  # Gemm transB=1: [N=12, K=8], 2:4 along axis 1
    model = _toy_model(w1, w2)
    rep = check_onnx_sparsity(model, input_shapes={"x": [2, 5, 16]}, expected_layers=["blocks.0.up", "blocks.0.down.weight"])
    assert rep.ok
    by = {g.layer: g for g in rep.gemms}
    assert by["blocks.0.up"].k_axis == 0 and by["blocks.0.down"].k_axis == 1
    assert by["blocks.0.up"].flops == 2 * (2 * 5) * 16 * 8
    assert by["blocks.0.down"].flops == 2 * (2 * 5) * 8 * 12
    assert rep.eligible_share == 1.0


def test_onnx_checker_fails_on_a_broken_pattern():
    w1 = _nm_weight(16, 8, seed=1)
    w2 = _nm_weight(8, 12, seed=2).T.copy()
    w2_broken = w2.copy()
    w2_broken[3, :4] = 0.5  # a full group of 4 non-zeros along K in output row 3
    rep = check_onnx_sparsity(_toy_model(w1, w2_broken), input_shapes={"x": [2, 5, 16]}, expected_layers=["blocks.0.up", "blocks.0.down"])
    assert not rep.ok
    assert rep.failed_layers == ["blocks.0.down"]
    assert rep.eligible_share == pytest.approx(16 * 8 / (16 * 8 + 8 * 12))
    # a layer the plan expects but the graph lacks is reported too
    rep2 = check_onnx_sparsity(_toy_model(w1, w2), input_shapes={"x": [1, 5, 16]}, expected_layers=["blocks.0.gone"])
    assert rep2.missing_layers == ["blocks.0.gone"] and not rep2.ok


def test_exported_transformer_keeps_2_4_and_polygraphy_agrees(tmp_path):
    model, layers, path, _ = exported_sparse_dense()
    shapes = {
        "hidden_states": [2, 4, *EXPORT_LATENT],
        "encoder_hidden_states": [2, EXPORT_TEXT, model.config.joint_attention_dim],
        "pooled_projections": [2, model.config.pooled_projection_dim],
        "timestep": [2],
    }
    rep = check_onnx_sparsity(path, input_shapes=shapes, expected_layers=layers)
    assert rep.ok, rep.summary()
    assert len(layers) == len(rep.expected_layers) > 20
    # FLOP accounting agrees with torch's own counter on the same shapes
    from export.report import transformer_flops

    assert rep.total_flops == transformer_flops(model, 2, EXPORT_LATENT, EXPORT_TEXT)["gemm"]
    assert 0.5 < rep.eligible_share < 1.0  # embedders, attention products and proj_out stay dense
    pg = polygraphy_sparsity(path)
    assert cross_check_polygraphy(rep, pg) == []
    assert all(pg[f"{name}.weight"] for name in layers)

    # break one group of one pruned layer in the ONNX file: both checkers must now reject it
    m = onnx.load(str(path))
    name = f"{layers[0]}.weight"
    init = next(t for t in m.graph.initializer if t.name == name)
    w = numpy_helper.to_array(init).copy()
    k_axis = next(g.k_axis for g in rep.gemms if g.weight == name)
    wk = np.moveaxis(w, k_axis, 0)  # view with K first
    wk[:4, 0] = 1.0
    init.CopyFrom(numpy_helper.from_array(w, name))
    broken = tmp_path / "broken.onnx"
    onnx.save(m, str(broken))
    rep_b = check_onnx_sparsity(broken, input_shapes=shapes, expected_layers=layers)
    assert not rep_b.ok and rep_b.failed_layers == [layers[0]]
    assert polygraphy_sparsity(broken)[name] is False
