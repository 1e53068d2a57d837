"""4-bit weights: OBS against round-to-nearest and ModelOpt's INT4 AWQ, on the prunable layers and held-out trajectories.

OBS is solved jointly with the pattern; one model per run.

For each pattern (``--patterns``, default dense, 2:4 and structured:0.3) and group size (``--group-sizes``, default
128, and 64 for dense: ``--dense-group-sizes``), every variant starts from the same dense weights and the same
calibration (``--samples`` prompts x the model's steps, the prune stage's log-decrease timestep weights):

- ``float``: the pattern solved by OBS-Diff in float (for dense: the dense model itself);
- ``obs``: ``prune --weight-bits 4 --quant-method obs`` (GPTQ's update on stage 1's Hessians, jointly with the
  pattern; structured: each layer's kept columns after the cut);
- ``rtn``: ``prune --weight-bits 4 --quant-method rtn`` (the same pattern solved in float, then round to nearest at
  the same group size; each package is calibrated on the earlier ones as rounded, so its pattern solves differ a
  little from ``float``'s);
- ``rtn-of-float``: the ``float`` model itself rounded to nearest (not for dense, where it is ``rtn``): the same
  float weights AWQ starts from, so its ``error_vs_float`` is only what rounding adds;
- ``awq``: ModelOpt's ``INT4_AWQ_CFG`` (weight-only INT4, ``awq_lite``, block = the group size) on the pattern's
  float model (compact for structured, so that its blocks are groups of kept columns, as OBS's are), calibrated by
  running the pipeline over the same calibration prompts and noise, with quantizers on exactly the layers the
  ``obs`` run quantized (the adapter's prunable units: ModelOpt's stock name rules would also skip Flux's
  ``proj_out``, a prunable layer); ``--awq-algorithm awq_full`` adds ``awq_clip``'s clipping search.

Measured on ``--heldout`` prompts never calibrated on (the last lines of the model's prompt file, seeds from 1000),
at every transformer call of the dense model's trajectories (each variant sees exactly the dense inputs):

- ``error_vs_dense``: ``sqrt(sum ||F_q - F_d||^2 / sum ||F_d||^2)`` (pattern and 4 bits together);
- ``added_error``: ``sqrt(error_vs_dense^2 - float's error_vs_dense^2)``, how much 4 bits grow the error against
  the dense model (:func:`add_added_error`);
- ``error_vs_float``: the same against the pattern's float model (for ``rtn-of-float`` and ``awq`` exactly what 4 bits
  add; for ``obs`` and ``rtn`` also the differences of their own pattern decisions: OBS chooses its masks jointly
  with the rounding, and every package is calibrated on the earlier ones as quantized);
- ``prompt_accuracy`` / ``frechet_distance``: :func:`evaluation.metrics.evaluate` with ``--quality-seeds``;
- ``prune_seconds`` / ``peak_mem_mib``: the stage-1 run (quantization included; AWQ: its calibration) and its
  memory rise above the start, sampled at 20 Hz (``benchmarks.quant_prune_cost`` measures stage 1's cost properly).

The JSON's ``goal`` checks, at 4 bits and group 128 for dense and 2:4, whether OBS's error is at most half
round-to-nearest's (the lower of ``rtn`` and ``rtn-of-float``) and below AWQ's, for each of the three errors;
``defaults`` says per pattern and group size whether OBS's ``error_vs_dense`` is at or below every peer's.

    python -m benchmarks.quant_compare [--model tiny-sd3] [--out artifacts/bench/quant_compare-<model>.json]
    python -m benchmarks.quant_compare --retabulate artifacts/bench/quant_compare-tiny-sd3.json   # verdicts and table again

Writes the JSON and a Markdown table next to it (``.md``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from benchmarks import program
from benchmarks.prune_compare import add_calibration_arguments, record_dense_trajectories, relative_error, transformer_outputs
from benchmarks.qsched_eval import variant_pipe
from common.errors import UserError
from common.memory import PeakMemory
from common.paths import REPO_ROOT
from families.registry import load_pipeline, resolve_model

log = logging.getLogger(__name__)

METHODS = ("obs", "rtn", "rtn-of-float", "awq")
AWQ_ALGORITHMS = ("awq_lite", "awq_full")
GOAL_PATTERNS = ("dense", "2:4")
GOAL_GROUP = 128
GOAL_RTN_RATIO = 0.5


# --------------------------------------------------------------------------------------------------------
# The AWQ peer
# --------------------------------------------------------------------------------------------------------


def awq_config(layers: Iterable[str], group_size: int, algorithm: str = "awq_lite", bits: int = 4) -> dict[str, Any]:
    """ModelOpt's ``INT4_AWQ_CFG`` on ``layers`` only (qualified ``nn.Linear`` names): its weight quantizer's numerics
    with block ``group_size`` along the input, every other quantizer off (inputs too: weight-only), ``algorithm``
    ``awq_lite`` (the stock config's) or ``awq_full`` (``awq_lite`` then ``awq_clip``)."""
    from export.quantize import _mtq

    if algorithm not in AWQ_ALGORITHMS:
        raise UserError(f"--awq-algorithm must be one of {', '.join(AWQ_ALGORITHMS)}, got {algorithm!r}")
    stock = _mtq().INT4_AWQ_CFG
    weight = copy.deepcopy(next(e["cfg"] for e in stock["quant_cfg"] if e["quantizer_name"] == "*weight_quantizer"))
    if weight.get("num_bits") != bits:
        raise ValueError(f"ModelOpt's INT4_AWQ_CFG quantizes to {weight.get('num_bits')} bits, not {bits}")
    weight["block_sizes"] = {**weight["block_sizes"], -1: group_size}
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    entries += [{"quantizer_name": f"{name}.weight_quantizer", "cfg": copy.deepcopy(weight), "enable": True} for name in layers]
    return {"quant_cfg": entries, "algorithm": {**stock["algorithm"], "method": algorithm}}


def awq_quantize(model: torch.nn.Module, layers: Sequence[str], group_size: int, forward_loop: Callable[[torch.nn.Module], None],
                 algorithm: str = "awq_lite") -> torch.nn.Module:
    """Fake-quantize ``layers`` of ``model`` in place with :func:`awq_config`, calibrated by ``forward_loop(model)``
    (AWQ-lite runs it twice: activation statistics, then the search of each layer's scale exponent). Checks that
    exactly ``layers``' weight quantizers are on. Returns ``model``."""
    from export.quantize import _mtq, enabled_quantizers

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # ModelOpt prints its progress
        model = _mtq().quantize(model, awq_config(layers, group_size, algorithm), forward_loop)
    log.debug("modelopt: %s", printed.getvalue().strip())
    on = sorted(enabled_quantizers(model))
    want = sorted(f"{n}.weight_quantizer" for n in layers)
    if on != want:
        raise AssertionError(f"AWQ quantizers on {len(on)} modules, expected exactly the {len(want)} given layers: "
                             f"{sorted(set(on) ^ set(want))[:4]}")
    return model


def calibration_loop(pipe, prompts: Sequence[str], calib) -> Callable[[torch.nn.Module], None]:
    """A ModelOpt ``forward_loop``: ``pipe``'s full denoising loop over the calibration prompts with the prune stage's
    noise (:func:`obsdiff.packages.run_calibration`'s: prompt ``i`` starts from the adapter's noise of seed
    ``calib.seed + i``), ``pipe.transformer`` being the model quantized."""
    from families import adapter_for
    from families.sampling import pipeline_call

    def forward_loop(model: torch.nn.Module) -> None:
        if model is not pipe.transformer:
            raise ValueError("forward_loop: the model to calibrate is not the pipeline's transformer")
        adapter = adapter_for(model)
        for start in range(0, len(prompts), calib.batch_size):
            idx = range(start, min(start + calib.batch_size, len(prompts)))
            noise = torch.cat([adapter.noise(pipe, calib.height, calib.width, calib.seed + i, torch.float32) for i in idx])
            pipeline_call(pipe, adapter, [prompts[i] for i in idx], [calib.seed + i for i in idx], steps=calib.steps,
                          guidance=calib.guidance, height=calib.height, width=calib.width,
                          max_sequence_length=calib.max_sequence_length, output_type="latent", latents=noise)

    return forward_loop


def round_layers(model: torch.nn.Module, layers: Sequence[str], wq) -> None:
    """Round the weights of ``layers`` of ``model`` to nearest on ``wq``'s grid, in place (zeros stay zero)."""
    from obsdiff.weight_quant import rtn_quantize

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in layers:
            weight = modules[name].weight
            weight.copy_(rtn_quantize(weight, wq)[0])


# --------------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------------


def _row(rows: Sequence[dict], pattern: str, group: int | None, method: str) -> dict | None:
    return next((r for r in rows if r["pattern"] == pattern and r["group_size"] == group and r["method"] == method), None)


def add_added_error(rows: list[dict]) -> None:
    """Set each quantized row's ``added_error``: ``sqrt(max(e^2 - e_float^2, 0))`` with ``e`` its ``error_vs_dense``
    and ``e_float`` its pattern's float model's (0 for dense): how much 4 bits grow the error against the dense model,
    which is what 4 bits add when their error is orthogonal to the pattern's (measured: ``rtn-of-float``'s
    ``added_error`` is within a few percent of its ``error_vs_float``). OBS, whose masks and rounding are chosen
    together, may add less than its rounding alone would."""
    for r in rows:
        if r["method"] not in METHODS:
            continue
        f = 0.0 if r["pattern"] == "dense" else next((x["error_vs_dense"] for x in rows if x["pattern"] == r["pattern"] and x["method"] == "float"), None)
        r["added_error"] = None if f is None else max(r["error_vs_dense"] ** 2 - f**2, 0.0) ** 0.5


ERROR_KEYS = ("error_vs_dense", "added_error", "error_vs_float")


def goal_check(rows: Sequence[dict], patterns: Sequence[str] = GOAL_PATTERNS, group: int = GOAL_GROUP,
               ratio: float = GOAL_RTN_RATIO) -> dict[str, Any]:
    """Issue 24's goal per pattern at ``group``: OBS's error ``<= ratio x`` round-to-nearest's and ``<`` AWQ's, on
    ``error_vs_dense``, ``added_error`` and ``error_vs_float``. Round-to-nearest is the lower of ``rtn`` and ``rtn-of-float`` where
    both were measured (the stronger peer). ``met``: every pattern meets it on ``error_vs_dense`` (None where a
    pattern or a method was not measured)."""
    out: dict[str, Any] = {"group_size": group, "rtn_ratio_bound": ratio, "patterns": {}}
    verdicts = []
    for pattern in patterns:
        obs, awq = _row(rows, pattern, group, "obs"), _row(rows, pattern, group, "awq")
        rtns = [r for m in ("rtn", "rtn-of-float") if (r := _row(rows, pattern, group, m)) is not None]
        if obs is None or awq is None or not rtns:
            out["patterns"][pattern] = None
            continue
        entry = {}
        for key in ERROR_KEYS:
            if any(x.get(key) is None for x in (obs, awq, *rtns)):
                continue
            rtn = min(rtns, key=lambda r: r[key])
            o, r, a = obs[key], rtn[key], awq[key]
            entry[key] = {"rtn_method": rtn["method"], "obs_over_rtn": o / r if r else None, "obs_over_awq": o / a if a else None,
                          "met": bool(r and a and o <= ratio * r and o < a)}
        out["patterns"][pattern] = entry
        verdicts.append(entry["error_vs_dense"]["met"])
    out["met"] = all(verdicts) if verdicts and len(verdicts) == len(patterns) else None
    return out


def defaults(rows: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per ``"<pattern> g<group>"``: whether OBS's ``error_vs_dense`` is at or below every peer's measured there (then
    it is the default), and the method with the lowest error."""
    out = {}
    quantized = [r for r in rows if r["method"] in METHODS]
    for pattern, group in dict.fromkeys((r["pattern"], r["group_size"]) for r in quantized):
        measured = {m: r["error_vs_dense"] for m in METHODS if (r := _row(rows, pattern, group, m)) is not None}
        if "obs" not in measured:
            continue
        peers = [v for m, v in measured.items() if m != "obs"]
        out[f"{pattern} g{group}"] = {"obs_default": all(measured["obs"] <= v for v in peers),
                                      "lowest": min(measured, key=measured.get), "peers_measured": sorted(set(measured) - {"obs"})}
    return out


# --------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------


def markdown(bench: dict[str, Any]) -> str:
    s = bench["settings"]
    lines = [
        f"# 4-bit weights on `{bench['model']}`: OBS, round-to-nearest, ModelOpt INT4 AWQ",
        "",
        f"Device: {bench['device']}. Calibration: {s['samples']} prompts x {s['steps']} steps, guidance {s['guidance']}, "
        f"{s['groups']} module packages; AWQ: ModelOpt {bench['versions'].get('modelopt', '?')} `{s['awq_algorithm']}` on the "
        f"same prompts and noise. Errors over {s['heldout_prompts']} held-out prompts x {s['steps']} steps ({s['heldout_calls']} "
        f"transformer calls); quality: `evaluation.metrics.evaluate`, seeds {s['quality_seeds']}.",
        "",
        "| pattern | group | method | error vs dense | added by 4 bits | error vs float pattern | prompt accuracy | Fréchet distance | stage-1 s | mem rise MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench["results"]:
        lines.append(
            f"| {r['pattern']} | {r['group_size'] or '-'} | {r['method']} | {_f(r['error_vs_dense'], 4)} | {_f(r.get('added_error'), 4)} | "
            f"{_f(r['error_vs_float'], 4)} | "
            f"{_f(r.get('prompt_accuracy'), 3)} | {_f(r.get('frechet_distance'), 1)} | {_f(r.get('prune_seconds'), 1)} | "
            f"{_f(r.get('peak_mem_mib'), 0)} |"
        )
    g = bench["goal"]
    lines += ["", f"Goal (group {g['group_size']}: OBS <= {g['rtn_ratio_bound']} x RTN and < AWQ):"]
    for pattern, e in g["patterns"].items():
        if e is None:
            lines.append(f"- {pattern}: not measured")
            continue
        for key, v in e.items():
            lines.append(f"- {pattern}, {key.replace('_', ' ')}: OBS/RTN ({v['rtn_method']}) {_f(v['obs_over_rtn'], 3)}, "
                         f"OBS/AWQ {_f(v['obs_over_awq'], 3)}: "
                         f"**{'met' if v['met'] else 'not met'}**")
    lines += ["", "Default (OBS where its error vs dense is at or below every peer's measured there):"]
    lines += [f"- {k}: {'OBS' if v['obs_default'] else 'not OBS'} (lowest: {v['lowest']})" for k, v in bench["defaults"].items()]
    return "\n".join(lines) + "\n"


def _f(v, nd):
    return "-" if v is None else f"{v:.{nd}f}"


# --------------------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = program.parser("quant_compare", __doc__)
    ap.add_argument("--model", default="tiny-sd3")
    ap.add_argument("--patterns", default="dense,2:4,structured:0.3")
    ap.add_argument("--methods", default="obs,rtn,rtn-of-float,awq", help="of obs, rtn, rtn-of-float, awq (default all)")
    ap.add_argument("--bits", type=int, default=4, help="weight bits (default 4; AWQ is 4-bit only)")
    ap.add_argument("--group-sizes", default="128", help="group sizes of every pattern (default 128)")
    ap.add_argument("--dense-group-sizes", default="128,64", help="group sizes of the dense pattern (default 128,64)")
    ap.add_argument("--awq-algorithm", default="awq_lite", help="awq_lite (INT4_AWQ_CFG's, default) or awq_full")
    ap.add_argument("--percdamp", type=float, default=None, help="OBS damping (default: the prune stage's)")
    add_calibration_arguments(ap)
    ap.add_argument("--out", default=None, help="JSON path (default artifacts/bench/quant_compare-<model>.json); the Markdown goes next to it")
    ap.add_argument("--retabulate", default=None, metavar="JSON", help="recompute the verdicts and the table of a result file, in place")
    return program.run(ap, argv, run)


def retabulate(path: str) -> int:
    """The derived errors, verdicts and Markdown of an existing result file, recomputed from its rows (written in place)."""
    from common.io import read_json

    bench = read_json(Path(path), what="quant_compare result")
    add_added_error(bench["results"])
    bench.update(goal=goal_check(bench["results"]), defaults=defaults(bench["results"]))
    program.write(path, bench, markdown(bench), echo=True)
    return 0


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in program.split_list(text)]
    except ValueError:
        raise UserError(f"{option} {text!r}: give comma-separated integers") from None


def run(args) -> int:
    from evaluation.metrics import evaluate
    from export.surgery import apply_plan
    from families import adapter_for
    from obsdiff.packages import CalibrationConfig, PruneConfig, calibration_prompts, config_units, prune, read_prompts
    from obsdiff.patterns import parse_sparsity
    from obsdiff.solvers import DEFAULT_PERCDAMP
    from obsdiff.weight_quant import WeightQuant

    if args.retabulate:
        return retabulate(args.retabulate)
    out_path = args.out or str(REPO_ROOT / "artifacts" / "bench" / f"quant_compare-{args.model}.json")
    program.check_out(out_path)
    methods = program.split_list(args.methods)
    if not methods or any(m not in METHODS for m in methods):
        raise UserError(f"--methods {args.methods!r}: give some of {', '.join(METHODS)}")
    if "awq" in methods and args.bits != 4:
        raise UserError("--methods awq quantizes to 4 bits (ModelOpt's INT4_AWQ_CFG); use --bits 4 or leave awq out")
    if args.awq_algorithm not in AWQ_ALGORITHMS:
        raise UserError(f"--awq-algorithm must be one of {', '.join(AWQ_ALGORITHMS)}, got {args.awq_algorithm!r}")
    group_sizes, dense_group_sizes = _ints(args.group_sizes, "--group-sizes"), _ints(args.dense_group_sizes, "--dense-group-sizes")
    for g in {*group_sizes, *dense_group_sizes}:
        WeightQuant(args.bits, g)  # one line for a bad bits or group size, before anything runs
    quality_seeds = tuple(_ints(args.quality_seeds, "--quality-seeds"))
    percdamp = DEFAULT_PERCDAMP if args.percdamp is None else args.percdamp
    program.set_threads(args.threads)
    device = torch.device("cpu")
    spec = resolve_model(args.model)
    pipe = load_pipeline(spec).to(device)
    pipe.set_progress_bar_config(disable=True)
    dense_state = copy.deepcopy(pipe.transformer.state_dict())

    prompt_file = REPO_ROOT / spec.prompts
    all_prompts = read_prompts(prompt_file)
    heldout = all_prompts[-args.heldout :]
    prompts = calibration_prompts(all_prompts[: len(all_prompts) - args.heldout], args.samples)
    calib = CalibrationConfig(samples=args.samples, steps=spec.steps, guidance=spec.guidance, height=spec.height, width=spec.width,
                              batch_size=args.batch_size, seed=0, max_sequence_length=spec.max_sequence_length)

    def quality(p) -> dict[str, Any]:
        if not quality_seeds:
            return {}
        q = evaluate(p, spec, seeds=quality_seeds)
        return {k: q.get(k) for k in ("prompt_accuracy", "frechet_distance", "n_images")}

    log.info("recording dense trajectories of %d held-out prompts", len(heldout))
    records = record_dense_trajectories(pipe, spec, heldout, [1000 + i for i in range(len(heldout))], spec.steps, spec.guidance)
    dense_refs = [ref for _, ref in records]

    results: list[dict[str, Any]] = [{"pattern": "dense", "group_size": None, "method": "float", "error_vs_dense": 0.0,
                                      "error_vs_float": 0.0, **quality(pipe)}]
    work_ctx = tempfile.TemporaryDirectory(prefix="quant_compare.") if args.work is None else None
    work = Path(args.work or work_ctx.name)

    def stage1(config, out: Path):
        pipe.transformer.load_state_dict(dense_state)
        t0 = time.perf_counter()
        with PeakMemory(interval_s=0.05) as mem:
            plan = prune(pipe, spec.id, prompts, config, out, progress=False)
        return plan, {"prune_seconds": time.perf_counter() - t0, "peak_mem_mib": mem.rise_mib}

    def measure(model, p, float_refs, **extra) -> dict[str, Any]:
        outs = transformer_outputs(model, records)
        row = {**extra, "error_vs_dense": relative_error(outs, dense_refs), "error_vs_float": relative_error(outs, float_refs), **quality(p)}
        log.info("%s g%s %s: error vs dense %.4f, vs float %.4f, accuracy %s, FD %s", row["pattern"], row["group_size"], row["method"],
                 row["error_vs_dense"], row["error_vs_float"], row.get("prompt_accuracy"), row.get("frechet_distance"))
        return row

    try:
        for pattern in program.split_list(args.patterns):
            sparsity = parse_sparsity(pattern)
            base = dict(sparsity=sparsity, method="obs-diff", groups=args.groups, calibration=calib, percdamp=percdamp, family=spec.family)
            if sparsity.kind == "dense":
                float_state, float_plan, float_refs = dense_state, None, dense_refs
            else:
                float_plan, cost = stage1(PruneConfig(**base), work / f"{sparsity.id}-float")
                float_state = copy.deepcopy(pipe.transformer.state_dict())
                float_refs = transformer_outputs(pipe.transformer, records)
                results.append(measure(pipe.transformer, pipe, float_refs, pattern=str(sparsity), group_size=None, method="float", **cost))
            for g in dense_group_sizes if sparsity.kind == "dense" else group_sizes:
                layers = None
                for method in (m for m in ("obs", "rtn") if m in methods):
                    config = PruneConfig(**base, quant=WeightQuant(args.bits, g, method))
                    plan, cost = stage1(config, work / f"{sparsity.id}-w{args.bits}g{g}-{method}")
                    quantized = sorted(n for n, v in plan.layers.items() if v.get("weight_bits"))
                    results.append(measure(pipe.transformer, pipe, float_refs, pattern=str(sparsity), group_size=g, method=method,
                                           quantized_layers=len(quantized), **cost))
                    layers = layers or quantized
                peers = [m for m in ("rtn-of-float", "awq") if m in methods and not (m == "rtn-of-float" and sparsity.kind == "dense")]
                if peers and layers is None:  # the layers a --weight-bits prune quantizes: every layer of the adapter's units
                    qconfig = PruneConfig(**base, quant=WeightQuant(args.bits, g))
                    layers = sorted(n for u in config_units(pipe.transformer, adapter_for(pipe.transformer), qconfig) for n in u.layers)
                for method in peers:  # on a copy of the pattern's float model, compact for structured (groups of kept columns)
                    pipe.transformer.load_state_dict(float_state)
                    model = copy.deepcopy(pipe.transformer)
                    if sparsity.kind == "structured":
                        model = apply_plan(model, float_plan, require_masked=True)
                    pv = variant_pipe(pipe, model)
                    t0 = time.perf_counter()
                    with PeakMemory(interval_s=0.05) as mem:
                        if method == "awq":
                            awq_quantize(model, layers, g, calibration_loop(pv, prompts, calib), args.awq_algorithm)
                        else:
                            round_layers(model, layers, WeightQuant(args.bits, g, "rtn"))
                    cost = {"prune_seconds": time.perf_counter() - t0, "peak_mem_mib": mem.rise_mib}
                    results.append(measure(model, pv, float_refs, pattern=str(sparsity), group_size=g, method=method,
                                           quantized_layers=len(layers), **cost))
                    del pv, model
    finally:
        pipe.transformer.load_state_dict(dense_state)
        if work_ctx is not None:
            work_ctx.cleanup()

    add_added_error(results)
    bench = {
        "benchmark": "quant_compare",
        "model": spec.id,
        **program.environment(device, ("torch", "diffusers", "modelopt")),
        "settings": {
            "bits": args.bits, "samples": args.samples, "steps": spec.steps, "guidance": spec.guidance, "batch_size": args.batch_size,
            "groups": args.groups, "percdamp": percdamp, "awq_algorithm": args.awq_algorithm, "heldout_prompts": len(heldout),
            "heldout_calls": len(records), "quality_seeds": list(quality_seeds), "threads": args.threads,
            "calibration_prompts_file": str(prompt_file.relative_to(REPO_ROOT)),
        },
        "results": results,
        "goal": goal_check(results),
        "defaults": defaults(results),
    }
    program.write(out_path, bench, markdown(bench), echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
