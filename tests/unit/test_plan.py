import json

import pytest

from common.errors import UserError
from obsdiff.plan import BlockPlan, PrunePlan


def _plan():
    blocks = [BlockPlan(i, sizes={"attn": 4, "ff": 16}, keep={"attn": [0, 2, 3], "ff": list(range(12))}) for i in range(2)]
    return PrunePlan(model="tiny-sd3", sparsity="structured:0.25", method="obs-diff", head_dim=64, num_layers=2, blocks=blocks)


def test_round_trip(tmp_path):
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    again = PrunePlan.load(tmp_path / "plan.json")
    assert again == plan and again.blocks[0].is_cut


def test_mismatched_blocks_and_versions_are_user_errors(tmp_path):
    d = _plan().to_dict()
    d["num_layers"] = 3
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="expected 0..2"):
        PrunePlan.load(tmp_path / "p.json")
    d = _plan().to_dict()
    d["version"] = 99
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="version"):
        PrunePlan.load(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({"model": "x", "version": 1}))
    with pytest.raises(UserError, match="not a valid prune plan"):
        PrunePlan.load(tmp_path / "p.json")
