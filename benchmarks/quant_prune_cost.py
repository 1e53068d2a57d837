"""What ``prune --weight-bits`` costs stage 1: wall time and peak memory of the same prune with and without it.

For each pattern, the prune runs ``--repeats`` times with and without ``--weight-bits`` (OBS, ``--group-size``),
interleaved (the order alternates between rounds), each in a fresh process of its own (:func:`common.memory.run_child_json`)
so that its memory is its own. Measured inside the child around :func:`obsdiff.stage.run_prune` (loading the
pipeline, calibration, solves, checkpoints):

- ``seconds``: wall time;
- ``peak_rss_mib``: the process's peak resident memory (``ru_maxrss``: libraries, pipeline, Hessians, solves);
- ``rise_mib``: that peak above the resident memory just before ``run_prune`` (the libraries imported and the
  settings checked: the import of the model classes is not timed).

Ratios are of medians, with / without. A dense prune without ``--weight-bits`` solves nothing, so dense + 4 bits is
compared with the float prune of the first other pattern measured (the same calibration and Hessians).

    python -m benchmarks.quant_prune_cost [--model tiny-sd3] [--patterns 2:4,structured:0.3,dense] [--repeats 3]
    python -m benchmarks.quant_prune_cost --model artifacts/fixtures/sd3m-2blocks --samples 2 --steps 4

Writes the JSON and a Markdown table next to it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import program
from common.errors import UserError
from common.paths import REPO_ROOT

log = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "artifacts" / "bench" / "quant_prune_cost.json"
GOAL_RATIO = 1.2


def run_one(settings: dict[str, Any]) -> dict[str, Any]:
    """The child's measurement: one prune (``settings``: model, sparsity, out, samples, steps, weight_bits,
    group_size, threads), timed and its memory read. Returns ``{"seconds", "peak_rss_mib", "rise_mib", "layers"}``."""
    from common.memory import peak_rss_bytes, rss_bytes
    from families.registry import resolve_model
    from obsdiff.patterns import parse_sparsity
    from obsdiff.stage import check_prune, prune_settings, run_prune

    program.set_threads(settings.get("threads"))
    spec = resolve_model(settings["model"])
    options = {k: settings[k] for k in ("samples", "steps", "weight_bits", "group_size") if settings.get(k) is not None}
    st = prune_settings(spec, parse_sparsity(settings["sparsity"]), settings["out"], device="cpu", progress=False, **options)
    check_prune(st)  # imports the model classes (tens of seconds on a busy 2-core box), outside the timed run
    before = rss_bytes()
    t0 = time.perf_counter()
    plan = run_prune(st)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"seconds": seconds, "peak_rss_mib": peak / 2**20, "rise_mib": (peak - before) / 2**20,
            "layers": len(plan.layers) if plan is not None else 0}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (and spread) of a variant's runs."""
    out: dict[str, Any] = {"runs": len(runs)}
    for key in ("seconds", "peak_rss_mib", "rise_mib"):
        values = [r[key] for r in runs]
        out[key] = statistics.median(values)
        out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    return out


def ratios(summary: dict[str, dict[str, Any]], patterns: list[str]) -> dict[str, dict[str, Any]]:
    """Per pattern: the quantized prune's medians over the float prune's (dense: over the first other pattern's)."""
    out = {}
    floats = [p for p in patterns if p != "dense" and f"{p} float" in summary]
    for p in patterns:
        q = summary.get(f"{p} w")
        ref_name = f"{p} float" if p != "dense" else (f"{floats[0]} float" if floats else None)
        ref = summary.get(ref_name) if ref_name else None
        if q is None or ref is None:
            continue
        r = {key: q[key] / ref[key] if ref[key] else None for key in ("seconds", "peak_rss_mib", "rise_mib")}
        out[p] = {"reference": ref_name, **r, "within_goal": all(v is not None and v <= GOAL_RATIO for v in (r["seconds"], r["peak_rss_mib"]))}
    return out


