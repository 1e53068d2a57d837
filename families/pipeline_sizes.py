"""The weights of a whole served pipeline (transformer, text encoders, VAE decoder) in each precision and pruning
configuration, computed from the components' configs with no download, and the least aggressive configuration
within a budget.

Each component is built on the ``meta`` device from its config (a local directory's or the Hugging Face cache's
``config.json``, else the published one the family adapter carries) and its state dict is sorted into roles:
``block`` (the ``nn.Linear`` weights of the transformer blocks' units, :meth:`FamilyAdapter.units`: what stage 1
prunes and the INT8/INT4 exports quantize), ``modulation`` (the AdaLN linears, inside the blocks and ``norm_out``;
float in this project's exports), ``linear`` (the linears of a text encoder's layers), ``projection`` (a text
encoder's linears outside its layers: CLIP's text projection, a ``Gemm`` on the pooled vector that
:mod:`export.encoder_quant` leaves float), ``embedding`` (a text encoder's token table: the ``nn.Embedding`` with a
row per vocabulary entry) and everything else (biases, norms, convolutions,
embedders, the output layer, position tables, persistent buffers such as SD3's position table), which stays float.
Bytes follow from the shapes and a :class:`WeightFormat` per role (:meth:`WeightFormat.matrix_bytes`: packed codes
plus one scale, and zero point where stored, per group). Tokenizers are not counted. Formats, what is quantized, the tables and the verification against real files: ``docs/scale.md``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from common.errors import UserError

GIB = 2**30


# ------------------------------------------------------------------------------------------------ formats
@dataclass(frozen=True)
class WeightFormat:
    """How one weight matrix ``(rows, cols)`` (``nn.Linear``: out x in) is stored.

    bits: 32 or 16 (float: bf16 and fp16 alike), 8 or 4 (integer codes, packed two to a byte at 4 bits).
    group_size: input columns per scale (the last group of a row is padded to a whole group, as ONNX Runtime's
        ``MatMulNBits`` blocks are); None: one scale per output row (per-channel INT8).
    scale_bytes: bytes of one scale (2: float16; the ONNX Q/DQ exports store float32, 4).
    zero_point_bits: bits of one stored zero point per scale (0: symmetric, none stored).
    """

    name: str
    bits: int
    group_size: int | None = None
    scale_bytes: int = 2
    zero_point_bits: int = 0

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def matrix_bytes(self, rows: int, cols: int, sparse24: str | None = None) -> int:
        """Bytes of one ``(rows, cols)`` matrix. sparse24: None (dense), ``"dense"`` (2:4 zeros stored as they
        are: the same bytes) or ``"compressed"`` (cuSPARSELt's layout: the kept half of the values plus 2 bits of
        position metadata per kept value, i.e. 1/8 byte per dense weight; scales as for the dense matrix)."""
        if not self.quantized:
            values, scales = rows * cols * self.bits // 8, 0
        else:
            group = self.group_size or cols
            groups = math.ceil(cols / group)  # per row
            values = rows * groups * group * self.bits // 8
            scales = rows * (groups * self.scale_bytes + math.ceil(groups * self.zero_point_bits / 8))
        if sparse24 == "compressed":
            values = values // 2 + rows * cols // 8
        return values + scales

    @property
    def rank(self) -> int:
        """How far from the float weights (0 float, 1 INT8, 2 INT4 at group 64 or finer, 3 INT4 coarser): the
        aggressiveness order of :func:`least_aggressive`."""
        if not self.quantized:
            return 0
        if self.bits >= 8:
            return 1
        return 2 if (self.group_size or 1 << 30) <= 64 else 3


FP32 = WeightFormat("fp32", 32)
FP16 = WeightFormat("fp16", 16)
BF16 = WeightFormat("bf16", 16)
INT8 = WeightFormat("int8", 8)  # per output channel, float16 scale, symmetric
INT4_G128 = WeightFormat("int4-g128", 4, 128)  # symmetric, one float16 scale per 128 input columns
INT4_G64 = WeightFormat("int4-g64", 4, 64)
FORMATS: dict[str, WeightFormat] = {f.name: f for f in (FP32, FP16, BF16, INT8, INT4_G128, INT4_G64)}
# The formats the goal search tries for every quantizable role (bf16 is fp16's size).
SEARCH_FORMATS = ("fp16", "int8", "int4-g64", "int4-g128")
STRUCTURED_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)


def weight_format(name: str | WeightFormat) -> WeightFormat:
    """The format named ``name`` (:data:`FORMATS`: fp32, fp16, bf16, int8, int4-g128, int4-g64) or ``int4-g<N>``;
    one-line :class:`UserError` otherwise."""
    if isinstance(name, WeightFormat):
        return name
    if name in FORMATS:
        return FORMATS[name]
    if name.startswith("int4-g") and name[6:].isdigit() and int(name[6:]) > 0:
        return WeightFormat(name, 4, int(name[6:]))
    raise UserError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)} (or int4-g<group size>)")


def float_of(fmt: WeightFormat) -> WeightFormat:
    """The float parts' format next to weights in ``fmt``: fp32 beside fp32, else 16-bit (fp16 beside INT8/INT4)."""
    return fmt if not fmt.quantized else FP16


