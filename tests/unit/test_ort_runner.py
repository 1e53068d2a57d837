"""ONNX Runtime sessions and the diffusers pipeline running on them, against PyTorch on the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.errors import UserError
from tests import runtime_fixtures as fx

STEPS = 4  # enough to exercise the scheduler loop; the comparison does not depend on the step count


def test_ort_transformer_matches_torch_and_does_not_spin():
    from runtime.ort import OrtModel

    spec, _ = fx.tiny_sd3()
    onnx_dir, transformer, _ = fx.pruned_export()
    model = OrtModel(onnx_dir / "transformer.onnx")
    assert model.providers == ["CPUExecutionProvider"]
    opts = model.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    sh = spec.shapes
    g = torch.Generator().manual_seed(3)
    for batch in (1, 3):  # the batch dim is dynamic
        feeds = {
            "hidden_states": torch.randn(batch, 4, sh.latent_height, sh.latent_width, generator=g),  # (B, C, h, w)
            "encoder_hidden_states": torch.randn(batch, sh.text_seq_len, 128, generator=g),  # (B, S, D)
            "pooled_projections": torch.randn(batch, 128, generator=g),  # (B, P)
            "timestep": torch.rand(batch, generator=g) * 1000,  # (B,)
        }
        with torch.inference_mode():
            ref = transformer(**feeds, return_dict=False)[0]
        out = model(feeds)["sample"]
        assert out.shape == ref.shape
        # float32 ORT vs PyTorch: max abs error 1e-4 on outputs of order 1 (measured ~1e-6; tests/tolerances.py ORT_PATHS_REL).
        assert (out - ref).abs().max().item() < 1e-4
    assert model.size_bytes > 1_000_000


def test_unavailable_provider_is_a_user_error():
    import onnxruntime as ort

    from runtime.ort import resolve_provider

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UserError, match="onnxruntime-gpu"):
            resolve_provider("cuda")
    with pytest.raises(UserError, match="unknown ONNX Runtime provider"):
        resolve_provider("tpu")
    assert resolve_provider("cpu") == ["CPUExecutionProvider"]


def test_pipeline_on_ort_matches_pytorch_pipeline_same_seed():
    from families.sd3 import SD3TransformerRuntime as TransformerAdapter
    from families.components import ClipAdapter, VaeDecoderAdapter
    from runtime.pipeline_runner import generate, runner_pipeline
    from runtime.stage_timer import StageTimer

    spec, pipe = fx.tiny_sd3()
    onnx_dir = fx.component_exports()
    _, pruned, _ = fx.pruned_export()
    reference = type(pipe)(**{**pipe.components, "transformer": pruned})
    reference.set_progress_bar_config(disable=True)
    rp = runner_pipeline(spec, backend="ort", onnx_dir=onnx_dir, base_pipe=pipe)
    assert isinstance(rp.transformer, TransformerAdapter) and isinstance(rp.text_encoder, ClipAdapter) and isinstance(rp.vae, VaeDecoderAdapter)
    assert rp.text_encoder_2 is pipe.text_encoder_2 and rp.text_encoder_3 is pipe.text_encoder_3  # not exported: PyTorch
    assert not isinstance(pipe.transformer, TransformerAdapter)  # the base pipeline is left as it was

    prompts = ["a handwritten digit 3", "a handwritten digit 7"]
    timer = StageTimer()
    ours = generate(rp, spec, prompts, seed=5, steps=STEPS, timer=timer, output_type="np")
    ms, calls = timer.collect()
    ref = generate(reference, spec, prompts, seed=5, steps=STEPS, output_type="np")
    assert ours.shape == ref.shape == (2, spec.height, spec.width, 3)
    # Same scheduler, latents and seed: pixels in [0, 1] agree to 1e-3 (measured ~1e-6).
    assert np.abs(ours - ref).max() < 1e-3
    assert np.abs(ours - generate(rp, spec, prompts, seed=6, steps=STEPS, output_type="np")).max() > 1e-2  # the seed matters
    # One transformer call per step (CFG batched), three encoders x (prompt, negative prompt), one decode.
    assert calls == {"total": 1, "transformer": STEPS, "text_encoders": 6, "vae_decode": 1}
    assert all(ms[k] > 0 for k in calls) and ms["total"] >= ms["transformer"]
    # Timing hooks are removed afterwards.
    assert not pipe.text_encoder_2._forward_hooks and "decode" not in pipe.vae.__dict__


def test_e2e_benchmark_program_writes_json_table_plot_grid(tmp_path):
    from PIL import Image

    from measure.e2e import run_e2e

    spec, pipe = fx.tiny_sd3()
    onnx_dir = fx.component_exports()
    threads_before = torch.get_num_threads()
    res = run_e2e(spec, onnx_dir, onnx_dir, tmp_path, runs=2, warmup=1, steps=2, quality=False, sparsity="2:4",
                  grid_prompts=["a handwritten digit 1", "a handwritten digit 2"], base_pipe=pipe, threads=1,
                  memory=False)  # the memory section's parts: tests/unit/test_pipeline_memory.py
    assert torch.get_num_threads() == threads_before  # the thread setting is restored
    bench = json.loads((tmp_path / "bench.json").read_text())
    for v in ("dense", "pruned", "eager"):
        e = bench[v]
        assert e["latency_ms"]["n"] == 2 and 0 < e["latency_ms"]["median"] <= e["latency_ms"]["p90"]
        assert set(e["stages_ms"]) == {"text_encoders", "transformer", "vae_decode"}
        assert e["backend"] and e["images_per_s"] > 0 and e["peak_memory_mib"] > 0 and e["size_mib"]["transformer"] > 0
    assert bench["dense"]["backend"].startswith("onnxruntime") and bench["eager"]["backend"].startswith("pytorch")
    assert bench["speedup"] == pytest.approx(bench["dense"]["latency_ms"]["median"] / bench["pruned"]["latency_ms"]["median"])
    assert "sparse tensor cores" in bench["note"] and bench["settings"]["threads"] == 1
    assert res["speedup"] == bench["speedup"]
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("| variant | backend | e2e median ms") and md.count("\n| ") == 3  # header, separator, 3 rows
    assert Image.open(tmp_path / "bench.png").format == "PNG"
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[1] >= 3 * 96 and grid.size[0] >= 2 * 96
