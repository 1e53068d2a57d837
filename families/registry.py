"""The model table, and the one way to load a model.

Each :class:`ModelSpec` says where the weights are (Hugging Face repo or a directory in this repo), which
diffusers pipeline class runs them, where the transformer blocks live, the head size, the sampling defaults
and the shapes stage 2 exports with. Adding a family touches this table only (plus one adapter file if the
architecture is new). A local directory in diffusers format is accepted wherever an id is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from common.errors import UserError
from common.input_files import check_input_tree
from common.io import read_json
from common.paths import REPO_ROOT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportShapes:
    """Transformer shapes for ONNX export and TensorRT profiles (batch counts CFG's doubled batch)."""

    latent_height: int
    latent_width: int
    text_seq_len: int  # CLIP tokens + T5 tokens
    batch_min: int = 1
    batch_opt: int = 2
    batch_max: int = 4


@dataclass(frozen=True)
class ModelSpec:
    """A model family.

    source: Hugging Face repo id, or a path (relative to the repo root) of a diffusers-format directory.
    family: the architecture's adapter (:data:`families.ADAPTERS`): ``sd3``, ``flux``, ``flux2``.
    steps / guidance / height / width: sampling defaults (pixels).
    max_sequence_length: T5 tokens the pipeline encodes.
    few_step: distilled few-step model (guidance is ignored).
    vae_scale / patch_size / pos_embed_max_size: pixels per latent, latents per token side, and the most
        tokens per side the transformer's position embedding covers; they bound the image sizes.
    prompts: calibration prompt file (relative to the repo root).
    quality_metric: ``"digits"`` (the embedded digit classifier) or ``"clip"`` (CLIP score when cached).
    """

    id: str
    source: str
    local: bool
    family: str = "sd3"
    pipeline_class: str = "StableDiffusion3Pipeline"
    head_dim: int = 64
    steps: int = 28
    guidance: float = 7.0
    height: int = 1024
    width: int = 1024
    max_sequence_length: int = 256
    few_step: bool = False
    shapes: ExportShapes = ExportShapes(128, 128, 333)
    description: str = ""
    vae_scale: int = 8
    patch_size: int = 2
    pos_embed_max_size: int | None = 192
    prompts: str = "prompts/calibration.txt"
    quality_metric: str = "clip"

    @property
    def adapter(self):
        from families import get_adapter

        return get_adapter(self.family)

    @property
    def path(self) -> Path | None:
        return (REPO_ROOT / self.source) if self.local else None

    @property
    def pixel_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE factor x patch size)."""
        return self.vae_scale * self.patch_size

    def check_image_size(self, height: int | None, width: int | None, *, options: tuple[str, str] = ("--height", "--width")) -> None:
        """One-line :class:`UserError` unless ``height``/``width`` (pixels; None = the default) are sizes
        this model can sample: positive multiples of :attr:`pixel_multiple`, within the position embedding."""
        step = self.pixel_multiple
        biggest = self.pos_embed_max_size * step if self.pos_embed_max_size else None
        for value, option in zip((height, width), options):
            if value is None:
                continue
            if value < step or value % step:
                raise UserError(f"{option} {value}: {self.id} needs a positive multiple of {step} pixels "
                                f"(VAE factor {self.vae_scale} x patch size {self.patch_size}), e.g. {max(step, round(value / step) * step)}")
            if biggest is not None and value > biggest:
                raise UserError(f"{option} {value}: {self.id}'s position embedding covers at most {biggest} pixels")


_SD3_SHAPES = ExportShapes(latent_height=128, latent_width=128, text_seq_len=77 + 256)

MODELS: dict[str, ModelSpec] = {
    s.id: s
    for s in [
        ModelSpec(
            id="tiny-sd3",
            source="models/tiny-sd3",
            local=True,
            steps=20,
            guidance=4.0,
            height=32,
            width=32,
            max_sequence_length=10,
            shapes=ExportShapes(latent_height=8, latent_width=8, text_seq_len=10 + 10),
            vae_scale=4,
            pos_embed_max_size=8,
            prompts="prompts/digits.txt",
            quality_metric="digits",
            description="embedded default: a tiny SD3 pipeline trained on scikit-learn's handwritten digits",
        ),
        ModelSpec(
            id="tiny-flux",
            source="models/tiny-flux",
            local=True,
            family="flux",
            pipeline_class="FluxPipeline",
            steps=20,
            guidance=4.0,  # true classifier-free guidance (no embedded guidance): true_cfg_scale 4 with an empty negative prompt
            height=32,
            width=32,
            max_sequence_length=10,  # FluxPipeline runs T5 without an attention mask: the trained length, not 512
            shapes=ExportShapes(latent_height=8, latent_width=8, text_seq_len=10),
            vae_scale=4,
            patch_size=2,
            pos_embed_max_size=None,
            prompts="prompts/digits.txt",
            quality_metric="digits",
            description="embedded: a tiny FLUX.1-architecture pipeline (2 double + 4 single blocks) trained on the handwritten digits",
        ),
        ModelSpec(
            id="sd3-medium",
            source="stabilityai/stable-diffusion-3-medium-diffusers",
            local=False,
            steps=28,
            guidance=7.0,
            shapes=_SD3_SHAPES,
            description="Stable Diffusion 3 Medium (2B, 24 blocks, 24 heads)",
        ),
        ModelSpec(
            id="sd3.5-medium",
            source="stabilityai/stable-diffusion-3.5-medium",
            local=False,
            steps=40,
            guidance=4.5,
            shapes=_SD3_SHAPES,
            description="Stable Diffusion 3.5 Medium (2.5B, MMDiT-X with dual attention)",
        ),
        ModelSpec(
            id="sd3.5-large",
            source="stabilityai/stable-diffusion-3.5-large",
            local=False,
            steps=28,
            guidance=3.5,
            shapes=_SD3_SHAPES,
            description="Stable Diffusion 3.5 Large (8B, 38 blocks, 38 heads)",
        ),
        ModelSpec(
            id="sd3.5-large-turbo",
            source="stabilityai/stable-diffusion-3.5-large-turbo",
            local=False,
            steps=4,
            guidance=0.0,
            few_step=True,
            shapes=replace(_SD3_SHAPES, batch_opt=1),
            description="Stable Diffusion 3.5 Large Turbo (few-step, no CFG)",
        ),
        ModelSpec(
            id="flux.1-dev",
            source="black-forest-labs/FLUX.1-dev",
            local=False,
            family="flux",
            pipeline_class="FluxPipeline",
            head_dim=128,
            steps=28,
            guidance=3.5,  # embedded (guidance-distilled): one transformer call per step
            max_sequence_length=512,
            shapes=ExportShapes(latent_height=128, latent_width=128, text_seq_len=512, batch_opt=1),
            vae_scale=8,
            patch_size=2,
            pos_embed_max_size=None,
            description="FLUX.1 [dev] (12B, 19 double + 38 single blocks, 24 heads of 128, embedded guidance)",
        ),
        ModelSpec(
            id="flux.1-schnell",
            source="black-forest-labs/FLUX.1-schnell",
            local=False,
            family="flux",
            pipeline_class="FluxPipeline",
            head_dim=128,
            steps=4,
            guidance=0.0,
            few_step=True,
            max_sequence_length=256,
            shapes=ExportShapes(latent_height=128, latent_width=128, text_seq_len=256, batch_opt=1),
            vae_scale=8,
            patch_size=2,
            pos_embed_max_size=None,
            description="FLUX.1 [schnell] (12B, 4-step timestep-distilled, no guidance)",
        ),
    ]
}


def resolve_model(model: str) -> ModelSpec:
    """Return the spec for a registry id or a local diffusers directory; one-line error otherwise."""
    if model in MODELS:
        return MODELS[model]
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
        # A file cut short or of another kind: one line naming it now, not a traceback when weights load.
        check_input_tree(path, fix=f"the model directory {path} is damaged: restore or re-download it")
        return _spec_from_directory(path)
    if path.exists():
        raise UserError(f"--model {model}: not a directory; give a registry id ({', '.join(MODELS)}) or a diffusers pipeline directory")
    if "/" in model or model.startswith((".", "~")) or Path(model).is_absolute():
        raise UserError(f"--model {model}: no such directory; give an existing diffusers pipeline directory or a registry id ({', '.join(MODELS)})")
    raise UserError(f"unknown model {model!r}; known ids: {', '.join(MODELS)} (or a local diffusers directory)")


def _spec_from_directory(path: Path) -> ModelSpec:
    """Derive a spec for a local directory from its configs, with SD3 defaults for sampling."""
    index = read_json(path / "model_index.json", what="diffusers model index")
    cls = index.get("_class_name", "StableDiffusion3Pipeline")
    tcfg_file = path / "transformer" / "config.json"
    tcfg = read_json(tcfg_file, what="transformer config") if tcfg_file.is_file() else {}
    # A directory that is a copy of a registry family inherits its sampling defaults.
    base = next((s for s in MODELS.values() if s.local and s.path and s.path.resolve() == path.resolve()), None)
    if base is not None:
        return base
    from families import adapter_for

    adapter = adapter_for(tcfg.get("_class_name", "SD3Transformer2DModel")) if tcfg else adapter_for("SD3Transformer2DModel")
    vae_cfg_file = path / "vae" / "config.json"
    vae_cfg = read_json(vae_cfg_file, what="VAE config") if vae_cfg_file.is_file() else {}
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    patch = adapter.latent_patch(tcfg)
    # Latents per side: the transformer's sample size (SD3), else the VAE's image size (Flux), else 1024 px.
    latent = int(tcfg["sample_size"]) if "sample_size" in tcfg else int(vae_cfg.get("sample_size", 1024)) // vae_scale
    return ModelSpec(
        id=path.name,
        source=str(path.resolve()),
        local=True,
        family=adapter.name,
        pipeline_class=cls,
        head_dim=int(tcfg.get("attention_head_dim", 64)),
        height=latent * vae_scale,
        width=latent * vae_scale,
        max_sequence_length=adapter.max_sequence_length,
        shapes=ExportShapes(latent_height=latent, latent_width=latent, text_seq_len=adapter.text_seq_len),
        description=f"local diffusers directory {path}",
        vae_scale=vae_scale,
        patch_size=patch,
        pos_embed_max_size=tcfg.get("pos_embed_max_size"),
    )


def load_pipeline(spec: ModelSpec, *, drop_t5: bool = False, dtype=None, transformer=None, without_weights=()):
    """Load the diffusers pipeline of ``spec`` (offline for local models, HF cache for hub models).

    drop_t5: load without the family's optional text encoder (SD3's T5: ``text_encoder_3=None``), as many
        deployments do.
    transformer: an already-built transformer to use instead of the stored one.
    without_weights: pipeline attributes (``text_encoder``, ``vae``...) built on the ``meta`` device from their
        configs instead of loaded (:func:`load_component` with ``weights=False``): for a pipeline whose runner
        replaces them, which then never holds their weights. Its ``device`` is ``meta`` until they are replaced.
    """
    import diffusers
    import torch

    dtype = dtype or torch.float32
    quiet_libraries()
    cls = getattr(diffusers, spec.pipeline_class)
    kwargs = {"dtype": dtype}
    if drop_t5:
        attr = spec.adapter.optional_text_encoder
        if attr is None:
            raise UserError(f"{spec.id} cannot run without its T5 encoder (--no-t5 is for SD3-family models)")
        kwargs.update({attr: None, attr.replace("text_encoder", "tokenizer"): None})
    if transformer is not None:
        kwargs["transformer"] = transformer
    for attr in without_weights:
        kwargs[attr] = load_component(spec, attr, dtype=dtype, weights=False)
    where = str(spec.path) if spec.local else spec.source
    if spec.local:  # a file cut short or of another kind: one line naming it, before from_pretrained's traceback
        check_input_tree(where, fix=f"the model directory {where} is damaged: restore or re-download it")
    try:
        pipe = cls.from_pretrained(where, local_files_only=spec.local, **kwargs)
    except (OSError, ValueError) as e:
        if spec.local:
            raise UserError(f"cannot load model {spec.id!r} from {where}: {str(e).splitlines()[0]}") from None
        raise UserError(
            f"model {spec.id!r} ({spec.source}) is not in the Hugging Face cache and cannot be downloaded "
            f"(offline or gated): run `huggingface-cli download {spec.source}` on a connected machine after "
            f"accepting its licence, or pass a local diffusers directory as --model PATH"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def component_numel(spec: ModelSpec, name: str) -> int | None:
    """Parameters of one component of a local model, from its safetensors headers (no weights read); None
    for a hub model or a component without safetensors files."""
    from common.input_files import safetensors_numel

    if not spec.local or spec.path is None:
        return None
    files = sorted((Path(spec.path) / name).glob("*.safetensors"))
    return sum(safetensors_numel(f) for f in files) if files else None


def transformer_config(spec: ModelSpec) -> dict | None:
    """``spec``'s transformer config (diffusers ``config.json``) without loading weights: a local directory's, a hub
    model's from the Hugging Face cache, else the published config the family adapter carries for the id (None
    when none is known)."""
    config = component_config(spec, "transformer")
    if config is not None or spec.local:
        return config
    from families import published_configs

    known = published_configs()
    if spec.id in known:
        adapter, config = known[spec.id]
        return {"_class_name": adapter.transformer_class, **config}
    return None


def component_config(spec: ModelSpec, name: str) -> dict | None:
    """The diffusers ``config.json`` of one component (``vae``, ``text_encoder``...) of a local model, or of a hub
    model in the Hugging Face cache; None when it is not here. (The transformer's: :func:`transformer_config`.)"""
    if spec.local and spec.path is not None:
        f = spec.path / name / "config.json"
        return read_json(f, what=f"{name} config") if f.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return read_json(hf_hub_download(spec.source, f"{name}/config.json", local_files_only=True), what=f"{name} config")
    except Exception:  # not cached
        return None


def meta_transformer(spec: ModelSpec):
    """``spec``'s transformer built on the ``meta`` device from :func:`transformer_config`: its structure (blocks,
    layers, shapes) with no weights, in milliseconds for a tiny model and about a second for a 12B one. None when
    no config is known."""
    import diffusers
    import torch

    config = transformer_config(spec)
    if config is None:
        return None
    cls = getattr(diffusers, config.get("_class_name") or spec.adapter.transformer_class)
    quiet_libraries()
    with torch.device("meta"):
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}).eval()