# ------------------------------------------------------------------------------------------------ inventory
@dataclass(frozen=True)
class Matrix:
    """One 2-D weight: ``rows x cols`` (``nn.Linear``: out x in; ``nn.Embedding``: entries x width), its role
    (see the module docstring) and whether a bias of ``rows`` values goes with it."""

    name: str
    rows: int
    cols: int
    role: str
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.rows * self.cols + (self.rows if self.bias else 0)


@dataclass(frozen=True)
class ComponentWeights:
    """One served component's tensors: the matrices with a role, and ``other`` (every other value, kept float)."""

    name: str  # the pipeline attribute (transformer, text_encoder..., vae)
    kind: str  # families.components kind: transformer, clip_projection, clip_pooled, t5, vae_decoder
    cls: str
    matrices: tuple[Matrix, ...]
    other: int
    source: str  # where the config came from: "local", "cache" or "published"
    groups: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # transformer: (block prefix, structured groups)
    buffers: tuple[tuple[str, tuple[int, ...]], ...] = ()  # persistent buffers (key, shape), counted in ``other``

    @property
    def numel(self) -> int:
        return self.other + sum(m.numel for m in self.matrices)

    def numel_by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.matrices:
            out[m.role] = out.get(m.role, 0) + m.rows * m.cols
            if m.bias:
                out["other"] = out.get("other", 0) + m.rows
        out["other"] = out.get("other", 0) + self.other
        return out

    def structured(self, ratio: float) -> "ComponentWeights":
        """The compact shapes after removing ``round(ratio * n)`` units (at most ``n - 1``) of every structured
        group of every block, as stage 1 does (heads: ``unit`` channels each; FFN neurons: 1): the rows of the
        layers that produce a group's channels, their biases and the columns of the layers that consume them
        shrink. Unchanged for ``ratio`` 0 or a component without groups."""
        if not ratio or not self.groups:
            return self
        shape = {m.name: [m.rows, m.cols] for m in self.matrices}
        for prefix, groups in self.groups:
            for g in groups:
                removed = min(g.size - 1, int(round(ratio * g.size))) * g.unit
                for span in g.inputs:
                    shape[f"{prefix}.{span.layer}"][0] -= removed
                for span in g.outputs:
                    shape[f"{prefix}.{span.layer}"][1] -= removed
        return replace(self, matrices=tuple(replace(m, rows=shape[m.name][0], cols=shape[m.name][1]) for m in self.matrices))


def state_tensors(module) -> list[tuple[str, Any]]:
    """``(key, tensor)`` of ``module``'s state dict (parameters and persistent buffers), a tied tensor once."""
    seen: set[int] = set()
    out = []
    for key, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out.append((key, t))
    return out