def markdown(bench: dict[str, Any]) -> str:
    s = bench["settings"]
    lines = [
        f"# Stage-1 cost of `--weight-bits {s['weight_bits']}` on `{bench['model']}`",
        "",
        f"Device: {bench['device']}. {s['samples']} calibration prompts x {s['steps'] or bench['model_steps']} steps, group {s['group_size']}, "
        f"{s['repeats']} interleaved rounds, each prune in its own process, torch threads {s['threads']}. Medians (min-max).",
        "",
        "| pattern | variant | seconds | peak RSS MiB | rise above imports MiB |",
        "|---|---|---|---|---|",
    ]
    for name, v in bench["summary"].items():
        pattern, variant = name.rsplit(" ", 1)
        label = "float" if variant == "float" else f"w{s['weight_bits']} obs"
        lines.append(f"| {pattern} | {label} | {v['seconds']:.1f} ({v['seconds_min']:.1f}-{v['seconds_max']:.1f}) | "
                     f"{v['peak_rss_mib']:.0f} ({v['peak_rss_mib_min']:.0f}-{v['peak_rss_mib_max']:.0f}) | "
                     f"{v['rise_mib']:.0f} ({v['rise_mib_min']:.0f}-{v['rise_mib_max']:.0f}) |")
    lines += ["", f"Ratios with / without (goal <= {GOAL_RATIO}x on time and peak RSS):", ""]
    for p, r in bench["ratios"].items():
        lines.append(f"- {p} (vs {r['reference']}): time {r['seconds']:.3f}x, peak RSS {r['peak_rss_mib']:.3f}x, rise "
                     f"{r['rise_mib']:.3f}x: **{'within' if r['within_goal'] else 'over'}**")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = program.parser("quant_prune_cost", __doc__)
    ap.add_argument("--model", default="tiny-sd3", help="registry id or diffusers directory (default tiny-sd3)")
    ap.add_argument("--patterns", default="2:4,structured:0.3,dense")
    ap.add_argument("--weight-bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8, help="calibration prompts (default 8)")
    ap.add_argument("--steps", type=int, default=None, help="calibration steps (default: the model's)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each prune (default 1)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one prune may take (default 1800)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path; the Markdown table goes next to it (.md)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # the settings of one measurement (JSON)
    return program.run(ap, argv, body)


def body(args) -> int:
    if args.child is not None:  # one measurement, in the process the parent started for it
        sys.stdout.write(json.dumps(run_one(json.loads(args.child))) + "\n")
        return 0
    from common.memory import run_child_json
    from families.registry import resolve_model
    from obsdiff.patterns import parse_sparsity
    from obsdiff.weight_quant import WeightQuant

    program.check_out(args.out)
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    WeightQuant(args.weight_bits, args.group_size)  # one line for a bad value, now
    patterns = [str(parse_sparsity(p)) for p in program.split_list(args.patterns)]
    spec = resolve_model(args.model)
    variants = [(p, v) for p in patterns for v in ("float", "w") if not (p == "dense" and v == "float")]
    runs: dict[str, list[dict]] = {f"{p} {v}": [] for p, v in variants}
    work = Path(tempfile.mkdtemp(prefix="quant_prune_cost."))
    try:
        for r in range(args.repeats):
            for p, v in variants if r % 2 == 0 else variants[::-1]:
                out = work / f"{r}-{p.replace(':', '_')}-{v}"
                settings = {"model": args.model, "sparsity": p, "out": str(out), "samples": args.samples, "steps": args.steps,
                            "threads": args.threads, "weight_bits": args.weight_bits if v == "w" else None,
                            "group_size": args.group_size if v == "w" else None}
                res = run_child_json("benchmarks.quant_prune_cost", ["--child", json.dumps(settings)], timeout=args.timeout,
                                     what=f"prune {p} {v}")
                shutil.rmtree(out, ignore_errors=True)
                runs[f"{p} {v}"].append(res)
                log.info("round %d, %s %s: %.1f s, peak RSS %.0f MiB (rise %.0f)", r + 1, p, v, res["seconds"], res["peak_rss_mib"], res["rise_mib"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {name: summarise(rs) for name, rs in runs.items()}
    bench = {
        "benchmark": "quant_prune_cost",
        "model": spec.id,
        "model_steps": spec.steps,
        **program.environment("cpu", ("torch", "diffusers")),
        "settings": {"patterns": patterns, "weight_bits": args.weight_bits, "group_size": args.group_size, "samples": args.samples,
                     "steps": args.steps, "repeats": args.repeats, "threads": args.threads},
        "runs": runs,
        "summary": summary,
        "ratios": ratios(summary, patterns),
    }
    program.write(args.out, bench, markdown(bench), echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
