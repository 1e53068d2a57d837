"""Stage 2's driver: from a pruned (or dense) transformer to a compact checkpoint and ONNX.

:func:`run_export` writes, under ``settings.out``:

- ``compact/`` (``model.safetensors`` + ``compact.json``): the transformer with pruned heads/neurons removed;
- ``onnx/<component>.onnx`` for transformer, text_encoder, text_encoder_2, text_encoder_3, vae_decoder;
- ``export_report.json``: parameters, GEMM FLOPs per denoising step, file sizes, parity errors, the
  sparse-eligible share of GEMM FLOPs, precision and shapes, and the fingerprint of the inputs.

The report is written last and marks the output complete. A rerun whose inputs (hash of ``plan.json`` and
the transformer weights, model, precision, components, shapes, library versions, this stage's code) are
unchanged reuses the existing output. ``compact/`` and ``onnx/`` are each replaced atomically.

``python -m pipeline export`` parses its options into :class:`ExportSettings` and calls :func:`run_export`;
``make engine`` builds the settings itself. :func:`check_export` holds every check that needs no weights.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from tqdm import tqdm

from common.errors import UserError
from common.io import atomic_path, check_output, created_dirs, read_json, sha256_file, sha256_tree, write_json
from common.memory import log_memory, release_to_os

if TYPE_CHECKING:
    from families.registry import ModelSpec
    from families.shapes import ServedShapes

log = logging.getLogger(__name__)

REPORT = "export_report.json"
REPORT_VERSION = 1
SURGERY_TOLERANCE = 1e-5
POLYGRAPHY_MODES = ("auto", "on", "off")
_VERSIONED = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx-graphsurgeon")


@dataclass(frozen=True)
class ExportSettings:
    """What stage 2 exports, and where.

    spec: the model (:func:`families.registry.resolve_model`). out: output directory (may be the stage-1
    directory). pruned: stage-1 directory (``plan.json`` + ``transformer/``), or None to export the dense
    model. precision: ``"fp32"`` (CPU runtimes) or ``"fp16"`` (TensorRT, strongly typed). components:
    names from the family's components (exported in the family's order), None for all of them.
    parity_batches: batch sizes of the ONNX Runtime-vs-torch checks (empty: no checks). polygraphy: cross-check
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

    @property
    def served(self) -> ServedShapes:
        """The shapes to serve (default: the registry's resolution and batch range)."""
        from families.shapes import served_shapes

        return self.shapes if self.shapes is not None else served_shapes(self.spec)

    @property
    def component_names(self) -> list[str]:
        """The components to export, in the family's order."""
        return resolve_components(self.spec, self.components)

    def to_json(self) -> dict[str, Any]:
        """The settings as a manifest records them."""
        return {"model": self.spec.id, "out": str(self.out), "pruned": str(self.pruned) if self.pruned is not None else None,
                "precision": self.precision, "components": self.component_names, "parity_batches": list(self.parity_batches),
                "polygraphy": self.polygraphy, "force": self.force, "shapes": self.served.to_json()}


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
    from export.onnx_export import PRECISIONS

    components = settings.component_names
    if settings.precision not in PRECISIONS:
        raise UserError(f"unknown export precision {settings.precision!r}; choose from {', '.join(PRECISIONS)}")
    if settings.polygraphy not in POLYGRAPHY_MODES:
        raise UserError(f"polygraphy must be one of {', '.join(POLYGRAPHY_MODES)}, got {settings.polygraphy!r}")
    if any(int(b) < 1 for b in settings.parity_batches):
        raise UserError(f"--parity-batches must be positive, got {','.join(map(str, settings.parity_batches))!r}")
    out = Path(settings.out)
    check_output(out, "parent")
    check_output(out / "compact", "dir")
    check_output(out / "onnx", "dir")
    check_output(out / REPORT, "file")
    return components


def check_pruned(pruned: Path) -> None:
    """One line, before loading anything, when ``pruned`` is not a finished stage-1 directory."""
    from obsdiff.plan import PrunePlan

    if not pruned.is_dir():
        raise UserError(f"--pruned {pruned} is not a directory; pass the output directory of `python -m pipeline prune`")
    if not (pruned / "plan.json").is_file():
        raise UserError(f"missing {pruned / 'plan.json'}; pass the output directory of `python -m pipeline prune` as --pruned")
    plan = PrunePlan.load(pruned / "plan.json")
    if not plan.complete:
        raise UserError(f"{pruned / 'plan.json'} is partial ({plan.done_packages}/{len(plan.packages)} packages); finish `python -m pipeline prune` first")
    if not (pruned / "transformer" / "config.json").is_file():
        raise UserError(f"missing {pruned / 'transformer'} (the pruned diffusers transformer); re-run `python -m pipeline prune`")


