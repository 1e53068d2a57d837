"""The peak memory of generating one image, measured in a fresh process: :func:`generation_peak`.

The process imports the libraries, loads the served pipeline (:func:`runtime.pipeline_runner.runner_pipeline`
over an export's ONNX files or a build's engines, which never loads the PyTorch weights of the components it
replaces; or, with ``backend="pytorch"``, the dense model as the registry loads it) and generates one image at
one served shape. Its resident set size is read at each phase; the peaks come from the kernel's high-water mark
(``VmHWM``, started over between the phases), so no short peak is missed. On a CUDA device the memory in use on
it is sampled too. What each figure means: ``docs/memory.md``.

``python -m runtime.generation_memory --model M --onnx-dir D ...`` is the child; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

BACKENDS = ("ort", "trt", "pytorch")
DEFAULT_PROMPT = "a handwritten digit 7"  # memory does not depend on the words: every prompt is padded to the same tokens


def _model_arg(spec) -> str:
    """What the child's ``--model`` resolves back to ``spec``: its registry id, else its directory."""
    from families.registry import MODELS

    return spec.id if spec.id in MODELS else str(spec.source)


def generation_peak(spec, *, backend: str = "ort", onnx_dir: str | os.PathLike | None = None, engine_dir: str | os.PathLike | None = None,
                    provider: str = "cpu", height: int | None = None, width: int | None = None, steps: int | None = None,
                    threads: int | None = None, prompt: str = DEFAULT_PROMPT, timeout: float | None = None) -> dict[str, Any]:
    """Generate one image of ``spec`` at ``height`` x ``width`` pixels (default: the model's) in a fresh process
    and return its memory, in bytes:

    ``baseline_rss_bytes`` (after importing torch, diffusers and ONNX Runtime), ``loaded_rss_bytes`` (the pipeline
    loaded), ``load_peak_rss_bytes``, ``generate_peak_rss_bytes`` (while the image is generated), ``peak_rss_bytes``
    (the process's highest: what the machine must hold), ``peak_above_baseline_bytes``; with CUDA,
    ``cuda_peak_bytes`` and ``cuda_baseline_bytes`` (memory in use on the device, all processes, sampled every 5 ms).
    Also the settings: backend, height, width, steps, batch 1.

    backend: ``ort`` (``onnx_dir``), ``trt`` (``engine_dir``, checked against ``onnx_dir`` when given) or
    ``pytorch`` (the dense model, every component in PyTorch as the registry loads it). steps: default the
    model's. Raises :class:`RuntimeError` when the process fails (killed for memory, a bad input).
    """
    from common.memory import run_child_json

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose from {', '.join(BACKENDS)}")
    args = ["--model", _model_arg(spec), "--backend", backend, "--provider", provider, "--prompt", prompt]
    for flag, value in (("--onnx-dir", onnx_dir), ("--engine-dir", engine_dir), ("--height", height), ("--width", width), ("--steps", steps),
                        ("--threads", threads)):
        if value is not None:
            args += [flag, str(value)]
    return run_child_json("runtime.generation_memory", args, timeout=timeout, what=f"one-image memory measurement ({backend})")


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`generation_peak`'s body, in the fresh process."""
    import diffusers
    import onnxruntime  # noqa: F401  (imported now: the libraries are the baseline)
    import torch

    from common.memory import PeakMemory, hwm_bytes, reset_peak_rss, rss_bytes
    from families.registry import load_pipeline, quiet_libraries, resolve_model
    from runtime.pipeline_runner import generate, runner_pipeline

    spec = resolve_model(args.model)
    quiet_libraries()
    getattr(diffusers, spec.pipeline_class)  # diffusers imports a pipeline's modules on first use
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.backend == "trt" or args.provider == "cuda"
    height, width = args.height or spec.height, args.width or spec.width
    steps = args.steps or spec.steps
    imports_peak, baseline = hwm_bytes(), rss_bytes()
    reset = reset_peak_rss()
    with PeakMemory(cuda=cuda) as device_mem:
        if args.backend == "pytorch":
            pipe = load_pipeline(spec).to("cuda" if cuda else "cpu")
        else:
            pipe = runner_pipeline(spec, backend=args.backend, onnx_dir=args.onnx_dir, engine_dir=args.engine_dir, provider=args.provider,
                                   threads=args.threads or 0)
        loaded, load_peak = rss_bytes(), hwm_bytes()
        reset_peak_rss()
        generate(pipe, spec, args.prompt, seed=0, steps=steps, output_type="np", height=height, width=width)
        if cuda:
            torch.cuda.synchronize()
    gen_peak = hwm_bytes()
    peak = max(imports_peak, load_peak, gen_peak)
    out = {"backend": args.backend, "height": height, "width": width, "steps": steps, "batch": 1,
           "baseline_rss_bytes": baseline, "loaded_rss_bytes": loaded, "load_peak_rss_bytes": load_peak, "generate_peak_rss_bytes": gen_peak,
           "peak_rss_bytes": peak, "peak_above_baseline_bytes": peak - baseline,
           "peaks_per_phase": reset}  # False: the kernel would not start VmHWM over, each phase's peak includes the earlier ones
    if cuda:
        out.update(cuda_baseline_bytes=device_mem.start, cuda_peak_bytes=device_mem.peak)
    return out


def main(argv: list[str] | None = None) -> int:
    from common.cli import ArgumentParser, run_command, setup_logging

    p = ArgumentParser(prog="python -m runtime.generation_memory", description="memory of generating one image (one JSON line)")
    p.add_argument("--model", required=True)
    p.add_argument("--backend", choices=BACKENDS, default="ort")
    p.add_argument("--onnx-dir", default=None)
    p.add_argument("--engine-dir", default=None)
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    args = p.parse_args(argv)
    setup_logging()

    def body() -> int:
        sys.stdout.write(json.dumps(_measure(args)) + "\n")
        return 0

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
