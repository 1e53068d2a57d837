"""Tiny models built from the real diffusers classes (nothing is downloaded)."""

from __future__ import annotations

import torch


def tiny_sd3_transformer(
    num_layers: int = 3,
    num_heads: int = 4,
    head_dim: int = 16,
    dual_attention_layers: tuple[int, ...] = (),
    qk_norm: str | None = None,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 24,
    sample_size: int = 8,
    in_channels: int = 4,
    seed: int = 0,
):
    """A random ``SD3Transformer2DModel``; ``dual_attention_layers``/``qk_norm="rms_norm"`` give SD3.5's layout."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=pooled_projection_dim,
        out_channels=in_channels,
        pos_embed_max_size=sample_size,
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    )
    # diffusers zero-initialises the AdaLN modulation and output layers; randomise every parameter so
    # equivalence tests exercise every path instead of comparing zeros.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def tiny_transformer_inputs(model, batch: int = 2, text_len: int = 6, seed: int = 1):
    """Random (hidden_states, encoder_hidden_states, pooled_projections, timestep) for ``model``."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    context = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    timestep = torch.rand(batch, generator=g) * 1000
    return hidden, context, pooled, timestep


def tiny_flux_transformer(num_layers: int = 2, num_single_layers: int = 2, num_heads: int = 4, head_dim: int = 16,
                          guidance_embeds: bool = False, joint_attention_dim: int = 32, pooled_projection_dim: int = 24,
                          in_channels: int = 16, seed: int = 0):
    """A random ``FluxTransformer2DModel`` (double- and single-stream blocks), every parameter randomised."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=head_dim,
        num_attention_heads=num_heads, joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=guidance_embeds, axes_dims_rope=rope,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def tiny_flux_pipeline(seed: int = 0):
    """A real ``FluxPipeline`` with a random tiny transformer and the embedded tiny-sd3's VAE, CLIP (as
    ``CLIPTextModel``, pooled) and T5 with their tokenizers (32x32 images, 10 T5 tokens)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from common.paths import REPO_ROOT

    root = REPO_ROOT / "models" / "tiny-sd3"
    clip = CLIPTextModel.from_pretrained(root / "text_encoder")
    t5 = T5EncoderModel.from_pretrained(root / "text_encoder_3")
    transformer = tiny_flux_transformer(num_heads=2, head_dim=32, joint_attention_dim=t5.config.d_model,
                                        pooled_projection_dim=clip.config.hidden_size, seed=seed)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=clip.float().eval(), tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=t5.float().eval(), tokenizer_2=T5TokenizerFast.from_pretrained(root / "tokenizer_3"),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)
