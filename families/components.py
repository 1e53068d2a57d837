"""The components a family exports, one description each (as demoDiffusion has one class per network).

A family adapter lists its components (:attr:`families.base.FamilyAdapter.components`) as instances of the
classes here, one class per kind: the pipeline attribute the component replaces, its ONNX wrapper (with the
I/O names stage 3 shares), example inputs, dynamic axes, engine-profile input shapes, the runtime module that
stands in for it in the pipeline, and what the export and the TensorRT build may do with it (float16 or
float32 only, sparse-weight tactics). Export (stage 2), the engine build and the runner read them here.

- :class:`TransformerComponent`: every fact comes from the family adapter (``transformer_for_onnx``...);
- :class:`ClipProjection`: ``CLIPTextModelWithProjection`` (SD3's two CLIP encoders);
- :class:`ClipPooled`: ``CLIPTextModel`` read for its pooled output (Flux's CLIP);
- :class:`T5Encoder`: ``T5EncoderModel`` (SD3's ``text_encoder_3``, Flux's ``text_encoder_2``);
- :class:`VaeDecoder`: ``AutoencoderKL.decode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from families.base import RuntimeModule

# make_inputs(batch, dtype, latent_hw=None) -> inputs by ONNX input name
MakeInputs = Callable[..., dict[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------------------
# ONNX wrappers: the I/O contract of each kind (names and meaning are shared with stage 3)
# --------------------------------------------------------------------------------------------------------


class ClipForOnnx(nn.Module):
    """``input_ids [B,L] int64 -> (text_embeds [B,P], penultimate_hidden_states [B,L,H])`` (SD3 uses ``hidden_states[-2]``)."""

    input_names = ("input_ids",)
    output_names = ("text_embeds", "penultimate_hidden_states")

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.model = encoder

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]


class ClipPooledForOnnx(nn.Module):
    """``input_ids [B,L] int64 -> pooler_output [B,H]`` (``CLIPTextModel``'s pooled output, as Flux reads it)."""

    input_names = ("input_ids",)
    output_names = ("pooler_output",)

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.model = encoder

    def forward(self, input_ids):
        return self.model(input_ids, output_hidden_states=False).pooler_output


class T5ForOnnx(nn.Module):
    """``input_ids [B,L] int64 -> last_hidden_state [B,L,D]``."""

    input_names = ("input_ids",)
    output_names = ("last_hidden_state",)

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.model = encoder

    def forward(self, input_ids):
        return self.model(input_ids)[0]


class VaeDecoderForOnnx(nn.Module):
    """``latent [B,C,h,w] (already latents / scaling_factor + shift_factor) -> sample [B,3,H,W]`` (nominally [-1, 1], not clamped)."""

    input_names = ("latent",)
    output_names = ("sample",)

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


# --------------------------------------------------------------------------------------------------------
# Runtime modules: what the diffusers pipeline calls in stage 3 (the transformer's come from the adapters)
# --------------------------------------------------------------------------------------------------------


class _ClipOutput(tuple):
    """``(text_embeds,)`` with ``.hidden_states`` whose ``[-2]`` is the penultimate layer, as the pipeline reads."""


class ClipAdapter(RuntimeModule):
    """``CLIPTextModelWithProjection`` as the SD3 pipeline calls it."""

    def forward(self, input_ids, output_hidden_states=True, **_):
        o = self.runner({"input_ids": input_ids})
        out = _ClipOutput((self._out(o["text_embeds"]),))  # (B, P_i)
        out.hidden_states = (self._out(o["penultimate_hidden_states"]), None)  # [-2]: (B, L, H_i)
        return out


class ClipPooledAdapter(RuntimeModule):
    """``CLIPTextModel`` as Flux's pipeline calls it (it reads ``pooler_output``)."""

    def forward(self, input_ids, output_hidden_states=False, **_):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=self._out(self.runner({"input_ids": input_ids})["pooler_output"]))  # (B, H)


class T5Adapter(RuntimeModule):
    """``T5EncoderModel``: ``input_ids -> (last_hidden_state,)``."""

    def forward(self, input_ids, **_):
        return (self._out(self.runner({"input_ids": input_ids})["last_hidden_state"]),)  # (B, L, D)


class VaeDecoderAdapter(RuntimeModule):
    """``AutoencoderKL.decode`` over an exported decoder (input already ``latents / scaling + shift``)."""

    def forward(self, z):
        return self._out(self.runner({"latent": z})["sample"])  # (B, 3, H, W) in [-1, 1]

    def decode(self, z, return_dict=False, **_):
        sample = self(z)
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=sample)
        return (sample,)


# --------------------------------------------------------------------------------------------------------
# Example inputs
# --------------------------------------------------------------------------------------------------------


