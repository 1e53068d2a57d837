"""Served shapes: parsing, a transformer exported once running at several resolutions, engine profiles
that cover them, one-line refusals outside them, and the 2:4-eligible FLOP share per shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import UserError
from families.registry import resolve_model
from families.shapes import ServedShapes, parse_batch_range, parse_resolutions, served_shapes
from tests.prune_helpers import require_tiny_sd3

RESOLUTIONS = "32x32,64x64,32x64"  # tiny-sd3: 8 px steps up to 64 px (pos_embed_max_size 8 tokens of 2x2 latents)


def test_parsing_and_checks_are_one_line():
    assert parse_resolutions("512x512, 768x1344,512") == [(512, 512), (768, 1344)]
    assert parse_batch_range("1:2:4") == (1, 2, 4) and parse_batch_range("2") == (2, 2, 2) and parse_batch_range("1:8") == (1, 1, 8)
    spec = resolve_model("tiny-sd3")
    s = served_shapes(spec, parse_resolutions(RESOLUTIONS), (1, 2, 4))
    assert s.dynamic_spatial and s.latent_min == (8, 8) and s.latent_max == (16, 16) and s.latent_opt == (8, 8)
    assert s.describe() == "32x32..64x64 px, batch 1..4"
    assert not served_shapes(spec).dynamic_spatial  # the registry's one resolution: static, as before
    for bad, match in (("32x", "HEIGHTxWIDTH"), ("", "empty"), ("abc", "HEIGHTxWIDTH")):
        with pytest.raises(UserError, match=match) as e:
            parse_resolutions(bad)
        assert "\n" not in str(e.value)
    for bad in ("0:1:2", "4:2:1", "a", "1:2:3:4"):
        with pytest.raises(UserError, match="MIN:OPT:MAX"):
            parse_batch_range(bad)
    with pytest.raises(UserError, match="position embedding covers at most 64"):
        served_shapes(spec, [(96, 96)])
    with pytest.raises(UserError, match="multiple of 8"):
        served_shapes(spec, [(36, 32)])


def test_no_batch_or_resolution_beyond_what_an_engine_indexes():
    """The largest activation of one batch item (tiny-sd3 at 32x32: the transformer's FFN hidden state, 16 image
    + 20 text tokens x 4 x 4 heads x 64) times the max batch stays within 2^31-1 elements."""
    from families.shapes import MAX_TENSOR_ELEMENTS, largest_activations

    spec = resolve_model("tiny-sd3")
    per_item, what = largest_activations(spec, served_shapes(spec))["transformer"]
    assert per_item == 36 * 1024 and "36 tokens x 1024" in what
    limit = MAX_TENSOR_ELEMENTS // per_item
    assert served_shapes(spec, None, (1, 2, limit)).batch[2] == limit  # the largest max batch that fits is accepted
    with pytest.raises(UserError, match=f"at most {limit:,}: one batch item of tiny-sd3's transformer at 32x32 px") as e:
        served_shapes(spec, None, (1, 2, limit + 1))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--resolution 16384x16384 px: too large for any engine"):  # Flux: no position-embedding bound
        served_shapes(resolve_model("tiny-flux"), [(16384, 16384)])


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    """tiny-sd3's dense transformer and VAE decoder exported once for three resolutions (dynamic height/width)."""
    require_tiny_sd3()
    from pipeline.__main__ import main

    out = tmp_path_factory.mktemp("served") / "export"
    assert main(["export", "--model", "tiny-sd3", "--out", str(out), "--components", "transformer,vae_decoder",
                 "--resolution", RESOLUTIONS, "--parity-batches", "1,2"]) == 0
    return out, json.loads((out / "export_report.json").read_text())


def test_one_export_runs_at_every_served_resolution_with_parity(dynamic_export):
    out, report = dynamic_export
    tr = report["components"]["transformer"]
    assert tr["inputs"]["hidden_states"]["shape"][2:] == ["2*tokens_h", "2*tokens_w"]  # dynamic latent height/width
    cases = tr["parity"]["per_batch"]
    assert set(cases) == {"1", "2", "1@16x16", "1@8x16"} and tr["parity"]["ok"]  # 32x32 (b 1, 2), 64x64, 32x64
    assert all(v["sample"] <= tr["parity"]["tolerance"] for v in cases.values())
    assert report["components"]["vae_decoder"]["parity"]["ok"] and "1@8x16" in report["components"]["vae_decoder"]["parity"]["per_batch"]
    # and ONNX Runtime really takes a fourth size inside the range, with the right output shape
    import numpy as np

    from export.parity import ort_session

    sess = ort_session(out / "onnx" / "transformer.onnx")
    feeds = {i.name: np.random.rand(*[1 if not isinstance(d, int) else d for d in i.shape]).astype(np.float32) for i in sess.get_inputs()}
    feeds["hidden_states"] = np.random.rand(1, 4, 12, 8).astype(np.float32)
    assert sess.run(None, feeds)[0].shape == (1, 4, 12, 8)


