"""The embedded default model: offline loading, architecture, determinism, T5-less deployment."""

import numpy as np
import torch

from families.registry import load_pipeline
from families.sampling import sample


def test_loads_offline_as_a_real_sd3_pipeline(tiny_pipe):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    p = tiny_pipe
    assert isinstance(p, StableDiffusion3Pipeline)
    assert isinstance(p.transformer, SD3Transformer2DModel) and isinstance(p.vae, AutoencoderKL)
    assert isinstance(p.text_encoder, CLIPTextModelWithProjection) and isinstance(p.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(p.text_encoder_3, T5EncoderModel)
    assert isinstance(p.scheduler, FlowMatchEulerDiscreteScheduler)
    assert p.transformer.dtype == torch.float32  # stored as fp16, loaded as fp32


def test_architecture_gives_pruning_something_real(tiny_pipe, tiny_spec):
    cfg = tiny_pipe.transformer.config
    assert cfg.num_layers >= 4 and cfg.num_attention_heads >= 4 and cfg.attention_head_dim == 64 == tiny_spec.head_dim
    block = tiny_pipe.transformer.transformer_blocks[0]
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    assert block.ff.net[2].in_features == 4 * hidden and block.ff_context.net[2].in_features == 4 * hidden


def test_committed_weights_stay_small(tiny_spec):
    size = sum(p.stat().st_size for p in tiny_spec.path.rglob("*") if p.is_file())
    assert size < 25e6


def test_same_seed_same_image(tiny_pipe, tiny_spec):
    prompts = ["a handwritten digit 7", "a handwritten digit 7", "a handwritten digit 3"]
    a = sample(tiny_pipe, tiny_spec, prompts, [0, 1, 0], steps=4)
    b = sample(tiny_pipe, tiny_spec, prompts[:1], [0], steps=4)  # alone, in a smaller batch
    assert a.shape == (3, tiny_spec.height, tiny_spec.width, 3)
    # another batch size, other GEMM blockings: float32 rounding carried through 4 steps and the VAE decoder, on
    # pixels in [0, 1] (measured 1.2e-6, default and AVX2 kernels)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert np.abs(a[0] - a[1]).max() > 0.05  # another seed, another image


def test_runs_without_t5(tiny_spec):
    pipe = load_pipeline(tiny_spec, drop_t5=True)
    assert pipe.text_encoder_3 is None
    images = sample(pipe, tiny_spec, ["a handwritten digit 4"], [0], steps=4)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_one_way_prompts_become_images(tiny_pipe, tiny_spec):
    """The runner's generate and sample are one path: the same (prompt, seed) gives the same image in any batch,
    and `steps=0` is an error, not the model's default."""
    import pytest

    from common.errors import UserError
    from families.sampling import transformer_calls
    from runtime.pipeline_runner import generate

    prompts = ["a handwritten digit 2", "a handwritten digit 5"]
    via_sample = sample(tiny_pipe, tiny_spec, prompts, [11, 11], steps=3)
    via_runner = generate(tiny_pipe, tiny_spec, prompts, seed=11, steps=3, output_type="np")
    alone = generate(tiny_pipe, tiny_spec, prompts[1], seed=11, steps=3, output_type="np")
    np.testing.assert_allclose(via_runner, via_sample, atol=1e-5)  # the same calls (measured equal)
    np.testing.assert_allclose(alone[0], via_sample[1], atol=1e-4)  # batch 1 vs 2, as above (measured 1.6e-6)
    with pytest.raises(UserError, match="steps must be at least 1"):
        generate(tiny_pipe, tiny_spec, prompts, seed=0, steps=0)
    with transformer_calls(tiny_pipe.transformer, outputs=True, to_cpu=True) as calls:
        sample(tiny_pipe, tiny_spec, prompts[:1], [0], steps=2, output_type="latent")
    assert len(calls) == 2  # one call per step (CFG doubles the batch, not the calls)
    assert calls[0].inputs["hidden_states"].shape[0] == 2 and calls[0].output.shape == calls[0].inputs["hidden_states"].shape
