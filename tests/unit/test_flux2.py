"""Flux.2 adapter: stage 1 (units, Hessians, OBS solvers) and stage 2 (cut, compact checkpoint, ONNX) on a tiny
random ``Flux2Transformer2DModel`` (1 double-stream block, 2 single-stream blocks, 4 heads of 16).

The single-stream blocks fuse q/k/v and the SwiGLU gate/up into one ``to_qkv_mlp_proj`` and the attention and
MLP outputs into one ``to_out``; the double-stream FFNs fuse gate and up into ``linear_in``. Every cut below
goes through those fused projections.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

import diffusers

from export.sparsity_check import check_nm
from families.base import Span, get_module
from families.flux2 import Flux2TransformerRuntime
from tests.tolerances import TORCH_PATHS_REL

pytestmark = pytest.mark.skipif(not hasattr(diffusers, "Flux2Transformer2DModel"), reason="needs diffusers with Flux2Transformer2DModel")

CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
)
DIM, HEAD_DIM, HEADS, MLP = 64, 16, 4, 192
LATENT = (8, 8)  # VAE latents: 4 x 4 image tokens of 2x2 patches
TEXT = 6


@pytest.fixture(scope="module")
def adapter():
    """The registered Flux.2 adapter (what ``adapter_for`` finds for the class)."""
    import families

    return families.adapter_for("Flux2Transformer2DModel")


def tiny_flux2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return diffusers.Flux2Transformer2DModel(**CONFIG).eval()


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run(adapter, model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    inputs = adapter.transformer_inputs(model, batch, LATENT, TEXT, seed=seed)
    with torch.no_grad():
        return adapter.transformer_for_onnx(model)(*inputs.values())  # (B, S_img, C)


# ------------------------------------------------------------------------------------------------ stage 1
def run_stage1(model: nn.Module, adapter, sparsity_text: str, *, groups: int = 2, calib_batches: int = 3):
    """Stage 1 without a pipeline: the driver's package loop (``obsdiff.packages.prune``) with Hessians from
    forward passes on random inputs instead of denoising trajectories. Prunes ``model`` in place; returns the plan."""
    from obsdiff.hessian import HessianCollector
    from obsdiff.packages import PruneConfig, _jobs, _share_groups, _skeleton, _solve, build_units, split_packages
    from obsdiff.patterns import parse_sparsity

    sparsity = parse_sparsity(sparsity_text)
    config = PruneConfig(sparsity=sparsity, family="flux2", groups=groups)
    units = build_units(model, adapter, structured=sparsity.kind == "structured")
    packages = split_packages(units, groups)
    plan = _skeleton("tiny-flux2", model, adapter, config, [], packages)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    blocks = adapter.blocks(model)
    for package, names in zip(packages, plan.packages):
        collector = HessianCollector({n: modules[n] for n in names}, share=_share_groups(names, adapter.shared_inputs))
        with collector, torch.no_grad():  # later packages calibrate on the already pruned earlier ones
            for b in range(calib_batches):
                model(**adapter.transformer_inputs(model, 2, LATENT, TEXT, seed=100 + b), return_dict=False)
        factors: dict = {}
        removed_cols: dict[str, list[int]] = {}  # per weight: columns earlier groups removed (fused to_out)
        for job in _jobs(package, sparsity, adapter, blocks):
            with torch.no_grad():
                solved = _solve(job, modules, collector, config, factors, removed_cols.get(job.layers[0], ()))
                keep = solved.keep
                for n, w in zip(job.layers, solved.weights):
                    modules[n].weight.copy_(w)
            if keep is not None:
                plan.blocks[job.block].keep[job.group] = keep
                start = job.cols[0] if job.cols is not None else 0
                gone = torch.as_tensor(sorted(set(range(plan.blocks[job.block].sizes[job.group])) - set(keep)), dtype=torch.long)
                cols = (start + gone[:, None] * job.unit + torch.arange(job.unit)[None, :]).reshape(-1).tolist()
                for n in job.layers:
                    removed_cols.setdefault(n, []).extend(cols)
        for n in names:
            w = modules[n].weight
            plan.layers[n] = {"density": float((w != 0).sum()) / w.numel(), "shape": list(w.shape)}
        plan.done_packages += 1
    return plan


@pytest.fixture(scope="module")
def stage1(adapter):
    """``{sparsity: (dense model, pruned model, plan)}``, each computed once for the module."""
    cache: dict = {}

    def get(sparsity: str):
        if sparsity not in cache:
            dense = tiny_flux2()
            pruned = copy.deepcopy(dense)
            cache[sparsity] = (dense, pruned, run_stage1(pruned, adapter, sparsity))
        return cache[sparsity]

    return get


# ------------------------------------------------------------------------------------------------ tables
def test_blocks_units_and_spans_describe_the_model(adapter):
    model = tiny_flux2()
    blocks = adapter.blocks(model)
    assert [p for p, _ in blocks] == ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    for _, blk in blocks:  # every unit layer is a real linear of the block (units() drops missing ones silently)
        table = adapter.unit_layers[adapter.block_kind(blk)]
        assert [names for _, names in adapter.units(blk)] == [names for _, names in table]
    I = HEADS * HEAD_DIM  # noqa: E741
    double, single = blocks[0][1], blocks[1][1]
    groups = {g.name: g for g in adapter.structured_groups(double)}
    assert [g.kind for g in adapter.structured_groups(double)] == ["heads", "neurons", "neurons"]
    assert groups["ff"].inputs == (Span("ff.linear_in", 0, MLP), Span("ff.linear_in", 0, 0))
    assert groups["ff"].outputs == (Span("ff.linear_out", 1, 0),) and groups["ff"].size == MLP
    assert {s.layer for s in groups["attn"].outputs} == {"attn.to_out.0", "attn.to_add_out"} and groups["attn"].unit == HEAD_DIM
    heads, mlp = adapter.structured_groups(single)
    assert (heads.name, heads.size, heads.unit, mlp.name, mlp.size) == ("attn", HEADS, HEAD_DIM, "mlp", MLP)
    proj = "attn.to_qkv_mlp_proj"
    assert heads.inputs == (Span(proj, 0, 2 * I), Span(proj, 0, I), Span(proj, 0, 0))
    assert mlp.inputs == (Span(proj, 0, 3 * I + MLP), Span(proj, 0, 3 * I))
    assert heads.outputs == (Span("attn.to_out", 1, 0),) and mlp.outputs == (Span("attn.to_out", 1, I),)
    # the spans tile the fused projections exactly
    assert get_module(single, proj).out_features == 3 * heads.width + 2 * mlp.width
    assert get_module(single, "attn.to_out").in_features == heads.width + mlp.width
    from export.surgery import check_model

    check_model(model)


def test_inputs_match_the_pipeline_layout(adapter):
    from diffusers import Flux2Pipeline

    model = tiny_flux2()
    real = {k: list(v.shape) for k, v in adapter.transformer_inputs(model, 3, LATENT, TEXT).items()}
    assert adapter.transformer_input_shapes(model, 3, LATENT, TEXT) == real  # the meta path agrees
    assert list(real) == ["hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids", "guidance"]
    # noise() is what Flux2Pipeline.prepare_latents draws itself, and packs to the tokens transformer_inputs makes
    pipe = types.SimpleNamespace(transformer=model, vae_scale_factor=8, _prepare_latent_ids=Flux2Pipeline._prepare_latent_ids, _pack_latents=Flux2Pipeline._pack_latents)
    height, width = 8 * LATENT[0], 8 * LATENT[1]
    noise = adapter.noise(pipe, height, width, seed=7, dtype=torch.float32)
    drawn, ids = Flux2Pipeline.prepare_latents(pipe, 1, CONFIG["in_channels"] // 4, height, width, torch.float32, "cpu", torch.Generator().manual_seed(7))
    packed, _ = Flux2Pipeline.prepare_latents(pipe, 1, CONFIG["in_channels"] // 4, height, width, torch.float32, "cpu", None, latents=noise)
    assert torch.equal(drawn, packed)
    example = adapter.transformer_inputs(model, 1, LATENT, TEXT)
    assert drawn.shape == example["hidden_states"].shape and torch.equal(ids, example["img_ids"])
    assert torch.equal(Flux2Pipeline._prepare_text_ids(example["encoder_hidden_states"]), example["txt_ids"])
    assert adapter.runs_cfg_batch(4.0) is False and adapter.guidance_kwargs(pipe, 4.0, 2) == {"guidance_scale": 4.0}


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["flux2-dev", "klein-no-guidance-embed"])
def test_runtime_module_takes_the_diffusers_call(adapter, guidance_embeds):
    torch.manual_seed(0)
    model = diffusers.Flux2Transformer2DModel(**{**CONFIG, "guidance_embeds": guidance_embeds}).eval()
    wrapper = adapter.transformer_for_onnx(model)
    assert ("guidance" in wrapper.input_names) is guidance_embeds
    runner = lambda feeds: {"sample": wrapper(*[feeds[n] for n in wrapper.input_names])}  # noqa: E731
    rt = Flux2TransformerRuntime(runner, model.config, torch.float32, "cpu")
    x = adapter.transformer_inputs(model, 2, LATENT, TEXT, seed=3)
    assert list(x) == list(wrapper.input_names)
    x.setdefault("guidance", None)  # Flux2KleinPipeline passes guidance=None
    with torch.no_grad():
        ref = model(**x, return_dict=False)[0]
        out = rt(**x, joint_attention_kwargs=None, return_dict=False)[0]
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------ stage 2 cut
def test_structured_cut_equals_masked_model(adapter):
    from export.surgery import apply_plan, block_shapes, check_model, mask_like_plan, structured_plan

    dense = tiny_flux2()
    plan = structured_plan(dense, 0.3, generator=torch.Generator().manual_seed(5))
    masked = mask_like_plan(copy.deepcopy(dense), plan)
    compact = apply_plan(copy.deepcopy(masked), plan, require_masked=True)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in masked.parameters())
    check_model(compact)
    for bp, shape in zip(plan.blocks, block_shapes(compact)):
        assert shape.sizes == {name: len(bp.keep[name]) for name in bp.sizes}
        assert all(len(bp.keep[n]) < bp.sizes[n] for n in bp.sizes)
    attn = compact.single_transformer_blocks[0].attn
    kept_heads, kept_mlp = len(plan.blocks[1].keep["attn"]), len(plan.blocks[1].keep["mlp"])
    assert (attn.heads, attn.inner_dim, attn.mlp_hidden_dim) == (kept_heads, kept_heads * HEAD_DIM, kept_mlp)
    assert attn.to_qkv_mlp_proj.weight.shape == (3 * kept_heads * HEAD_DIM + 2 * kept_mlp, DIM)
    assert attn.to_qkv_mlp_proj._tp_packed_col_blocks == [kept_heads * HEAD_DIM] * 3 + [kept_mlp] * 2
    ff = compact.transformer_blocks[0].ff
    assert ff.linear_in.out_features == 2 * ff.linear_out.in_features == 2 * len(plan.blocks[0].keep["ff"])
    for batch, seed in ((1, 1), (2, 2)):
        assert rel_err(run(adapter, compact, batch, seed), run(adapter, masked, batch, seed)) <= TORCH_PATHS_REL  # measured <= 7e-8
    # the plan removed heads and neurons that mattered (so the equality above is not vacuous)
    assert rel_err(run(adapter, dense), run(adapter, masked)) > 1e-3  # the plan removed something that mattered (measured 1.3e-2)


def test_stale_single_block_bookkeeping_is_caught(adapter):
    """diffusers splits the fused projection by the *ratio* of inner_dim to mlp_hidden_dim: a stale value
    moves the q/k/v | MLP boundary silently. check_model must refuse it."""
    from export.surgery import apply_plan, check_model, structured_plan

    compact = apply_plan(tiny_flux2(), structured_plan(tiny_flux2(), 0.5))
    ref = run(adapter, compact)
    attn = compact.single_transformer_blocks[0].attn
    kept = attn.mlp_hidden_dim
    attn.mlp_hidden_dim = MLP  # the dense width
    with pytest.raises(AssertionError, match="single_transformer_blocks.0"):
        check_model(compact)
    with pytest.raises(RuntimeError):  # here the moved boundary breaks the head reshape; it need not always
        run(adapter, compact)
    attn.mlp_hidden_dim = kept
    check_model(compact)
    assert torch.equal(run(adapter, compact), ref)


# ------------------------------------------------------------------------------------------------ stage 1
def test_stage1_two_four(stage1, adapter):
    dense, pruned, plan = stage1("2:4")
    units = [n for pkg in plan.packages for n in pkg]
    expected = {n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert set(units) == expected and len(units) == 12 + 2 * 2  # every linear of every block, once
    for name in units:
        w = get_module(pruned, name).weight.detach().numpy()  # (out, K)
        assert check_nm(w, 1, 2, 4).ok, name
        assert plan.layers[name]["density"] == pytest.approx(0.5, abs=1e-3)
    assert all(not bp.keep for bp in plan.blocks)
    assert 0 < rel_err(run(adapter, pruned), run(adapter, dense)) < 1.0


def test_stage1_unstructured(stage1):
    _, _, plan = stage1("unstructured:0.5")
    assert len(plan.layers) == 16
    for name, info in plan.layers.items():
        assert info["density"] == pytest.approx(0.5, abs=0.02), name


def test_stage1_structured_cuts_exactly(stage1, adapter):
    from export.surgery import apply_plan, block_shapes, check_masked

    dense, masked, plan = stage1("structured:0.3")
    # only the consuming layers were solved: attention outputs and the FFN/MLP down projections
    assert set(plan.layers) == {
        "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.ff.linear_out", "transformer_blocks.0.ff_context.linear_out",
        "single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.1.attn.to_out",
    }  # fmt: skip
    for bp in plan.blocks:
        assert set(bp.keep) == set(bp.sizes)
        for name, size in bp.sizes.items():
            assert len(bp.keep[name]) == size - round(0.3 * size)
    check_masked(masked, plan)  # the single blocks' head columns stayed zero through the MLP solve
    compact = apply_plan(copy.deepcopy(masked), plan, require_masked=True)
    assert [s.sizes for s in block_shapes(compact)] == [{n: len(k) for n, k in bp.keep.items()} for bp in plan.blocks]
    for batch, seed in ((1, 1), (2, 2)):
        assert rel_err(run(adapter, compact, batch, seed), run(adapter, masked, batch, seed)) <= TORCH_PATHS_REL  # measured <= 2e-7


# ------------------------------------------------------------------------------------------------ checkpoint, ONNX
@pytest.fixture(scope="module")
def compact_from_stage1(stage1):
    from export.surgery import apply_plan

    _, masked, plan = stage1("structured:0.3")
    return apply_plan(copy.deepcopy(masked), plan, require_masked=True), plan


def test_compact_checkpoint_round_trip(compact_from_stage1, adapter, tmp_path):
    from export.checkpoint import load_compact, save_compact
    from export.surgery import block_shapes

    compact, plan = compact_from_stage1
    save_compact(compact, tmp_path / "compact", plan)
    loaded, loaded_plan = load_compact(tmp_path / "compact")
    assert type(loaded).__name__ == "Flux2Transformer2DModel" and loaded_plan.to_dict() == plan.to_dict()
    assert block_shapes(loaded) == block_shapes(compact)
    for (_, a), (_, b) in zip(adapter.blocks(loaded), adapter.blocks(compact)):  # bookkeeping rebuilt by cut_to_shapes
        assert (a.attn.heads, a.attn.inner_dim, getattr(a.attn, "mlp_hidden_dim", None)) == (b.attn.heads, b.attn.inner_dim, getattr(b.attn, "mlp_hidden_dim", None))
    assert torch.equal(run(adapter, loaded, 2, 4), run(adapter, compact, 2, 4))


def test_onnx_parity_of_the_compact_model(compact_from_stage1, tmp_path):
    from tests.export_helpers import export_and_check, family_component

    compact, _ = compact_from_stage1
    res = export_and_check(family_component(compact, "transformer"), compact, tmp_path / "transformer.onnx", latent_hw=LATENT, seq_len=TEXT, parity_batches=(1, 2))
    assert res["parity"]["ok"], res["parity"]
    assert res["inputs"]["img_ids"] == {"dtype": "int64", "shape": ["batch", 16, 4]}
    assert res["inputs"]["timestep"]["dtype"] == res["inputs"]["guidance"]["dtype"] == "float32"


def test_onnx_of_the_two_four_model_keeps_the_pattern(stage1, adapter, tmp_path):
    import onnx

    from export.sparsity_check import check_onnx_sparsity
    from export.transformer_checks import missing_linear_weights
    from tests.export_helpers import export_and_check, family_component

    _, pruned, plan = stage1("2:4")
    path = tmp_path / "transformer.onnx"
    res = export_and_check(family_component(pruned, "transformer"), pruned, path, latent_hw=LATENT, seq_len=TEXT, parity_batches=(2,))
    assert res["parity"]["ok"], res["parity"]
    assert missing_linear_weights(onnx.load(str(path), load_external_data=False), pruned) == []
    shapes = adapter.transformer_input_shapes(pruned, 2, LATENT, TEXT)
    report = check_onnx_sparsity(path, (2, 4), input_shapes=shapes, expected_layers=sorted(plan.layers))
    assert report.ok, (report.missing_layers, report.failed_layers)
    assert len(report.expected_layers) == len(plan.layers) == 16
