"""What ``make serve`` serves: a model at a sparsity from the artifact store, as a Triton serving repository.

:func:`prepare_variant` runs the stages a served variant needs through ``make engine``'s own stage drivers
(prune when sparse, then the float32 export; each reused when complete and current) and returns a
:class:`ServeVariant`: its ONNX directory, its scheduler correction when the artifact has one, and the limits
the pipeline model enforces (resolutions and batch from the export report). :func:`write_repository` writes
one or more variants into one repository (:func:`runtime.serve_repository.write_serving_repository`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeVariant:
    """One servable configuration: ``spec`` at ``sparsity`` (a parsed pattern), its ``onnx_dir``, ``config_dir``
    in the artifact store, the scheduler ``correction`` file (or None) and the pipeline's ``limits``."""

    spec: object
    sparsity: object
    onnx_dir: Path
    config_dir: Path
    correction: Path | None
    limits: object

    @property
    def label(self) -> str:
        return str(self.sparsity)


def prepare_variant(model: str, sparsity: str, *, method: str = "obs-diff", artifacts: str | Path | None = None, max_steps: int | None = None,
                    max_batch: int | None = None, engine_args: tuple[str, ...] = ()) -> ServeVariant:
    """Build what is missing for serving ``model`` at ``sparsity`` (``dense`` too) and describe it. engine_args: more
    ``make engine`` options for the stages (e.g. ``("--samples", "4")`` for a quick calibration)."""
    from families.registry import resolve_model
    from obsdiff.patterns import parse_sparsity
    from pipeline.artifacts import ARTIFACTS, Manifest, config_dirs
    from pipeline.engine import parse_args, plan_stages, run_stage

    spec = resolve_model(model)
    pattern = parse_sparsity(sparsity)
    base = Path(artifacts) if artifacts else ARTIFACTS
    dense = config_dirs(spec, "dense", base)
    cfg = dense if pattern.kind == "dense" else config_dirs(spec, f"{pattern.id}-{method}", base)
    argv = ["--model", model, "--sparsity", "2:4" if pattern.kind == "dense" else sparsity, "--method", method, "--no-engines", "--no-bench"]
    if artifacts:
        argv += ["--artifacts", str(artifacts)]
    args = parse_args([*argv, *engine_args])
    stages = plan_stages(args, spec, parse_sparsity(args.sparsity), config_dirs(spec, f"{parse_sparsity(args.sparsity).id}-{method}", base), dense,
                         False, "ort")
    want = {"export_dense"} if pattern.kind == "dense" else {"prune", "export_pruned"}
    manifest = Manifest(cfg.manifest, {"model": spec.id, "model_source": spec.source, "sparsity": str(pattern), "method": method,
                                       "config_dir": str(cfg.root)})
    for st in (s for s in stages if s.name in want):
        before = st.marker.stat().st_mtime_ns if st.marker.exists() else None
        t0 = time.perf_counter()
        run_stage(st)
        reused = before is not None and st.marker.stat().st_mtime_ns == before
        if not reused:
            manifest.record(st.name, inputs=st.inputs, settings=st.settings.to_json(), outputs=st.outputs, seconds=time.perf_counter() - t0,
                            reused=False)
        log.info("%s: %s in %.1f s", st.name, "reused" if reused else "done", time.perf_counter() - t0)
    from runtime.qsched.correction import artifact_file
    from runtime.serve_repository import limits_from_export

    limits = limits_from_export(spec, cfg.export, max_steps=max_steps, max_batch=max_batch)

    correction = next((p for p in (artifact_file(cfg.root, spec.steps, objective=o) for o in ("trajectory", "reference-free")) if p.is_file()), None)
    if correction is not None:
        log.info("serving with the scheduler correction %s", correction)
    return ServeVariant(spec, pattern, cfg.export / "onnx", cfg.root, correction if pattern.kind != "dense" else None, limits)


def write_repository(repo: str | Path, variants: dict[str, ServeVariant], *, dynamic_batching: bool = False, instances: int = 1,
                     intra_op_threads: int = 0) -> Path:
    """Write ``{prefix: variant}`` into one repository (prefix ``""``: the models are ``pipeline``, ``transformer``...)."""
    from runtime.serve_repository import write_serving_repository

    if not variants:
        raise UserError("nothing to serve")
    for prefix, v in variants.items():
        write_serving_repository(repo, v.spec, v.onnx_dir, limits=v.limits, prefix=prefix, dynamic_batching=dynamic_batching, instances=instances,
                                 correction=v.correction, intra_op_threads=intra_op_threads)
    return Path(repo)
