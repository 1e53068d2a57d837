"""Group-wise sequential pruning ("module packages") over the real diffusers pipeline.

The prunable ``nn.Linear`` layers of the transformer blocks, in block order, form parallel *units*
(layers of one block that see the same kind of input, e.g. q/k/v of the image and text branches). Which
layers a block has, which of them share one input tensor (one Hessian) and what a head or an FFN neuron
is, the family adapter says (:mod:`families`; the SD3 table is in :mod:`families.sd3`). Only these layers
are pruned: not the AdaLN modulations, the embedders or the final projection. Structured pruning acts on
the layers that consume a group's channels (heads: the attention output projection's columns; neurons:
the FFN output projection's columns, possibly a column range of a fused projection); cutting the matching
rows of the producing layers is stage 2's job and changes nothing numerically.

The ordered units are split into ``groups`` contiguous packages. For each package: hook its layers,
run the full denoising loop over the calibration prompts (classifier-free guidance on, so the transformer
sees both branches) accumulating timestep-weighted Hessians, solve every layer of the package, write the
pruned weights back, checkpoint, and go on: later packages calibrate on the already pruned earlier ones.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from common.errors import UserError
from common.io import atomic_path, read_text_lines
from common.memory import log_memory, release_to_os
from families import adapter_for, get_adapter
from families.base import FamilyAdapter, get_module
from families.sampling import pipeline_call
from obsdiff import baselines, solvers
from obsdiff.distributed import DistContext
from obsdiff.hessian import HessianCollector
from obsdiff.patterns import Sparsity
from obsdiff.plan import BlockPlan, PrunePlan
from obsdiff.timesteps import timestep_weights
from obsdiff.weight_quant import WeightQuant, rtn_quantize

log = logging.getLogger(__name__)

METHODS = ("obs-diff", "wanda", "magnitude")
MODULATION = "modulation"  # the unit kind of a block's AdaLN modulation linears: quantized, never pruned
PARTIAL_DIR = ".partial"
QUANT_FILE = "weights_int.safetensors"  # the integer weights and scales of a --weight-bits prune


# --------------------------------------------------------------------------------------------------
# Units and packages
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """Parallel layers of one block that see the same kind of input (see the adapter's unit table).

    block: the block's index in the adapter's block order; layers: qualified names inside the transformer.
    """

    block: int
    kind: str
    layers: tuple[str, ...]


def build_units(
    transformer: nn.Module,
    adapter: FamilyAdapter | None = None,
    *,
    first_block: int = 0,
    last_block: int | None = None,
    skip: Sequence[str] = (),
    structured: bool = False,
    modulation: bool = False,
) -> list[Unit]:
    """Ordered units of blocks ``first_block..last_block`` (inclusive; default all).

    adapter: the transformer's family adapter (default: found from its class).
    skip: glob patterns on qualified layer names (``transformer_blocks.3.*``, ``*.attn.add_q_proj``);
        matching layers stay dense. For structured pruning a group is skipped whole if any of the layers
        that consume it matches (the image and text branches of an attention must lose the same heads).
    structured: keep only the layers that consume a structured group's channels.
    modulation: also a unit of the block's AdaLN modulation linears (kind :data:`MODULATION`, first in the block: they
        run first), which a ``--weight-bits`` prune quantizes and never prunes.
    """
    adapter = adapter or adapter_for(transformer)
    blocks = adapter.blocks(transformer)
    last = len(blocks) - 1 if last_block is None else last_block
    if not (0 <= first_block <= last < len(blocks)):
        raise UserError(f"block range {first_block}..{last_block} is outside 0..{len(blocks) - 1}; fix --first-block/--last-block")
    units = []
    for i in range(first_block, last + 1):
        prefix, block = blocks[i]
        skipped = lambda n: any(fnmatch.fnmatchcase(f"{prefix}.{n}", p) for p in skip)  # noqa: E731
        if modulation:
            kept = [n for n in adapter.modulation(block) if not skipped(n)]
            if kept:
                units.append(Unit(i, MODULATION, tuple(f"{prefix}.{n}" for n in kept)))
        consumers: set[str] = set()
        if structured:
            for g in adapter.structured_groups(block):
                if not any(skipped(s.layer) for s in g.outputs):
                    consumers.update(s.layer for s in g.outputs)
        for kind, names in adapter.units(block):
            kept = [n for n in names if not skipped(n) and (not structured or n in consumers)]
            if kept:
                units.append(Unit(i, kind, tuple(f"{prefix}.{n}" for n in kept)))
    return units


def config_units(transformer: nn.Module, adapter: FamilyAdapter | None, config: "PruneConfig") -> list[Unit]:
    """The units ``config`` solves: none for a float dense run; the consumers of structured groups for a float
    structured one; every prunable layer otherwise (structured + ``quant`` quantizes them all after the cut)."""
    if not config.solves:
        return []
    return build_units(transformer, adapter, first_block=config.first_block, last_block=config.last_block, skip=config.skip,
                       structured=config.sparsity.kind == "structured" and config.quant is None,
                       modulation=config.quant is not None and config.quant_modulation)


def split_packages(units: Sequence[Unit], groups: int) -> list[list[Unit]]:
    """Split ordered ``units`` into ``groups`` contiguous packages (sizes differ by at most one; fewer
    packages when there are fewer units)."""
    if groups < 1:
        raise UserError(f"--groups must be at least 1, got {groups}")
    n = len(units)
    groups = min(groups, n)
    out, start = [], 0
    for g in range(groups):
        size = n // groups + (1 if g < n % groups else 0)
        out.append(list(units[start : start + size]))
        start += size
    return out


def _share_groups(layer_names: Sequence[str], shared_inputs: Sequence[Sequence[str]]) -> list[list[str]]:
    """Groups of ``layer_names`` fed the same input tensor (``shared_inputs``: the adapter's table of names
    inside a block, e.g. q/k/v of one attention, per branch)."""
    names = set(layer_names)
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for name in layer_names:
        for share in shared_inputs:
            share = tuple(share)
            for member in share:
                if name.endswith("." + member):
                    prefix = name[: -len(member) - 1]
                    groups.setdefault((prefix, share), [f"{prefix}.{s}" for s in share if f"{prefix}.{s}" in names])
    return [g for g in groups.values() if len(g) > 1]


def memory_estimate(transformer: nn.Module, packages: Sequence[Sequence[Unit]], *, weight_bytes_per_param: int, adapter: FamilyAdapter | None = None) -> dict[str, int]:
    """Bytes that pruning needs on the device that holds the model, by part (an estimate from shapes).

    weights: the transformer's parameters at ``weight_bytes_per_param`` (4 for float32, 2 for bf16/fp16);
    hessians: the largest package's accumulators (float64, one ``in x in`` matrix per input that layers
    share, see :func:`_share_groups`); solver: the largest layer's workspace (``H``, its factor and inverse
    in float32, the weight and its update; ~4 ``in x in`` + 3 ``out x in`` float32 matrices).
    Activations of the denoising loop are not included: they depend on resolution and batch.
    """
    adapter = adapter or adapter_for(transformer)
    modules = {name: m for name, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    weights = sum(p.numel() for p in transformer.parameters()) * weight_bytes_per_param
    hessians, solver = 0, 0
    for package in packages:
        names = [n for unit in package for n in unit.layers]
        shared = {n for g in _share_groups(names, adapter.shared_inputs) for n in g[1:]}  # all but the first of a group reuse its sum
        hessians = max(hessians, sum(modules[n].in_features ** 2 * 8 for n in names if n not in shared))
        for n in names:
            cols, rows = modules[n].in_features, modules[n].out_features
            solver = max(solver, (4 * cols * cols + 3 * rows * cols) * 4)
    return {"weights": weights, "hessians": hessians, "solver": solver, "total": weights + hessians + solver}


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationConfig:
    """How the calibration trajectories are sampled.

    ``python -m pipeline prune`` takes steps and guidance from the model's registry entry, so the Hessians
    come from the sampler the model is deployed with; the dataclass defaults are the paper's SD3 setting.

    samples: calibration prompts (cycled from the prompt list when it is shorter).
    steps: sampling steps T per trajectory. guidance: classifier-free guidance scale (> 1 keeps both
    branches in the batch). height/width: image size in pixels. batch_size: prompts per pipeline call.
    seed: base seed; prompt ``i`` starts from noise seeded with ``seed + i`` (so any split of the prompts
    over processes or batches sees the same trajectories). weighting/w_max/w_min: see
    :func:`obsdiff.timesteps.timestep_weights`. max_sequence_length: T5 tokens.
    """

    samples: int = 64
    steps: int = 25
    guidance: float = 7.0
    height: int = 1024
    width: int = 1024
    batch_size: int = 8
    seed: int = 0
    weighting: str = "log"
    w_max: float = 1.2
    w_min: float = 0.8
    max_sequence_length: int = 256


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the pruning result (the plan's ``calibration`` records all of it).

    groups: module packages (default 4). blocksize/percdamp/compensate: OBS solver options.
    first_block/last_block: inclusive block range to prune (default all). skip: glob patterns of layers
    left dense. max_group_iters: greedy iterations cap for structured neuron removal.
    family: the model family (recorded through its adapter's scope note).
    quant: quantize the solved layers' weights too (:class:`obsdiff.weight_quant.WeightQuant`; None: float). N:M and
    unstructured are solved jointly with it; structured quantizes each layer after its groups are cut, on its kept
    columns; dense quantizes every prunable layer. quant_modulation: with ``quant``, the blocks' AdaLN modulation linears
    are quantized too (never pruned).
    """

    sparsity: Sparsity
    method: str = "obs-diff"
    groups: int = 4
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    blocksize: int = solvers.DEFAULT_BLOCKSIZE
    percdamp: float = solvers.DEFAULT_PERCDAMP
    compensate: bool = True
    first_block: int = 0
    last_block: int | None = None
    skip: tuple[str, ...] = ()
    max_group_iters: int = 512
    family: str = "sd3"
    quant: WeightQuant | None = None
    quant_modulation: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown pruning method {self.method!r}; accepted: {', '.join(METHODS)}")
        if self.quant_modulation and self.quant is None:
            raise UserError("--quant-modulation quantizes the AdaLN modulations to --weight-bits: give --weight-bits 4 or 8")
        if self.quant is not None and self.quant.method == "obs" and self.method != "obs-diff":
            raise UserError(f"--quant-method obs solves on the Hessians of --method obs-diff; with --method {self.method} use --quant-method rtn")

    @property
    def solves(self) -> bool:
        """Whether any layer is solved (pruned or quantized)."""
        return self.sparsity.kind != "dense" or self.quant is not None

    @property
    def needs_hessian(self) -> bool:
        if self.sparsity.kind == "dense":
            return self.quant is not None and self.quant.method == "obs"
        return self.method != "magnitude"

    def settings(self, prompts: Sequence[str]) -> dict[str, Any]:
        """The plan's ``calibration`` dict: every setting that changes the result, and the prompts' hash."""
        d = asdict(self.calibration)
        d.update(
            groups=self.groups,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
            compensate=self.compensate,
            first_block=self.first_block,
            last_block=self.last_block,
            skip=list(self.skip),
            max_group_iters=self.max_group_iters,
            prompts_sha256=hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            notes=get_adapter(self.family).scope_note,
        )
        if self.quant is not None:  # only then: a float prune's settings stay those of plans written before --weight-bits
            d.update(weight_quant=self.quant.to_json(), quant_modulation=self.quant_modulation)
        return d


