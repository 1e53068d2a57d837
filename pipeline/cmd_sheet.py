"""``python -m pipeline sheet``: a PNG sheet of generated digits (columns 0-9, one row per seed)."""

from __future__ import annotations

import logging

from common.cli import int_range
from pipeline.pipeline_args import add_pipeline_args

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("sheet", help="a sheet of all ten digits over a few seeds (tiny-sd3)")
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--out", default="artifacts/tiny-sd3/digits_sheet.png")
    p.add_argument("--seeds", type=int_range(1, 1000), default=4, help="rows (seeds 0..N-1)")
    p.add_argument("--scale", type=int_range(1, 64), default=4, help="pixel upscaling for viewing")
    add_pipeline_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    from PIL import Image

    from evaluation.digits import prompt_for
    from common.errors import UserError
    from common.io import atomic_path, check_output
    from pipeline.pipeline_args import check_pipeline_args, pipeline_from_args, sample, to_uint8

    checked = check_pipeline_args(args)
    spec = checked[0]
    if spec.quality_metric != "digits":
        raise UserError(f"sheet draws the ten digits and needs a digits model such as tiny-sd3, not {spec.id}; use `generate` for other models")
    check_output(args.out, "file")
    spec, pipe = pipeline_from_args(args, checked)
    seeds = [s for s in range(args.seeds) for _ in range(10)]
    images = to_uint8(sample(pipe, spec, [prompt_for(d) for _ in range(args.seeds) for d in range(10)], seeds))
    n, h, w, c = images.shape
    sheet = images.reshape(args.seeds, 10, h, w, c).transpose(0, 2, 1, 3, 4).reshape(args.seeds * h, 10 * w, c)
    sheet = np.kron(sheet, np.ones((args.scale, args.scale, 1), dtype=np.uint8))
    with atomic_path(args.out) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    log.info("wrote %s: digits 0-9 left to right, seeds 0-%d top to bottom", args.out, args.seeds - 1)
    return 0
