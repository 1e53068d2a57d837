"""Load on a real Triton server: images per second and latency p50/p95/p99 against concurrency, per variant.

For each dynamic-batching setting (off, on) one ``tritonserver`` serves every variant (dense, 2:4,
structured 0.3 by default; each a ``pipeline`` model with its own component models, from the artifact store,
built when missing) bound to 127.0.0.1. At each concurrency the variants run one after the other in a
rotating order (side by side in one run), each with ``concurrency`` client threads sending gRPC requests
(distinct prompts and seeds) until ``--requests`` have been sent or ``--max-seconds`` have passed. A failed
good request is counted and reported (there should be none). Triton's own statistics give the mean batch each
model executed (what dynamic batching formed).

    python -m benchmarks.serve_load --model tiny-sd3 [--variants dense,2:4,structured:0.3] [--concurrency 1,2,4,8]
        [--batching off,on] [--instances 1] [--requests 16] [--max-seconds 20] [--out artifacts/tiny-sd3/serve-load]

Writes ``serve_load.json``, ``serve_load.md`` and ``serve_load.png`` (throughput and p99 against concurrency).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError

log = logging.getLogger(__name__)


def _prefix(label: str) -> str:
    return label.replace(":", "-").replace(".", "") + "_"


def _stats(client, model: str) -> tuple[int, int]:
    """(inference count, execution count) Triton recorded for ``model``."""
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def run_cell(url: str, model: str, *, concurrency: int, requests: int, max_seconds: float, steps: int | None, seed0: int) -> dict[str, Any]:
    """``requests`` requests (or ``max_seconds``) at ``concurrency``; latencies, throughput, failures."""
    from runtime.triton_client import grpc_client, pipeline_inputs, server_message

    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    failures: list[str] = []
    images: list[tuple[int, np.ndarray]] = []  # (prompted digit, image)
    deadline = time.perf_counter() + max_seconds
    extra = {"steps": steps} if steps else {}

    def worker() -> None:
        client = grpc_client(url)
        while True:
            with lock:
                if issued[0] >= requests or time.perf_counter() > deadline:
                    return
                i = issued[0]
                issued[0] += 1
            inputs = pipeline_inputs([f"a handwritten digit {i % 10}"], seed=seed0 + i, **extra)
            t0 = time.perf_counter()
            try:
                result = client.infer(model, inputs, client_timeout=600)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    images.append((i % 10, result.as_numpy("image")[0]))
            except Exception as e:  # noqa: BLE001 - every failure of a good request is reported
                with lock:
                    failures.append(server_message(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1e3
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: float("nan"))
    return {"concurrency": concurrency, "requests": issued[0], "ok": len(latencies), "failed": len(failures), "failures": failures[:3],
            "seconds": wall, "images_per_s": len(latencies) / wall if wall > 0 else 0.0,
            "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": float(ms.mean()) if len(ms) else float("nan")},
            "images": images}


def prompt_accuracy(images: list[tuple[int, np.ndarray]]) -> float | None:
    """Share of served images the digit classifier reads as the prompted digit (None without images)."""
    if not images:
        return None
    import torch

    from evaluation.classifier import load_classifier
    from evaluation.metrics import images_to_classifier_input

    x = images_to_classifier_input(np.stack([img for _, img in images]).astype(np.float32) / 255.0)
    with torch.no_grad():
        pred = load_classifier()(x).argmax(1).numpy()
    return float((pred == np.array([d for d, _ in images])).mean())


def run_load(model: str, variants: list[str], *, concurrency: list[int], batching: list[bool], instances: int, requests: int, max_seconds: float,
             steps: int | None, method: str, out: Path) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    from common.versions import device_info
    from pipeline.serving import prepare_variant, write_repository
    from runtime.triton_server import TritonServer

    prepared = {v: prepare_variant(model, v, method=method) for v in variants}
    cells = []
    served: dict[str, list] = {v: [] for v in variants}
    for dyn in batching:
        repo = out / ("repo-batching" if dyn else "repo-nobatching")
        write_repository(repo, {_prefix(v): p for v, p in prepared.items()}, dynamic_batching=dyn, instances=instances)
        with TritonServer(repo, log_file=out / f"server-{'batching' if dyn else 'nobatching'}.log") as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            for v in variants:  # warm-up: one request per variant
                run_cell(server.grpc_url, f"{_prefix(v)}pipeline", concurrency=1, requests=1, max_seconds=60, steps=steps, seed0=10_000)
            for ci, c in enumerate(concurrency):
                order = variants[ci % len(variants):] + variants[: ci % len(variants)]  # rotate who goes first
                for v in order:
                    names = [f"{_prefix(v)}pipeline", f"{_prefix(v)}transformer"]
                    before = {n: _stats(client, n) for n in names}
                    cell = run_cell(server.grpc_url, names[0], concurrency=c, requests=max(requests, 2 * c), max_seconds=max_seconds, steps=steps,
                                    seed0=1000 * ci)
                    after = {n: _stats(client, n) for n in names}
                    mean_batch = {}
                    for n, key in zip(names, ("pipeline", "transformer")):
                        di, de = after[n][0] - before[n][0], after[n][1] - before[n][1]
                        mean_batch[key] = di / de if de else None
                    cell.update(variant=v, dynamic_batching=dyn, mean_batch=mean_batch)
                    served[v].extend(cell.pop("images"))
                    log.info("%-16s batching %-3s c=%d: %.2f img/s, p50 %.0f ms, p99 %.0f ms, failed %d", v, "on" if dyn else "off", c,
                             cell["images_per_s"], cell["latency_ms"]["p50"], cell["latency_ms"]["p99"], cell["failed"])
                    cells.append(cell)
    spec = next(iter(prepared.values())).spec
    return {"benchmark": "serve_load", "model": spec.id, "method": method, "variants": variants, "instances": instances, "requests": requests,
            "max_seconds": max_seconds, "steps": steps or spec.steps, "resolution": list(next(iter(prepared.values())).limits.resolutions[0]),
            "transport": "gRPC, 127.0.0.1", "server": "tritonserver 2.51 (nvidia-pytriton), Python backend, ONNX Runtime CPU components",
            "device": {**device_info(False, modules=("torch", "diffusers", "onnxruntime")), "tritonclient": _version("tritonclient"),
                       "nvidia-pytriton": _version("nvidia-pytriton")}, "cells": cells,
            "failed_good_requests": sum(c["failed"] for c in cells),
            "prompt_accuracy": {v: prompt_accuracy(imgs) if prepared[v].spec.quality_metric == "digits" else None for v, imgs in served.items()},
            "images_classified": {v: len(imgs) for v, imgs in served.items()}}


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Serving under load: {result['model']} ({result['steps']} steps, {result['resolution'][0]}x{result['resolution'][1]} px)", "",
             f"{result['server']}; {result['transport']}; {result['instances']} pipeline instance(s); host: {result['device']['summary']}. "
             f"Each cell: up to {result['requests']} requests (at least 2 x concurrency) or {result['max_seconds']:g} s. "
             f"Failed good requests: {result['failed_good_requests']}. Prompt accuracy of the served images (digit classifier): "
             + ", ".join(f"{v} {a:.2f} ({result['images_classified'][v]} images)" for v, a in result["prompt_accuracy"].items() if a is not None) + ".", "",
             "| variant | batching | concurrency | images/s | p50 ms | p95 ms | p99 ms | requests | failed | mean batch (pipeline / transformer) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for c in sorted(result["cells"], key=lambda c: (c["dynamic_batching"], c["concurrency"], result["variants"].index(c["variant"]))):
        lat = c["latency_ms"]
        lines.append(f"| {c['variant']} | {'on' if c['dynamic_batching'] else 'off'} | {c['concurrency']} | {c['images_per_s']:.2f} | {lat['p50']:.0f} | "
                     f"{lat['p95']:.0f} | {lat['p99']:.0f} | {c['ok']} | {c['failed']} | {fmt(c['mean_batch']['pipeline'])} / "
                     f"{fmt(c['mean_batch']['transformer'])} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for v in result["variants"]:
        for dyn, style in ((False, "--"), (True, "-")):
            cs = sorted((c for c in result["cells"] if c["variant"] == v and c["dynamic_batching"] == dyn), key=lambda c: c["concurrency"])
            if not cs:
                continue
            x = [c["concurrency"] for c in cs]
            label = f"{v}, batching {'on' if dyn else 'off'}"
            ax1.plot(x, [c["images_per_s"] for c in cs], style, marker="o", label=label)
            ax2.plot(x, [c["latency_ms"]["p99"] for c in cs], style, marker="o", label=label)
    ax1.set(xlabel="concurrent clients", ylabel="images / s", title="throughput")
    ax2.set(xlabel="concurrent clients", ylabel="p99 latency (ms)", title="p99 latency")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(f"{result['model']} behind tritonserver ({result['device']['summary']})", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from benchmarks import program
    from common.cli import float_range, int_at_least

    p = program.parser("serve_load", __doc__)
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--variants", default="dense,2:4,structured:0.3", help="sparsities to serve side by side (default dense,2:4,structured:0.3)")
    p.add_argument("--method", default="obs-diff", choices=["obs-diff", "wanda", "magnitude"])
    p.add_argument("--concurrency", default="1,2,4,8", help="concurrent clients (default 1,2,4,8)")
    p.add_argument("--batching", default="off,on", help="dynamic batching settings to run: off, on or off,on (default)")
    p.add_argument("--instances", type=int_at_least(1), default=1, help="pipeline model instances (default 1)")
    p.add_argument("--requests", type=int_at_least(1), default=12, help="requests per cell, at least 2 x concurrency (default 12)")
    p.add_argument("--max-seconds", type=float_range(0.0, lo_open=True), default=20.0, help="time cap per cell (default 20)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="denoising steps per image (default: the model's)")
    p.add_argument("--out", default=None, help="output directory (default artifacts/<model>/serve-load)")

    def body(args) -> int:
        from obsdiff.patterns import parse_sparsity
        from pipeline.artifacts import ARTIFACTS

        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in variants:
            parse_sparsity(v)
        try:
            conc = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
        except ValueError:
            raise UserError(f"--concurrency: expected integers like 1,2,4,8, got {args.concurrency!r}") from None
        if not conc or min(conc) < 1:
            raise UserError(f"--concurrency: expected integers >= 1, got {args.concurrency!r}")
        modes = {"off": False, "on": True}
        bad = [b for b in args.batching.split(",") if b.strip() not in modes]
        if bad:
            raise UserError(f"--batching: expected off, on or off,on, got {args.batching!r}")
        out = Path(args.out) if args.out else ARTIFACTS / args.model / "serve-load"
        program.check_out(out / "serve_load.json")
        result = run_load(args.model, variants, concurrency=conc, batching=[modes[b.strip()] for b in args.batching.split(",")], instances=args.instances,
                          requests=args.requests, max_seconds=args.max_seconds, steps=args.steps, method=args.method, out=out)
        program.write(out / "serve_load.json", result, markdown(result), echo=True)
        plot(result, out / "serve_load.png")
        print(out)
        return 0 if result["failed_good_requests"] == 0 else 1

    return program.run(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
