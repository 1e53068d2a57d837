"""``--transformer`` takes whatever a stage wrote: a prune output or its transformer/, an export output or its
compact/; anything else is one line."""

from __future__ import annotations

import pytest

from common.errors import UserError
from export.checkpoint import find_transformer_dir, load_any_transformer, save_compact
from tests.export_helpers import masked_and_compact, rel_err, run, write_stage1_dir
from tests.factories import tiny_transformer_inputs
from tests.tolerances import TORCH_PATHS_REL


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
    plan, masked, compact = masked_and_compact(ratio=0.3, num_layers=2)
    prune_dir = write_stage1_dir(tmp_path_factory.mktemp("prune"), masked, plan)
    export_dir = tmp_path_factory.mktemp("export")
    save_compact(compact, export_dir / "compact", plan)
    return prune_dir, export_dir, masked


def test_every_stage_output_layout_is_accepted(stage_dirs):
    prune_dir, export_dir, masked = stage_dirs
    assert find_transformer_dir(prune_dir) == prune_dir / "transformer"
    assert find_transformer_dir(prune_dir / "transformer") == prune_dir / "transformer"
    assert find_transformer_dir(export_dir) == export_dir / "compact"
    assert find_transformer_dir(export_dir / "compact") == export_dir / "compact"
    inputs = tiny_transformer_inputs(masked)
    ref = run(masked, inputs)
    for d in (prune_dir, export_dir):  # the masked and the compact transformer compute the same thing
        assert rel_err(run(load_any_transformer(d), inputs), ref) <= TORCH_PATHS_REL  # measured <= 1e-7


def test_what_is_not_a_transformer(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_transformer_dir(tmp_path / "absent")
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is not a directory"):
        find_transformer_dir(tmp_path / "f")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "plan.json").write_text("{}")
    with pytest.raises(UserError, match="unfinished prune"):
        find_transformer_dir(tmp_path / "unfinished")
    with pytest.raises(UserError, match="holds no transformer"):
        find_transformer_dir(tmp_path)


def test_a_transformer_made_for_another_model_is_one_line(stage_dirs, tmp_path):
    """--transformer checks what its stage recorded (plan, compact description) and its architecture against --model."""
    from export.checkpoint import check_transformer_model
    from families.registry import resolve_model
    from tests.export_helpers import write_model_dir

    prune_dir, export_dir, masked = stage_dirs
    own = resolve_model(str(write_model_dir(tmp_path, masked)))  # the factory model's own directory: its plan says "random"
    for d in (prune_dir / "transformer", export_dir / "compact"):
        check_transformer_model(d, own)
        with pytest.raises(UserError, match=f"--transformer {d} was made for random( \\(sd3\\))?, not for tiny-sd3") as e:
            check_transformer_model(d, resolve_model("tiny-sd3"))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="its transformer is not tiny-flux's \\(a SD3Transformer2DModel against tiny-flux's FluxTransformer2DModel\\)"):
        check_transformer_model(resolve_model("tiny-sd3").path / "transformer", resolve_model("tiny-flux"))
