"""FLUX.2 (``Flux2TransformerBlock`` double-stream and ``Flux2SingleTransformerBlock`` single-stream blocks of
``Flux2Transformer2DModel``): the adapter (units, structured groups inside fused projections and their
bookkeeping, sampling, export inputs, runtime module). Only the transformer is exported. Unit table, span
order and design notes: ``docs/families.md``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from families.base import FamilyAdapter, RuntimeModule, Span, StructuredGroup, packed_token_shapes
from families.components import TransformerComponent
from families.sd3 import attention_group, check_attention, set_attention_heads

DOUBLE = "Flux2TransformerBlock"
SINGLE = "Flux2SingleTransformerBlock"
ID_AXES = 4  # the pipeline's position ids: (t, h, w, l) per token


# ------------------------------------------------------------------------------------------------ groups
def swiglu_group(name: str, prefix: str, ff: nn.Module) -> StructuredGroup:
    """The hidden neurons of a ``Flux2FeedForward``: rows ``j`` (gate) and ``F + j`` (up) of the fused
    ``linear_in``, column ``j`` of ``linear_out`` (``F = linear_out.in_features``)."""
    width = int(ff.linear_out.in_features)
    inputs = (Span(f"{prefix}.linear_in", 0, width), Span(f"{prefix}.linear_in", 0, 0))  # up, then gate
    return StructuredGroup(name, "neurons", width, 1, (Span(f"{prefix}.linear_out", 1, 0),), inputs)


def parallel_groups(attn: nn.Module) -> list[StructuredGroup]:
    """Heads and MLP neurons of a ``Flux2ParallelSelfAttention`` (the single block's ``attn``).

    ``to_qkv_mlp_proj`` rows: ``[q (I) | k (I) | v (I) | gate (M) | up (M)]``; ``to_out`` columns:
    ``[attention (I) | MLP (M)]`` with ``I = heads * head_dim``, ``M = mlp_hidden_dim``.
    """
    inner, mlp = int(attn.heads * attn.head_dim), int(attn.mlp_hidden_dim)
    proj, out = "attn.to_qkv_mlp_proj", "attn.to_out"
    heads = StructuredGroup(
        "attn", "heads", int(attn.heads), int(attn.head_dim), (Span(out, 1, 0),), (Span(proj, 0, 2 * inner), Span(proj, 0, inner), Span(proj, 0, 0))
    )
    neurons = StructuredGroup("mlp", "neurons", mlp, 1, (Span(out, 1, inner),), (Span(proj, 0, 3 * inner + mlp), Span(proj, 0, 3 * inner)))
    return [heads, neurons]


def _sync_parallel_layout(attn: nn.Module) -> None:
    """Rewrite diffusers' tensor-parallel block layouts of the fused linears after a cut."""
    inner, mlp = attn.inner_dim, attn.mlp_hidden_dim
    attn.to_qkv_mlp_proj._tp_packed_col_blocks = [inner] * 3 + [mlp] * attn.mlp_mult_factor
    attn.to_out._tp_packed_row_blocks = [inner, mlp]


def check_parallel_attention(attn: nn.Module, head_dim: int, dim: int) -> None:
    """Assert every width ``Flux2ParallelSelfAttnProcessor`` uses agrees with the two fused linears."""
    inner, mlp = attn.heads * head_dim, attn.mlp_hidden_dim
    assert attn.head_dim == head_dim, f"attn.head_dim={attn.head_dim} != {head_dim}"
    assert attn.inner_dim == inner, f"attn.inner_dim={attn.inner_dim} != heads*head_dim={inner}"
    assert attn.mlp_mult_factor == 2, f"mlp_mult_factor={attn.mlp_mult_factor}: Flux2SwiGLU halves the MLP input"
    proj, out = attn.to_qkv_mlp_proj, attn.to_out
    assert proj.in_features == attn.query_dim == dim, f"to_qkv_mlp_proj.in_features={proj.in_features}: residual width changed"
    assert proj.out_features == 3 * inner + attn.mlp_mult_factor * mlp, f"to_qkv_mlp_proj.out_features={proj.out_features} != 3*{inner} + 2*{mlp}"
    # the processor's proportional split must land exactly on the q/k/v | MLP boundary
    qkv = 3 * attn.inner_dim
    assert proj.out_features * qkv // (qkv + attn.mlp_hidden_dim * attn.mlp_mult_factor) == qkv, "q/k/v | MLP split moved"
    assert out.in_features == inner + mlp, f"to_out.in_features={out.in_features} != {inner} + {mlp}"
    assert out.out_features == attn.out_dim == dim, f"to_out.out_features={out.out_features}: residual width changed"
    for name in ("norm_q", "norm_k"):
        w = getattr(getattr(attn, name, None), "weight", None)
        if w is not None:
            assert w.shape[-1] == head_dim, f"{name} acts on {w.shape[-1]} channels, head_dim is {head_dim}"
    if hasattr(proj, "_tp_packed_col_blocks"):
        assert list(proj._tp_packed_col_blocks) == [inner] * 3 + [mlp] * 2, f"stale _tp_packed_col_blocks {proj._tp_packed_col_blocks}"
    if hasattr(out, "_tp_packed_row_blocks"):
        assert list(out._tp_packed_row_blocks) == [inner, mlp], f"stale _tp_packed_row_blocks {out._tp_packed_row_blocks}"


def check_swiglu(ff: nn.Module, dim: int, where: str) -> None:
    assert ff.linear_in.out_features == 2 * ff.linear_out.in_features, f"{where}: linear_in gives {ff.linear_in.out_features} rows for {ff.linear_out.in_features} neurons (gate and up)"
    assert ff.linear_in.in_features == dim and ff.linear_out.out_features == dim, f"{where}: residual width changed"


# ------------------------------------------------------------------------------------------------ inputs
def image_ids(h: int, w: int) -> torch.Tensor:
    """``Flux2Pipeline._prepare_latent_ids`` for one image of ``h x w`` tokens: ``(h*w, 4)`` int64 (t=0, h, w, l=0)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))


def text_ids(length: int) -> torch.Tensor:
    """``Flux2Pipeline._prepare_text_ids`` for one prompt of ``length`` tokens: ``(length, 4)`` int64 (0, 0, 0, l)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))


