"""``python -m pipeline build``: TensorRT / TensorRT-RTX engines from stage 2's ONNX (+ optional Triton repository).

Example::

    python -m pipeline build --onnx-dir artifacts/tiny-sd3/2-4/export/onnx --sparsity 2:4 --model tiny-sd3

writes ``<onnx-dir>/../engines/<component>/engine_<backend><version>.plan`` with manifests, reusing engines
whose ONNX and options are unchanged, and prints the engine directory as its last line. ``--backend openvino``
compiles the components for this CPU instead (``<onnx-dir>/../openvino/<component>/<resolution>/``, at
``--ov-precision``: :mod:`runtime.openvino.build`). The stage itself is
:func:`runtime.stage.run_build`; this command parses its options into :class:`runtime.stage.BuildSettings`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import cc_list, int_at_least, int_range


def add_parser(sub) -> None:
    from runtime.openvino.precision import HINTS as OV_HINTS
    from runtime.stage import BACKENDS, TRITON_KINDS
    from runtime.torch_backend import add_torch_arguments

    p = sub.add_parser("build", help="build TensorRT/TensorRT-RTX engines from exported ONNX", description=__doc__.splitlines()[0])
    p.add_argument("--onnx-dir", required=True, help="stage 2's onnx/ directory (<component>.onnx files)")
    p.add_argument("--out", default=None, help="engine directory (default: <onnx-dir>/../engines; --backend openvino: <onnx-dir>/../openvino)")
    p.add_argument("--model", default="tiny-sd3", help="registry id or diffusers directory: gives the profile's batch range")
    p.add_argument("--sparsity", default=None, help="pattern of the pruned transformer (2:4 and 4:8 turn on SPARSE_WEIGHTS; "
                   "default: the export's, from its export_report.json, else dense)")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="auto: TensorRT on a GPU host, else TensorRT-RTX; openvino: compiled by OpenVINO for this CPU")
    p.add_argument("--ov-precision", default="auto", choices=list(OV_HINTS),
                   help="--backend openvino: inference precision (auto: bf16 where the CPU has avx512_bf16 or AMX, else f32)")
    p.add_argument("--components", default=None, help="comma-separated subset (default: every exported component)")
    p.add_argument("--opt-level", type=int_range(0, 5), default=3, help="builder optimisation level 0-5 (default 3)")
    p.add_argument("--timing-cache", default=None, help="timing cache file reused between builds (default <out>/timing.cache)")
    p.add_argument("--target-cc", type=cc_list, default=None, help="TensorRT-RTX target compute capabilities, e.g. 8.6,8.9 (default: this GPU, or 8.0,8.6,8.9,12.0)")
    p.add_argument("--workspace-mib", type=int_at_least(1), default=None, help="builder workspace limit in MiB")
    p.add_argument("--no-sparse-weights", action="store_true", help="do not set SPARSE_WEIGHTS even for N:M patterns")
    p.add_argument("--force", action="store_true", help="rebuild even when an engine is current")
    p.add_argument("--triton", default=None, metavar="DIR", help="also write a Triton model repository here")
    p.add_argument("--static-shapes", action="store_true", help="one static engine per resolution the export serves (usually faster) "
                   "instead of one profile covering them (the resolutions and batch range come from the export: `export --resolution`)")
    p.add_argument("--triton-kind", default=None, choices=list(TRITON_KINDS),
                   help="Triton backend (default: tensorrt_plan for TensorRT engines, onnxruntime otherwise)")
    add_torch_arguments(p)  # --backend torch: the compact checkpoint on this GPU (--no-sparse-weights: 2:4 as dense GEMMs)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    """The parsed options as :class:`runtime.stage.BuildSettings` (values checked, the file system not yet)."""
    from families.registry import resolve_model
    from obsdiff.patterns import parse_sparsity
    from runtime.stage import BuildSettings
    from runtime.torch_backend import torch_settings_from_args

    onnx_dir = Path(args.onnx_dir)
    sparsity = parse_sparsity(args.sparsity if args.sparsity is not None else _export_sparsity(onnx_dir))
    spec = resolve_model(args.model)
    return BuildSettings(
        spec=spec,
        sparsity=sparsity,
        onnx_dir=onnx_dir,
        out=Path(args.out) if args.out else onnx_dir.parent / ("openvino" if args.backend == "openvino" else "engines"),
        backend=args.backend,
        components=tuple(c.strip() for c in args.components.split(",")) if args.components else None,
        opt_level=args.opt_level,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        target_cc=args.target_cc,
        workspace_mib=args.workspace_mib,
        sparse_weights=not args.no_sparse_weights,
        force=args.force,
        triton=Path(args.triton) if args.triton else None,
        triton_kind=args.triton_kind,
        static_shapes=args.static_shapes,
        torch_settings=torch_settings_from_args(args, sparse_kernels=not args.no_sparse_weights) if args.backend == "torch" else None,
        ov_precision=args.ov_precision,
    )


def _export_sparsity(onnx_dir: Path) -> str:
    """The pattern stage 2 recorded in the report beside ``onnx_dir`` ("dense" without one)."""
    from common.io import read_json

    report = onnx_dir.parent / "export_report.json"
    return str(read_json(report, what="export report").get("sparsity") or "dense") if report.is_file() else "dense"


def validate(args: argparse.Namespace, *, check_onnx: bool = True):
    """Every check of this command that needs no engine build; returns the :class:`BuildSettings`."""
    from runtime.stage import check_build

    settings = settings_from_args(args)
    check_build(settings, check_onnx=check_onnx)
    return settings


def run(args: argparse.Namespace) -> int:
    from runtime.stage import run_build

    settings = validate(args)
    run_build(settings)
    print(settings.out)
    return 0
