"""Stage 2's driver: its typed settings (:class:`ExportSettings`, :class:`QuantCalibration`), the checks
that need no weights (:func:`check_export`, :func:`check_pruned`) and :func:`run_export`, which writes under
``settings.out`` the compact checkpoint (``compact/``), one ONNX per component (``onnx/``) and
``export_report.json`` (written last: it marks the output complete), or reuses a current output.

What the output holds, how a quantized export calibrates and when an output is reused: ``docs/export.md``.
``python -m pipeline export`` parses its options into :class:`ExportSettings`; ``make engine`` builds them itself.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from tqdm import tqdm

from common.errors import UserError
from common.input_files import check_input_tree
from common.io import atomic_path, check_output, created_dirs, expect_space, read_json, write_json
from common.memory import log_memory

if TYPE_CHECKING:
    from families.registry import ModelSpec
    from families.shapes import ServedShapes

log = logging.getLogger(__name__)

REPORT = "export_report.json"
POLYGRAPHY_MODES = ("auto", "on", "off")
# Every transformer precision of stage 2: the float formats of export.dynamo_export, the quantized ones of
# export.quantize, and stage 1's 4-bit weights (they need a `prune --weight-bits 4` directory): int4 as ONNX Runtime's
# MatMulNBits (export.int4_export), w4a16 as TensorRT's INT4 DequantizeLinear in a float16 graph (export.int4_qdq).
# The transformer only; the other components then use OTHERS_PRECISION.
PRECISIONS = ("fp32", "fp16", "int8", "fp8", "int4", "w4a16")
QUANT_PRECISIONS = ("int8", "fp8")
# The other components' default precision next to a transformer precision: float32 next to a float32 transformer
# (CPU runtimes), float16 next to the GPU-only ones (fp16, fp8, w4a16: TensorRT builds every component); next to an
# INT8 or INT4 transformer the text encoders are weight-only INT8 (ONNX Runtime's MatMulNBits, VAE float32): on
# tiny-sd3 and tiny-flux they keep prompt accuracy 1.000 and the Fréchet distance within its spread at 0.01 relative
# output error. INT4 encoders (--others-precision int4, what the size goals need) err 0.2: 17x INT8's for 1.6x smaller
# encoders, a cost the user chooses (docs/low-precision.md#compressed-text-encoders). A TensorRT build of such an
# export takes its transformer only.
OTHERS_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "fp8": "fp16", "int4": "int8", "w4a16": "fp16"}
INT4_PRECISIONS = ("int4", "w4a16")  # stage 1's 4-bit weights, loaded in float32 with their codes attached
# The other components' precisions: float32 (CPU runtimes), float16 (GPU runtimes), or weight-only INT8/INT4 text
# encoders for ONNX Runtime (export.encoder_quant; the VAE decoder then stays float32). docs/low-precision.md.
OTHER_PRECISIONS = ("fp32", "fp16", "int8", "int4")
DEFAULT_QUANT_SAMPLES = 8
DEFAULT_QUANT_CALLS = 64


@dataclass(frozen=True)
class QuantCalibration:
    """How an INT8/FP8 export calibrates the transformer's activation ranges (max calibration, ModelOpt).

    The trajectories are stage 1's: its first ``samples`` prompts, prompt ``i`` from noise seeded ``seed + i``,
    with its steps and guidance (the model's deployed sampler) at the model's image size, run through the real
    pipeline with the pruned (compact) transformer in it (:func:`export.calibration.record_calibration_inputs`).

    samples: trajectories (default 8). max_calls: transformer calls kept, spread evenly over each trajectory
    (default 64 in all). prompts: stage 1's prompt list (``make engine`` passes its prune stage's); None: the
    model's prompt file, cycled to the plan's sample count (checked against the plan's prompts hash; a dense
    export takes the file as it is). steps / guidance / seed: None takes the plan's (a dense export: the
    model's steps and guidance, seed 0).
    """

    samples: int = DEFAULT_QUANT_SAMPLES
    max_calls: int = DEFAULT_QUANT_CALLS
    prompts: tuple[str, ...] | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None

    def check(self) -> None:
        for name, value in (("calibration samples", self.samples), ("calibration calls", self.max_calls), ("calibration steps", self.steps)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.seed is not None and self.seed < 0:
            raise UserError(f"the calibration seed must be >= 0, got {self.seed}")
        if self.prompts is not None and not [p for p in self.prompts if p.strip()]:
            raise UserError("the calibration prompt list is empty")


@dataclass(frozen=True)
class ExportSettings:
    """What stage 2 exports, and where.

    spec: the model (:func:`families.registry.resolve_model`). out: output directory (may be the stage-1
    directory). pruned: stage-1 directory (``plan.json`` + ``transformer/``), or None to export the dense
    model. precision: the transformer's, ``"fp32"`` (CPU runtimes), ``"fp16"`` (TensorRT, strongly typed),
    ``"int8"`` or ``"fp8"`` (quantized, see the module docstring), ``"int4"`` (stage 1's 4-bit weights, ONNX Runtime's
    ``MatMulNBits``: :mod:`export.int4_export`), ``"w4a16"`` (the same weights as TensorRT's INT4 ``DequantizeLinear``
    in a float16 graph: :mod:`export.int4_qdq`). others_precision: the other components'
    (:data:`OTHER_PRECISIONS`: ``"fp32"``, ``"fp16"``, or ``"int8"``/``"int4"``: weight-only text encoders for ONNX
    Runtime and a float32 VAE decoder; None: :data:`OTHERS_PRECISION`). drop_t5: leave out the family's optional
    T5 encoder (SD3's ``text_encoder_3``; the pipeline then runs with ``text_encoder_3=None``). calibration: an INT8/FP8 export's
    :class:`QuantCalibration` (None: its defaults). components:
    names from the family's components (exported in the family's order), None for all of them.
    parity_batches: batch sizes of the ONNX Runtime-vs-torch checks (empty: no checks). parity_memory: the
    activation memory (bytes) each check may take before it runs at a smaller latent shape (None: half the
    component's ONNX weights + 1 GiB, :func:`export.parity.parity_memory_cap`). share_from: a finished dense
    export of the same model whose text encoders and VAE decoder this one links instead of exporting them again
    where they match (:mod:`export.component_reuse`; ignored where they do not). polygraphy: cross-check
    2:4 with polygraphy, ``"auto"`` (ONNX < 256 MB), ``"on"`` or ``"off"``. force: re-export even if the
    existing output is current.
    """

    spec: ModelSpec
    out: Path
    pruned: Path | None = None
    precision: str = "fp32"
    components: tuple[str, ...] | None = None
    parity_batches: tuple[int, ...] = (1, 3)
    polygraphy: str = "auto"
    force: bool = False
    shapes: ServedShapes | None = None
    calibration: QuantCalibration | None = None
    others_precision: str | None = None
    parity_memory: int | None = None
    share_from: Path | None = None
    drop_t5: bool = False

    @property
    def quantized(self) -> bool:
        """Whether the transformer is exported INT8 or FP8."""
        return self.precision in QUANT_PRECISIONS

    @property
    def other_precision(self) -> str:
        """The precision of the components other than the transformer."""
        return self.others_precision or OTHERS_PRECISION.get(self.precision, "fp32")

    @property
    def quant_calibration(self) -> QuantCalibration | None:
        """The calibration of a quantized export (None for a float one)."""
        return (self.calibration or QuantCalibration()) if self.quantized else None

    @property
    def served(self) -> ServedShapes:
        """The shapes to serve (default: the registry's resolution and batch range)."""
        from families.shapes import served_shapes

        return self.shapes if self.shapes is not None else served_shapes(self.spec)

    @property
    def component_names(self) -> list[str]:
        """The components to export, in the family's order (without :attr:`dropped`)."""
        return [c for c in resolve_components(self.spec, self.components) if c not in self.dropped]

    @property
    def dropped(self) -> tuple[str, ...]:
        """The components the served pipeline runs without (``drop_t5``: the family's optional T5 encoder)."""
        optional = self.spec.adapter.optional_text_encoder if self.drop_t5 else None
        return tuple(c.name for c in self.spec.adapter.components if optional is not None and c.attr == optional)

    def to_json(self) -> dict[str, Any]:
        """The settings as a manifest records them."""
        return {"model": self.spec.id, "out": str(self.out), "pruned": str(self.pruned) if self.pruned is not None else None,
                "precision": self.precision, "components": self.component_names, "parity_batches": list(self.parity_batches),
                "parity_memory": self.parity_memory, "share_from": str(self.share_from) if self.share_from else None,
                "polygraphy": self.polygraphy, "force": self.force, "shapes": self.served.to_json(), "others_precision": self.other_precision,
                "drop_t5": self.drop_t5, "calibration": _calibration_json(self.quant_calibration)}


def _calibration_json(calib: QuantCalibration | None) -> dict[str, Any] | None:
    """A :class:`QuantCalibration` as the manifest records it (the prompts by count and hash)."""
    if calib is None:
        return None
    out = {k: v for k, v in calib.__dict__.items() if k != "prompts"}
    if calib.prompts is not None:
        out["prompts"] = {"count": len(calib.prompts), "sha256": hashlib.sha256("\n".join(calib.prompts).encode()).hexdigest()}
    return out


def resolve_components(spec: ModelSpec, names: Sequence[str] | None) -> list[str]:
    """``names`` in the family's order (None: every component of the family); one line for an unknown name."""
    known = [c.name for c in spec.adapter.components]
    if names is None:
        return known
    bad = [c for c in names if c not in known]
    if bad or not names:
        raise UserError(f"unknown component(s) {bad or list(names)!r} for {spec.id}; choose from {','.join(known)}")
    return [c for c in known if c in names]


def check_export(settings: ExportSettings) -> list[str]:
    """Every check of stage 2 that needs no model weights (values and outputs); returns the components.

    ``settings.pruned`` is checked by :func:`run_export` (``make engine`` checks its export stages before
    stage 1 has written the pruned directory).
    """
    if settings.drop_t5 and settings.spec.adapter.optional_text_encoder is None:
        raise UserError(f"{settings.spec.id} cannot run without its T5 encoder (the {settings.spec.family} transformer is conditioned on "
                        f"T5's tokens; dropping T5 is for SD3-family models): remove --drop-t5")
    if settings.drop_t5 and settings.components is not None and set(settings.dropped) & set(settings.components):
        raise UserError(f"--drop-t5 leaves {', '.join(settings.dropped)} out of the pipeline; remove it from --components")
    components = settings.component_names
    if settings.precision not in PRECISIONS:
        raise UserError(f"unknown export precision {settings.precision!r}; choose from {', '.join(PRECISIONS)}")
    if settings.others_precision is not None and settings.others_precision not in OTHER_PRECISIONS:
        raise UserError(f"unknown precision {settings.others_precision!r} for the other components; choose from {', '.join(OTHER_PRECISIONS)} "
                        f"(int8/int4: weight-only text encoders for ONNX Runtime)")
    if settings.quantized:
        settings.quant_calibration.check()
        served = settings.served
        if served.dynamic_spatial:
            raise UserError(f"a {settings.precision} transformer is exported for one resolution (batch dynamic; the TorchScript "
                            f"exporter that writes Q/DQ fixes the spatial dims); got {served.describe()}: pass one --resolution")
        if "transformer" not in components:
            raise UserError(f"--precision {settings.precision} quantizes the transformer; include it in --components")
    if settings.precision in INT4_PRECISIONS:
        from export.int4_export import check_int4_export

        check_int4_export(settings.pruned, components, read_plan=False, precision=settings.precision)
    if settings.polygraphy not in POLYGRAPHY_MODES:
        raise UserError(f"polygraphy must be one of {', '.join(POLYGRAPHY_MODES)}, got {settings.polygraphy!r}")
    if any(int(b) < 1 for b in settings.parity_batches):
        raise UserError(f"--parity-batches must be positive, got {','.join(map(str, settings.parity_batches))!r}")
    share = Path(settings.share_from) if settings.share_from is not None else None
    if share is not None and share.exists() and not share.is_dir():  # absent is fine: `make engine` names it before it exists
        raise UserError(f"--share-from {share} is not a directory; give a finished dense export of {settings.spec.id} (an export --out directory)")
    out = Path(settings.out)
    check_output(out, "parent")
    check_output(out / "compact", "dir")
    check_output(out / "onnx", "dir")
    check_output(out / REPORT, "file")
    return components


def check_pruned(pruned: Path, spec: ModelSpec | None = None) -> None:
    """One line, before loading anything, when ``pruned`` is not a finished stage-1 directory, or (given ``spec``)
    one made for another model: its plan's model, family and weights fingerprint, and its transformer's config,
    against ``spec``'s (:func:`families.registry.other_model`)."""
    from families.registry import other_model, transformer_difference
    from obsdiff.plan import PrunePlan

    if not pruned.is_dir():
        raise UserError(f"--pruned {pruned} is not a directory; pass the output directory of `python -m pipeline prune`")
    if not (pruned / "plan.json").is_file():
        raise UserError(f"missing {pruned / 'plan.json'}; pass the output directory of `python -m pipeline prune` as --pruned")
    plan = PrunePlan.load(pruned / "plan.json")
    fix = f"pass the --model it was pruned from ({plan.model})" + (f", or prune {spec.id}" if spec is not None else "")
    other = other_model(spec, model=plan.model, family=plan.family, weights=plan.model_weights) if spec is not None else None
    if other:
        raise UserError(f"--pruned {pruned} {other}; {fix}")
    if not plan.complete:
        raise UserError(f"{pruned / 'plan.json'} is partial ({plan.done_packages}/{len(plan.packages)} packages); finish `python -m pipeline prune` first")
    if not (pruned / "transformer" / "config.json").is_file():
        raise UserError(f"missing {pruned / 'transformer'} (the pruned diffusers transformer); re-run `python -m pipeline prune`")
    differs = transformer_difference(spec, read_json(pruned / "transformer" / "config.json", what="transformer config")) if spec is not None else None
    if differs:
        raise UserError(f"--pruned {pruned}: its transformer is not {spec.id}'s ({differs}); "
                        + ("re-run `python -m pipeline prune`" if plan.model == spec.id else fix))
    check_input_tree(pruned / "transformer", fix="re-run `python -m pipeline prune`")  # weights cut short: one line naming the file


def run_export(settings: ExportSettings) -> dict[str, Any]:
    """Run stage 2 (see the module docstring); returns the report written to ``out/export_report.json``
    (the existing one when the output is reused).

    Checks everything that needs no weights first (:func:`check_export`, :func:`check_pruned`); a failure
    leaves no ``out`` that this call created.
    """
    from dataclasses import replace

    from export.calibration import resolve_calibration
    from export.fingerprint import covers, fingerprint, output_complete
    from families.registry import ExportShapes

    t_start = time.perf_counter()
    components = check_export(settings)
    served = settings.served
    # Below, spec.shapes is the optimisation shape (the first resolution); the others are checked too.
    spec = replace(settings.spec, shapes=ExportShapes(*served.latent_opt, served.text_seq_len, *served.batch))
    out = Path(settings.out)
    pruned = Path(settings.pruned) if settings.pruned is not None else None
    if pruned is not None:
        check_pruned(pruned, settings.spec)
    if settings.precision in INT4_PRECISIONS:  # a float or 8-bit prune: one line before anything is loaded
        from export.int4_export import check_int4_export

        check_int4_export(pruned, components, precision=settings.precision)

    calibration = resolve_calibration(spec, pruned, settings.quant_calibration, served) if settings.quantized else None
    inputs = fingerprint(spec, pruned, settings.precision, components, served, calibration=calibration, others_precision=settings.other_precision)
    if settings.dropped:  # an export that holds T5 does not serve a request without it, nor the other way round
        inputs["dropped"] = list(settings.dropped)
    report_path = out / REPORT
    if report_path.is_file() and not settings.force:
        try:
            old = read_json(report_path)
        except UserError:
            old = {}
        if old.get("inputs") == inputs and output_complete(out, old):
            log.info("reusing the existing export in %s: its inputs (plan, weights, precision, versions) are unchanged", out)
            return old
        if covers(old.get("inputs") or {}, inputs) and output_complete(out, old):
            log.info("reusing the existing export in %s: same inputs, and it holds every component asked for (%s)", out, ", ".join(components))
            return old
        log.info("existing export in %s is stale or incomplete: re-exporting", out)
    need = _expected_bytes(spec, pruned, components, settings)
    if need:  # one line now if the disk cannot hold the export, and the size a later disk-full line quotes
        expect_space(out, need, f"the {settings.precision} export of {', '.join(components)}")
    with created_dirs(out):  # a failure leaves no out directory that this run created
        report_path.unlink(missing_ok=True)  # nothing looks complete until the new report is written
        report = _load_and_export(spec, pruned, components, list(settings.parity_batches), settings, out, calibration, inputs)
        report["inputs"] = inputs
        report["pruned_dir"] = str(pruned) if pruned is not None else None
        report["weights"] = _weights(out, report)
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_json(report_path, report)
    log.info("export complete: %s (%.1f s)", report_path, report["elapsed_s"])
    return report


def _weights(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The report's ``weights`` section: each component's bytes on disk and as ONNX Runtime holds them
    (:func:`export.weights.measure_export_weights`; docs/memory.md), logged as one line."""
    from export.onnx_files import human_bytes
    from export.weights import measure_export_weights

    precisions = {k: v.get("precision") for k, v in report.get("components", {}).items() if isinstance(v, dict)}
    weights = measure_export_weights(out, precisions=precisions, dropped=report.get("dropped") or ())
    total = weights["total"]
    loaded = human_bytes(total["loaded_bytes"]) if total["loaded_bytes"] is not None else "(not measured for every component)"
    log.info("weights: %s on disk, %s as ONNX Runtime holds them (per component: the report's weights)", human_bytes(total["disk_bytes"] or 0), loaded)
    return weights


_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1, "w4a16": 3}  # w4a16: a float32 compact/ and a float16 ONNX


def _expected_bytes(spec, pruned: Path | None, components, settings: ExportSettings) -> int:
    """About what stage 2 writes, from the weights' safetensors headers (no weights read): the transformer
    twice (compact checkpoint and ONNX) in its export precision, every other component once in its own
    (float32 where the family keeps it so). 0 when the weights cannot be counted (a hub model not local)."""
    from common.input_files import safetensors_numel
    from families.components import find_component
    from families.registry import component_numel

    total = 0
    for name in components:
        if name == "transformer":
            files = sorted((pruned / "transformer").glob("*.safetensors")) if pruned is not None else []
            numel = sum(safetensors_numel(f) for f in files) if files else component_numel(spec, "transformer")
            total += 2 * (numel or 0) * _BYTES.get(settings.precision, 4)
        else:
            comp = find_component(spec.adapter, name)
            numel = component_numel(spec, comp.attr) or 0
            # weight-only INT8/INT4 (text encoders): float32 first, then the quantized copy beside it (at most 1 byte a
            # weight); the VAE decoder float32
            weight_only = settings.other_precision in ("int8", "int4")
            total += numel * ((4 if comp.keep_fp32 or weight_only else _BYTES.get(settings.other_precision, 4)) + (weight_only and comp.weight_only))
    return total


# --------------------------------------------------------------------------------------------------------
# Load, cut, save, export


def _load_pruned(pruned: Path, dtype=torch.float32):
    from export.checkpoint import transformer_class
    from obsdiff.plan import PrunePlan

    check_pruned(pruned)
    plan = PrunePlan.load(pruned / "plan.json")
    try:
        cls = transformer_class(read_json(pruned / "transformer" / "config.json", what="transformer config").get("_class_name", ""))
        transformer = cls.from_pretrained(str(pruned / "transformer"), dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load {pruned / 'transformer'}: {str(e).splitlines()[0]}; re-run `python -m pipeline prune`") from None
    if dtype == torch.float32:  # a --weight-bits prune: its integer weights ride along (exact in float32 only)
        from export.int_weights import attach

        attach(transformer, plan, pruned / "transformer")
    return plan, transformer.eval()


def _load_and_export(spec, pruned: Path | None, components, batches, settings: ExportSettings, out: Path,
                     calibration: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load, cut, save and export one component at a time, so that memory stays near one copy of the
    biggest component's weights in the export precision (see :func:`export.float_export.export_float_transformer`; a quantized export
    loads the transformer in float32 and, while calibrating, the whole pipeline)."""
    from common.dtypes import precision_dtype
    from export.compact_export import save_compact_transformer
    from export.component_reuse import link_component, shared_components
    from export.float_export import export_float_transformer, export_other_component
    from export.quant_export import export_quantized_transformer
    from families.registry import load_component

    dtype = precision_dtype("fp32" if settings.quantized or settings.precision in INT4_PRECISIONS else settings.precision)
    plan = None
    if pruned is not None:
        plan, transformer = _load_pruned(pruned, dtype)
    else:
        transformer = load_component(spec, "transformer", dtype=dtype).eval()
    log_memory("export: transformer loaded", log)
    report: dict[str, Any] = {
        "model": spec.id,
        "precision": settings.precision,
        "shapes": {**spec.shapes.__dict__, "per_step_batch": spec.shapes.batch_opt},
        "served_shapes": settings.served.to_json(),
        "sparsity": plan.sparsity if plan is not None else "dense",
        "others_precision": settings.other_precision,
        "dropped": list(settings.dropped),
    }
    results: dict[str, Any] = {}
    with atomic_path(out / "onnx") as onnx_dir:
        onnx_dir.mkdir()
        holder = [transformer]
        del transformer  # the holder owns it: the transformer's export frees it before ONNX Runtime runs
        if "transformer" in components and settings.quantized:
            results["transformer"] = export_quantized_transformer(spec, plan, holder, batches, settings, out, onnx_dir / "transformer.onnx", report,
                                                                   calibration)
        elif "transformer" in components and settings.precision == "int4":
            from export.int4_export import export_int4_transformer

            results["transformer"] = export_int4_transformer(spec, plan, holder, batches, settings, out, onnx_dir / "transformer.onnx", report)
        elif "transformer" in components and settings.precision == "w4a16":
            from export.int4_qdq import export_w4a16_transformer

            results["transformer"] = export_w4a16_transformer(spec, plan, holder, batches, settings, out, onnx_dir / "transformer.onnx", report)
        elif "transformer" in components:
            results["transformer"] = export_float_transformer(spec, plan, holder, batches, settings, out, onnx_dir / "transformer.onnx", report)
        else:
            save_compact_transformer(spec, plan, holder, batches, out, report, settings.served)
            holder.clear()
        others = [c for c in components if c != "transformer"]
        shared = shared_components(settings.share_from, inputs or {}, others) if pruned is not None else {}
        for name in tqdm(others, desc="export ONNX", unit="component", disable=None if others else True):
            if name in shared:
                results[name] = link_component(settings.share_from, shared[name], onnx_dir)
                continue
            results[name] = export_other_component(spec, name, settings.other_precision, batches, onnx_dir / f"{name}.onnx", settings.served,
                                                   settings.parity_memory)
        report["components"] = results
    return report
