"""Per-call latency of one exported component on the CPU runtimes: ONNX Runtime and OpenVINO (f32 and bf16 precision
hints), each variant in a process of its own, the rounds interleaved, with each output's error against the first
variant's.

    python -m benchmarks.cpu_runtimes --export fp32=artifacts/.../export --export int8=artifacts/.../export-int8 \\
        --runtimes ort,openvino:f32,openvino:bf16 --threads 2 --out artifacts/bench/cpu_runtimes.json

Variants are every ``--export`` (stage 2's output directory, named) on every runtime of ``--runtimes``: ``ort``
(:class:`runtime.ort.OrtModel`, the project's session options) or ``openvino:<hint>`` (:class:`runtime.openvino.session.OvModel`,
hint ``auto``/``f32``/``bf16``), its inputs made static to the resolution as ``build --backend openvino`` compiles them, or
``openvino:<hint>:dynamic`` with the exported shapes; ``nncf-int8:<hint>`` and ``nncf-int4:<hint>`` are NNCF's own
INT8 post-training quantization (calibrated on ``--calib`` random inputs) and INT4 weight compression of the ONNX
(:mod:`runtime.openvino.nncf_peers`), the peers of the project's exports. The first variant is the reference (ONNX
Runtime on the first export, as a rule).

Each variant runs in a worker process of its own (``--worker``, driven over its standard input): OpenVINO's TBB threads
wait busily after each call, and a runtime timed beside another in one process disturbs it. The workers load their
model and exit within their round, so one model is in memory at a time (an SD3-medium-width variant holds 1-3 GiB):
each round starts every variant's worker in turn, in an order that rotates every round, ``--pause`` seconds after the
previous one exited, and times ``--calls`` calls after ``--warmup`` untimed ones (the first call compiles kernels). Inputs: the
component's inputs at the export's first served resolution (or ``--resolution``) and its optimal batch, random
normal (the timestep uniform in [0, 1000)), one seed for every variant. Reported per variant: median and p90 latency,
the median over rounds of its round median over the reference's in the same round, and its output's error against the
reference's (max |diff| / max |ref|, and RMS relative). Writes JSON and Markdown (``--out``; the Markdown beside it).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import program
from common.errors import UserError

log = logging.getLogger(__name__)

MARK = "@@ "  # a worker's replies on its stdout start with this; anything else a library prints there is skipped


@dataclass(frozen=True)
class Variant:
    """One export on one runtime: ``label`` (``"int8 openvino bf16"``), the ONNX, ``runtime`` (``ort``/``openvino``), and
    for OpenVINO the precision hint and whether the inputs are made static."""

    label: str
    onnx: Path
    runtime: str
    hint: str | None = None
    static: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "onnx": str(self.onnx), "runtime": self.runtime, "hint": self.hint, "static": self.static}


OV_RUNTIMES = ("openvino", "nncf-int8", "nncf-int4")  # the ONNX as it is; NNCF's INT8 quantization or INT4 weights of it


def parse_runtime(text: str) -> tuple[str, str | None, bool]:
    """``ort`` | ``<openvino|nncf-int8|nncf-int4>:<hint>[:dynamic]`` -> ``(runtime, hint, static)``."""
    from runtime.openvino.precision import HINTS

    parts = text.strip().split(":")
    if parts == ["ort"]:
        return "ort", None, True
    if parts[0] in OV_RUNTIMES and 2 <= len(parts) <= 3 and parts[1] in HINTS and parts[2:] in ([], ["dynamic"]):
        return parts[0], parts[1], len(parts) == 2
    raise UserError(f"--runtimes: {text!r} is not a runtime; use ort or <{'|'.join(OV_RUNTIMES)}>:<{'|'.join(HINTS)}>[:dynamic]")


def variants_of(exports: list[tuple[str, Path]], runtimes: list[str], component: str) -> list[Variant]:
    out = []
    for name, export in exports:
        onnx = export / "onnx" / f"{component}.onnx"
        if not onnx.is_file():
            raise UserError(f"--export {name}={export}: no {onnx}; give stage 2's output directory (it holds onnx/)")
        for rt in runtimes:
            runtime, hint, static = parse_runtime(rt)
            label = " ".join([name, runtime, *([hint] if hint else []), *([] if static else ["dynamic"])])
            out.append(Variant(label, onnx, runtime, hint, static))
    return out


def input_shapes(export: Path, component: str, resolution: str | None) -> tuple[str, dict[str, list[int]], dict[str, list[int]]]:
    """``(resolution label, {input: shape at the optimal batch}, {input: static shape for OpenVINO})`` from the export
    report's profiles of ``component``."""
    from common.io import read_json
    from runtime.openvino.build import static_shapes

    report = read_json(export / "export_report.json", what="export report")
    per = (((report.get("components") or {}).get(component) or {}).get("profiles") or {}).get("per_resolution")
    if not per:
        raise UserError(f"{export}/export_report.json has no served shapes for {component}; time a component whose shapes follow the resolution")
    label = resolution or next(iter(per))
    if label not in per:
        raise UserError(f"--resolution {label}: {export} serves {', '.join(per)}")
    return label, {n: list(p[1]) for n, p in per[label].items()}, static_shapes(per[label])


