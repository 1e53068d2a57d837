"""The family seam: SD3 results unchanged by it, old plans load, Flux.1 through stages 1 and 2."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import tokenize
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from export.surgery import apply_plan, block_shapes, check_masked, mask_like_plan, structured_plan, validate_plan
from families import ADAPTERS, adapter_for
from obsdiff.plan import PrunePlan
from tests.export_helpers import rel_err
from tests.factories import tiny_flux_pipeline, tiny_flux_transformer
from tests.prune_helpers import require_tiny_sd3
from tests.tolerances import NEURON_SWAPS, PRUNE_FLIPPED_REL_L2, PRUNE_ROUNDING_REL_L2, TORCH_PATHS_REL, fingerprint_tolerances

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def _flux_out(model, inputs):
    with torch.no_grad():
        return adapter_for(model).transformer_for_onnx(model)(*inputs.values())


# ------------------------------------------------------------------------------------------------ SD3


def test_version_1_plans_load_and_apply():
    """A plan written before the family adapters (tiny-sd3, structured 0.3) loads as version 2 and still
    describes the embedded model."""
    require_tiny_sd3()
    from diffusers import SD3Transformer2DModel

    old = json.loads((DATA / "plan_v1_tiny_sd3_structured.json").read_text())
    plan = PrunePlan.from_dict(old)
    assert old["version"] == 1 and plan.version == 2 and plan.family == "sd3"
    for v1, bp in zip(old["blocks"], plan.blocks):
        assert bp.keep.get("attn") == v1["keep_heads"] and bp.keep.get("ff") == v1["keep_ff"]
        assert bp.keep.get("ff_context") == v1["keep_ff_context"] and bp.sizes == {"attn": v1["num_heads"], "ff": v1["ff_dim"]}
    model = SD3Transformer2DModel.from_pretrained(ROOT / "models/tiny-sd3/transformer")
    validate_plan(model, plan)
    masked = mask_like_plan(model, plan)
    compact = apply_plan(copy.deepcopy(masked), plan, require_masked=True)
    assert [s.sizes["attn"] for s in block_shapes(compact)] == [len(b.keep["attn"]) for b in plan.blocks]


@pytest.mark.parametrize("run", ["2_4-obs-diff", "structured_0.3-obs-diff", "unstructured_0.5-wanda"])
def test_tiny_sd3_prune_results_are_unchanged_by_the_seam(tmp_path, run):
    """Pruning tiny-sd3 gives what the code before the family adapters gave (tests/data reference, made by
    commit b817597 with the same settings, bit-identical on the machine that made it): the same layers and densities,
    kept heads, the same bytes for every tensor the solver leaves alone, and pruned weights whose sums and sums of
    squares lie within another CPU's rounding of the reference's (tests/tolerances.py). Masks and kept neurons are
    decided by comparing floats: where a near-tie flipped on this CPU (every 2:4 run off the reference machine), the
    weights are compared as two draws of the flipped prune (PRUNE_FLIPPED_REL_L2), which still catches a changed
    solver."""
    require_tiny_sd3()
    from pipeline.__main__ import main
    from safetensors.torch import load_file

    ref = json.loads((DATA / "tiny_sd3_prune_reference.json").read_text())["runs"][run]
    sparsity, method = run.rsplit("-", 1) if run.endswith("wanda") else run.split("-", 1)
    sparsity = sparsity.replace("_", ":")
    out = tmp_path / "p"
    assert main(["prune", "--model", "tiny-sd3", "--sparsity", sparsity, "--method", method, "--samples", "4", "--steps", "4",
                 "--groups", "2", "--out", str(out), "--no-progress"]) == 0
    plan = PrunePlan.load(out / "plan.json")
    assert plan.layers == ref["layers"]  # layers, shapes and densities: counts
    for keep, ref_keep in zip([b.keep for b in plan.blocks], ref["keep"], strict=True):
        assert set(keep) == set(ref_keep)
        for group, kept in keep.items():
            if group.startswith("attn"):  # heads: decided with a margin (tests/tolerances.py NEURON_SWAPS)
                assert kept == ref_keep[group], group
            else:  # FFN neurons: near-ties may flip
                assert len(kept) == len(ref_keep[group]) and len(set(kept) - set(ref_keep[group])) <= NEURON_SWAPS * len(kept), group
    state = {}
    for f in sorted((out / "transformer").glob("*.safetensors")):
        state.update(load_file(str(f)))
    assert sorted(state) == sorted(ref["tensors"])
    pruned = {f"{layer}.weight" for layer in plan.layers}
    for name, t in state.items():
        if name not in pruned:  # copied from the checkpoint, not computed: the same bytes on any machine
            assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == ref["tensors"][name]["sha256"], name
    alike = [b.keep for b in plan.blocks] == ref["keep"] and all(
        hashlib.sha256((state[name] == 0).numpy().tobytes()).hexdigest() == ref["tensors"][name]["zeros_sha256"] for name in pruned)
    # every decision as in the reference: the weights are rounding apart; otherwise two draws of the flipped prune
    rel_l2 = PRUNE_ROUNDING_REL_L2 if alike else PRUNE_FLIPPED_REL_L2
    if method == "wanda":  # wanda only zeroes: every kept weight is the checkpoint's, bit for bit
        dense = load_file(str(ROOT / "models/tiny-sd3/transformer/diffusion_pytorch_model.safetensors"))
        for name in pruned:
            kept = state[name] != 0
            assert torch.equal(state[name][kept], dense[name].to(state[name].dtype)[kept]), name
    for name in sorted(pruned):
        r, d = ref["tensors"][name], state[name].double()
        tol_sum, tol_sumsq = fingerprint_tolerances(d.numel(), r["sumsq"], rel_l2)
        assert abs(float(d.sum()) - r["sum"]) <= tol_sum, (name, alike, float(d.sum()) - r["sum"], tol_sum)
        assert abs(float((d * d).sum()) - r["sumsq"]) <= tol_sumsq, (name, alike, float((d * d).sum()) - r["sumsq"], tol_sumsq)


# ------------------------------------------------------------------------------------------------ Flux


@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["schnell-like", "dev-like"])
def test_flux_heads_and_neurons_cut_exactly(guidance_embeds):
    """Double blocks lose heads and FFN neurons as SD3's; single blocks lose heads (q/k/v rows + the
    attention columns of proj_out) and MLP neurons (proj_mlp rows + the MLP columns of proj_out)."""
    model = tiny_flux_transformer(guidance_embeds=guidance_embeds)
    plan = structured_plan(model, 0.5, generator=torch.Generator().manual_seed(3))
    masked = mask_like_plan(copy.deepcopy(model), plan)
    compact = apply_plan(copy.deepcopy(masked), plan, require_masked=True)
    single = compact.single_transformer_blocks[0]
    kept_heads, kept_mlp = len(plan.blocks[2].keep["attn"]), len(plan.blocks[2].keep["mlp"])
    assert single.attn.heads == kept_heads and single.mlp_hidden_dim == single.proj_mlp.out_features == kept_mlp
    assert single.proj_out.in_features == kept_heads * 16 + kept_mlp
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
    adapter = adapter_for(model)
    for batch, seed in ((1, 1), (3, 2)):
        inputs = adapter.transformer_inputs(model, batch, (8, 8), 5, seed=seed)
        assert rel_err(_flux_out(compact, inputs), _flux_out(masked, inputs)) <= TORCH_PATHS_REL  # measured <= 2e-7


def test_flux_stale_mlp_split_is_caught():
    """The adapter's invariants catch a single block whose proj_out no longer matches its parts."""
    model = tiny_flux_transformer()
    plan = structured_plan(model, 0.5, groups=["mlp"])
    apply_plan(model, plan)
    model.single_transformer_blocks[1].mlp_hidden_dim += 1
    from export.surgery import check_model

    with pytest.raises(AssertionError, match="single_transformer_blocks.1"):
        check_model(model)


