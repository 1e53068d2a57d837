import json

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


def test_an_input_made_for_another_model_is_named_with_both():
    """What every hand-off compares (issue 23): the recorded model, family and weights fingerprint against --model."""
    from families.registry import model_fingerprint, other_model, transformer_difference

    sd3, flux = MODELS["tiny-sd3"], MODELS["tiny-flux"]
    mine = model_fingerprint(sd3)
    assert mine.startswith("sha256:") and model_fingerprint(sd3) == mine  # hashed once per unchanged directory
    assert other_model(sd3, model="tiny-sd3", family="sd3", weights=mine) is None
    assert other_model(sd3, model="my-copy", weights=mine) is None  # the same weights under another name are the same model
    assert other_model(sd3, model="tiny-sd3") is None and other_model(sd3, model=None) is None  # too little recorded to tell
    assert other_model(sd3, model="tiny-flux", family="flux") == "was made for tiny-flux (flux), not for tiny-sd3 (sd3)"
    assert other_model(sd3, model="tiny-flux", family="flux", weights=model_fingerprint(flux)).startswith(
        "was made for tiny-flux (flux, sha256:")
    assert other_model(sd3, model="tiny-sd3", weights="sha256:" + "0" * 64).startswith("was made from other weights of tiny-sd3")
    assert other_model(sd3, model="sd3-medium") == "was made for sd3-medium, not for tiny-sd3"
    assert other_model(sd3, model="tiny-sd3", weights="source:x/y") is None  # fingerprints of different kinds do not compare
    config = json.loads((sd3.path / "transformer" / "config.json").read_text())
    assert transformer_difference(sd3, {**config, "_name_or_path": "/elsewhere", "sample_size": 16}) is None
    assert transformer_difference(sd3, {**config, "num_layers": 6}) == "num_layers 6 against 4"
    assert "FluxTransformer2DModel against tiny-sd3's SD3Transformer2DModel" in transformer_difference(
        sd3, json.loads((flux.path / "transformer" / "config.json").read_text()))


def test_prune_counts_its_units_without_weights():
    """--groups above the model's prunable units, and a block range outside it, are one line before loading."""
    from obsdiff.patterns import parse_sparsity
    from obsdiff.stage import check_units, prune_config

    spec = MODELS["tiny-sd3"]
    assert check_units(spec, prune_config(spec, parse_sparsity("2:4"), groups=16)) == 16
    assert check_units(spec, prune_config(spec, parse_sparsity("structured:0.3"), groups=8)) == 8
    assert check_units(spec, prune_config(spec, parse_sparsity("dense"), groups=100)) is None
    with pytest.raises(UserError, match="--groups 17: tiny-sd3 has 16 prunable units .* in blocks 0..3, .*give --groups between 1 and 16"):
        check_units(spec, prune_config(spec, parse_sparsity("2:4"), groups=17))
    with pytest.raises(UserError, match="--groups 5: tiny-sd3 has 4 prunable units .* in blocks 3..3"):
        check_units(spec, prune_config(spec, parse_sparsity("2:4"), groups=5, first_block=3))
    with pytest.raises(UserError, match="block range 0..4 is outside 0..3"):
        check_units(spec, prune_config(spec, parse_sparsity("2:4"), last_block=4))
