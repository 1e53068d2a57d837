"""``make scale-check``: ``make engine`` on a real-size random-weight model, stage by stage, measured.

Builds (once) the scale fixture of a family (:mod:`scripts.make_scale_fixture`: the real transformer and VAE
configs with seeded random weights), then runs every stage that ``python -m pipeline engine`` runs for each
requested sparsity, with the same settings (they come from the engine's own stage plan,
:func:`pipeline.engine.plan_stages`), each in its own process so that its peak resident memory is its
own. Writes ``scale_check.json`` and ``scale_check.md``: per stage its wall time, peak RSS and output size,
and per configuration the parity errors, the 2:4 check, the engine builds and the benchmark.

    python -m benchmarks.scale_check --family sd3-medium --sparsity 2:4,structured:0.3

The calibration budget and benchmark are small on purpose (``--samples 2 --calib-steps 4``, 2 timed steps):
on a CPU the point is memory and time per stage at the real model size, not image quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import program
from common.errors import UserError
from common.paths import REPO_ROOT

log = logging.getLogger(__name__)



def _run(argv: list[str], log_file: Path) -> dict[str, Any]:
    """Run ``python -m <argv>`` in a child process; its wall time, exit status and peak RSS (``wait4``)."""
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "PYTHONPATH": str(REPO_ROOT)}
    t0 = time.perf_counter()
    with open(log_file, "ab") as fh:
        fh.write(f"\n$ python -m {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "status": proc.returncode}


def _run_stage(st, work: Path, log_file: Path) -> dict[str, Any]:
    """Run one planned ``make engine`` stage through its driver (:func:`pipeline.engine.run_stage`) in a
    child process of its own, so that its peak RSS is its own; the child reads the stage's typed settings
    from a pickle written here."""
    import pickle

    path = work / f".stage-{st.name}.pkl"
    path.write_bytes(pickle.dumps(st))
    try:
        return _run(["benchmarks.scale_check", "--run-stage", str(path)], log_file)
    finally:
        path.unlink(missing_ok=True)


def run_stage_file(path: str | os.PathLike) -> int:
    """The child side of :func:`_run_stage`: load the pickled stage and run it."""
    import pickle

    from pipeline.engine import run_stage

    st = pickle.loads(Path(path).read_bytes())
    log.info("stage %s: %s", st.name, st.settings.to_json())
    run_stage(st)
    return 0


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _weights_bytes(export_dir: Path) -> int | None:
    report = export_dir / "export_report.json"
    if not report.is_file():
        return None
    comps = json.loads(report.read_text()).get("components", {})
    return sum(c.get("bytes", 0) for c in comps.values()) or None


def _summarise_export(export_dir: Path) -> dict[str, Any]:
    report = export_dir / "export_report.json"
    if not report.is_file():
        return {}
    r = json.loads(report.read_text())
    tr = r.get("transformer", {})
    out = {
        "precision": r.get("precision"),
        "onnx_bytes": {k: c.get("bytes") for k, c in r.get("components", {}).items()},
        "parity": {k: (c.get("parity") or {}).get("max_rel_error") for k, c in r.get("components", {}).items()},
        "surgery_error": (r.get("surgery") or {}).get("max_rel_error"),
        "params_compact": (tr.get("params_compact") or {}).get("total") if isinstance(tr.get("params_compact"), dict) else tr.get("params_compact"),
        "flop_ratio": tr.get("flop_ratio"),
        "elapsed_s": r.get("elapsed_s"),
    }
    sc = tr.get("sparsity_check")
    if sc:
        out["nm_check"] = {k: sc.get(k) for k in ("pattern", "ok", "eligible_share", "n_nm", "n_weights") if k in sc}
    return out


def run(args) -> dict[str, Any]:
    from obsdiff.patterns import parse_sparsity
    from pipeline import engine
    from pipeline.artifacts import config_dirs
    from families.registry import resolve_model

    patterns = [parse_sparsity(p.strip()) for p in args.sparsity.split(",") if p.strip()]  # a bad pattern: one line, before any work
    if not patterns:
        raise UserError("--sparsity: give at least one pattern, e.g. 2:4,structured:0.3")
    fixture = Path(args.fixture or REPO_ROOT / "artifacts" / "fixtures" / args.family)
    out = Path(args.out or REPO_ROOT / "artifacts" / "scale" / args.family)
    art = Path(args.artifacts or out / "artifacts")
    program.check_out(out / "scale_check.json")
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "scale_check.log"
    stages: list[dict[str, Any]] = []
    if not (fixture / "model_index.json").is_file():
        log.info("building the %s fixture in %s", args.family, fixture)
        r = _run(["scripts.make_scale_fixture", "--family", args.family, "--out", str(fixture)], log_file)
        stages.append({"config": "-", "stage": "fixture", **r, "output_bytes": _du(fixture)})
        if r["status"]:
            raise UserError(f"building the fixture failed; see {log_file}")
    spec = resolve_model(str(fixture))
    fixture_info = json.loads((fixture / "fixture.json").read_text()) if (fixture / "fixture.json").is_file() else {}
    _check_disk(art, fixture_info.get("transformer_parameters", 0), len([p for p in args.sparsity.split(",") if p.strip()]))
    configs: dict[str, Any] = {}
    for sparsity in patterns:
        engine_argv = ["--model", str(fixture), "--sparsity", str(sparsity), "--artifacts", str(art), "--samples", str(args.samples),
                       "--calib-steps", str(args.calib_steps), "--runs", str(args.runs), "--warmup", "0", "--bench-steps", str(args.bench_steps),
                       "--no-quality", "--no-eager", "--threads", str(args.threads)]
        if args.no_engines:
            engine_argv.append("--no-engines")
        eargs = engine.parse_args(engine_argv)
        cfg = config_dirs(spec, f"{sparsity.id}-{eargs.method}", art)
        dense = config_dirs(spec, "dense", art)
        plan = engine.plan_stages(eargs, spec, sparsity, cfg, dense, cuda=False, bench_backend="ort")
        for st in plan:
            log.info("[%s] %s", sparsity, st.name)
            r = _run_stage(st, out, log_file)
            out_dir = Path(st.outputs["dir"])
            row = {"config": str(sparsity), "stage": st.name, **r, "output_bytes": _du(out_dir)}
            wb = _weights_bytes(out_dir) if st.name.startswith("export_") else None
            if wb:  # the bound the export promises: 1.5 x the exported weight bytes + 2 GiB
                row.update(weights_gib=round(wb / 2**30, 2), rss_bound_gib=round((1.5 * wb + 2 * 2**30) / 2**30, 2))
            stages.append(row)
            log.info("[%s] %s: %.0f s, peak RSS %.2f GiB, exit %d", sparsity, st.name, r["seconds"], r["peak_rss_gib"], r["status"])
            if r["status"]:
                raise UserError(f"stage {st.name} of {sparsity} failed (exit {r['status']}); see {log_file}")
        r = _run(["pipeline", "engine", *engine_argv, "--only-bench"], log_file)
        stages.append({"config": str(sparsity), "stage": "bench", **r, "output_bytes": _du(cfg.bench)})
        if r["status"]:
            raise UserError(f"the benchmark of {sparsity} failed; see {log_file}")
        bench = json.loads(cfg.bench.read_text())
        configs[str(sparsity)] = {
            "export_fp32": _summarise_export(cfg.export),
            "export_fp16": _summarise_export(cfg.export_fp16),
            "dense_export_fp16": _summarise_export(dense.export_fp16),
            "engines": _engine_summary(cfg.engines),
            "dense_engines": _engine_summary(dense.engines),
            "bench": {k: bench.get(k) for k in ("speedup", "speedup_transformer", "note")}
            | {v: {"median_ms": bench[v]["latency_ms"]["median"], "transformer_step_ms": bench[v].get("transformer_step_ms")} for v in ("dense", "pruned") if v in bench},
        }
    result = {
        "family": args.family,
        "fixture": fixture_info,
        **program.environment("cpu", ("torch", "diffusers", "onnx", "onnxruntime")),
        "settings": {k: getattr(args, k) for k in ("samples", "calib_steps", "bench_steps", "runs", "threads")},
        "stages": stages,
        "configs": configs,
    }
    program.write(out / "scale_check.json", result, markdown(result))
    return result


# Bytes on disk per transformer parameter, measured on the SD3-medium fixture: the dense exports and engines
# (float32 and float16 ONNX, compact checkpoints, engine) ~14.3, each pruned configuration (plus its stage-1
# float32 transformer) ~12.3.
DENSE_BYTES_PER_PARAM, CONFIG_BYTES_PER_PARAM = 14.3, 12.3


def _check_disk(where: Path, params: int, configs: int) -> None:
    """Stop before the first stage when the artifact disk cannot hold the run (a full disk mid-export wastes
    an hour). Outputs already there count as space the run will reuse."""
    import shutil

    need = params * (DENSE_BYTES_PER_PARAM + CONFIG_BYTES_PER_PARAM * configs) - _du(where)
    anchor = where if where.exists() else where.parent
    while not anchor.exists():
        anchor = anchor.parent
    free = shutil.disk_usage(anchor).free
    if need > free:
        raise UserError(f"the scale check needs about {need / 1e9:.0f} GB of free disk under {where} and {free / 1e9:.0f} GB are free; "
                        f"free some space, or check fewer patterns at a time (--sparsity)")


def _engine_summary(engines: Path) -> dict[str, Any]:
    out = {}
    for m in sorted(engines.glob("*/engine_*.json")) if engines.is_dir() else []:
        d = json.loads(m.read_text())
        out[m.parent.name] = {"backend": f"{d.get('backend')} {d.get('backend_version')}", "plan_mib": round(d.get("plan_bytes", 0) / 2**20, 1),
                              "build_s": d.get("build_seconds"), "sparse_weights": (d.get("builder") or {}).get("sparse_weights"),
                              "nm_eligible_weights": len((d.get("onnx_nm_weights") or {}).get("eligible", []))}
    return out


def markdown(r: dict[str, Any]) -> str:
    fx = r["fixture"]
    lines = [
        f"# Scale check: `{r['family']}`-shaped fixture",
        "",
        f"Fixture: {fx.get('transformer_parameters', 0) / 1e9:.2f}B transformer parameters (random, seed {fx.get('seed')}), "
        f"default latent {fx.get('sample_size')}x{fx.get('sample_size')}, T5 layers {fx.get('t5_layers')}. Host: {r['device']}. "
        f"Settings: {r['settings']}. Each stage in its own process; peak RSS from `wait4`.",
        "",
        "| config | stage | seconds | peak RSS GiB | bound GiB (1.5 x weights + 2) | output GiB | exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in r["stages"]:
        lines.append(f"| {s['config']} | {s['stage']} | {s['seconds']:.0f} | {s['peak_rss_gib']:.2f} | {s.get('rss_bound_gib', '')} | "
                     f"{s['output_bytes'] / 2**30:.2f} | {s['status']} |")
    for name, c in r["configs"].items():
        lines += ["", f"## {name}", "", "```json", json.dumps(c, indent=2), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from common.cli import int_at_least

    ap = program.parser("scale_check", __doc__)
    ap.add_argument("--family", default="sd3-medium", help="fixture family (scripts/make_scale_fixture.py FAMILIES)")
    ap.add_argument("--fixture", default=None, help="fixture directory (default artifacts/fixtures/<family>; built if missing)")
    ap.add_argument("--sparsity", default="2:4,structured:0.3", help="comma-separated patterns (default 2:4,structured:0.3)")
    ap.add_argument("--samples", type=int_at_least(1), default=2, help="calibration prompts (default 2)")
    ap.add_argument("--calib-steps", type=int_at_least(1), default=4, help="calibration steps (default 4)")
    ap.add_argument("--bench-steps", type=int_at_least(1), default=2, help="denoising steps of the timed benchmark runs (default 2)")
    ap.add_argument("--runs", type=int_at_least(1), default=1, help="timed benchmark runs (default 1)")
    ap.add_argument("--threads", type=int_at_least(1), default=2, help="CPU threads of the benchmark (default 2)")
    ap.add_argument("--no-engines", action="store_true", help="skip the TensorRT-RTX builds")
    ap.add_argument("--artifacts", default=None, help="artifact root (default <out>/artifacts)")
    ap.add_argument("--out", default=None, help="report directory (default artifacts/scale/<family>)")
    ap.add_argument("--run-stage", default=None, metavar="PICKLE", help=argparse.SUPPRESS)  # the child of one stage

    def body(args) -> int:
        if args.run_stage:
            return run_stage_file(args.run_stage)
        if not run(args):
            return 1
        print(Path(args.out or REPO_ROOT / "artifacts" / "scale" / args.family) / "scale_check.md")
        return 0

    return program.run(ap, argv, body)


if __name__ == "__main__":
    sys.exit(main())
