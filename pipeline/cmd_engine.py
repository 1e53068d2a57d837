"""``python -m pipeline engine`` (``make engine``): prune, export, build engines and benchmark, end to end.

Runs stages 1-3 into ``artifacts/<model>/<config-id>/`` (see :mod:`pipeline.artifacts`), each through the
same code as its own command (``prune``, ``export``, ``build``, ``benchmarks.e2e``). A stage whose output is
complete and whose inputs are unchanged is reused. The last line printed is the artifact directory.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import ArgumentParser, int_at_least, int_range
from common.errors import UserError

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("engine", help="prune + export + build engines + benchmark (make engine)")
    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory (default tiny-sd3)")
    p.add_argument("--sparsity", default="2:4", help="2:4, 4:8, unstructured:<r>, structured:<r> (default 2:4)")
    p.add_argument("--method", default="obs-diff", choices=["obs-diff", "wanda", "magnitude"])
    p.add_argument("--samples", type=int_at_least(1), default=None, help="calibration prompts (default: the prune command's, 64)")
    p.add_argument("--calib-steps", type=int_at_least(1), default=None, help="calibration denoising steps (default: the model's sampling steps)")
    p.add_argument("--groups", type=int_at_least(1), default=4, help="module packages (default 4)")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "trt"],
                   help="benchmark backend: trt engines on a GPU host, ONNX Runtime otherwise (auto)")
    p.add_argument("--opt-level", type=int_range(0, 5), default=3, help="TensorRT builder optimisation level 0-5 (default 3)")
    p.add_argument("--no-engines", action="store_true", help="skip the TensorRT / TensorRT-RTX engine builds")
    p.add_argument("--runs", type=int_at_least(1), default=10, help="timed benchmark runs (default 10)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads for PyTorch and ONNX Runtime in the benchmark (default: PyTorch's)")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed warm-up runs (default 2)")
    p.add_argument("--bench-steps", type=int_at_least(1), default=None, help="denoising steps of the timed runs (default: the model's)")
    p.add_argument("--no-quality", action="store_true", help="skip the quality evaluation of each variant")
    p.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager column")
    p.add_argument("--only-bench", action="store_true", help="rerun only the benchmark (stages 1-2 must be complete)")
    p.add_argument("--triton", metavar="DIR", default=None, help="also write a Triton model repository to DIR")
    p.add_argument("--artifacts", default=None, help="artifact root (default <repo>/artifacts)")
    p.set_defaults(func=run)


class _StageParser(ArgumentParser):
    """A stage's own parser inside ``make engine``: a bad value is a UserError naming the stage."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def parse_stage(name: str, argv: list[str]) -> argparse.Namespace:
    """Parse ``python -m pipeline <name> argv`` with that command's own parser (same options, same checks)."""
    module = importlib.import_module(f"pipeline.cmd_{name}")
    parser = _StageParser(prog=f"python -m pipeline {name}")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args([name, *argv])


def _run_stage(args: argparse.Namespace) -> None:
    status = int(args.func(args) or 0)
    if status:
        raise UserError(f"stage {args.command} failed with status {status}")


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime_ns if path.exists() else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class _Stage:
    """One stage of ``make engine``: its command's parsed arguments and what it records in the manifest."""

    name: str
    marker: Path  # present once the stage's output is complete
    argv: list[str]
    args: argparse.Namespace
    inputs: dict
    outputs: dict


def _validate_stage(st: _Stage) -> None:
    """The stage command's own checks that need no weights (each ``cmd_*`` module's ``validate``)."""
    module = importlib.import_module(f"pipeline.cmd_{st.args.command}")
    if st.args.command == "build":
        module.validate(st.args, check_onnx=False)
    else:
        module.validate(st.args)


def plan_stages(args, spec, sparsity, cfg, dense, cuda: bool, bench_backend: str) -> list[_Stage]:
    """Every stage that ``make engine`` will run, parsed and validated before the first one starts.

    A GPU host benchmarking TensorRT engines exports what the engines need (float16, every component) and
    nothing else; the float32 ONNX Runtime exports are for hosts without a GPU (and ``--backend ort``).
    """
    stages: list[_Stage] = []

    def add(name: str, marker: Path, command: str, argv: list[str], inputs: dict, outputs: dict) -> None:
        stages.append(_Stage(name, marker, [command, *argv], parse_stage(command, argv), inputs, outputs))

    fp16_components = "transformer" if not cuda else ",".join(c.name for c in spec.adapter.components)
    prune_argv = ["--model", args.model, "--sparsity", str(sparsity), "--method", args.method, "--groups", str(args.groups),
                  "--out", str(cfg.prune)]
    if args.samples:
        prune_argv += ["--samples", str(args.samples)]
    if args.calib_steps:
        prune_argv += ["--steps", str(args.calib_steps)]
    add("prune", cfg.prune / "plan.json", "prune", prune_argv, {"model": spec.source}, {"dir": str(cfg.prune)})
    for which, dirs, pruned in (("dense", dense, None), ("pruned", cfg, cfg.prune)):
        extra = ["--pruned", str(pruned)] if pruned else []
        if bench_backend == "ort":
            add(f"export_{which}", dirs.export / "export_report.json", "export",
                ["--model", args.model, "--out", str(dirs.export), "--precision", "fp32", *extra],
                {"pruned": str(pruned) if pruned else None}, {"dir": str(dirs.export)})
        if args.no_engines:
            continue
        add(f"export_{which}_fp16", dirs.export_fp16 / "export_report.json", "export",
            ["--model", args.model, "--out", str(dirs.export_fp16), "--precision", "fp16", "--components", fp16_components,
             "--parity-batches", "2", *extra],
            {"pruned": str(pruned) if pruned else None}, {"dir": str(dirs.export_fp16)})
        build_argv = ["--model", args.model, "--onnx-dir", str(dirs.export_fp16 / "onnx"), "--out", str(dirs.engines),
                      "--sparsity", str(sparsity) if pruned else "dense", "--opt-level", str(args.opt_level)]
        if args.triton and which == "pruned":
            build_argv += ["--triton", args.triton]
        add(f"engines_{which}", dirs.engines / "transformer", "build", build_argv,
            {"onnx": str(dirs.export_fp16 / "onnx")}, {"dir": str(dirs.engines)})
    for st in stages:
        _validate_stage(st)
    return stages