def run_export(settings: ExportSettings) -> dict[str, Any]:
    """Run stage 2 (see the module docstring); returns the report written to ``out/export_report.json``
    (the existing one when the output is reused).

    Checks everything that needs no weights first (:func:`check_export`, :func:`check_pruned`); a failure
    leaves no ``out`` that this call created.
    """
    from dataclasses import replace

    from families.registry import ExportShapes

    t_start = time.perf_counter()
    components = check_export(settings)
    served = settings.served
    # Below, spec.shapes is the optimisation shape (the first resolution); the others are checked too.
    spec = replace(settings.spec, shapes=ExportShapes(*served.latent_opt, served.text_seq_len, *served.batch))
    out = Path(settings.out)
    pruned = Path(settings.pruned) if settings.pruned is not None else None
    if pruned is not None:
        check_pruned(pruned)

    inputs = fingerprint(spec, pruned, settings.precision, components, served)
    report_path = out / REPORT
    if report_path.is_file() and not settings.force:
        try:
            old = read_json(report_path)
        except UserError:
            old = {}
        if old.get("inputs") == inputs and _complete(out, old):
            log.info("reusing the existing export in %s: its inputs (plan, weights, precision, versions) are unchanged", out)
            return old
        log.info("existing export in %s is stale or incomplete: re-exporting", out)
    with created_dirs(out):  # a failure leaves no out directory that this run created
        report_path.unlink(missing_ok=True)  # nothing looks complete until the new report is written
        report = _load_and_export(spec, pruned, components, list(settings.parity_batches), settings, out)
        report["inputs"] = inputs
        report["pruned_dir"] = str(pruned) if pruned is not None else None
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_json(report_path, report)
    log.info("export complete: %s (%.1f s)", report_path, report["elapsed_s"])
    return report


# --------------------------------------------------------------------------------------------------------
# Fingerprint (reuse)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _code_hash() -> str:
    """This stage's code: every module of the ``export`` package (this driver included)."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _model_fingerprint(spec) -> str:
    if spec.local and spec.path is not None and spec.path.is_dir():
        return "sha256:" + sha256_tree(spec.path)
    try:
        from huggingface_hub import snapshot_download

        return "snapshot:" + Path(snapshot_download(spec.source, local_files_only=True)).name
    except Exception:  # not cached: loading will fail with a clear message later
        return "source:" + spec.source


def fingerprint(spec, pruned: Path | None, precision: str, components: list[str], served: ServedShapes | None = None) -> dict[str, Any]:
    """Everything the output depends on; equal fingerprints mean the existing output can be reused."""
    out: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "model": spec.id,
        "precision": precision,
        "components": list(components),  # a list, as the JSON report reads back
        "shapes": served.to_json() if served is not None else dict(spec.shapes.__dict__),
        "versions": _versions(),
        "code": _code_hash(),
    }
    needs_model = pruned is None or any(c != "transformer" for c in components)
    out["model_weights"] = _model_fingerprint(spec) if needs_model else None
    if pruned is not None:
        out["plan_sha256"] = sha256_file(pruned / "plan.json")
        out["transformer_sha256"] = sha256_tree(pruned / "transformer")
    return out


def _complete(out: Path, report: dict[str, Any]) -> bool:
    files = [out / "compact" / "model.safetensors", out / "compact" / "compact.json"]
    files += [out / "onnx" / c["file"] for c in report.get("components", {}).values()]
    return all(f.is_file() for f in files)


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
    return plan, transformer.eval()


def _transformer_output(model, spec, batch: int = 1):
    """The transformer's output on fixed random inputs at the export shapes, in float32 arithmetic."""
    from export.onnx_export import fp32_compute, transformer_inputs

    inputs = transformer_inputs(model, batch, (spec.shapes.latent_height, spec.shapes.latent_width), spec.shapes.text_seq_len, seed=7)
    with torch.no_grad(), fp32_compute(model) as m:
        return spec.adapter.transformer_for_onnx(m)(*inputs.values()).float().numpy()


