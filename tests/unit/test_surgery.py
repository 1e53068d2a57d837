"""Surgery: the physically cut transformer computes what the stage-1 masked one computes."""

from __future__ import annotations

import copy

import pytest
import torch

from common.errors import UserError
from export.surgery import apply_plan, block_shapes, check_masked, cut_group, mask_like_plan, structured_plan
from families import adapter_for
from tests.export_helpers import masked_and_compact, rel_err, run
from tests.factories import tiny_sd3_transformer, tiny_transformer_inputs
from tests.tolerances import TORCH_PATHS_REL


@pytest.mark.parametrize(
    "kwargs, ratio",
    [
        (dict(), 0.3),  # SD3: the last block is context_pre_only
        (dict(dual_attention_layers=(0, 1), qk_norm="rms_norm"), 0.5),  # SD3.5 MMDiT-X layout
    ],
    ids=["sd3-0.3", "sd35-dual-0.5"],
)
def test_compact_equals_masked(kwargs, ratio):
    plan, masked, compact = masked_and_compact(ratio=ratio, **kwargs)
    n_masked = sum(p.numel() for p in masked.parameters())
    n_compact = sum(p.numel() for p in compact.parameters())
    assert n_compact < n_masked
    # every block, the last (context_pre_only) one included, was cut
    for bp, shape in zip(plan.blocks, block_shapes(compact)):
        assert shape.sizes["attn"] == len(bp.keep["attn"]) < bp.sizes["attn"]
        assert shape.sizes["ff"] == len(bp.keep["ff"]) < bp.sizes["ff"]
        if "attn2" in bp.keep:
            assert shape.sizes["attn2"] == len(bp.keep["attn2"])
    assert compact.transformer_blocks[-1].context_pre_only
    if kwargs.get("dual_attention_layers"):
        assert compact.transformer_blocks[0].attn2.heads == len(plan.blocks[0].keep["attn2"])
    for batch, seed in ((1, 1), (3, 2)):
        inputs = tiny_transformer_inputs(masked, batch=batch, text_len=5, seed=seed)
        ref, out = run(masked, inputs), run(compact, inputs)
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= TORCH_PATHS_REL  # the same products, blocked differently (measured <= 3e-7)


def test_cut_attention_updates_bookkeeping():
    model = tiny_sd3_transformer(num_heads=4, head_dim=16)
    block = model.transformer_blocks[0]
    adapter = adapter_for(model)
    cut_group(block, adapter.structured_groups(block)[0], [0, 2], adapter)
    attn = block.attn
    assert attn.heads == 2 and attn.inner_dim == 32 and attn.inner_kv_dim == 32
    assert attn.to_q.out_features == attn.add_k_proj.out_features == attn.heads * 16
    assert attn.to_out[0].in_features == attn.to_add_out.in_features == 32


def test_stale_heads_would_change_the_model():
    """Guards the fix-up: cutting rows without updating attn.heads gives a different function."""
    plan, masked, compact = masked_and_compact(ratio=0.5)
    broken = copy.deepcopy(compact)
    for blk, bp in zip(broken.transformer_blocks, plan.blocks):
        blk.attn.heads = bp.sizes["attn"]  # stale bookkeeping: head_dim silently becomes smaller
    inputs = tiny_transformer_inputs(masked, batch=1, seed=3)
    assert rel_err(run(broken, inputs), run(masked, inputs)) > 10 * TORCH_PATHS_REL  # 10x the equivalence tolerance (measured 6.4e-4)


def test_surgery_on_unmasked_model_is_refused():
    dense = tiny_sd3_transformer()
    plan = structured_plan(dense, 0.3)
    with pytest.raises(UserError, match="does not match its plan"):
        check_masked(dense, plan)
    with pytest.raises(UserError, match="does not match its plan"):
        apply_plan(copy.deepcopy(dense), plan, require_masked=True)


def test_plan_for_another_model_is_refused():
    small = tiny_sd3_transformer(num_layers=2)
    plan = structured_plan(tiny_sd3_transformer(num_layers=3), 0.3)
    with pytest.raises(UserError, match="blocks"):
        apply_plan(small, plan)
    other = tiny_sd3_transformer(num_heads=2, head_dim=32)
    plan2 = structured_plan(tiny_sd3_transformer(), 0.3)
    with pytest.raises(UserError, match="head_dim"):
        apply_plan(other, plan2)
    bad = structured_plan(tiny_sd3_transformer(), 0.3)
    bad.blocks[0].keep["attn"] = [3, 1]
    with pytest.raises(UserError, match="sorted unique"):
        apply_plan(tiny_sd3_transformer(), bad)
    twice = tiny_sd3_transformer()
    apply_plan(twice, structured_plan(twice, 0.3))
    with pytest.raises(UserError, match="already compact"):
        apply_plan(twice, structured_plan(tiny_sd3_transformer(), 0.3))


def test_mask_like_plan_zeroes_only_removed_columns():
    model = tiny_sd3_transformer()
    plan = structured_plan(model, 0.5)
    masked = mask_like_plan(copy.deepcopy(model), plan)
    check_masked(masked, plan)  # no error
    w = masked.transformer_blocks[0].ff.net[2].weight
    kept = plan.blocks[0].keep["ff"]
    assert torch.equal(w[:, kept], model.transformer_blocks[0].ff.net[2].weight[:, kept])
