"""``make engine``'s orchestration: prune, export, build engines and benchmark, end to end.

:func:`run_engine` runs stages 1-3 into ``artifacts/<model>/<config-id>/`` (see :mod:`pipeline.artifacts`), each through the
driver its own command calls (:func:`obsdiff.stage.run_prune` around :func:`obsdiff.packages.prune`,
:func:`export.stage.run_export`, :func:`runtime.stage.run_build`, :func:`measure.e2e.run_e2e`), with
typed settings built here. Every stage's settings are checked before the first stage starts. A stage whose
output is complete and whose inputs are unchanged is reused. The last line printed is the artifact directory.

``--precision int8`` (or ``fp8``) quantizes the transformer in stage 2 (calibrated on stage 1's trajectories)
into ``export-int8/`` and builds ``engines-int8/`` from it; on a CPU the benchmark runs the INT8 exports in ONNX
Runtime and writes ``bench-int8/``. FP8 builds TensorRT-RTX engines for SM89/SM120 and is benchmarked only on
such a GPU (``--no-bench`` elsewhere). ``--precision int4`` runs stage 1 with ``--weight-bits 4`` (group 128; the dense
side too, as ``--sparsity dense``: 4-bit weights and no pruning), in ``<config>-w4g128/`` and ``dense-w4g128/``,
exports those weights as ONNX Runtime's ``MatMulNBits`` into ``export-int4/`` and benchmarks them in ONNX Runtime;
the engines get the same weights as TensorRT's INT4 weight-only ``DequantizeLinear`` in a float16 graph
(``export-w4a16/``, ``engines-w4a16/``; built, not benchmarked yet).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from common.cli import ArgumentParser, int_at_least, int_range
from common.errors import UserError

log = logging.getLogger(__name__)


def add_engine_args(p) -> None:
    """``make engine``'s options (``python -m pipeline engine`` and :func:`parse_args`)."""
    from families.shapes import add_shape_args

    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory (default tiny-sd3)")
    p.add_argument("--sparsity", default="2:4", help="2:4, 4:8, unstructured:<r>, structured:<r> (default 2:4)")
    p.add_argument("--method", default="obs-diff", choices=["obs-diff", "wanda", "magnitude"])
    p.add_argument("--samples", type=int_at_least(1), default=None, help="calibration prompts (default: the prune command's, 64)")
    p.add_argument("--calib-steps", type=int_at_least(1), default=None, help="calibration denoising steps (default: the model's sampling steps)")
    p.add_argument("--groups", type=int_at_least(1), default=4, help="module packages (default 4)")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "trt", "torch", "openvino"],
                   help="benchmark backend: trt engines on a GPU host, ONNX Runtime otherwise (auto); torch: the compact "
                        "checkpoints on the GPU with PyTorch's 2:4 kernels and torchao (no engines); openvino: ONNX Runtime's exports "
                        "compiled by OpenVINO for this CPU (<export>/openvino/)")
    p.add_argument("--ov-precision", default="auto", choices=["auto", "f32", "bf16"],
                   help="--backend openvino: inference precision (auto: bf16 where the CPU has avx512_bf16 or AMX, else f32)")
    p.add_argument("--opt-level", type=int_range(0, 5), default=3, help="TensorRT builder optimisation level 0-5 (default 3)")
    p.add_argument("--no-engines", action="store_true", help="skip the TensorRT / TensorRT-RTX engine builds")
    p.add_argument("--runs", type=int_at_least(1), default=10, help="timed benchmark runs (default 10)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads for PyTorch and ONNX Runtime in the benchmark (default: PyTorch's)")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed warm-up runs (default 2)")
    p.add_argument("--bench-steps", type=int_at_least(1), default=None, help="denoising steps of the timed runs (default: the model's)")
    p.add_argument("--no-quality", action="store_true", help="skip the quality evaluation of each variant")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the benchmark's memory measurements (weights per component as loaded, peak memory of one image)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp8", "int4"],
                   help="the transformer's precision: fp32 (ONNX Runtime; float16 engines), int8 (Q/DQ, calibrated with ModelOpt on "
                        "stage 1's trajectories; ONNX Runtime and INT8 engines) or fp8 (engines for SM89/SM120 GPUs; ONNX Runtime cannot run "
                        "it: add --no-bench on a host without such a GPU), or int4 (stage 1 solves 4-bit weights, group 128; ONNX Runtime's "
                        "MatMulNBits with INT8 activations; its engines: INT4 weight-only, float16 activations). Default fp32")
    p.add_argument("--others-precision", default=None, choices=["fp32", "fp16", "int8", "int4"],
                   help="the ONNX Runtime exports' text encoders and VAE: fp32, fp16, or int8/int4 (weight-only text encoders, float32 VAE "
                        "decoder; docs/low-precision.md). Default: the export's for the transformer's precision. Engines keep float16")
    p.add_argument("--drop-t5", action="store_true", help="serve SD3-family models without their T5 encoder (text_encoder_3=None)")
    p.add_argument("--quant-modulation", action="store_true",
                   help="--precision int4: stage 1 quantizes the blocks' AdaLN modulations to 4 bits too (prune --quant-modulation)")
    p.add_argument("--quant-samples", type=int_at_least(1), default=None,
                   help="--precision int8/fp8: trajectories to calibrate on, the first of stage 1's (default 8)")
    p.add_argument("--quant-calls", type=int_at_least(1), default=None,
                   help="--precision int8/fp8: transformer calls kept for calibration (default 64)")
    p.add_argument("--no-bench", action="store_true", help="stop after the engine builds (no benchmark)")
    p.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager column")
    p.add_argument("--only-bench", action="store_true", help="rerun only the benchmark (stages 1-2 must be complete)")
    p.add_argument("--triton", metavar="DIR", default=None, help="also write a Triton model repository to DIR")
    p.add_argument("--artifacts", default=None, help="artifact root (default <repo>/artifacts)")
    add_shape_args(p, static=True)
    from runtime.torch_backend import add_torch_arguments

    add_torch_arguments(p)


