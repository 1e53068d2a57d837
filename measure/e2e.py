"""End-to-end measurement (:func:`run_e2e`): dense vs pruned pipeline (ONNX Runtime on CPU, TensorRT engines on GPU), with
PyTorch eager as a third column, all in one process with the variants interleaved.

For each of ``warmup + runs`` iterations every variant generates the same prompt with the same seed (the
order rotates each iteration, so no variant always runs first after the others). Per variant it records the
end-to-end time and the stages (text encoders, transformer x steps, VAE decode), with CUDA events on a GPU and
wall-clock on a CPU, then reports median and p90 over the timed runs, images/s, peak memory (process RSS on
CPU, sampled every 5 ms while the variant runs; CUDA device memory in use on GPU), model/engine size and
quality (:func:`evaluation.metrics.evaluate`). It writes ``bench.json``, ``bench.md``, ``bench.png`` and
``grid.png`` (dense / pruned / eager images for the same seed, one column for every grid prompt).

``make engine`` calls it for its benchmark stage; ``python -m benchmarks.e2e`` is its command line.

A semi-structured (2:4, 4:8) transformer has the dense one's shapes: on a CPU, ONNX Runtime multiplies the
zeros like any other number, so no speedup is expected; sparse tensor cores (Ampere and later, through
TensorRT's SPARSE_WEIGHTS) are what turns 2:4 into time. Structured plans remove heads and neurons and are
faster everywhere.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from common.io import write_json
from common.memory import PeakMemory
from common.versions import device_info
from runtime.stage_timer import STAGES

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """A pipeline to time: ``name`` (dense/pruned/eager), the pipeline, and what to report about it."""

    name: str
    pipe: Any
    backend: str
    transformer_bytes: int
    total_bytes: int
    records: list[dict[str, float]] = field(default_factory=list)
    peak_mib: float = 0.0
    peak_delta_mib: float = 0.0
    report: dict[str, Any] | None = None  # --backend torch: what converted (runtime.torch_backend)


def _onnx_dir(export_dir: str | os.PathLike) -> Path:
    d = Path(export_dir)
    if (d / "onnx").is_dir():
        d = d / "onnx"
    if not (d / "transformer.onnx").is_file():
        raise UserError(f"no transformer.onnx under {export_dir}; run `python -m pipeline export` first")
    return d


def _free_replaced_modules(base, *onnx_dirs: Path) -> None:
    """Free the PyTorch weights of every module that each variant runs from ONNX instead (the runners read
    only the module's config and dtype). Without the eager column nothing else uses them, and at SD3-medium
    size they are 9 GiB beside two 8 GiB ONNX Runtime sessions."""
    from export.dynamo_export import release_weights
    from families import adapter_for

    for c in adapter_for(base.transformer).components:
        comp, attr = c.name, c.attr
        module = getattr(base, attr, None)
        if module is not None and all((d / f"{comp}.onnx").is_file() for d in onnx_dirs):
            release_weights(module)


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean()), "min": float(a.min()), "n": int(a.size)}


def _torch_bytes(module) -> int:
    return int(sum(p.numel() * p.element_size() for p in module.parameters())) if module is not None else 0


def _runner_variant(name: str, spec, base_pipe, *, backend: str, onnx_dir: Path, engine_dir: Path | None, provider: str, threads: int,
                    correction=None, ov_precision: str = "auto") -> Variant:
    from runtime.pipeline_runner import export_dropped, runner_pipeline

    # Engines are checked against the ONNX their manifest records (the fp16 export), not the fp32 one timed by ORT;
    # what the export left out (SD3's T5 after --drop-t5) is read from it either way.
    pipe = runner_pipeline(spec, backend=backend, onnx_dir=onnx_dir if backend in ("ort", "openvino") else None, engine_dir=engine_dir, provider=provider,
                           correction=correction, base_pipe=base_pipe, threads=threads, dropped=export_dropped(onnx_dir), ov_precision=ov_precision)
    sizes = {c: int(getattr(r, "size_bytes", 0)) for c, r in pipe.runners.items()}
    # Components left in PyTorch count at their parameter size.
    from families import adapter_for

    for c in adapter_for(base_pipe.transformer).components:
        if c.name not in sizes:
            sizes[c.name] = _torch_bytes(getattr(base_pipe, c.attr, None))
    tr = pipe.runners["transformer"]
    if backend == "ort":
        import onnxruntime as ort

        label = f"onnxruntime {ort.__version__} {tr.providers[0]}"
    elif backend == "openvino":
        label = tr.label
    else:
        label = f"{tr.backend.name} {tr.backend.version}"
    return Variant(name, pipe, label, sizes["transformer"], sum(sizes.values()))


def _torch_variants(base, dense_export_dir, pruned_export_dir, settings, sparsity, correction, prefix: str = "") -> list[Variant]:
    """Dense and pruned pipelines with their transformers on this GPU through the torch backend (one bf16/fp16
    copy of the other components shared by both)."""
    from runtime.torch_backend import TorchSettings, weight_bytes
    from runtime.torch_stage import torch_components, torch_pipeline

    settings = settings or TorchSettings()
    shared = torch_components(base, settings.precision.dtype)
    others = sum(_torch_bytes(m) for k, m in shared.items() if isinstance(m, torch.nn.Module) and k != "transformer")
    out = []
    for name, export_dir, sp, corr in (("dense", dense_export_dir, None, None), ("pruned", pruned_export_dir, sparsity, correction)):
        pipe, report = torch_pipeline(base, export_dir, settings, sparsity=sp, components=shared, correction=corr)
        size = weight_bytes(pipe.transformer)
        label = f"pytorch {torch.__version__} {settings.precision.name}{' compiled' if settings.compile else ''} ({report['layers']['kernel'] or 'dense'} kernels)"
        out.append(Variant(prefix + name, pipe, label, size, size + others, report=report))
    return out


def sparsity_note(sparsity, backend: str, cuda: bool) -> str:
    """What speedup to expect from this pattern on this backend (reported with the numbers)."""
    if sparsity is None:
        return ""
    if sparsity.kind == "nm":
        if backend == "ort" or not cuda:
            return (f"{sparsity} keeps the dense shapes; ONNX Runtime on a CPU multiplies the zeros like any other weight, "
                    f"so no speedup is expected here: {sparsity} needs sparse tensor cores (NVIDIA Ampere or later, "
                    f"TensorRT with SPARSE_WEIGHTS, fp16/int8)")
        if backend == "torch":
            return f"{sparsity} runs on PyTorch's semi-structured kernels for the layers listed in torch_backend (the others stay dense, with the reason)"
        return f"{sparsity} runs on sparse tensor cores where TensorRT picked sparse kernels (see the engine manifest)"
    if sparsity.kind == "unstructured":
        return f"{sparsity} zeros are scattered: neither ONNX Runtime nor TensorRT skips them, so no speedup is expected"
    if sparsity.kind == "structured":
        return f"{sparsity} removes attention heads and FFN neurons: smaller matrices, a speedup on every backend"
    return ""


def run_e2e(
    spec,
    dense_export_dir: str | os.PathLike,
    pruned_export_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    runs: int = 10,
    warmup: int = 2,
    backend: str = "ort",
    provider: str = "cpu",
    engines: dict[str, str | os.PathLike] | None = None,
    sparsity=None,
    eager: bool = True,
    quality: bool = True,
    quality_seeds: tuple[int, ...] = (0, 1, 2),
    prompt: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    grid_prompts: list[str] | None = None,
    base_pipe=None,
    threads: int | None = None,
    resolutions: list[tuple[int, int]] | None = None,
    precision: str | None = None,
    correction=None,
    torch_settings=None,
    memory: bool = True,
    ov_precision: str = "auto",
) -> dict[str, Any]:
    """Benchmark dense vs pruned (and PyTorch eager) end to end; write the JSON, Markdown, plot and grid.

    spec: a :class:`families.registry.ModelSpec`. dense_export_dir / pruned_export_dir: stage 2 outputs (or
    their ``onnx/``). backend: ``"ort"`` (sessions on ``provider``) or ``"trt"`` (engines from
    ``engines={"dense": dir, "pruned": dir}``, each with ``<component>/engine_*.plan``; default
    ``<export dir>/engines``). sparsity: the pruned plan's :class:`obsdiff.patterns.Sparsity` (or string),
    for the note. runs / warmup: timed and untimed iterations (>= 1 timed). prompt / seed / steps: the timed
    generation (default: the spec's first evaluation prompt, seed 0, the spec's steps). quality: run
    ``evaluation.metrics.evaluate`` on each variant with ``quality_seeds``. threads: CPU threads for both
    PyTorch and ONNX Runtime (default: PyTorch's current count, given to ONNX Runtime too, so every variant
    has the same cores; on an oversubscribed machine PyTorch's OpenMP with 2+ threads can be 10-30x slower
    than with 1, measured on the shared 2-core development box). resolutions: image sizes ``(h, w)`` to
    time, each in every round (default: the model's); the first one gives the headline numbers, all of them
    ``per_shape`` (latency and stages per variant, speedups). Each must be one the exports serve.
    torch_settings: ``backend="torch"`` (stage 2's compact checkpoints on this GPU through
    :mod:`runtime.torch_backend`): its :class:`~runtime.torch_backend.TorchSettings` (default bf16, compiled). With
    ``backend="trt"``, the same exports also run on the torch backend, as variants ``torch_dense`` and
    ``torch_pruned`` interleaved with the engines (side by side; ``speedup_torch``, ``torch_pruned_over_trt_pruned``).
    correction: a Q-Sched scheduler correction (:class:`runtime.qsched.correction.SchedulerCorrection` or its JSON file,
    e.g. ``<config>/qsched/...json``) that the pruned variant's sampler applies.
    precision: the transformer precision of both exports (``fp32``, ``int8``...), recorded (default: the
    pruned export report's).
    memory: before the timed runs, measure each variant's weights per component next to the dense original's, and
    the peak memory of generating one image at the first resolution, each in a fresh process
    (:func:`measure.memory.variant_memory`; ``memory`` in each variant's entry, a section of ``bench.md``). Not
    for the torch backend's variants.

    backend ``"openvino"``: both exports' ONNX compiled by OpenVINO for this CPU at ``ov_precision`` (auto/f32/bf16,
    :mod:`runtime.openvino.precision`), or the checked compiled models of ``engines`` (default ``<export dir>/openvino``
    where a ``build --backend openvino`` wrote it); recorded as ``ov_precision`` with the reason for the hint.

    Returns the dict written to ``out_dir/bench.json``: ``dense``/``pruned``/``eager`` entries with
    ``latency_ms`` {median, p90, mean, min, n}, ``stages_ms``, ``transformer_step_ms``, ``images_per_s``,
    ``peak_memory_mib``, ``size_mib``, ``backend``, ``quality``; and ``speedup`` (dense / pruned median).
    """
    from obsdiff.patterns import Sparsity, parse_sparsity

    from common.io import check_output, created_dirs

    if runs < 1 or warmup < 0:
        raise UserError(f"runs must be >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    if steps is not None and steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if threads is not None and threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    if isinstance(sparsity, str):
        sparsity = parse_sparsity(sparsity)
    assert sparsity is None or isinstance(sparsity, Sparsity)
    cuda = backend in ("trt", "torch") or provider == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError(f"backend {backend}/{provider} needs a CUDA GPU and none is visible; use --backend ort --provider cpu")
    device = "cuda" if cuda else "cpu"
    if backend == "openvino":  # no OpenVINO, an unknown hint or bf16 on a CPU without it: one line before anything loads
        from runtime.openvino.library import openvino
        from runtime.openvino.precision import resolve_hint

        openvino()
        resolve_hint(ov_precision)
    from runtime.pipeline_runner import check_runner_inputs

    for export_dir in (dense_export_dir, pruned_export_dir):  # inputs first: nothing is created for a bad one
        check_runner_inputs(spec, onnx_dir=_onnx_dir(export_dir))  # made for another model: one line naming both
    for engine_dir in (engines or {}).values():
        check_runner_inputs(spec, engine_dir=engine_dir)
    check_runner_inputs(spec, correction=correction)
    if backend == "torch" or (backend == "trt" and torch_settings is not None):
        from runtime.manifest import current_gpu
        from runtime.torch_backend import TorchSettings
        from runtime.torch_stage import check_torch_build

        for export_dir, sp in ((dense_export_dir, None), (pruned_export_dir, sparsity)):
            check_torch_build(sp, export_dir, torch_settings or TorchSettings(), gpu=current_gpu())
    for name in ("bench.json", "bench.md", "bench.png", "grid.png"):
        check_output(Path(out_dir) / name, "file")
    steps = spec.steps if steps is None else steps
    resolutions = [tuple(r) for r in resolutions] if resolutions else [(spec.height, spec.width)]
    for export_dir in (dense_export_dir, pruned_export_dir):
        check_served(export_dir, spec, resolutions)
    prompt = prompt or default_prompts(spec)[0]
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        with created_dirs(out_dir) as out_dir:
            return _run(spec, dense_export_dir, pruned_export_dir, out_dir, runs=runs, warmup=warmup, backend=backend, provider=provider,
                        engines=engines, sparsity=sparsity, eager=eager, quality=quality, quality_seeds=quality_seeds, prompt=prompt,
                        seed=seed, steps=steps, grid_prompts=grid_prompts, base_pipe=base_pipe, cuda=cuda, device=device, resolutions=resolutions,
                        precision=precision or export_precision(pruned_export_dir), correction=correction, torch_settings=torch_settings,
                        memory=memory, ov_precision=ov_precision)
    finally:
        torch.set_num_threads(threads_before)


def _run(spec, dense_export_dir, pruned_export_dir, out_dir: Path, *, runs, warmup, backend, provider, engines, sparsity, eager, quality,
         quality_seeds, prompt, seed, steps, grid_prompts, base_pipe, cuda, device, resolutions, precision=None, correction=None,
         torch_settings=None, memory=True, ov_precision="auto") -> dict[str, Any]:
    from tqdm import tqdm

    from measure.report import write_reports
    from families.registry import load_pipeline
    from runtime.pipeline_runner import generate
    from runtime.stage_timer import StageTimer

    threads = torch.get_num_threads()

    dense_onnx, pruned_onnx = _onnx_dir(dense_export_dir), _onnx_dir(pruned_export_dir)
    eng = {k: Path(v) for k, v in (engines or {}).items()}
    if backend == "trt":
        eng.setdefault("dense", dense_onnx.parent / "engines")
        eng.setdefault("pruned", pruned_onnx.parent / "engines")
    if backend == "openvino":  # a `build --backend openvino` at this precision beside the export, where there is one; else compiled at load
        from runtime.openvino.build import holds_compiled
        from runtime.openvino.precision import resolve_hint

        for name, d in (("dense", dense_onnx), ("pruned", pruned_onnx)):
            if name not in eng and holds_compiled(d.parent / "openvino", resolve_hint(ov_precision)):
                eng[name] = d.parent / "openvino"
    # first, while this process holds no model: each measurement loads its own pipeline in a process of its own
    memory_of = (_memory(spec, backend, provider, {"dense": dense_onnx, "pruned": pruned_onnx}, eng, eager, resolutions[0], steps, threads, cuda)
                 if memory else {})
    base = base_pipe if base_pipe is not None else load_pipeline(spec)
    base = base.to(device)
    if not eager and base_pipe is None and backend in ("ort", "openvino"):
        _free_replaced_modules(base, dense_onnx, pruned_onnx)
    if backend == "torch":  # the compact checkpoints on this GPU through runtime.torch_backend
        variants = _torch_variants(base, dense_export_dir, pruned_export_dir, torch_settings, sparsity, correction)
    else:
        variants = [
            _runner_variant("dense", spec, base, backend=backend, onnx_dir=dense_onnx, engine_dir=eng.get("dense"), provider=provider, threads=threads,
                            ov_precision=ov_precision),
            _runner_variant("pruned", spec, base, backend=backend, onnx_dir=pruned_onnx, engine_dir=eng.get("pruned"), provider=provider, threads=threads,
                            correction=correction, ov_precision=ov_precision),
        ]
    if backend == "trt" and torch_settings is not None:  # side by side: the same exports on the torch backend, interleaved
        variants += _torch_variants(base, dense_export_dir, pruned_export_dir, torch_settings, sparsity, correction, prefix="torch_")
    if eager:
        size = sum(_torch_bytes(getattr(base, c.attr, None)) for c in spec.adapter.components if c.kind != "transformer")
        variants.append(Variant("eager", base, f"pytorch {torch.__version__} eager ({device})", _torch_bytes(base.transformer), size + _torch_bytes(base.transformer)))

    timer = StageTimer(cuda=cuda)
    per_shape: dict[tuple[int, int], dict[str, list]] = {r: {v.name: [] for v in variants} for r in resolutions}
    for it in tqdm(range(warmup + runs), desc="e2e (interleaved)", unit="round"):
        k = it % len(variants)
        for hw in resolutions:
            for v in variants[k:] + variants[:k]:  # rotate the order every round
                with PeakMemory(cuda=cuda) as mem:
                    generate(v.pipe, spec, prompt, seed=seed, steps=steps, timer=timer, output_type="np", height=hw[0], width=hw[1])
                ms, calls = timer.collect()
                if it >= warmup:
                    per_shape[hw][v.name].append(ms)
                    if hw == resolutions[0]:
                        v.records.append(ms)
                    v.peak_mib = max(v.peak_mib, mem.peak_mib)
                    v.peak_delta_mib = max(v.peak_delta_mib, mem.rise_mib)
            if calls.get("transformer") not in (None, steps):
                log.debug("%s: %s transformer calls for %s steps", v.name, calls.get("transformer"), steps)

    for v in variants:  # TensorRT-RTX: keep the JIT-compiled kernels for the next run
        for r in getattr(v.pipe, "runners", {}).values():
            if hasattr(r, "save_runtime_cache"):
                r.save_runtime_cache()

    result: dict[str, Any] = {
        "model": spec.id,
        "sparsity": str(sparsity) if sparsity is not None else None,
        "precision": precision,
        "backend": backend,
        "provider": provider if backend == "ort" else None,
        "ov_precision": _ov_precision(variants) if backend == "openvino" else None,
        "torch_backend": {v.name: v.report for v in variants if v.report} or None,
        "settings": {"runs": runs, "warmup": warmup, "steps": steps, "guidance": spec.guidance, "height": resolutions[0][0], "width": resolutions[0][1],
                     "resolutions": [list(r) for r in resolutions], "correction": str(correction) if isinstance(correction, (str, Path)) else
                     (None if correction is None else "given"),
                     "prompt": prompt, "seed": seed, "interleaved": True, "threads": threads, "timer": "cuda events" if cuda else "perf_counter"},
        "device": device_info(cuda),
    }
    for v in variants:
        total = [r.get("total", 0.0) for r in v.records]
        stages = {s: stats([r.get(s, 0.0) for r in v.records]) for s in STAGES}
        med = stats(total)
        result[v.name] = {
            "backend": v.backend,
            "latency_ms": med,
            "stages_ms": stages,
            "transformer_step_ms": stages["transformer"]["median"] / steps,
            "images_per_s": 1000.0 / med["median"] if med["median"] > 0 else None,
            "peak_memory_mib": round(v.peak_mib, 1),
            "peak_memory_delta_mib": round(v.peak_delta_mib, 1),  # growth during its own runs (activations, workspaces)
            "memory_kind": "cuda device memory in use (all variants loaded)" if cuda else "process RSS (all variants loaded)",
            "size_mib": {"transformer": round(v.transformer_bytes / 2**20, 3), "total": round(v.total_bytes / 2**20, 3)},
            "memory": memory_of.get(v.name),
            "quality": None,
        }
    d, p = result["dense"], result["pruned"]
    result["speedup"] = d["latency_ms"]["median"] / p["latency_ms"]["median"]
    result["speedup_transformer"] = d["stages_ms"]["transformer"]["median"] / max(p["stages_ms"]["transformer"]["median"], 1e-9)
    dense_t = [r["total"] for r in variants[0].records]
    pruned_t = [r["total"] for r in variants[1].records]
    result["speedup_paired"] = float(np.median(np.asarray(dense_t) / np.asarray(pruned_t)))
    if "torch_pruned" in result:  # side by side with the engines
        tp = result["torch_pruned"]["latency_ms"]["median"]
        result["speedup_torch"] = result["torch_dense"]["latency_ms"]["median"] / tp
        result["torch_pruned_over_trt_pruned"] = tp / p["latency_ms"]["median"]
    if eager:
        result["speedup_vs_eager"] = result["eager"]["latency_ms"]["median"] / p["latency_ms"]["median"]
    result["note"] = sparsity_note(sparsity, backend, cuda)
    result["per_shape"] = {}
    for hw, recs in per_shape.items():
        row: dict[str, Any] = {v: {"latency_ms": stats([r.get("total", 0.0) for r in rs]),
                                   "stages_ms": {s: stats([r.get(s, 0.0) for r in rs]) for s in STAGES}} for v, rs in recs.items()}
        row["speedup"] = row["dense"]["latency_ms"]["median"] / row["pruned"]["latency_ms"]["median"]
        row["speedup_transformer"] = row["dense"]["stages_ms"]["transformer"]["median"] / max(row["pruned"]["stages_ms"]["transformer"]["median"], 1e-9)
        result["per_shape"][f"{hw[0]}x{hw[1]}"] = row

    if quality:
        try:
            from evaluation.metrics import evaluate
        except ImportError as e:
            log.warning("quality evaluator unavailable (%s); bench.json has quality: null", e)
        else:
            for v in tqdm(variants, desc="quality", unit="variant"):
                result[v.name]["quality"] = evaluate(v.pipe, spec, seeds=tuple(quality_seeds), steps=steps)

    grid_prompts = grid_prompts_for(spec, grid_prompts)
    write_grid({v.name: v.pipe for v in variants}, spec, grid_prompts, out_dir / "grid.png", seed=seed, steps=steps)
    result["images"] = {"grid": "grid.png", "grid_prompts": grid_prompts, "grid_seed": seed}
    write_json(out_dir / "bench.json", result)
    write_reports(result, out_dir)
    log.info("speedup dense/pruned %.3fx (transformer %.3fx) -> %s", result["speedup"], result["speedup_transformer"], out_dir / "bench.json")
    return result


def _ov_precision(variants: list[Variant]) -> dict[str, Any]:
    """The precision OpenVINO ran the transformers in, the hint it was told and why (bench.json's ``ov_precision``)."""
    tr = variants[0].pipe.runners["transformer"]
    return {"precision": tr.precision, "hint": tr.hint.name, "why": tr.hint.why}


def _memory(spec, backend: str, provider: str, onnx_dirs: dict[str, Path], engines: dict[str, Path], eager: bool, hw: tuple[int, int],
            steps: int, threads: int, cuda: bool) -> dict[str, Any]:
    """Each variant's memory (:func:`measure.memory.variant_memory`): the ONNX Runtime or TensorRT variants, and the
    eager one (the dense model in PyTorch, on the GPU when the benchmark runs there). The torch backend's variants
    are not measured."""
    from export.weights import model_weights
    from measure.memory import variant_memory

    dense = model_weights(spec)
    plan = {name: {"backend": backend, "onnx_dir": onnx_dirs[name], "engine_dir": engines.get(name), "provider": provider}
            for name in onnx_dirs} if backend in ("ort", "trt") else {}
    if eager:
        plan["eager"] = {"backend": "pytorch", "provider": "cuda" if cuda else "cpu"}
    out, done = {}, {}
    for name, kw in plan.items():
        key = tuple(str(Path(v).resolve()) if v is not None and k.endswith("_dir") else v for k, v in sorted(kw.items()))
        if key not in done:  # the same export under two names (a benchmark of one export against itself) is measured once
            log.info("memory of %s: weights, and one image at %dx%d in a fresh process", name, *hw)
            done[key] = variant_memory(spec, dense, **kw, height=hw[0], width=hw[1], steps=steps, threads=threads)
        out[name] = done[key]
    return out


def export_precision(export_dir: str | os.PathLike) -> str | None:
    """The transformer precision stage 2 recorded for ``export_dir`` (None for an export without a report)."""
    from common.io import read_json

    report = _onnx_dir(export_dir).parent / "export_report.json"
    return read_json(report).get("precision") if report.is_file() else None


def check_served(export_dir: str | os.PathLike, spec, resolutions: list[tuple[int, int]]) -> None:
    """One line, before anything is loaded, when an export cannot run at one of ``resolutions``: a static
    export serves its one resolution, a dynamic one the box between its smallest and largest latents."""
    from common.io import read_json
    from families.shapes import ServedShapes

    report = _onnx_dir(export_dir).parent / "export_report.json"
    s = read_json(report).get("served_shapes") if report.is_file() else None
    if not s:
        return  # an export from before served shapes: the runtime says what does not fit
    served = ServedShapes(tuple(tuple(r) for r in s["resolutions"]), tuple(s["batch"]), s["text_seq_len"], s["vae_scale"])
    for hw in resolutions:
        spec.check_image_size(*hw, options=("--resolution height", "--resolution width"))
        lat = served.latent(hw)
        (h0, w0), (h1, w1) = served.latent_min, served.latent_max
        fits = lat in served.latents if not served.dynamic_spatial else (h0 <= lat[0] <= h1 and w0 <= lat[1] <= w1)
        if not fits:
            raise UserError(f"{hw[0]}x{hw[1]} px is outside what {export_dir} serves ({served.describe()}); "
                            f"re-export with `--resolution` including it")


def grid_prompts_for(spec, prompts: list[str] | None = None) -> list[str]:
    """The prompts of the image grid: every one given, else every default evaluation prompt of the model
    (the ten digits for tiny-sd3, ``prompts/eval.txt`` for hub models); none is dropped."""
    return list(prompts) if prompts else default_prompts(spec)


def write_grid(pipes: dict[str, Any], spec, prompts: list[str], path: str | os.PathLike, *, seed: int = 0, steps: int | None = None) -> Path:
    """Generate every prompt with every pipeline (same seed) and save the grid: one row per pipeline, one
    column per prompt, in the order given (wrapped into bands of :data:`benchmarks.report.GRID_MAX_COLS`)."""
    from measure.report import image_grid
    from runtime.pipeline_runner import generate

    rows = {name: [img for pr in prompts for img in generate(pipe, spec, pr, seed=seed, steps=steps)] for name, pipe in pipes.items()}
    return image_grid(rows, path, col_labels=[_short(pr) for pr in prompts])


def _short(prompt: str) -> str:
    return prompt.split()[-1] if len(prompt) > 16 else prompt


def default_prompts(spec) -> list[str]:
    if spec.quality_metric == "digits":
        from evaluation.digits import prompt_for

        return [prompt_for(d) for d in range(10)]
    from evaluation.metrics import EVAL_PROMPTS

    f = EVAL_PROMPTS
    if f.is_file():
        return [p for p in f.read_text().splitlines() if p.strip()]
    return ["a photo of an astronaut riding a horse on the moon", "a red bicycle leaning on a brick wall", "a bowl of ramen, studio lighting", "a lighthouse at dusk, oil painting"]
