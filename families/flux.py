"""Flux.1 (``FluxTransformer2DModel``): the adapter (double- and single-stream units, structured groups,
packed-latent sampling and guidance, export inputs, runtime module). Unit table and design notes:
``docs/families.md``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from families.base import FamilyAdapter, RuntimeModule, Span, StructuredGroup, packed_token_shapes
from families.components import CLIP_L, T5_XXL, ClipPooled, T5Encoder, TransformerComponent, VaeDecoder
from families.sd3 import attention_group, check_attention, check_feedforward, feedforward_group, set_attention_heads


# Transformer configs as published with the hub checkpoints (transformer/config.json).
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "flux.1-dev": dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    ),
    "flux.1-schnell": dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
    ),
}
# The FLUX.1 VAE (vae/config.json of both checkpoints): SD3's layout, with its own latent statistics.
PUBLISHED_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)


class FluxAdapter(FamilyAdapter):
    name = "flux"
    transformer_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    unit_layers = {
        "FluxTransformerBlock": (
            ("attn_in", ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
            ("attn_out", ("attn.to_out.0", "attn.to_add_out")),
            ("ff_in", ("ff.net.0.proj", "ff_context.net.0.proj")),
            ("ff_out", ("ff.net.2", "ff_context.net.2")),
        ),
        "FluxSingleTransformerBlock": (
            ("attn_in", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
            ("out", ("proj_out",)),
        ),
    }
    # In a single block proj_mlp reads the same normed tensor as q/k/v, and runs first (the first layer of a
    # shared group is the one the Hessian hooks see first); double blocks have no proj_mlp.
    shared_inputs = (("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))
    modulation_layers = {"FluxTransformerBlock": ("norm1.linear", "norm1_context.linear"), "FluxSingleTransformerBlock": ("norm.linear",)}
    scope_note = (
        "only the nn.Linear layers inside the double- and single-stream blocks are pruned (attention q/k/v and "
        "context q/k/v, attention outputs, FFN in/out, single-block proj_mlp and proj_out); AdaLN modulations "
        "(norm*.linear), embedders (x/context/time/guidance) and the final proj_out stay dense"
    )
    components = (
        TransformerComponent("transformer", "transformer"),
        ClipPooled("text_encoder", "text_encoder"),
        T5Encoder("text_encoder_2", "text_encoder_2"),
        VaeDecoder("vae_decoder", "vae"),
    )
    max_sequence_length = 512
    text_seq_len = 512  # T5 tokens only (CLIP gives the pooled vector)
    # Kept in higher precision under INT8/FP8: as ModelOpt's diffusers example for FLUX (filter_func_default:
    # x_embedder, time_text_embed with its time/guidance/text embedders, context_embedder, norm_out), plus every
    # AdaLN modulation (``*norm*``: norm1/norm1_context/norm.linear, norm_out; see the SD3 adapter for why) and
    # the model's final proj_out. The pattern is the top-level name only: a single block's proj_out (pruned by
    # stage 1, the biggest GEMM of the block) is quantized, unlike ModelOpt's stock configs whose
    # ``*proj_out.*`` rule would silently keep it in high precision.
    quant_exclude = ("x_embedder", "time_text_embed", "context_embedder", "*norm*", "proj_out")
    published_configs = PUBLISHED_CONFIGS
    published_vae_config = PUBLISHED_VAE_CONFIG
    published_text_encoders = {"text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("T5EncoderModel", T5_XXL)}

    def latent_patch(self, transformer_config: dict) -> int:
        return 2  # FluxPipeline packs 2x2 VAE latents into one token

    def structured_groups(self, block: nn.Module) -> list[StructuredGroup]:
        if type(block).__name__ == "FluxSingleTransformerBlock":
            attn = block.attn
            hd = attn.to_k.out_features // attn.heads
            inner = attn.heads * hd
            return [
                StructuredGroup("attn", "heads", int(attn.heads), hd, (Span("proj_out", 1, 0),), tuple(Span(f"attn.{n}", 0) for n in ("to_q", "to_k", "to_v"))),
                StructuredGroup("mlp", "neurons", int(block.proj_mlp.out_features), 1, (Span("proj_out", 1, inner),), (Span("proj_mlp", 0),)),
            ]
        return [attention_group("attn", "attn", block.attn), feedforward_group("ff", "ff", block.ff), feedforward_group("ff_context", "ff_context", block.ff_context)]

    def set_group_size(self, block: nn.Module, name: str, size: int) -> None:
        if name == "attn":
            set_attention_heads(block.attn, size, block.attn.head_dim)
        elif name == "mlp":
            block.mlp_hidden_dim = size
        if hasattr(block, "proj_out") and hasattr(block.proj_out, "_tp_packed_row_blocks"):  # tensor-parallel split of proj_out's input
            block.proj_out._tp_packed_row_blocks = [block.attn.inner_dim, block.proj_mlp.out_features]

    def check_block(self, block: nn.Module, model: nn.Module) -> None:
        dim = model.inner_dim
        hd = self.head_dim(model)
        attn = block.attn
        assert attn.head_dim == hd, f"attn.head_dim {attn.head_dim} != {hd}"
        assert attn.to_q.in_features == dim, "residual width changed"
        if type(block).__name__ == "FluxSingleTransformerBlock":
            check_attention(attn, hd, out=None)
            assert block.mlp_hidden_dim == block.proj_mlp.out_features, "mlp_hidden_dim disagrees with proj_mlp"
            assert block.proj_out.in_features == attn.heads * hd + block.proj_mlp.out_features, "proj_out input != attention + MLP widths"
            assert block.proj_out.out_features == dim, "residual width changed"
        else:
            check_attention(attn, hd)
            check_feedforward(block.ff, dim, "ff")
            check_feedforward(block.ff_context, dim, "ff_context")

    # ----------------------------------------------------------------------------------- calibration
    def noise(self, pipe, height: int, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        channels = pipe.transformer.config.in_channels // 4
        h = 2 * (int(height) // (pipe.vae_scale_factor * 2))
        w = 2 * (int(width) // (pipe.vae_scale_factor * 2))
        g = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(1, channels, h, w, generator=g)  # (1, C, h, w), as FluxPipeline draws them
        return type(pipe)._pack_latents(latents, 1, channels, h, w).to(dtype)  # (1, h/2 * w/2, 4C)

    def guidance_kwargs(self, pipe, guidance: float, batch: int) -> dict[str, Any]:
        if pipe.transformer.config.guidance_embeds:
            return {"guidance_scale": guidance}  # FLUX.1-dev: guidance is an input of the transformer
        if guidance > 1.0:  # true classifier-free guidance: a second, unconditional call per step
            return {"true_cfg_scale": guidance, "negative_prompt": [""] * batch}
        return {}

    def runs_cfg_batch(self, guidance: float) -> bool:
        return guidance > 1.0

    # ---------------------------------------------------------------------------------------- export
    def transformer_for_onnx(self, model: nn.Module) -> nn.Module:
        return FluxTransformerForOnnx(model.eval())

    def transformer_inputs(self, model, batch, latent_hw, text_seq_len, *, dtype=torch.float32, seed=0, device=None):
        cfg = model.config
        h, w = latent_hw
        tokens = (h // 2) * (w // 2)
        if device == "meta":
            rnd = lambda *shape, dt=dtype: torch.empty(*shape, device="meta", dtype=dt)  # noqa: E731
            uni = rnd
        else:
            g = torch.Generator().manual_seed(seed)
            rnd = lambda *shape, dt=dtype: torch.randn(*shape, generator=g).to(dt)  # noqa: E731
            uni = lambda *shape, dt=torch.float32: torch.rand(*shape, generator=g).to(dt)  # noqa: E731
        out = {
            "hidden_states": rnd(batch, tokens, cfg.in_channels),  # (B, N, 4C) packed latents
            "encoder_hidden_states": rnd(batch, text_seq_len, cfg.joint_attention_dim),  # (B, S, D) T5
            "pooled_projections": rnd(batch, cfg.pooled_projection_dim),  # (B, P) CLIP pooled
            "timestep": uni(batch, dt=torch.float32),  # (B,) in [0, 1] (the pipeline passes t / 1000)
            "img_ids": _image_ids(batch, h // 2, w // 2, device),  # (B, N, 3)
            "txt_ids": torch.zeros(batch, text_seq_len, 3, device=device),  # (B, S, 3)
        }
        if cfg.guidance_embeds:
            out["guidance"] = (uni(batch, dt=torch.float32) * 5) if device != "meta" else torch.empty(batch, device="meta")  # (B,)
        return out

    def transformer_dynamic_shapes(self, model, batch, latent_min=None, latent_max=None):
        """The image token count ``(h/2) * (w/2)`` varies (one dim shared by the packed latents and their
        position ids: any aspect ratio with that many tokens exports the same graph)."""
        return packed_token_shapes(super().transformer_dynamic_shapes(model, batch), batch, latent_min, latent_max)

    def runtime_transformer(self):
        return FluxTransformerRuntime

    def tiny_config(self, config):
        heads, head_dim = 2, 32
        return {**config, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": heads, "attention_head_dim": head_dim,
                "joint_attention_dim": 64, "pooled_projection_dim": 32, "axes_dims_rope": (8, 12, 12)}


def _image_ids(batch: int, h: int, w: int, device=None) -> torch.Tensor:
    """``FluxPipeline._prepare_latent_image_ids`` with a leading batch dim: ``(B, h*w, 3)`` = (0, row, col)."""
    ids = torch.zeros(h, w, 3, device=device)
    if device != "meta":
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1).contiguous()


class FluxTransformerForOnnx(nn.Module):
    """``(hidden_states [B,N,4C], encoder_hidden_states [B,S,D], pooled_projections [B,P], timestep [B] fp32,
    img_ids [B,N,3], txt_ids [B,S,3][, guidance [B] fp32]) -> sample [B,N,4C]``.

    The position ids carry a batch dim (every row the same) so that every input of every exported component
    is batch-major: engine profiles, batch chunking and Triton's implicit batch then treat all inputs alike.
    """

    output_names = ("sample",)

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.model = transformer
        self.guidance = bool(transformer.config.guidance_embeds)
        self.input_names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids") + (("guidance",) if self.guidance else ())

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None):
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            guidance=guidance,
            return_dict=False,
        )[0]


class FluxTransformerRuntime(RuntimeModule):
    """``FluxTransformer2DModel``'s call signature over an exported transformer."""

    def cache_context(self, name: str):  # FluxPipeline wraps each call in the cache context of diffusers' hooks
        import contextlib

        return contextlib.nullcontext()

    def forward(self, hidden_states, timestep, pooled_projections, encoder_hidden_states, txt_ids, img_ids, guidance=None,
                joint_attention_kwargs=None, return_dict=False, **_: Any):
        batch = hidden_states.shape[0]
        feeds = {
            "hidden_states": hidden_states,  # (B, N, 4C)
            "encoder_hidden_states": encoder_hidden_states,  # (B, S, D)
            "pooled_projections": pooled_projections,  # (B, P)
            "timestep": timestep.float(),  # (B,) t / 1000
            "img_ids": img_ids.float().unsqueeze(0).expand(batch, -1, -1),  # (B, N, 3)
            "txt_ids": txt_ids.float().unsqueeze(0).expand(batch, -1, -1),  # (B, S, 3)
        }
        if self.config.guidance_embeds:
            feeds["guidance"] = guidance.float()  # (B,)
        out = self.runner(feeds)["sample"]
        return self._sample_output(self._out(out), return_dict)  # (B, N, 4C)