class _StageParser(ArgumentParser):
    """The engine's parser outside the command line: a bad value is a UserError naming the command."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``python -m pipeline engine argv``'s options, parsed by this command's own parser (same checks)."""
    parser = _StageParser(prog="python -m pipeline engine")
    add_engine_args(parser)
    return parser.parse_args(argv)


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime_ns if path.exists() else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class Stage:
    """One stage of ``make engine``: its driver's typed settings (:class:`obsdiff.stage.PruneSettings`,
    :class:`export.stage.ExportSettings` or :class:`runtime.stage.BuildSettings`), the file whose presence
    says its output is complete, and what the manifest records about it."""

    name: str
    marker: Path  # present once the stage's output is complete
    settings: Any
    inputs: dict
    outputs: dict


def _driver(settings) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """``(check, run)`` of the stage whose settings these are: the check needs no weights and no input of
    an earlier stage; the run is the stage's own driver."""
    from export.stage import ExportSettings, check_export, run_export
    from obsdiff.stage import PruneSettings, check_prune, run_prune
    from runtime.stage import BuildSettings, check_build, run_build

    if isinstance(settings, PruneSettings):
        return check_prune, run_prune
    if isinstance(settings, ExportSettings):
        return check_export, run_export
    if isinstance(settings, BuildSettings):
        return partial(check_build, check_onnx=False), run_build  # the ONNX is written by an earlier stage
    raise TypeError(f"no stage driver for {type(settings).__name__}")


def check_stage(st: Stage) -> None:
    """The stage's checks that need no model weights (run for every stage before the first one starts)."""
    _driver(st.settings)[0](st.settings)


def run_stage(st: Stage) -> None:
    """Run one stage through its driver; it reuses its output when that is complete and its inputs unchanged."""
    _driver(st.settings)[1](st.settings)


