"""Stage 1's driver: :class:`PruneSettings` (typed, checked without loading weights), :func:`check_prune` and
:func:`run_prune` (load the pipeline on its device, then :func:`obsdiff.packages.prune` into ``settings.out``).

``python -m pipeline prune`` and ``make engine`` both call it. Output: ``OUT/plan.json``
(:class:`obsdiff.plan.PrunePlan`) and ``OUT/transformer/`` (diffusers format, same shapes as dense, pruned weights
zeroed). Interrupted runs resume from the last finished module package.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from common.errors import UserError
from common.io import check_output, created_dirs, expect_space
from common.memory import log_memory, release_to_os
from common.paths import REPO_ROOT
from families.registry import ModelSpec, component_numel, load_pipeline, meta_transformer, model_fingerprint, other_model
from families.sampling import report_prompt_truncation
from obsdiff.solvers import DEFAULT_BLOCKSIZE, DEFAULT_PERCDAMP

if TYPE_CHECKING:
    from obsdiff.packages import PruneConfig
    from obsdiff.patterns import Sparsity
    from obsdiff.plan import PrunePlan
    from obsdiff.weight_quant import WeightQuant

log = logging.getLogger(__name__)

# Defaults of prune_settings() and of the command line: one place, so `make engine` prunes exactly what
# `python -m pipeline prune` with the same few options would.
DEFAULT_GROUPS = 4
DEFAULT_SAMPLES = 64
DEFAULT_BATCH_SIZE = 8
DEFAULT_WEIGHTING, DEFAULT_W_MAX, DEFAULT_W_MIN = "log", 1.2, 0.8
DEVICE_DTYPES = ("auto", "float32", "float16", "bfloat16")
OFFLOADS = ("none", "model", "sequential")


def default_prompts_file(spec: ModelSpec) -> Path:
    """The model's calibration prompt file (its registry entry's)."""
    return REPO_ROOT / spec.prompts


def default_out(spec: ModelSpec, sparsity: Sparsity, method: str, quant: WeightQuant | None = None, modulation: bool = False) -> Path:
    """``artifacts/<model>/prune-<sparsity>-<method>``, ``-w<bits>g<group>`` added for quantized weights (``-rtn`` for
    round-to-nearest, ``-mod`` with the AdaLN modulations quantized)."""
    tail = "" if quant is None else f"-w{quant.bits}g{quant.group_size}" + ("-rtn" if quant.method == "rtn" else "")
    tail += "-mod" if modulation else ""
    return REPO_ROOT / "artifacts" / spec.id / f"prune-{sparsity.id}-{method}{tail}"


@dataclass(frozen=True)
class PruneSettings:
    """Stage 1 as this command and ``make engine`` run it: what to prune (``config``, ``prompts``), where
    (``out``), and on what (``device``: cpu, cuda, cuda:N or auto; ``dtype``: auto = bfloat16 on CUDA,
    float32 on CPU; ``offload``: diffusers CPU offload, none, model or sequential; CUDA only)."""

    spec: ModelSpec
    config: PruneConfig
    prompts: tuple[str, ...]
    out: Path
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "none"
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        """The settings as a manifest records them (the plan's own record of what changes the result)."""
        return {"model": self.spec.id, "out": str(self.out), "sparsity": str(self.config.sparsity), "method": self.config.method,
                "calibration": self.config.settings(self.prompts), "device": self.device, "dtype": self.dtype, "offload": self.offload}


def prune_config(
    spec: ModelSpec,
    sparsity: Sparsity,
    *,
    method: str = "obs-diff",
    groups: int = DEFAULT_GROUPS,
    samples: int = DEFAULT_SAMPLES,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    weighting: str = DEFAULT_WEIGHTING,
    w_max: float = DEFAULT_W_MAX,
    w_min: float = DEFAULT_W_MIN,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    compensate: bool = True,
    first_block: int = 0,
    last_block: int | None = None,
    skip: Sequence[str] = (),
    weight_bits: int | None = None,
    group_size: int | None = None,
    quant_method: str = "obs",
    quant_modulation: bool = False,
) -> PruneConfig:
    """The :class:`obsdiff.packages.PruneConfig` for ``spec``, checked (nothing is loaded).

    Calibration follows the sampler the model is deployed with: ``steps``/``guidance``/``height``/``width``
    None take the model's registry entry (a guidance <= 1, as for few-step models, samples without the
    CFG-doubled batch). The other defaults are the command line's. weight_bits/group_size/quant_method: quantize the
    solved weights (:class:`obsdiff.weight_quant.WeightQuant`; group size 128 by default).
    """
    from obsdiff.packages import CalibrationConfig, PruneConfig
    from obsdiff.timesteps import timestep_weights
    from obsdiff.weight_quant import DEFAULT_GROUP_SIZE, WeightQuant

    for name, value, lo in (("--groups", groups, 1), ("--samples", samples, 1), ("--steps", steps, 1), ("--batch-size", batch_size, 1),
                            ("--seed", seed, 0), ("--blocksize", blocksize, 1), ("--first-block", first_block, 0), ("--last-block", last_block, 0)):
        if value is not None and value < lo:
            raise UserError(f"{name}: must be at least {lo}, got {value}")
    steps = spec.steps if steps is None else steps
    guidance = spec.guidance if guidance is None else guidance
    timestep_weights(steps, weighting, w_max, w_min)  # validates
    spec.check_image_size(height, width)
    if last_block is not None and last_block < first_block:
        raise UserError(f"--last-block {last_block} is before --first-block {first_block}")
    if weight_bits is None and group_size is not None:
        raise UserError("--group-size needs --weight-bits (4 or 8)")
    quant = WeightQuant(weight_bits, group_size or DEFAULT_GROUP_SIZE, quant_method) if weight_bits is not None else None
    calib = CalibrationConfig(
        samples=samples,
        steps=steps,
        guidance=guidance,
        height=height or spec.height,
        width=width or spec.width,
        batch_size=batch_size,
        seed=seed,
        weighting=weighting,
        w_max=w_max,
        w_min=w_min,
        max_sequence_length=spec.max_sequence_length,
    )
    return PruneConfig(
        sparsity=sparsity,
        method=method,
        groups=groups,
        calibration=calib,
        blocksize=blocksize,
        percdamp=percdamp,
        compensate=compensate,
        first_block=first_block,
        last_block=last_block,
        skip=tuple(skip),
        family=spec.family,
        quant=quant,
        quant_modulation=quant_modulation,
    )


def prune_settings(
    spec: ModelSpec,
    sparsity: Sparsity,
    out: str | Path | None = None,
    *,
    prompts_file: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offload: str = "none",
    progress: bool = True,
    **options,
) -> PruneSettings:
    """:class:`PruneSettings` from typed values: ``options`` are :func:`prune_config`'s (method, groups,
    samples, steps, ...). out: default ``artifacts/<model>/prune-<sparsity>-<method>``. prompts_file: one
    prompt per line (default: the model's). Values are checked; the file system and the device are checked
    by :func:`check_prune`."""
    from obsdiff.packages import calibration_prompts, read_prompts

    config = prune_config(spec, sparsity, **options)
    prompts = calibration_prompts(read_prompts(prompts_file or default_prompts_file(spec)), config.calibration.samples)
    if out is None:
        out = default_out(spec, sparsity, config.method, config.quant, config.quant_modulation)
    return PruneSettings(spec=spec, config=config, prompts=tuple(prompts), out=Path(out), device=device, dtype=dtype, offload=offload,
                         progress=progress)


def check_prune(settings: PruneSettings) -> PrunePlan | None:
    """Every check of stage 1 that needs no model weights; returns the plan already in ``out`` for the same
    settings (None if there is none). ``make engine`` calls it for its prune stage before any stage runs."""
    from obsdiff.packages import check_existing, is_complete

    out = Path(settings.out)
    check_output(out, "parent")
    existing = check_existing(out, settings.spec.id, settings.config, settings.prompts)  # another run's settings in `out`: say so now
    if existing is not None:
        other = other_model(settings.spec, model=existing.model, family=existing.family, weights=existing.model_weights)
        if other:
            raise UserError(f"--out {out}: its plan.json {other}; delete {out} or choose another --out")
    if not is_complete(out, existing):
        check_units(settings.spec, settings.config)
        check_output(out / "transformer", "dir")
        check_output(out / "plan.json", "file")
    _, dtype = device_and_dtype(settings.device, settings.dtype, settings.offload)
    numel = None if is_complete(out, existing) else component_numel(settings.spec, "transformer")
    if numel:  # the pruned transformer is saved in the calibration dtype: one line now if the disk cannot hold it
        expect_space(out, numel * dtype.itemsize, "the pruned transformer")
    return existing


def check_units(spec: ModelSpec, config: PruneConfig) -> int | None:
    """The number of prunable units (:class:`obsdiff.packages.Unit`: parallel layers of one block that see the same
    input) ``config`` selects in ``spec``'s transformer, from its structure on the ``meta`` device (no weights); one
    line when the block range is outside the model or ``--groups`` asks for more packages than there are units (a
    package holds at least one). None when the transformer's config is not known here (a hub model not cached) or
    nothing is pruned."""
    from obsdiff.packages import config_units

    if not config.solves:
        return None
    transformer = meta_transformer(spec)
    if transformer is None:
        return None
    structured = config.sparsity.kind == "structured" and config.quant is None
    units = config_units(transformer, spec.adapter, config)
    if units and config.groups > len(units):
        blocks = spec.adapter.blocks(transformer)
        last = len(blocks) - 1 if config.last_block is None else config.last_block
        where = f"in blocks {config.first_block}..{last}" + (" (with --skip)" if config.skip else "")
        kind = " structured" if structured else ""
        raise UserError(f"--groups {config.groups}: {spec.id} has {len(units)} prunable{kind} units (parallel layers of one block that "
                        f"see the same input) {where}, and each package holds at least one; give --groups between 1 and {len(units)}")
    return len(units)


def device_and_dtype(device: str, dtype: str, offload: str):
    """``(torch.device, torch.dtype)`` for the stage's ``device``/``dtype``/``offload`` options, or one-line :class:`UserError`."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda given but CUDA is not available; use --device cpu")
    if offload not in OFFLOADS:
        raise UserError(f"--offload {offload}: use one of {', '.join(OFFLOADS)}")
    if offload != "none" and device.type != "cuda":
        raise UserError(f"--offload {offload} needs a CUDA GPU (it moves weights between CPU and GPU); use --offload none on CPU")
    if dtype not in DEVICE_DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DEVICE_DTYPES)}")
    name = dtype if dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return device, getattr(torch, name)


def check_device_memory(pipe, spec: ModelSpec, config, device, offload: str) -> dict[str, int]:
    """Estimate what pruning holds on ``device`` and stop with one line, before calibrating, if a GPU
    cannot hold it. Logs the estimate (bytes by part) either way and returns it.

    On the device: the pipeline's weights (all components; with ``--offload model`` the biggest one; with
    ``--offload sequential`` none to speak of), the largest module package's Hessians and the solver's
    workspace (:func:`obsdiff.packages.memory_estimate`). Activations come on top (resolution-dependent).
    """
    import torch

    from obsdiff.packages import config_units, memory_estimate, split_packages

    comps = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    sizes = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in comps.items()}
    units = config_units(pipe.transformer, spec.adapter, config)
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


def run_prune(settings: PruneSettings) -> PrunePlan | None:
    """Run stage 1: load the pipeline on its device, then :func:`obsdiff.packages.prune` into
    ``settings.out``. Returns the plan (the one already in ``out`` when it holds this pruning: nothing is
    loaded then). A bad input found late (the model cannot load) leaves nothing behind; a crash or Ctrl-C
    keeps the finished packages for a resume."""
    from obsdiff.distributed import init_from_env, shutdown
    from obsdiff.packages import is_complete, prune

    existing = check_prune(settings)
    spec, config, out = settings.spec, settings.config, Path(settings.out)
    device, dtype = device_and_dtype(settings.device, settings.dtype, settings.offload)
    if is_complete(out, existing):
        log.info("%s already holds this pruning (%s, %s); nothing to do", out, config.sparsity, config.method)
        return existing
    calib = config.calibration
    log.info("calibration: %d prompts x %d steps, guidance %g%s, %dx%d px", calib.samples, calib.steps, calib.guidance,
             "" if spec.adapter.runs_cfg_batch(calib.guidance) else " (no CFG)", calib.width, calib.height)

    ctx = init_from_env(device)
    plan = None
    try:
        with created_dirs(out, remove_on=(UserError,)):
            pipe = load_pipeline(spec, dtype=dtype)
            report_prompt_truncation(pipe, settings.prompts, calib.max_sequence_length, log, what="calibration prompts")
            release_to_os()  # loading converts dtypes shard by shard; hand the freed buffers back
            log_memory("prune: pipeline loaded", log)
            check_device_memory(pipe, spec, config, ctx.device, settings.offload)
            if settings.offload == "model":
                pipe.enable_model_cpu_offload(device=ctx.device)
            elif settings.offload == "sequential":
                pipe.enable_sequential_cpu_offload(device=ctx.device)
            else:
                pipe.to(ctx.device)
            t0 = time.perf_counter()
            plan = prune(pipe, spec.id, list(settings.prompts), config, out, ctx=ctx, progress=settings.progress,
                         model_weights=model_fingerprint(spec))
            if ctx.is_main:
                dens = [plan.layers[n]["density"] for n in plan.pruned_layers]
                mean = sum(dens) / len(dens) if dens else 1.0
                bits = f", {len(plan.layers)} layers on {plan.weight_quant['bits']}-bit weights" if plan.weight_quant else ""
                log.info("pruned %d layers (%s, %s), mean density %.3f%s, in %.1f s -> %s", len(dens), plan.sparsity, plan.method, mean, bits,
                         time.perf_counter() - t0, out)
    finally:
        shutdown(ctx)
    return plan
