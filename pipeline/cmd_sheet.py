"""``python -m pipeline sheet``: a PNG sheet of generated digits (columns 0-9, one row per seed)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("sheet", help="a sheet of all ten digits over a few seeds (tiny-sd3)")
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--out", default="artifacts/tiny-sd3/digits_sheet.png")
    p.add_argument("--seeds", type=int, default=4, help="rows (seeds 0..N-1)")
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling for viewing")
    p.add_argument("--no-t5", action="store_true", help="drop the T5 encoder (text_encoder_3=None)")
    p.add_argument("--transformer", help="a pruned (stage 1) or compact (stage 2) transformer directory")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    from PIL import Image

    from benchmarks.digits import prompt_for
    from benchmarks.quality import load_transformer
    from common.io import atomic_path
    from pipeline.models import load_pipeline, resolve_model
    from pipeline.sampling import sample, to_uint8

    spec = resolve_model(args.model)
    transformer = load_transformer(args.transformer) if args.transformer else None
    pipe = load_pipeline(spec, drop_t5=args.no_t5, transformer=transformer)
    seeds = [s for s in range(args.seeds) for _ in range(10)]
    images = to_uint8(sample(pipe, spec, [prompt_for(d) for _ in range(args.seeds) for d in range(10)], seeds))
    n, h, w, c = images.shape
    sheet = images.reshape(args.seeds, 10, h, w, c).transpose(0, 2, 1, 3, 4).reshape(args.seeds * h, 10 * w, c)
    sheet = np.kron(sheet, np.ones((args.scale, args.scale, 1), dtype=np.uint8))
    with atomic_path(args.out) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    log.info("wrote %s: digits 0-9 left to right, seeds 0-%d top to bottom", args.out, args.seeds - 1)
    return 0
