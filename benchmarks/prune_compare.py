"""OBS-Diff against Wanda and magnitude on one model, at several granularities.

For every (pattern, method) pair the transformer is pruned from the same dense weights with the same
calibration, then measured:

- ``output_rel_error``: transformer output error relative to dense, ``||F_p - F_d|| / ||F_d||`` summed over
  held-out prompts (not used for calibration, other seeds) and every timestep of their dense trajectories
  (the pruned transformer sees exactly the dense model's inputs, so this isolates the pruning error);
- ``prompt_accuracy`` / ``frechet_distance``: :func:`evaluation.metrics.evaluate` on the pruned pipeline;
- ``prune_seconds``: wall time of the whole pruning (calibration, solves, checkpoints, save);
- ``peak_rss_mib``: peak resident memory above the pre-pruning level, sampled at 20 Hz (CPU), or
  ``torch.cuda.max_memory_allocated`` on CUDA.

    python -m benchmarks.prune_compare [--model tiny-sd3] [--out artifacts/bench/prune_compare.json]

Writes the JSON and a Markdown table next to it (``.md``).
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import program
from common.errors import UserError
from common.memory import PeakMemory
from common.paths import REPO_ROOT
from families.registry import load_pipeline, resolve_model
from families.sampling import sample, transformer_calls

log = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "artifacts" / "bench" / "prune_compare.json"


def record_dense_trajectories(pipe, spec, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> list[tuple]:
    """Run the dense pipeline and keep every transformer call's inputs and output (CPU tensors)."""
    with transformer_calls(pipe.transformer, outputs=True, to_cpu=True) as calls:
        sample(pipe, spec, prompts, seeds, steps=steps, guidance=guidance, batch_size=len(prompts), output_type="latent")
    # every tensor the pipeline passed (SD3: latents, text, pooled, timestep; Flux also ids and guidance)
    return [({k: v for k, v in c.inputs.items() if isinstance(v, torch.Tensor)}, c.output) for c in calls]


def transformer_outputs(transformer, records: list[tuple]) -> list[torch.Tensor]:
    """``transformer``'s output (float32, CPU) on the inputs of each recorded call."""
    dev = next(transformer.parameters()).device
    dt = next(transformer.parameters()).dtype
    outs = []
    with torch.no_grad():
        for ins, _ in records:
            out = transformer(**{k: v.to(dev, dt if v.is_floating_point() else v.dtype) for k, v in ins.items()}, return_dict=False)[0]
            outs.append(out.float().cpu())
    return outs


