"""The ONNX Runtime parity check's memory is known before it runs (issue 19): ONNX Runtime's CPU attention
materialises batch x heads x tokens^2 float32 scores, so the check's activations grow with the batch and the
square of the tokens, not with the weights. The estimate (:func:`export.parity.ort_activation_bytes`) is
logged before the export, and a check that would not fit in memory stops with one line naming the
``--parity-batches`` that does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError
from tests.tolerances import ORT_PATHS_REL

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys
from common.memory import peak_rss_bytes, rss_bytes
from pipeline.__main__ import main
import export.dynamo_export, onnx, onnxruntime  # imports are the baseline, not the export
out, model_dir, batches = sys.argv[1], sys.argv[2], sys.argv[3]
base = rss_bytes()
status = main(["export", "--model", model_dir, "--out", out, "--precision", "fp32", "--components", "transformer", "--parity-batches", batches])
print(json.dumps({"status": status, "baseline": base, "peak": peak_rss_bytes()}))
"""


def _attention_heavy_model(tmp: Path) -> Path:
    """An SD3 transformer whose memory is attention's, not its weights' (1 block, 16 heads of 16, 4 MB):
    at a 64x64 latent it attends over 1,024 image + 333 text tokens."""
    import torch
    from diffusers import SD3Transformer2DModel

    d = tmp / "model"
    (d / "transformer").mkdir(parents=True)
    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=16,
                          num_attention_heads=16, joint_attention_dim=64, caption_projection_dim=256, pooled_projection_dim=64,
                          pos_embed_max_size=32).save_pretrained(d / "transformer")
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    return d