class Flux2Adapter(FamilyAdapter):
    name = "flux2"
    transformer_class = "Flux2Transformer2DModel"
    pipeline_class = "Flux2Pipeline"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    unit_layers = {
        DOUBLE: (
            ("attn_in", ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
            ("attn_out", ("attn.to_out.0", "attn.to_add_out")),
            ("ff_in", ("ff.linear_in", "ff_context.linear_in")),
            ("ff_out", ("ff.linear_out", "ff_context.linear_out")),
        ),
        SINGLE: (
            ("qkv_mlp_in", ("attn.to_qkv_mlp_proj",)),
            ("attn_mlp_out", ("attn.to_out",)),
        ),
    }
    shared_inputs = (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))
    scope_note = (
        "only the nn.Linear layers inside the double- and single-stream blocks are pruned (double: q/k/v and "
        "context q/k/v, attention outputs, SwiGLU in/out of both streams; single: the fused qkv+MLP-in "
        "projection and the fused attention+MLP output); the shared AdaLN modulations, timestep/guidance "
        "embedders, x/context embedders and proj_out stay dense"
    )
    # Mistral-3 text encoder and the Flux.2 VAE have no export kind yet: see the module docstring.
    components = (TransformerComponent("transformer", "transformer"),)
    optional_text_encoder = None
    max_sequence_length = 512  # Flux2Pipeline's default: Mistral tokens per prompt
    text_seq_len = 512  # the transformer sees every encoded token (no pooled vector)

    def latent_patch(self, transformer_config: dict) -> int:
        return 2  # Flux2Pipeline packs 2x2 VAE latents into one token (the transformer's patch_size stays 1)

    # ---------------------------------------------------------------------------------------- groups
    def structured_groups(self, block: nn.Module) -> list[StructuredGroup]:
        kind = self.block_kind(block)
        if kind == DOUBLE:
            return [attention_group("attn", "attn", block.attn), swiglu_group("ff", "ff", block.ff), swiglu_group("ff_context", "ff_context", block.ff_context)]
        if kind == SINGLE:
            return parallel_groups(block.attn)
        raise TypeError(f"not a Flux.2 block: {kind}")

    def set_group_size(self, block: nn.Module, name: str, size: int) -> None:
        kind = self.block_kind(block)
        attn = block.attn
        if kind == DOUBLE:
            if name == "attn":
                set_attention_heads(attn, size, attn.head_dim)
            # SwiGLU widths live in the linears themselves (Flux2SwiGLU halves at run time); the block's own
            # ``mlp_hidden_dim`` is a constructor record the forward never reads (ff and ff_context may differ)
            return
        if name == "attn":
            attn.heads = size
            attn.inner_dim = size * attn.head_dim
        elif name == "mlp":
            attn.mlp_hidden_dim = size
        else:
            raise KeyError(f"single-stream blocks have no group {name!r}")
        _sync_parallel_layout(attn)

    def check_block(self, block: nn.Module, model: nn.Module) -> None:
        dim = model.config.num_attention_heads * model.config.attention_head_dim
        head_dim = self.head_dim(model)
        attn = block.attn
        assert not getattr(attn, "fused_projections", False), "fused q/k/v projections (fuse_qkv_projections) are not supported; unfuse first"
        if self.block_kind(block) == DOUBLE:
            assert attn.head_dim == head_dim, f"attn.head_dim={attn.head_dim} != {head_dim}"
            check_attention(attn, head_dim)
            assert attn.to_q.in_features == dim and attn.add_q_proj.in_features == dim, "residual width changed"
            assert attn.to_out[0].out_features == dim and attn.to_add_out.out_features == dim, "residual width changed"
            check_swiglu(block.ff, dim, "ff")
            check_swiglu(block.ff_context, dim, "ff_context")
        else:
            check_parallel_attention(attn, head_dim, dim)

    # ----------------------------------------------------------------------------------- calibration
    def noise(self, pipe, height: int, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        """``(1, in_channels, height // (2 * vae_scale), width // (2 * vae_scale))``: the patchified latent
        ``Flux2Pipeline.prepare_latents`` draws (and takes as ``latents=``) before packing it to tokens."""
        channels = pipe.transformer.config.in_channels  # 4 x the VAE's latent channels (2x2 patches)
        f = pipe.vae_scale_factor * 2
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(1, channels, height // f, width // f, generator=g).to(dtype)  # (1, C, h/2, w/2)

    def guidance_kwargs(self, pipe, guidance: float, batch: int) -> dict[str, Any]:
        return {"guidance_scale": guidance}  # embedded guidance (a transformer input), not CFG

    def runs_cfg_batch(self, guidance: float) -> bool:
        return False  # Flux2Pipeline is guidance-distilled: one transformer call per step, no negative branch

    # ---------------------------------------------------------------------------------------- export
    def transformer_for_onnx(self, model: nn.Module) -> nn.Module:
        return Flux2TransformerForOnnx(model.eval())

    def transformer_inputs(self, model, batch, latent_hw, text_seq_len, *, dtype=torch.float32, seed=0, device=None):
        """Inputs at ``latent_hw`` VAE latents (``h/2 * w/2`` image tokens of 2x2 patches) and ``text_seq_len``
        text tokens, in the layout ``Flux2Pipeline`` calls the transformer with: timestep in [0, 1] (the
        transformer multiplies by 1000), position ids ``(B, S, 4)`` int64 (the transformer reads batch 0)."""
        cfg = model.config
        h, w = latent_hw
        if h % 2 or w % 2:
            raise ValueError(f"latent_hw {latent_hw}: Flux.2 packs 2x2 latent patches, both sides must be even")
        tokens = (h // 2) * (w // 2)
        shapes = {
            "hidden_states": (batch, tokens, cfg.in_channels),  # (B, S_img, C)
            "encoder_hidden_states": (batch, text_seq_len, cfg.joint_attention_dim),  # (B, S_txt, D)
        }
        names = Flux2TransformerForOnnx.names_for(model)
        if device == "meta":
            out = {k: torch.empty(*s, device="meta", dtype=dtype) for k, s in shapes.items()}
            out["timestep"] = torch.empty(batch, device="meta")
            out["img_ids"] = torch.empty(batch, tokens, ID_AXES, device="meta", dtype=torch.long)
            out["txt_ids"] = torch.empty(batch, text_seq_len, ID_AXES, device="meta", dtype=torch.long)
            out["guidance"] = torch.empty(batch, device="meta")
        else:
            g = torch.Generator().manual_seed(seed)
            out = {k: torch.randn(*s, generator=g).to(dtype) for k, s in shapes.items()}
            out["timestep"] = torch.rand(batch, generator=g)  # (B,) float32, sigma in [0, 1]
            out["img_ids"] = image_ids(h // 2, w // 2).expand(batch, -1, -1).contiguous()  # (B, S_img, 4)
            out["txt_ids"] = text_ids(text_seq_len).expand(batch, -1, -1).contiguous()  # (B, S_txt, 4)
            out["guidance"] = 1.0 + 4.0 * torch.rand(batch, generator=g)  # (B,) float32 guidance scale
        return {k: out[k] for k in names}

    def transformer_dynamic_shapes(self, model, batch, latent_min=None, latent_max=None):
        """As Flux.1: the image token count varies, shared by the packed latents and their position ids."""
        return packed_token_shapes(super().transformer_dynamic_shapes(model, batch), batch, latent_min, latent_max)

    def runtime_transformer(self):
        return Flux2TransformerRuntime


class Flux2TransformerForOnnx(nn.Module):
    """``(hidden_states [B,S,C], encoder_hidden_states [B,L,D], timestep [B] fp32 in [0,1], img_ids [B,S,4] int64,
    txt_ids [B,L,4] int64[, guidance [B] fp32]) -> sample [B,S,C]``; ``guidance`` only for ``guidance_embeds`` models.

    RoPE frequencies are computed inside the graph from the ids, in float64 as diffusers does on CPU/CUDA.
    """

    output_names = ("sample",)

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.model = transformer
        self.input_names = self.names_for(transformer)

    @staticmethod
    def names_for(model: nn.Module) -> tuple[str, ...]:
        names = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")
        return names + (("guidance",) if model.config.guidance_embeds else ())

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None):
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]


class Flux2TransformerRuntime(RuntimeModule):
    """``Flux2Transformer2DModel``'s call signature over an exported transformer."""

    def forward(
        self,
        hidden_states,
        encoder_hidden_states=None,
        timestep=None,
        img_ids=None,
        txt_ids=None,
        guidance=None,
        joint_attention_kwargs=None,
        return_dict=True,
        kv_cache=None,
        kv_cache_mode=None,
        **_: Any,
    ):
        if kv_cache is not None or kv_cache_mode is not None:
            from common.errors import UserError

            raise UserError("reference-image KV caching needs the PyTorch transformer; it is not available with exported engines")
        batch = hidden_states.shape[0]

        def ids(t: torch.Tensor) -> torch.Tensor:  # the engine's ids carry the batch dimension of the other inputs
            t = t if t.ndim == 3 else t[None]
            return t[:1].expand(batch, -1, -1)

        feeds = {
            "hidden_states": hidden_states,  # (B, S_img, C)
            "encoder_hidden_states": encoder_hidden_states,  # (B, S_txt, D)
            "timestep": timestep.float().reshape(-1).expand(batch),  # (B,) sigma in [0, 1]
            "img_ids": ids(img_ids),  # (B, S_img, 4)
            "txt_ids": ids(txt_ids),  # (B, S_txt, 4)
        }
        if getattr(self.config, "guidance_embeds", False):
            if guidance is None:
                from common.errors import UserError

                raise UserError("this Flux.2 transformer embeds a guidance scale but the pipeline passed none")
            feeds["guidance"] = guidance.float().reshape(-1).expand(batch)  # (B,)
        out = self.runner(feeds)["sample"]
        return self._sample_output(self._out(out), return_dict)  # (B, S_img, C)
