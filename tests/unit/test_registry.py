import pytest

from common.errors import UserError
from families.registry import MODELS, resolve_model


def test_known_families_have_complete_entries():
    assert {"tiny-sd3", "sd3-medium", "sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo"} <= set(MODELS)
    for spec in MODELS.values():
        assert spec.pipeline_class == "StableDiffusion3Pipeline"
        assert spec.head_dim == 64 and spec.blocks_attr == "transformer_blocks"
        assert spec.steps > 0 and spec.height % 16 == 0
        assert spec.shapes.batch_min <= spec.shapes.batch_opt <= spec.shapes.batch_max
    assert MODELS["sd3-medium"].source == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert MODELS["sd3.5-large-turbo"].few_step and MODELS["sd3.5-large-turbo"].steps <= 8


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


def test_unreachable_hub_model_gives_one_line(monkeypatch, tmp_path):
    from families.registry import load_pipeline

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # empty cache, offline (conftest)
    with pytest.raises(UserError) as e:
        load_pipeline(resolve_model("sd3-medium"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in msg and "--model PATH" in msg
