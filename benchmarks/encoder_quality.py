"""Quality with compressed text encoders next to the full ones: weight-only INT8 / INT4 and, for SD3-family models, without T5.

Each variant's text encoders are exported by stage 2 (:func:`export.stage.run_export` with ``--others-precision``
and ``--drop-t5``, the text encoders only, into ``--work``) and run in ONNX Runtime inside the model's pipeline,
whose transformer and VAE stay the PyTorch float32 ones: only the encoders differ between the rows. Quality is
:func:`evaluation.metrics.evaluate`'s (digit models: prompt accuracy and Fréchet distance of ``--seeds`` x 10
digits; hub models: a CLIP score). Recorded beside it per variant: the encoders' bytes on disk, and each encoder's
relative RMS error against its float32 ONNX on the model's prompts (stage 2's check, :mod:`export.encoder_quant`).

Usage: ``python -m benchmarks.encoder_quality --model tiny-sd3 --out artifacts/bench/encoder_quality-tiny-sd3.json
[--variants fp32,int8,int4,fp32-no-t5,int8-no-t5,int4-no-t5] [--seeds N] [--work DIR]``; writes the JSON and its
Markdown table beside it.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import program
from common.errors import UserError

log = logging.getLogger("benchmarks.encoder_quality")

PRECISIONS = ("fp32", "int8", "int4")
NO_T5 = "-no-t5"


def variants_for(spec, names: list[str] | None) -> list[tuple[str, str, bool]]:
    """``(name, others precision, drop T5)`` of each variant asked for (default: every precision, and each without T5
    where the family allows it); one line for an unknown name or a T5-less variant of a family that needs T5."""
    optional = spec.adapter.optional_text_encoder is not None
    known = [p for p in PRECISIONS] + ([p + NO_T5 for p in PRECISIONS] if optional else [])
    names = names or known
    bad = [n for n in names if n not in known]
    if bad:
        hint = "" if optional else f" ({spec.id} needs its T5 encoder: no -no-t5 variant)"
        raise UserError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(known)}{hint}")
    return [(n, n.removesuffix(NO_T5), n.endswith(NO_T5)) for n in names]


def export_encoders(spec, work: Path, precision: str, drop_t5: bool, *, parity_batches=(1,)) -> tuple[Path, dict[str, Any]]:
    """Stage 2 on the text encoders only, at ``precision`` (the other components', :data:`export.stage.OTHER_PRECISIONS`),
    into ``work/encoders-<precision>[-no-t5]`` (reused when current); returns the ONNX directory and the report."""
    from dataclasses import replace

    from export.stage import ExportSettings, run_export

    settings = ExportSettings(spec=spec, out=work / f"encoders-{precision}{NO_T5 if drop_t5 else ''}", precision="fp32",
                              others_precision=precision, drop_t5=drop_t5, parity_batches=parity_batches)
    encoders = {c.name for c in spec.adapter.components if c.weight_only}
    settings = replace(settings, components=tuple(c for c in settings.component_names if c in encoders))  # T5 already left out
    return settings.out / "onnx", run_export(settings)


def encoder_errors(report: dict[str, Any]) -> dict[str, float]:
    """Each weight-only encoder output's relative RMS error against its float ONNX (stage 2's check), by ``encoder/output``."""
    out = {}
    for name, entry in (report.get("components") or {}).items():
        for output, e in ((entry.get("weight_only_check") or {}).get("outputs") or {}).items():
            out[f"{name}/{output}"] = e["rel_rms_vs_float"]
    return out


def main(argv: list[str] | None = None) -> int:
    from common.cli import int_at_least
    from evaluation.metrics import DEFAULT_SEEDS

    ap = program.parser("encoder_quality", __doc__)
    ap.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory (default tiny-sd3)")
    ap.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(PRECISIONS)} and each with {NO_T5} "
                                                     "(SD3-family models); default all")
    ap.add_argument("--seeds", type=int_at_least(1), default=len(DEFAULT_SEEDS),
                    help=f"seeds per prompt of the quality evaluation (default {len(DEFAULT_SEEDS)}, as make quality)")
    ap.add_argument("--work", type=Path, default=None, help="where the exports go (default: beside --out, encoder_exports-<model>/)")
    ap.add_argument("--out", type=Path, required=True, help="result JSON (the Markdown table is written beside it)")
    return program.run(ap, argv, body)


def body(args) -> int:
    from common.io import check_output
    from evaluation.metrics import evaluate
    from families.registry import load_pipeline, resolve_model
    from runtime.pipeline_runner import runner_pipeline

    spec = resolve_model(args.model)
    variants = variants_for(spec, program.split_list(args.variants))
    program.check_out(args.out)
    work = args.work or args.out.parent / f"encoder_exports-{spec.id}"
    check_output(work, "dir", option="--work")
    base = load_pipeline(spec)
    rows = []
    t_all = time.perf_counter()
    for name, precision, drop_t5 in variants:
        log.info("== %s ==", name)
        onnx_dir, report = export_encoders(spec, work, precision, drop_t5)
        components = [c for c in report["components"]]
        pipe = runner_pipeline(spec, onnx_dir=onnx_dir, components=components, base_pipe=base)
        quality = evaluate(pipe, spec, tuple(range(args.seeds)))
        rows.append({"variant": name, "others_precision": precision, "t5": not drop_t5, "export": str(onnx_dir.parent),
                     "encoder_bytes": sum(int(e["bytes"]) for e in report["components"].values()),
                     "encoder_errors": encoder_errors(report), "quality": quality})
        log.info("%s: %s", name, {k: quality.get(k) for k in ("prompt_accuracy", "frechet_distance", "clip_score") if k in quality})
        del pipe
    result = {"benchmark": "encoder_quality", "model": spec.id, "seeds": args.seeds, "variants": rows,
              "elapsed_s": round(time.perf_counter() - t_all, 1), **program.environment(None, ("torch", "diffusers", "onnxruntime"))}
    program.write(args.out, result, to_markdown(result), echo=True)
    return 0


def to_markdown(result: dict[str, Any]) -> str:
    """The variants as one table: encoders' bytes (and as a share of the float32 ones), quality, the worst encoder error."""
    rows = result["variants"]
    full = next((r["encoder_bytes"] for r in rows if r["others_precision"] == "fp32" and r["t5"]), None)
    lines = [f"Text encoders of {result['model']} ({result['seeds']} seeds per prompt; transformer and VAE: PyTorch float32)", "",
             "| encoders | T5 | bytes on disk | vs float32 | prompt accuracy | Fréchet distance | worst encoder output error (rel. RMS) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        q = r["quality"]
        cells = [r["others_precision"], "yes" if r["t5"] else "no", f"{r['encoder_bytes']:,}",
                 fmt(r["encoder_bytes"] / full if full else None, ".3f"), fmt(q.get("prompt_accuracy", q.get("clip_score")), ".3f"),
                 fmt(q.get("frechet_distance"), ".1f"), fmt(max(r["encoder_errors"].values(), default=None), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
