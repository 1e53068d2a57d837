"""The adapter interface (:class:`FamilyAdapter`): everything a stage needs to know about one transformer
architecture (blocks and their prunable units, structured groups and their fix-up, calibration noise and
guidance, the transformer's ONNX wrapper, inputs and runtime module, the exported components), plus the
structured-group types, module lookup helpers and the base of the stage-3 runtime modules. Design notes:
``docs/families.md``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from families.components import Component


@dataclass(frozen=True)
class Span:
    """Channels of one ``nn.Linear`` that a structured group owns.

    layer: the linear's name inside the block (``attn.to_q``, ``proj_out``). axis: 0 = output rows (the layers
    that produce the group's channels), 1 = input columns (the layers that consume them: what OBS prunes).
    offset: where the group's channels start along that axis; unit ``u`` owns ``offset + u * unit + [0, unit)``.
    """

    layer: str
    axis: int
    offset: int = 0


@dataclass(frozen=True)
class StructuredGroup:
    """A set of removable units (attention heads or FFN neurons) of one block, at the block's current shape.

    name: the plan's key for the group inside the block (``attn``, ``ff``, ``mlp``...).
    kind: ``heads`` or ``neurons``. size: units now. unit: channels per unit (``head_dim`` or 1).
    outputs: column spans of the layers that consume the channels (stage 1 prunes these columns, all spans
        of a group with one shared choice, each weight compensated with its own Hessian).
    inputs: row spans of the layers that produce the channels (cut by stage 2; nothing numeric to do in stage 1).
    """

    name: str
    kind: str
    size: int
    unit: int
    outputs: tuple[Span, ...]
    inputs: tuple[Span, ...]

    def channels(self, units: Sequence[int], offset: int = 0) -> torch.Tensor:
        """Channel indices ``offset + u * unit + [0, unit)`` of ``units``, in order (int64)."""
        u = torch.as_tensor(list(units), dtype=torch.long)  # (U,)
        return (offset + u[:, None] * self.unit + torch.arange(self.unit)[None, :]).reshape(-1)  # (U * unit,)

    @property
    def width(self) -> int:
        return self.size * self.unit


def get_module(root: nn.Module, dotted: str) -> nn.Module | None:
    """``root``'s submodule at ``dotted`` (``attn.to_out.0``), or None when a part is missing/None."""
    module: Any = root
    for part in dotted.split("."):
        if module is None:
            return None
        module = module[int(part)] if part.isdigit() and isinstance(module, (nn.ModuleList, nn.Sequential)) else getattr(module, part, None)
    return module


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace ``root``'s submodule at ``dotted`` with ``new``."""
    parent_name, _, leaf = dotted.rpartition(".")
    parent = get_module(root, parent_name) if parent_name else root
    if leaf.isdigit() and isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def packed_token_shapes(shapes: dict[str, dict[int, Any]], batch, latent_min, latent_max) -> dict[str, dict[int, Any]]:
    """Dynamic shapes of Flux-style inputs: the image token count ``(h/2) * (w/2)`` of 2x2-packed latents
    varies, one dim shared by ``hidden_states`` and ``img_ids`` (axis 1); any aspect ratio with that many
    tokens runs the same graph. Unchanged when ``latent_min == latent_max`` (one resolution: static)."""
    if latent_min is None or latent_max is None or tuple(latent_min) == tuple(latent_max):
        return shapes
    import torch.export

    lo = (latent_min[0] // 2) * (latent_min[1] // 2)
    hi = (latent_max[0] // 2) * (latent_max[1] // 2)
    tokens = torch.export.Dim("image_tokens", min=max(1, lo), max=max(2, hi))
    return {**shapes, "hidden_states": {0: batch, 1: tokens}, "img_ids": {0: batch, 1: tokens}}


class FamilyAdapter:
    """Base class of the per-architecture adapters (see the module docstring). Subclasses set the class
    attributes and implement the methods that raise ``NotImplementedError``."""

    name: str = ""
    transformer_class: str = ""
    pipeline_class: str = ""
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    # Per block kind (see block_kind): ordered units (kind, layer names inside the block).
    unit_layers: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {}
    # Per block kind: the AdaLN modulation linears (names inside the block). Never pruned; with --quant-modulation a
    # --weight-bits prune quantizes them too (their weights are a third of SD3-medium's and FLUX.1's transformer).
    modulation_layers: dict[str, tuple[str, ...]] = {}
    # Layers that receive the very same input tensor (names inside a block): one Hessian for all.
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    scope_note: str = ""
    components: tuple[Component, ...] = ()  # families.components: one description per exported component
    # The text encoder a deployment may drop (pipeline attribute), e.g. SD3's T5.
    optional_text_encoder: str | None = None
    # Defaults for a local directory of this family (the registry derives a spec from its configs).
    max_sequence_length: int = 256  # T5 tokens the pipeline encodes
    text_seq_len: int = 256  # transformer text tokens at that length
    # Modules kept in higher precision when the transformer is quantized (INT8/FP8, export.quantize): fnmatch
    # globs on qualified module names (``proj_out``, ``*norm*``); a match keeps that module and every
    # submodule unquantized. Only Linear/Conv weights and inputs are quantized at all, so the list names the
    # layers whose error would cost more than they save (embedders, AdaLN modulations, the output layer).
    # Empty: every Linear/Conv is quantized.
    quant_exclude: tuple[str, ...] = ()
    # Transformer configs as published with the hub checkpoints (``transformer/config.json`` minus
    # ``sample_size``), by registry id: random-weight stand-ins of the real shapes, built without a download.
    published_configs: dict[str, dict[str, Any]] = {}
    published_vae_config: dict[str, Any] | None = None  # the family's hub VAE config, where one is carried
    # The text encoders as published with the hub checkpoints, by pipeline attribute: ``(transformers class name,
    # config keyword arguments)`` (families.components.CLIP_L...); shared by every published config of the family.
    published_text_encoders: dict[str, tuple[str, dict[str, Any]]] = {}

    def latent_patch(self, transformer_config: dict) -> int:
        """VAE latents per token side (the transformer's patch size; Flux packs 2x2 latents per token)."""
        return int(transformer_config.get("patch_size", 2))

    # ---------------------------------------------------------------------------------------- blocks
    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(qualified prefix, block)`` of every block, in execution order (the plan's block indices)."""
        out = []
        for attr in self.block_lists:
            out += [(f"{attr}.{i}", b) for i, b in enumerate(getattr(model, attr, None) or [])]
        return out

    def block_kind(self, block: nn.Module) -> str:
        return type(block).__name__

    def units(self, block: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
        """The unit table of ``block``'s kind, restricted to the linears the block has."""
        out = []
        for kind, names in self.unit_layers.get(self.block_kind(block), ()):
            present = tuple(n for n in names if isinstance(get_module(block, n), nn.Linear))
            if present:
                out.append((kind, present))
        return out

    def modulation(self, block: nn.Module) -> tuple[str, ...]:
        """The AdaLN modulation linears of ``block`` (:attr:`modulation_layers`, those the block has)."""
        return tuple(n for n in self.modulation_layers.get(self.block_kind(block), ()) if isinstance(get_module(block, n), nn.Linear))

    def structured_groups(self, block: nn.Module) -> list[StructuredGroup]:
        """The block's structured groups at its current shape, in the order stage 1 solves them."""
        raise NotImplementedError

    def set_group_size(self, block: nn.Module, name: str, size: int) -> None:
        """Fix the block's bookkeeping after group ``name`` was cut to ``size`` units (``attn.heads``...)."""
        raise NotImplementedError

    def check_block(self, block: nn.Module, model: nn.Module) -> None:
        """Assert the block's invariants (projection widths agree with the bookkeeping)."""
        raise NotImplementedError

    def head_dim(self, model: nn.Module) -> int:
        return int(model.config.attention_head_dim)

    # ----------------------------------------------------------------------------- calibration, sampling
    def noise(self, pipe, height: int, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
        """One image's initial latents in the layout ``pipe(latents=...)`` takes, from a CPU generator."""
        raise NotImplementedError

    def guidance_kwargs(self, pipe, guidance: float, batch: int) -> dict[str, Any]:
        """The pipeline call's guidance arguments for a guidance scale and ``batch`` prompts per call."""
        return {"guidance_scale": guidance}

    def runs_cfg_batch(self, guidance: float) -> bool:
        """Whether the transformer sees the classifier-free-guidance branches (more calls or a doubled batch)."""
        return guidance > 1.0

    # ------------------------------------------------------------------------------------------ export
    def transformer_for_onnx(self, model: nn.Module) -> nn.Module:
        """A module with ``input_names``/``output_names`` whose forward takes the inputs by position."""
        raise NotImplementedError

    def transformer_inputs(
        self, model: nn.Module, batch: int, latent_hw: tuple[int, int], text_seq_len: int, *, dtype=torch.float32, seed: int = 0, device=None
    ) -> dict[str, torch.Tensor]:
        """Example inputs by name (the ONNX input order) at ``latent_hw`` (VAE latents) and ``text_seq_len``."""
        raise NotImplementedError

    def transformer_input_shapes(self, model: nn.Module, batch: int, latent_hw: tuple[int, int], text_seq_len: int) -> dict[str, list[int]]:
        """Input shapes by name (for engine profiles and manifests)."""
        with torch.device("meta"):
            return {k: list(v.shape) for k, v in self.transformer_inputs(model, batch, latent_hw, text_seq_len, device="meta").items()}

    def transformer_dynamic_shapes(self, model: nn.Module, batch, latent_min: tuple[int, int] | None = None,
                                   latent_max: tuple[int, int] | None = None) -> dict[str, dict[int, Any]]:
        """``torch.export`` dynamic shapes of the ONNX inputs, by name: ``batch`` (a ``torch.export.Dim``) on
        axis 0 of every input, and with ``latent_min``/``latent_max`` (VAE latents) the spatial axes over that
        range (in the multiples the architecture allows). Families override it for the spatial axes."""
        return {n: {0: batch} for n in self.transformer_for_onnx(model).input_names}

    def runtime_transformer(self):
        """The ``torch.nn.Module`` class that stands in for the transformer in the diffusers pipeline; built
        as ``cls(runner, config, dtype, device)`` with ``runner(dict of inputs) -> {"sample": ...}``."""
        raise NotImplementedError

    def tiny_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` (a published one) shrunk to a model of the same layout that runs in seconds on a CPU
        (one block of each kind, two small heads): dry runs of the GPU programs."""
        raise NotImplementedError


class RuntimeModule(nn.Module):
    """Base of the modules that stand in for a pipeline component in stage 3: holds the runner
    (``dict of inputs -> dict of outputs``), the original component's config, and the dtype/device the
    pipeline sees."""

    def __init__(self, runner, config: Any, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.runner = runner
        self.config = config
        self._dtype = dtype
        self._device = torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self._device, self._dtype)

    @staticmethod
    def _sample_output(sample: torch.Tensor, return_dict: bool):
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)
