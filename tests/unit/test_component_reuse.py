"""A pruned export links the dense export's text encoders and VAE decoder (they do not depend on the pruning)
only when the dense export was made from the same weights, precision, shapes, libraries and export code, and
its files are there; otherwise it exports them itself. The real case runs in test_triton_serve (the 2:4
variant of `make serve` shares the dense variant's files)."""

from __future__ import annotations

import json
from pathlib import Path

INPUTS = {"report_version": 1, "model": "tiny-sd3", "model_weights": "sha256:ab", "others_precision": "fp32", "shapes": {"r": [[32, 32]]},
          "versions": {"torch": "2.13.0"}, "code": "c0de", "precision": "fp32", "components": ["transformer", "text_encoder", "vae_decoder"]}


def _dense(tmp: Path, **changes) -> Path:
    d = tmp / "dense"
    (d / "onnx").mkdir(parents=True)
    for name in ("text_encoder", "vae_decoder"):
        (d / "onnx" / f"{name}.onnx").write_bytes(name.encode())
    (d / "onnx" / "vae_decoder.onnx.data").write_bytes(b"weights")
    report = {"inputs": {**INPUTS, **changes}, "components": {n: {"file": f"{n}.onnx", "bytes": 1} for n in ("transformer", "text_encoder", "vae_decoder")}}
    (d / "export_report.json").write_text(json.dumps(report))
    return d


def test_matching_components_are_linked_with_their_external_data(tmp_path):
    from export.component_reuse import link_component, shared_components

    dense = _dense(tmp_path)
    wanted = {**INPUTS, "precision": "fp16", "plan_sha256": "9"}  # the transformer's precision and plan do not matter
    shared = shared_components(dense, wanted, ["text_encoder", "vae_decoder"])
    assert set(shared) == {"text_encoder", "vae_decoder"}
    out = tmp_path / "pruned" / "onnx"
    out.mkdir(parents=True)
    entry = link_component(dense, shared["vae_decoder"], out)
    assert entry["shared_with"] == str(dense.resolve()) and entry["file"] == "vae_decoder.onnx"
    for f in ("vae_decoder.onnx", "vae_decoder.onnx.data"):
        assert (out / f).stat().st_ino == (dense / "onnx" / f).stat().st_ino


def test_anything_that_differs_and_the_component_is_exported_again(tmp_path):
    from export.component_reuse import shared_components

    names = ["text_encoder", "vae_decoder"]
    for key, value in (("model_weights", "sha256:other"), ("others_precision", "fp16"), ("shapes", {"r": [[64, 64]]}),
                       ("versions", {"torch": "2.12"}), ("code", "changed")):
        assert shared_components(_dense(tmp_path / key, **{key: value}), INPUTS, names) == {}, key
    dense = _dense(tmp_path / "missing")
    (dense / "onnx" / "text_encoder.onnx").unlink()
    assert set(shared_components(dense, INPUTS, names)) == {"vae_decoder"}
    (dense / "export_report.json").write_text("{truncated")
    assert shared_components(dense, INPUTS, names) == {}
    assert shared_components(tmp_path / "nowhere", INPUTS, names) == {}
    assert shared_components(None, INPUTS, names) == {}