def token_inputs(vocab_size: int, batch: int, seq_len: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab_size, (batch, seq_len), generator=g, dtype=torch.long)}  # (B, L)


def latent_inputs(channels: int, batch: int, latent_hw: tuple[int, int], *, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"latent": torch.randn(batch, channels, *latent_hw, generator=g).to(dtype)}  # (B, C, h, w)


# --------------------------------------------------------------------------------------------------------
# Text encoders as published with the hub checkpoints (``text_encoder*/config.json``: the transformers config
# keyword arguments that decide the shapes): random-weight stand-ins and size arithmetic with no download
# --------------------------------------------------------------------------------------------------------

# OpenAI CLIP ViT-L/14's text tower (SD3's ``text_encoder``, Flux's ``text_encoder``): 123M parameters.
CLIP_L: dict = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    bos_token_id=0, eos_token_id=2, pad_token_id=1)
# OpenCLIP ViT-bigG/14's text tower (SD3's ``text_encoder_2``): 695M parameters.
CLIP_G: dict = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu", layer_norm_eps=1e-5,
                    bos_token_id=0, eos_token_id=2, pad_token_id=1)
# google/t5-v1_1-xxl's encoder (SD3's ``text_encoder_3``, Flux's ``text_encoder_2``): 4.76B parameters.
T5_XXL: dict = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                    dense_act_fn="gelu_new", layer_norm_epsilon=1e-6, tie_word_embeddings=False, decoder_start_token_id=0,
                    eos_token_id=1, pad_token_id=0)


# --------------------------------------------------------------------------------------------------------
# Component descriptions
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One exported component of a family: its ONNX/engine ``name`` and the pipeline attribute ``attr`` it
    replaces; the subclass (its ``kind``) knows the rest.

    keep_fp32: exported in float32 whatever the precision asked for. sparse_weights: stage 1 prunes it, so
    the engine build may use sparse-weight tactics. weight_only: may be exported with weight-only INT8/INT4
    linear layers for ONNX Runtime (``--others-precision int8|int4``; :mod:`export.encoder_quant`). spatial:
    its input shapes follow the latent resolution (dynamic height/width when several resolutions are served;
    engine profiles per resolution).
    """

    name: str
    attr: str

    kind: ClassVar[str] = ""
    keep_fp32: ClassVar[bool] = False
    sparse_weights: ClassVar[bool] = False
    weight_only: ClassVar[bool] = False
    spatial: ClassVar[bool] = False

    def wrapper(self, module: nn.Module) -> nn.Module:
        """The ONNX wrapper of the loaded component (``input_names``/``output_names``; positional inputs)."""
        raise NotImplementedError

    def example_inputs(self, module: nn.Module, *, latent_hw: tuple[int, int] | None = None, seq_len: int | None = None) -> MakeInputs:
        """``make(batch, dtype, latent_hw=None)``: random inputs by ONNX input name (seeded by the batch); float
        tensors in ``dtype`` except the transformer's ``timestep`` (always float32)."""
        raise NotImplementedError

    def dynamic_shapes(self, module: nn.Module, latent_min: tuple[int, int], latent_max: tuple[int, int]):
        """``torch.export`` dynamic axes given the batch ``Dim`` over latents ``latent_min..latent_max``, or
        None (the batch only; also when the two are equal: one resolution keeps static spatial dims)."""
        return None

    def input_shapes(self, module: nn.Module, batch: int, latent_hw: tuple[int, int], text_seq_len: int) -> dict[str, list[int]] | None:
        """Input shapes by name at one batch and latent size (engine profiles), or None when only the batch
        varies (the build then takes the profile from the batch range)."""
        return None

    def runtime_module(self, adapter) -> type[RuntimeModule]:
        """The module class that stands in for the component in the pipeline (stage 3), built as
        ``cls(runner, config, dtype, device)``."""
        raise NotImplementedError

    def sequence_length(self, spec) -> int | None:
        """Tokens per prompt the exported text encoder takes (None for other kinds)."""
        return None


@dataclass(frozen=True)
class TransformerComponent(Component):
    """The denoising transformer: wrapper, inputs, axes and runtime module from the family adapter."""

    kind: ClassVar[str] = "transformer"
    sparse_weights: ClassVar[bool] = True
    spatial: ClassVar[bool] = True

    def wrapper(self, module):
        from families import adapter_for

        return adapter_for(module).transformer_for_onnx(module.eval())

    def example_inputs(self, module, *, latent_hw=None, seq_len=None):
        from families import adapter_for

        adapter = adapter_for(module)

        def make(batch, dtype, hw=None):
            return adapter.transformer_inputs(module, batch, hw or latent_hw, seq_len, dtype=dtype, seed=batch)

        return make

    def dynamic_shapes(self, module, latent_min, latent_max):
        if tuple(latent_min) == tuple(latent_max):
            return None
        from families import adapter_for

        adapter = adapter_for(module)
        return lambda batch: adapter.transformer_dynamic_shapes(module, batch, latent_min, latent_max)

    def input_shapes(self, module, batch, latent_hw, text_seq_len):
        from families import adapter_for

        return adapter_for(module).transformer_input_shapes(module, batch, latent_hw, text_seq_len)

    def runtime_module(self, adapter):
        return adapter.runtime_transformer()


