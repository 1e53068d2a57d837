import pytest

from common.errors import UserError
from families.registry import MODELS, resolve_model


def test_known_families_have_complete_entries():
    assert {"tiny-sd3", "sd3-medium", "sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo", "flux.1-dev", "flux.1-schnell"} <= set(MODELS)
    for spec in MODELS.values():
        assert spec.pipeline_class == spec.adapter.pipeline_class  # every entry names a known family
        if spec.local:  # the embedded models: the registry agrees with the stored transformer
            import json

            assert spec.head_dim == json.loads((spec.path / "transformer" / "config.json").read_text())["attention_head_dim"]
        else:
            assert spec.head_dim == (128 if spec.family == "flux" else 64)
        assert spec.steps > 0 and spec.height % spec.pixel_multiple == 0
        assert spec.shapes.batch_min <= spec.shapes.batch_opt <= spec.shapes.batch_max
    assert MODELS["sd3-medium"].source == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert MODELS["sd3.5-large-turbo"].few_step and MODELS["sd3.5-large-turbo"].steps <= 8
    assert MODELS["flux.1-schnell"].few_step and MODELS["flux.1-schnell"].steps == 4 and MODELS["flux.1-schnell"].guidance == 0


def test_unknown_id_lists_known_ones():
    with pytest.raises(UserError) as e:
        resolve_model("sd9-huge")
    msg = str(e.value)
    assert "\n" not in msg and "sd9-huge" in msg
    for known in MODELS:
        assert known in msg


def test_local_directory_is_accepted(tiny_spec):
    spec = resolve_model(str(tiny_spec.path))
    assert spec == tiny_spec  # a path to a registry model keeps that family's defaults


def test_local_directory_without_pipeline_is_rejected(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("model_id", ["sd3-medium", "flux.1-dev", "flux.1-schnell"])
def test_unreachable_hub_model_gives_one_line(monkeypatch, tmp_path, model_id):
    from families.registry import load_pipeline

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # empty cache, offline (conftest)
    with pytest.raises(UserError) as e:
        load_pipeline(resolve_model(model_id))
    msg = str(e.value)
    assert "\n" not in msg
    assert MODELS[model_id].source in msg and "--model PATH" in msg