def inventory(module, name: str, kind: str, *, adapter=None, source: str = "published", prefix: str = "") -> ComponentWeights:
    """Sort ``module``'s state dict (a meta-device module is enough) into :class:`ComponentWeights`. adapter: the
    family adapter of a transformer (its blocks' units are the ``block`` role, their other linears the
    ``modulation`` role). prefix: only the keys under it and ``post_quant_conv`` (``decoder.`` keeps a VAE's
    decoder: what a text-to-image pipeline runs)."""
    from torch import nn

    linear = {f"{n}.weight": n for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    layers = tuple(f"{n}." for n, m in module.named_modules() if isinstance(m, nn.ModuleList))  # a text encoder's layers
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    embedding = {f"{n}.weight": n for n, m in module.named_modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab}
    units: set[str] = set()
    in_block: list[str] = []
    groups = []
    if adapter is not None:
        for block_prefix, block in adapter.blocks(module):
            in_block.append(block_prefix + ".")
            units |= {f"{block_prefix}.{n}" for _, names in adapter.units(block) for n in names}
            groups.append((block_prefix, tuple(adapter.structured_groups(block))))
    keep = (lambda k: k.startswith(prefix) or k.startswith("post_quant_conv.")) if prefix else (lambda k: True)
    tensors = dict(state_tensors(module))
    params = {k for k, _ in module.named_parameters()}
    buffers = tuple((k, tuple(t.shape)) for k, t in tensors.items() if k not in params and keep(k))
    matrices, other = [], 0
    used: set[str] = set()
    for key, t in tensors.items():
        if key in used or not keep(key):
            continue
        role = None
        if key in linear:
            n = linear[key]
            if adapter is not None:
                if n in units:
                    role = "block"
                elif any(n.startswith(p) for p in in_block) or any(part.startswith("norm") for part in n.split(".")):
                    role = "modulation"
            else:
                role = "linear" if n.startswith(layers) else "projection"
        elif key in embedding and adapter is None:
            role, n = "embedding", embedding[key]
        if role is None:
            other += t.numel()
            continue
        bias = f"{n}.bias"
        has_bias = role != "embedding" and bias in tensors
        if has_bias:
            used.add(bias)
        matrices.append(Matrix(n, int(t.shape[0]), int(t.shape[1]), role, has_bias))
    return ComponentWeights(name, kind, type(module).__name__, tuple(matrices), other, source, tuple(groups), buffers)


def _component_source(spec, attr: str) -> tuple[str, str, dict[str, Any], str]:
    """``(library, class name, config, source)`` of the pipeline attribute ``attr`` of ``spec``: the local or
    cached ``config.json``, else the published config the family adapter carries."""
    from families.registry import component_config, transformer_config

    adapter = spec.adapter
    config = component_config(spec, attr)
    source = "local" if spec.local else "cache"
    if config is not None:
        library = "diffusers" if attr in ("transformer", "vae") else "transformers"
        cls = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if cls is None and attr in adapter.published_text_encoders:
            cls = adapter.published_text_encoders[attr][0]
        return library, cls, config, source
    if attr == "transformer":
        config = transformer_config(spec)
        if config is not None:
            return "diffusers", config["_class_name"], config, "published"
    elif attr == "vae" and adapter.published_vae_config is not None:
        return "diffusers", "AutoencoderKL", dict(adapter.published_vae_config), "published"
    elif attr in adapter.published_text_encoders:
        cls, config = adapter.published_text_encoders[attr]
        return "transformers", cls, dict(config), "published"
    raise UserError(f"{spec.id}: no config for its {attr} here (not local, not in the Hugging Face cache, none published in families/)")


def build_meta(library: str, cls_name: str, config: dict[str, Any]):
    """The module ``cls_name`` of ``library`` (diffusers or transformers) from ``config``, on the meta device."""
    import importlib

    import torch

    from families.registry import quiet_libraries

    quiet_libraries()
    cls = getattr(importlib.import_module(library), cls_name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        return cls(cls.config_class.from_dict(dict(config)))


def pipeline_weights(spec) -> dict[str, ComponentWeights]:
    """Every served component of ``spec`` (a :class:`families.registry.ModelSpec`), by pipeline attribute, in the
    family's component order: the transformer, the text encoders, and the VAE's decoder (a text-to-image
    pipeline never runs the VAE's encoder)."""
    out = {}
    for comp in spec.adapter.components:
        library, cls, config, source = _component_source(spec, comp.attr)
        module = build_meta(library, cls, config)
        if comp.kind == "transformer":
            out[comp.attr] = inventory(module, comp.attr, comp.kind, adapter=spec.adapter, source=source)
        elif comp.kind == "vae_decoder":
            out[comp.attr] = inventory(module, comp.attr, comp.kind, source=source, prefix="decoder.")
        else:
            out[comp.attr] = inventory(module, comp.attr, comp.kind, source=source)
    return out


# ------------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Precision:
    """The formats of one component's roles (names for :func:`weight_format`, or :class:`WeightFormat` objects).
    weights: the quantizable matrices (``block`` / ``linear``); floats: everything else (None: :func:`float_of` the
    weights), the ``projection`` role included; modulation (transformer) and embeddings (text encoders): None keeps
    them with the floats."""

    weights: str | WeightFormat = "fp16"
    floats: str | WeightFormat | None = None
    modulation: str | WeightFormat | None = None
    embeddings: str | WeightFormat | None = None

    def formats(self) -> dict[str, WeightFormat]:
        w = weight_format(self.weights)
        f = weight_format(self.floats) if self.floats else float_of(w)
        return {"block": w, "linear": w, "other": f, "projection": f,
                "modulation": weight_format(self.modulation) if self.modulation else f,
                "embedding": weight_format(self.embeddings) if self.embeddings else f}

    def ranks(self) -> list[int]:
        return [weight_format(x).rank for x in (self.weights, self.modulation, self.embeddings) if x]

    def label(self) -> str:
        parts = [weight_format(self.weights).name]
        if self.floats:
            parts.append(f"floats {weight_format(self.floats).name}")
        if self.modulation:
            parts.append(f"AdaLN {weight_format(self.modulation).name}")
        if self.embeddings:
            parts.append(f"embeddings {weight_format(self.embeddings).name}")
        return ", ".join(parts)


def component_bytes(w: ComponentWeights, precision: Precision, *, structured: float = 0.0, sparse24: str | None = None) -> int:
    """Bytes of component ``w`` stored in ``precision``, its transformer blocks cut to ``structured`` (a ratio) or
    2:4-sparse (``sparse24``: ``"dense"`` or ``"compressed"``, on the ``block`` role only)."""
    fmt = precision.formats()
    w = w.structured(structured)
    total = w.other * fmt["other"].bits // 8
    for m in w.matrices:
        f = fmt[m.role]
        total += f.matrix_bytes(m.rows, m.cols, sparse24 if m.role == "block" else None)
        if m.bias:
            total += m.rows * fmt["other"].bits // 8
    return total


@dataclass(frozen=True)
class PipelineConfig:
    """One configuration of a served pipeline: each component's :class:`Precision` (a text encoder whose entry is
    None is dropped: only the family's optional one may be), the transformer's structured ratio and 2:4 storage."""

    transformer: Precision = field(default_factory=Precision)
    encoders: tuple[tuple[str, Precision | None], ...] = ()  # (kind, precision): clip_projection/clip_pooled/t5
    vae: str = "fp16"
    structured: float = 0.0
    sparse24: str | None = None

    def encoder(self, kind: str) -> Precision | None:
        d = dict(self.encoders)
        if kind in d:
            return d[kind]
        return d.get("clip") if kind.startswith("clip") else Precision()

    def label(self) -> str:
        t = f"transformer {self.transformer.label()}"
        if self.structured:
            t += f", structured:{self.structured:g}"
        if self.sparse24:
            t += f", 2:4 ({self.sparse24})"
        enc = "; ".join(f"{k} {'dropped' if p is None else p.label()}" for k, p in self.encoders)
        return f"{t}; {enc}; VAE {self.vae}" if enc else f"{t}; VAE {self.vae}"

    def aggressiveness(self) -> tuple:
        """Sort key, least aggressive first: structured ratio (cutting heads and neurons without fine-tuning costs
        the most quality), then a dropped text encoder, then the largest format rank of any role, then the sum of
        the ranks (:attr:`WeightFormat.rank`)."""
        ranks = self.transformer.ranks() + [r for _, p in self.encoders if p is not None for r in p.ranks()]
        dropped = sum(p is None for _, p in self.encoders)
        return (self.structured, dropped, max(ranks, default=0), sum(ranks))


def pipeline_bytes(weights: dict[str, ComponentWeights], config: PipelineConfig) -> dict[str, int]:
    """Bytes per component of the pipeline ``weights`` (:func:`pipeline_weights`) in ``config``; a dropped text
    encoder is absent. One-line :class:`UserError` when ``config`` drops an encoder the family needs."""
    out = {}
    for name, w in weights.items():
        if w.kind == "transformer":
            out[name] = component_bytes(w, config.transformer, structured=config.structured, sparse24=config.sparse24)
        elif w.kind == "vae_decoder":
            out[name] = component_bytes(w, Precision(config.vae))
        else:
            p = config.encoder(w.kind)
            if p is None:
                continue
            out[name] = component_bytes(w, p)
    return out


def _encoders(weights: dict[str, ComponentWeights], clip: Precision, t5: Precision | None) -> tuple[tuple[str, Precision | None], ...]:
    kinds = dict.fromkeys("clip" if w.kind.startswith("clip") else w.kind for w in weights.values() if w.kind not in ("transformer", "vae_decoder"))
    return tuple((k, t5 if k == "t5" else clip) for k in kinds)


def named_configs(weights: dict[str, ComponentWeights], *, can_drop_t5: bool) -> list[tuple[str, PipelineConfig]]:
    """The configurations the table shows for one model, ``(name, config)``: dense in each float format, the
    project's INT8 export as written today (everything but the INT8 linears in float32), INT8/INT4 transformers
    with float16, INT8 and INT4 text encoders, T5 dropped (SD3 only), structured ratios and 2:4 storage."""
    enc = lambda clip, t5: _encoders(weights, Precision(clip), Precision(t5) if t5 else None)  # noqa: E731
    rows = [
        ("dense fp32", PipelineConfig(Precision("fp32"), enc("fp32", "fp32"), "fp32")),
        ("dense bf16/fp16", PipelineConfig(Precision("fp16"), enc("fp16", "fp16"))),
        ("export --precision int8 today (rest fp32)", PipelineConfig(Precision("int8", floats="fp32"), enc("fp32", "fp32"), "fp32")),
        ("INT8 transformer", PipelineConfig(Precision("int8"), enc("fp16", "fp16"))),
        ("INT4 transformer", PipelineConfig(Precision("int4-g128"), enc("fp16", "fp16"))),
        ("INT4 transformer, INT8 encoders", PipelineConfig(Precision("int4-g128"), enc("int8", "int8"))),
        ("INT4 transformer, INT4 encoders", PipelineConfig(Precision("int4-g128"), enc("int4-g128", "int4-g128"))),
        ("INT4 transformer and AdaLN, INT4 encoders", PipelineConfig(Precision("int4-g128", modulation="int4-g128"), enc("int4-g128", "int4-g128"))),
    ]
    if can_drop_t5:
        rows += [
            ("fp16, T5 dropped", PipelineConfig(Precision("fp16"), enc("fp16", None))),
            ("INT8 transformer, INT8 CLIP, T5 dropped", PipelineConfig(Precision("int8"), enc("int8", None))),
            ("INT4 transformer, fp16 CLIP, T5 dropped", PipelineConfig(Precision("int4-g128"), enc("fp16", None))),
            ("INT4 transformer, INT4 CLIP, T5 dropped", PipelineConfig(Precision("int4-g128"), enc("int4-g128", None))),
        ]
    rows += [
        ("2:4 stored dense, INT4 transformer, INT4 encoders", PipelineConfig(Precision("int4-g128"), enc("int4-g128", "int4-g128"), sparse24="dense")),
        ("2:4 compressed (cuSPARSELt layout), INT4 transformer, INT4 encoders",
         PipelineConfig(Precision("int4-g128"), enc("int4-g128", "int4-g128"), sparse24="compressed")),
    ]
    for r in STRUCTURED_RATIOS:
        rows.append((f"structured:{r:g}, fp16", PipelineConfig(Precision("fp16"), enc("fp16", "fp16"), structured=r)))
    for r in STRUCTURED_RATIOS:
        rows.append((f"structured:{r:g}, INT4 transformer, INT4 encoders",
                     PipelineConfig(Precision("int4-g128"), enc("int4-g128", "int4-g128"), structured=r)))
    return rows


def search_space(weights: dict[str, ComponentWeights], *, can_drop_t5: bool, modulation: bool = True, embeddings: bool = True) -> Iterable[PipelineConfig]:
    """Every configuration the goal search tries: the transformer's blocks, its AdaLN modulations (with
    ``modulation``; else float16 as this project exports them), the CLIP encoders (one format for all) and T5
    (or dropped, where the family allows) each in :data:`SEARCH_FORMATS`, the text encoders' embedding tables
    float16 or (with ``embeddings``) in their encoder's format, structured ratio 0 or :data:`STRUCTURED_RATIOS`;
    the VAE decoder in float16. 2:4 is not searched: stored dense it saves nothing, compressed no runtime here
    runs it."""
    mods = (None,) + (SEARCH_FORMATS[1:] if modulation else ())
    t5s = tuple(SEARCH_FORMATS) + ((None,) if can_drop_t5 else ())
    for tr, mod, clip, t5, emb, ratio in itertools.product(SEARCH_FORMATS, mods, SEARCH_FORMATS, t5s, (False, True) if embeddings else (False,),
                                                          (0.0,) + STRUCTURED_RATIOS):
        if emb and clip == "fp16" and t5 in ("fp16", None):
            continue  # nothing to quantize the tables to
        clip_p = Precision(clip, embeddings=clip if emb and clip != "fp16" else None)
        t5_p = None if t5 is None else Precision(t5, embeddings=t5 if emb and t5 != "fp16" else None)
        yield PipelineConfig(Precision(tr, modulation=mod), _encoders(weights, clip_p, t5_p), structured=ratio)


def least_aggressive(weights: dict[str, ComponentWeights], budget_bytes: int, configs: Iterable[PipelineConfig]) -> list[tuple[PipelineConfig, int]]:
    """The configurations among ``configs`` whose weights fit ``budget_bytes``, least aggressive first
    (:meth:`PipelineConfig.aggressiveness`, then the larger first): ``[(config, total bytes)]``."""
    cache: dict[tuple, int] = {}

    def total(c: PipelineConfig) -> int:
        s = 0
        for name, w in weights.items():
            p = c.transformer if w.kind == "transformer" else Precision(c.vae) if w.kind == "vae_decoder" else c.encoder(w.kind)
            if p is None:
                continue
            key = (name, p, c.structured if w.kind == "transformer" else 0.0)
            if key not in cache:
                cache[key] = component_bytes(w, p, structured=key[2])
            s += cache[key]
        return s

    fits = [(c, b) for c in configs for b in (total(c),) if b <= budget_bytes]
    return sorted(fits, key=lambda cb: (cb[0].aggressiveness(), -cb[1]))
