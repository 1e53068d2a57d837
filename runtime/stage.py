"""Stage 3's driver: TensorRT / TensorRT-RTX engines from stage 2's ONNX (and an optional Triton repository).

``python -m pipeline build`` parses its options into :class:`BuildSettings` and calls :func:`run_build`;
``make engine`` builds the settings itself and runs :func:`check_build` before any stage starts. Engines
whose ONNX and options are unchanged are reused (:func:`runtime.trt.build.build_engines`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import UserError
from common.input_files import check_onnx as check_onnx_file
from common.io import check_output, created_dirs

if TYPE_CHECKING:
    from families.registry import ModelSpec
    from obsdiff.patterns import Sparsity

log = logging.getLogger(__name__)

BACKENDS = ("auto", "trt", "trtrtx", "torch", "openvino")  # torch: runtime.torch_stage (PyTorch + torchao on a CUDA GPU); openvino: runtime.openvino.build (CPU)
TRITON_KINDS = ("tensorrt_plan", "onnxruntime", "python")


@dataclass(frozen=True)
class BuildSettings:
    """What stage 3 builds, from where, and how.

    spec: the model (its export shapes give the profile's batch range). sparsity: the pruned transformer's
    pattern (2:4 and 4:8 turn on SPARSE_WEIGHTS unless ``sparse_weights`` is False). onnx_dir: stage 2's
    ``onnx/``; the engines' precision is its ONNX's (an INT8/FP8 export gives ``engine_..._int8.plan``). out: engine directory. backend: ``"auto"`` (TensorRT on a GPU host, else TensorRT-RTX),
    ``"trt"`` or ``"trtrtx"``. components: subset to build (None: every exported component).
    opt_level: builder optimisation level 0-5. timing_cache: default ``out/timing.cache``. target_cc:
    TensorRT-RTX compute capabilities (None: this GPU, or the default list). workspace_mib: builder
    workspace limit (None: the library's). force: rebuild current engines. triton / triton_kind: also write
    a Triton model repository there (kind default: ``tensorrt_plan`` for TensorRT engines, else
    ``onnxruntime``). static_shapes: one engine per served resolution for the components whose shapes
    follow it (transformer, VAE decoder), under ``out/static/<H>x<W>/``, instead of one profile covering
    them all. The served resolutions and batch range come from stage 2's export report. ov_precision: backend
    ``"openvino"``'s precision hint (``auto``/``f32``/``bf16``, :mod:`runtime.openvino.precision`); it compiles every
    component once per served resolution (:mod:`runtime.openvino.build`).
    """

    spec: ModelSpec
    sparsity: Sparsity
    onnx_dir: Path
    out: Path
    backend: str = "auto"
    components: tuple[str, ...] | None = None
    opt_level: int = 3
    timing_cache: Path | None = None
    target_cc: tuple[str, ...] | None = None
    workspace_mib: int | None = None
    sparse_weights: bool = True
    force: bool = False
    triton: Path | None = None
    triton_kind: str | None = None
    static_shapes: bool = False
    torch_settings: Any = None  # backend "torch": a runtime.torch_backend.TorchSettings (None: its defaults)
    ov_precision: str = "auto"  # backend "openvino": the precision hint

    def to_json(self) -> dict[str, Any]:
        """The settings as a manifest records them."""
        opt = lambda v: None if v is None else str(v)  # noqa: E731
        return {"model": self.spec.id, "sparsity": str(self.sparsity), "onnx_dir": str(self.onnx_dir), "out": str(self.out),
                "backend": self.backend, "components": list(self.components) if self.components is not None else None,
                "opt_level": self.opt_level, "timing_cache": opt(self.timing_cache),
                "target_cc": list(self.target_cc) if self.target_cc is not None else None, "workspace_mib": self.workspace_mib,
                "sparse_weights": self.sparse_weights, "force": self.force, "triton": opt(self.triton), "triton_kind": self.triton_kind,
                "static_shapes": self.static_shapes, "torch": self.torch_settings.to_json() if self.torch_settings else None,
                **({"ov_precision": self.ov_precision} if self.backend == "openvino" else {})}


def check_build(settings: BuildSettings, *, check_onnx: bool = True) -> None:
    """Every check of stage 3 that needs no engine build (``check_onnx=False``: the ONNX comes later, as in
    ``make engine``, which checks its build stages before the export has run)."""
    if settings.backend not in BACKENDS:
        raise UserError(f"unknown TensorRT backend {settings.backend!r}; use {', '.join(BACKENDS)}")
    if check_onnx and Path(settings.onnx_dir).exists() and not Path(settings.onnx_dir).is_dir():
        raise UserError(f"--onnx-dir {settings.onnx_dir} is not a directory; give stage 2's onnx/ directory")
    if check_onnx:  # an export of another model or pattern than this build is told: one line naming both
        from export.fingerprint import check_export_for

        report = check_export_for(settings.onnx_dir, settings.spec, sparsity=str(settings.sparsity))
        weight_only = [c for c, e in (report.get("components") or {}).items()
                       if isinstance(e, dict) and e.get("weight_only") and (settings.components is None or c in settings.components)]
        if weight_only and settings.backend not in ("torch", "openvino"):  # OpenVINO reads MatMulNBits
            raise UserError(f"{', '.join(weight_only)} in {settings.onnx_dir}: weight-only INT8/INT4 text encoders for ONNX Runtime (MatMulNBits), "
                            "which TensorRT cannot build: pass --components without them, or export them for engines (--others-precision fp16)")
    if settings.backend == "torch":  # no engines: the compact checkpoint converted on this GPU
        from runtime.manifest import current_gpu
        from runtime.torch_backend import TorchSettings
        from runtime.torch_stage import check_torch_build

        if settings.triton:
            raise UserError("--triton: a Triton repository serves TensorRT engines or ONNX, not --backend torch")
        check_torch_build(settings.sparsity, settings.onnx_dir, settings.torch_settings or TorchSettings(), gpu=current_gpu(), check_input=check_onnx)
        check_output(settings.out, "parent")
        return
    if settings.backend == "openvino":  # compiled for this CPU: no builder options, no Triton repository yet
        from runtime.openvino.library import openvino
        from runtime.openvino.precision import resolve_hint

        openvino()  # not installed: one line naming `make setup`
        resolve_hint(settings.ov_precision)  # an unknown hint, or bf16 on a CPU without it: one line
        if settings.triton:
            raise UserError("--triton: a Triton repository of OpenVINO components is not written yet; use --backend trt/trtrtx, or leave --triton out")
        if check_onnx and not Path(settings.onnx_dir).is_dir():
            raise UserError(f"ONNX directory {settings.onnx_dir} does not exist; run `python -m pipeline export` first")
        check_output(settings.out, "parent")
        return
    if not 0 <= settings.opt_level <= 5:
        raise UserError(f"--opt-level: must be between 0 and 5, got {settings.opt_level}")
    if settings.workspace_mib is not None and settings.workspace_mib < 1:
        raise UserError(f"--workspace-mib: must be at least 1, got {settings.workspace_mib}")
    if settings.triton_kind is not None and settings.triton_kind not in TRITON_KINDS:
        raise UserError(f"unknown Triton backend {settings.triton_kind!r}; use {' or '.join(TRITON_KINDS)}")
    if check_onnx and not Path(settings.onnx_dir).is_dir():
        raise UserError(f"ONNX directory {settings.onnx_dir} does not exist; run `python -m pipeline export` first")
    if check_onnx:  # a model cut short or of another kind: one line naming it, before the parser's traceback
        for f in sorted(Path(settings.onnx_dir).glob("*.onnx")):
            check_onnx_file(f, fix="re-export it (`python -m pipeline export`)")
    check_output(settings.out, "parent")
    if settings.timing_cache:
        check_output(settings.timing_cache, "file", option="--timing-cache")
    if settings.triton:
        check_output(settings.triton, "parent", option="--triton")
        if settings.triton_kind == "tensorrt_plan" and settings.backend == "trtrtx":
            raise UserError("--triton-kind tensorrt_plan needs TensorRT engines (Triton cannot run TensorRT-RTX plans): "
                            "use --backend trt on a GPU host, or --triton-kind onnxruntime")


def run_build(settings: BuildSettings) -> dict[str, Path]:
    """Build (or reuse) one engine per component into ``settings.out/<component>/``; write the Triton
    repository if asked. Returns ``{component: plan path}``. A failed build leaves no engine directory that
    this call created."""
    from runtime.manifest import manifest_summary
    from runtime.trt.backend import get_backend
    from runtime.trt.build import build_engines
    from runtime.trt.options import BuildOptions

    from dataclasses import replace

    from common.io import read_json

    check_build(settings)
    if settings.backend == "torch":
        from runtime.torch_backend import TorchSettings
        from runtime.torch_stage import run_torch_build

        return {"transformer": run_torch_build(settings.spec, settings.sparsity, settings.onnx_dir, settings.out, settings.torch_settings or TorchSettings())}
    if settings.backend == "openvino":
        return _run_openvino_build(settings)
    out = Path(settings.out)
    onnx_dir = Path(settings.onnx_dir)
    sh = settings.spec.shapes
    # The shapes stage 2 exported for: its report has every component's profile (older reports: none).
    report_file = onnx_dir.parent / "export_report.json"
    report = read_json(report_file) if report_file.is_file() else {}
    served = report.get("served_shapes")
    model_weights = (report.get("inputs") or {}).get("model_weights")
    comps = report.get("components", {})
    ranges = {c: v["profiles"]["range"] for c, v in comps.items() if isinstance(v, dict) and v.get("profiles")}
    options = BuildOptions(
        batch=tuple(served["batch"]) if served else (sh.batch_min, sh.batch_opt, sh.batch_max),
        served=served,
        sparsity=str(settings.sparsity),
        sparse_weights=None if settings.sparse_weights else False,
        opt_level=settings.opt_level,
        timing_cache=str(settings.timing_cache) if settings.timing_cache else str(out / "timing.cache"),
        target_cc=settings.target_cc,
        workspace_mib=settings.workspace_mib,
        model=report.get("model") or settings.spec.id,
        model_weights=model_weights,
    )
    backend = get_backend(settings.backend)
    components = list(settings.components) if settings.components else None
    with created_dirs(out):  # a failed build leaves no engine directory that this run created
        import shutil

        if settings.static_shapes and served and ranges:
            names = components or [c for c in comps if (onnx_dir / f"{c}.onnx").is_file()]
            spatial = [c for c in names if c in ranges]
            for c in spatial:  # the runner takes static engines where they exist: drop a stale profile engine
                shutil.rmtree(out / c, ignore_errors=True)
            plans = build_engines(onnx_dir, out, options, backend=backend, components=[c for c in names if c not in spatial] or None,
                                  force=settings.force) if len(spatial) < len(names) else {}
            for res in served["resolutions"]:
                label = f"{res[0]}x{res[1]}"
                one = replace(options, served={**served, "resolutions": [res], "static": True})
                per = {c: comps[c]["profiles"]["per_resolution"][label] for c in spatial}
                built = build_engines(onnx_dir, out / "static" / label, one, backend=backend, components=spatial, force=settings.force, profiles=per)
                plans.update({f"{c}@{label}": p for c, p in built.items()})
        else:
            for c in (components or ranges):  # static engines of an earlier build would take precedence: drop them
                for d in (out / "static").glob(f"*/{c}"):
                    shutil.rmtree(d, ignore_errors=True)
            plans = build_engines(onnx_dir, out, options, backend=backend, components=components, force=settings.force, profiles=ranges)
    for comp, plan in plans.items():
        s = manifest_summary(plan)
        quant = f"  {s['quantized_layers']} layers {s['precision']} ({s['quantized_nm_layers']} also N:M)" if s["quantized_layers"] else ""
        refused = f"  targets refused: {','.join(s['refused_targets'])}" if s.get("refused_targets") else ""
        log.info("%-15s %s %s  %.2f MiB  sparsity %s  sparse_weights=%s  N:M-eligible ONNX weights %s%s%s  log: %s eligible / %s sparse",
                 comp, s["backend"], s["precision"], s["plan_mib"], s["sparsity"], s["sparse_weights"], s["onnx_nm_eligible"], quant, refused,
                 s["log_eligible"], s["log_sparse"])
    if settings.triton:
        from runtime.triton import write_model_repository

        kind = settings.triton_kind or ("tensorrt_plan" if backend.name == "trt" else "onnxruntime")
        # one Triton model per engine (static engines: transformer_512x512...); ONNX models accept every shape
        files = ({c.replace("@", "_"): p for c, p in plans.items()} if kind == "tensorrt_plan"
                 else {c: onnx_dir / f"{c}.onnx" for c in dict.fromkeys(k.split("@")[0] for k in plans)})
        if kind != "python":  # python: the serving repository below writes Python-backend ONNX Runtime components
            write_model_repository(settings.triton, files, kind=kind, batch=options.batch)
        if any("@" in c for c in plans):
            log.warning("no pipeline model: it calls one model per component, and static engines are one per resolution")
        elif "transformer" not in plans:
            log.warning("no pipeline model: it needs the transformer, and this build has only %s", ", ".join(sorted(plans)))
        else:  # the prompt -> image model over those components (BLS), the same one `make serve` writes
            from runtime.serve_repository import limits_from_export, write_serving_repository

            limits = limits_from_export(settings.spec, onnx_dir.parent, max_batch=max(1, options.batch[2] // 2))  # CFG doubles the batch
            write_serving_repository(settings.triton, settings.spec, onnx_dir, limits=limits, components_kind=kind,
                                     component_files=None if kind == "python" else files)
        log.info("Triton model repository (%s): %s", kind, settings.triton)
    return plans


def _run_openvino_build(settings: BuildSettings) -> dict[str, Path]:
    """``build --backend openvino``: every component compiled for this CPU at the precision hint, once per served
    resolution (:func:`runtime.openvino.build.build_all`). Returns ``{"<component>@<label>": blob}``."""
    from common.io import read_json
    from runtime.openvino.build import build_all
    from runtime.openvino.precision import resolve_hint

    onnx_dir = Path(settings.onnx_dir)
    report_file = onnx_dir.parent / "export_report.json"
    report = read_json(report_file, what="export report") if report_file.is_file() else {}
    comps = report.get("components", {})
    per = {c: v["profiles"]["per_resolution"] for c, v in comps.items() if isinstance(v, dict) and (v.get("profiles") or {}).get("per_resolution")}
    hint = resolve_hint(settings.ov_precision)
    log.info("OpenVINO precision %s (%s)", hint.name, hint.why)
    with created_dirs(settings.out):  # a failed build leaves no directory that this run created
        return build_all(onnx_dir, settings.out, hint=hint, components=settings.components, profiles=per, force=settings.force,
                         model=report.get("model") or settings.spec.id, model_weights=(report.get("inputs") or {}).get("model_weights"),
                         served=report.get("served_shapes"))
