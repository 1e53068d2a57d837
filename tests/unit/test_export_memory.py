"""Export memory is bounded by the weights: peak RSS growth at most 1.5x the exported weight bytes plus a
fixed allowance, on a model whose weights dominate the process (memory ratios are stable; times are not).

The model is an SD3 transformer of SD3-medium's head layout at a smaller width, with random weights; the
export runs through the external-data path that >2 GB models take (forced by ``SDD_EXTERNAL_DATA_BYTES``),
in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, torch
from common.memory import peak_rss_bytes, rss_bytes
from diffusers import SD3Transformer2DModel
from pipeline.__main__ import main
import export.dynamo_export, onnx, onnxruntime  # imports are the baseline, not the export
out, model_dir, precision = sys.argv[1], sys.argv[2], sys.argv[3]
base = rss_bytes()
status = main(["export", "--model", model_dir, "--out", out, "--precision", precision, "--components", "transformer", "--parity-batches", "1"])
print(json.dumps({"status": status, "baseline": base, "peak": peak_rss_bytes()}))
"""


def _model_dir(tmp: Path, dtype: str = "fp32") -> Path:
    import torch
    from diffusers import SD3Transformer2DModel

    d = tmp / "model"
    (d / "transformer").mkdir(parents=True)
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
                              num_attention_heads=16, joint_attention_dim=512, caption_projection_dim=1024, pooled_projection_dim=256,
                              pos_embed_max_size=32)
    # stored in the precision it is exported in, as hub checkpoints are float16 (like stage 1's 1 GB shards of a 2B model)
    m.to(torch.float16 if dtype == "fp16" else torch.float32).save_pretrained(d / "transformer", max_shard_size="100MB")
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    return d


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.slow), "fp16"])  # fp16 in make test; both with RUN_SLOW=1
def test_export_peak_memory_is_bounded_by_the_weights(tmp_path, precision):
    model_dir = _model_dir(tmp_path, precision)
    # Allocator slack is not the export's memory, and it depends on what else the host runs. MALLOC_ARENA_MAX: glibc
    # gives each busy thread its own arena; on a loaded host that alone added ~0.5 GiB to the peak. A fixed
    # MALLOC_MMAP_THRESHOLD_: glibc otherwise raises the threshold as large blocks are freed and keeps later ones
    # in its heap (alone 0.68 GiB of growth with it moving, 0.56 GiB with it fixed; once 1.15 GiB in a loaded
    # `make test`).
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO), "SDD_EXTERNAL_DATA_BYTES": "0", "MALLOC_ARENA_MAX": "2",
           "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "out"), str(model_dir), precision], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["status"] == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    onnx_dir = tmp_path / "out" / "onnx"
    assert (onnx_dir / "transformer.onnx.data").is_file(), "the external-data path was not taken"
    weights = report["components"]["transformer"]["bytes"]
    growth = m["peak"] - m["baseline"]
    # Fixed costs that do not grow with the weights: torch.export's tracing, ONNX Runtime's arenas and thread
    # pools, allocator slack. Measured growth on this model: fp32 0.76 GiB (1.38 x), fp16 0.55-0.57 GiB stored in fp16 (the
    # spread is allocator timing); the real-size bound (1.5 x + 2 GiB) is asserted by test_scale_fixture.py.
    allowance = 768 * 2**20
    print(f"{precision}: weights {weights / 2**20:.0f} MiB, peak growth {growth / 2**20:.0f} MiB = {growth / weights:.2f} x weights")
    phases = [line for line in r.stderr.splitlines() if "RSS" in line]  # what the export logged of its memory, phase by phase
    assert growth <= 1.5 * weights + allowance, (growth / 2**20, weights / 2**20, phases)
    assert report["components"]["transformer"]["parity"]["ok"]
