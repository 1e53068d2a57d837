"""``make size-check``: the sizes :mod:`families.pipeline_sizes` computes, against real files (opt-in, not part of
``make test``; about 35 minutes with the fixtures, at most ~9.2 GiB on 2 cores; 35 GB of disk).

1. The SD3-medium fixture with its text encoders at their published sizes (``scripts/make_scale_fixture.py
   --encoders published``: 2.03B transformer, CLIP-L, CLIP-G, T5-XXL with 4.76B parameters; 15 GB of float16
   safetensors, built once): every component's files against the computed float16 bytes.
2. Stage 2's exports, one at a time, each in its own process (peak RSS from ``wait4``): the text encoders
   weight-only INT8 and INT4 (``--others-precision``), the VAE decoder in float16, the transformer in float16, INT8
   (Q/DQ) and INT4 (``MatMulNBits``, from a round-to-nearest ``prune --weight-bits 4``). Each ONNX file (graph and
   external data) is measured against the same formula with the export's own layout (scales' dtype, zero points,
   the float parts' precision, read from its report). They run on fixtures of the published widths at two depths
   (``--depths``, default 1 and 2 transformer blocks and T5 layers; the CLIP encoders and the VAE at their full
   published sizes), because stage 2 cannot export T5-XXL or the 2B INT8/INT4 transformer at full depth on this
   host: it exports T5 from a float32 copy (19 GB; two T5-XXL layers already peak at 8.6 GiB) and loads the pruned
   transformer in float32 (8.1 GB) before its ONNX graph. The bytes are linear in the depth past the first block
   (SD3's last block is the context-pre-only one, T5's first layer carries the relative position bias: depths 1
   and 2 differ by one regular block or layer), so the published depth's file size is extrapolated from the two
   measured ones (``f(24) = f(a) + (24 - a) / (b - a) * (f(b) - f(a))``) and compared with the computed one.

    python -m benchmarks.size_check                       # artifacts/sizes/check/size_check.{json,md}

A figure passes within ``--tolerance`` (default 2%) of the computed one.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import sys
from pathlib import Path
from typing import Any

from benchmarks import program
from common.errors import UserError
from common.paths import REPO_ROOT

log = logging.getLogger(__name__)

FAMILY = "sd3-medium"
TOLERANCE = 0.02


# -------------------------------------------------------------------------------------------- the export layouts
def export_precision(name: str, entry: dict[str, Any], report: dict[str, Any]):
    """The :class:`~families.pipeline_sizes.Precision` a stage-2 export wrote component ``name`` in, from its report
    ``entry`` (and the whole ``report``): weight-only text encoders are ONNX Runtime's ``MatMulNBits`` (float32
    scales, a zero point per block unless symmetric, the token tables float16, the rest float32); the INT8
    transformer is Q/DQ (INT8 codes, a float32 scale and an INT8 zero point per output channel, the rest float32);
    the INT4 transformer is ``MatMulNBits`` (float32 scales, no zero point, the rest float32) and W4A16 is blocked INT4
    ``DequantizeLinear`` in a float16 graph (float16 scales), at the group size the report records; a float export
    is its precision."""
    from families.pipeline_sizes import Precision, WeightFormat

    wo = entry.get("weight_only")
    if wo:
        bits, block, sym = int(wo["bits"]), int(wo["block_size"]), bool(wo.get("symmetric"))
        fmt = WeightFormat(f"int{bits}-g{block}-ort", bits, block, scale_bytes=4, zero_point_bits=0 if sym else bits)
        return Precision(fmt, floats=entry.get("precision_floats", "fp32"), embeddings="fp16")
    precision = entry.get("precision") or report.get("precision")
    if name == "transformer" and precision == "int8":
        return Precision(WeightFormat("int8-qdq", 8, None, scale_bytes=4, zero_point_bits=8), floats="fp32")
    if name == "transformer" and precision in ("int4", "w4a16"):
        block = int((report.get("quantization") or {})["block_size"])
        if precision == "int4":  # MatMulNBits in the float32 graph: float32 scales, no zero point
            return Precision(WeightFormat(f"int4-g{block}-ort", 4, block, scale_bytes=4), floats="fp32")
        return Precision(WeightFormat(f"int4-g{block}", 4, block), floats="fp16")  # blocked DequantizeLinear, float16 scales and graph
    return Precision(precision)


# -------------------------------------------------------------------------------------------- measuring
def safetensors_bytes(directory: Path, prefix: str = "") -> int:
    """Data bytes of the safetensors files in ``directory`` (tensors under ``prefix`` and ``post_quant_conv.``
    when given), from their headers."""
    total = 0
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                     if k != "__metadata__" and (not prefix or k.startswith((prefix, "post_quant_conv."))))
    return total


def onnx_bytes(path: Path) -> dict[str, int]:
    """``{"file": graph + external data bytes, "initializers": their tensors' bytes}`` of one exported ONNX."""
    import onnx

    from export.onnx_files import initializer_bytes, onnx_size

    return {"file": onnx_size(path), "initializers": initializer_bytes(onnx.load(str(path), load_external_data=False))}


def export_adjustment(w, precision, report: dict[str, Any], entry: dict[str, Any], configs: dict[str, dict[str, Any]]) -> int:
    """Bytes an export stores differently from the loaded component ``w`` (``configs``: the fixture's component
    configs), because the exporter folds a table into the constant the served shapes need:

    - SD3's persistent position table (``pos_embed.pos_embed``, ``(1, G*G, D)``: 56.6M values for SD3-medium) is
      cropped to the largest served token grid: ``(h/p) * (w/p) * D`` values, not ``G*G*D``;
    - T5's relative position bias (an embedding of ``buckets x heads`` values in the first layer) becomes the
      float32 ``(1, heads, L, L)`` bias of the exported sequence length ``L`` (16 MiB for T5-XXL at 256 tokens)."""
    bytes_per = precision.formats()["other"].bits // 8
    if w.kind == "transformer":
        served = report["served_shapes"]
        lat = max((h // served["vae_scale"], wd // served["vae_scale"]) for h, wd in served["resolutions"])
        patch = int(configs["transformer"].get("patch_size", 2))
        for key, shape in w.buffers:
            if key.endswith("pos_embed.pos_embed"):
                return ((lat[0] // patch) * (lat[1] // patch) * shape[-1] - math.prod(shape)) * bytes_per
    if w.kind == "t5":
        cfg = configs[w.name]
        length = int(entry["inputs"]["input_ids"]["shape"][1])
        return cfg["num_heads"] * length * length * 4 - cfg["relative_attention_num_buckets"] * cfg["num_heads"] * bytes_per
    return 0


def _component_of(export_name: str) -> str:
    return "vae" if export_name == "vae_decoder" else export_name


def extrapolate(a: int, fa: int, b: int, fb: int, target: int) -> float:
    """The value at ``target`` of the line through ``(a, fa)`` and ``(b, fb)``."""
    return fa + (target - a) * (fb - fa) / (b - a)


# -------------------------------------------------------------------------------------------- the run
def _fixture(out: Path, depth: int | None, log_file: Path, rows: list) -> Path:
    from benchmarks.scale_check import _run

    if (out / "model_index.json").is_file():
        return out
    argv = ["scripts.make_scale_fixture", "--family", FAMILY, "--encoders", "published", "--out", str(out)]
    if depth is not None:
        argv += ["--blocks", str(depth), "--t5-layers", str(depth)]
    log.info("building %s", out)
    r = _run(argv, log_file)
    rows.append({"step": f"fixture {out.name}", **r})
    if r["status"]:
        raise UserError(f"building {out} failed; see {log_file}")
    return out


# The exports, by label: stage 2's options, the components at the deepest fixture and at the other (the CLIP encoders
# and the VAE decoder have their full published sizes in every fixture: exported once; the transformer and T5 at
# both depths).
ENCODERS = "text_encoder,text_encoder_2,text_encoder_3"
EXPORTS: dict[str, tuple[list[str], str, str | None]] = {
    "encoders-int8": (["--precision", "fp16", "--others-precision", "int8"], ENCODERS, "text_encoder_3"),
    "encoders-int4": (["--precision", "fp16", "--others-precision", "int4"], ENCODERS, "text_encoder_3"),
    "vae-fp16": (["--precision", "fp16", "--others-precision", "fp16"], "vae_decoder", None),
    "transformer-fp16": (["--precision", "fp16"], "transformer", "transformer"),
    "transformer-int8": (["--precision", "int8", "--drop-t5", "--calib-samples", "1", "--calib-calls", "2"], "transformer", "transformer"),
    "transformer-int4": (["--precision", "int4"], "transformer", "transformer"),
    "transformer-w4a16": (["--precision", "w4a16"], "transformer", "transformer"),
}
NEEDS_INT4_PRUNE = ("transformer-int4", "transformer-w4a16")
# Whole pipelines as the exports lay them out: the sum of their components' files (extrapolated where needed).
PIPELINES: dict[str, tuple[str, ...]] = {
    "INT8 transformer (Q/DQ), INT8 encoders, VAE fp16": ("transformer-int8:transformer", "encoders-int8:text_encoder", "encoders-int8:text_encoder_2",
                                                          "encoders-int8:text_encoder_3", "vae-fp16:vae_decoder"),
    "INT4 transformer (MatMulNBits), INT4 encoders, VAE fp16": ("transformer-int4:transformer", "encoders-int4:text_encoder",
                                                                "encoders-int4:text_encoder_2", "encoders-int4:text_encoder_3", "vae-fp16:vae_decoder"),
    "INT8 transformer (Q/DQ), INT8 CLIP, T5 dropped, VAE fp16": ("transformer-int8:transformer", "encoders-int8:text_encoder",
                                                                 "encoders-int8:text_encoder_2", "vae-fp16:vae_decoder"),
    "INT4 transformer (MatMulNBits), INT4 CLIP, T5 dropped, VAE fp16": ("transformer-int4:transformer", "encoders-int4:text_encoder",
                                                                        "encoders-int4:text_encoder_2", "vae-fp16:vae_decoder"),
    "W4A16 transformer, INT4 CLIP, T5 dropped, VAE fp16": ("transformer-w4a16:transformer", "encoders-int4:text_encoder", "encoders-int4:text_encoder_2",
                                                           "vae-fp16:vae_decoder"),
    "W4A16 transformer, INT8 CLIP, T5 dropped, VAE fp16": ("transformer-w4a16:transformer", "encoders-int8:text_encoder", "encoders-int8:text_encoder_2",
                                                           "vae-fp16:vae_decoder"),
}


def _exports(fixture: Path, work: Path, log_file: Path, rows: list, *, deepest: bool, only: list[str]) -> dict[str, Path]:
    """Run the exports of one reduced fixture, each in its own process and skipped when its report is there (the
    depth-independent components only in the ``deepest``; ``only``: these labels); ``{label: export dir}``."""
    from benchmarks.scale_check import _run

    out = {}
    for label, (args, components, later) in EXPORTS.items():
        if (only and label not in only) or not (deepest or later):
            continue
        d = work / f"{fixture.name}-{label}"
        out[label] = d
        if (d / "export_report.json").is_file():
            continue
        argv = ["pipeline", "export", "--model", str(fixture), "--out", str(d), *args, "--components", components if deepest else later,
                "--parity-batches", ""]
        if label in NEEDS_INT4_PRUNE:
            prune = work / f"{fixture.name}-prune-w4"
            if not (prune / "plan.json").is_file():
                r = _run(["pipeline", "prune", "--model", str(fixture), "--out", str(prune), "--sparsity", "dense", "--method", "magnitude",
                          "--weight-bits", "4", "--quant-method", "rtn", "--samples", "1", "--no-progress"], log_file)
                rows.append({"step": f"prune --weight-bits 4 ({fixture.name})", **r})
                if r["status"]:
                    log.warning("the INT4 prune of %s failed (exit %d); see %s", fixture.name, r["status"], log_file)
                    continue
            argv += ["--pruned", str(prune)]
        log.info("export %s of %s", label, fixture.name)
        r = _run(argv, log_file)
        rows.append({"step": f"export {label} ({fixture.name})", **r})
        if r["status"]:
            log.warning("export %s of %s failed (exit %d); see %s", label, fixture.name, r["status"], log_file)
    return out


def _measure_export(fixture: Path, export_dir: Path) -> dict[str, dict[str, Any]]:
    """Every component of one export: its measured bytes, the computed bytes in the export's layout, their ratio."""
    from families.pipeline_sizes import component_bytes, pipeline_weights
    from families.registry import resolve_model

    report_file = export_dir / "export_report.json"
    if not report_file.is_file():
        return {}
    report = json.loads(report_file.read_text())
    weights = pipeline_weights(resolve_model(str(fixture)))
    configs = {n: json.loads((fixture / n / "config.json").read_text()) for n in ("transformer", "text_encoder_3") if (fixture / n / "config.json").is_file()}
    out = {}
    for name, entry in report.get("components", {}).items():
        path = export_dir / "onnx" / entry.get("file", f"{name}.onnx")
        if not path.is_file():
            continue
        precision = export_precision(name, entry, report)
        w = weights[_component_of(name)]
        computed = component_bytes(w, precision) + export_adjustment(w, precision, report, entry, configs)
        measured = onnx_bytes(path)
        out[name] = {"layout": precision.label(), "computed": computed, **measured, "ratio": measured["file"] / computed}
    return out


def run(args) -> dict[str, Any]:
    from families import published_config
    from families.components import T5_XXL
    from families.pipeline_sizes import Precision, component_bytes, pipeline_weights
    from families.registry import resolve_model

    work = Path(args.work)
    program.check_out(work / "size_check.json")
    work.mkdir(parents=True, exist_ok=True)
    log_file = work / "size_check.log"
    steps: list[dict[str, Any]] = []
    result: dict[str, Any] = {"family": FAMILY, "tolerance": args.tolerance, "depths": args.depths, "steps": steps}

    # 1. the full-size fixture's float16 files
    if not args.no_full:
        full = _fixture(Path(args.fixture), None, log_file, steps)
        weights = pipeline_weights(resolve_model(str(full)))
        rows = {}
        for name, w in weights.items():
            computed = component_bytes(w, Precision("fp16"))
            measured = safetensors_bytes(full / name, "decoder." if w.kind == "vae_decoder" else "")
            rows[name] = {"parameters": w.numel, "computed": computed, "file": measured, "ratio": measured / computed}
        result["fixture_fp16"] = rows

    # 2. the exports at two depths, extrapolated to the published depth
    a, b = args.depths
    depth_dirs = {d: _fixture(work / f"fixture-d{d}", d, log_file, steps) for d in (a, b)}
    measured: dict[int, dict[str, dict[str, Any]]] = {}
    reports: dict[str, Path] = {}
    for d, fixture in depth_dirs.items():
        measured[d] = {}
        for label, export_dir in _exports(fixture, work, log_file, steps, deepest=d == b, only=args.only).items():
            for name, row in _measure_export(fixture, export_dir).items():
                measured[d][f"{label}:{name}"] = row
                reports.setdefault(f"{label}:{name}", export_dir / "export_report.json")
    result["exports"] = {str(d): rows for d, rows in measured.items()}
    published = pipeline_weights(resolve_model(FAMILY))
    configs = {"transformer": published_config(FAMILY)[1], "text_encoder_3": T5_XXL}
    target = {"transformer": published_config(FAMILY)[1]["num_layers"], "text_encoder_3": T5_XXL["num_layers"]}  # the depth-dependent ones
    extrapolated = {}
    for key in sorted(measured[b]):
        name = key.split(":")[1]
        depth = target.get(name)
        ra, rb = measured[a].get(key), measured[b][key]
        if depth and ra is None:
            continue  # a depth-dependent export that failed at the other depth
        row: dict[str, Any] = {"layout": rb["layout"], "depth": depth}
        if depth:  # extrapolate the file bytes to the published depth
            row["file"] = round(extrapolate(a, ra["file"], b, rb["file"], depth))
            row["per_layer"] = (rb["file"] - ra["file"]) / (b - a)
        else:  # the published size in the fixture already: the file itself
            row["file"] = rb["file"]
        report = json.loads(reports[key].read_text())
        w, precision = published[_component_of(name)], export_precision(name, report["components"][name], report)
        row["computed"] = component_bytes(w, precision) + export_adjustment(w, precision, report, report["components"][name], configs)
        row["ratio"] = row["file"] / row["computed"]
        row["ok"] = abs(row["ratio"] - 1) <= args.tolerance
        extrapolated[key] = row
    result["published_depth"] = extrapolated
    result["pipelines"] = {name: {"file": sum(extrapolated[k]["file"] for k in keys), "computed": sum(extrapolated[k]["computed"] for k in keys)}
                           for name, keys in PIPELINES.items() if all(k in extrapolated for k in keys)}
    for row in result["pipelines"].values():
        row["ratio"] = row["file"] / row["computed"]
        row["ok"] = abs(row["ratio"] - 1) <= args.tolerance
    result.update(program.environment("cpu", ("torch", "diffusers", "transformers", "onnx", "onnxruntime")))
    program.write(work / "size_check.json", result, markdown(result), echo=True)
    return result


def markdown(r: dict[str, Any]) -> str:
    gib = 2**30
    lines = [f"# Size check: computed weights against real files ({r['family']})", "",
             f"Host: {r['device']}. Tolerance {r['tolerance']:.0%}.", ""]
    if "fixture_fp16" in r:
        lines += ["## The fixture's float16 safetensors (published sizes, full depth)", "",
                  "| component | parameters | computed GiB | files GiB | files / computed |", "|---|---|---|---|---|"]
        for name, x in r["fixture_fp16"].items():
            lines.append(f"| {name} | {x['parameters'] / 1e9:.3f}B | {x['computed'] / gib:.3f} | {x['file'] / gib:.3f} | {x['ratio']:.4f} |")
    a, b = r["depths"]
    lines += ["", f"## Exports at depths {a} and {b} (files: graph + external data)", "",
              "| export | layout | " + " | ".join(f"depth {d}: file / computed" for d in (a, b)) + " |", "|---|---|---|---|"]
    keys = sorted(set(r["exports"][str(a)]) | set(r["exports"][str(b)]))
    for key in keys:
        cells = [f"{x['file'] / gib:.3f} / {x['computed'] / gib:.3f} GiB ({x['ratio']:.4f})" if x else "" for x in
                 (r["exports"][str(a)].get(key), r["exports"][str(b)].get(key))]
        layout = (r["exports"][str(a)].get(key) or r["exports"][str(b)].get(key))["layout"]
        lines.append(f"| {key} | {layout} | " + " | ".join(cells) + " |")
    lines += ["", "## At the published depth (24 blocks, 24 T5 layers)", "",
              "| export | layout | measured GiB | computed GiB | measured / computed | within tolerance |", "|---|---|---|---|---|---|"]
    for key, x in r["published_depth"].items():
        how = f"extrapolated from depths {a}, {b}" if x["depth"] else "the file (full size in the fixtures)"
        lines.append(f"| {key} | {x['layout']} | {x['file'] / gib:.3f} ({how}) | {x['computed'] / gib:.3f} | {x['ratio']:.4f} | {'yes' if x['ok'] else 'NO'} |")
    if r.get("pipelines"):
        lines += ["", "## Whole pipelines in the exports' layouts (published depth)", "",
                  "| pipeline | measured GiB | computed GiB | measured / computed | within tolerance |", "|---|---|---|---|---|"]
        for name, x in r["pipelines"].items():
            lines.append(f"| {name} | {x['file'] / gib:.3f} | {x['computed'] / gib:.3f} | {x['ratio']:.4f} | {'yes' if x['ok'] else 'NO'} |")
    lines += ["", "| step | seconds | peak RSS GiB | exit |", "|---|---|---|---|"]
    for s in r["steps"]:
        lines.append(f"| {s['step']} | {s['seconds']:.0f} | {s['peak_rss_gib']:.2f} | {s['status']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from common.cli import int_at_least

    p = program.parser("size_check", __doc__)
    p.add_argument("--fixture", default=str(REPO_ROOT / "artifacts" / "fixtures" / f"{FAMILY}-full"),
                   help="the full-size fixture with published-size text encoders (built if missing)")
    p.add_argument("--work", default=str(REPO_ROOT / "artifacts" / "sizes" / "check"), help="reduced fixtures, exports and the report")
    p.add_argument("--depths", type=int_at_least(1), nargs=2, default=[1, 2], metavar=("A", "B"),
                   help="transformer blocks and T5 layers of the two reduced fixtures (default 1 2)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="relative difference allowed (default 0.02)")
    p.add_argument("--no-full", action="store_true", help="skip the full-size fixture's float16 files")
    p.add_argument("--only", type=program.split_list, default=[], metavar="LABELS",
                   help=f"comma-separated exports to run (default all: {', '.join(EXPORTS)})")

    def body(args) -> int:
        if args.depths[0] >= args.depths[1]:
            raise UserError("--depths A B: give two depths with A < B, e.g. 1 2")
        unknown = [x for x in args.only if x not in EXPORTS]
        if unknown:
            raise UserError(f"--only {','.join(unknown)}: unknown; choose from {', '.join(EXPORTS)}")
        r = run(args)
        return 0 if all(x["ok"] for part in ("published_depth", "pipelines") for x in r[part].values()) else 1

    return program.run(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