def _export(tmp: Path, model: Path, batches: str) -> tuple[float, dict[str, float]]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    env.pop("SDD_PARITY_BUDGET_BYTES", None)
    out = tmp / f"out-{batches.replace(',', '-')}"
    r = subprocess.run([sys.executable, "-c", CHILD, str(out), str(model), batches], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["status"] == 0, r.stderr[-3000:]
    assert json.loads((out / "export_report.json").read_text())["components"]["transformer"]["parity"]["ok"]
    line = next(x for x in r.stderr.splitlines() if "ONNX Runtime parity check, estimated activations" in x)
    est = {b: float(g) * 2**30 for g, b in re.findall(r"([\d.]+) GiB at (\d+) \(", line)}
    return m["peak"] - m["baseline"], est


@pytest.mark.slow  # two exports in fresh processes (about a minute); peak RSS also depends on what else the host runs
def test_parity_check_memory_follows_the_estimate(tmp_path):
    model = _attention_heavy_model(tmp_path)
    growth_1, est = _export(tmp_path, model, "1")
    growth_13, est13 = _export(tmp_path, model, "1,3")
    assert est13["1"] == est["1"]
    # What batch 3 adds over batch 1 is its attention activations: the measured ratio to the estimate.
    ratio = (growth_13 - growth_1) / (est13["3"] - est13["1"])
    print(f"peak growth: batch 1 {growth_1 / 2**20:.0f} MiB, batches 1,3 {growth_13 / 2**20:.0f} MiB; estimate {est13['1'] / 2**20:.0f} / "
          f"{est13['3'] / 2**20:.0f} MiB; measured / estimated increase {ratio:.2f}")
    assert 0.5 <= ratio <= 1.2, ratio
    assert growth_13 <= est13["3"] + 768 * 2**20  # the rest is fixed: tracing, sessions, allocator slack


def test_a_check_that_does_not_fit_names_the_batches_that_do(monkeypatch):
    """SD3-medium at 1024x1024 (24 heads, 4,096 image + 333 text tokens): batch 1 needs about 5.3 GiB of
    ONNX Runtime activations, batch 3 about 15.8 GiB."""
    from export.parity import ort_activation_bytes, plan_parity_memory

    cases = {"1": (1, 4429), "3": (3, 4429)}
    assert round(ort_activation_bytes(1, 24, 4429) / 2**30, 1) == 5.3
    monkeypatch.setenv("SDD_PARITY_BUDGET_BYTES", str(8 << 30))  # 7 GiB for activations after the 1 GiB margin
    with pytest.raises(UserError, match=r"at batch 3 and 4,429 tokens needs about 15.8 GiB of activations, and 7.0 GiB are available: "
                                        r"pass --parity-batches 1 \(about 5.3 GiB\)"):
        plan_parity_memory("transformer", cases, 24)
    monkeypatch.setenv("SDD_PARITY_BUDGET_BYTES", str(4 << 30))
    with pytest.raises(UserError, match="pass --parity-batches '' to skip the check"):
        plan_parity_memory("transformer", cases, 24)
    monkeypatch.setenv("SDD_PARITY_BUDGET_BYTES", str(18 << 30))
    assert plan_parity_memory("transformer", cases, 24)["3"] == ort_activation_bytes(3, 24, 4429)


def test_a_check_over_its_cap_runs_at_a_smaller_latent_shape(monkeypatch):
    """SD3-medium at 1024x1024 (a 128x128 latent, 24 heads, 333 text tokens; 3.9 GiB of float16 ONNX): the
    default cap is half the weights + 1 GiB (2.95 GiB), under batch 1's 5.3 GiB at the served shape, so each
    batch is checked at the largest smaller latent whose estimate fits, in patch steps and the same aspect."""
    from export.parity import ort_activation_bytes, parity_memory_cap, plan_parity_shapes

    monkeypatch.setenv("SDD_PARITY_BUDGET_BYTES", str(64 << 30))
    tokens = lambda hw: (hw[0] // 2) * (hw[1] // 2) + 333  # noqa: E731
    weights = int(3.9 * 2**30)
    cap = parity_memory_cap(weights)
    cases, report = plan_parity_shapes("transformer", {"1": (1, (128, 128)), "3": (3, (128, 128)), "1@64x128": (1, (64, 128))}, 24, tokens,
                                       weight_bytes=weights, step=2)
    assert set(cases) == {"1@108x108", "3@78x78", "1@64x128"}, cases
    for label, (b, (h, w)) in cases.items():
        assert h % 2 == 0 and w % 2 == 0 and ort_activation_bytes(b, 24, tokens((h, w))) <= cap
        assert label == "1@64x128" or ort_activation_bytes(b, 24, tokens((h + 2, w + 2))) > cap  # the largest that fits
    assert report["cases"]["3@78x78"]["served_latent"] == [128, 128] and report["cap_bytes"] == cap
    # A served shape within the cap is checked as served; an explicit cap (--parity-memory) replaces the default.
    assert plan_parity_shapes("transformer", {"1": (1, (128, 128))}, 24, tokens, weight_bytes=weights, step=2, memory=6 << 30) == ({"1": (1, (128, 128))}, {})
    # A wide latent keeps its aspect ratio.
    (label, (_, (h, w))), = plan_parity_shapes("t", {"1": (1, (64, 192))}, 24, tokens, weight_bytes=weights, step=2, memory=1 << 30)[0].items()
    assert abs(w / h - 3) < 0.1, (h, w)
    with pytest.raises(UserError, match=r"even at a 2x2 latent, over its 1.0 MiB cap: pass a larger --parity-memory"):
        plan_parity_shapes("transformer", {"1": (1, (128, 128))}, 24, tokens, weight_bytes=weights, step=2, memory=1 << 20)


def test_an_export_checked_at_a_smaller_shape_serves_the_served_one(tmp_path):
    """tiny-sd3's transformer with a cap that only a smaller latent fits at batch 3: the check runs there, the
    exported graph takes both shapes, and at the served shape (8x8 latent, batch 2) ONNX Runtime still agrees
    with the compact torch model it was exported from."""
    import torch

    from export.parity import ort_session, rel_error
    from families import adapter_for
    from families.registry import resolve_model
    from pipeline.__main__ import main

    out = tmp_path / "e"
    assert main(["export", "--model", "tiny-sd3", "--out", str(out), "--components", "transformer", "--parity-batches", "1,3",
                 "--parity-memory", "0.0001"]) == 0  # 105 KiB: batch 1 at 8x8 fits, batch 3 needs a 4x4 latent
    res = json.loads((out / "export_report.json").read_text())["components"]["transformer"]
    assert list(res["parity"]["per_batch"]) == ["1", "3@4x4"] and res["parity"]["ok"]
    assert res["parity_reduced"]["cases"]["3@4x4"]["served_latent"] == [8, 8]
    assert res["inputs"]["hidden_states"]["shape"][2:] == ["2*tokens_h", "2*tokens_w"]
    assert res["profiles"]["range"]["hidden_states"][2] == [4, 4, 8, 8]  # the engines still serve the served shape only

    from export.checkpoint import load_compact

    compact = load_compact(out / "compact")[0].eval()
    spec = resolve_model("tiny-sd3")
    adapter = adapter_for(compact)
    inputs = adapter.transformer_inputs(compact, 2, (8, 8), spec.shapes.text_seq_len, seed=5)
    wrapper = adapter.transformer_for_onnx(compact)
    with torch.no_grad():
        ref = wrapper(*inputs.values()).numpy()
    got = ort_session(out / "onnx" / "transformer.onnx").run(["sample"], {k: v.numpy() for k, v in inputs.items()})[0]
    assert rel_error(got, ref) < ORT_PATHS_REL  # measured 6e-7