def plan_stages(args, spec, sparsity, cfg, dense, cuda: bool, bench_backend: str) -> list[Stage]:
    """Every stage that ``make engine`` will run before the benchmark, with its settings checked.

    args: ``python -m pipeline engine``'s parsed options (:func:`parse_args`). A GPU host benchmarking TensorRT engines
    exports what the engines need (float16, every component) and nothing else; the float32 ONNX Runtime
    exports are for hosts without a GPU (and ``--backend ort``).
    """
    from export.stage import ExportSettings
    from families.shapes import shapes_from_args
    from obsdiff.patterns import parse_sparsity
    from obsdiff.stage import DEFAULT_SAMPLES, prune_settings
    from runtime.stage import BuildSettings

    shapes = shapes_from_args(args, spec)  # the resolutions and batch range every export and engine serves
    precision = getattr(args, "precision", "fp32")
    others, drop_t5 = getattr(args, "others_precision", None), getattr(args, "drop_t5", False)  # ONNX Runtime's exports; engines: fp16

    weights = weight_quant(precision, getattr(args, "quant_modulation", False))
    prune = prune_settings(spec, sparsity, cfg.prune, method=args.method, groups=args.groups, samples=args.samples or DEFAULT_SAMPLES,
                           steps=args.calib_steps, **weights)
    stages = [Stage("prune", cfg.prune / "plan.json", prune, {"model": spec.source}, {"dir": str(cfg.prune)})]
    if weights:  # the dense side's 4-bit weights, solved by the same stage 1 without pruning
        stages.append(Stage("prune_dense", dense.prune / "plan.json",
                            prune_settings(spec, parse_sparsity("dense"), dense.prune, groups=args.groups, samples=args.samples or DEFAULT_SAMPLES,
                                           steps=args.calib_steps, **weights), {"model": spec.source}, {"dir": str(dense.prune)}))
    quant = quant_calibration(args, prune) if precision in ("int8", "fp8") else None
    cpu_components = ("transformer",) if not cuda else None  # engines on a host without a GPU: the transformer's only; None: all
    for which, dirs, pruned in (("dense", dense, dense.prune if weights else None), ("pruned", cfg, cfg.prune)):
        inputs = {"pruned": str(pruned) if pruned else None}
        if precision == "int4":  # ONNX Runtime runs export-int4/ (MatMulNBits); the engines get the same weights as W4A16
            stages.append(Stage(f"export_{which}_int4", dirs.export_for("int4") / "export_report.json",
                                export_settings(spec, dirs, pruned, "int4", shapes, others=others, drop_t5=drop_t5,
                                                share_from=dense.export_for("int4") if which == "pruned" else None),
                                inputs, {"dir": str(dirs.export_for("int4"))}))
            if args.no_engines:
                continue
            engine_export = dirs.export_for("w4a16")  # float16 around TensorRT's INT4 DequantizeLinear (export.int4_qdq)
            stages.append(Stage(f"export_{which}_w4a16", engine_export / "export_report.json",
                                export_settings(spec, dirs, pruned, "w4a16", shapes, components=cpu_components, others="fp16",
                                                share_from=dense.export_for("w4a16") if which == "pruned" else None, drop_t5=drop_t5),
                                inputs, {"dir": str(engine_export)}))
            engine_components = None
        elif precision == "fp32":
            if bench_backend in ("ort", "torch", "openvino"):  # torch: the float32 export's compact checkpoint
                stages.append(Stage(f"export_{which}", dirs.export / "export_report.json",
                                    ExportSettings(spec=spec, out=dirs.export, pruned=pruned, precision="fp32", shapes=shapes,
                                                   share_from=dense.export if pruned else None, others_precision=others, drop_t5=drop_t5),
                                    inputs, {"dir": str(dirs.export)}))
            if args.no_engines or bench_backend == "torch":
                continue
            engine_export = dirs.export_fp16
            stages.append(Stage(f"export_{which}_fp16", dirs.export_fp16 / "export_report.json",
                                ExportSettings(spec=spec, out=dirs.export_fp16, pruned=pruned, precision="fp16", components=cpu_components,
                                               parity_batches=(2,), shapes=shapes, share_from=dense.export_fp16 if pruned else None,
                                               drop_t5=drop_t5),
                                inputs, {"dir": str(dirs.export_fp16)}))
            engine_components = None
        else:
            # one quantized export serves ONNX Runtime and the engines: float32 around INT8 for ONNX Runtime on a
            # CPU, float16 around it for TensorRT (FP8 runs on GPUs only)
            engine_export = dirs.export_for(precision)
            ort_export = precision == "int8" and bench_backend in ("ort", "openvino")  # OpenVINO reads ONNX Runtime's exports
            if ort_export or not args.no_engines:
                settings = export_settings(spec, dirs, pruned, precision, shapes, quant,
                                           components=None if ort_export else cpu_components, others=others if ort_export else "fp16",
                                           share_from=dense.export_for(precision) if pruned else None, drop_t5=drop_t5)
                stages.append(Stage(f"export_{which}_{precision}", engine_export / "export_report.json", settings, inputs, {"dir": str(engine_export)}))
            if args.no_engines:
                continue
            engine_components = cpu_components if ort_export else None
            if ort_export and engine_components is None and settings.other_precision in ("int8", "int4"):  # MatMulNBits encoders: ONNX Runtime's
                engine_components = tuple(c.name for c in spec.adapter.components if not c.weight_only and c.name not in settings.dropped)
        engine_precision = {"fp32": "fp16", "int4": "w4a16"}.get(precision, precision)
        engines = dirs.engines_for(engine_precision)
        build = BuildSettings(spec=spec, sparsity=sparsity if which == "pruned" else parse_sparsity("dense"), onnx_dir=engine_export / "onnx",
                              out=engines, opt_level=args.opt_level, components=engine_components,
                              triton=Path(args.triton) if args.triton and which == "pruned" else None, static_shapes=shapes.static)
        suffix = "" if precision == "fp32" else f"_{engine_precision}"
        stages.append(Stage(f"engines_{which}{suffix}", engines / "transformer", build, {"onnx": str(engine_export / "onnx")},
                            {"dir": str(engines)}))
    if bench_backend == "openvino":  # the exports the benchmark times, compiled for this CPU where e2e finds them
        for which, dirs in (("dense", dense), ("pruned", cfg)):
            export = dirs.export_for(precision)
            build = BuildSettings(spec=spec, sparsity=sparsity if which == "pruned" else parse_sparsity("dense"), onnx_dir=export / "onnx",
                                  out=export / "openvino", backend="openvino", ov_precision=getattr(args, "ov_precision", "auto"))
            stages.append(Stage(f"openvino_{which}{'' if precision == 'fp32' else '_' + precision}", export / "openvino" / "transformer", build,
                                {"onnx": str(export / "onnx")}, {"dir": str(export / "openvino")}))
    for st in stages:
        check_stage(st)
    return stages