def run(args) -> int:
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
    cfg = config_dirs(spec, f"{sparsity.id}-{args.method}", base)
    dense = config_dirs(spec, "dense", base)
    cuda = _cuda()
    bench_backend = args.backend if args.backend != "auto" else ("trt" if cuda else "ort")
    if bench_backend == "trt" and not cuda:
        raise UserError("--backend trt runs TensorRT engines and needs a CUDA GPU, and none is visible; use --backend ort")
    # Everything is checked before the first stage starts: a bad option costs seconds, not a prune.
    if bench_backend == "trt" and args.no_engines:
        raise UserError("--no-engines leaves nothing for --backend trt to benchmark; use --backend ort")
    stages = [] if args.only_bench else plan_stages(args, spec, sparsity, cfg, dense, cuda, bench_backend)
    check_output(cfg.manifest, "file")
    for name in ("bench.json", "bench.md", "bench.png", "grid.png"):
        check_output(cfg.root / name, "file")
    if args.only_bench:
        for d in ((cfg.export_fp16, dense.export_fp16) if bench_backend == "trt" else (cfg.export, dense.export)):
            if not (d / "export_report.json").is_file():
                raise UserError(f"{d} is not complete; run `make engine MODEL={args.model} SPARSITY={sparsity}` first")
    manifest = Manifest(cfg.manifest, {"model": spec.id, "model_source": spec.source, "sparsity": str(sparsity), "method": args.method,
                                       "config_dir": str(cfg.root)})
    t_all = time.perf_counter()

    for st in stages:
        before = _mtime(st.marker)
        t0 = time.perf_counter()
        log.info("== %s ==", st.name)
        _run_stage(st.args)
        if not st.marker.exists():
            raise UserError(f"stage {st.name} finished without writing {st.marker}")
        reused = before is not None and _mtime(st.marker) == before
        manifest.record(st.name, inputs=st.inputs, settings={"argv": st.argv}, outputs=st.outputs,
                        seconds=time.perf_counter() - t0, reused=reused)
        log.info("%s: %s in %.1f s", st.name, "reused" if reused else "done", time.perf_counter() - t0)

    from benchmarks.e2e import run_e2e

    log.info("== bench (%s) ==", bench_backend)
    t0 = time.perf_counter()
    engines = {"dense": dense.engines, "pruned": cfg.engines} if bench_backend == "trt" else None
    exports = (dense.export_fp16, cfg.export_fp16) if bench_backend == "trt" else (dense.export, cfg.export)
    result = run_e2e(spec, *exports, cfg.root, runs=args.runs, warmup=args.warmup, backend=bench_backend,
                     provider="cuda" if (cuda and bench_backend == "ort") else "cpu", engines=engines, sparsity=sparsity, threads=args.threads,
                     steps=args.bench_steps, quality=not args.no_quality, eager=not args.no_eager)
    manifest.record("bench", inputs={"dense": str(exports[0]), "pruned": str(exports[1]), "engines": {k: str(v) for k, v in (engines or {}).items()}},
                    settings={"backend": bench_backend, "runs": args.runs, "warmup": args.warmup, "steps": args.bench_steps,
                              "quality": not args.no_quality, "eager": not args.no_eager},
                    outputs={"bench": str(cfg.bench)}, seconds=time.perf_counter() - t0, reused=False)
    manifest.data.update(total_seconds=round(time.perf_counter() - t_all, 1), speedup=result["speedup"])
    manifest.save()
    _summary(result, cfg, dense)
    print(cfg.root)
    return 0


def _summary(result: dict, cfg, dense) -> None:
    """A short human summary: latency, speedup, quality, sizes, engines."""
    lines = [f"{'variant':8} {'backend':34} {'median ms':>10} {'p90 ms':>9} {'accuracy':>9} {'FD':>8}"]
    for name in ("dense", "pruned", "eager"):
        r = result.get(name)
        if not r:
            continue
        q = r.get("quality") or {}
        acc = q.get("prompt_accuracy")
        fd = q.get("frechet_distance")
        acc_s = "-" if acc is None else f"{acc:.3f}"
        fd_s = "-" if fd is None else f"{fd:.2f}"
        lines.append(f"{name:8} {r['backend'][:34]:34} {r['latency_ms']['median']:10.1f} {r['latency_ms']['p90']:9.1f} {acc_s:>9} {fd_s:>8}")
    lines.append(f"speedup dense/pruned: {result['speedup']:.3f}x (transformer {result.get('speedup_transformer', float('nan')):.3f}x)")
    if result.get("note"):
        lines.append(result["note"])
    from runtime.tensorrt import manifest_summary

    for which, d in (("dense", dense), ("pruned", cfg)):
        for plan in sorted(d.engines.glob("*/engine_*.plan")) if d.engines.is_dir() else []:
            m = manifest_summary(plan)
            lines.append(f"engine {which}/{plan.parent.name}: {m['backend']}, {m['plan_mib']} MiB, sparse_weights={m['sparse_weights']}, "
                         f"N:M-eligible ONNX weights {m['onnx_nm_eligible']}, builder log: {m['log_eligible']} eligible / {m['log_sparse']} sparse")
    print("\n".join(lines))