def transformer_difference(spec: ModelSpec, config: dict) -> str | None:
    """How a transformer ``config`` (diffusers ``config.json``: class and architecture) differs from ``spec``'s
    (:func:`transformer_config`), e.g. ``"num_layers 6 against 4"``; None when they agree or ``spec``'s is not known.
    Keys starting with ``_`` (diffusers' bookkeeping) are ignored, except the class name."""
    mine = transformer_config(spec)
    if mine is None:
        return None
    if config.get("_class_name") and mine.get("_class_name") and config["_class_name"] != mine["_class_name"]:
        return f"a {config['_class_name']} against {spec.id}'s {mine['_class_name']}"
    keys = sorted(k for k in set(config) | set(mine) if not k.startswith("_") and k != "sample_size" and config.get(k) != mine.get(k))
    if not keys:
        return None
    return ", ".join(f"{k} {config.get(k)!r} against {mine.get(k)!r}" for k in keys[:3]) + (", ..." if len(keys) > 3 else "")


_fingerprints: dict[tuple, str] = {}


def model_fingerprint(spec: ModelSpec) -> str:
    """What identifies ``spec``'s weights: ``sha256:<hash>`` of a local directory's files (:func:`common.io.sha256_tree`),
    ``snapshot:<commit>`` of a hub model in the Hugging Face cache, else ``source:<repo id>`` (unknown weights).

    Stage 1 records it in ``plan.json`` and stage 2 in its report's ``inputs.model_weights``; every hand-off compares
    them (:func:`other_model`). A local directory is hashed once per process while its files are unchanged.
    """
    from common.io import sha256_tree

    if spec.local and spec.path is not None and spec.path.is_dir():
        root = spec.path.resolve()
        key = (str(root), tuple(sorted((str(f.relative_to(root)), st.st_size, st.st_mtime_ns)
                                       for f in root.rglob("*") if f.is_file() for st in (f.stat(),))))
        if key not in _fingerprints:
            _fingerprints[key] = "sha256:" + sha256_tree(root)
        return _fingerprints[key]
    try:
        from huggingface_hub import snapshot_download

        return "snapshot:" + Path(snapshot_download(spec.source, local_files_only=True)).name
    except Exception:  # not cached: loading will fail with a clear message later
        return "source:" + spec.source


