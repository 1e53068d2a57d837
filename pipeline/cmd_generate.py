"""``python -m pipeline generate``: one image from a prompt and a seed (same seed, same image)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate one image from a prompt")
    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output image file (.png)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the registry's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the registry's)")
    p.add_argument("--no-t5", action="store_true", help="drop the T5 encoder (text_encoder_3=None)")
    p.add_argument("--transformer", help="a pruned (stage 1) or compact (stage 2) transformer directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from PIL import Image

    from benchmarks.quality import load_transformer
    from common.io import atomic_path
    from pipeline.models import load_pipeline, resolve_model
    from pipeline.sampling import sample, to_uint8

    spec = resolve_model(args.model)
    transformer = load_transformer(args.transformer) if args.transformer else None
    pipe = load_pipeline(spec, drop_t5=args.no_t5, transformer=transformer)
    image = to_uint8(sample(pipe, spec, [args.prompt], [args.seed], steps=args.steps, guidance=args.guidance))[0]
    with atomic_path(args.out) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    log.info("wrote %s (%dx%d, seed %d)", args.out, image.shape[1], image.shape[0], args.seed)
    return 0