def weight_quant(precision: str, modulation: bool = False) -> dict[str, Any]:
    """Stage 1's weight quantization for a ``make engine`` precision: ``int4`` solves 4-bit weights (group 128) in the
    prune, the AdaLN modulations too with ``modulation``; the others prune float weights (``{}``)."""
    from obsdiff.weight_quant import DEFAULT_GROUP_SIZE

    if precision != "int4":
        return {}
    return {"weight_bits": 4, "group_size": DEFAULT_GROUP_SIZE, **({"quant_modulation": True} if modulation else {})}


def weights_tail(precision: str, modulation: bool = False) -> str:
    """The configuration id's suffix for a precision whose weights stage 1 quantizes (``-w4g128``, ``-w4g128-mod`` with
    the AdaLN modulations), else ``""``."""
    w = weight_quant(precision, modulation)
    return f"-w{w['weight_bits']}g{w['group_size']}" + ("-mod" if w.get("quant_modulation") else "") if w else ""


def quant_calibration(args, prune):
    """The INT8/FP8 calibration of ``make engine``: stage 1's prompts (the prune stage's list) and seed, the
    model's steps (stage 1's ``--calib-steps``) and guidance; ``--quant-samples``/``--quant-calls``."""
    from export.stage import DEFAULT_QUANT_CALLS, DEFAULT_QUANT_SAMPLES, QuantCalibration

    calib = prune.config.calibration
    return QuantCalibration(samples=getattr(args, "quant_samples", None) or DEFAULT_QUANT_SAMPLES,
                            max_calls=getattr(args, "quant_calls", None) or DEFAULT_QUANT_CALLS,
                            prompts=tuple(prune.prompts), steps=calib.steps, guidance=calib.guidance, seed=calib.seed)


