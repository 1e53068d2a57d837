"""`python -m pipeline export` on a stage-1 directory: surgery, checkpoint, fp16 ONNX, reuse, user errors."""

from __future__ import annotations

import json
import logging

import onnx
import pytest

from export.checkpoint import load_compact
from export.parity import FP16_TOLERANCE
from export.surgery import structured_plan
from pipeline.__main__ import main
from tests.export_helpers import masked_and_compact, write_model_dir, write_stage1_dir
from tests.factories import tiny_sd3_transformer
from tests.tolerances import TORCH_PATHS_REL


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    # the factory model's own model directory (its config; sample_size 8), the --model its stage-1 directory was made for
    plan, masked, _ = masked_and_compact(ratio=0.3, num_layers=2)
    model = write_model_dir(tmp_path_factory.mktemp("model"), masked, plan.model)
    return write_stage1_dir(tmp_path_factory.mktemp("pruned"), masked, plan), plan, model


def test_export_fp16_then_reuse(stage1, tmp_path, caplog):
    pruned, plan, model = stage1
    out = tmp_path / "out"
    argv = ["export", "--model", str(model), "--pruned", str(pruned), "--out", str(out), "--components", "transformer", "--precision", "fp16"]
    assert main(argv) == 0
    report = json.loads((out / "export_report.json").read_text())
    tr = report["transformer"]
    assert report["surgery"]["max_rel_error"] <= TORCH_PATHS_REL  # compact vs masked in torch (measured 1e-7)
    assert tr["params_compact"]["total"] < tr["params_dense"]["total"]
    assert tr["gemm_flops_per_step"] == tr["gemm_flops_per_step_onnx"] < tr["gemm_flops_per_step_dense"]
    comp = report["components"]["transformer"]
    assert comp["precision"] == "fp16" and comp["parity"]["ok"] and comp["parity"]["tolerance"] == FP16_TOLERANCE
    assert set(comp["parity"]["per_batch"]) == {"1", "3"}
    assert comp["inputs"]["hidden_states"]["dtype"] == "float16" and comp["inputs"]["timestep"]["dtype"] == "float32"
    assert comp["outputs"]["sample"]["dtype"] == "float16"
    m = onnx.load(str(out / "onnx" / "transformer.onnx"))
    producers = {o: n for n in m.graph.node for o in n.output}
    lns = [n for n in m.graph.node if n.op_type == "LayerNormalization"]
    assert lns and all(producers[n.input[0]].op_type == "Cast" for n in lns)  # layer norms run in fp32
    model, loaded_plan = load_compact(out / "compact")
    block = plan.blocks[1]  # plan v2: kept units per structured group; a group not listed keeps all of them
    assert model.transformer_blocks[1].attn.heads == len(block.keep.get("attn", range(block.sizes["attn"])))
    assert loaded_plan.sparsity == plan.sparsity

    stamp = (out / "export_report.json").stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="export.stage")
    assert main(argv) == 0
    assert "reusing the existing export" in caplog.text
    assert (out / "export_report.json").stat().st_mtime_ns == stamp


def test_user_errors_are_one_line(stage1, tmp_path, capsys):
    pruned, plan, model = stage1

    def fails(argv, match):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and match in err, err

    base = ["export", "--model", str(model), "--out", str(tmp_path / "o"), "--components", "transformer"]
    fails([*base, "--pruned", str(tmp_path / "nowhere")], "is not a directory")
    (tmp_path / "noplan").mkdir()
    fails([*base, "--pruned", str(tmp_path / "noplan")], "plan.json")
    fails([*base, "--pruned", str(pruned), "--components", "transformer,unet"], "unknown component")
    # a transformer of another architecture than --model's (and than its plan's)
    other = write_stage1_dir(tmp_path / "other", tiny_sd3_transformer(num_layers=3), plan)
    fails([*base, "--pruned", str(other)], "its transformer is not random's (num_layers 3 against 2)")
    # a stage-1 directory made for another model than --model
    fails([*base[:1], "--model", "tiny-sd3", *base[3:], "--pruned", str(pruned)], f"--pruned {pruned} was made for random, not for tiny-sd3")
    # weights that were not masked the way the plan says
    dense = tiny_sd3_transformer(num_layers=2)
    unmasked = write_stage1_dir(tmp_path / "unmasked", dense, structured_plan(dense, 0.3))
    fails([*base, "--pruned", str(unmasked)], "does not match its plan")
    # an unfinished stage-1 run
    partial = write_stage1_dir(tmp_path / "partial", dense, structured_plan(dense, 0.3))
    d = json.loads((partial / "plan.json").read_text())
    d["packages"], d["done_packages"] = [["transformer_blocks.0.attn.to_q"]], 0
    (partial / "plan.json").write_text(json.dumps(d))
    fails([*base, "--pruned", str(partial)], "partial")
    assert not (tmp_path / "o").exists()  # a failing export leaves no --out behind
