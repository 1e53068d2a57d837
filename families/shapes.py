"""The shapes a deployment serves: image resolutions and the transformer's batch range.

``--resolution 512x512,768x1344`` (or ``--height/--width``) and ``--batch 1:2:4`` become one
:class:`ServedShapes` at the edge of the program. Stage 2 exports the transformer (and the VAE decoder)
with dynamic spatial axes when more than one resolution is served, and checks parity at each; stage 3 builds
an optimisation profile covering them (or one static engine per resolution) and refuses other shapes with one
line naming the range. The first resolution is the one engines are optimised for (the profile's ``opt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from common.errors import UserError

if TYPE_CHECKING:
    from families.registry import ModelSpec


@dataclass(frozen=True)
class ServedShapes:
    """Resolutions (pixels, ``(height, width)``; the first is the optimisation target), the transformer's
    batch range ``(min, opt, max)`` (classifier-free guidance doubles the prompt batch), the text tokens,
    the VAE factor, and whether engines are built static, one per resolution."""

    resolutions: tuple[tuple[int, int], ...]
    batch: tuple[int, int, int]
    text_seq_len: int
    vae_scale: int
    static: bool = False

    @property
    def dynamic_spatial(self) -> bool:
        """Whether the exported graphs need dynamic height/width (more than one resolution served)."""
        return len(set(self.resolutions)) > 1

    def latent(self, hw: tuple[int, int]) -> tuple[int, int]:
        return hw[0] // self.vae_scale, hw[1] // self.vae_scale

    @property
    def latents(self) -> list[tuple[int, int]]:
        return [self.latent(r) for r in self.resolutions]

    @property
    def latent_min(self) -> tuple[int, int]:
        return min(h for h, _ in self.latents), min(w for _, w in self.latents)

    @property
    def latent_max(self) -> tuple[int, int]:
        return max(h for h, _ in self.latents), max(w for _, w in self.latents)

    @property
    def latent_opt(self) -> tuple[int, int]:
        return self.latents[0]

    @property
    def other_latents(self) -> list[tuple[int, int]]:
        """The served latent shapes besides the optimisation one (export parity is checked at each, batch 1)."""
        return [hw for hw in dict.fromkeys(self.latents) if hw != self.latent_opt]

    def profiles(self, shapes_at) -> dict[str, Any]:
        """Engine profiles of a component whose input shapes follow the resolution: ``shapes_at(batch, latent_hw)
        -> {input: shape}``. ``range``: ``{input: [min, opt, max]}`` over the batch range and resolutions (the
        box from the smallest to the largest latent height and width); ``per_resolution``: the same for each
        resolution alone (static engines)."""
        lo, mid, hi = self.batch

        def box(lat_min, lat_opt, lat_max):
            a, b, c = shapes_at(lo, lat_min), shapes_at(mid, lat_opt), shapes_at(hi, lat_max)
            return {k: [list(a[k]), list(b[k]), list(c[k])] for k in b}

        return {
            "range": box(self.latent_min, self.latent_opt, self.latent_max),
            "per_resolution": {self.label(r): box(self.latent(r), self.latent(r), self.latent(r)) for r in self.resolutions},
        }

    def label(self, hw: tuple[int, int]) -> str:
        return f"{hw[0]}x{hw[1]}"

    def describe(self) -> str:
        """``512x512..1024x1024 px, batch 1..4`` (what an out-of-range request is told)."""
        (h0, w0), (h1, w1) = self.latent_min, self.latent_max
        s = self.vae_scale
        px = self.label(self.resolutions[0]) if not self.dynamic_spatial else f"{h0 * s}x{w0 * s}..{h1 * s}x{w1 * s}"
        return f"{px} px, batch {self.batch[0]}..{self.batch[2]}"

    def to_json(self) -> dict[str, Any]:
        return {"resolutions": [list(r) for r in self.resolutions], "batch": list(self.batch), "text_seq_len": self.text_seq_len,
                "vae_scale": self.vae_scale, "static": self.static, "dynamic_spatial": self.dynamic_spatial}


def parse_resolutions(text: str, *, option: str = "--resolution") -> list[tuple[int, int]]:
    """``"512x512,768x1344"`` (``HxW``; a single number is square) -> ``[(512, 512), (768, 1344)]``."""
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            h, x, w = part.lower().partition("x")
            hw = (int(h), int(w if x else h))
        except ValueError:
            raise UserError(f"{option} {text!r}: give HEIGHTxWIDTH in pixels, comma-separated, e.g. 512x512,768x1344") from None
        out.append(hw)
    if not out:
        raise UserError(f"{option} is empty: give HEIGHTxWIDTH in pixels, e.g. 1024x1024")
    return list(dict.fromkeys(out))


def parse_batch_range(text: str, *, option: str = "--batch") -> tuple[int, int, int]:
    """``"1:2:4"`` (min:opt:max), ``"2"`` (static) or ``"1:4"`` (opt = min) -> ``(min, opt, max)``."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 3
    elif len(parts) == 2:
        parts = [parts[0], parts[0], parts[1]]
    if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
        raise UserError(f"{option} {text!r}: give MIN:OPT:MAX transformer batch sizes with 1 <= MIN <= OPT <= MAX, e.g. 1:2:4")
    return parts[0], parts[1], parts[2]


# TensorRT indexes the elements of a tensor with 32-bit integers in most layers (its "large tensor" support
# covers only some), and ONNX Runtime's CUDA kernels largely do too: an engine profile whose max batch makes
# one activation larger than this cannot be built or run. PyTorch would hold it; no engine or server here would.
MAX_TENSOR_ELEMENTS = 2**31 - 1


