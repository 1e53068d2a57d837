"""A few-step run of the tiny-model training script produces a loadable, working pipeline, for each family."""

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SMOKE_ARGS = ["--vae-steps", "2", "--steps", "2", "--batch", "8", "--vae-batch", "8", "--augment", "0"]


def _train(family: str, out: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train_tiny.py"), "--family", family, "--out", str(out), *SMOKE_ARGS],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / ".sparse-dit-deploy").is_file()


def test_training_smoke_run(tmp_path):
    out = tmp_path / "tiny"
    _train("sd3", out)
    from families.registry import load_pipeline, resolve_model
    from families.sampling import sample

    spec = resolve_model(str(out))
    pipe = load_pipeline(spec)
    assert pipe.transformer.config.num_layers == 4
    img = sample(pipe, spec, ["a handwritten digit 1"], [0], steps=2)
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()


def test_training_smoke_run_flux(tmp_path):
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    out = tmp_path / "tiny-flux"
    _train("flux", out)
    pipe = FluxPipeline.from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.transformer.config
    assert isinstance(pipe.transformer, FluxTransformer2DModel) and not cfg.guidance_embeds
    assert cfg.num_layers >= 2 and cfg.num_single_layers >= 2
    with torch.inference_mode():
        img = pipe(
            prompt="a handwritten digit 1", negative_prompt="", true_cfg_scale=2.0, num_inference_steps=2,
            height=32, width=32, max_sequence_length=10, generator=torch.Generator().manual_seed(0), output_type="np",
        ).images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
