"""Latency vs quality across sparsity and precision: a grid of pruned models, benchmarked end to end in one run,
with the Pareto front marked.

``python -m benchmarks.pareto --model tiny-sd3`` (``make pareto MODEL=...``):

1. **Stages, reused.** For every sparsity of ``--grid`` (default dense, 2:4 and structured 0.1 to 0.5), stage 1
   prunes into a configuration directory of the artifact store and stage 2 exports the transformer there in
   every precision of ``--precisions`` (default fp32 and int8: ``export/``, ``export-int8/``), with the very
   settings ``make engine`` uses (:func:`pipeline.engine.export_settings`,
   :func:`pipeline.engine.quant_calibration`). The directory is ``make engine``'s
   (``artifacts/<model>/<sparsity>-<method>/``) when stage 1 runs with its calibration (``--samples 64``), else
   one naming the difference (``...-s16`` for the default ``--samples 16``: a small calibration keeps the whole
   grid within minutes on a CPU); the dense directory is shared. A stage whose
   output is complete and current is reused, whichever command wrote it; an existing export that holds more
   components serves a transformer-only request. Only the dense float32 export carries the text encoders and
   the VAE: they are never pruned or quantized, so every variant runs the same ONNX Runtime sessions for them.
2. **One interleaved benchmark.** Every variant (sparsity x precision) is loaded in one process and timed end to
   end on ONNX Runtime (CPU), the order rotating every round, as :mod:`measure.e2e` does for two; then each
   is scored (:func:`evaluation.metrics.evaluate`: prompt accuracy and Fréchet distance for the embedded digit
   models, CLIP score for hub models when CLIP is cached).
3. **The report.** ``artifacts/<model>/pareto/``: ``pareto.json``, ``pareto.md`` (one row per variant, the
   front marked) and ``pareto.png`` (latency vs each quality metric, the front drawn as a staircase).

FP8 is not run here: ONNX Runtime cannot run TensorRT's FP8 Q/DQ, and FP8 engines need an Ada or later GPU
(``make engine ... ENGINE_ARGS="--precision fp8"`` there); the report says so when fp8 is asked for.

Structured ratios are pruned one stage-1 run each, not read off one calibration. OBS group pruning is greedy:
it removes the group whose removal costs least and compensates the remaining weights, group after group, and
module packages are pruned in sequence, each calibrated on activations of the packages before it already
pruned at the target ratio. The keep sets of a 0.5 run stopped early would be nested, but stage 1 does not
record the removal order nor the compensated weights at each intermediate ratio, and a package's Hessians at
0.3 differ from those at 0.5 (earlier packages are pruned less). A ratio read off the 0.5 run would therefore
not be the model that stage 1 gives at that ratio; each ratio costs one calibration instead (about a minute
on tiny-sd3 with 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("benchmarks.pareto")

DEFAULT_GRID = "dense,2:4,structured:0.1,structured:0.2,structured:0.3,structured:0.4,structured:0.5"
DEFAULT_PRECISIONS = "fp32,int8"
# Small calibration and benchmark settings by default, so that the whole grid runs in minutes on a CPU.
DEFAULT_SAMPLES = 16
DEFAULT_RUNS = 5
DEFAULT_WARMUP = 1
DEFAULT_QUALITY_SEEDS = 8  # 80 images per variant for the digit models, as `make quality`
# Quality metrics: name -> True when higher is better.
METRICS = {"prompt_accuracy": True, "frechet_distance": False, "clip_score": True}
RUNNABLE = {"fp32", "int8"}  # what ONNX Runtime on a CPU can run
FP8_NOTE = ("fp8 not benchmarked: ONNX Runtime cannot run TensorRT's FP8 Q/DQ, and FP8 engines need an Ada or later GPU "
            "(compute capability 8.9+); build and benchmark them there with `make engine ENGINE_ARGS=\"--precision fp8\"`")


# ------------------------------------------------------------------------------------------ Pareto front


def pareto_front(points: Sequence[tuple[float, float | None]], *, higher_is_better: bool = True) -> list[int]:
    """Indices (in input order) of the points on the Pareto front of (latency, quality).

    A point is on the front when no other point is at least as fast and at least as good, and strictly better
    in one of the two (lower latency; higher quality, or lower with ``higher_is_better=False``). Equal points
    do not dominate each other (both stay). A point whose latency or quality is None or not finite is never
    on the front and dominates nothing.
    """
    sign = 1.0 if higher_is_better else -1.0
    valid = [i for i, (lat, q) in enumerate(points) if lat is not None and q is not None and math.isfinite(lat) and math.isfinite(q)]
    front = []
    for i in valid:
        li, qi = points[i][0], sign * points[i][1]
        dominated = any(
            points[j][0] <= li and sign * points[j][1] >= qi and (points[j][0] < li or sign * points[j][1] > qi) for j in valid if j != i
        )
        if not dominated:
            front.append(i)
    return front


# ------------------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class GridPoint:
    """One variant: a sparsity (``dense`` included) at one transformer precision."""

    sparsity: Any  # obsdiff.patterns.Sparsity
    precision: str

    @property
    def name(self) -> str:
        return f"{self.sparsity} {self.precision}"


@dataclass
class GridPlan:
    """The stages that make every variant's export, and where each variant's ONNX lives."""

    stages: list = field(default_factory=list)  # pipeline.engine.Stage
    exports: dict[str, Path] = field(default_factory=dict)  # variant name -> export directory
    shared: Path | None = None  # the dense float32 export: text encoders and VAE for every variant


def parse_grid(text: str) -> list:
    """``"dense,2:4,structured:0.3"`` -> Sparsity objects (each checked; duplicates dropped, order kept)."""
    from common.errors import UserError
    from obsdiff.patterns import parse_sparsity

    out = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            sp = parse_sparsity(part)
            if str(sp) not in {str(s) for s in out}:
                out.append(sp)
    if not out:
        raise UserError("--grid is empty; give sparsities such as dense,2:4,structured:0.3")
    return out


def parse_precisions(text: str) -> list[str]:
    from common.errors import UserError

    out = list(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    bad = [p for p in out if p not in ("fp32", "int8", "fp8")]
    if bad or not out:
        raise UserError(f"--precisions: unknown {bad or text!r}; use fp32, int8 (and fp8, reported as not runnable here)")
    return out


def plan_grid(args, spec, grid: list, precisions: list[str], base: Path) -> GridPlan:
    """The prune and export stages of the grid (``make engine``'s settings and directories), every one checked."""
    from obsdiff.patterns import parse_sparsity
    from pipeline.artifacts import config_dirs
    from pipeline.engine import Stage, check_stage, export_settings, quant_calibration
    from obsdiff.stage import DEFAULT_SAMPLES as PRUNE_SAMPLES
    from obsdiff.stage import prune_settings

    options = dict(method=args.method, groups=args.groups, samples=args.samples or PRUNE_SAMPLES, steps=args.calib_steps)
    dense = config_dirs(spec, "dense", base)
    plan = GridPlan(shared=dense.export)
    # INT8 calibration follows stage 1's prompts and sampler, the same for every sparsity (and for dense)
    first = next((sp for sp in grid if sp.kind != "dense"), parse_sparsity("2:4"))
    quant = quant_calibration(args, prune_settings(spec, first, dense.root / "unused", **options))
    runnable = [p for p in precisions if p in RUNNABLE]
    for sp in grid:
        if sp.kind == "dense":
            dirs, pruned = dense, None
        else:
            dirs = config_dirs(spec, config_id(sp, args.method, options["samples"], args.calib_steps), base)
            pruned = dirs.prune
            prune = prune_settings(spec, sp, dirs.prune, **options)
            plan.stages.append(Stage(f"prune {sp}", dirs.prune / "plan.json", prune, {"model": spec.source}, {"dir": str(dirs.prune)}))
        for precision in runnable:
            everything = sp.kind == "dense" and precision == "fp32"  # the shared components come from here
            settings = export_settings(spec, dirs, pruned, precision, None, quant if precision != "fp32" else None,
                                       components=None if everything else ("transformer",))
            plan.stages.append(Stage(f"export {sp} {precision}", settings.out / "export_report.json", settings,
                                     {"pruned": str(pruned) if pruned else None}, {"dir": str(settings.out)}))
            plan.exports[GridPoint(sp, precision).name] = settings.out
    if "fp32" not in runnable or not any(sp.kind == "dense" for sp in grid):
        settings = export_settings(spec, dense, None, "fp32", None)
        plan.stages.append(Stage("export dense fp32 (text encoders, VAE)", settings.out / "export_report.json", settings, {"pruned": None},
                                 {"dir": str(settings.out)}))
    for st in plan.stages:
        check_stage(st)
    return plan


def config_id(sparsity, method: str, samples: int, calib_steps: int | None) -> str:
    """The configuration directory of one sparsity: ``make engine``'s (``2-4-obs-diff``) when stage 1 runs with
    its default calibration (so each reuses what the other did), else one that names the difference
    (``2-4-obs-diff-s16``), so that two calibrations never meet in one directory."""
    from obsdiff.stage import DEFAULT_SAMPLES as PRUNE_SAMPLES

    cid = f"{sparsity.id}-{method}"
    if samples != PRUNE_SAMPLES:
        cid += f"-s{samples}"
    if calib_steps is not None:
        cid += f"-t{calib_steps}"
    return cid


def run_stages(stages: list) -> list[dict[str, Any]]:
    """Run (or reuse) every stage in order; returns ``[{stage, seconds, reused}]``."""
    from common.errors import UserError
    from pipeline.engine import run_stage

    done = []
    for st in stages:
        before = st.marker.stat().st_mtime_ns if st.marker.exists() else None
        t0 = time.perf_counter()
        log.info("== %s ==", st.name)
        run_stage(st)
        if not st.marker.exists():
            raise UserError(f"stage {st.name} finished without writing {st.marker}")
        reused = before is not None and st.marker.stat().st_mtime_ns == before
        done.append({"stage": st.name, "seconds": round(time.perf_counter() - t0, 1), "reused": reused})
        log.info("%s: %s in %.1f s", st.name, "reused" if reused else "done", time.perf_counter() - t0)
    return done


# ------------------------------------------------------------------------------------------ benchmark


def bench_grid(spec, points: list[GridPoint], exports: dict[str, Path], shared: Path, *, runs: int, warmup: int, steps: int | None,
               quality_seeds: Sequence[int], threads: int, quality: bool = True) -> dict[str, dict[str, Any]]:
    """Time every variant end to end on ONNX Runtime (CPU), interleaved, then score each; ``{name: entry}``.

    Each variant's transformer runs from its own export; the text encoders and the VAE run the same sessions
    (from ``shared``) in every variant. Per round, every variant generates the same prompt with the same seed,
    the order rotating by one each round.
    """
    import torch
    from tqdm import tqdm

    from measure.e2e import default_prompts, stats
    from runtime.stage_timer import STAGES, StageTimer
    from common.io import read_json
    from families.registry import load_pipeline
    from runtime.pipeline_runner import generate, load_runners, with_runners

    base = load_pipeline(spec)
    others = [c.name for c in spec.adapter.components if c.kind != "transformer" and (shared / "onnx" / f"{c.name}.onnx").is_file()]
    common = load_runners(onnx_dir=shared / "onnx", components=others, threads=threads)
    pipes, info = {}, {}
    for p in points:
        export = exports[p.name]
        runner = load_runners(onnx_dir=export / "onnx", components=["transformer"], threads=threads)
        pipes[p.name] = with_runners(base, {**common, **runner})
        report = read_json(export / "export_report.json")
        tr = report.get("transformer", {})
        info[p.name] = {"sparsity": str(p.sparsity), "precision": p.precision, "export": str(export),
                        "transformer_onnx_mib": round(report["components"]["transformer"]["bytes"] / 2**20, 2),
                        "gemm_flop_ratio": tr.get("flop_ratio"), "sparse_eligible_share": (tr.get("sparsity_check") or {}).get("sparse_eligible_share"),
                        "quantized_nm_layers": len((report.get("quantization") or {}).get("quantized_nm_layers", []))}
    prompt = default_prompts(spec)[0]
    steps = steps or spec.steps
    timer = StageTimer(cuda=False)
    names = list(pipes)
    records: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for it in tqdm(range(warmup + runs), desc=f"e2e ({len(names)} variants, interleaved)", unit="round"):
        k = it % len(names)
        for name in names[k:] + names[:k]:
            generate(pipes[name], spec, prompt, seed=0, steps=steps, timer=timer, output_type="np")
            ms, _ = timer.collect()
            if it >= warmup:
                records[name].append(ms)
    reference = next((n for n in names if n.startswith("dense ") and n.endswith("fp32")), names[0])
    ref_total = [r["total"] for r in records[reference]]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        total = [r["total"] for r in records[name]]
        stages = {s: stats([r.get(s, 0.0) for r in records[name]]) for s in STAGES}
        out[name] = {**info[name], "latency_ms": stats(total), "stages_ms": stages, "transformer_step_ms": stages["transformer"]["median"] / steps,
                     "speedup_vs_reference": float(np.median(np.asarray(ref_total) / np.asarray(total))), "quality": None}
    if quality:
        from evaluation.metrics import evaluate

        for name in tqdm(names, desc="quality", unit="variant"):
            out[name]["quality"] = evaluate(pipes[name], spec, seeds=tuple(quality_seeds), steps=steps)
    out["_settings"] = {"runs": runs, "warmup": warmup, "steps": steps, "prompt": prompt, "seed": 0, "threads": threads,
                        "reference": reference, "quality_seeds": list(quality_seeds), "interleaved": "order rotating every round",
                        "torch_threads": torch.get_num_threads()}
    return out


def fronts(variants: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """For each quality metric the variants report: the names on its (latency, metric) Pareto front."""
    names = list(variants)
    out = {}
    for metric, higher in METRICS.items():
        vals = [(variants[n]["latency_ms"]["median"], (variants[n].get("quality") or {}).get(metric)) for n in names]
        if all(q is None for _, q in vals):
            continue
        out[metric] = [names[i] for i in pareto_front(vals, higher_is_better=higher)]
    return out


# ------------------------------------------------------------------------------------------ report


def to_markdown(report: dict[str, Any]) -> str:
    v = report["variants"]
    metrics = list(report["fronts"])
    st = report["settings"]
    head = ["variant", "e2e median ms", "p90 ms", "transformer ms/step", f"speedup vs {st['reference']}", "transformer ONNX MiB",
            "GEMM FLOPs vs dense", *metrics, "on front"]
    lines = [f"# Latency vs quality: {report['model']}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + [":---"]) + "|"]
    order = sorted(v, key=lambda n: v[n]["latency_ms"]["median"])
    for n in order:
        e = v[n]
        q = e.get("quality") or {}
        on = [m for m in metrics if n in report["fronts"][m]]
        fr = e.get("gemm_flop_ratio")
        cells = [f"**{n}**" if on else n, f"{e['latency_ms']['median']:.1f}", f"{e['latency_ms']['p90']:.1f}", f"{e['transformer_step_ms']:.2f}",
                 f"{e['speedup_vs_reference']:.3f}", f"{e['transformer_onnx_mib']:.1f}", "-" if fr is None else f"{fr:.3f}",
                 *["-" if q.get(m) is None else f"{q[m]:.3f}" for m in metrics], ", ".join(_short(m) for m in on) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Front: no other variant is both faster (median end-to-end latency) and better on that metric "
              f"({', '.join(f'{m}: {_better(m)}' for m in metrics)}). Speedups are the median over rounds of the reference's time / the "
              f"variant's in the same round.", ""]
    lines.append(f"{st['steps']} steps, {st['runs']} timed rounds after {st['warmup']} warm-up, {len(v)} variants interleaved (order rotating "
                 f"every round) in one process, ONNX Runtime on CPU with {st['threads']} intra-op thread(s); quality on {len(st['quality_seeds'])} seeds "
                 f"x {'10 digits' if 'prompt_accuracy' in metrics else 'the evaluation prompts'}; {report['device']['summary']}. "
                 f"Stages: {sum(s['reused'] for s in report['stages'])}/{len(report['stages'])} reused; {report['elapsed_s']:.0f} s in all.")
    for note in report.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _short(metric: str) -> str:
    return {"prompt_accuracy": "accuracy", "frechet_distance": "FD", "clip_score": "CLIP"}.get(metric, metric)


def _better(metric: str) -> str:
    return "higher is better" if METRICS.get(metric, True) else "lower is better"


def higher_is_better(metric: str) -> bool:
    return METRICS.get(metric, True)


def plot(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Latency (x) vs each quality metric (one panel each); markers by precision, colours by sparsity, the front
    as a staircase through its points (ringed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_path

    v = report["variants"]
    metrics = list(report["fronts"]) or [None]
    sparsities = list(dict.fromkeys(e["sparsity"] for e in v.values()))
    colors = {s: plt.get_cmap("viridis")(i / max(len(sparsities) - 1, 1)) for i, s in enumerate(sparsities)}
    markers = {"fp32": "o", "int8": "s", "fp16": "^", "fp8": "D"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics) + 1.6, 4.2), dpi=120, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        if metric is None:
            ax.text(0.5, 0.5, "no quality metric", ha="center", transform=ax.transAxes)
            continue
        for n, e in v.items():
            q = (e.get("quality") or {}).get(metric)
            if q is None:
                continue
            x = e["latency_ms"]["median"]
            ax.scatter([x], [q], marker=markers.get(e["precision"], "o"), color=colors[e["sparsity"]], s=46, zorder=3,
                       label=None)
            if n in report["fronts"][metric]:  # only the front is labelled: colour (sparsity) and marker (precision) name the rest
                ax.scatter([x], [q], marker="o", s=170, facecolors="none", edgecolors="crimson", linewidths=1.4, zorder=4)
                ax.annotate(n, (x, q), textcoords="offset points", xytext=(6, -10 if higher_is_better(metric) else 6), fontsize=7)
        pts = sorted(((v[n]["latency_ms"]["median"], v[n]["quality"][metric]) for n in report["fronts"][metric]))
        if pts:
            xs, ys = [pts[0][0]], [pts[0][1]]
            for x, y in pts[1:]:
                xs += [x, x]
                ys += [ys[-1], y]
            ax.plot(xs, ys, color="crimson", lw=1.2, zorder=2, label="Pareto front")
        ax.set_xlabel("end-to-end latency, median ms per image")
        ax.set_ylabel(f"{metric.replace('_', ' ')} ({_better(metric)})")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors[s], label=s) for s in sparsities]
    handles += [plt.Line2D([], [], ls="", marker=markers.get(p, "o"), color="grey", label=p) for p in dict.fromkeys(e["precision"] for e in v.values())]
    handles.append(plt.Line2D([], [], color="crimson", marker="o", mfc="none", label="Pareto front"))
    fig.legend(handles=handles, fontsize=7, loc="center right")
    fig.suptitle(f"{report['model']}: latency vs quality (ONNX Runtime, CPU)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (5.2 * len(metrics) + 1.6), 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ driver


def run_pareto(args) -> dict[str, Any]:
    """Plan and check every stage, run them (reusing what is done), benchmark the grid, write the report."""
    import torch

    from common.versions import device_info
    from common.errors import UserError
    from common.io import check_output, created_dirs
    from common.report import write_report
    from families.registry import resolve_model
    from pipeline.artifacts import ARTIFACTS, model_dir

    t_all = time.perf_counter()
    spec = resolve_model(args.model)
    grid = parse_grid(args.grid)
    precisions = parse_precisions(args.precisions)
    base = Path(args.artifacts) if args.artifacts else ARTIFACTS
    check_output(base, "parent", option="--artifacts")
    out = Path(args.out) if args.out else model_dir(spec, base) / "pareto"
    for name in ("pareto.json", "pareto.md", "pareto.png"):
        check_output(out / name, "file", option="--out")
    notes = []
    if "fp8" in precisions:
        notes.append(FP8_NOTE)
    if not [p for p in precisions if p in RUNNABLE]:
        raise UserError(f"nothing to benchmark: {FP8_NOTE}")
    plan = plan_grid(args, spec, grid, precisions, base)  # every stage checked before the first one runs
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        stages = run_stages(plan.stages)
        points = [GridPoint(sp, p) for sp in grid for p in precisions if p in RUNNABLE]
        with created_dirs(out):
            variants = bench_grid(spec, points, plan.exports, plan.shared, runs=args.runs, warmup=args.warmup, steps=args.steps,
                                  quality_seeds=tuple(range(args.quality_seeds)), threads=args.threads, quality=not args.no_quality)
            settings = variants.pop("_settings")
            report = {
                "benchmark": "pareto",
                "model": spec.id,
                "grid": [str(sp) for sp in grid],
                "precisions": precisions,
                "method": args.method,
                "prune_samples": args.samples,
                "config_dirs": {n: str(d.parent) for n, d in plan.exports.items()},
                "settings": settings,
                "device": device_info(False),
                "stages": stages,
                "variants": variants,
                "fronts": fronts(variants),
                "notes": notes + [_structured_note()],
            }
            report["elapsed_s"] = round(time.perf_counter() - t_all, 1)
            write_report(out / "pareto.json", report, to_markdown(report))
            plot(report, out / "pareto.png")
    finally:
        torch.set_num_threads(threads_before)
    log.info("wrote %s, pareto.md and pareto.png (%.0f s)", out / "pareto.json", report["elapsed_s"])
    return report


def _structured_note() -> str:
    return ("each structured ratio is its own stage-1 run: OBS group pruning is greedy with weight compensation and runs package "
            "by package on activations of already-pruned packages, and stage 1 records neither the removal order nor the compensated "
            "weights per ratio, so smaller ratios cannot be read off one run at the largest ratio")


def add_args(p: argparse.ArgumentParser) -> None:
    from common.cli import int_at_least

    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory (default tiny-sd3)")
    p.add_argument("--grid", default=DEFAULT_GRID, help=f"sparsities, comma-separated (default {DEFAULT_GRID})")
    p.add_argument("--precisions", default=DEFAULT_PRECISIONS, help="transformer precisions: fp32, int8 (fp8 is reported as not runnable on ONNX Runtime) "
                   f"(default {DEFAULT_PRECISIONS})")
    p.add_argument("--method", default="obs-diff", choices=["obs-diff", "wanda", "magnitude"])
    p.add_argument("--samples", type=int_at_least(1), default=DEFAULT_SAMPLES,
                   help=f"stage-1 calibration prompts (default {DEFAULT_SAMPLES}, in artifacts/<model>/<sparsity>-<method>-s{DEFAULT_SAMPLES}/; "
                        "with `make engine`'s 64 the grid uses, and reuses, make engine's own directories)")
    p.add_argument("--calib-steps", type=int_at_least(1), default=None, help="stage-1 calibration steps (default: the model's sampling steps)")
    p.add_argument("--groups", type=int_at_least(1), default=4, help="stage-1 module packages (default 4)")
    p.add_argument("--quant-samples", type=int_at_least(1), default=None, help="INT8 calibration trajectories (default 8)")
    p.add_argument("--quant-calls", type=int_at_least(1), default=None, help="INT8 calibration calls kept (default 64)")
    p.add_argument("--runs", type=int_at_least(1), default=DEFAULT_RUNS, help=f"timed rounds (default {DEFAULT_RUNS})")
    p.add_argument("--warmup", type=int_at_least(0), default=DEFAULT_WARMUP, help=f"untimed rounds (default {DEFAULT_WARMUP})")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="denoising steps of the timed and scored runs (default: the model's)")
    p.add_argument("--quality-seeds", type=int_at_least(1), default=DEFAULT_QUALITY_SEEDS,
                   help=f"seeds per prompt for quality (default {DEFAULT_QUALITY_SEEDS})")
    p.add_argument("--no-quality", action="store_true", help="latency only (no front)")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="CPU threads for PyTorch and ONNX Runtime (default 1: steady on a shared machine)")
    p.add_argument("--artifacts", default=None, help="artifact root (default <repo>/artifacts)")
    p.add_argument("--out", default=None, help="report directory (default artifacts/<model>/pareto)")


def main(argv: list[str] | None = None) -> int:
    from benchmarks import program

    p = program.parser("pareto", __doc__)
    add_args(p)

    def body(args) -> int:
        print(to_markdown(run_pareto(args)))
        return 0

    return program.run(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