def make_feeds(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.uniform(0, 1000, s) if n == "timestep" else rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}


# ------------------------------------------------------------------------------------------- the worker


def worker() -> int:
    """A variant's process: ``load`` once, then ``run`` (timed call), ``save`` (last output to a file), ``quit``."""
    model = feeds = out = None
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "load":
            t0 = time.perf_counter()
            feeds = dict(np.load(req["feeds"]))
            if req["runtime"] == "ort":
                from runtime.ort import OrtModel

                model = OrtModel(req["onnx"], intra_op_threads=req["threads"])
                what = {"session": model.providers[0]}
            else:
                model = _openvino_model(req, feeds)
                what = {"precision": model.precision, "hint_why": model.hint.why}
            reply = {"load_s": time.perf_counter() - t0, **what}
        elif cmd == "run":
            t0 = time.perf_counter()
            out = model(feeds)
            reply = {"ms": (time.perf_counter() - t0) * 1000}
        elif cmd == "save":
            np.save(req["path"], next(iter(out.values())).numpy())
            reply = {}
        else:
            return 0
        sys.stdout.write(MARK + json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


def _openvino_model(req: dict[str, Any], feeds: dict[str, np.ndarray]):
    """The worker's OpenVINO model: the ONNX as it is, or NNCF's INT8 quantization (calibrated on ``--calib`` random
    inputs drawn like the timed ones, other seeds) or INT4 weights of it."""
    from runtime.openvino.precision import resolve_hint
    from runtime.openvino.session import OvModel, compile_model

    shapes = req["shapes"] if req["static"] else None
    if req["runtime"] == "openvino":
        return OvModel(req["onnx"], precision=req["hint"], threads=req["threads"], shapes=shapes)
    from runtime.openvino.nncf_peers import nncf_int4, nncf_int8

    hint = resolve_hint(req["hint"])
    if req["runtime"] == "nncf-int8":
        shape_of = {n: list(a.shape) for n, a in feeds.items()}
        model = nncf_int8(req["onnx"], [make_feeds(shape_of, seed=1000 + i) for i in range(req["calib"])], shapes=shapes)
    else:
        model = nncf_int4(req["onnx"], shapes=shapes)
    return OvModel(req["onnx"], compiled=compile_model(model, hint, req["threads"]), hint=hint, threads=req["threads"])


class Worker:
    """The parent's handle on one variant's process."""

    def __init__(self, variant: Variant, threads: int, feeds: Path, shapes: dict[str, list[int]], calib: int = 8):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cpu_runtimes", "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        self.variant = variant
        self.info = self.ask({"cmd": "load", "runtime": variant.runtime, "onnx": str(variant.onnx), "hint": variant.hint, "static": variant.static,
                              "shapes": shapes, "threads": threads, "feeds": str(feeds), "calib": calib})

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise UserError(f"the {self.variant.label} worker ended (status {self.proc.wait()}); its error is above")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------- the measurement


def measure(variants: list[Variant], feeds_file: Path, static: dict[str, list[int]], *, threads: int, rounds: int, calls: int, warmup: int,
            pause: float, calib: int = 8) -> dict[str, Any]:
    """Time ``variants`` interleaved, each in a worker of its own (see the module doc); returns the per-variant results
    and the errors of each output against the first variant's."""
    from export.parity import rel_error

    per_round: dict[str, list[float]] = {v.label: [] for v in variants}
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    info: dict[str, dict[str, Any]] = {}
    outputs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="cpu-runtimes-") as tmp:
        for r in range(rounds):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:  # one model in memory at a time; the order rotates every round
                time.sleep(pause)  # the previous worker's threads have exited
                w = Worker(v, threads, feeds_file, static, calib)
                try:
                    for _ in range(warmup):
                        w.ask({"cmd": "run"})
                    ms = [w.ask({"cmd": "run"})["ms"] for _ in range(calls)]
                    if v.label not in outputs:
                        path = Path(tmp) / f"{len(outputs)}.npy"
                        w.ask({"cmd": "save", "path": str(path)})
                        outputs[v.label] = np.load(path).astype(np.float64)
                finally:
                    w.close()
                info.setdefault(v.label, w.info)
                times[v.label] += ms
                per_round[v.label].append(statistics.median(ms))
                log.info("round %d/%d  %-28s %8.1f ms (load %.1f s)", r + 1, rounds, v.label, statistics.median(ms), w.info["load_s"])
    ref_label = variants[0].label
    ref = outputs[ref_label]
    rms = lambda a: float(np.sqrt(((a - ref) ** 2).mean() / max((ref**2).mean(), 1e-30)))  # noqa: E731
    rows = {}
    for v in variants:
        t = times[v.label]
        ratio = statistics.median(a / b for a, b in zip(per_round[v.label], per_round[ref_label]))  # same-round pairs
        rows[v.label] = {**v.to_json(), **info[v.label], "median_ms": statistics.median(t), "p90_ms": float(np.percentile(t, 90)),
                         "min_ms": min(t), "times_ms": t, "round_medians_ms": per_round[v.label], "vs_reference": ratio,
                         "max_rel_error": rel_error(outputs[v.label], ref), "rms_rel_error": rms(outputs[v.label])}
    return {"reference": ref_label, "variants": rows}


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"Per call, {result['component']} at {s['resolution']} (inputs {', '.join(f'{n} {v}' for n, v in s['shapes'].items())}), "
             f"{s['threads']} threads, {s['rounds']} rounds of {s['calls']} calls after {s['warmup']} warm-up, each variant in a process of its own, "
             f"interleaved; "
             f"{result['cpu']['model']} ({', '.join(result['cpu']['flags']) or 'no bf16/VNNI/AMX flags'}).", "",
             "| variant | runs as | median ms | p90 ms | vs reference (paired) | max rel. error | RMS rel. error |", "|---|---|---|---|---|---|---|"]
    for label, r in result["variants"].items():
        runs_as = r.get("session") or f"OpenVINO {r.get('precision')}" + ("" if r.get("static", True) else ", dynamic shapes")
        lines.append(f"| {label} | {runs_as} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['vs_reference']:.2f}x | {r['max_rel_error']:.1e} | {r['rms_rel_error']:.1e} |")
    lines += ["", f"Reference: {result['reference']}. ONNX Runtime {result['versions'].get('onnxruntime')}, OpenVINO {result['versions'].get('openvino')}."]
    return "\n".join(lines) + "\n"