def _short(fingerprint: str) -> str:
    kind, _, value = fingerprint.partition(":")
    return f"{kind}:{value[:12]}" if kind == "sha256" else fingerprint


def other_model(spec: ModelSpec, *, model: str | None, family: str | None = None, weights: str | None = None) -> str | None:
    """How an input recorded as made for ``model`` (of ``family``, from weights with :func:`model_fingerprint`
    ``weights``) differs from ``spec``: a clause naming both (``"was made for tiny-flux (flux), not for tiny-sd3
    (sd3)"``), or None when it is made for ``spec`` or the record says too little to tell.

    Equal weight fingerprints decide alone (a copy of a model under another name is the same model); fingerprints
    of one kind that differ are another model, or the same one changed since. Without comparable fingerprints
    the family, then the model id, decide.
    """
    mine = model_fingerprint(spec) if weights else None
    kind = weights.partition(":")[0] if weights else None
    if weights and mine and kind in ("sha256", "snapshot") and mine.partition(":")[0] == kind:
        if weights == mine:
            return None
        if model == spec.id:
            return (f"was made from other weights of {model} ({_short(weights)}; {spec.id}'s are now {_short(mine)}): "
                    f"the model changed since")
        fam = family and family != spec.family
        return (f"was made for {model} ({f'{family}, ' if fam else ''}{_short(weights)}), "
                f"not for {spec.id} ({f'{spec.family}, ' if fam else ''}{_short(mine)})")
    if family and family != spec.family:
        return f"was made for {model} ({family}), not for {spec.id} ({spec.family})"
    if model and model != spec.id:
        return f"was made for {model}, not for {spec.id}"
    return None