def largest_activations(spec: "ModelSpec", served: ServedShapes) -> dict[str, tuple[int, str]]:
    """Per component, the elements of the largest activation one batch item materialises at the largest served
    resolution, on every runtime (attention's scores are left out: fused attention never holds them), and what
    it is: the transformer's FFN hidden state (joint tokens x mlp ratio x heads x head dim) and the VAE
    decoder's full-resolution feature map (its first block's channels x height x width). A component whose
    config is not here (a hub model not cached) is left out."""
    from families.registry import component_config, transformer_config

    (h, w), s = served.latent_max, served.vae_scale
    out: dict[str, tuple[int, str]] = {}
    tcfg = transformer_config(spec) or {}
    if tcfg.get("num_attention_heads") and tcfg.get("attention_head_dim"):
        p = spec.adapter.latent_patch(tcfg)
        tokens = (h // p) * (w // p) + served.text_seq_len
        width = int(float(tcfg.get("mlp_ratio", 4.0)) * int(tcfg["num_attention_heads"]) * int(tcfg["attention_head_dim"]))
        out["transformer"] = (tokens * width, f"its FFN hidden state holds {tokens} tokens x {width}")
    vcfg = component_config(spec, "vae") or {}
    if vcfg.get("block_out_channels"):
        c = int(vcfg["block_out_channels"][0])
        out["vae_decoder"] = (c * h * s * w * s, f"its last feature map holds {c} channels x {h * s}x{w * s} px")
    return out


def check_batch_limit(spec: "ModelSpec", served: ServedShapes, *, option: str = "--batch") -> None:
    """One line when no engine could hold the served shapes: the max batch (or, past that, the resolution)
    makes a component's largest activation (:func:`largest_activations`) exceed :data:`MAX_TENSOR_ELEMENTS`.
    The line names the tightest component, its tensor and the largest max batch that fits."""
    found = largest_activations(spec, served)
    if not found:
        return
    name, (per_item, what) = max(found.items(), key=lambda kv: kv[1][0])
    limit = MAX_TENSOR_ELEMENTS // max(per_item, 1)
    if served.batch[2] <= limit:
        return
    (h, w), s = served.latent_max, served.vae_scale
    at = f"{h * s}x{w * s} px"
    why = (f"one batch item of {spec.id}'s {name} at {at} needs a tensor of {per_item:,} elements ({what}), and TensorRT "
           f"indexes a tensor's elements with 32-bit integers (at most 2^31-1 = {MAX_TENSOR_ELEMENTS:,})")
    if limit < 1:
        raise UserError(f"--resolution {at}: too large for any engine: {why}; serve a smaller resolution")
    raise UserError(f"{option} {':'.join(map(str, served.batch))}: the max batch can be at most {limit:,}: {why}")


def served_shapes(
    spec: "ModelSpec", resolutions: Sequence[tuple[int, int]] | None = None, batch: tuple[int, int, int] | None = None, *, static: bool = False
) -> ServedShapes:
    """The shapes to serve ``spec`` at (default: its registry size and batch range), each checked against
    what the model can sample (multiples of VAE factor x patch size, within its position embedding) and what an
    engine can hold (:func:`check_batch_limit`)."""
    sh = spec.shapes
    res = tuple(resolutions) if resolutions else ((sh.latent_height * spec.vae_scale, sh.latent_width * spec.vae_scale),)
    for h, w in res:
        spec.check_image_size(h, w, options=("--resolution height", "--resolution width"))
    served = ServedShapes(res, tuple(batch) if batch else (sh.batch_min, sh.batch_opt, sh.batch_max), sh.text_seq_len, spec.vae_scale, static)
    if batch or resolutions:  # the registry's own shapes fit
        check_batch_limit(spec, served)
    return served


def add_shape_args(p, *, static: bool = False) -> None:
    """``--resolution``/``--height``/``--width`` and ``--batch`` (and with ``static``, ``--static-shapes``)."""
    p.add_argument("--resolution", default=None, metavar="HxW[,HxW...]",
                   help="resolutions to serve in pixels, the first one optimised for, e.g. 512x512,768x1344,1024x1024 "
                        "(default: the model's; more than one exports dynamic height/width)")
    p.add_argument("--height", type=int, default=None, help="one resolution's height in pixels (with --width; instead of --resolution)")
    p.add_argument("--width", type=int, default=None, help="one resolution's width in pixels (with --height)")
    p.add_argument("--batch", default=None, metavar="MIN:OPT:MAX",
                   help="transformer batch range per denoising step (CFG doubles the prompts), e.g. 1:2:4 (default: the model's)")
    if static:
        p.add_argument("--static-shapes", action="store_true",
                       help="one static engine per resolution (usually faster) instead of one profile covering them")


def shapes_from_args(args, spec: "ModelSpec") -> ServedShapes:
    """The :class:`ServedShapes` of :func:`add_shape_args`' options (one line for a bad value)."""
    res = None
    if getattr(args, "resolution", None):
        if args.height is not None or args.width is not None:
            raise UserError("give either --resolution or --height/--width, not both")
        res = parse_resolutions(args.resolution)
    elif getattr(args, "height", None) is not None or getattr(args, "width", None) is not None:
        h = args.height if args.height is not None else spec.height
        w = args.width if args.width is not None else spec.width
        res = [(h, w)]
    batch = parse_batch_range(args.batch) if getattr(args, "batch", None) else None
    return served_shapes(spec, res, batch, static=bool(getattr(args, "static_shapes", False)))
