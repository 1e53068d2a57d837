"""The serving repository and the request checks, without a server (seconds): what the pipeline model refuses
before anything runs, and which component models its ``pipeline.json`` names for each kind of repository."""

from __future__ import annotations

import json

import pytest

from common.errors import UserError


@pytest.fixture(scope="module")
def spec():
    from families.registry import resolve_model

    return resolve_model("tiny-sd3")


def test_parse_request_defaults_and_refusals(spec):
    from runtime.served_pipeline import ServeLimits, parse_request

    limits = ServeLimits(((32, 32), (48, 40)), max_steps=50, max_batch=4)
    r = parse_request({"prompt": b"a handwritten digit 7"}, spec, limits)
    assert (r.steps, r.guidance, r.height, r.width, r.seed, r.negative_prompt) == (spec.steps, spec.guidance, 32, 32, 0, None)
    assert parse_request({"prompt": "x", "height": 48, "width": 40, "steps": 50}, spec, limits).group == (50, spec.guidance, 48, 40, False)
    for values, message in [({}, "missing required input 'prompt'"), ({"prompt": b"  "}, "prompt is empty"),
                            ({"prompt": b"\xff\xfe"}, "not UTF-8"), ({"prompt": "x", "steps": 0}, "between 1 and 50"),
                            ({"prompt": "x", "steps": 10_000}, "between 1 and 50"), ({"prompt": "x", "height": 64, "width": 64}, "64x64 is not served"),
                            ({"prompt": "x", "guidance": float("nan")}, "guidance"), ({"prompt": "x", "seed": -1}, "seed")]:
        with pytest.raises(UserError, match=message):
            parse_request(values, spec, limits)


def test_limits_round_trip_and_from_export(spec, tmp_path):
    from runtime.serve_repository import limits_from_export
    from runtime.served_pipeline import ServeLimits

    (tmp_path / "export_report.json").write_text(json.dumps({"served_shapes": {"resolutions": [[32, 32], [64, 48]], "batch": [1, 2, 8]}}))
    limits = limits_from_export(spec, tmp_path, max_steps=30)
    assert limits == ServeLimits(((32, 32), (64, 48)), 30, 8)
    assert ServeLimits.from_json(json.loads(json.dumps(limits.to_json()))) == limits
    assert limits_from_export(spec, tmp_path / "none").resolutions == ((spec.height, spec.width),)


def test_repository_names_the_component_models(spec, tmp_path):
    """Python components: every exported component is a model. Components another backend serves
    (``build --triton``): only those, the rest stays PyTorch inside the pipeline model."""
    pytest.importorskip("onnx")
    from runtime.serve_repository import write_serving_repository
    from runtime.served_pipeline import ServeLimits

    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    _tiny_onnx(onnx_dir / "transformer.onnx", ["hidden_states", "timestep"], "out")
    _tiny_onnx(onnx_dir / "vae_decoder.onnx", ["latent"], "sample")
    limits = ServeLimits(((32, 32),), 20, 2)
    repo = write_serving_repository(tmp_path / "repo", spec, onnx_dir, limits=limits, prefix="a_", dynamic_batching=True)
    settings = json.loads((repo / "a_pipeline" / "1" / "pipeline.json").read_text())
    assert settings["model"] == "tiny-sd3" and set(settings["components"]) == {"transformer", "vae_decoder"}
    assert settings["components"]["transformer"]["inputs"] == {"hidden_states": ["float32", 4], "timestep": ["float32", 1]}
    cfg = (repo / "a_transformer" / "config.pbtxt").read_text()
    assert 'backend: "python"' in cfg and "max_batch_size: 4" in cfg and "dynamic_batching" in cfg and "reshape: { shape: [ ] }" in cfg
    manifest = json.loads((repo / "a_transformer" / "1" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx"}
    pipeline_cfg = (repo / "a_pipeline" / "config.pbtxt").read_text()
    assert "max_batch_size: 2" in pipeline_cfg and "TYPE_STRING" in pipeline_cfg and "optional: true" in pipeline_cfg
    repo2 = write_serving_repository(tmp_path / "repo2", spec, onnx_dir, limits=limits, components_kind="onnxruntime",
                                     component_files={"transformer": onnx_dir / "transformer.onnx"})
    assert set(json.loads((repo2 / "pipeline" / "1" / "pipeline.json").read_text())["components"]) == {"transformer"}
    assert not (repo2 / "transformer").exists()  # written by runtime.triton.write_model_repository, not here


def test_component_manifest_check(spec, tmp_path):
    from common.io import sha256_file, write_json
    from runtime.serve_repository import check_component

    (tmp_path / "model.onnx").write_bytes(b"abc")
    write_json(tmp_path / "manifest.json", {"files": {"model.onnx": {"bytes": 3, "sha256": sha256_file(tmp_path / "model.onnx")}}})
    check_component(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"abd")
    with pytest.raises(UserError, match="does not match its manifest"):
        check_component(tmp_path)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(UserError, match="missing"):
        check_component(tmp_path)


def _tiny_onnx(path, inputs, output):
    """An Identity-sum graph with a batch dim (rank 4 for the first input, rank 1 for the rest)."""
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4, 8, 8] if i == 0 else ["batch"]) for i, n in enumerate(inputs)]
    out = helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", 4, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", [inputs[0]], [output])], "g", ins, [out])
    onnx.save(helper.make_model(graph), str(path))