@pytest.fixture(scope="module")
def flux_pruned(tmp_path_factory):
    """Stage 1 on a real FluxPipeline (random tiny transformer, true CFG): structured 0.3 and 2:4."""
    require_tiny_sd3()  # the pipeline borrows tiny-sd3's VAE and text encoders
    from obsdiff.packages import CalibrationConfig, PruneConfig, prune
    from obsdiff.patterns import parse_sparsity

    out = {}
    for sp in ("structured:0.3", "2:4"):
        pipe = tiny_flux_pipeline()
        calib = CalibrationConfig(samples=2, steps=3, guidance=3.0, height=32, width=32, batch_size=2, max_sequence_length=10)
        config = PruneConfig(parse_sparsity(sp), groups=2, calibration=calib, family="flux")
        d = tmp_path_factory.mktemp(sp.replace(":", "_"))
        plan = prune(pipe, "tiny-flux-random", ["a handwritten digit 3", "a handwritten digit 7"], config, d, progress=False)
        out[sp] = (plan, pipe.transformer)
    return out


def test_flux_stage_1_structured_prunes_both_column_ranges_of_proj_out(flux_pruned):
    plan, masked = flux_pruned["structured:0.3"]
    assert plan.family == "flux" and plan.num_layers == 4
    single = plan.blocks[2]
    assert set(single.keep) == {"attn", "mlp"} and len(single.keep["attn"]) == 2 - round(0.3 * 2)
    assert len(single.keep["mlp"]) == 256 - round(0.3 * 256)
    check_masked(masked, plan)  # every removed column of both ranges is exactly zero
    compact = apply_plan(copy.deepcopy(masked), plan, require_masked=True)
    inputs = adapter_for(masked).transformer_inputs(masked, 2, (8, 8), 10, seed=4)
    assert rel_err(_flux_out(compact, inputs), _flux_out(masked, inputs)) <= TORCH_PATHS_REL  # measured <= 1.4e-7