def test_export_report_gives_flops_share_and_bounds_per_shape(dynamic_export):
    _, report = dynamic_export
    rows = {(r["height"], r["width"]): r for r in report["transformer"]["per_shape"]}
    assert set(rows) == {(32, 32), (64, 64), (32, 64)}
    small, big = rows[(32, 32)], rows[(64, 64)]
    assert big["gemm_flops"] > small["gemm_flops"]
    # attention's activation x activation products grow quadratically with tokens: the eligible share falls
    assert big["eligible_2of4_share"] < small["eligible_2of4_share"] < 1
    for r in rows.values():
        s = r["eligible_2of4_share"]
        assert r["bound_2of4_transformer"] == pytest.approx(1 / ((1 - s) + s / 2))


def test_eligible_share_arithmetic_on_known_flops():
    """A one-block SD3 transformer whose linear FLOPs are counted by hand: 2 x tokens x in x out per layer."""
    from export.report import linear_flops, shape_table
    from obsdiff.packages import build_units
    from tests.factories import tiny_sd3_transformer

    model = tiny_sd3_transformer(num_layers=2, num_heads=2, head_dim=8, joint_attention_dim=12)  # hidden 16, FFN 64
    batch, latent, text = 2, (8, 8), 5
    img = (8 // 2) * (8 // 2)  # image tokens (patch 2)
    d, f = 16, 64
    # block 0: q,k,v,out (img) + add_q,k,v, to_add_out (text) + ff in/out (img) + ff_context in/out (text)
    # block 1 (context_pre_only): q,k,v,out (img) + add_q,k,v (text) + ff in/out (img)
    per_block0 = img * (4 * d * d + 2 * d * f) + text * (4 * d * d + 2 * d * f)
    per_block1 = img * (4 * d * d + 2 * d * f) + text * (3 * d * d)
    eligible = {n for u in build_units(model) for n in u.layers}
    gemm, per = linear_flops(model, batch, latent, text)
    assert sum(per[n] for n in eligible) == 2 * batch * (per_block0 + per_block1)
    (row,) = shape_table(model, [(32, 32)], vae_scale=4, batch=batch, text_seq_len=text, eligible=eligible)
    assert row["eligible_2of4_flops"] == 2 * batch * (per_block0 + per_block1) and row["gemm_flops"] == gemm
    assert row["eligible_2of4_share"] == pytest.approx(row["eligible_2of4_flops"] / gemm)


@pytest.fixture(scope="module")
def built(dynamic_export, tmp_path_factory):
    """TensorRT-RTX engines (no GPU needed to build) with the profile covering the served shapes, plus the
    Triton repository, and static per-resolution engines."""
    pytest.importorskip("tensorrt_rtx")
    from pipeline.__main__ import main

    out, _ = dynamic_export
    triton = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["build", "--onnx-dir", str(out / "onnx"), "--model", "tiny-sd3", "--backend", "trtrtx", "--triton", str(triton)]) == 0
    static = tmp_path_factory.mktemp("static") / "engines"
    assert main(["build", "--onnx-dir", str(out / "onnx"), "--out", str(static), "--model", "tiny-sd3", "--backend", "trtrtx",
                 "--components", "transformer", "--static-shapes"]) == 0
    return out / "engines", triton, static


def _manifest(component_dir: Path) -> dict:
    (m,) = component_dir.glob("engine_*.json")
    return json.loads(m.read_text())


def test_engine_profile_covers_the_served_shapes_and_the_manifest_records_it(built):
    engines, _, _ = built
    m = _manifest(engines / "transformer")
    assert m["profiles"][0]["hidden_states"] == [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 16, 16]]
    assert m["served"]["resolutions"] == [[32, 32], [64, 64], [32, 64]] and m["served"]["batch"] == [1, 2, 4]
    assert _manifest(engines / "vae_decoder")["profiles"][0]["latent"] == [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 16, 16]]
    assert m["model"] == "tiny-sd3" and m["model_weights"].startswith("sha256:")  # a runner told another model refuses it