def relative_error(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """``sqrt(sum ||out - ref||^2 / sum ||ref||^2)`` over paired tensors (one number for all the calls)."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    num = sum(float(((o.float() - r.float()) ** 2).sum()) for o, r in zip(outputs, references))
    den = sum(float((r.float() ** 2).sum()) for r in references)
    return (num / den) ** 0.5


def output_rel_error(transformer, records: list[tuple]) -> float:
    """``sqrt(sum ||F_p(x) - F_d(x)||^2 / sum ||F_d(x)||^2)`` over the recorded dense calls."""
    return relative_error(transformer_outputs(transformer, records), [ref for _, ref in records])


def markdown(bench: dict[str, Any]) -> str:
    s = bench["settings"]
    lines = [
        f"# Pruning comparison on `{bench['model']}`",
        "",
        f"Device: {bench['device']}. Calibration: {s['samples']} prompts x {s['steps']} steps, guidance {s['guidance']}, "
        f"{s['groups']} module packages, log-decrease timestep weights. Output error over {s['heldout_prompts']} held-out prompts x "
        f"{s['steps']} timesteps; quality from `evaluation.metrics.evaluate` with seeds {s['quality_seeds']}.",
        "",
        "| pattern | method | output rel. error | prompt accuracy | Fréchet distance | prune s | peak mem MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    d = bench.get("dense") or {}
    lines.append(f"| dense | - | 0 | {_f(d.get('prompt_accuracy'), 3)} | {_f(d.get('frechet_distance'), 2)} | - | - |")
    for r in bench["results"]:
        best = " **(lowest)**" if r.get("lowest_error") else ""
        lines.append(
            f"| {r['pattern']} | {r['method']} | {_f(r['output_rel_error'], 4)}{best} | {_f(r.get('prompt_accuracy'), 3)} | "
            f"{_f(r.get('frechet_distance'), 2)} | {_f(r['prune_seconds'], 1)} | {_f(r['peak_mem_mib'], 0)} |"
        )
    ok = bench["checks"]["obs_diff_lowest_error_at_every_pattern"]
    lines += ["", f"OBS-Diff has the lowest output error at every granularity: **{'yes' if ok else 'NO'}**."]
    return "\n".join(lines) + "\n"


def _f(v, nd):
    return "-" if v is None else f"{v:.{nd}f}"


def add_calibration_arguments(ap) -> None:
    """The options a pruning comparison shares: calibration, held-out set, quality seeds, threads, work directory."""
    ap.add_argument("--samples", type=int, default=16, help="calibration prompts (default 16)")
    ap.add_argument("--batch-size", type=int, default=8, help="calibration prompts per pipeline call (default 8)")
    ap.add_argument("--groups", type=int, default=4, help="module packages (default 4)")
    ap.add_argument("--heldout", type=int, default=6, help="held-out prompts for the output error (default 6)")
    ap.add_argument("--quality-seeds", default="0,1,2", help="seeds for evaluation.metrics.evaluate; empty to skip").allow_empty = True
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1: steadiest on a shared 2-core box)")
    ap.add_argument("--work", default=None, help="directory for the pruned checkpoints (default: a temporary one)")


def main(argv: list[str] | None = None) -> int:
    ap = program.parser("prune_compare", __doc__)
    ap.add_argument("--model", default="tiny-sd3")
    ap.add_argument("--patterns", default="2:4,unstructured:0.5,structured:0.3")
    ap.add_argument("--methods", default="obs-diff,wanda,magnitude")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps for calibration and held-out error (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance for calibration and held-out error (default: the model's)")
    add_calibration_arguments(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path; the Markdown table goes next to it (.md)")
    return program.run(ap, argv, run)


def run(args) -> int:
    from obsdiff.packages import CalibrationConfig, PruneConfig, calibration_prompts, prune, read_prompts
    from obsdiff.patterns import parse_sparsity

    program.check_out(args.out)
    try:
        quality_seeds = tuple(int(s) for s in program.split_list(args.quality_seeds))
    except ValueError:
        raise UserError(f"--quality-seeds {args.quality_seeds!r}: give comma-separated integers, or nothing to skip") from None
    program.set_threads(args.threads)
    device = program.resolve_device(args.device)
    spec = resolve_model(args.model)
    steps = args.steps or spec.steps
    guidance = spec.guidance if args.guidance is None else args.guidance
    pipe = load_pipeline(spec).to(device)
    dense_state = copy.deepcopy(pipe.transformer.state_dict())

    prompt_file = REPO_ROOT / spec.prompts
    all_prompts = read_prompts(prompt_file)
    heldout = all_prompts[-args.heldout :]
    calib_pool = all_prompts[: len(all_prompts) - args.heldout]
    prompts = calibration_prompts(calib_pool, args.samples)
    calib = CalibrationConfig(
        samples=args.samples, steps=steps, guidance=guidance, height=spec.height, width=spec.width,
        batch_size=args.batch_size, seed=0, max_sequence_length=spec.max_sequence_length,
    )

    def quality() -> dict[str, Any] | None:
        if not quality_seeds:
            return None
        from evaluation.metrics import evaluate

        q = evaluate(pipe, spec, seeds=quality_seeds)
        return {k: q.get(k) for k in ("prompt_accuracy", "frechet_distance", "n_images", "eval_seconds")}

    log.info("recording dense trajectories of %d held-out prompts", len(heldout))
    records = record_dense_trajectories(pipe, spec, heldout, [1000 + i for i in range(len(heldout))], steps, guidance)
    dense_quality = quality()

    work_ctx = tempfile.TemporaryDirectory(prefix="prune_compare.") if args.work is None else None
    work = Path(args.work or work_ctx.name)
    results = []
    try:
        for pattern in program.split_list(args.patterns):
            sparsity = parse_sparsity(pattern)
            for method in program.split_list(args.methods):
                pipe.transformer.load_state_dict(dense_state)
                config = PruneConfig(sparsity, method=method, groups=args.groups, calibration=calib, family=spec.family)
                out = work / f"{sparsity.id}-{method}"
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                with PeakMemory(interval_s=0.05) as mem:
                    prune(pipe, spec.id, prompts, config, out, progress=False)
                seconds = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else mem.rise_mib
                err = output_rel_error(pipe.transformer, records)
                q = quality() or {}
                log.info("%s %s: output rel. error %.4f, %.1f s, accuracy %s", pattern, method, err, seconds, q.get("prompt_accuracy"))
                results.append(
                    {"pattern": str(sparsity), "method": method, "output_rel_error": err, "prune_seconds": seconds, "peak_mem_mib": peak, **q}
                )
    finally:
        pipe.transformer.load_state_dict(dense_state)
        if work_ctx is not None:
            work_ctx.cleanup()

    lowest_everywhere = True
    for pattern in dict.fromkeys(r["pattern"] for r in results):
        rows = [r for r in results if r["pattern"] == pattern]
        best = min(rows, key=lambda r: r["output_rel_error"])
        for r in rows:
            r["lowest_error"] = r is best
        if best["method"] != "obs-diff" and any(r["method"] == "obs-diff" for r in rows):
            lowest_everywhere = False
    bench = {
        "benchmark": "prune_compare",
        "model": spec.id,
        **program.environment(device, ("torch", "diffusers")),
        "settings": {
            "samples": args.samples, "steps": steps, "guidance": guidance, "batch_size": args.batch_size, "groups": args.groups,
            "heldout_prompts": len(heldout), "heldout_calls": len(records), "quality_seeds": list(quality_seeds),
            "calibration_prompts_file": str(prompt_file.relative_to(REPO_ROOT)),
        },
        "dense": dense_quality,
        "results": results,
        "checks": {"obs_diff_lowest_error_at_every_pattern": lowest_everywhere},
    }
    program.write(args.out, bench, markdown(bench), echo=True)
    return 0 if lowest_everywhere else 1


if __name__ == "__main__":
    sys.exit(main())
