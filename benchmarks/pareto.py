"""Latency vs quality vs memory across sparsity and precision: a grid of compressed pipelines, benchmarked end to
end in one run, with the Pareto front marked.

``python -m benchmarks.pareto --model tiny-sd3`` (``make pareto MODEL=...``):

1. **Stages, reused.** For every sparsity of ``--grid`` (default dense, 2:4 and structured 0.1 to 0.5) and every
   precision of ``--precisions`` (default fp32, int8 and int4), stage 1 prunes into a configuration directory of
   the artifact store and stage 2 exports the pipeline there, with the very settings ``make engine`` uses
   (:func:`pipeline.engine.export_settings`, :func:`pipeline.engine.quant_calibration`,
   :func:`pipeline.engine.weight_quant`): fp32 and int8 (``export/``, ``export-int8/``) from one float prune per
   sparsity (none for dense), int4 (``export-int4/``, ONNX Runtime's ``MatMulNBits``) from a ``--weight-bits 4``
   prune of its own (dense too), in ``make engine --precision int4``'s directory (``...-w4g128``). The directory is
   ``make engine``'s (``artifacts/<model>/<sparsity>-<method>[-w4g128]/``, ``dense[-w4g128]/``) when stage 1 runs
   with its calibration (``--samples 64``), else one naming the difference (``...-s16`` for the default ``--samples
   16``: a small calibration keeps the whole grid within minutes on a CPU). A stage whose output is complete and
   current is reused, whichever command wrote it. Every export holds the whole served pipeline, as ``make engine``
   serves it: the dense export of each precision exports the text encoders (float32 next to fp32, weight-only INT8
   next to int8 and int4: :data:`export.stage.OTHERS_PRECISION`; or ``--others-precision``) and the float32 VAE, and the
   pruned ones link them.
2. **Memory.** Each variant's weights per component, on disk and as ONNX Runtime holds them, next to the dense
   original's, and the peak process memory of generating one image, each in a fresh process
   (:func:`measure.memory.variant_memory`; ``--no-memory``: the files only).
3. **One interleaved benchmark.** Every variant's pipeline is loaded in one process (files shared between exports
   are one session) and timed end to end on ONNX Runtime (CPU), the order rotating every round, as
   :mod:`measure.e2e` does for two; then each is scored (:func:`evaluation.metrics.evaluate`: prompt accuracy and
   Fréchet distance for the embedded digit models, CLIP score for hub models when CLIP is cached).
4. **The report.** ``artifacts/<model>/pareto/``: ``pareto.json``, ``pareto.md`` (one row per variant with its
   latency, memory and quality, the fronts marked; each variant's weights per component) and ``pareto.png``
   (latency vs each quality metric and vs memory). A variant is on the front of a quality metric when no other is
   at least as good on latency, that metric and memory (``--memory-axis``: the weights on disk by default) and
   better on one; the two-axis fronts (latency x quality, latency x memory) are reported beside it.

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
DEFAULT_PRECISIONS = "fp32,int8,int4"
# Small calibration and benchmark settings by default, so that the whole grid runs in minutes on a CPU.
DEFAULT_SAMPLES = 16
DEFAULT_RUNS = 5
DEFAULT_WARMUP = 1
DEFAULT_QUALITY_SEEDS = 8  # 80 images per variant for the digit models, as `make quality`
# Quality metrics: name -> True when higher is better.
METRICS = {"prompt_accuracy": True, "frechet_distance": False, "clip_score": True}
# The memory axis of the front (lower is better), --memory-axis: what each figure is (docs/memory.md).
MEMORY_AXES = {"weights": "the served pipeline's weights on disk (every component's ONNX and external data)",
               "loaded": "the served pipeline's weights as ONNX Runtime holds them (RSS per session, fresh process)",
               "peak": "peak process RSS of generating one image at the model's shape (fresh process)"}
RUNNABLE = ("fp32", "int8", "int4")  # what ONNX Runtime on a CPU runs (int4: MatMulNBits, stage 1's 4-bit weights)
FP8_NOTE = ("fp8 not benchmarked: ONNX Runtime cannot run TensorRT's FP8 Q/DQ, and FP8 engines need an Ada or later GPU "
            "(compute capability 8.9+); build and benchmark them there with `make engine ENGINE_ARGS=\"--precision fp8\"`")


# ------------------------------------------------------------------------------------------ Pareto front


def pareto_front(points: Sequence[Sequence[float | None]], *, maximize: Sequence[bool]) -> list[int]:
    """Indices (in input order) of the points on the Pareto front; each point has one value per axis, and
    ``maximize[k]`` says whether a higher value is better on axis ``k`` (else lower is).

    A point is on the front when no other point is at least as good on every axis and strictly better on one.
    Equal points do not dominate each other (both stay). A point with a value that is None or not finite is
    never on the front and dominates nothing.
    """
    signs = [1.0 if m else -1.0 for m in maximize]
    rows = {i: [s * v for s, v in zip(signs, p)] for i, p in enumerate(points)
            if len(p) == len(signs) and all(v is not None and math.isfinite(v) for v in p)}
    front = []
    for i, a in rows.items():
        dominated = any(all(y >= x for x, y in zip(a, b)) and any(y > x for x, y in zip(a, b)) for j, b in rows.items() if j != i)
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
    """The stages that make every variant's export, and where each variant's pipeline lives (every component of
    it: the transformer, and the text encoders and VAE, linked from the dense export of the same precision)."""

    stages: list = field(default_factory=list)  # pipeline.engine.Stage
    exports: dict[str, Path] = field(default_factory=dict)  # variant name -> export directory


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
    bad = [p for p in out if p not in (*RUNNABLE, "fp8")]
    if bad or not out:
        raise UserError(f"--precisions: unknown {bad or text!r}; use fp32, int8, int4 (and fp8, reported as not runnable here)")
    return out


def plan_grid(args, spec, grid: list, precisions: list[str], base: Path) -> GridPlan:
    """The prune and export stages of the grid (``make engine``'s settings and directories), every one checked.

    Float precisions share one stage-1 directory per sparsity (none for dense); ``int4`` has its own, a
    ``--weight-bits 4`` prune (dense too: 4-bit weights, no pruning) in ``make engine --precision int4``'s directory
    (:func:`pipeline.engine.weights_tail`). Every export holds the whole served pipeline: the dense export of each
    precision exports the text encoders and the VAE (at the precision's default, or ``--others-precision``), and
    the pruned exports of that precision link them, as ``make engine`` does.
    """
    from obsdiff.patterns import parse_sparsity
    from obsdiff.stage import DEFAULT_SAMPLES as PRUNE_SAMPLES
    from obsdiff.stage import prune_settings
    from pipeline.engine import Stage, check_stage, export_settings, quant_calibration

    options = dict(groups=args.groups, samples=args.samples or PRUNE_SAMPLES, steps=args.calib_steps)
    plan = GridPlan()
    # INT8 calibration follows stage 1's prompts and sampler, the same for every sparsity (and for dense)
    first = next((sp for sp in grid if sp.kind != "dense"), parse_sparsity("2:4"))
    quant = quant_calibration(args, prune_settings(spec, first, base / "unused", method=args.method, **options))
    runnable = [p for p in precisions if p in RUNNABLE]
    dense_grid = [sp for sp in grid if sp.kind == "dense"]
    shares = {}  # precision -> the dense export whose text encoders and VAE the pruned ones link
    for sp in dense_grid + [sp for sp in grid if sp.kind != "dense"]:  # the dense exports first: the others link theirs
        for precision in runnable:
            dirs, prune = _stage1(args, spec, sp, precision, options, base)
            pruned = prune.out if prune is not None else None
            if prune is not None and not any(st.marker == pruned / "plan.json" for st in plan.stages):  # fp32 and int8 share the float prune
                name = f"prune {sp}" + (f" {precision}" if prune.config.quant is not None else "")
                plan.stages.append(Stage(name, pruned / "plan.json", prune, {"model": spec.source}, {"dir": str(pruned)}))
            settings = export_settings(spec, dirs, pruned, precision, None, quant if precision in ("int8", "fp8") else None,
                                       others=args.others_precision, drop_t5=args.drop_t5,
                                       share_from=shares.get(precision) if sp.kind != "dense" else None)
            if sp.kind == "dense":
                shares[precision] = settings.out
            plan.stages.append(Stage(f"export {sp} {precision}", settings.out / "export_report.json", settings,
                                     {"pruned": str(pruned) if pruned else None}, {"dir": str(settings.out)}))
            plan.exports[GridPoint(sp, precision).name] = settings.out
    for st in plan.stages:
        check_stage(st)
    return plan


def _stage1(args, spec, sparsity, precision: str, options: dict[str, Any], base: Path):
    """``(configuration directories, stage-1 settings or None)`` of one grid point: none for dense float (the model
    itself), one float prune per sparsity for fp32 and int8, and for int4 a ``--weight-bits 4`` prune of its own
    (:func:`pipeline.engine.weight_quant`; dense too, with make engine's default method: nothing is pruned, OBS
    only quantizes). With ``--method`` other than obs-diff the pruned int4 points round to nearest (OBS rounding
    needs obs-diff's Hessians)."""
    from obsdiff.stage import prune_settings
    from pipeline.artifacts import config_dirs
    from pipeline.engine import weight_quant, weights_tail

    weights = weight_quant(precision, args.quant_modulation)
    if sparsity.kind == "dense" and not weights:
        return config_dirs(spec, "dense", base), None
    method = {} if sparsity.kind == "dense" else {"method": args.method}
    if weights and sparsity.kind != "dense" and args.method != "obs-diff":
        weights = {**weights, "quant_method": "rtn"}
    dirs = config_dirs(spec, config_id(sparsity, args.method, options["samples"], options["steps"], weights_tail(precision, args.quant_modulation)), base)
    return dirs, prune_settings(spec, sparsity, dirs.prune, **method, **options, **weights)


def config_id(sparsity, method: str, samples: int, calib_steps: int | None, tail: str = "") -> str:
    """The configuration directory of one sparsity: ``make engine``'s (``2-4-obs-diff``; ``2-4-obs-diff-w4g128`` and
    ``dense-w4g128`` for the 4-bit prunes, ``tail`` = :func:`pipeline.engine.weights_tail`) when stage 1 runs with its
    default calibration (so each reuses what the other did), else one that names the difference
    (``2-4-obs-diff-s16``), so that two calibrations never meet in one directory."""
    from obsdiff.stage import DEFAULT_SAMPLES as PRUNE_SAMPLES

    cid = f"dense{tail}" if sparsity.kind == "dense" else f"{sparsity.id}-{method}{tail}"
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


def _variant_pipeline(base, spec, onnx_dir: Path, sessions: dict, threads: int):
    """``base`` with every component ``onnx_dir`` holds running in ONNX Runtime, without what the export left out
    (SD3's T5 after ``--drop-t5``). ``sessions`` holds the runners already made, by file: a component an export
    links from another (the text encoders and VAE) runs in the same session in every variant that shares it."""
    from runtime.pipeline_runner import export_dropped, load_runners, with_runners

    runners = {}
    for c in spec.adapter.components:
        path = onnx_dir / f"{c.name}.onnx"
        if not path.is_file():
            continue
        st = path.stat()
        key = (st.st_dev, st.st_ino)
        if key not in sessions:
            sessions[key] = load_runners(onnx_dir=onnx_dir, components=[c.name], threads=threads)[c.name]
        runners[c.name] = sessions[key]
    return with_runners(base, runners, dropped=export_dropped(onnx_dir))


def bench_grid(spec, points: list[GridPoint], exports: dict[str, Path], *, runs: int, warmup: int, steps: int | None,
               quality_seeds: Sequence[int], threads: int, quality: bool = True) -> dict[str, dict[str, Any]]:
    """Time every variant end to end on ONNX Runtime (CPU), interleaved, then score each; ``{name: entry}``.

    Each variant runs its own export's pipeline (transformer, text encoders, VAE); files that exports share are
    one session. Per round, every variant generates the same prompt with the same seed, the order rotating by
    one each round.
    """
    import torch
    from tqdm import tqdm

    from common.io import read_json
    from families.registry import load_pipeline
    from measure.e2e import default_prompts, stats
    from runtime.pipeline_runner import generate
    from runtime.stage_timer import STAGES, StageTimer

    base = load_pipeline(spec)
    pipes, info, sessions = {}, {}, {}
    for p in points:
        export = exports[p.name]
        pipes[p.name] = _variant_pipeline(base, spec, export / "onnx", sessions, threads)
        report = read_json(export / "export_report.json")
        tr = report.get("transformer", {})
        info[p.name] = {"sparsity": str(p.sparsity), "precision": p.precision, "export": str(export),
                        "others_precision": report.get("others_precision"), "dropped": report.get("dropped") or [],
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
                        "torch_threads": torch.get_num_threads(), "sessions": len(sessions)}
    return out


def grid_memory(spec, exports: dict[str, Path], *, measure: bool, steps: int | None, threads: int) -> dict[str, dict[str, Any]]:
    """Each variant's memory, ``{name: {"weights": export.weights.compare table, "generation": ...}}``: the served
    pipeline's weights per component next to the dense original's, and (``measure``) ONNX Runtime's loaded bytes and
    the peak memory of generating one image at the model's shape, each in a fresh process
    (:func:`measure.memory.variant_memory`). Without ``measure`` only the files are read (no loaded bytes, no peak)."""
    from export.weights import compare, export_weights, model_weights
    from measure.memory import variant_memory

    dense = model_weights(spec)
    out = {}
    for name, export in exports.items():
        if measure:
            log.info("memory of %s: weights, and one image at %dx%d in a fresh process", name, spec.height, spec.width)
            out[name] = variant_memory(spec, dense, backend="ort", onnx_dir=export / "onnx", height=spec.height, width=spec.width,
                                       steps=steps, threads=threads)
        else:
            out[name] = {"weights": compare(export_weights(export, loaded=False), dense, spec.adapter.components)}
    return out


def memory_bytes(entry: dict[str, Any], axis: str) -> int | None:
    """A variant's figure on the memory axis (:data:`MEMORY_AXES`), bytes; None where it was not measured."""
    mem = entry.get("memory") or {}
    if axis == "peak":
        return (mem.get("generation") or {}).get("peak_rss_bytes")
    return ((mem.get("weights") or {}).get("total") or {}).get("disk_bytes" if axis == "weights" else "loaded_bytes")


def fronts(variants: dict[str, dict[str, Any]], memory_axis: str | None = "weights") -> dict[str, list[str]]:
    """For each quality metric the variants report: the names on its Pareto front of (latency, metric, memory)
    (``memory_axis`` of :data:`MEMORY_AXES`; None: of (latency, metric))."""
    names = list(variants)
    out = {}
    for metric, higher in METRICS.items():
        qs = [(variants[n].get("quality") or {}).get(metric) for n in names]
        if all(q is None for q in qs):
            continue
        pts = [(variants[n]["latency_ms"]["median"], q) + ((memory_bytes(variants[n], memory_axis),) if memory_axis else ())
               for n, q in zip(names, qs)]
        out[metric] = [names[i] for i in pareto_front(pts, maximize=(False, higher, False)[:len(pts[0])])]
    return out


def latency_memory_front(variants: dict[str, dict[str, Any]], memory_axis: str) -> list[str]:
    """The names on the Pareto front of (latency, memory) (both lower is better)."""
    names = list(variants)
    pts = [(variants[n]["latency_ms"]["median"], memory_bytes(variants[n], memory_axis)) for n in names]
    return [names[i] for i in pareto_front(pts, maximize=(False, False))]


# ------------------------------------------------------------------------------------------ report


def _mib(n: int | None, digits: int = 1) -> str:
    return "-" if n is None else f"{n / 2**20:.{digits}f}"


def to_markdown(report: dict[str, Any]) -> str:
    v = report["variants"]
    metrics = list(report["fronts"])
    st = report["settings"]
    axis = report["memory_axis"]
    head = ["variant", "e2e median ms", "p90 ms", "transformer ms/step", f"speedup vs {st['reference']}", "GEMM FLOPs vs dense",
            "weights MiB", "loaded MiB", "loaded / dense", "peak RSS MiB", *metrics, "front: latency, quality, memory", "front: latency, quality"]
    lines = [f"# Latency vs quality vs memory: {report['model']}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 3) + [":---", ":---"]) + "|"]
    order = sorted(v, key=lambda n: v[n]["latency_ms"]["median"])
    for n in order:
        e = v[n]
        q = e.get("quality") or {}
        on = [m for m in metrics if n in report["fronts"][m]]
        on2 = [m for m in metrics if n in report["fronts_latency_quality"][m]]
        fr = e.get("gemm_flop_ratio")
        total = ((e.get("memory") or {}).get("weights") or {}).get("total") or {}
        cells = [f"**{n}**" if on else n, f"{e['latency_ms']['median']:.1f}", f"{e['latency_ms']['p90']:.1f}", f"{e['transformer_step_ms']:.2f}",
                 f"{e['speedup_vs_reference']:.3f}", "-" if fr is None else f"{fr:.3f}", _mib(memory_bytes(e, "weights"), 2),
                 _mib(memory_bytes(e, "loaded"), 2), "-" if total.get("ratio") is None else f"{total['ratio']:.3f}", _mib(memory_bytes(e, "peak")),
                 *["-" if q.get(m) is None else f"{q[m]:.3f}" for m in metrics], ", ".join(_short(m) for m in on) or "-",
                 ", ".join(_short(m) for m in on2) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Front: no other variant is at least as good on latency (median end to end), on that quality metric "
              f"({', '.join(f'{m}: {_better(m)}' for m in metrics)}) and on memory ({axis}: {MEMORY_AXES[axis]}), and better on one; "
              f"the last column leaves memory out. Fastest at each memory (latency and {axis} only): "
              f"{', '.join(report['front_latency_memory']) or '-'}. Speedups are the median over rounds of the reference's time / the "
              f"variant's in the same round. Weights: every component the variant serves (transformer, text encoders, VAE), on disk; "
              f"loaded: as ONNX Runtime holds them; loaded / dense: against the dense original as the registry loads it "
              f"({_dense_label(report)}); peak RSS: the whole process generating one image ({_peak_label(report)}).", ""]
    lines += _components_table(report, order)
    lines.append(f"{st['steps']} steps, {st['runs']} timed rounds after {st['warmup']} warm-up, {len(v)} variants interleaved (order rotating "
                 f"every round) in one process, ONNX Runtime on CPU with {st['threads']} intra-op thread(s); quality on {len(st['quality_seeds'])} seeds "
                 f"x {'10 digits' if 'prompt_accuracy' in metrics else 'the evaluation prompts'}; {report['device']['summary']}. "
                 f"Stages: {sum(s['reused'] for s in report['stages'])}/{len(report['stages'])} reused; {report['elapsed_s']:.0f} s in all.")
    for note in report.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _dense_label(report: dict[str, Any]) -> str:
    w = next(((e.get("memory") or {}).get("weights") for e in report["variants"].values() if (e.get("memory") or {}).get("weights")), None) or {}
    total = (w.get("total") or {}).get("dense_bytes")
    return f"{w.get('dense_dtype', 'float32')}, {_mib(total, 2)} MiB" if total else "not available"


def _peak_label(report: dict[str, Any]) -> str:
    gen = next(((e.get("memory") or {}).get("generation") for e in report["variants"].values()
                if "peak_rss_bytes" in ((e.get("memory") or {}).get("generation") or {})), None)
    if gen is None:
        return "not measured"
    return f"{gen['height']}x{gen['width']}, {gen['steps']} steps, batch 1, in a fresh process; about {_mib(gen['baseline_rss_bytes'], 0)} MiB of it is the libraries"


def _components_table(report: dict[str, Any], order: list[str]) -> list[str]:
    """One row per variant: each component's weights on disk (MiB) and precision."""
    v = report["variants"]
    rows = {n: {r["component"]: r for r in ((v[n].get("memory") or {}).get("weights") or {}).get("rows", [])} for n in order}
    comps = list(dict.fromkeys(c for r in rows.values() for c in r))
    if not comps:
        return []
    head = ["variant", *comps, "total"]
    lines = ["Weights per component, MiB on disk (precision):", "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for n in order:
        cells = []
        for c in comps:
            r = rows[n].get(c)
            if r is None:
                cells.append("-")
            elif r["runtime"] == "dropped":
                cells.append("dropped")
            else:
                prec = r.get("precision") or "-"
                cells.append(f"{_mib(r.get('disk_bytes'), 2)} ({prec}{', pytorch' if r['runtime'] == 'pytorch' else ''})")
        lines.append("| " + " | ".join([n, *cells, _mib(memory_bytes(v[n], "weights"), 2)]) + " |")
    return lines + [""]


def _short(metric: str) -> str:
    return {"prompt_accuracy": "accuracy", "frechet_distance": "FD", "clip_score": "CLIP"}.get(metric, metric)


def _better(metric: str) -> str:
    return "higher is better" if METRICS.get(metric, True) else "lower is better"


def higher_is_better(metric: str) -> bool:
    return METRICS.get(metric, True)


def _staircase(ax, pts: list[tuple[float, float]], label: str) -> None:
    """The two-axis front through ``pts`` (sorted by x), drawn as a staircase."""
    pts = sorted(pts)
    if not pts:
        return
    xs, ys = [pts[0][0]], [pts[0][1]]
    for x, y in pts[1:]:
        xs += [x, x]
        ys += [ys[-1], y]
    ax.plot(xs, ys, color="crimson", lw=1.2, zorder=2, label=label)


def plot(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Latency (x) vs each quality metric and vs memory (one panel each); markers by precision, colours by sparsity.
    On a quality panel the points on that metric's (latency, quality, memory) front are ringed and named, and the
    (latency, quality) front is the staircase; on the memory panel the points on any metric's three-axis front are
    ringed and the (latency, memory) front is the staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_path

    v = report["variants"]
    axis = report["memory_axis"]
    metrics = list(report["fronts"])
    panels = (metrics or [None]) + ["memory"]
    sparsities = list(dict.fromkeys(e["sparsity"] for e in v.values()))
    colors = {s: plt.get_cmap("viridis")(i / max(len(sparsities) - 1, 1)) for i, s in enumerate(sparsities)}
    markers = {"fp32": "o", "int8": "s", "int4": "v", "fp16": "^", "fp8": "D"}
    width = 5.2 * len(panels) + 1.6
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.2), dpi=120, squeeze=False)
    on_any = set().union(*report["fronts"].values()) if report["fronts"] else set()
    for ax, panel in zip(axes[0], panels):
        if panel is None:
            ax.text(0.5, 0.5, "no quality metric", ha="center", transform=ax.transAxes)
            continue
        if panel == "memory":
            y_of = {n: (None if memory_bytes(e, axis) is None else memory_bytes(e, axis) / 2**20) for n, e in v.items()}
            ringed, front2, below = on_any, report["front_latency_memory"], False
            ax.set_ylabel({"weights": "the pipeline's weights on disk, MiB", "loaded": "the pipeline's weights as loaded, MiB",
                           "peak": "peak RSS of one image, MiB"}[axis] + " (lower is better)")
        else:
            y_of = {n: (e.get("quality") or {}).get(panel) for n, e in v.items()}
            ringed, front2, below = set(report["fronts"][panel]), report["fronts_latency_quality"][panel], higher_is_better(panel)
            ax.set_ylabel(f"{panel.replace('_', ' ')} ({_better(panel)})")
        for n, e in v.items():
            y = y_of[n]
            if y is None:
                continue
            x = e["latency_ms"]["median"]
            ax.scatter([x], [y], marker=markers.get(e["precision"], "o"), color=colors[e["sparsity"]], s=46, zorder=3)
            if n in ringed:  # only the front is named: colour (sparsity) and marker (precision) name the rest
                ax.scatter([x], [y], marker="o", s=170, facecolors="none", edgecolors="crimson", linewidths=1.4, zorder=4)
                if panel != "memory":
                    ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, -10 if below else 6), fontsize=7)
        _staircase(ax, [(v[n]["latency_ms"]["median"], y_of[n]) for n in front2 if y_of[n] is not None], "two-axis front")
        ax.set_xlabel("end-to-end latency, median ms per image")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors[s], label=s) for s in sparsities]
    handles += [plt.Line2D([], [], ls="", marker=markers.get(p, "o"), color="grey", label=p) for p in dict.fromkeys(e["precision"] for e in v.values())]
    handles.append(plt.Line2D([], [], ls="", color="crimson", marker="o", mfc="none", label="latency x quality x memory front"))
    handles.append(plt.Line2D([], [], color="crimson", label="the panel's two-axis front"))
    fig.legend(handles=handles, fontsize=7, loc="center right")
    fig.suptitle(f"{report['model']}: latency vs quality vs memory (ONNX Runtime, CPU)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / width, 1))
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
    if args.quant_modulation and "int4" not in precisions:
        raise UserError("--quant-modulation quantizes the AdaLN modulations to 4 bits in stage 1: it goes with the int4 points (--precisions ...,int4)")
    if args.memory_axis != "weights" and args.no_memory:
        raise UserError(f"--memory-axis {args.memory_axis} is measured in fresh processes, which --no-memory skips; use --memory-axis weights "
                        "(the files), or drop --no-memory")
    plan = plan_grid(args, spec, grid, precisions, base)  # every stage checked before the first one runs
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        stages = run_stages(plan.stages)
        points = [GridPoint(sp, p) for sp in grid for p in precisions if p in RUNNABLE]
        with created_dirs(out):
            exports = {p.name: plan.exports[p.name] for p in points}
            memory = grid_memory(spec, exports, measure=not args.no_memory, steps=args.steps, threads=args.threads)
            variants = bench_grid(spec, points, exports, runs=args.runs, warmup=args.warmup, steps=args.steps,
                                  quality_seeds=tuple(range(args.quality_seeds)), threads=args.threads, quality=not args.no_quality)
            settings = variants.pop("_settings")
            for name, m in memory.items():
                variants[name]["memory"] = m
            report = {
                "benchmark": "pareto",
                "model": spec.id,
                "grid": [str(sp) for sp in grid],
                "precisions": precisions,
                "method": args.method,
                "prune_samples": args.samples,
                "others_precision": args.others_precision,
                "drop_t5": args.drop_t5,
                "quant_modulation": args.quant_modulation,
                "config_dirs": {n: str(d.parent) for n, d in exports.items()},
                "settings": settings,
                "device": device_info(False),
                "stages": stages,
                "variants": variants,
                "memory_axis": args.memory_axis,
                "memory_measured": not args.no_memory,
                "fronts": fronts(variants, args.memory_axis),
                "fronts_latency_quality": fronts(variants, None),
                "front_latency_memory": latency_memory_front(variants, args.memory_axis),
                "notes": notes + [_structured_note()] + ([_int4_note(args.method)] if "int4" in precisions else []),
            }
            report["elapsed_s"] = round(time.perf_counter() - t_all, 1)
            write_report(out / "pareto.json", report, to_markdown(report))
            plot(report, out / "pareto.png")
    finally:
        torch.set_num_threads(threads_before)
    log.info("wrote %s, pareto.md and pareto.png (%.0f s)", out / "pareto.json", report["elapsed_s"])
    return report


def _int4_note(method: str) -> str:
    how = "OBS" if method == "obs-diff" else f"round-to-nearest after {method} pruning (OBS rounding needs obs-diff's Hessians; dense: OBS)"
    return (f"int4: stage 1 solves 4-bit weights ({how}, group 128) with the pattern, in its own directory (make engine --precision int4's); "
            "ONNX Runtime runs them as MatMulNBits with INT8 activations (W4A8). A 2:4 + int4 transformer stores both and runs dense "
            "4-bit: no runtime here has a 2:4 x 4-bit kernel")


def _structured_note() -> str:
    return ("each structured ratio is its own stage-1 run: OBS group pruning is greedy with weight compensation and runs package "
            "by package on activations of already-pruned packages, and stage 1 records neither the removal order nor the compensated "
            "weights per ratio, so smaller ratios cannot be read off one run at the largest ratio")


def add_args(p: argparse.ArgumentParser) -> None:
    from common.cli import int_at_least
    from export.stage import OTHERS_PRECISION

    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory (default tiny-sd3)")
    p.add_argument("--grid", default=DEFAULT_GRID, help=f"sparsities, comma-separated (default {DEFAULT_GRID})")
    p.add_argument("--precisions", default=DEFAULT_PRECISIONS,
                   help="transformer precisions: fp32, int8, int4 (stage 1's 4-bit weights, MatMulNBits); fp8 is reported as not runnable on "
                        f"ONNX Runtime (default {DEFAULT_PRECISIONS})")
    p.add_argument("--others-precision", default=None, choices=["fp32", "int8", "int4"],
                   help="the text encoders of every variant: fp32, or weight-only int8/int4 (the VAE stays float32). Default: make engine's "
                        f"({', '.join(f'{OTHERS_PRECISION[k]} with a {k} transformer' for k in RUNNABLE)})")
    p.add_argument("--drop-t5", action="store_true", help="serve SD3-family models without their T5 encoder (text_encoder_3=None)")
    p.add_argument("--quant-modulation", action="store_true",
                   help="the int4 points: stage 1 quantizes the blocks' AdaLN modulations to 4 bits too (make engine's --quant-modulation; "
                        "configuration ids ...-w4g128-mod)")
    p.add_argument("--memory-axis", default="weights", choices=list(MEMORY_AXES),
                   help="the front's memory axis: weights (the served pipeline's files, default), loaded (as ONNX Runtime holds them) or "
                        "peak (peak RSS of one image)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory measurements in fresh processes (weights as loaded, peak of one image); the files are still counted")
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
