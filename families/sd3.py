"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``, MMDiT): the adapter (units, structured groups and
their fix-up, sampling, export inputs, runtime module) and the attention/FFN group helpers Flux reuses.
Unit table and design notes: ``docs/families.md``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from families.base import FamilyAdapter, RuntimeModule, Span, StructuredGroup, get_module
from families.components import CLIP_G, CLIP_L, T5_XXL, ClipProjection, T5Encoder, TransformerComponent, VaeDecoder

_QKV = ("to_q", "to_k", "to_v")
# Version-1 plans and compact descriptions (SD3 only, before the adapters) named the groups by field.
V1_PLAN_FIELDS = {"keep_heads": "attn", "keep_heads_attn2": "attn2", "keep_ff": "ff", "keep_ff_context": "ff_context"}
V1_COMPACT_SIZES = {"heads": "attn", "heads_attn2": "attn2", "ff_dim": "ff", "ff_context_dim": "ff_context"}
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def attention_head_dim(attn: nn.Module) -> int:
    """Head size of a diffusers ``Attention`` as its processor sees it (``to_k.out_features // heads``)."""
    return attn.to_k.out_features // attn.heads


def set_attention_heads(attn: nn.Module, heads: int, head_dim: int) -> None:
    """The bookkeeping of a diffusers ``Attention``/``FluxAttention`` after a head cut."""
    attn.heads = heads
    if hasattr(attn, "sliceable_head_dim"):
        attn.sliceable_head_dim = heads
    attn.inner_dim = heads * head_dim
    if hasattr(attn, "inner_kv_dim"):
        attn.inner_kv_dim = heads * head_dim


def check_attention(attn: nn.Module, head_dim: int, *, out: str | None = "to_out.0") -> None:
    """Assert that every projection of ``attn`` agrees with ``attn.heads * head_dim`` and the q/k norms
    act on ``head_dim`` channels."""
    inner = attn.heads * head_dim
    assert attn.inner_dim == inner and getattr(attn, "inner_kv_dim", inner) == inner, (attn.inner_dim, inner)
    for name in _QKV + _ADD_QKV:
        lin = getattr(attn, name, None)
        if lin is not None:
            assert lin.out_features == inner, f"{name}.out_features={lin.out_features} != heads*head_dim={inner}"
    if out is not None:
        o = get_module(attn, out)
        assert o.in_features == inner, f"{out}.in_features={o.in_features} != {inner}"
        assert o.out_features == attn.out_dim
    if getattr(attn, "to_add_out", None) is not None:
        assert attn.to_add_out.in_features == inner, f"to_add_out.in_features={attn.to_add_out.in_features} != {inner}"
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        w = getattr(getattr(attn, name, None), "weight", None)
        if w is not None:
            assert w.shape[-1] == head_dim, f"{name} acts on {w.shape[-1]} channels, head_dim is {head_dim}"


def attention_group(name: str, prefix: str, attn: nn.Module, *, out: str = "to_out.0", extra_out: tuple[str, ...] = ("to_add_out",)) -> StructuredGroup:
    """The heads of a diffusers attention at ``prefix`` inside the block: rows of q/k/v (and the context
    branch's add_q/k/v), columns of its output projection(s)."""
    hd = attention_head_dim(attn)
    inputs = tuple(Span(f"{prefix}.{n}", 0) for n in _QKV + _ADD_QKV if getattr(attn, n, None) is not None)
    outputs = tuple(Span(f"{prefix}.{n}", 1) for n in (out,) + extra_out if isinstance(get_module(attn, n), nn.Linear))
    return StructuredGroup(name, "heads", int(attn.heads), hd, outputs, inputs)


def feedforward_group(name: str, prefix: str, ff: nn.Module) -> StructuredGroup:
    """The hidden neurons of a diffusers ``FeedForward`` (GELU): rows of ``net.0.proj``, columns of ``net.2``."""
    return StructuredGroup(name, "neurons", int(ff.net[2].in_features), 1, (Span(f"{prefix}.net.2", 1),), (Span(f"{prefix}.net.0.proj", 0),))


def check_feedforward(ff: nn.Module, dim: int, where: str) -> None:
    assert ff.net[0].proj.out_features == ff.net[2].in_features, f"{where}: FFN hidden widths disagree"
    assert ff.net[2].out_features == dim, f"{where}: residual width changed"