def export_settings(spec, dirs, pruned, precision: str, shapes, quant=None, *, components=None, others: str | None = None,
                    share_from: Path | None = None, drop_t5: bool = False):
    """Stage 2's settings for one configuration directory at a transformer precision, as ``make engine`` and
    ``python -m benchmarks.pareto`` run it (so either reuses what the other exported): ``fp32`` into ``export/``,
    ``int8``/``fp8`` (with ``quant``, a :class:`export.stage.QuantCalibration`) into ``export-<precision>/``; share_from:
    the dense export whose text encoders and VAE a pruned one links (:mod:`export.component_reuse`); others: the other
    components' precision (None: the export's default, :data:`export.stage.OTHERS_PRECISION`); drop_t5: without T5."""
    from export.stage import ExportSettings

    if precision == "fp32":
        return ExportSettings(spec=spec, out=dirs.export, pruned=pruned, precision="fp32", shapes=shapes, components=components,
                              share_from=share_from, others_precision=others, drop_t5=drop_t5)
    return ExportSettings(spec=spec, out=dirs.export_for(precision), pruned=pruned, precision=precision, components=components, shapes=shapes,
                          calibration=quant, others_precision=others, share_from=share_from, drop_t5=drop_t5)


@dataclass(frozen=True)
class BenchSettings:
    """The end-to-end benchmark of ``make engine`` (:func:`measure.e2e.run_e2e`): dense vs pruned exports
    (and engines on ``backend="trt"``), written to ``out`` (bench.json, bench.md, bench.png, grid.png)."""

    spec: Any
    dense_export: Path
    pruned_export: Path
    out: Path
    backend: str
    provider: str
    engines: dict[str, Path] | None
    sparsity: Any
    runs: int = 10
    warmup: int = 2
    threads: int | None = None
    steps: int | None = None
    quality: bool = True
    eager: bool = True
    resolutions: tuple[tuple[int, int], ...] | None = None
    precision: str = "fp32"
    torch_settings: Any = None  # backend "torch": runtime.torch_backend.TorchSettings
    memory: bool = True
    ov_precision: str = "auto"  # backend "openvino": the precision hint

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "runs": self.runs, "warmup": self.warmup, "steps": self.steps, "quality": self.quality, "eager": self.eager,
                "memory": self.memory,
                "resolutions": [list(r) for r in self.resolutions] if self.resolutions else None, "precision": self.precision,
                "torch": self.torch_settings.to_json() if self.torch_settings else None,
                **({"ov_precision": self.ov_precision} if self.backend == "openvino" else {})}


BENCH_OUTPUTS = ("bench.json", "bench.md", "bench.png", "grid.png")


def plan_bench(args, spec, sparsity, cfg, dense, cuda: bool, bench_backend: str) -> BenchSettings:
    """The benchmark that ends ``make engine``, checked like the stages (its inputs come later)."""
    from families.shapes import shapes_from_args
    from runtime.torch_backend import torch_settings_from_args

    trt = bench_backend == "trt"
    precision = getattr(args, "precision", "fp32")
    export_precision = ("fp16" if precision == "fp32" else precision) if trt else precision
    engine_precision = "fp16" if precision == "fp32" else precision
    settings = BenchSettings(
        spec=spec,
        dense_export=dense.export_for(export_precision),
        pruned_export=cfg.export_for(export_precision),
        out=cfg.bench_dir(precision),
        backend=bench_backend,
        provider="cuda" if (cuda and not trt) else "cpu",
        engines={"dense": dense.engines_for(engine_precision), "pruned": cfg.engines_for(engine_precision)} if trt else None,
        sparsity=sparsity,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        steps=args.bench_steps,
        quality=not args.no_quality,
        eager=not args.no_eager,
        resolutions=shapes_from_args(args, spec).resolutions,
        precision=precision,
        torch_settings=torch_settings_from_args(args) if bench_backend == "torch" else None,
        memory=not getattr(args, "no_memory", False),
        ov_precision=getattr(args, "ov_precision", "auto"),
    )
    check_bench(settings)
    return settings


