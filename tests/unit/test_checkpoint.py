"""Compact checkpoint: safetensors + compact.json round trip, and one-line errors on every mismatch."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import UserError
from common.io import MARKER
from export.checkpoint import DESCRIPTION, WEIGHTS, load_compact, save_compact
from export.surgery import block_shapes, structured_plan
from tests.export_helpers import masked_and_compact, run
from tests.factories import tiny_sd3_transformer, tiny_transformer_inputs


@pytest.fixture(scope="module")
def compact_case():
    return masked_and_compact(ratio=0.5, num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm")


def test_round_trip(tmp_path, compact_case):
    plan, masked, compact = compact_case
    save_compact(compact, tmp_path / "compact", plan)
    assert sorted(p.name for p in (tmp_path / "compact").iterdir()) == [MARKER, DESCRIPTION, WEIGHTS]
    loaded, loaded_plan = load_compact(tmp_path / "compact")
    assert loaded_plan.to_dict() == plan.to_dict()
    assert block_shapes(loaded) == block_shapes(compact)
    assert loaded.transformer_blocks[0].attn.heads == len(plan.blocks[0].keep["attn"])
    assert loaded.transformer_blocks[0].attn2.heads == len(plan.blocks[0].keep["attn2"])
    inputs = tiny_transformer_inputs(compact, batch=2, seed=5)
    assert torch.equal(run(loaded, inputs), run(compact, inputs))
    desc = json.loads((tmp_path / "compact" / DESCRIPTION).read_text())
    assert desc["blocks"][0]["sizes"]["attn"] == len(plan.blocks[0].keep["attn"])
    assert desc["config"]["num_layers"] == 3


def test_dense_round_trip_fp16(tmp_path):
    model = tiny_sd3_transformer(num_layers=2).half()
    save_compact(model, tmp_path / "c")
    loaded, plan = load_compact(tmp_path / "c")
    assert plan is None and next(loaded.parameters()).dtype == torch.float16
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_plan_that_does_not_match_the_model_is_refused(tmp_path, compact_case):
    plan, masked, compact = compact_case
    other = structured_plan(tiny_sd3_transformer(num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm"), 0.25)
    with pytest.raises(UserError, match="do not match"):
        save_compact(compact, tmp_path / "x", other)
    assert not (tmp_path / "x").exists()


def _saved(tmp_path, compact_case):
    plan, masked, compact = compact_case
    return save_compact(compact, tmp_path / "compact", plan)


def test_edited_description_is_refused(tmp_path, compact_case):
    d = _saved(tmp_path, compact_case)
    desc = json.loads((d / DESCRIPTION).read_text())
    desc["blocks"][1]["sizes"]["ff"] += 4  # shapes no longer match the stored plan
    (d / DESCRIPTION).write_text(json.dumps(desc))
    with pytest.raises(UserError, match="do not match"):
        load_compact(d)
    desc["plan"] = None  # without the plan, the weights themselves disagree
    (d / DESCRIPTION).write_text(json.dumps(desc))
    with pytest.raises(UserError, match=r"transformer_blocks\.1\.ff\.net\.0\.proj\.weight has shape"):
        load_compact(d)


def test_corrupt_or_missing_files_are_refused(tmp_path, compact_case):
    d = _saved(tmp_path, compact_case)
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="does not match the hash"):
        load_compact(d)
    desc = json.loads((d / DESCRIPTION).read_text())
    desc.pop("weights_sha256")
    (d / DESCRIPTION).write_text(json.dumps(desc))
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_compact(d)
    (d / WEIGHTS).unlink()
    with pytest.raises(UserError, match="missing file"):
        load_compact(d)
    (d / DESCRIPTION).write_text("{not json")
    with pytest.raises(UserError, match="corrupt JSON"):
        load_compact(d)
    with pytest.raises(UserError, match="missing file"):
        load_compact(tmp_path / "nowhere")


def test_weights_from_another_model_are_refused(tmp_path, compact_case):
    d = _saved(tmp_path, compact_case)
    from safetensors.torch import save_file

    other = tiny_sd3_transformer(num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(d / WEIGHTS))
    desc = json.loads((d / DESCRIPTION).read_text())
    desc.pop("weights_sha256")
    (d / DESCRIPTION).write_text(json.dumps(desc))
    with pytest.raises(UserError, match="has shape"):
        load_compact(d)