def _load_and_export(spec, pruned: Path | None, components, batches, settings: ExportSettings, out: Path) -> dict[str, Any]:
    """Load, cut, save and export one component at a time, so that memory stays near one copy of the
    biggest component's weights in the export precision (see :func:`_export_transformer`)."""
    from export.onnx_export import torch_dtype
    from families.registry import load_component

    dtype = torch_dtype(settings.precision)
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
    }
    results: dict[str, Any] = {}
    with atomic_path(out / "onnx") as onnx_dir:
        onnx_dir.mkdir()
        holder = [transformer]
        del transformer  # the holder owns it: _export_transformer frees it before ONNX Runtime runs
        if "transformer" in components:
            results["transformer"] = _export_transformer(spec, plan, holder, batches, settings, out, onnx_dir / "transformer.onnx", report)
        else:
            _save_transformer(spec, plan, holder, batches, out, report, settings.served)
            holder.clear()
        others = [c for c in components if c != "transformer"]
        for name in tqdm(others, desc="export ONNX", unit="component", disable=None if others else True):
            results[name] = _export_other(spec, name, settings.precision, batches, onnx_dir / f"{name}.onnx", settings.served)
        report["components"] = results
    return report


def _save_transformer(spec, plan, holder: list, batches, out: Path, report: dict[str, Any], served: ServedShapes) -> None:
    """Cut the transformer in ``holder[0]`` in place (structured plans), check the cut, save ``compact/``;
    the FLOP table per served shape (2:4-eligible share and bounds) goes to ``report["transformer"]``."""
    from export.checkpoint import save_compact, verify_compact
    from export.onnx_export import rel_error
    from export.report import count_parameters, shape_table, transformer_flops
    from export.surgery import apply_plan
    from obsdiff.packages import build_units
    from obsdiff.patterns import parse_sparsity

    transformer = holder[0]
    shapes = spec.shapes
    latent_hw = (shapes.latent_height, shapes.latent_width)
    step_batch = shapes.batch_opt  # transformer batch per denoising step (2 with classifier-free guidance)
    dense_params = count_parameters(transformer)
    dense_flops = transformer_flops(transformer, step_batch, latent_hw, shapes.text_seq_len)
    # 2:4 can speed up the GEMMs of the layers stage 1 prunes (those of an N:M plan, else all it would prune)
    pattern = parse_sparsity(plan.sparsity) if plan is not None else None
    eligible = set(plan.layers) if pattern is not None and pattern.is_semi_structured else {n for u in build_units(transformer) for n in u.layers}
    table = shape_table(transformer, served.resolutions, vae_scale=served.vae_scale, batch=step_batch, text_seq_len=served.text_seq_len, eligible=eligible)
    is_cut = plan is not None and any(b.is_cut for b in plan.blocks)
    if is_cut:
        # The masked output is taken first and the cut is made in place: masked and compact never coexist.
        ref = _transformer_output(transformer, spec) if batches else None
        apply_plan(transformer, plan, require_masked=True)
        release_to_os()  # the cut frees the removed rows and columns layer by layer
        surgery: dict[str, Any] = {"tolerance": SURGERY_TOLERANCE}
        if ref is not None:
            err = rel_error(_transformer_output(transformer, spec), ref)
            surgery["max_rel_error"] = err
            if not err <= SURGERY_TOLERANCE:
                raise RuntimeError(f"compact transformer differs from the masked one: rel. error {err:.2e} > {SURGERY_TOLERANCE:.0e}")
            log.info("surgery: compact vs masked transformer rel. error %.2e (tolerance %.0e)", err, SURGERY_TOLERANCE)
        report["surgery"] = surgery
    elif plan is not None:
        apply_plan(transformer, plan)  # validates the plan against the model; cuts nothing
    save_compact(transformer, out / "compact", plan)
    verify_compact(out / "compact", transformer)
    log_memory("export: compact checkpoint saved and verified", log)
    compact_flops = transformer_flops(transformer, step_batch, latent_hw, shapes.text_seq_len) if is_cut else dense_flops
    if is_cut:
        for row, hw in zip(table, served.resolutions):
            cg = transformer_flops(transformer, step_batch, served.latent(hw), served.text_seq_len)["gemm"]
            row.update(structured_gemm_flops=cg, structured_flop_ratio=cg / row["gemm_flops"], bound_structured_transformer=row["gemm_flops"] / cg)
    report["transformer"] = {
        "params_dense": dense_params,
        "params_compact": count_parameters(transformer),
        "gemm_flops_per_step_dense": dense_flops["gemm"],
        "gemm_flops_per_step": compact_flops["gemm"],
        "flop_ratio": compact_flops["gemm"] / dense_flops["gemm"],
        "compact_bytes": (out / "compact" / "model.safetensors").stat().st_size,
        "compact_dtype": str(next(transformer.parameters()).dtype).removeprefix("torch."),
        "per_shape": table,
    }


