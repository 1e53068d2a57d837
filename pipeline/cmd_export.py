"""``python -m pipeline export``: stage 2, from a pruned transformer to a compact checkpoint and ONNX.

Writes, under ``--out``:

- ``compact/`` (``model.safetensors`` + ``compact.json``): the transformer with pruned heads/neurons removed;
- ``onnx/<component>.onnx`` for transformer, text_encoder, text_encoder_2, text_encoder_3, vae_decoder;
- ``export_report.json``: parameters, GEMM FLOPs per denoising step, file sizes, parity errors, the
  sparse-eligible share of GEMM FLOPs, precision and shapes, and the fingerprint of the inputs.

The report is written last and marks the output complete. A rerun whose inputs (hash of ``plan.json`` and
the transformer weights, model, precision, components, shapes, library versions, this stage's code) are
unchanged reuses the existing output. ``compact/`` and ``onnx/`` are each replaced atomically. The stage
itself is :func:`export.stage.run_export`; this command parses its options into
:class:`export.stage.ExportSettings`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError


def add_parser(subparsers) -> None:
    from export.onnx_export import PRECISIONS
    from families.shapes import add_shape_args
    from export.stage import POLYGRAPHY_MODES

    p = subparsers.add_parser(
        "export",
        help="cut pruned heads/neurons, save the compact checkpoint, export ONNX",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory (default tiny-sd3)")
    p.add_argument("--pruned", type=Path, default=None, help="stage-1 directory (plan.json + transformer/); omitted: export the dense model")
    p.add_argument("--out", type=Path, required=True, help="output directory (may be the stage-1 directory)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 for CPU runtimes, fp16 for TensorRT (default fp32)")
    p.add_argument("--components", default=None, help="comma-separated subset of the model's components, e.g. "
                   "transformer,text_encoder,text_encoder_2,text_encoder_3,vae_decoder for SD3 (default all)")
    p.add_argument("--parity-batches", default="1,3", help="batch sizes for the ORT-vs-torch checks (default 1,3; '' skips them)")
    p.add_argument("--polygraphy", choices=POLYGRAPHY_MODES, default="auto", help="cross-check 2:4 with polygraphy (auto: models < 256 MB)")
    p.add_argument("--force", action="store_true", help="re-export even if the existing output is up to date")
    add_shape_args(p)
    p.set_defaults(func=run)


def _parse_components(text: str | None, spec) -> tuple[str, ...] | None:
    """``--components`` in the family's order (None: all of them)."""
    from export.stage import resolve_components

    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    known = [c.name for c in spec.adapter.components]
    bad = [c for c in names if c not in known]
    if bad or not names:
        raise UserError(f"unknown component(s) {bad or text!r} for {spec.id}; choose from {','.join(known)}")
    return tuple(resolve_components(spec, names))


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UserError(f"--parity-batches must be comma-separated integers, got {text!r}") from None
    if any(b < 1 for b in out):
        raise UserError(f"--parity-batches must be positive, got {text!r}")
    return out


def settings_from_args(args: argparse.Namespace):
    """The parsed options as :class:`export.stage.ExportSettings` (values checked, outputs not yet)."""
    from export.stage import ExportSettings
    from families.registry import resolve_model
    from families.shapes import shapes_from_args

    spec = resolve_model(args.model)
    return ExportSettings(
        spec=spec,
        out=Path(args.out),
        pruned=Path(args.pruned) if args.pruned is not None else None,
        precision=args.precision,
        components=_parse_components(args.components, spec),
        parity_batches=_parse_batches(args.parity_batches),
        polygraphy=args.polygraphy,
        force=args.force,
        shapes=shapes_from_args(args, spec),
    )


def validate(args: argparse.Namespace):
    """Every check of this command that needs no model weights; returns the :class:`ExportSettings`.

    ``--pruned`` is checked by :func:`export.stage.run_export` (``make engine`` checks its export stages
    before stage 1 has written the pruned directory).
    """
    from export.stage import check_export

    settings = settings_from_args(args)
    check_export(settings)
    return settings


def run(args: argparse.Namespace) -> int:
    from export.stage import run_export

    run_export(validate(args))
    return 0
