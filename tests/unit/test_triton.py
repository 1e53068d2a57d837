"""Triton model repository: written files parse as Triton ModelConfig text protos with the right I/O."""

from __future__ import annotations

import pytest

from common.errors import UserError
from tests import runtime_fixtures as fx
from tests.runtime_triton_proto import parse_model_config, type_name


def test_onnxruntime_repository_parses_with_io_and_dynamic_batching(tmp_path):
    from runtime.triton import write_model_repository

    spec, _ = fx.tiny_sd3()
    onnx_dir = fx.component_exports()
    files = {c: onnx_dir / f"{c}.onnx" for c in ("transformer", "text_encoder", "vae_decoder")}
    written = write_model_repository(tmp_path / "repo", files, kind="onnxruntime", batch=(1, 2, 4), prefix="tiny_")
    assert [p.parent.name for p in written] == ["tiny_transformer", "tiny_text_encoder", "tiny_vae_decoder"]

    cfg = parse_model_config((tmp_path / "repo" / "tiny_transformer" / "config.pbtxt").read_text())
    assert cfg.name == "tiny_transformer" and cfg.backend == "onnxruntime" and cfg.platform == ""
    assert cfg.max_batch_size == 4
    sh = spec.shapes
    ins = {i.name: (type_name(i.data_type), list(i.dims), i.HasField("reshape")) for i in cfg.input}
    assert ins == {
        "hidden_states": ("TYPE_FP32", [4, sh.latent_height, sh.latent_width], False),
        "encoder_hidden_states": ("TYPE_FP32", [sh.text_seq_len, 128], False),
        "pooled_projections": ("TYPE_FP32", [128], False),
        "timestep": ("TYPE_FP32", [1], True),  # batch-only tensor: dims [1] reshaped to []
    }
    assert [i for i in cfg.input if i.name == "timestep"][0].reshape.shape == []
    (out,) = cfg.output
    assert (out.name, type_name(out.data_type), list(out.dims)) == ("sample", "TYPE_FP32", [4, sh.latent_height, sh.latent_width])
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2] and cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert cfg.instance_group[0].count == 1
    assert (tmp_path / "repo" / "tiny_transformer" / "1" / "model.onnx").stat().st_size == files["transformer"].stat().st_size

    clip = parse_model_config((tmp_path / "repo" / "tiny_text_encoder" / "config.pbtxt").read_text())
    assert [(i.name, type_name(i.data_type)) for i in clip.input] == [("input_ids", "TYPE_INT64")]
    assert [o.name for o in clip.output] == ["text_embeds", "penultimate_hidden_states"]
    vae = parse_model_config((tmp_path / "repo" / "tiny_vae_decoder" / "config.pbtxt").read_text())
    assert list(vae.output[0].dims) == [3, spec.height, spec.width]


def test_tensorrt_plan_config_from_engine_manifest_io(tmp_path):
    import json

    from runtime.manifest import manifest_path_for
    from runtime.triton import TensorSpec, model_config_text, write_model_repository

    plan = fx.copy_engine(tmp_path / "eng")
    m = json.loads(manifest_path_for(plan).read_text())
    # Triton's TensorRT backend cannot run TensorRT-RTX plans: a one-line error says what to do.
    with pytest.raises(UserError, match="Triton's TensorRT backend runs TensorRT engines only"):
        write_model_repository(tmp_path / "repo", {"transformer": plan}, kind="tensorrt_plan")
    assert not (tmp_path / "repo" / "transformer").exists()
    # The config text for a TensorRT plan, from the I/O the manifest records.
    ins = [TensorSpec(d["name"], d["dtype"], tuple(d["shape"])) for d in m["io"]["inputs"]]
    outs = [TensorSpec(d["name"], d["dtype"], tuple(d["shape"])) for d in m["io"]["outputs"]]
    cfg = parse_model_config(model_config_text("sd3_transformer", kind="tensorrt_plan", inputs=ins, outputs=outs, max_batch_size=4, preferred_batch_sizes=[2, 4]))
    assert cfg.platform == "tensorrt_plan" and cfg.backend == "" and cfg.max_batch_size == 4
    assert [i.name for i in cfg.input] == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    # A TensorRT manifest (as written on a GPU host) goes through write_model_repository.
    m["backend"] = "trt"
    manifest_path_for(plan).write_text(json.dumps(m))
    (cfg_path,) = write_model_repository(tmp_path / "repo", {"transformer": plan}, kind="tensorrt_plan")
    cfg = parse_model_config(cfg_path.read_text())
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == m["builder"]["batch"][2]
    assert (cfg_path.parent / "1" / "model.plan").read_bytes() == plan.read_bytes()


def test_parser_rejects_what_triton_would():
    from google.protobuf import text_format

    with pytest.raises(text_format.ParseError):
        parse_model_config('name: "x"\nmax_batch: 4\n')  # misspelt field
    with pytest.raises(text_format.ParseError):
        parse_model_config('input [ { name: "a" data_type: TYPE_FLOAT32 dims: [ 1 ] } ]')  # unknown enum value
    with pytest.raises(UserError, match="unknown Triton backend"):
        from runtime.triton import model_config_text

        model_config_text("m", kind="pytorch_libtorch", inputs=[], outputs=[], max_batch_size=0)