# Transformer configs as published with the hub checkpoints (transformer/config.json), minus sample_size.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "sd3-medium": dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
        dual_attention_layers=(), qk_norm=None,
    ),
    "sd3.5-medium": dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ),
    "sd3.5-large": dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
        dual_attention_layers=(), qk_norm="rms_norm",
    ),
}
PUBLISHED_CONFIGS["sd3.5-large-turbo"] = PUBLISHED_CONFIGS["sd3.5-large"]  # the distilled model keeps the architecture
# The SD3 VAE (vae/config.json of every SD3 / SD3.5 checkpoint).
PUBLISHED_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)


class SD3Adapter(FamilyAdapter):
    name = "sd3"
    transformer_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    block_lists = ("transformer_blocks",)
    unit_layers = {
        "JointTransformerBlock": (
            ("attn_in", ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
            ("attn_out", ("attn.to_out.0", "attn.to_add_out")),
            ("attn2_in", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
            ("attn2_out", ("attn2.to_out.0",)),
            ("ff_in", ("ff.net.0.proj", "ff_context.net.0.proj")),
            ("ff_out", ("ff.net.2", "ff_context.net.2")),
        )
    }
    shared_inputs = (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), ("attn2.to_q", "attn2.to_k", "attn2.to_v"))
    modulation_layers = {"JointTransformerBlock": ("norm1.linear", "norm1_context.linear")}
    scope_note = (
        "only the nn.Linear layers inside the transformer blocks are pruned (attention q/k/v and context "
        "q/k/v, attention outputs, FFN in/out); AdaLN modulations (norm*.linear), embedders, context embedder "
        "and proj_out stay dense"
    )
    components = (
        TransformerComponent("transformer", "transformer"),
        ClipProjection("text_encoder", "text_encoder"),
        ClipProjection("text_encoder_2", "text_encoder_2"),
        T5Encoder("text_encoder_3", "text_encoder_3"),
        VaeDecoder("vae_decoder", "vae"),
    )
    optional_text_encoder = "text_encoder_3"
    text_seq_len = 77 + 256  # CLIP tokens + T5 tokens
    # Kept in higher precision under INT8/FP8. ModelOpt's diffusers example (filter_func_default) skips the
    # patch embedder (pos_embed, a Conv2d), time/text embedders, context_embedder and norm_out; ModelOpt's
    # stock mtq.INT8_DEFAULT_CFG/FP8_DEFAULT_CFG also skip ``*proj_out.*``. Deviation: every AdaLN modulation
    # (``*norm*``: norm1.linear, norm1_context.linear, norm_out.linear, and the LayerNorms next to them) stays
    # high precision too: those linears run once per sample on the time embedding (no token dimension,
    # negligible FLOPs) but their shift/scale/gate multiply every token of the block, and stage 1 leaves them
    # dense. The top-level proj_out writes the prediction itself, for a small share of the GEMM FLOPs.
    quant_exclude = ("pos_embed", "time_text_embed", "context_embedder", "*norm*", "proj_out")
    published_configs = PUBLISHED_CONFIGS
    published_vae_config = PUBLISHED_VAE_CONFIG
    published_text_encoders = {
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": ("T5EncoderModel", T5_XXL),
    }
    v1_plan_fields = V1_PLAN_FIELDS  # version-1 plans and compact checkpoints were SD3-only: their field names
    v1_compact_sizes = V1_COMPACT_SIZES

    def structured_groups(self, block: nn.Module) -> list[StructuredGroup]:
        groups = [attention_group("attn", "attn", block.attn)]
        if getattr(block, "attn2", None) is not None:
            groups.append(attention_group("attn2", "attn2", block.attn2, extra_out=()))
        groups.append(feedforward_group("ff", "ff", block.ff))
        if getattr(block, "ff_context", None) is not None:
            groups.append(feedforward_group("ff_context", "ff_context", block.ff_context))
        return groups

    def set_group_size(self, block: nn.Module, name: str, size: int) -> None:
        if name in ("attn", "attn2"):
            attn = getattr(block, name)
            set_attention_heads(attn, size, attn.to_q.out_features // size)
        # FFN widths live in the linears themselves: nothing to fix

    def check_block(self, block: nn.Module, model: nn.Module) -> None:
        dim = model.config.num_attention_heads * model.config.attention_head_dim
        head_dim = self.head_dim(model)
        for attn in (block.attn, getattr(block, "attn2", None)):
            if attn is None:
                continue
            check_attention(attn, head_dim)
            assert attn.to_q.in_features == dim and attn.to_out[0].out_features == dim, "residual width changed"
        check_feedforward(block.ff, dim, "ff")
        if block.ff_context is not None:
            check_feedforward(block.ff_context, dim, "ff_context")
        else:
            assert block.context_pre_only and block.attn.to_add_out is None, "only the context_pre_only block lacks ff_context"

    # ----------------------------------------------------------------------------------- calibration
    def noise(self, pipe, height: int, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        channels = pipe.transformer.config.in_channels
        scale = pipe.vae_scale_factor
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(1, channels, height // scale, width // scale, generator=g).to(dtype)  # (1, C, h, w)

    # ---------------------------------------------------------------------------------------- export
    def transformer_for_onnx(self, model: nn.Module) -> nn.Module:
        return SD3TransformerForOnnx(model.eval())

    def transformer_inputs(self, model, batch, latent_hw, text_seq_len, *, dtype=torch.float32, seed=0, device=None):
        cfg = model.config
        h, w = latent_hw
        if device == "meta":
            rnd = lambda *shape: torch.empty(*shape, device="meta", dtype=dtype)  # noqa: E731
            ts = torch.empty(batch, device="meta")
        else:
            g = torch.Generator().manual_seed(seed)
            rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
            ts = None
        out = {
            "hidden_states": rnd(batch, cfg.in_channels, h, w),  # (B, C, h, w)
            "encoder_hidden_states": rnd(batch, text_seq_len, cfg.joint_attention_dim),  # (B, S, D)
            "pooled_projections": rnd(batch, cfg.pooled_projection_dim),  # (B, P)
        }
        out["timestep"] = ts if ts is not None else torch.rand(batch, generator=g) * 1000  # (B,) float32
        return out

    def transformer_dynamic_shapes(self, model, batch, latent_min=None, latent_max=None):
        """Latent height and width vary in steps of the patch size (the position embedding is cropped to the
        token grid; at most ``pos_embed_max_size`` tokens per side)."""
        shapes = super().transformer_dynamic_shapes(model, batch)
        if latent_min is not None and latent_max is not None and tuple(latent_min) != tuple(latent_max):
            import torch.export

            p = int(model.config.patch_size)
            h = torch.export.Dim("tokens_h", min=max(1, latent_min[0] // p), max=max(2, latent_max[0] // p))
            w = torch.export.Dim("tokens_w", min=max(1, latent_min[1] // p), max=max(2, latent_max[1] // p))
            shapes["hidden_states"] = {0: batch, 2: p * h, 3: p * w}
        return shapes

    def runtime_transformer(self):
        return SD3TransformerRuntime

    def tiny_config(self, config):
        heads, head_dim = 2, 32
        dual = (0,) if config.get("dual_attention_layers") else ()
        return {**config, "num_layers": 1, "num_attention_heads": heads, "attention_head_dim": head_dim, "joint_attention_dim": 64,
                "caption_projection_dim": heads * head_dim, "pooled_projection_dim": 32, "pos_embed_max_size": 16, "dual_attention_layers": dual}


class SD3TransformerForOnnx(nn.Module):
    """``(hidden_states [B,C,h,w], encoder_hidden_states [B,S,D], pooled_projections [B,P], timestep [B] fp32) -> sample``."""

    input_names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
    output_names = ("sample",)

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.model = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.model(hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict=False)[0]


class SD3TransformerRuntime(RuntimeModule):
    """``SD3Transformer2DModel``'s call signature over an exported transformer."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, joint_attention_kwargs=None, return_dict=False, skip_layers=None, **_: Any):
        if skip_layers:
            from common.errors import UserError

            raise UserError("skip-layer guidance needs the PyTorch transformer; it is not available with exported engines")
        out = self.runner(
            {
                "hidden_states": hidden_states,  # (B, C, h, w)
                "encoder_hidden_states": encoder_hidden_states,  # (B, S, D)
                "pooled_projections": pooled_projections,  # (B, P)
                "timestep": timestep,  # (B,) scheduler timestep, 0..1000
            }
        )["sample"]
        return self._sample_output(self._out(out), return_dict)  # (B, C, h, w)