@dataclass(frozen=True)
class _TextEncoder(Component):
    """A text encoder taking ``input_ids``; its tokenizer is the pipeline attribute named like it."""

    weight_only: ClassVar[bool] = True
    wrapper_class: ClassVar[type[nn.Module]] = nn.Module
    runtime_class: ClassVar[type[RuntimeModule]] = RuntimeModule

    @property
    def tokenizer_attr(self) -> str:
        return self.attr.replace("text_encoder", "tokenizer")

    def wrapper(self, module):
        return self.wrapper_class(module.eval())

    def example_inputs(self, module, *, latent_hw=None, seq_len=None):
        vocab = int(module.config.vocab_size)
        return lambda b, dt, hw=None: token_inputs(vocab, b, seq_len, seed=b)

    def runtime_module(self, adapter):
        return self.runtime_class

    def sequence_length(self, spec) -> int:
        from families.registry import load_component

        return int(load_component(spec, self.tokenizer_attr).model_max_length)


@dataclass(frozen=True)
class ClipProjection(_TextEncoder):
    """``CLIPTextModelWithProjection`` (SD3's ``text_encoder`` / ``text_encoder_2``)."""

    kind: ClassVar[str] = "clip_projection"
    wrapper_class: ClassVar[type[nn.Module]] = ClipForOnnx
    runtime_class: ClassVar[type[RuntimeModule]] = ClipAdapter


@dataclass(frozen=True)
class ClipPooled(_TextEncoder):
    """``CLIPTextModel`` read for its pooled output (Flux's ``text_encoder``)."""

    kind: ClassVar[str] = "clip_pooled"
    wrapper_class: ClassVar[type[nn.Module]] = ClipPooledForOnnx
    runtime_class: ClassVar[type[RuntimeModule]] = ClipPooledAdapter


@dataclass(frozen=True)
class T5Encoder(_TextEncoder):
    """``T5EncoderModel``; kept float32 (its activations overflow float16); takes the pipeline's
    ``max_sequence_length`` tokens."""

    kind: ClassVar[str] = "t5"
    keep_fp32: ClassVar[bool] = True
    wrapper_class: ClassVar[type[nn.Module]] = T5ForOnnx
    runtime_class: ClassVar[type[RuntimeModule]] = T5Adapter

    def sequence_length(self, spec) -> int:
        return int(spec.max_sequence_length)


@dataclass(frozen=True)
class VaeDecoder(Component):
    """``AutoencoderKL.decode`` (input already unscaled: ``latents / scaling_factor + shift_factor``)."""

    kind: ClassVar[str] = "vae_decoder"
    spatial: ClassVar[bool] = True

    def wrapper(self, module):
        return VaeDecoderForOnnx(module.eval())

    def example_inputs(self, module, *, latent_hw=None, seq_len=None):
        channels = int(module.config.latent_channels)
        return lambda b, dt, hw=None: latent_inputs(channels, b, hw or latent_hw, dtype=dt, seed=b)

    def dynamic_shapes(self, module, latent_min, latent_max):
        if tuple(latent_min) == tuple(latent_max):
            return None
        h = torch.export.Dim("latent_h", min=max(1, latent_min[0]), max=max(2, latent_max[0]))
        w = torch.export.Dim("latent_w", min=max(1, latent_min[1]), max=max(2, latent_max[1]))
        return lambda batch: {"latent": {0: batch, 2: h, 3: w}}

    def input_shapes(self, module, batch, latent_hw, text_seq_len):
        return {"latent": [batch, int(module.config.latent_channels), *latent_hw]}

    def runtime_module(self, adapter):
        return VaeDecoderAdapter


def component_names(adapters) -> tuple[str, ...]:
    """Every component name the given adapters export, in a stable order (the files a directory may hold)."""
    return tuple(dict.fromkeys(c.name for a in adapters for c in a.components))


def sparse_component_names(adapters) -> frozenset[str]:
    """The component names whose engines may use sparse-weight tactics (what stage 1 prunes)."""
    return frozenset(c.name for a in adapters for c in a.components if c.sparse_weights)


def find_component(adapter, name: str) -> Component:
    """The component ``name`` of ``adapter`` (``KeyError`` naming the known ones)."""
    for c in adapter.components:
        if c.name == name:
            return c
    raise KeyError(f"{adapter.name} has no component {name!r} (its components: {', '.join(c.name for c in adapter.components)})")