def check_bench(settings: BenchSettings) -> None:
    """The benchmark's checks that need neither its inputs nor a model (outputs writable, values in range)."""
    from common.io import check_output

    if settings.runs < 1 or settings.warmup < 0:
        raise UserError(f"runs must be >= 1 and warmup >= 0 (got runs={settings.runs}, warmup={settings.warmup})")
    for name, v in (("steps", settings.steps), ("threads", settings.threads)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be at least 1, got {v}")
    for name in BENCH_OUTPUTS:
        check_output(settings.out / name, "file")


def run_bench(settings: BenchSettings) -> dict:
    """Run the benchmark; returns what it writes to ``bench.json``."""
    from measure.e2e import run_e2e

    return run_e2e(settings.spec, settings.dense_export, settings.pruned_export, settings.out, runs=settings.runs, warmup=settings.warmup,
                   backend=settings.backend, provider=settings.provider, engines=settings.engines, sparsity=settings.sparsity,
                   threads=settings.threads, steps=settings.steps, quality=settings.quality, eager=settings.eager,
                   resolutions=list(settings.resolutions) if settings.resolutions else None, precision=settings.precision,
                   torch_settings=settings.torch_settings, memory=settings.memory, ov_precision=settings.ov_precision)


def run_engine(args) -> int:
    """Plan and check every stage, then run them and the benchmark (``args``: :func:`parse_args`'s)."""
    from common.io import check_output
    from obsdiff.patterns import parse_sparsity
    from pipeline.artifacts import ARTIFACTS, Manifest, config_dirs
    from families.registry import resolve_model

    spec = resolve_model(args.model)
    sparsity = parse_sparsity(args.sparsity)
    if sparsity.kind == "dense":
        raise UserError("SPARSITY=dense has nothing to prune or compare; use 2:4, 4:8, unstructured:<r> or structured:<r>")
    base = Path(args.artifacts) if args.artifacts else ARTIFACTS
    check_output(base, "parent", option="--artifacts")
    if getattr(args, "quant_modulation", False) and args.precision != "int4":
        raise UserError("--quant-modulation quantizes the AdaLN modulations to 4 bits in stage 1: it goes with --precision int4")
    tail = weights_tail(args.precision, getattr(args, "quant_modulation", False))  # 4-bit weights come from their own stage 1: a configuration of their own
    cfg = config_dirs(spec, f"{sparsity.id}-{args.method}{tail}", base)
    dense = config_dirs(spec, f"dense{tail}", base)
    cuda = _cuda()
    bench_backend = args.backend if args.backend != "auto" else ("trt" if cuda and args.precision != "int4" else "ort")
    if bench_backend == "trt" and not cuda:
        raise UserError("--backend trt runs TensorRT engines and needs a CUDA GPU, and none is visible; use --backend ort")
    # Everything is checked before the first stage starts: a bad option costs seconds, not a prune.
    if bench_backend == "trt" and args.no_engines:
        raise UserError("--no-engines leaves nothing for --backend trt to benchmark; use --backend ort")
    if bench_backend == "torch":  # the GPU, the plan and the torch precision, before any stage
        from runtime.manifest import current_gpu
        from runtime.torch_backend import torch_settings_from_args
        from runtime.torch_stage import check_torch_build

        if args.precision != "fp32":
            raise UserError(f"--precision {args.precision} quantizes the ONNX exports; with --backend torch use --torch-precision {args.precision}")
        check_torch_build(sparsity, cfg.export_for("fp32"), torch_settings_from_args(args), gpu=current_gpu(), check_input=False)
    check_precision(args, cuda, bench_backend)
    stages = [] if args.only_bench else plan_stages(args, spec, sparsity, cfg, dense, cuda, bench_backend)
    bench = None if args.no_bench else plan_bench(args, spec, sparsity, cfg, dense, cuda, bench_backend)
    check_output(cfg.manifest, "file")
    if args.only_bench and bench is not None:
        for d in (bench.pruned_export, bench.dense_export):
            if not (d / "export_report.json").is_file():
                raise UserError(f"{d} is not complete; run `make engine MODEL={args.model} SPARSITY={sparsity}` first")
    manifest = Manifest(cfg.manifest, {"model": spec.id, "model_source": spec.source, "sparsity": str(sparsity), "method": args.method,
                                       "config_dir": str(cfg.root)})
    precision = args.precision
    t_all = time.perf_counter()

    for st in stages:
        before = _mtime(st.marker)
        t0 = time.perf_counter()
        log.info("== %s ==", st.name)
        run_stage(st)
        if not st.marker.exists():
            raise UserError(f"stage {st.name} finished without writing {st.marker}")
        reused = before is not None and _mtime(st.marker) == before
        manifest.record(st.name, inputs=st.inputs, settings=st.settings.to_json(), outputs=st.outputs,
                        seconds=time.perf_counter() - t0, reused=reused)
        log.info("%s: %s in %.1f s", st.name, "reused" if reused else "done", time.perf_counter() - t0)

    if bench is None:
        manifest.data.update(total_seconds=round(time.perf_counter() - t_all, 1))
        manifest.save()
        _summary(None, cfg, dense, precision)
        print(weights_summary(spec, next((d for d in (cfg.export_for(precision), cfg.export_fp16) if (d / "export_report.json").is_file()),
                                         cfg.export_for(precision))))
        print(cfg.root)
        return 0
    log.info("== bench (%s, %s) ==", bench_backend, precision)
    t0 = time.perf_counter()
    result = run_bench(bench)
    name = "bench" if precision == "fp32" else f"bench_{precision}"
    manifest.record(name, inputs={"dense": str(bench.dense_export), "pruned": str(bench.pruned_export),
                                  "engines": {k: str(v) for k, v in (bench.engines or {}).items()}},
                    settings=bench.to_json(), outputs={"bench": str(bench.out / "bench.json")}, seconds=time.perf_counter() - t0, reused=False)
    key = "speedup" if precision == "fp32" else f"speedup_{precision}"
    manifest.data.update(total_seconds=round(time.perf_counter() - t_all, 1), **{key: result["speedup"]})
    manifest.save()
    _summary(result, cfg, dense, precision)
    print(weights_summary(spec, bench.pruned_export, result))
    print(cfg.root)
    return 0


def check_precision(args, cuda: bool, bench_backend: str) -> None:
    """One line, before any stage, for a precision this host cannot benchmark or build."""
    if args.precision in ("fp32", "int4") and (args.quant_samples is not None or args.quant_calls is not None):
        raise UserError("--quant-samples/--quant-calls calibrate an INT8/FP8 transformer; add --precision int8 or fp8")
    if args.precision == "int4" and bench_backend == "trt":
        raise UserError("--precision int4 is benchmarked on ONNX Runtime (MatMulNBits); its TensorRT engines (engines-w4a16/, INT4 weight-only) "
                        "are built but not benchmarked yet: use --backend ort")
    if getattr(args, "ov_precision", "auto") != "auto" and bench_backend != "openvino":
        raise UserError("--ov-precision sets OpenVINO's inference precision: add --backend openvino")
    others = getattr(args, "others_precision", None)
    if others is not None and (bench_backend not in ("ort", "openvino") or args.precision == "fp8"):
        runs = "TensorRT engines" if bench_backend == "trt" or args.precision == "fp8" else "the PyTorch backend"
        raise UserError(f"--others-precision sets the ONNX Runtime exports' text encoders and VAE; this run benchmarks {runs}, whose "
                        "other components are float16: drop --others-precision, or use --backend ort")
    if args.precision != "fp8":
        return
    if args.no_engines:
        raise UserError("--precision fp8 runs only as TensorRT engines (ONNX Runtime cannot run FP8 Q/DQ); drop --no-engines")
    if not args.no_bench and bench_backend in ("ort", "openvino"):
        raise UserError("--precision fp8 cannot be benchmarked with ONNX Runtime or OpenVINO (neither runs TensorRT's FP8 Q/DQ) and this host has no GPU "
                        "to run FP8 engines: add --no-bench to build the FP8 engines (TensorRT-RTX, for SM89/SM120), or use --precision int8")
    if cuda and not args.no_bench:
        import torch

        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            raise UserError(f"--precision fp8 needs an Ada or later GPU (compute capability 8.9+); this one is {major}.{minor}: "
                            "use --precision int8, or add --no-bench to build FP8 engines for SM89/SM120")


def weights_summary(spec, export_dir: Path, result: dict | None = None) -> str:
    """What ``make engine`` prints last: the served pipeline's weights per component (``export_dir``'s ONNX files,
    and the components it runs in PyTorch) next to the dense original's as the registry loads it, in all and as a
    ratio (:mod:`export.weights`), and, after a benchmark that measured it, the peak memory of one image."""
    from export.weights import compare, export_weights, format_table, model_weights

    pruned = ((result or {}).get("pruned") or {}).get("memory")
    if pruned:
        table = pruned["weights"]
    else:
        try:
            table = compare(export_weights(export_dir), model_weights(spec), spec.adapter.components)
        except UserError as e:
            return f"weights: not measured ({e})"
    dense_dir = table.get("dense_directory") or spec.source
    lines = [f"weights of the served pipeline ({export_dir}) next to the dense original ({dense_dir}, {table['dense_dtype']}):",
             format_table(table)]
    peaks = []
    for name in ("pruned", "dense", "eager"):
        gen = (((result or {}).get(name) or {}).get("memory") or {}).get("generation") or {}
        if "peak_rss_bytes" in gen:
            label = "dense original in PyTorch" if name == "eager" else name
            peaks.append(f"{label} {gen['peak_rss_bytes'] / 2**20:.0f} MiB ({gen['peak_above_baseline_bytes'] / 2**20:.0f} above the libraries)")
            shape = f"{gen['height']}x{gen['width']}"
    if peaks:
        lines.append(f"peak memory of one image at {shape} (process RSS, fresh process): " + ", ".join(peaks))
    return "\n".join(lines)


def _summary(result: dict | None, cfg, dense, precision: str = "fp32") -> None:
    """A short human summary: latency, speedup, quality, sizes, engines."""
    lines = [f"{'variant':8} {'backend':34} {'median ms':>10} {'p90 ms':>9} {'accuracy':>9} {'FD':>8}"] if result else []
    for name in ("dense", "pruned", "eager") if result else ():
        r = result.get(name)
        if not r:
            continue
        q = r.get("quality") or {}
        acc = q.get("prompt_accuracy")
        fd = q.get("frechet_distance")
        acc_s = "-" if acc is None else f"{acc:.3f}"
        fd_s = "-" if fd is None else f"{fd:.2f}"
        lines.append(f"{name:8} {r['backend'][:34]:34} {r['latency_ms']['median']:10.1f} {r['latency_ms']['p90']:9.1f} {acc_s:>9} {fd_s:>8}")
    if result:
        lines.append(f"speedup dense/pruned ({precision}): {result['speedup']:.3f}x (transformer {result.get('speedup_transformer', float('nan')):.3f}x)")
        if result.get("note"):
            lines.append(result["note"])
    from runtime.manifest import manifest_summary

    for which, d in (("dense", dense), ("pruned", cfg)):
        engines = d.engines_for("fp16" if precision == "fp32" else precision)
        for plan in sorted(engines.glob("*/engine_*.plan")) if engines.is_dir() else []:
            m = manifest_summary(plan)
            quant = (f", {m['quantized_layers']} layers {m['precision']} ({m['quantized_nm_layers']} also N:M)" if m["quantized_layers"] else "")
            refused = f", targets refused by the builder: {','.join(m['refused_targets'])}" if m.get("refused_targets") else ""
            lines.append(f"engine {which}/{plan.parent.name}: {m['backend']} {m['precision']}, {m['plan_mib']} MiB, sparse_weights={m['sparse_weights']}, "
                         f"N:M-eligible ONNX weights {m['onnx_nm_eligible']}{quant}{refused}, "
                         f"builder log: {m['log_eligible']} eligible / {m['log_sparse']} sparse")
    print("\n".join(lines))
