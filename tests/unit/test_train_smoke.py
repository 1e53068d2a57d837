"""A few-step run of the tiny-sd3 training script produces a loadable, working pipeline."""

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_training_smoke_run(tmp_path):
    out = tmp_path / "tiny"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train_tiny_sd3.py"), "--out", str(out), "--vae-steps", "2",
         "--steps", "2", "--batch", "8", "--vae-batch", "8", "--augment", "0"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    from pipeline.models import load_pipeline, resolve_model
    from pipeline.sampling import sample

    spec = resolve_model(str(out))
    pipe = load_pipeline(spec)
    assert pipe.transformer.config.num_layers == 4
    img = sample(pipe, spec, ["a handwritten digit 1"], [0], steps=2)
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
