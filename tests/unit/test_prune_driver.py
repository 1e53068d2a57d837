"""The group-wise OBS-Diff driver on the real tiny-sd3 diffusers pipeline: plans, exact patterns,
structured bookkeeping, resume after interruption, CLI errors; with --weight-bits, the integer weights (exactly
codes x scales, kept through resume and carried through the cut)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from common.errors import UserError
from obsdiff.hessian import HessianCollector
from export.int_weights import attach, int_layers, layer_codes
from export.surgery import apply_plan
from obsdiff.packages import PARTIAL_DIR, QUANT_FILE, build_units, prune, split_packages
from obsdiff.plan import PrunePlan
from obsdiff.weight_quant import WeightQuant, dequantize
from tests.factories import tiny_sd3_transformer, tiny_transformer_inputs
from tests.prune_helpers import digit_prompts, load_tiny_pipeline, require_tiny_sd3, single_thread, small_config


# -- units, packages, hooks (factory models, no pipeline) -------------------------------------------
def test_units_follow_the_block_layout():
    model = tiny_sd3_transformer(num_layers=3, dual_attention_layers=(0,))
    units = build_units(model)
    kinds = [(u.block, u.kind) for u in units]
    assert kinds[:6] == [(0, k) for k in ("attn_in", "attn_out", "attn2_in", "attn2_out", "ff_in", "ff_out")]
    assert (1, "attn2_in") not in kinds
    by = {(u.block, u.kind): u.layers for u in units}
    assert by[(0, "attn_in")] == tuple(f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"))
    # the last block is context_pre_only: no to_add_out, no ff_context
    assert by[(2, "attn_out")] == ("transformer_blocks.2.attn.to_out.0",)
    assert by[(2, "ff_out")] == ("transformer_blocks.2.ff.net.2",)
    pruned = {n for u in units for n in u.layers}
    assert not any("norm" in n or "proj_out" in n or "embed" in n for n in pruned)

    structured = build_units(model, structured=True)
    assert {u.kind for u in structured} == {"attn_out", "attn2_out", "ff_out"}
    ranged = build_units(model, first_block=1, last_block=1, skip=["*.attn.add_*"])
    assert {u.block for u in ranged} == {1}
    assert not any(".attn.add_" in n for u in ranged for n in u.layers)
    # a structured head unit loses both branches or neither
    assert not [u for u in build_units(model, structured=True, skip=["*.to_add_out"]) if u.kind == "attn_out" and u.block < 2]
    with pytest.raises(UserError):
        build_units(model, first_block=2, last_block=5)


def test_packages_are_contiguous_and_balanced():
    units = build_units(tiny_sd3_transformer(num_layers=3))
    packages = split_packages(units, 4)
    assert [u for p in packages for u in p] == units
    sizes = [len(p) for p in packages]
    assert max(sizes) - min(sizes) <= 1 and len(packages) == 4
    assert len(split_packages(units[:2], 4)) == 2
    with pytest.raises(UserError):
        split_packages(units, 0)


def test_collector_accumulates_weighted_hessians_and_checks_sharing():
    torch.manual_seed(0)
    q, k, other = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)
    x1, x2 = torch.randn(2, 5, 8), torch.randn(3, 8)
    with HessianCollector({"q": q, "k": k}, share=[["q", "k"]]) as col:
        col.weight = 1.2
        q(x1), k(x1)
        col.weight = 0.8
        q(x2), k(x2)
    a, b = x1.reshape(-1, 8), x2
    expected = (1.2 * a.T @ a + 0.8 * b.T @ b) / (1.2 * 10 + 0.8 * 3)
    # float32 sums of 13 tokens in other orders: sum_rtol(13) = 1.4e-6 of the terms at worst (measured 2.4e-7)
    assert torch.allclose(col.hessian("q"), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(col.hessian("k"), col.hessian("q"))
    assert len(col.tensors()) == 2  # one shared accumulator (sum, count)
    with HessianCollector({"q": q, "other": other}, share=[["q", "other"]]):
        q(x1)
        with pytest.raises(RuntimeError, match="does not share"):
            other(x2)
    q(x1)  # hooks are gone after the context


# -- the real pipeline --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    require_tiny_sd3()
    with single_thread():
        pipe = load_tiny_pipeline()
    dense = copy.deepcopy(pipe.transformer.state_dict())
    return pipe, dense


def _run(tiny, config, out, prompts=None, **kw) -> PrunePlan:
    pipe, dense = tiny
    pipe.transformer.load_state_dict(dense)
    with single_thread():
        return prune(pipe, "tiny-sd3", prompts or digit_prompts(config.calibration.samples), config, out, progress=False, **kw)


def _load(out):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(str(out / "transformer")).eval()


@pytest.fixture(scope="module")
def reference_24(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref24")
    plan = _run(tiny, small_config("2:4"), out)
    return out, plan


def test_nm_end_to_end_writes_an_exact_plan(tiny, reference_24):
    out, plan = reference_24
    _, dense = tiny
    assert PrunePlan.load(out / "plan.json").to_dict() == plan.to_dict()
    assert plan.complete and plan.done_packages == 3 and not (out / PARTIAL_DIR).exists()
    assert all(not b.keep for b in plan.blocks)
    model = _load(out)
    state = model.state_dict()
    pruned = {n for p in plan.packages for n in p}
    assert len(pruned) == 4 * 6 + 3 * (3 * 2 + 1)  # q/k/v x2 per block; out, ff in, ff out x2 (x1 in the last block)
    for name in pruned:
        w = state[f"{name}.weight"]
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(dim=2)
        assert bool((groups == 2).all()), f"{name} is not exactly 2:4"
        assert plan.layers[name]["density"] == 0.5
        assert not torch.equal(w, dense[f"{name}.weight"])
    for key, value in state.items():
        if key.rsplit(".", 1)[0] not in pruned or key.endswith(".bias"):
            assert torch.equal(value, dense[key]), f"{key} must stay dense and unchanged"
    assert plan.calibration["steps"] == 3 and plan.calibration["weighting"] == "log" and "proj_out" in plan.calibration["notes"]


def test_structured_zeroes_exactly_the_removed_heads_and_neurons(tiny, tmp_path):
    _, dense = tiny
    plan = _run(tiny, small_config("structured:0.3", groups=2, max_group_iters=64), tmp_path)
    model = _load(tmp_path)
    hd = plan.head_dim
    for b, block in zip(plan.blocks, model.transformer_blocks):
        assert len(b.keep["attn"]) == 4 - 1  # round(0.3 * 4) = 1 head
        assert len(b.keep["ff"]) == 1024 - 307
        removed_heads = sorted(set(range(4)) - set(b.keep["attn"]))
        outs = [block.attn.to_out[0]] + ([block.attn.to_add_out] if block.attn.to_add_out is not None else [])
        for layer in outs:
            cols = layer.weight.reshape(layer.weight.shape[0], 4, hd)
            assert bool((cols[:, removed_heads] == 0).all()) and bool((cols[:, b.keep["attn"]] != 0).any(dim=(0, 2)).all())
        ffs = [(block.ff, b.keep["ff"])] + ([(block.ff_context, b.keep["ff_context"])] if block.ff_context is not None else [(None, b.keep.get("ff_context"))])
        for ff, keep in ffs:
            if ff is None:
                assert keep is None  # last block has no context FFN
                continue
            zero_cols = (ff.net[2].weight == 0).all(dim=0).nonzero().flatten().tolist()
            assert zero_cols == sorted(set(range(1024)) - set(keep))
    # only the output projections changed
    changed = {k.rsplit(".", 1)[0] for k, v in model.state_dict().items() if not torch.equal(v, dense[k])}
    assert changed <= {n for p in plan.packages for n in p}
    assert all(n.endswith(("to_out.0", "to_add_out", "net.2")) for n in changed)

    # Cutting the matching rows of q/k/v and of the FFN input changes nothing: what stage 2 relies on.
    cut = copy.deepcopy(model)
    with torch.no_grad():
        for b, block in zip(plan.blocks, cut.transformer_blocks):
            rows = torch.ones(4 * hd, dtype=torch.bool)
            for h in set(range(4)) - set(b.keep["attn"]):
                rows[h * hd : (h + 1) * hd] = False
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                lin = getattr(block.attn, name)
                lin.weight[~rows] = 0
                lin.bias[~rows] = 0
            for ff, keep in ((block.ff, b.keep["ff"]), (block.ff_context, b.keep.get("ff_context"))):
                if ff is not None:
                    drop = torch.ones(1024, dtype=torch.bool)
                    drop[keep] = False
                    ff.net[0].proj.weight[drop] = 0
                    ff.net[0].proj.bias[drop] = 0
    inputs = tiny_transformer_inputs(model, batch=2, text_len=20)
    with torch.no_grad():
        ref = model(*inputs[:3], timestep=inputs[3]).sample
        got = cut(*inputs[:3], timestep=inputs[3]).sample
    # the zeroed rows only feed columns that are zero already: the same sums plus exact zeros (measured equal)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny, reference_24, tmp_path):
    ref_out, ref_plan = reference_24
    config = small_config("2:4")
    pipe, _ = tiny

    def stop_after_first(k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny, config, tmp_path, on_package_done=stop_after_first)
    assert PrunePlan.load(tmp_path / "plan.json").done_packages == 1
    assert (tmp_path / PARTIAL_DIR).is_dir() and not (tmp_path / "transformer").exists()

    calls = {"n": 0}

    def die_mid_calibration(*_):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    handle = pipe.transformer.register_forward_pre_hook(die_mid_calibration)
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(tiny, config, tmp_path)
    finally:
        handle.remove()
    assert PrunePlan.load(tmp_path / "plan.json").done_packages == 1

    plan = _run(tiny, config, tmp_path)
    assert plan.to_dict() == ref_plan.to_dict()
    got, ref = _load(tmp_path).state_dict(), _load(ref_out).state_dict()
    for key in ref:  # exact: one computation run twice on this machine (the resume recomputes what was lost)
        assert torch.equal(got[key], ref[key]), key
    assert not (tmp_path / PARTIAL_DIR).exists()

    # complete with the same settings: nothing to do, nothing rewritten
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    _run(tiny, config, tmp_path)
    assert weights.stat().st_mtime_ns == stamp
    # other settings in the same directory: a one-line user error
    with pytest.raises(UserError, match="other settings") as err:
        _run(tiny, small_config("4:8"), tmp_path)
    assert "\n" not in str(err.value)


# -- --weight-bits: integer weights solved with the pattern ------------------------------------------------------------
W4 = WeightQuant(4, 64)


def _int_tensors(out):
    from safetensors.torch import load_file

    return load_file(str(out / "transformer" / QUANT_FILE))


@pytest.fixture(scope="module")
def w4_24(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4")
    return out, _run(tiny, small_config("2:4", quant=W4), out)


@pytest.mark.parametrize("pattern", ["dense", "2:4"])
def test_weights_are_exactly_codes_times_scales_and_keep_the_pattern(tiny, w4_24, tmp_path, pattern):
    if pattern == "2:4":
        tmp_path, plan = w4_24
    else:
        plan = _run(tiny, small_config(pattern, groups=1, samples=1, quant=W4, quant_modulation=True), tmp_path)
        modulation = [n for n, e in plan.layers.items() if not e.get("pruned", True)]
        assert len(modulation) == 4 + 4 and all(n.endswith(("norm1.linear", "norm1_context.linear")) for n in modulation)
        assert set(plan.pruned_layers) == set(plan.layers) - set(modulation)
    assert plan.weight_quant["bits"] == 4 and plan.weight_quant["group_size"] == 64 and plan.weight_quant["file"] == QUANT_FILE
    model, tensors = _load(tmp_path), _int_tensors(tmp_path)
    layers = [n for p in plan.packages for n in p]
    assert len(plan.pruned_layers) == 4 * 6 + 3 * 7 and all(plan.layers[n]["weight_bits"] == 4 for n in layers)
    state = model.state_dict()
    for name in layers:
        codes, scales = tensors[f"{name}.codes"], tensors[f"{name}.scales"]
        w = state[f"{name}.weight"]
        assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (w.shape[0], -(-w.shape[1] // 64))
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7
        assert torch.equal(dequantize(codes, scales, 64), w), name  # exact: stage 2 never re-quantizes
        if pattern == "2:4":
            assert int((w != 0).reshape(w.shape[0], -1, 4).sum(dim=2).max()) <= 2, name
    _, dense = tiny
    for key, value in state.items():  # everything else untouched
        if key.rsplit(".", 1)[0] not in layers or key.endswith(".bias"):
            assert torch.equal(value, dense[key]), key


def test_structured_quantizes_every_layer_on_its_kept_columns_and_the_cut_carries_them(tiny, w4_24, tmp_path):
    plan = _run(tiny, small_config("structured:0.3", groups=2, max_group_iters=64, quant=W4), tmp_path)
    tensors = _int_tensors(tmp_path)
    assert any(k.endswith(".columns") for k in tensors)
    for b in plan.blocks:
        assert len(b.keep["attn"]) == 3 and len(b.keep["ff"]) == 1024 - 307
    model = _load(tmp_path)
    assert attach(model, plan, tmp_path / "transformer") == len([n for p in plan.packages for n in p])
    compact = apply_plan(model, plan)
    layers = int_layers(compact)
    assert len(layers) == 4 * 6 + 3 * 7
    for name, layer in layers.items():
        codes, scales, wq = layer_codes(layer)  # every column kept after the cut, weight on its grid
        assert codes.shape == layer.weight.shape and scales.shape == (layer.weight.shape[0], -(-layer.weight.shape[1] // 64))
        if f"{name}.columns" in tensors:  # an output projection (rows not cut): the stored compact codes, as they are
            assert torch.equal(codes, tensors[f"{name}.codes"]) and torch.equal(scales, tensors[f"{name}.scales"].float()), name
    # another prune's integer weights next to these float weights: one line
    with pytest.raises(UserError, match="not the integer weights"):
        attach(_load(tmp_path), plan, w4_24[0] / "transformer")


def test_resume_keeps_the_integer_weights(tiny, w4_24, tmp_path):
    config = small_config("2:4", quant=W4)
    ref_out, ref = w4_24

    def stop_after_first(k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny, config, tmp_path / "run", on_package_done=stop_after_first)
    assert (tmp_path / "run" / PARTIAL_DIR).is_dir()
    plan = _run(tiny, config, tmp_path / "run")
    assert plan.to_dict() == ref.to_dict()
    got, want = _int_tensors(tmp_path / "run"), _int_tensors(ref_out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # one computation, run twice here
    with pytest.raises(UserError, match="weight_quant"):  # other grid in the same directory: one line naming it
        _run(tiny, small_config("2:4", quant=WeightQuant(4, 128)), tmp_path / "run")


@pytest.mark.parametrize("argv, match", [
    (["--group-size", "64"], "--group-size needs --weight-bits"),
    (["--weight-bits", "4", "--method", "magnitude"], "--quant-method rtn"),
])
def test_cli_rejects_bad_weight_quant_in_one_line(capsys, tmp_path, argv, match):
    from pipeline.__main__ import main

    assert main(["prune", *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err.splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_cli_rejects_bad_input_in_one_line(capsys, tmp_path):
    from pipeline.__main__ import main

    assert main(["prune", "--sparsity", "3:5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "2:4, 4:8" in err and "\n" not in err
    if not torch.cuda.is_available():
        assert main(["prune", "--offload", "model", "--device", "cpu", "--out", str(tmp_path / "y")]) == 2
        assert "CUDA" in capsys.readouterr().err
    assert main(["prune", "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "z")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


# -- calibration follows the model's deployed sampler -----------------------------------------------------
@pytest.mark.parametrize("model, steps, guidance", [("tiny-sd3", 20, 4.0), ("sd3-medium", 28, 7.0), ("sd3.5-large-turbo", 4, 0.0)])
def test_calibration_defaults_come_from_the_registry(model, steps, guidance):
    from common.cli import ArgumentParser
    from pipeline import cmd_prune
    from families.registry import resolve_model

    parser = ArgumentParser(prog="prune")
    cmd_prune.add_parser(parser.add_subparsers(dest="command"))
    spec = resolve_model(model)
    config, _ = cmd_prune.build_config(parser.parse_args(["prune", "--model", model]), spec)
    assert (config.calibration.steps, config.calibration.guidance) == (steps, guidance)
    assert (config.calibration.height, config.calibration.width) == (spec.height, spec.width)
    config, _ = cmd_prune.build_config(parser.parse_args(["prune", "--model", model, "--steps", "7", "--guidance", "2.5"]), spec)
    assert (config.calibration.steps, config.calibration.guidance) == (7, 2.5)


def test_few_step_model_is_calibrated_without_the_cfg_batch():
    """guidance <= 1 (sd3.5-large-turbo's 0.0): the pipeline runs one branch, so the hooks see batch 1, not 2."""
    from obsdiff.packages import CalibrationConfig, run_calibration

    require_tiny_sd3()
    with single_thread():
        pipe = load_tiny_pipeline()
        name = "transformer_blocks.0.attn.to_q"
        layer = dict(pipe.transformer.named_modules())[name]
        batches = []
        handle = layer.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
        collector = HessianCollector({name: layer})
        try:
            for guidance in (0.0, 4.0):
                calib = CalibrationConfig(samples=1, steps=2, guidance=guidance, height=32, width=32, batch_size=1, max_sequence_length=10)
                with torch.no_grad():
                    run_calibration(pipe, collector, [(0, "a handwritten digit 1")], calib)
        finally:
            handle.remove()
    assert batches == [1, 1, 2, 2]


def test_memory_estimate_counts_weights_shared_hessians_and_solver():
    from obsdiff.packages import memory_estimate

    model = tiny_sd3_transformer(num_layers=2, num_heads=4, head_dim=16)  # hidden 64, FFN 256
    units = build_units(model)
    est = memory_estimate(model, split_packages(units, 1), weight_bytes_per_param=4)
    assert est["weights"] == 4 * sum(p.numel() for p in model.parameters())
    # block 0: q/k/v and add_q/k/v share 2 sums; to_out, to_add_out, ff.net.0, ff_context.net.0 (64 in each);
    # ff.net.2, ff_context.net.2 (256 in); block 1 (context_pre_only) has no to_add_out / ff_context
    per_block = [2 * 64**2 + 4 * 64**2 + 2 * 256**2, 2 * 64**2 + 2 * 64**2 + 256**2]
    assert est["hessians"] == 8 * sum(per_block)
    assert est["solver"] == (4 * 256 * 256 + 3 * 64 * 256) * 4
    assert memory_estimate(model, split_packages(units, 4), weight_bytes_per_param=4)["hessians"] < est["hessians"]


def test_a_gpu_too_small_for_pruning_is_one_line_before_calibration(monkeypatch):
    """The device check runs before any calibration; a fake CUDA device with little free memory stands in
    for a GPU (the check only reads torch.cuda.mem_get_info)."""
    from obsdiff.packages import PruneConfig
    from obsdiff.patterns import parse_sparsity
    from obsdiff.stage import check_device_memory
    from families.registry import resolve_model

    pipe = load_tiny_pipeline()
    spec = resolve_model("tiny-sd3")
    config = PruneConfig(sparsity=parse_sparsity("2:4"))
    cpu = check_device_memory(pipe, spec, config, torch.device("cpu"), "none")
    assert cpu["on_device"] >= cpu["pipeline_weights"] + cpu["hessians"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (cpu["hessians"] + cpu["solver"] + 1, 80 * 2**30))
    with pytest.raises(UserError, match=r"needs about .* GiB on cuda.*use --offload sequential") as e:
        check_device_memory(pipe, spec, config, torch.device("cuda"), "none")
    assert "\n" not in str(e.value)
    check_device_memory(pipe, spec, config, torch.device("cuda"), "sequential")  # fits: no error
