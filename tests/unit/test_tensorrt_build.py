"""TensorRT-RTX engine builds on a CPU: sparse weights, strongly typed, profile, manifest, reuse, CLI."""

from __future__ import annotations

import json
import re

import pytest

from common.errors import UserError
from tests import runtime_fixtures as fx

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx)")


def test_rtx_engine_from_pruned_tiny_sd3_transformer():
    from runtime.manifest import manifest_path_for
    from common.io import sha256_file

    spec, _ = fx.tiny_sd3()
    onnx_dir, _, pruned_layers = fx.pruned_export()
    plan = fx.rtx_engine()
    assert plan.name == f"engine_trtrtx{trt_rtx.__version__}.plan"
    m = json.loads(manifest_path_for(plan).read_text())
    assert m["backend"] == "trtrtx" and m["backend_version"] == trt_rtx.__version__
    assert m["plan_sha256"] == sha256_file(plan) and m["plan_bytes"] == plan.stat().st_size > 0
    assert m["builder"]["sparse_weights"] is True and m["builder"]["strongly_typed"] is True
    assert m["sparsity"] == "2:4"
    # No GPU here: the RTX build targets a list of compute capabilities instead of "this GPU".
    assert m["gpu"] is None and m["target_compute_capabilities"] == ["SM80", "SM86", "SM89", "SM120"]
    # Profile: batch min/opt/max from the registry, every other dim fixed at the export shape.
    sh = spec.shapes
    prof = m["profiles"][0]
    assert prof["hidden_states"] == [[b, 4, sh.latent_height, sh.latent_width] for b in (sh.batch_min, sh.batch_opt, sh.batch_max)]
    assert [s[0] for s in prof["timestep"]] == [sh.batch_min, sh.batch_opt, sh.batch_max]
    assert [d["name"] for d in m["io"]["inputs"]] == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    # Every pruned linear layer's ONNX weight is 2:4 along K, i.e. eligible for sparse kernels.
    nm = m["onnx_nm_weights"]
    assert len(pruned_layers) > 40
    assert {f"{n}.weight" for n in pruned_layers} == set(nm["eligible"])
    assert set(m["sparsity_log"]) == {"lines", "eligible", "sparse"}


def test_dense_onnx_has_no_nm_weights_and_dense_build_has_no_sparse_flag(tmp_path):
    from runtime.trt.build import build_engine
    from runtime.trt.onnx_inspect import onnx_nm_weights
    from runtime.trt.options import BuildOptions

    path = fx.component_exports() / "text_encoder.onnx"  # a dense CLIP text encoder
    nm = onnx_nm_weights(path)
    assert nm["checked"] > 0 and nm["eligible"] == []  # trained/random weights are not 2:4
    plan = build_engine(path, tmp_path / "eng", BuildOptions(sparsity="dense", opt_level=0, target_cc=("8.6",)), backend="trtrtx")
    m = json.loads(plan.with_suffix(".json").read_text())
    assert m["builder"]["sparse_weights"] is False and m["builder"]["opt_level"] == 0
    assert m["target_compute_capabilities"] == ["SM86"] and m["onnx_nm_weights"] is None


def test_build_engines_reuses_current_engine_and_rebuilds_on_option_change(tmp_path):
    from runtime.trt.build import build_engines
    from runtime.trt.options import BuildOptions

    src = tmp_path / "onnx"
    src.mkdir()
    (src / "text_encoder.onnx").symlink_to(fx.component_exports() / "text_encoder.onnx")
    opts = BuildOptions(sparsity="2:4", opt_level=1)
    plan = build_engines(src, tmp_path / "engines", opts, backend="trtrtx")["text_encoder"]
    stamp = plan.stat().st_mtime_ns
    assert build_engines(src, tmp_path / "engines", opts, backend="trtrtx")["text_encoder"].stat().st_mtime_ns == stamp
    # Components other than the transformer are never built with sparse weights.
    assert json.loads(plan.with_suffix(".json").read_text())["builder"]["sparse_weights"] is False
    opts.opt_level = 2
    build_engines(src, tmp_path / "engines", opts, backend="trtrtx")
    assert json.loads(plan.with_suffix(".json").read_text())["builder"]["opt_level"] == 2
    with pytest.raises(UserError, match="no ONNX for vae_decoder"):
        build_engines(src, tmp_path / "engines", opts, backend="trtrtx", components=["vae_decoder"])


def test_parse_sparsity_log_trt_and_rtx_formats():
    from runtime.trt.builder_log import parse_sparsity_log

    trt10 = [
        "[I] (Sparsity) Layers eligible for sparse math: blocks.0.ff.net.0.proj, blocks.0.ff.net.2",
        "[I] (Sparsity) TRT inference plan picked sparse implementation for layers: blocks.0.ff.net.2",
        "[V] Engine generation completed",
    ]
    out = parse_sparsity_log(trt10)
    assert out["eligible"] == ["blocks.0.ff.net.0.proj", "blocks.0.ff.net.2"]
    assert out["sparse"] == ["blocks.0.ff.net.2"] and len(out["lines"]) == 2
    rtx = ["2 layer(s) eligible to use sparse tactics:", "  attn.to_q", "  attn.to_k", "1 layer(s) using sparse tactics:", "  attn.to_q", "done"]
    out = parse_sparsity_log(rtx)
    assert out["eligible"] == ["attn.to_q", "attn.to_k"] and out["sparse"] == ["attn.to_q"]
    assert parse_sparsity_log(["nothing about it"]) == {"lines": [], "eligible": [], "sparse": []}


def test_bad_target_cc_and_backend_are_one_line_errors(tmp_path):
    from runtime.trt.backend import get_backend
    from runtime.trt.build import build_engine
    from runtime.trt.options import BuildOptions

    onnx_dir, _, _ = fx.pruned_export()
    with pytest.raises(UserError, match=r"cannot target SM99; supported: .*SM86"):
        build_engine(onnx_dir / "transformer.onnx", tmp_path, BuildOptions(target_cc=("9.9",)), backend="trtrtx")
    with pytest.raises(UserError, match="outside 0-5"):
        build_engine(onnx_dir / "transformer.onnx", tmp_path, BuildOptions(opt_level=7), backend="trtrtx")
    with pytest.raises(UserError, match="unknown TensorRT backend"):
        get_backend("tensorflow")
    assert not list(tmp_path.glob("*.plan"))


def test_cli_build_prints_engine_dir_and_writes_triton_repo(tmp_path, capsys):
    from pipeline.__main__ import main

    src = tmp_path / "export" / "onnx"
    src.mkdir(parents=True)
    (src / "text_encoder.onnx").symlink_to(fx.component_exports() / "text_encoder.onnx")
    rc = main(["build", "--onnx-dir", str(src), "--sparsity", "2:4", "--opt-level", "0", "--triton", str(tmp_path / "triton")])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and out[-1] == str(tmp_path / "export" / "engines")
    assert list((tmp_path / "export" / "engines" / "text_encoder").glob("engine_trtrtx*.plan"))
    assert (tmp_path / "triton" / "text_encoder" / "config.pbtxt").is_file()
    assert main(["build", "--onnx-dir", str(src), "--sparsity", "3:4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: unknown sparsity pattern '3:4'", err[0])
