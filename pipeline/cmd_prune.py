"""``python -m pipeline prune``: OBS-Diff one-shot pruning (stage 1).

Writes ``OUT/plan.json`` (:class:`obsdiff.plan.PrunePlan`) and ``OUT/transformer/`` (diffusers format, same
shapes as dense, pruned weights zeroed). Interrupted runs resume from the last finished module package.
Scale out with ``torchrun --nproc-per-node N -m pipeline prune ...`` (prompts split by rank).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from common.cli import float_range, int_at_least
from common.errors import UserError
from common.io import check_output, created_dirs
from common.memory import log_memory, release_to_os
from families.registry import REPO_ROOT, ModelSpec, load_pipeline, resolve_model

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("prune", help="OBS-Diff one-shot pruning of the transformer", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory (default tiny-sd3)")
    p.add_argument("--sparsity", default="2:4", help="2:4, 4:8, unstructured:<ratio>, structured:<ratio> or dense (default 2:4)")
    p.add_argument("--out", default=None, help="output directory (default artifacts/<model>/prune-<sparsity>-<method>)")
    p.add_argument("--method", default="obs-diff", choices=["obs-diff", "wanda", "magnitude"], help="pruning rule (default obs-diff)")
    p.add_argument("--groups", type=int_at_least(1), default=4, help="module packages pruned one after another (default 4)")
    c = p.add_argument_group("calibration")
    c.add_argument("--prompts", default=None, help="prompt file, one per line (default: the model's, prompts/digits.txt for tiny-sd3, prompts/calibration.txt for hub models)")
    c.add_argument("--samples", type=int_at_least(1), default=64, help="calibration prompts (default 64)")
    c.add_argument("--steps", type=int_at_least(1), default=None,
                   help="sampling steps per trajectory (default: the model's deployed sampler, e.g. 28 for sd3-medium, 20 for tiny-sd3, 4 for sd3.5-large-turbo)")
    c.add_argument("--guidance", type=float_range(0.0), default=None,
                   help="classifier-free guidance scale (default: the model's, e.g. 7.0 for sd3-medium, 4.0 for tiny-sd3; <= 1 runs without CFG, as few-step models do)")
    c.add_argument("--height", type=int_at_least(1), default=None, help="image height in pixels (default: the model's)")
    c.add_argument("--width", type=int_at_least(1), default=None, help="image width in pixels (default: the model's)")
    c.add_argument("--batch-size", type=int_at_least(1), default=8, help="prompts per pipeline call (default 8; results do not depend on it beyond float rounding)")
    c.add_argument("--seed", type=int_at_least(0), default=0, help="base noise seed; prompt i uses seed+i (default 0)")
    c.add_argument("--weighting", default="log", choices=["log", "linear", "uniform"], help="timestep weights (default log-decrease)")
    c.add_argument("--w-max", type=float_range(0.0, lo_open=True), default=1.2, help="weight of the first step (default 1.2)")
    c.add_argument("--w-min", type=float_range(0.0, lo_open=True), default=0.8, help="weight of the last step (default 0.8)")
    s = p.add_argument_group("solver")
    s.add_argument("--blocksize", type=int_at_least(1), default=128, help="OBS lazy-update block (default 128)")
    s.add_argument("--percdamp", type=float_range(0.0, 10.0, lo_open=True, hi_open=True), default=0.01, help="Hessian damping, share of the mean diagonal (default 0.01)")
    s.add_argument("--no-compensate", action="store_true", help="mask only, no OBS weight update")
    s.add_argument("--first-block", type=int_at_least(0), default=0, help="first transformer block to prune (default 0)")
    s.add_argument("--last-block", type=int_at_least(0), default=None, help="last transformer block to prune, inclusive (default: the last)")
    s.add_argument("--skip", action="append", default=[], metavar="GLOB", help="leave layers matching this glob dense (repeatable), e.g. '*.attn.add_q_proj'")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="pipeline dtype (default: bfloat16 on CUDA, float32 on CPU)")
    r.add_argument("--offload", default="none", choices=["none", "model", "sequential"], help="diffusers CPU offload for big models on one GPU (CUDA only)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def default_prompts_file(spec: ModelSpec) -> Path:
    return REPO_ROOT / spec.prompts


def default_out(args: argparse.Namespace, spec: ModelSpec, sparsity) -> Path:
    return Path(args.out) if args.out else REPO_ROOT / "artifacts" / spec.id / f"prune-{sparsity.id}-{args.method}"


def build_config(args: argparse.Namespace, spec: ModelSpec):
    """``(PruneConfig, prompts)`` from parsed CLI arguments (validates everything before any loading).

    Calibration follows the sampler the model is deployed with: steps and guidance default to the model's
    registry entry (a guidance <= 1, as for few-step models, samples without the CFG-doubled batch).
    """
    from obsdiff.packages import CalibrationConfig, PruneConfig, calibration_prompts, read_prompts
    from obsdiff.patterns import parse_sparsity
    from obsdiff.timesteps import timestep_weights

    sparsity = parse_sparsity(args.sparsity)
    steps = spec.steps if args.steps is None else args.steps
    guidance = spec.guidance if args.guidance is None else args.guidance
    timestep_weights(steps, args.weighting, args.w_max, args.w_min)  # validates
    spec.check_image_size(args.height, args.width)
    if args.last_block is not None and args.last_block < args.first_block:
        raise UserError(f"--last-block {args.last_block} is before --first-block {args.first_block}")
    height = args.height or spec.height
    width = args.width or spec.width
    calib = CalibrationConfig(
        samples=args.samples,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        batch_size=args.batch_size,
        seed=args.seed,
        weighting=args.weighting,
        w_max=args.w_max,
        w_min=args.w_min,
        max_sequence_length=spec.max_sequence_length,
    )
    config = PruneConfig(
        sparsity=sparsity,
        method=args.method,
        groups=args.groups,
        calibration=calib,
        blocksize=args.blocksize,
        percdamp=args.percdamp,
        compensate=not args.no_compensate,
        first_block=args.first_block,
        last_block=args.last_block,
        skip=tuple(args.skip),
        family=spec.family,
    )
    prompts = calibration_prompts(read_prompts(args.prompts or default_prompts_file(spec)), args.samples)
    return config, prompts


def validate(args: argparse.Namespace):
    """Every check of this command that needs no model weights: ``(spec, config, prompts, out, existing)``
    (``existing``: the plan already in ``out`` for the same settings, or None).

    ``make engine`` calls it for its prune stage before any stage runs.
    """
    from obsdiff.packages import check_existing, is_complete

    spec = resolve_model(args.model)
    config, prompts = build_config(args, spec)
    out = default_out(args, spec, config.sparsity)
    check_output(out, "parent")
    existing = check_existing(out, spec.id, config, prompts)  # another run's settings in `out`: say so now
    if not is_complete(out, existing):
        check_output(out / "transformer", "dir")
        check_output(out / "plan.json", "file")
    _device_and_dtype(args)
    return spec, config, prompts, out, existing


def _device_and_dtype(args: argparse.Namespace):
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda given but CUDA is not available; use --device cpu")
    if args.offload != "none" and device.type != "cuda":
        raise UserError(f"--offload {args.offload} needs a CUDA GPU (it moves weights between CPU and GPU); use --offload none on CPU")
    name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return device, getattr(torch, name)


def check_device_memory(pipe, spec: ModelSpec, config, device, offload: str) -> dict[str, int]:
    """Estimate what pruning holds on ``device`` and stop with one line, before calibrating, if a GPU
    cannot hold it. Logs the estimate (bytes by part) either way and returns it.

    On the device: the pipeline's weights (all components; with ``--offload model`` the biggest one; with
    ``--offload sequential`` none to speak of), the largest module package's Hessians and the solver's
    workspace (:func:`obsdiff.packages.memory_estimate`). Activations come on top (resolution-dependent).
    """
    import torch

    from obsdiff.packages import build_units, memory_estimate, split_packages

    comps = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    sizes = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in comps.items()}
    units = [] if config.sparsity.kind == "dense" else build_units(
        pipe.transformer, spec.adapter, first_block=config.first_block, last_block=config.last_block, skip=config.skip,
        structured=config.sparsity.kind == "structured")
    est = memory_estimate(pipe.transformer, split_packages(units, config.groups) if units else [],
                          weight_bytes_per_param=next(pipe.transformer.parameters()).element_size(), adapter=spec.adapter)
    on_device = {"none": sum(sizes.values()), "model": max(sizes.values()), "sequential": 0}
    need = {k: v + est["hessians"] + est["solver"] for k, v in on_device.items()}
    gib = lambda b: b / 2**30  # noqa: E731
    log.info("memory estimate: pipeline weights %.1f GiB (transformer %.1f), Hessians of the largest package %.1f GiB, "
             "solver %.1f GiB; on %s with --offload %s: %.1f GiB plus activations", gib(sum(sizes.values())), gib(sizes.get("transformer", 0)),
             gib(est["hessians"]), gib(est["solver"]), device, offload, gib(need[offload]))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need[offload] > free:
            options = ", ".join(f"--offload {k} ~{gib(v):.1f} GiB" for k, v in need.items() if v <= free and k != offload)
            raise UserError(
                f"pruning {spec.id} needs about {gib(need[offload]):.1f} GiB on {device} with --offload {offload} "
                f"(Hessians {gib(est['hessians']):.1f} GiB at --groups {config.groups}) but {gib(free):.1f} GiB are free; "
                + (f"use {options}" if options else "raise --groups (fewer Hessians at once) or use a bigger GPU")
            )
    return {**est, "pipeline_weights": sum(sizes.values()), "on_device": need[offload]}


def run(args: argparse.Namespace) -> int:
    from obsdiff.distributed import init_from_env, shutdown
    from obsdiff.packages import is_complete, prune

    spec, config, prompts, out, existing = validate(args)
    device, dtype = _device_and_dtype(args)
    if is_complete(out, existing):
        log.info("%s already holds this pruning (%s, %s); nothing to do", out, config.sparsity, config.method)
        return 0
    calib = config.calibration
    log.info("calibration: %d prompts x %d steps, guidance %g%s, %dx%d px", calib.samples, calib.steps, calib.guidance,
             "" if spec.adapter.runs_cfg_batch(calib.guidance) else " (no CFG)", calib.width, calib.height)

    ctx = init_from_env(device)
    # A bad input found late (the model cannot load) leaves nothing behind; a crash or Ctrl-C keeps the
    # finished packages for a resume.
    try:
        with created_dirs(out, remove_on=(UserError,)):
            pipe = load_pipeline(spec, dtype=dtype)
            release_to_os()  # loading converts dtypes shard by shard; hand the freed buffers back
            log_memory("prune: pipeline loaded", log)
            check_device_memory(pipe, spec, config, ctx.device, args.offload)
            if args.offload == "model":
                pipe.enable_model_cpu_offload(device=ctx.device)
            elif args.offload == "sequential":
                pipe.enable_sequential_cpu_offload(device=ctx.device)
            else:
                pipe.to(ctx.device)
            t0 = time.perf_counter()
            plan = prune(pipe, spec.id, prompts, config, out, ctx=ctx, progress=not args.no_progress)
            if ctx.is_main:
                dens = [v["density"] for v in plan.layers.values()]
                mean = sum(dens) / len(dens) if dens else 1.0
                log.info("pruned %d layers (%s, %s), mean density %.3f, in %.1f s -> %s", len(dens), plan.sparsity, plan.method, mean, time.perf_counter() - t0, out)
    finally:
        shutdown(ctx)
    return 0