def _pipeline_dir(spec: ModelSpec) -> tuple[str, bool]:
    """``(where, local_files_only)``: the directory or hub id ``from_pretrained`` reads ``spec`` from."""
    return (str(spec.path), True) if spec.local else (spec.source, False)


def load_component(spec: ModelSpec, name: str, *, dtype=None, weights: bool = True):
    """Load one component of ``spec``'s pipeline (``transformer``, ``text_encoder``..., ``vae``,
    ``tokenizer``...) by itself, in ``dtype`` (default float32; ignored for tokenizers).

    Stages that need one component at a time use this instead of :func:`load_pipeline`: a 2B-parameter
    transformer then loads straight into float16 without a float32 copy, and without the text encoders.
    weights=False: the component built from its config alone on the ``meta`` device (class, config and dtype,
    no weights read or held), for a pipeline in which it is replaced.
    """
    import importlib

    import torch

    quiet_libraries()
    where, local = _pipeline_dir(spec)
    try:
        if spec.local:
            index = read_json(Path(where) / "model_index.json", what="diffusers model index")
        else:
            from huggingface_hub import hf_hub_download

            index = read_json(hf_hub_download(spec.source, "model_index.json", local_files_only=True), what="diffusers model index")
        library, cls_name = index[name]
        cls = getattr(importlib.import_module(library), cls_name)
        if not weights:
            return _on_meta(cls, where, name, local, dtype or torch.float32)
        kwargs = {} if "Tokenizer" in cls_name else {"dtype": dtype or torch.float32}
        if spec.local and (Path(where) / name).is_dir():
            check_input_tree(Path(where) / name, fix=f"the model directory {where} is damaged: restore or re-download it")
        return cls.from_pretrained(where, subfolder=name, local_files_only=local, **kwargs)
    except OSError as e:  # before ValueError: huggingface_hub's "not in the cache" error is both
        if spec.local:
            raise UserError(f"cannot load {name} of {spec.id!r} from {where}: {str(e).splitlines()[0]}") from None
        raise UserError(
            f"model {spec.id!r} ({spec.source}) is not in the Hugging Face cache and cannot be downloaded "
            f"(offline or gated): run `huggingface-cli download {spec.source}` on a connected machine after "
            f"accepting its licence, or pass a local diffusers directory as --model PATH"
        ) from None
    except (KeyError, TypeError, ValueError):
        raise UserError(f"model {spec.id!r} has no {name} component; check its model_index.json") from None


def _on_meta(cls, where: str, name: str, local: bool, dtype):
    """A diffusers or transformers model class built from the config in ``where/name`` on the ``meta`` device."""
    import torch

    if hasattr(cls, "load_config"):  # diffusers
        config = cls.load_config(where, subfolder=name, local_files_only=local)
        build = lambda: cls.from_config(config)  # noqa: E731
    else:  # transformers
        config = cls.config_class.from_pretrained(where, subfolder=name, local_files_only=local)
        build = lambda: cls._from_config(config, dtype=dtype)  # noqa: E731  (also the config's dtype, as from_pretrained sets it)
    with torch.device("meta"):
        return build().to(dtype).eval()


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and info chatter (our own logging reports progress)."""
    import diffusers
    import transformers

    if log.getEffectiveLevel() > logging.DEBUG:
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

