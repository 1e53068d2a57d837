"""End-to-end benchmark: dense vs pruned pipeline, interleaved in one process (:func:`measure.e2e.run_e2e`).

    python -m benchmarks.e2e --model tiny-sd3 --sparsity 2:4 --dense DENSE_EXPORT --pruned PRUNED_EXPORT --out DIR

Writes ``bench.json``, ``bench.md``, ``bench.png`` and ``grid.png`` into ``--out``.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import program
from measure.e2e import run_e2e


def main(argv: list[str] | None = None) -> int:
    from common.cli import int_at_least
    from obsdiff.patterns import parse_sparsity
    from families.registry import resolve_model
    from runtime.openvino.precision import HINTS as OV_HINTS

    p = program.parser("e2e", __doc__)
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--sparsity", default=None, help="the pruned plan's pattern (for the note)")
    p.add_argument("--dense", required=True, help="dense export dir (stage 2 output or its onnx/)")
    p.add_argument("--pruned", required=True, help="pruned export dir")
    p.add_argument("--out", required=True, help="directory for bench.json, bench.md, bench.png and grid.png")
    p.add_argument("--backend", default="ort", choices=["ort", "trt", "torch", "openvino"],
                   help="torch: the compact checkpoints on this GPU (runtime.torch_backend); openvino: the ONNX compiled by OpenVINO for this CPU")
    p.add_argument("--ov-precision", default="auto", choices=list(OV_HINTS),
                   help="--backend openvino: inference precision (auto: bf16 where the CPU has avx512_bf16 or AMX, else f32)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dense-engines", default=None, help="engine directory (--backend openvino: a `build --backend openvino` directory)")
    p.add_argument("--pruned-engines", default=None)
    p.add_argument("--runs", type=int_at_least(1), default=10, help="timed runs (default 10)")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed warm-up runs (default 2)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="denoising steps (default: the model's)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads for PyTorch and ONNX Runtime (default: PyTorch's)")
    p.add_argument("--no-eager", action="store_true")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the weights per component and the one-image peak memory (docs/memory.md)")
    p.add_argument("--resolution", default=None, metavar="HxW[,HxW...]", help="image sizes to time, each every round (default: the model's)")
    p.add_argument("--correction", default=None, metavar="FILE", help="Q-Sched scheduler correction (runtime.qsched JSON) for the pruned variant")
    from runtime.torch_backend import add_torch_arguments, torch_settings_from_args

    add_torch_arguments(p)
    p.add_argument("--no-sparse-kernels", action="store_true", help="--backend torch: run the 2:4 weights as dense GEMMs")
    p.add_argument("--also-torch", action="store_true", help="--backend trt: time the same exports on the torch backend too, interleaved")

    def body(args) -> int:
        from families.shapes import parse_resolutions

        if args.also_torch and args.backend != "trt":
            p.error("--also-torch puts the torch backend next to TensorRT engines: add --backend trt")
        engines = {k: v for k, v in (("dense", args.dense_engines), ("pruned", args.pruned_engines)) if v}
        resolutions = parse_resolutions(args.resolution) if args.resolution else None
        res = run_e2e(resolve_model(args.model), args.dense, args.pruned, args.out, runs=args.runs, warmup=args.warmup, backend=args.backend,
                      provider=args.provider, engines=engines or None, sparsity=parse_sparsity(args.sparsity) if args.sparsity else None,
                      eager=not args.no_eager, quality=not args.no_quality, steps=args.steps, threads=args.threads, resolutions=resolutions,
                      correction=args.correction, memory=not args.no_memory, ov_precision=args.ov_precision,
                      torch_settings=torch_settings_from_args(args, sparse_kernels=not args.no_sparse_kernels)
                      if args.backend == "torch" or args.also_torch else None)
        print(f"speedup {res['speedup']:.3f}x -> {Path(args.out) / 'bench.json'}")
        return 0

    return program.run(p, argv, body)


if __name__ == "__main__":
    raise SystemExit(main())
