"""``python -m pipeline generate``: one image from a prompt and a seed (same seed, same image)."""

from __future__ import annotations

import logging

from common.cli import int_at_least, nonempty
from pipeline.pipeline_args import add_pipeline_args, add_sampler_args

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate one image from a prompt")
    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory")
    p.add_argument("--prompt", required=True, type=nonempty)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--out", required=True, help="output image file (.png); an existing file is replaced, a directory never")
    add_sampler_args(p)
    add_pipeline_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from PIL import Image

    from common.io import atomic_path, check_output
    from pipeline.pipeline_args import check_pipeline_args, pipeline_from_args, sample, to_uint8

    checked = check_pipeline_args(args)
    check_output(args.out, "file")
    spec, pipe = pipeline_from_args(args, checked)
    image = to_uint8(sample(pipe, spec, [args.prompt], [args.seed], steps=args.steps, guidance=args.guidance))[0]
    with atomic_path(args.out) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    log.info("wrote %s (%dx%d, seed %d)", args.out, image.shape[1], image.shape[0], args.seed)
    return 0
