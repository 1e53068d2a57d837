"""``python -m pipeline build``: TensorRT / TensorRT-RTX engines from stage 2's ONNX (+ optional Triton repository).

Example::

    python -m pipeline build --onnx-dir artifacts/tiny-sd3/2-4/export/onnx --sparsity 2:4 --model tiny-sd3

writes ``<onnx-dir>/../engines/<component>/engine_<backend><version>.plan`` with manifests, reusing engines
whose ONNX and options are unchanged, and prints the engine directory as its last line.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.cli import cc_list, int_at_least, int_range
from common.errors import UserError
from common.io import check_output, created_dirs

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="build TensorRT/TensorRT-RTX engines from exported ONNX", description=__doc__.splitlines()[0])
    p.add_argument("--onnx-dir", required=True, help="stage 2's onnx/ directory (<component>.onnx files)")
    p.add_argument("--out", default=None, help="engine directory (default: <onnx-dir>/../engines)")
    p.add_argument("--model", default="tiny-sd3", help="registry id or diffusers directory: gives the profile's batch range")
    p.add_argument("--sparsity", default="dense", help="pattern of the pruned transformer (2:4 and 4:8 turn on SPARSE_WEIGHTS)")
    p.add_argument("--backend", default="auto", choices=["auto", "trt", "trtrtx"], help="auto: TensorRT on a GPU host, else TensorRT-RTX")
    p.add_argument("--components", default=None, help="comma-separated subset (default: every exported component)")
    p.add_argument("--opt-level", type=int_range(0, 5), default=3, help="builder optimisation level 0-5 (default 3)")
    p.add_argument("--timing-cache", default=None, help="timing cache file reused between builds (default <out>/timing.cache)")
    p.add_argument("--target-cc", type=cc_list, default=None, help="TensorRT-RTX target compute capabilities, e.g. 8.6,8.9 (default: this GPU, or 8.0,8.6,8.9,12.0)")
    p.add_argument("--workspace-mib", type=int_at_least(1), default=None, help="builder workspace limit in MiB")
    p.add_argument("--no-sparse-weights", action="store_true", help="do not set SPARSE_WEIGHTS even for N:M patterns")
    p.add_argument("--force", action="store_true", help="rebuild even when an engine is current")
    p.add_argument("--triton", default=None, metavar="DIR", help="also write a Triton model repository here")
    p.add_argument("--triton-kind", default=None, choices=["tensorrt_plan", "onnxruntime"],
                   help="Triton backend (default: tensorrt_plan for TensorRT engines, onnxruntime otherwise)")
    p.set_defaults(func=run)


def validate(args: argparse.Namespace, *, check_onnx: bool = True):
    """Every check of this command that needs no engine build: ``(spec, sparsity, onnx_dir, out)``.

    ``make engine`` calls it with ``check_onnx=False`` before any stage runs (the ONNX comes later).
    """
    from obsdiff.patterns import parse_sparsity
    from families.registry import resolve_model

    sparsity = parse_sparsity(args.sparsity)
    spec = resolve_model(args.model)
    onnx_dir = Path(args.onnx_dir)
    if check_onnx and not onnx_dir.is_dir():
        raise UserError(f"ONNX directory {onnx_dir} does not exist; run `python -m pipeline export` first")
    out = Path(args.out) if args.out else onnx_dir.parent / "engines"
    check_output(out, "parent")
    if args.timing_cache:
        check_output(args.timing_cache, "file", option="--timing-cache")
    if args.triton:
        check_output(args.triton, "parent", option="--triton")
        if args.triton_kind == "tensorrt_plan" and args.backend == "trtrtx":
            raise UserError("--triton-kind tensorrt_plan needs TensorRT engines (Triton cannot run TensorRT-RTX plans): "
                            "use --backend trt on a GPU host, or --triton-kind onnxruntime")
    return spec, sparsity, onnx_dir, out


def run(args: argparse.Namespace) -> int:
    from runtime.tensorrt import BuildOptions, build_engines, get_backend, manifest_summary

    spec, sparsity, onnx_dir, out = validate(args)
    sh = spec.shapes
    options = BuildOptions(
        batch=(sh.batch_min, sh.batch_opt, sh.batch_max),
        sparsity=str(sparsity),
        sparse_weights=False if args.no_sparse_weights else None,
        opt_level=args.opt_level,
        timing_cache=args.timing_cache or str(out / "timing.cache"),
        target_cc=args.target_cc,
        workspace_mib=args.workspace_mib,
    )
    backend = get_backend(args.backend)
    components = [c.strip() for c in args.components.split(",")] if args.components else None
    with created_dirs(out):  # a failed build leaves no engine directory that this run created
        plans = build_engines(onnx_dir, out, options, backend=backend, components=components, force=args.force)
    for comp, plan in plans.items():
        s = manifest_summary(plan)
        log.info("%-15s %s  %.2f MiB  sparsity %s  sparse_weights=%s  N:M-eligible ONNX weights %s  log: %s eligible / %s sparse",
                 comp, s["backend"], s["plan_mib"], s["sparsity"], s["sparse_weights"], s["onnx_nm_eligible"], s["log_eligible"], s["log_sparse"])
    if args.triton:
        from runtime.triton import write_model_repository

        kind = args.triton_kind or ("tensorrt_plan" if backend.name == "trt" else "onnxruntime")
        files = plans if kind == "tensorrt_plan" else {c: onnx_dir / f"{c}.onnx" for c in plans}
        write_model_repository(args.triton, files, kind=kind, batch=options.batch)
        log.info("Triton model repository (%s): %s", kind, args.triton)
    print(out)
    return 0
