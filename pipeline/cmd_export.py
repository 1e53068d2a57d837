"""``python -m pipeline export``: stage 2, from a pruned transformer to a compact checkpoint and ONNX.

Writes, under ``--out``:

- ``compact/`` (``model.safetensors`` + ``compact.json``): the transformer with pruned heads/neurons removed;
- ``onnx/<component>.onnx`` for transformer, text_encoder, text_encoder_2, text_encoder_3, vae_decoder;
- ``export_report.json``: parameters, GEMM FLOPs per denoising step, file sizes, parity errors, the
  sparse-eligible share of GEMM FLOPs, precision and shapes, and the fingerprint of the inputs.

``--precision int8`` / ``fp8`` quantize the transformer with NVIDIA ModelOpt, calibrated on stage 1's
trajectories (``--calib-samples`` of its prompts and seeds, its steps and guidance): a Q/DQ ONNX whose pruned
weights stay zero (the N:M check reads through the DequantizeLinear), INT8 checked in ONNX Runtime against the
fake-quantized model; the VAE decoder stays float32 (int8) or float16 (fp8). ``--precision int4`` takes the
4-bit weights a ``prune --weight-bits 4`` solved (``--pruned``) into ONNX Runtime's ``MatMulNBits`` (no calibration,
no re-quantization), checked against the torch model with the same integer weights; ``--precision w4a16`` takes the
same weights to TensorRT: a float16 graph whose quantized MatMuls read them through blocked INT4 ``DequantizeLinear``
(the other components float16), checked in ONNX Runtime against the float16 model (docs/tensorrt.md).

``--others-precision int8|int4`` (the default next to an INT8 / INT4 transformer) exports the text encoders' linear
layers weight-only in ONNX Runtime's ``MatMulNBits`` (token tables float16; the VAE decoder float32), each checked
against its float32 ONNX on the model's prompts (:mod:`export.encoder_quant`); ``--drop-t5`` leaves SD3's T5 out
(docs/low-precision.md#compressed-text-encoders).

The report is written last and marks the output complete. A rerun whose inputs (hash of ``plan.json`` and
the transformer weights, model, precision, components, shapes, library versions, this stage's code) are
unchanged reuses the existing output. ``compact/`` and ``onnx/`` are each replaced atomically. The stage
itself is :func:`export.stage.run_export`; this command parses its options into
:class:`export.stage.ExportSettings`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import float_range, int_at_least
from common.errors import UserError


def add_parser(subparsers) -> None:
    from export.stage import DEFAULT_QUANT_CALLS, DEFAULT_QUANT_SAMPLES, OTHER_PRECISIONS, POLYGRAPHY_MODES, PRECISIONS
    from families.shapes import add_shape_args

    p = subparsers.add_parser(
        "export",
        help="cut pruned heads/neurons, save the compact checkpoint, export ONNX",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory (default tiny-sd3)")
    p.add_argument("--pruned", type=Path, default=None, help="stage-1 directory (plan.json + transformer/); omitted: export the dense model")
    p.add_argument("--out", type=Path, required=True, help="output directory (may be the stage-1 directory)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the transformer's: fp32 for CPU runtimes, fp16 for TensorRT, int8 (Q/DQ; ONNX Runtime and TensorRT) or "
                        "fp8 (TensorRT on SM89/SM120 GPUs), both calibrated with ModelOpt on stage 1's trajectories, or int4 (the 4-bit "
                        "weights of a `prune --weight-bits 4` --pruned as ONNX Runtime's MatMulNBits, INT8 activations), or w4a16 (those weights "
                        "as TensorRT's INT4 DequantizeLinear in a float16 graph; default fp32)")
    p.add_argument("--others-precision", choices=OTHER_PRECISIONS, default=None,
                   help="the other components' precision: fp32, fp16, or int8/int4 (the text encoders' linear layers weight-only "
                        "INT8/INT4 for ONNX Runtime, the VAE decoder float32; docs/low-precision.md). Default: fp32 next to fp32, "
                        "int8 next to int8, int4 next to int4, fp16 next to fp16/fp8/w4a16")
    p.add_argument("--drop-t5", action="store_true",
                   help="leave the T5 encoder out (SD3-family models: the pipeline runs with text_encoder_3=None; FLUX needs T5)")
    q = p.add_argument_group("quantization (--precision int8/fp8)")
    q.add_argument("--calib-samples", type=int_at_least(1), default=DEFAULT_QUANT_SAMPLES,
                   help=f"trajectories to calibrate on: the first of stage 1's prompts and seeds (default {DEFAULT_QUANT_SAMPLES})")
    q.add_argument("--calib-calls", type=int_at_least(1), default=DEFAULT_QUANT_CALLS,
                   help=f"transformer calls kept for calibration, spread over the trajectories (default {DEFAULT_QUANT_CALLS})")
    q.add_argument("--calib-prompts", type=Path, default=None, help="stage 1's prompt file if it was not the model's (one prompt per line)")
    p.add_argument("--components", default=None, help="comma-separated subset of the model's components, e.g. "
                   "transformer,text_encoder,text_encoder_2,text_encoder_3,vae_decoder for SD3 (default all)")
    p.add_argument("--parity-batches", default="1,3", help="batch sizes for the ORT-vs-torch checks (default 1,3; '' skips them)").allow_empty = True
    p.add_argument("--parity-memory", type=float_range(0, lo_open=True), default=None, metavar="GIB",
                   help="activation memory each ORT-vs-torch check may take before it runs at a smaller latent shape than the "
                        "served one (default: half the component's ONNX weights + 1 GiB, which keeps the export within 1.5x "
                        "its weights + 2 GiB)")
    p.add_argument("--share-from", type=Path, default=None, metavar="DIR",
                   help="a finished dense export of the same model: a pruned export links its text encoders and VAE decoder where they "
                        "match (same weights, precision, shapes, libraries, export code) instead of exporting them again")
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
    from export.stage import ExportSettings, QuantCalibration
    from families.registry import resolve_model
    from families.shapes import shapes_from_args

    spec = resolve_model(args.model)
    calibration = None
    if args.precision in ("int8", "fp8"):
        prompts = None
        if args.calib_prompts is not None:
            from obsdiff.packages import read_prompts

            prompts = tuple(read_prompts(args.calib_prompts))
        calibration = QuantCalibration(samples=args.calib_samples, max_calls=args.calib_calls, prompts=prompts)
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
        calibration=calibration,
        others_precision=args.others_precision,
        parity_memory=None if args.parity_memory is None else int(args.parity_memory * 2**30),
        share_from=Path(args.share_from) if args.share_from is not None else None,
        drop_t5=args.drop_t5,
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
