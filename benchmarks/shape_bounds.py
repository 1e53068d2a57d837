"""What 2:4 and structured pruning can give at each served shape, from FLOPs alone (no weights, any size).

For each resolution: the transformer's GEMM FLOPs per denoising step, the share of them in constant-weight
GEMMs that 2:4 sparse kernels can run (the block linears stage 1 prunes; not attention's activation x
activation products, the AdaLN modulations, the embedders or the final projection), the Amdahl bound on the
transformer's 2:4 speedup with those GEMMs at most 2x faster, and for each structured ratio the FLOP ratio
of the cut transformer and its bound ``dense / compact``. Everything runs on the ``meta`` device, so an
SD3-medium or Flux-sized model costs seconds.

    python -m benchmarks.shape_bounds --family sd3-medium --resolution 512x512,768x768,1024x1024
    python -m benchmarks.shape_bounds --model tiny-sd3 --resolution 32x32,64x64

``--family`` takes a published transformer config the family adapters carry; ``--model`` a
registry id or a diffusers directory (its ``transformer/config.json``). Writes JSON and a Markdown table.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from benchmarks import program
from common.errors import UserError
from common.versions import module_versions


def meta_transformer(args) -> tuple[torch.nn.Module, int, int, str]:
    """``(transformer on meta, vae_scale, text_seq_len, source)`` for ``--family`` or ``--model``."""
    import diffusers

    from families import adapter_for

    if args.family:
        from families import published_config

        adapter, config = published_config(args.family)
        cls, vae_scale, text = adapter.transformer_class, 8, adapter.text_seq_len
        source = f"{args.family} (published transformer config)"
    else:
        from common.io import read_json
        from families.registry import resolve_model

        spec = resolve_model(args.model)
        if not spec.local:
            raise UserError(f"--model {args.model}: a hub model's config is not cached here; give a local diffusers directory or --family")
        config = read_json(spec.path / "transformer" / "config.json", what="transformer config")
        cls, vae_scale, text = config["_class_name"], spec.vae_scale, spec.shapes.text_seq_len
        source = str(spec.path)
    adapter_for(cls)  # a family must handle it
    with torch.device("meta"):
        model = getattr(diffusers, cls).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return model.eval(), vae_scale, text, source


def bounds(model, resolutions, *, vae_scale: int, batch: int, text_seq_len: int, ratios: list[float]) -> list[dict[str, Any]]:
    from export.report import linear_flops, shape_table
    from export.surgery import apply_plan, structured_plan
    from obsdiff.packages import build_units

    eligible = {n for u in build_units(model) for n in u.layers}
    rows = shape_table(model, resolutions, vae_scale=vae_scale, batch=batch, text_seq_len=text_seq_len, eligible=eligible)
    for r in ratios:
        with torch.device("meta"):
            cut = type(model).from_config(model.config)
        apply_plan(cut, structured_plan(cut, r))
        for row, (h, w) in zip(rows, resolutions):
            g = linear_flops(cut, batch, (h // vae_scale, w // vae_scale), text_seq_len)[0]
            row.setdefault("structured", {})[f"{r:g}"] = {"gemm_flops": g, "flop_ratio": g / row["gemm_flops"], "bound": row["gemm_flops"] / g}
    return rows


def markdown(result: dict[str, Any]) -> str:
    ratios = list(result["rows"][0].get("structured", {})) if result["rows"] else []
    head = "| resolution | GEMM GFLOPs / step | 2:4-eligible share | 2:4 bound (transformer) |" + "".join(f" structured {r} bound |" for r in ratios)
    lines = [f"# Speedup bounds per shape: {result['source']}", "",
             f"Per denoising step at transformer batch {result['batch']} ({result['text_seq_len']} text tokens). Bounds are FLOP-based "
             "(Amdahl with eligible GEMMs at most 2x for 2:4; dense / compact GEMM FLOPs for structured): no kernel reaches them.", "",
             head, "|---|---|---|---|" + "---|" * len(ratios)]
    for r in result["rows"]:
        cells = "".join(f" {r['structured'][k]['bound']:.3f}x |" for k in ratios)
        lines.append(f"| {r['height']}x{r['width']} | {r['gemm_flops'] / 1e9:,.1f} | {r['eligible_2of4_share']:.1%} | {r['bound_2of4_transformer']:.3f}x |{cells}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from common.cli import int_at_least
    from families.shapes import parse_resolutions

    p = program.parser("shape_bounds", __doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--family", help="a published config (families.published_configs: sd3-medium, sd3.5-medium, sd3.5-large, flux.1-dev, ...)")
    g.add_argument("--model", help="registry id or local diffusers directory")
    p.add_argument("--resolution", default="512x512,768x768,1024x1024", help="HxW list in pixels")
    p.add_argument("--batch", type=int_at_least(1), default=2, help="transformer batch per step (2: classifier-free guidance)")
    p.add_argument("--structured", default="0.3", help="structured ratios, comma-separated ('' for none)").allow_empty = True
    p.add_argument("--out", default="artifacts/bench/shape_bounds.json", help="JSON path; the Markdown table goes next to it")

    def body(args) -> int:
        program.check_out(args.out)
        model, vae_scale, text, source = meta_transformer(args)
        resolutions = parse_resolutions(args.resolution)
        try:
            ratios = [float(r) for r in args.structured.split(",") if r.strip()]
        except ValueError:
            raise UserError(f"--structured {args.structured!r}: give ratios in (0, 1), comma-separated, e.g. 0.3,0.5") from None
        if any(not 0 < r < 1 for r in ratios):
            raise UserError(f"--structured {args.structured!r}: each ratio must be in (0, 1)")
        rows = bounds(model, resolutions, vae_scale=vae_scale, batch=args.batch, text_seq_len=text, ratios=ratios)
        result = {"benchmark": "shape_bounds", "source": source, "versions": module_versions(("torch", "diffusers")),
                  "batch": args.batch, "text_seq_len": text, "rows": rows}
        program.write(args.out, result, markdown(result), echo=True)
        return 0

    return program.run(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