def _export_transformer(spec, plan, holder: list, batches, settings: ExportSettings, out: Path, path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Surgery, compact checkpoint, ONNX, 2:4 checks, then ONNX Runtime parity after the torch model is freed.

    Peak memory: the transformer in the export precision (loaded straight in it), plus the graph and one
    tensor at a time while the ONNX is post-processed and checked, or ONNX Runtime's copy during parity.
    """
    from export.onnx_export import export_component, transformer_component, transformer_dynamic_shapes

    served = settings.served
    _save_transformer(spec, plan, holder, batches, out, report, served)
    compact = holder.pop()
    shapes = spec.shapes
    wrapper, make = transformer_component(compact, latent_hw=(shapes.latent_height, shapes.latent_width), text_seq_len=shapes.text_seq_len)
    res, parity_ref = export_component("transformer", wrapper, make, path, precision=settings.precision, parity_batches=batches, in_place=True,
                                       dynamic_shapes=transformer_dynamic_shapes(compact, served.latent_min, served.latent_max),
                                       parity_shapes=_other_latents(served) if batches else ())
    report["transformer"].update(_transformer_onnx_checks(path, compact, plan, shapes, shapes.batch_opt, settings.polygraphy, res))
    adapter = spec.adapter
    res["profiles"] = _profiles(served, lambda b, hw: adapter.transformer_input_shapes(compact, b, hw, served.text_seq_len))
    del wrapper, make, compact
    release_to_os()
    log_memory("export: torch transformer freed", log)
    if parity_ref is not None:
        res["parity"] = parity_ref.check("transformer").to_dict()
        if not res["parity"]["ok"]:
            raise RuntimeError(f"transformer: ONNX Runtime output differs from torch: {res['parity']}")
    return res


def _profiles(served: ServedShapes, shapes_at) -> dict[str, Any]:
    """Engine profiles of a component whose input shapes follow the resolution: ``shapes_at(batch, latent_hw)
    -> {input: shape}``. ``range``: ``{input: [min, opt, max]}`` over the served batch range and resolutions
    (the box from the smallest to the largest latent height and width); ``per_resolution``: the same for
    each resolution alone (static engines)."""
    lo, mid, hi = served.batch

    def box(lat_min, lat_opt, lat_max):
        a, b, c = shapes_at(lo, lat_min), shapes_at(mid, lat_opt), shapes_at(hi, lat_max)
        return {k: [list(a[k]), list(b[k]), list(c[k])] for k in b}

    return {
        "range": box(served.latent_min, served.latent_opt, served.latent_max),
        "per_resolution": {served.label(r): box(served.latent(r), served.latent(r), served.latent(r)) for r in served.resolutions},
    }


def _other_latents(served: ServedShapes) -> list[tuple[int, int]]:
    """The served latent shapes besides the optimisation one (parity is checked at each, batch 1)."""
    return [hw for hw in dict.fromkeys(served.latents) if hw != served.latent_opt]


def _export_other(spec, name: str, precision: str, batches, path: Path, served: ServedShapes) -> dict[str, Any]:
    """Export a text encoder or the VAE decoder, loaded by itself in the precision it is exported in."""
    from export.onnx_export import clip_component, export_component, t5_component, torch_dtype, vae_decoder_component, vae_dynamic_shapes
    from families.registry import load_component

    comp = next(c for c in spec.adapter.components if c.name == name)
    keep_fp32 = comp.kind == "t5"  # T5's activations overflow float16
    dtype = torch.float32 if keep_fp32 else torch_dtype(precision)
    shapes = spec.shapes
    if comp.kind in ("clip_projection", "clip_pooled"):
        tokenizer = load_component(spec, comp.attr.replace("text_encoder", "tokenizer"))
        wrapper, make = clip_component(load_component(spec, comp.attr, dtype=dtype), seq_len=int(tokenizer.model_max_length), pooled=comp.kind == "clip_pooled")
    elif comp.kind == "t5":
        wrapper, make = t5_component(load_component(spec, comp.attr, dtype=dtype), seq_len=int(spec.max_sequence_length))
    else:
        wrapper, make = vae_decoder_component(load_component(spec, comp.attr, dtype=dtype), latent_hw=(shapes.latent_height, shapes.latent_width))
    spatial = {} if comp.kind != "vae_decoder" else {"dynamic_shapes": vae_dynamic_shapes(served.latent_min, served.latent_max),
                                                     "parity_shapes": _other_latents(served) if batches else ()}
    res, parity_ref = export_component(name, wrapper, make, path, precision=precision, parity_batches=batches, keep_fp32=keep_fp32, in_place=True, **spatial)
    if comp.kind == "vae_decoder":
        channels = int(wrapper.vae.config.latent_channels)
        res["profiles"] = _profiles(served, lambda b, hw: {"latent": [b, channels, *hw]})
    del wrapper, make
    if parity_ref is not None:
        res["parity"] = parity_ref.check(name).to_dict()
        if not res["parity"]["ok"]:
            raise RuntimeError(f"{name}: ONNX Runtime output differs from torch: {res['parity']}")
    return res


def _transformer_onnx_checks(path: Path, compact, plan, shapes, step_batch: int, polygraphy: str, res: dict) -> dict[str, Any]:
    """GEMM-weight constness, N:M pattern and FLOP share of the exported transformer."""
    import onnx

    from export.onnx_export import missing_linear_weights
    from export.report import transformer_flops
    from export.sparsity_check import check_onnx_sparsity, cross_check_polygraphy, polygraphy_sparsity, report_to_json
    from obsdiff.patterns import parse_sparsity

    model = onnx.load(str(path), load_external_data=False)  # weights are read one at a time by the checker
    missing = missing_linear_weights(model, compact)
    if missing:
        raise RuntimeError(f"{len(missing)} transformer-block linears are not MatMul/Gemm with a constant weight (e.g. {missing[0]})")
    pattern = parse_sparsity(plan.sparsity) if plan is not None else None
    nm = (pattern.n, pattern.m) if pattern is not None and pattern.is_semi_structured else (2, 4)
    expected = sorted(plan.layers) if pattern is not None and pattern.is_semi_structured else []
    from families import adapter_for

    in_shapes = adapter_for(compact).transformer_input_shapes(compact, step_batch, (shapes.latent_height, shapes.latent_width), shapes.text_seq_len)
    sp = check_onnx_sparsity(model, nm, input_shapes=in_shapes, expected_layers=expected, base_dir=path.parent)
    if not sp.ok:
        first = (sp.missing_layers or sp.failed_layers)[0]
        raise UserError(
            f"the pruned transformer is not {sp.pattern} along K in {len(sp.failed_layers)} layer(s) and {len(sp.missing_layers)} "
            f"layer(s) are missing from the ONNX (e.g. {first}); re-run `python -m pipeline prune` so plan.json and transformer/ agree"
        )
    out: dict[str, Any] = {"sparsity_check": report_to_json(sp), "gemm_flops_per_step_onnx": sp.total_flops}
    torch_gemm = transformer_flops(compact, step_batch, (shapes.latent_height, shapes.latent_width), shapes.text_seq_len)["gemm"]
    if torch_gemm != sp.total_flops:
        log.warning("GEMM FLOPs differ between torch (%d) and the ONNX graph (%d)", torch_gemm, sp.total_flops)
    run_pg = polygraphy == "on" or (polygraphy == "auto" and res["bytes"] < 256 * 1024**2)
    if run_pg and sp.pattern == "2:4" and expected:
        try:
            pg = polygraphy_sparsity(path)
            disagree = cross_check_polygraphy(sp, pg)
            out["polygraphy"] = {"tensors_checked": len(pg), "sparse": sum(pg.values()), "disagreements": disagree}
            if disagree:
                raise RuntimeError(f"polygraphy and the 2:4 checker disagree on {disagree[:3]}")
        except (OSError, RuntimeError) as e:
            if polygraphy == "on" or "disagree" in str(e):
                raise
            log.warning("polygraphy cross-check skipped: %s", e)
    return out