def cpu_facts() -> dict[str, Any]:
    """The CPU's model name and the flags that decide bf16 and INT8 speed (from /proc/cpuinfo)."""
    from runtime.openvino.precision import cpu_flags

    name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "unknown") \
        if Path("/proc/cpuinfo").is_file() else "unknown"
    flags = sorted((cpu_flags() or set()) & {"avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni", "avx512_fp16"})
    return {"model": name, "flags": flags, "cores": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    from common.cli import float_range, int_at_least

    p = program.parser("cpu_runtimes", __doc__)
    p.add_argument("--worker", action="store_true", help="(internal) run as one variant's worker process")
    p.add_argument("--export", action="append", default=[], metavar="NAME=DIR", help="a stage-2 output directory and its name (repeat)")
    p.add_argument("--runtimes", default="ort,openvino:f32,openvino:bf16", help="comma-separated: ort, openvino:<auto|f32|bf16>[:dynamic]")
    p.add_argument("--component", default="transformer")
    p.add_argument("--resolution", default=None, help="the served resolution to time, e.g. 512x512 (default: the export's first)")
    p.add_argument("--threads", type=int_at_least(1), default=2)
    p.add_argument("--rounds", type=int_at_least(1), default=4, help="rounds; each loads every variant once (default 4)")
    p.add_argument("--calls", type=int_at_least(1), default=3, help="timed calls per variant and round (default 3)")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed calls per variant and round (default 2)")
    p.add_argument("--pause", type=float_range(0), default=1.0, help="seconds between workers (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", type=int_at_least(1), default=8, help="nncf-int8: random calibration inputs (default 8)")
    p.add_argument("--out", default="artifacts/bench/cpu_runtimes.json")

    def body(args) -> int:
        if args.worker:
            return worker()
        out = program.check_out(args.out)
        if not args.export:
            raise UserError("give at least one --export NAME=DIR")
        exports = []
        for text in args.export:
            name, eq, d = text.partition("=")
            if not eq or not name or not Path(d).is_dir():
                raise UserError(f"--export {text!r}: give NAME=DIR with DIR stage 2's output directory")
            exports.append((name, Path(d)))
        variants = variants_of(exports, program.split_list(args.runtimes), args.component)
        label, shapes, static = input_shapes(exports[0][1], args.component, args.resolution)
        with tempfile.TemporaryDirectory(prefix="cpu-runtimes-") as tmp:
            feeds_file = Path(tmp) / "feeds.npz"
            np.savez(feeds_file, **make_feeds(shapes, args.seed))
            measured = measure(variants, feeds_file, static, threads=args.threads, rounds=args.rounds, calls=args.calls, warmup=args.warmup,
                               pause=args.pause, calib=args.calib)
        result = {"component": args.component, **measured, "cpu": cpu_facts(),
                  "settings": {"resolution": label, "shapes": shapes, "threads": args.threads, "rounds": args.rounds, "calls": args.calls, "warmup": args.warmup,
                               "pause_s": args.pause, "seed": args.seed, "nncf_int8_calibration": f"{args.calib} random inputs", "exports": {n: str(d) for n, d in exports}},
                  **program.environment(libraries=("onnxruntime", "openvino", "numpy"))}
        program.write(out, result, to_markdown(result), echo=True)
        return 0

    return program.run(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