def test_flux_stage_1_2_4_prunes_every_block_linear(flux_pruned):
    plan, model = flux_pruned["2:4"]
    names = set(plan.layers)
    assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.attn.to_q",
            "transformer_blocks.0.attn.to_add_out", "transformer_blocks.1.ff_context.net.2"} <= names
    assert not any(n.startswith(("x_embedder", "context_embedder", "proj_out", "norm_out")) for n in names)
    for n in names:
        w = dict(model.named_modules())[n].weight
        assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()), n


def test_flux_onnx_export_has_parity_and_keeps_2_4(flux_pruned, tmp_path):
    import onnx

    from export.sparsity_check import check_onnx_sparsity
    from tests.export_helpers import export_and_check, family_component

    plan, model = flux_pruned["2:4"]
    res = export_and_check(family_component(model, "transformer"), model, tmp_path / "t.onnx", latent_hw=(8, 8), seq_len=10, parity_batches=(1, 3))
    assert res["parity"]["ok"], res["parity"]
    assert list(res["inputs"]) == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"]
    shapes = adapter_for(model).transformer_input_shapes(model, 2, (8, 8), 10)
    sp = check_onnx_sparsity(onnx.load(str(tmp_path / "t.onnx")), (2, 4), input_shapes=shapes, expected_layers=sorted(plan.layers), base_dir=tmp_path)
    assert sp.ok and not sp.missing_layers


def test_a_plan_for_another_family_is_refused():
    flux = tiny_flux_transformer()
    from tests.factories import tiny_sd3_transformer

    with pytest.raises(UserError, match="belongs to another model"):
        apply_plan(flux, structured_plan(tiny_sd3_transformer(), 0.3))


# ------------------------------------------------------------------------------------------------ seam


ARCH_NAMES = {"to_add_out", "ff_context", "proj_mlp", "add_q_proj", "add_k_proj", "add_v_proj", "to_qkv_mlp_proj",
              "JointTransformerBlock", "FluxSingleTransformerBlock", "single_transformer_blocks", "SD3Transformer2DModel",
              "FluxTransformer2DModel", "Flux2Transformer2DModel", "context_pre_only"}


def _code_names(path: Path) -> set[str]:
    """Identifiers and non-docstring string literals of ``path`` (comments and docstrings are prose)."""
    found, prev = set(), tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.NAME:
            found.add(tok.string)
        elif tok.type == tokenize.STRING and prev not in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.NL):
            found.update(w for w in ARCH_NAMES if w in tok.string)
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok.type
    return found & ARCH_NAMES


def _arch_names() -> set[str]:
    """The fixed list plus what the adapters themselves name: their transformer classes and adapter modules."""
    return ARCH_NAMES | {a.transformer_class for a in ADAPTERS.values()}


def _outside_families() -> list[Path]:
    return sorted(f for pkg in ("common", "evaluation", "obsdiff", "export", "runtime", "measure", "pipeline", "benchmarks", "scripts")
                  for f in (ROOT / pkg).rglob("*.py"))


def test_architecture_names_appear_only_in_adapters():
    names = _arch_names()
    offenders = {}
    for f in _outside_families():
        found = {n for n in _code_names(f) | (names & _all_names(f)) if n in names}
        if found:
            offenders[str(f.relative_to(ROOT))] = sorted(found)
    assert not offenders, offenders


def _all_names(path: Path) -> set[str]:
    return {tok.string for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline) if tok.type == tokenize.NAME}


def test_no_adapter_module_is_imported_outside_families():
    """Only families/ imports a specific adapter (families.sd3, families.flux, ...): the others ask the registry or
    ``families.adapter_for`` / ``families.get_adapter``."""
    import ast

    adapter_modules = {type(a).__module__ for a in ADAPTERS.values()}
    offenders = []
    for f in _outside_families():
        for node in ast.walk(ast.parse(f.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module == "families":
                mods += [f"families.{a.name}" for a in node.names]
            offenders += [f"{f.relative_to(ROOT)}:{node.lineno} imports {m}" for m in mods if m in adapter_modules]
    assert not offenders, offenders


def test_every_family_has_a_registered_adapter():
    from families.registry import MODELS

    assert {s.family for s in MODELS.values()} <= set(ADAPTERS)
