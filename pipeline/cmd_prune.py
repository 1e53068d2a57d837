"""``python -m pipeline prune``: OBS-Diff one-shot pruning (stage 1; the driver is :mod:`obsdiff.stage`).

Writes ``OUT/plan.json`` (:class:`obsdiff.plan.PrunePlan`) and ``OUT/transformer/`` (diffusers format, same
shapes as dense, pruned weights zeroed). Interrupted runs resume from the last finished module package.
Scale out with ``torchrun --nproc-per-node N -m pipeline prune ...`` (prompts split by rank).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.cli import float_range, int_at_least
from families.registry import ModelSpec, resolve_model
from obsdiff.stage import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BLOCKSIZE,
    DEFAULT_GROUPS,
    DEFAULT_PERCDAMP,
    DEFAULT_SAMPLES,
    DEFAULT_W_MAX,
    DEFAULT_W_MIN,
    DEFAULT_WEIGHTING,
    DEVICE_DTYPES,
    OFFLOADS,
    PruneSettings,
    check_prune,
    default_prompts_file,
    prune_config,
    prune_settings,
    run_prune,
)

def add_parser(subparsers) -> None:
    from obsdiff.packages import METHODS
    from obsdiff.weight_quant import GROUP_SIZES, QUANT_METHODS, WEIGHT_BITS

    p = subparsers.add_parser("prune", help="OBS-Diff one-shot pruning of the transformer", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory (default tiny-sd3)")
    p.add_argument("--sparsity", default="2:4", help="2:4, 4:8, unstructured:<ratio>, structured:<ratio> or dense (default 2:4)")
    p.add_argument("--out", default=None, help="output directory (default artifacts/<model>/prune-<sparsity>-<method>)")
    p.add_argument("--method", default="obs-diff", choices=list(METHODS), help="pruning rule (default obs-diff)")
    p.add_argument("--groups", type=int_at_least(1), default=DEFAULT_GROUPS, help="module packages pruned one after another (default 4)")
    c = p.add_argument_group("calibration")
    c.add_argument("--prompts", default=None, help="prompt file, one per line (default: the model's, prompts/digits.txt for tiny-sd3, prompts/calibration.txt for hub models)")
    c.add_argument("--samples", type=int_at_least(1), default=DEFAULT_SAMPLES, help="calibration prompts (default 64)")
    c.add_argument("--steps", type=int_at_least(1), default=None,
                   help="sampling steps per trajectory (default: the model's deployed sampler, e.g. 28 for sd3-medium, 20 for tiny-sd3, 4 for sd3.5-large-turbo)")
    c.add_argument("--guidance", type=float_range(0.0), default=None,
                   help="classifier-free guidance scale (default: the model's, e.g. 7.0 for sd3-medium, 4.0 for tiny-sd3; <= 1 runs without CFG, as few-step models do)")
    c.add_argument("--height", type=int_at_least(1), default=None, help="image height in pixels (default: the model's)")
    c.add_argument("--width", type=int_at_least(1), default=None, help="image width in pixels (default: the model's)")
    c.add_argument("--batch-size", type=int_at_least(1), default=DEFAULT_BATCH_SIZE, help="prompts per pipeline call (default 8; results do not depend on it beyond float rounding)")
    c.add_argument("--seed", type=int_at_least(0), default=0, help="base noise seed; prompt i uses seed+i (default 0)")
    c.add_argument("--weighting", default=DEFAULT_WEIGHTING, choices=["log", "linear", "uniform"], help="timestep weights (default log-decrease)")
    c.add_argument("--w-max", type=float_range(0.0, lo_open=True), default=DEFAULT_W_MAX, help="weight of the first step (default 1.2)")
    c.add_argument("--w-min", type=float_range(0.0, lo_open=True), default=DEFAULT_W_MIN, help="weight of the last step (default 0.8)")
    s = p.add_argument_group("solver")
    s.add_argument("--blocksize", type=int_at_least(1), default=DEFAULT_BLOCKSIZE, help="OBS lazy-update block (default 128)")
    s.add_argument("--percdamp", type=float_range(0.0, 10.0, lo_open=True, hi_open=True), default=DEFAULT_PERCDAMP, help="Hessian damping, share of the mean diagonal (default 0.01)")
    s.add_argument("--no-compensate", action="store_true", help="mask only, no OBS weight update")
    s.add_argument("--first-block", type=int_at_least(0), default=0, help="first transformer block to prune (default 0)")
    s.add_argument("--last-block", type=int_at_least(0), default=None, help="last transformer block to prune, inclusive (default: the last)")
    q = p.add_argument_group("weight quantization (solved with the pattern; docs/quantization.md)")
    q.add_argument("--weight-bits", type=int, choices=list(WEIGHT_BITS), default=None,
                   help="also quantize the solved layers' weights to 4 or 8 bits (symmetric, one float16 scale per group)")
    q.add_argument("--group-size", type=int, choices=list(GROUP_SIZES), default=None, help="input columns per scale (default 128)")
    q.add_argument("--quant-method", default="obs", choices=list(QUANT_METHODS),
                   help="obs: rounding errors compensated through the Hessians, jointly with the pattern (default); rtn: round to nearest")
    q.add_argument("--quant-modulation", action="store_true",
                   help="quantize the blocks' AdaLN modulation linears too (never pruned; a third of SD3-medium's and FLUX.1's weights)")
    s.add_argument("--skip", action="append", default=[], metavar="GLOB", help="leave layers matching this glob dense (repeatable), e.g. 'transformer_blocks.3.*'")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    r.add_argument("--dtype", default="auto", choices=list(DEVICE_DTYPES), help="pipeline dtype (default: bfloat16 on CUDA, float32 on CPU)")
    r.add_argument("--offload", default="none", choices=list(OFFLOADS), help="diffusers CPU offload for big models on one GPU (CUDA only)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _config_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(method=args.method, groups=args.groups, samples=args.samples, steps=args.steps, guidance=args.guidance, height=args.height,
                width=args.width, batch_size=args.batch_size, seed=args.seed, weighting=args.weighting, w_max=args.w_max, w_min=args.w_min,
                blocksize=args.blocksize, percdamp=args.percdamp, compensate=not args.no_compensate, first_block=args.first_block,
                last_block=args.last_block, skip=tuple(args.skip), weight_bits=args.weight_bits, group_size=args.group_size,
                quant_method=args.quant_method, quant_modulation=args.quant_modulation)


def build_config(args: argparse.Namespace, spec: ModelSpec):
    """``(PruneConfig, prompts)`` from parsed CLI arguments (validates everything before any loading)."""
    from obsdiff.packages import calibration_prompts, read_prompts
    from obsdiff.patterns import parse_sparsity

    config = prune_config(spec, parse_sparsity(args.sparsity), **_config_options(args))
    prompts = calibration_prompts(read_prompts(args.prompts or default_prompts_file(spec)), args.samples)
    return config, prompts


def settings_from_args(args: argparse.Namespace) -> PruneSettings:
    """The parsed options as :class:`PruneSettings` (values checked, the file system and device not yet)."""
    from obsdiff.patterns import parse_sparsity

    spec = resolve_model(args.model)
    sparsity = parse_sparsity(args.sparsity)
    return prune_settings(spec, sparsity, Path(args.out) if args.out else None, prompts_file=args.prompts, device=args.device, dtype=args.dtype,
                          offload=args.offload, progress=not args.no_progress, **_config_options(args))


def validate(args: argparse.Namespace) -> PruneSettings:
    """Every check of this command that needs no model weights; returns the :class:`PruneSettings`."""
    settings = settings_from_args(args)
    check_prune(settings)
    return settings


def run(args: argparse.Namespace) -> int:
    run_prune(validate(args))
    return 0