def test_engines_of_another_model_are_refused_before_loading(built):
    from runtime.manifest import check_engines_model
    from runtime.pipeline_runner import check_runner_inputs

    engines, _, _ = built
    check_engines_model(engines, resolve_model("tiny-sd3"))
    with pytest.raises(UserError, match="was made for tiny-sd3 .*, not for tiny-flux .*; pass --model tiny-sd3, or build engines for tiny-flux"):
        check_engines_model(engines, resolve_model("tiny-flux"))
    with pytest.raises(UserError, match="ONNX directory .*export_report.json\\) was made for tiny-sd3"):
        check_runner_inputs(resolve_model("tiny-flux"), onnx_dir=engines.parent / "onnx")


def test_shapes_outside_the_profile_are_one_line(built):
    from runtime.manifest import check_in_profile

    m = _manifest(built[0] / "transformer")
    ok = {"hidden_states": (3, 4, 16, 8), "encoder_hidden_states": (3, 20, 128), "pooled_projections": (3, 128), "timestep": (3,)}
    check_in_profile(m, ok)  # inside: no error
    check_in_profile(m, {**ok, "hidden_states": (9, 4, 8, 8)})  # a bigger batch is split by the runner
    with pytest.raises(UserError) as e:
        check_in_profile(m, {**ok, "hidden_states": (1, 4, 24, 8)})  # 96 px high
    msg = str(e.value)
    assert "\n" not in msg and "serves 32x32..64x64 px, batch 1..4" in msg and "[1, 4, 24, 8]" in msg


def test_static_engines_one_per_resolution(built):
    from runtime.manifest import profile_violation

    static = built[2]
    labels = sorted(p.name for p in (static / "static").iterdir())
    assert labels == ["32x32", "32x64", "64x64"] and not (static / "transformer").exists()
    manifests = {lab: _manifest(static / "static" / lab / "transformer") for lab in labels}
    assert manifests["32x64"]["profiles"][0]["hidden_states"] == [[1, 4, 8, 16], [2, 4, 8, 16], [4, 4, 8, 16]]
    fits = [lab for lab, m in manifests.items() if profile_violation(m["profiles"][0], {"hidden_states": (2, 4, 16, 16)}) is None]
    assert fits == ["64x64"] and manifests["64x64"]["served"]["static"]


def test_triton_declares_the_dynamic_dims(built):
    text = (built[1] / "transformer" / "config.pbtxt").read_text()
    assert "dims: [ 4, -1, -1 ]" in text  # channels static, latent height and width dynamic; batch is Triton's


def test_benchmark_refuses_a_resolution_the_export_does_not_serve(dynamic_export, tmp_path):
    from measure.e2e import check_served

    out, _ = dynamic_export
    spec = resolve_model("tiny-sd3")
    check_served(out, spec, [(32, 32), (48, 40)])  # inside the dynamic box
    with pytest.raises(UserError, match="position embedding"):
        check_served(out, spec, [(96, 96)])
    report = json.loads((out / "export_report.json").read_text())
    report["served_shapes"] = ServedShapes(((32, 32),), (1, 2, 4), 20, 4).to_json()  # as a one-resolution export
    fake = tmp_path / "static_export"
    (fake / "onnx").mkdir(parents=True)
    (fake / "onnx" / "transformer.onnx").write_bytes(b"")
    (fake / "export_report.json").write_text(json.dumps(report))
    with pytest.raises(UserError, match=r"64x64 px is outside .* \(32x32 px, batch 1..4\)") as e:
        check_served(fake, spec, [(64, 64)])
    assert "\n" not in str(e.value)


def test_shape_bounds_benchmark_writes_json_and_table(tmp_path):
    from benchmarks.shape_bounds import main

    out = tmp_path / "b.json"
    assert main(["--model", "tiny-sd3", "--resolution", "32x32,64x64", "--structured", "0.3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["height"], r["width"]) for r in res["rows"]] == [(32, 32), (64, 64)]
    for r in res["rows"]:
        assert 1 < r["bound_2of4_transformer"] < 2 and 1 < r["structured"]["0.3"]["bound"] < 2
    assert "| 32x32 |" in out.with_suffix(".md").read_text()