def calibration_prompts(prompts: Sequence[str], samples: int) -> list[str]:
    """The first ``samples`` prompts, cycling through ``prompts`` when it is shorter."""
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise UserError("the calibration prompt list is empty; pass --prompts FILE with one prompt per line")
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    return [prompts[i % len(prompts)] for i in range(samples)]


# A prompt longer than this is cut when read: no text encoder reads more (T5 at 512 tokens is about 2,000
# characters of English), and tokenising megabytes only to truncate them costs minutes.
PROMPT_MAX_CHARS = 4096


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of ``path`` (at most 16 MiB read; lines cut at :data:`PROMPT_MAX_CHARS`)."""
    return read_text_lines(path, what="prompt file", max_line_chars=PROMPT_MAX_CHARS)


def check_existing(out_dir: str | Path, model: str, config: PruneConfig, prompts: Sequence[str]) -> PrunePlan | None:
    """The plan already in ``out_dir``, if any, after checking it was made with the same settings.

    Raises :class:`UserError` when ``out_dir`` holds a plan for other settings.
    """
    path = Path(out_dir) / "plan.json"
    if not path.exists():
        return None
    plan = PrunePlan.load(path)
    mine = {"model": model, "sparsity": str(config.sparsity), "method": config.method, "calibration": config.settings(prompts)}
    theirs = {"model": plan.model, "sparsity": plan.sparsity, "method": plan.method, "calibration": plan.calibration}
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs[k])
        if "calibration" in diff:
            ck = sorted(k for k in set(mine["calibration"]) | set(theirs["calibration"]) if mine["calibration"].get(k) != theirs["calibration"].get(k))
            diff = [d for d in diff if d != "calibration"] + [f"calibration.{k}" for k in ck]
        raise UserError(f"{out_dir} holds a prune plan made with other settings ({', '.join(diff)}); use another --out or delete {out_dir}")
    return plan


def is_complete(out_dir: str | Path, plan: PrunePlan | None) -> bool:
    return plan is not None and plan.complete and (Path(out_dir) / "transformer" / "config.json").is_file()


# --------------------------------------------------------------------------------------------------
# Weights (offload-aware)
# --------------------------------------------------------------------------------------------------
def weight_tensor(layer: nn.Linear) -> torch.Tensor:
    """The tensor that really holds ``layer.weight``: the parameter, or, under accelerate's sequential CPU
    offload (parameters on the meta device), the CPU copy in the offload hook's weights map."""
    w = layer.weight
    if w.device.type != "meta":
        return w.data
    hook = getattr(layer, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        wm = getattr(h, "weights_map", None)
        if wm is not None and "weight" in wm:
            return wm["weight"]
    raise RuntimeError("layer weight is on the meta device and no offload weights map holds it")


def _solve_device(H: torch.Tensor | None, W: torch.Tensor) -> torch.device:
    if H is not None:
        return H.device
    return torch.device("cuda") if torch.cuda.is_available() else W.device


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
def run_calibration(
    pipe,
    collector: HessianCollector,
    prompts: Sequence[tuple[int, str]],
    calib: CalibrationConfig,
    progress=None,
) -> None:
    """Run the pipeline's full denoising loop over ``(global_index, prompt)`` pairs with ``collector``'s
    hooks active, setting the collector's step weight from the step callback."""
    weights = timestep_weights(calib.steps, calib.weighting, calib.w_max, calib.w_min).tolist()
    adapter = adapter_for(pipe.transformer)
    dtype = pipe.transformer.dtype

    def on_step_end(_pipe, i: int, _t, _kwargs):
        collector.weight = weights[min(i + 1, len(weights) - 1)]
        if progress is not None:
            progress.update(1)
        return {}

    with collector:
        for start in range(0, len(prompts), calib.batch_size):
            batch = prompts[start : start + calib.batch_size]
            noise = torch.cat([adapter.noise(pipe, calib.height, calib.width, calib.seed + idx, torch.float32) for idx, _ in batch])
            collector.weight = weights[0]
            # the noise is the adapter's (float32 on the CPU, then cast: the same latents on any device and dtype)
            pipeline_call(pipe, adapter, [p for _, p in batch], [calib.seed + idx for idx, _ in batch], steps=calib.steps,
                          guidance=calib.guidance, height=calib.height, width=calib.width, max_sequence_length=calib.max_sequence_length,
                          output_type="latent", latents=noise.to(dtype), callback_on_step_end=on_step_end)


# --------------------------------------------------------------------------------------------------
# Solving
# --------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    kind: str  # "weight" | "group" | "quant" (a layer's kept columns quantized after its groups are cut)
    layers: list[str]
    block: int
    group: str | None = None  # structured: the adapter's group name (the plan's key)
    unit: int = 1  # structured: columns per unit (head_dim or 1)
    cols: tuple[int, int] | None = None  # structured: the group's column range of each weight (None: all)


def _jobs(package: Sequence[Unit], sparsity: Sparsity, adapter: FamilyAdapter, blocks: Sequence[tuple[str, nn.Module]],
          quant: WeightQuant | None = None) -> list[_Job]:
    """The solves of a package: one per layer (N:M, unstructured; dense with ``quant``), or one per structured group
    whose consuming layers are all in a unit of the package (in the adapter's group order), then, with ``quant``,
    one per layer of the package."""
    jobs = []
    if sparsity.kind == "structured" and quant is not None:
        jobs = _jobs(package, sparsity, adapter, blocks)
        return jobs + [_Job("quant", [name], unit.block) for unit in package for name in unit.layers]
    for unit in package:
        if unit.kind == MODULATION:  # quantized only (with quant: the only way it is a unit)
            jobs += [_Job("quant", [name], unit.block) for name in unit.layers]
            continue
        if sparsity.kind != "structured":
            jobs += [_Job("weight", [name], unit.block) for name in unit.layers]
            continue
        prefix, block = blocks[unit.block]
        local = {name[len(prefix) + 1 :] for name in unit.layers}
        for g in adapter.structured_groups(block):
            if not g.outputs or any(s.layer not in local for s in g.outputs):
                continue
            offsets = {s.offset for s in g.outputs}
            assert len(offsets) == 1, f"group {g.name}: its weights must share one column range"
            offset = offsets.pop()
            width = get_module(block, g.outputs[0].layer).in_features
            cols = None if (offset == 0 and g.width == width) else (offset, offset + g.width)
            jobs.append(_Job("group", [f"{prefix}.{s.layer}" for s in g.outputs], unit.block, g.name, g.unit, cols))
    return jobs


_WEIGHT_SOLVERS: dict[str, Callable] = {"obs-diff": solvers.obs_prune, "wanda": baselines.wanda_prune, "magnitude": baselines.magnitude_prune}
_GROUP_SOLVERS: dict[str, Callable] = {"obs-diff": solvers.obs_prune_groups, "wanda": baselines.wanda_prune_groups, "magnitude": baselines.magnitude_prune_groups}


@dataclass
class _Solved:
    """What one job returns: the new weights, the kept unit indices (a structured group) and, with ``quant``, per
    weight its scales ``(rows, groups)`` and the columns they cover (None: all)."""

    weights: list[torch.Tensor]
    keep: list[int] | None = None
    scales: list[torch.Tensor] | None = None
    columns: list[torch.Tensor | None] | None = None


def _factor(job: _Job, H: torch.Tensor, collector: HessianCollector, config: PruneConfig, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse-Hessian factor of the job's layer, shared by the layers fed the same input (q/k/v)."""
    key = collector.key_of[job.layers[0]]
    if key not in factors:
        factors[key] = solvers.inverse_cholesky_upper(H, config.percdamp)[0]
    return factors[key]


def _quantize(job: _Job, W: torch.Tensor, H: torch.Tensor | None, collector, config: PruneConfig, factors, frozen: Sequence[int]) -> _Solved:
    """A ``quant`` job: the layer's kept columns (all but ``frozen``, removed by its structured groups) quantized on
    their own Hessian, the compact layer as stage 2 cuts it."""
    wq = config.quant
    cols = W.shape[1]
    idx = None
    if frozen:
        gone = torch.zeros(cols, dtype=torch.bool)
        gone[torch.as_tensor(list(frozen), dtype=torch.long)] = True
        idx = torch.nonzero(~gone).squeeze(1).to(W.device)  # (kept,)
    Wc = W if idx is None else W[:, idx]
    if wq.method == "rtn":
        Wq, scales = rtn_quantize(Wc, wq)
    else:
        Hc = H if idx is None else H[idx.to(H.device)][:, idx.to(H.device)]
        hinv = _factor(job, H, collector, config, factors) if idx is None else None
        Wq, _, scales = solvers.obs_prune(Wc, Hc, Sparsity("dense"), percdamp=config.percdamp, hinv_upper=hinv, quant=wq)
    if idx is None:
        return _Solved([Wq], scales=[scales], columns=[None])
    W_new = torch.zeros_like(W)
    W_new[:, idx] = Wq.to(W.dtype)
    return _Solved([W_new], scales=[scales], columns=[idx.cpu()])


def _solve(
    job: _Job, modules: dict[str, nn.Linear], collector: HessianCollector | None, config: PruneConfig, factors: dict[str, torch.Tensor], frozen: Sequence[int] = ()
) -> _Solved:
    """Solve one job.

    frozen: columns of the job's weights that earlier groups already removed (a fused projection whose
    column ranges belong to several groups): they stay zero and receive no compensation.
    """
    Ws = [weight_tensor(modules[n]) for n in job.layers]
    Hs = [collector.hessian(n) if collector is not None else None for n in job.layers]
    dev = _solve_device(Hs[0], Ws[0])
    Ws = [W.to(dev) for W in Ws]
    wq = config.quant
    if job.kind == "quant":
        return _quantize(job, Ws[0], Hs[0], collector, config, factors, frozen)
    if job.kind == "weight":
        kwargs: dict[str, Any] = {}
        obs_quant = wq is not None and wq.method == "obs"
        if config.method == "obs-diff" and (config.sparsity.kind != "dense" or obs_quant):
            kwargs["hinv_upper"] = _factor(job, Hs[0], collector, config, factors)
            if obs_quant:
                kwargs["quant"] = wq
        if config.sparsity.kind == "dense":
            out = solvers.obs_prune(Ws[0], Hs[0], config.sparsity, percdamp=config.percdamp, **kwargs) if "quant" in kwargs else (Ws[0], None)
        else:
            out = _WEIGHT_SOLVERS[config.method](
                Ws[0], Hs[0], config.sparsity, blocksize=config.blocksize, percdamp=config.percdamp, compensate=config.compensate, **kwargs
            )
        if wq is None:
            return _Solved([out[0]])
        if "quant" in kwargs:
            return _Solved([out[0]], scales=[out[2]], columns=[None])
        W_q, scales = rtn_quantize(out[0], wq)  # round to nearest after the pattern: zeros stay zeros
        return _Solved([W_q], scales=[scales], columns=[None])
    start, stop = job.cols if job.cols is not None else (0, Ws[0].shape[1])
    groups = (stop - start) // job.unit
    n_remove = min(groups - 1, int(round(config.sparsity.ratio * groups)))
    if n_remove == 0:
        return _Solved(Ws)
    fn = _GROUP_SOLVERS[config.method]
    kwargs = {"percdamp": config.percdamp, "compensate": config.compensate, "max_iters": config.max_group_iters} if config.method == "obs-diff" else {}
    if job.cols is not None:
        kwargs["cols"] = job.cols
    if frozen:
        kwargs["frozen"] = list(frozen)
    new_ws, keep = fn(Ws, Hs, job.unit, n_remove, **kwargs)
    return _Solved(new_ws, keep)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def _skeleton(model_id: str, transformer: nn.Module, adapter: FamilyAdapter, config: PruneConfig, prompts: Sequence[str], packages: list[list[Unit]],
              model_weights: str | None = None) -> PrunePlan:
    blocks = adapter.blocks(transformer)
    return PrunePlan(
        model=model_id,
        model_weights=model_weights,
        family=adapter.name,
        sparsity=str(config.sparsity),
        method=config.method,
        head_dim=adapter.head_dim(transformer),
        num_layers=len(blocks),
        blocks=[BlockPlan(index=i, sizes={g.name: g.size for g in adapter.structured_groups(b)}) for i, (_, b) in enumerate(blocks)],
        calibration=config.settings(prompts),
        packages=[[name for unit in pkg for name in unit.layers] for pkg in packages],
        weight_quant={**config.quant.to_json(), "file": QUANT_FILE} if config.quant is not None else None,
    )


def _partial_file(out_dir: Path, k: int) -> Path:
    return out_dir / PARTIAL_DIR / f"package_{k:03d}.safetensors"


def quant_tensors(name: str, W: torch.Tensor, scales: torch.Tensor, columns: torch.Tensor | None, wq: WeightQuant) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors of one quantized layer: ``<name>.codes`` int8 ``(rows, kept columns)``,
    ``<name>.scales`` float16 ``(rows, groups)`` and, where its structured groups removed columns,
    ``<name>.columns`` int64 (the kept ones, which the codes cover in order)."""
    from obsdiff.weight_quant import codes_of

    Wk = W.detach().to("cpu", torch.float32)
    if columns is not None:
        Wk = Wk[:, columns]
    scales = scales.detach().to("cpu", torch.float32)
    out = {f"{name}.codes": codes_of(Wk, scales, wq).contiguous(), f"{name}.scales": scales.to(torch.float16).contiguous()}
    if columns is not None:
        out[f"{name}.columns"] = columns.to(torch.int64).contiguous()
    return out


def _save_package(out_dir: Path, k: int, modules: dict[str, nn.Linear], names: Sequence[str], quant: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"{n}.weight": weight_tensor(modules[n]).detach().to("cpu").contiguous() for n in names}
    tensors.update(quant or {})
    with atomic_path(_partial_file(out_dir, k)) as tmp:
        save_file(tensors, str(tmp))


def _restore_packages(out_dir: Path, plan: PrunePlan, modules: dict[str, nn.Linear], quant: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    for k in range(plan.done_packages):
        path = _partial_file(out_dir, k)
        if not path.is_file():
            raise UserError(f"{out_dir}/plan.json says {plan.done_packages} packages are done but {path} is missing; delete {out_dir} and rerun")
        state = load_file(str(path))
        for n in plan.packages[k]:
            w = weight_tensor(modules[n])
            w.copy_(state.pop(f"{n}.weight").to(w.device, w.dtype))
        quant.update(state)  # the integer weights of a --weight-bits prune
    log.info("resumed after %d of %d packages", plan.done_packages, len(plan.packages))


def _remove_offload_hooks(pipe) -> None:
    if any(hasattr(m, "_hf_hook") for m in pipe.transformer.modules()) and hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()


def prune(
    pipe,
    model_id: str,
    prompts: Sequence[str],
    config: PruneConfig,
    out_dir: str | Path,
    *,
    ctx: DistContext | None = None,
    progress: bool = True,
    on_package_done: Callable[[int], None] | None = None,
    model_weights: str | None = None,
) -> PrunePlan:
    """Prune ``pipe.transformer`` in place, package by package; write ``out_dir/plan.json`` and
    ``out_dir/transformer/``; resume from ``out_dir``'s partial state when present.

    pipe: a loaded diffusers pipeline of a supported family (on its device, or with CPU offload enabled).
    prompts: the calibration prompts (already cut to ``samples``, see :func:`calibration_prompts`).
    ctx: scale-out context (prompts split by rank, Hessians all-reduced); default single process.
    on_package_done: called with the package index after each package is checkpointed (tests use it).
    model_weights: the model's :func:`families.registry.model_fingerprint`, recorded in the plan.
    Returns the final plan. A complete ``out_dir`` with the same settings is returned untouched.
    """
    from tqdm.auto import tqdm

    ctx = ctx or DistContext()
    out_dir = Path(out_dir)
    transformer = pipe.transformer
    adapter = adapter_for(transformer)
    blocks = adapter.blocks(transformer)
    existing = check_existing(out_dir, model_id, config, prompts)
    if is_complete(out_dir, existing):
        log.info("%s is complete with the same settings; nothing to do", out_dir)
        if ctx.is_main:  # killed between the final save and the clean-up
            shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)
        return existing

    units = config_units(transformer, adapter, config)
    packages = split_packages(units, config.groups) if units else []
    plan = _skeleton(model_id, transformer, adapter, config, prompts, packages, model_weights)
    modules = {name: m for name, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    quant: dict[str, torch.Tensor] = {}  # the integer weights and scales of every quantized layer so far
    if existing is not None:
        if existing.packages != plan.packages:
            raise UserError(f"{out_dir}/plan.json lists other layers than this model has; use another --out or delete {out_dir}")
        plan = existing
        _restore_packages(out_dir, plan, modules, quant)

    show = progress and ctx.is_main
    pkg_bar = tqdm(total=len(packages), initial=plan.done_packages, desc="packages", unit="pkg", disable=not show)
    for k in range(plan.done_packages, len(packages)):
        package = packages[k]
        names = plan.packages[k]
        collector = None
        if config.needs_hessian:
            collector = HessianCollector({n: modules[n] for n in names}, share=_share_groups(names, adapter.shared_inputs))
            shard = ctx.shard(prompts)  # (global index, prompt): the index seeds the noise
            calib = config.calibration
            steps_bar = tqdm(total=math.ceil(len(shard) / calib.batch_size) * calib.steps, desc=f"calibrate {k + 1}/{len(packages)}", unit="step", leave=False, disable=not show)
            with torch.no_grad():
                run_calibration(pipe, collector, shard, calib, steps_bar)
            steps_bar.close()
            collector.ensure_all(ctx.device if ctx.active else _first_device(collector, modules, names))
            ctx.all_reduce_sum(collector.tensors())
            log_memory(f"prune: package {k + 1}/{len(packages)} calibrated", log)
        jobs = _jobs(package, config.sparsity, adapter, blocks, config.quant)
        modulation = {n for unit in package if unit.kind == MODULATION for n in unit.layers}
        package_quant: dict[str, torch.Tensor] = {}
        factors: dict[str, torch.Tensor] = {}
        removed_cols: dict[str, list[int]] = {}  # per weight: columns earlier groups removed (fused projections)
        for j, job in enumerate(jobs):
            owner = j % ctx.world
            keep, qt = None, None
            if ctx.rank == owner:
                with torch.no_grad():
                    solved = _solve(job, modules, collector, config, factors, removed_cols.get(job.layers[0], ()))
                keep = solved.keep
                for n, W_new in zip(job.layers, solved.weights):
                    w = weight_tensor(modules[n])
                    w.copy_(W_new.to(w.device, w.dtype))
                if solved.scales is not None:
                    qt = {}
                    for n, W_new, sc, cols in zip(job.layers, solved.weights, solved.scales, solved.columns):
                        qt.update(quant_tensors(n, W_new, sc, cols, config.quant))
            for n in job.layers:
                ctx.broadcast_(weight_tensor(modules[n]), src=owner)
            keep = ctx.broadcast_object(keep, src=owner)
            qt = ctx.broadcast_object(qt, src=owner) if config.quant is not None else None
            package_quant.update(qt or {})
            if keep is not None:
                plan.blocks[job.block].keep[job.group] = keep
                start = job.cols[0] if job.cols is not None else 0
                gone = sorted(set(range(plan.blocks[job.block].sizes[job.group])) - set(keep))
                cols = (start + torch.as_tensor(gone, dtype=torch.long)[:, None] * job.unit + torch.arange(job.unit)[None, :]).reshape(-1).tolist()
                for n in job.layers:
                    removed_cols.setdefault(n, []).extend(cols)
        log_memory(f"prune: package {k + 1}/{len(packages)} solved", log)
        del collector, factors  # only the current package's Hessians are ever held
        release_to_os()
        for n in names:
            w = weight_tensor(modules[n])
            plan.layers[n] = {"density": float((w != 0).sum()) / w.numel(), "shape": list(w.shape)}
            if f"{n}.codes" in package_quant:
                plan.layers[n]["weight_bits"] = config.quant.bits
            if n in modulation:
                plan.layers[n]["pruned"] = False
        quant.update(package_quant)
        plan.done_packages = k + 1
        if ctx.is_main:
            _save_package(out_dir, k, modules, names, package_quant)
            plan.save(out_dir / "plan.json")
        ctx.barrier()
        pkg_bar.update(1)
        if on_package_done is not None:
            on_package_done(k)
    pkg_bar.close()

    if ctx.is_main:
        _remove_offload_hooks(pipe)
        with atomic_path(out_dir / "transformer") as tmp:
            # 1 GB shards: a later stage that loads this in another dtype converts one shard at a time
            transformer.save_pretrained(str(tmp), max_shard_size="1GB")
            if config.quant is not None:  # beside the float weights (exactly codes x scales), so stage 2 never re-quantizes
                from safetensors.torch import save_file

                save_file(quant, str(tmp / QUANT_FILE), metadata={"weight_quant": json.dumps(config.quant.to_json())})
        plan.save(out_dir / "plan.json")
        shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)
    ctx.barrier()
    return plan


def _first_device(collector: HessianCollector, modules: dict[str, nn.Linear], names: Sequence[str]) -> torch.device:
    for t in collector.sums.values():
        return t.device
    w = modules[names[0]].weight
    return w.device if w.device.type != "meta" else torch.device("cuda" if torch.cuda.is_available() else "cpu")
