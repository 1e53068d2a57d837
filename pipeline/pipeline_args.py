"""Command-line options that choose and run a pipeline (``generate``, ``sheet``, ``benchmarks.quality``)."""

from __future__ import annotations

from pathlib import Path

from common.cli import float_range, int_at_least
from families.registry import ModelSpec
from families.sampling import sample, to_uint8  # noqa: F401  (for the commands)


TRANSFORMER_HELP = ("use this transformer instead of the model's: a `prune` output directory (or its transformer/), "
                    "an `export` output directory (or its compact/)")


def add_sampler_args(p) -> None:
    """``--steps`` and ``--guidance`` (default: the model's registry values), range-checked at parse time."""
    p.add_argument("--steps", type=int_at_least(1), help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float_range(0.0), help="guidance scale (default: the model's)")


def add_pipeline_args(p) -> None:
    """The CLI options that choose which pipeline samples: ``--no-t5`` and ``--transformer``."""
    p.add_argument("--no-t5", action="store_true", help="drop the T5 encoder (text_encoder_3=None)")
    p.add_argument("--transformer", metavar="DIR", help=TRANSFORMER_HELP)


def check_pipeline_args(args) -> tuple[ModelSpec, "Path | None"]:
    """Validate ``--model`` and ``--transformer`` without loading weights: ``(spec, transformer_dir)``."""
    from export.checkpoint import check_transformer_model, find_transformer_dir
    from families.registry import resolve_model

    spec = resolve_model(args.model)
    tdir = find_transformer_dir(args.transformer) if args.transformer else None
    if tdir is not None:  # a transformer made for another model: one line now, not a traceback inside diffusers
        check_transformer_model(tdir, spec)
    return spec, tdir


def pipeline_from_args(args, checked: tuple[ModelSpec, "Path | None"] | None = None):
    """``(spec, pipe)`` for ``args.model`` with the options of :func:`add_pipeline_args`.

    checked: what :func:`check_pipeline_args` already returned for ``args`` (default: check them now).
    """
    from export.checkpoint import load_any_transformer
    from families.registry import load_pipeline

    spec, tdir = checked if checked is not None else check_pipeline_args(args)
    transformer = load_any_transformer(tdir) if tdir is not None else None
    return spec, load_pipeline(spec, drop_t5=args.no_t5, transformer=transformer)
