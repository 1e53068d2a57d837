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
