"""``python -m pipeline client``: ask a running ``make serve`` for an image (gRPC, tritonclient).

    python -m pipeline client --prompt "a handwritten digit 7" --seed 0 --out seven.png

The server's address defaults to the one ``make serve --detach`` recorded, else ``127.0.0.1:8001``. An error
response becomes one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import float_range, int_at_least, nonempty


def add_parser(sub) -> None:
    p = sub.add_parser("client", help="ask a running Triton server for an image", description=__doc__.splitlines()[0])
    p.add_argument("--prompt", required=True, type=nonempty)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int_at_least(0), default=None)
    p.add_argument("--steps", type=int_at_least(1), default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float_range(0.0), default=None)
    p.add_argument("--height", type=int_at_least(1), default=None)
    p.add_argument("--width", type=int_at_least(1), default=None)
    p.add_argument("--out", default="image.png", help="PNG to write (default image.png)")
    p.add_argument("--url", default=None, help="gRPC address host:port (default: the detached server's, else 127.0.0.1:8001)")
    p.add_argument("--model-name", default="pipeline", help="the pipeline model's name in the repository (default pipeline)")
    p.add_argument("--timeout", type=float_range(0.0, lo_open=True), default=600.0, help="seconds to wait for the image (default 600)")
    p.add_argument("--artifacts", default=None, help="artifact root holding serve.json (default <repo>/artifacts)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from common.io import atomic_path, check_output, read_json
    from pipeline.artifacts import ARTIFACTS
    from runtime.triton_client import request_image

    out = check_output(args.out, "file")
    url = args.url
    if url is None:
        state = (Path(args.artifacts) if args.artifacts else ARTIFACTS) / "serve.json"
        url = read_json(state)["grpc"] if state.is_file() else "127.0.0.1:8001"
    values = {k: getattr(args, k) for k in ("negative_prompt", "seed", "steps", "guidance", "height", "width") if getattr(args, k) is not None}
    result = request_image(url, args.prompt, model=args.model_name, timeout=args.timeout, **values)
    from PIL import Image

    with atomic_path(out) as tmp:
        Image.fromarray(result.image).save(tmp, format="PNG")
    note = " (prompt truncated: a text encoder read only its beginning)" if result.truncated else ""
    print(f"{out}  {result.image.shape[1]}x{result.image.shape[0]}  {result.seconds:.2f} s{note}")
    return 0
