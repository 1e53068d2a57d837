"""What a Q-Sched scheduler correction buys a compressed model, on ``tiny-sd3``.

For each sparsity pattern (OBS-Diff, small calibration: ``--prune-samples`` prompts x the model's steps, reused from
``--work`` when already there; ``dense`` for the quantized dense model) and each precision (float; INT8 / FP8 ModelOpt
fake quantization of the pruned transformer in PyTorch; INT4: the pattern pruned with ``--weight-bits 4``, OBS-solved
4-bit weights in groups of 128), at each step count (the model's default and a few-step setting), three samplers are
compared on the same evaluation set:

- ``none``: the compressed model with the stock scheduler;
- ``trajectory``: :func:`runtime.qsched.trajectory_fit.fit_correction`, per-step coefficients fitted to track the dense model's
  trajectory on calibration prompts;
- ``reference-free``: :func:`runtime.qsched.reference_free_fit.fit_correction_reference_free`, the paper's ramped coefficients
  searched to maximise :func:`evaluation.jaq.digits_jaq` (no dense model involved).

Calibration prompts use every training phrasing of the digits with seeds from 1000 (trajectory) and 2000
(reference-free); the evaluation is :func:`evaluation.metrics.evaluate` (the prompt "a handwritten digit d", seeds
0..S-1) plus the relative error of the final latents against the dense model on one seed per digit (seed 0, a
subset of the evaluation set). The coefficients are stored with each configuration
(``<work>/<config-id>/qsched/<precision>-<objective>-<steps>steps.json``).

    python -m benchmarks.qsched_eval [--patterns 2:4,structured:0.3] [--precisions float,int8,fp8] [--steps 20,4]
                                     [--out artifacts/bench/qsched_eval.json] [--work artifacts/bench/qsched]

Writes the JSON and a Markdown table next to it (``.md``).
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import program
from common.paths import REPO_ROOT
from families.registry import load_pipeline, resolve_model

log = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "artifacts" / "bench" / "qsched_eval.json"
DEFAULT_WORK = REPO_ROOT / "artifacts" / "bench" / "qsched"
CORRECTIONS = ("none", "trajectory", "reference-free")


def calibration_set(n: int, first_seed: int) -> tuple[list[str], list[int]]:
    """``n`` digit prompts cycling through every digit and every training phrasing, seeds ``first_seed + i``."""
    from evaluation.digits import TEMPLATES, prompt_for

    prompts = [prompt_for(i % 10, TEMPLATES[(i // 10) % len(TEMPLATES)]) for i in range(n)]
    return prompts, [first_seed + i for i in range(n)]


def pruned_transformer(spec, pattern: str, config_dir: Path, *, samples: int, device: str, weight_bits: int | None = None):
    """Prune tiny-sd3 with OBS-Diff into ``config_dir/prune`` (or reuse it) and load the masked transformer; with
    ``weight_bits``, its weights are also solved onto that integer grid (``prune --weight-bits``, group 128: the
    loaded float32 weights are exactly codes x scales).

    Returns ``(transformer, {"seconds": ..., "reused": ...})``."""
    from export.checkpoint import load_any_transformer
    from obsdiff.patterns import parse_sparsity
    from obsdiff.stage import prune_settings, run_prune

    settings = prune_settings(spec, parse_sparsity(pattern), config_dir / "prune", samples=samples, device=device, progress=False,
                              weight_bits=weight_bits)
    reused = (config_dir / "prune" / "transformer" / "config.json").is_file()
    t0 = time.perf_counter()
    run_prune(settings)  # returns at once when config_dir/prune holds this pruning
    return load_any_transformer(config_dir / "prune"), {"seconds": round(time.perf_counter() - t0, 2), "reused": reused}


def quantized(transformer, pipe, spec, precision: str, calib: tuple[list[str], list[int]]):
    """A fake-quantized copy of ``transformer`` (ModelOpt, max calibration on the real sampler's inputs)."""
    from export.calibration import record_calibration_inputs
    from export.quantize import quantize_transformer

    pv = variant_pipe(pipe, transformer)
    inputs = record_calibration_inputs(pv, spec, calib[0], calib[1], max_calls=32)
    return quantize_transformer(copy.deepcopy(transformer), precision, inputs)


def variant_pipe(pipe, transformer):
    """``pipe`` with another transformer (the other components, scheduler object included, shared)."""
    p = type(pipe)(**{**pipe.components, "transformer": transformer})
    p.set_progress_bar_config(disable=True)
    return p


def run(args) -> dict[str, Any]:
    from evaluation.jaq import digits_jaq
    from evaluation.metrics import evaluate
    from obsdiff.patterns import parse_sparsity
    from runtime.qsched.apply import apply_correction
    from runtime.qsched.correction import artifact_file
    from runtime.qsched.reference_free_fit import fit_correction_reference_free
    from runtime.qsched.trajectory_fit import fit_correction, record_trajectory, trajectory_error

    t_start = time.perf_counter()
    spec = resolve_model(args.model)
    if spec.quality_metric != "digits":
        from common.errors import UserError

        raise UserError(f"benchmarks.qsched_eval measures digit models (tiny-sd3); {spec.id} is scored with CLIP")
    steps_list = [int(s) for s in args.steps.split(",") if s.strip()]
    patterns = program.split_list(args.patterns)
    precisions = [p.lower() for p in program.split_list(args.precisions)]
    eval_seeds = tuple(range(args.eval_seeds))
    work = Path(args.work)
    dense = load_pipeline(spec)

    traj_calib = calibration_set(args.calib, 1000)
    rf_calib = calibration_set(args.calib_rf, 2000)
    quant_calib = calibration_set(8, 3000)
    from evaluation.digits import prompt_for

    heldout = ([prompt_for(d) for d in range(10)], [0] * 10)  # seed 0 of every digit: part of the evaluation set
    score_fn = digits_jaq(k=args.k)

    # The dense model's trajectories, once per step count: the fit's target and the held-out error's reference.
    dense_calib = {n: record_trajectory(dense, spec, *traj_calib, steps=n) for n in steps_list}
    dense_heldout = {n: record_trajectory(dense, spec, *heldout, steps=n) for n in steps_list}

    def measure(pipe, steps: int, correction) -> dict[str, Any]:
        def body():
            q = evaluate(pipe, spec, seeds=eval_seeds, steps=steps)
            traj = record_trajectory(pipe, spec, *heldout, steps=steps)
            return {"prompt_accuracy": q["prompt_accuracy"], "frechet_distance": q["frechet_distance"], "n_images": q["n_images"],
                    "heldout_latent_rel_error": trajectory_error(dense_heldout[steps], traj)["final"]}

        if correction is None:
            return body()
        with apply_correction(pipe, correction):
            return body()

    rows: list[dict[str, Any]] = []
    for n in steps_list:
        m = measure(dense, n, None)
        rows.append({"variant": "dense", "pattern": "dense", "precision": "float", "steps": n, "correction": "none", **m})
        log.info("dense, %d steps: accuracy %.3f, FD %.1f", n, m["prompt_accuracy"], m["frechet_distance"])
        if args.dense_reference_free:  # does the correction help the dense model's few-step sampler too?
            corr = fit_correction_reference_free(dense, spec, *rf_calib, score_fn, steps=n, grid=args.grid, search=args.search)
            m = measure(dense, n, corr)
            rows.append({"variant": "dense", "pattern": "dense", "precision": "float", "steps": n, "correction": "reference-free",
                         "coefficients": _summary(corr), "fit_seconds": corr.fit["seconds"], **m})

    notes: list[str] = []
    prune_seconds: dict[str, dict] = {}
    for pattern in patterns:
        sparsity = parse_sparsity(pattern)
        config_dir = work / f"{sparsity.id}-obs-diff"
        if sparsity.kind == "dense":  # the dense rows above are its float variant
            transformer = dense.transformer
        else:
            transformer, prune_seconds[str(sparsity)] = pruned_transformer(spec, pattern, config_dir, samples=args.prune_samples, device="cpu")
        for precision in precisions:
            if precision == "float" and sparsity.kind == "dense":
                continue
            variant_dir = config_dir
            if precision == "float":
                t = transformer
            elif precision == "int4":  # OBS-solved 4-bit weights (stage 1), a configuration of its own
                variant_dir = work / f"{sparsity.id}-obs-diff-w4g128"
                t, prune_seconds[f"{sparsity} int4"] = pruned_transformer(spec, pattern, variant_dir, samples=args.prune_samples,
                                                                           device="cpu", weight_bits=4)
            else:
                try:
                    t = quantized(transformer, dense, spec, precision, quant_calib)
                except Exception as e:  # e.g. FP8 fake quantization unavailable on this build
                    note = f"{sparsity} {precision}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                    log.warning(note)
                    notes.append(note)
                    continue
            pipe = variant_pipe(dense, t)
            variant = f"{sparsity} {precision}"
            for n in steps_list:
                corrections = {
                    "none": None,
                    "trajectory": fit_correction(dense, pipe, spec, *traj_calib, steps=n, reference=dense_calib[n]),
                    "reference-free": fit_correction_reference_free(pipe, spec, *rf_calib, score_fn, steps=n, grid=args.grid, search=args.search),
                }
                for name in CORRECTIONS:
                    corr = corrections[name]
                    row = {"variant": variant, "pattern": str(sparsity), "precision": precision, "steps": n, "correction": name}
                    if corr is not None:
                        path = artifact_file(variant_dir, n, precision=None if precision == "float" else precision, objective=name)
                        corr.save(path)
                        row.update(coefficients=_summary(corr), fit_seconds=corr.fit["seconds"], file=str(path))
                    row.update(measure(pipe, n, corr))
                    rows.append(row)
                    log.info("%s, %d steps, %s: accuracy %.3f, FD %.1f, held-out latent error %.4f", variant, n, name,
                             row["prompt_accuracy"], row["frechet_distance"], row["heldout_latent_rel_error"])
            del pipe, t

    for r in rows:  # gains against the same variant's uncorrected sampler
        base = next(b for b in rows if b["variant"] == r["variant"] and b["steps"] == r["steps"] and b["correction"] == "none")
        r["frechet_change"] = r["frechet_distance"] / base["frechet_distance"] - 1
        r["accuracy_change"] = r["prompt_accuracy"] - base["prompt_accuracy"]
    return {
        "benchmark": "qsched_eval",
        "model": spec.id,
        **program.environment("cpu", ("torch", "diffusers")),
        "settings": {
            "patterns": patterns, "precisions": precisions, "steps": steps_list, "guidance": spec.guidance,
            "prune_samples": args.prune_samples, "prune_method": "obs-diff",
            "trajectory_calibration": {"n": args.calib, "seeds_from": 1000},
            "reference_free_calibration": {"n": args.calib_rf, "seeds_from": 2000, "score": score_fn.name, "grid": list(args.grid), "search": args.search},
            "quantization_calibration": {"n": 8, "seeds_from": 3000, "max_calls": 32},
            "eval_seeds": list(eval_seeds), "heldout_error": "final latents vs dense, 10 prompts x seed 0",
        },
        "prune_seconds": prune_seconds,
        "rows": rows,
        "notes": notes,
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _summary(corr) -> dict[str, Any]:
    a, b = corr.sample_coeff, corr.model_coeff
    out = {"sample_coeff": [round(v, 4) for v in a], "model_coeff": [round(v, 4) for v in b]}
    if corr.objective == "reference-free":
        out.update(m0=corr.fit["m0"], s0=corr.fit["s0"])
    else:
        out.update(shrink=corr.fit["shrink"], calibration_error=corr.fit["calibration_error"]["corrected"]["final"],
                   calibration_error_uncorrected=corr.fit["calibration_error"]["uncorrected"]["final"])
    return out


def markdown(bench: dict[str, Any]) -> str:
    s = bench["settings"]
    lines = [
        f"# Q-Sched scheduler correction on `{bench['model']}`",
        "",
        f"Device: {bench['device']}. OBS-Diff pruning on {s['prune_samples']} calibration prompts; trajectory fit on "
        f"{s['trajectory_calibration']['n']} prompts, reference-free fit ({s['reference_free_calibration']['score']}, "
        f"{s['reference_free_calibration']['search']} search over {s['reference_free_calibration']['grid']}) on "
        f"{s['reference_free_calibration']['n']}; evaluation: `evaluation.metrics.evaluate`, seeds {s['eval_seeds']} "
        f"(10 digits each), guidance {s['guidance']}. Held-out error: {s['heldout_error']}. Fréchet change: relative to the "
        "same variant without correction (negative is better).",
        "",
        "| variant | steps | correction | prompt acc. | Fréchet dist. | Fréchet change | held-out latent err. | coefficients |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in bench["rows"]:
        change = "-" if r["correction"] == "none" else f"{100 * r['frechet_change']:+.1f}%"
        lines.append(
            f"| {r['variant']} | {r['steps']} | {r['correction']} | {r['prompt_accuracy']:.3f} | {r['frechet_distance']:.1f} | "
            f"{change} | {r['heldout_latent_rel_error']:.4f} | "
            f"{_coeff_text(r.get('coefficients'))} |"
        )
    if bench["notes"]:
        lines += ["", *[f"- {n}" for n in bench["notes"]]]
    lines += ["", f"Total {bench['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def _coeff_text(c: dict | None) -> str:
    if not c:
        return "-"
    if "m0" in c:
        return f"ramps m0={c['m0']:g}, s0={c['s0']:g}"
    a, b = c["sample_coeff"], c["model_coeff"]
    shrink = "" if c.get("shrink", 1.0) == 1.0 else f" (shrunk x{c['shrink']:g})"
    return f"a {min(a):.3f}..{max(a):.3f}, b {min(b):.3f}..{max(b):.3f}{shrink}"


def main(argv: list[str] | None = None) -> int:
    ap = program.parser("qsched_eval", __doc__)
    ap.add_argument("--model", default="tiny-sd3")
    ap.add_argument("--patterns", default="2:4,structured:0.3")
    ap.add_argument("--precisions", default="float,int8,fp8",
                    help="float, int8, fp8 (ModelOpt fake quantization in PyTorch), int4 (prune --weight-bits 4: OBS-solved weights, group 128)")
    ap.add_argument("--steps", default="20,4", help="sampling step counts (default: the model's 20, and 4)")
    ap.add_argument("--prune-samples", type=int, default=8, help="OBS-Diff calibration prompts (default 8)")
    ap.add_argument("--calib", type=int, default=20, help="trajectory-fit calibration prompts (default 20)")
    ap.add_argument("--calib-rf", type=int, default=20, help="reference-free-fit calibration prompts (default 20)")
    ap.add_argument("--grid", type=lambda s: tuple(float(v) for v in s.split(",")), default=(0.8, 0.9, 1.0, 1.1, 1.2),
                    help="candidate m0/s0 values of the reference-free search (default 0.8,0.9,1.0,1.1,1.2)")
    ap.add_argument("--search", choices=("coordinate", "grid"), default="coordinate")
    ap.add_argument("--k", type=float, default=1.0, help="weight of the quality term of digits-jaq (default 1)")
    ap.add_argument("--eval-seeds", type=int, default=6, help="seeds per digit in the evaluation (default 6: 60 images)")
    ap.add_argument("--no-dense-reference-free", dest="dense_reference_free", action="store_false",
                    help="skip fitting the reference-free correction on the dense model (by default it is, to tell a better "
                         "sampler from a compensated compression)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steadiest on a shared box)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path; the Markdown table goes next to it (.md)")
    ap.add_argument("--work", default=str(DEFAULT_WORK), help="configuration directories: prune/ and qsched/ of each pattern (reused)")

    def body(args) -> int:
        from common.io import check_output

        check_output(args.out, "file")
        program.set_threads(args.threads)
        result = run(args)
        program.write(args.out, result, markdown(result), echo=True)
        return 0

    return program.run(ap, argv, body)


if __name__ == "__main__":
    sys.exit(main())
