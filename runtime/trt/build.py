"""Building engines: one ONNX (:func:`build_engine`, plan + manifest written atomically), every component of
an export directory (:func:`build_engines`, reusing an engine whose manifest still matches)."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

from common.errors import UserError
from common.io import atomic_path, read_json, sha256_file, write_json
from families import ADAPTERS
from families.components import component_names, sparse_component_names
from runtime.manifest import MANIFEST_VERSION, current_gpu, engine_stem, manifest_path_for, sha256_onnx
from runtime.trt.backend import RTX_DEFAULT_TARGETS, Backend, get_backend, sm_name
from runtime.trt.builder_log import capturing_logger, parse_engine_layers, parse_sparsity_log
from runtime.trt.onnx_inspect import int4_dequantize_nodes, io_signature, onnx_nm_weights, onnx_precision
from runtime.trt.options import BuildOptions, expected_profile

log = logging.getLogger(__name__)

# Every component name some family exports (families/*.py list theirs), and those stage 1 prunes (sparse tactics).
COMPONENTS = component_names(ADAPTERS.values())
SPARSE_COMPONENTS = sparse_component_names(ADAPTERS.values())


def build_engine(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: BuildOptions | None = None,
    *,
    backend: Backend | str = "auto",
    component: str | None = None,
) -> Path:
    """Build an engine from ``onnx_path`` into ``out_dir/engine_<backend><version>.plan`` (+ manifest).

    The precision is the ONNX's (:func:`onnx_precision`); an INT8/FP8 engine is named
    ``engine_<backend><version>_<precision>.plan``. FP8 needs an Ada or later GPU: when TensorRT-RTX builds for
    its default portable targets, the ones its builder refuses for FP8 (SM80/SM86: "Cannot compile for
    target(s) sm80, sm86, because the model contains HW-specific datatypes: fp8_e4m3") are dropped and the
    manifest records them with the builder's message (``refused_targets``); targets given explicitly are built
    as given or the build fails.

    Returns the plan path. The plan and manifest are written atomically (manifest last). Raises
    :class:`UserError` when the ONNX cannot be parsed or the build fails (the builder's errors in one line).
    """
    options = options or BuildOptions()
    be = backend if isinstance(backend, Backend) else get_backend(backend)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"missing ONNX {onnx_path}; run `python -m pipeline export` first")
    if options.opt_level is not None and not 0 <= options.opt_level <= 5:
        raise UserError(f"builder optimisation level {options.opt_level} is outside 0-5")
    precision = onnx_precision(onnx_path)
    portable = be.is_rtx and not options.target_cc and current_gpu() is None  # the default targets, which may be narrowed
    try:
        return _build_engine(onnx_path, Path(out_dir), options, be, component, precision, quiet=portable and precision == "fp8")
    except _RefusedTargets as refused:
        if not portable:  # the user's (or this GPU's) targets: build them or fail
            raise UserError(refused.message) from None
        kept = [t for t in refused.requested if t not in refused.targets]
        if not kept:
            raise UserError(refused.message) from None
        log.info("%s: %s refuses %s for %s (%s); building for %s", onnx_path.name, be.name, ", ".join(refused.targets), precision,
                 refused.builder_error, ", ".join(kept))
        return _build_engine(onnx_path, Path(out_dir), options, be, component, precision, quiet=False, targets=kept,
                             refused={"targets": refused.targets, "builder": refused.builder_error, "requested": refused.requested})


class _RefusedTargets(Exception):
    """The builder refused some compute capabilities (TensorRT-RTX: FP8 on SM80/SM86)."""

    def __init__(self, message: str, builder_error: str, targets: list[str], requested: list[str]):
        super().__init__(message)
        self.message, self.builder_error, self.targets, self.requested = message, builder_error, targets, requested


_REFUSED = re.compile(r"Cannot compile for target\(s\) ([\w ,]+?), because", re.IGNORECASE)


def _build_engine(onnx_path: Path, out_dir: Path, options: BuildOptions, be: Backend, component: str | None, precision: str, *,
                  quiet: bool, targets: list[str] | None = None, refused: dict[str, Any] | None = None) -> Path:
    """One build (see :func:`build_engine`); ``targets`` overrides the TensorRT-RTX targets, ``refused`` goes
    to the manifest. Raises :class:`_RefusedTargets` when the builder refuses some of the targets."""
    trt = be.module
    t0 = time.perf_counter()
    onnx_sha = sha256_onnx(onnx_path)
    lg = capturing_logger(be, forward=not quiet)
    builder = trt.Builder(lg)
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, lg)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors))
        raise UserError(f"{be.name} cannot parse {onnx_path}: {errs or 'unknown error'}; check the export (opset 18; 21 for w4a16) or the TensorRT version")

    config = builder.create_builder_config()
    if precision == "w4a16":  # the builder then logs its layer table: which layers hold INT4 constants (the manifest's)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.opt_level is not None:
        config.builder_optimization_level = int(options.opt_level)
    sparse = options.use_sparse_weights
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mib) << 20)

    gpu = current_gpu()
    given_targets = targets
    targets = []
    if be.is_rtx:
        if given_targets:
            targets = list(given_targets)
        elif options.target_cc:
            targets = [sm_name(c) for c in options.target_cc]
        elif gpu is not None:
            targets = [sm_name(gpu.compute_capability)]
        else:
            targets = [t for t in RTX_DEFAULT_TARGETS if hasattr(trt.ComputeCapability, t)]
        bad = [t for t in targets if not hasattr(trt.ComputeCapability, t)]
        if bad:
            known = [n for n in dir(trt.ComputeCapability) if n.startswith("SM")]
            raise UserError(f"TensorRT-RTX {be.version} cannot target {', '.join(bad)}; supported: {', '.join(known)}")
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, t), i)
    elif gpu is None:
        raise UserError("TensorRT (not -RTX) builds engines only on a GPU host; use --backend trtrtx to build without a GPU")

    # Timing cache: reused between builds (TensorRT only; TensorRT-RTX picks kernels at run time).
    cache_note = None
    if options.timing_cache and not be.is_rtx:
        cache_file = Path(options.timing_cache)
        blob = cache_file.read_bytes() if cache_file.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
        cache_note = {"path": str(cache_file), "reused": bool(blob)}
    elif options.timing_cache:
        cache_note = {"path": None, "reused": False, "note": "timing cache is a no-op in TensorRT-RTX"}

    prof_shapes = expected_profile(onnx_path, options)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        if inp.name not in prof_shapes:
            raise UserError(f"{onnx_path}: network input {inp.name} is not an ONNX graph input")
        mn, op, mx = prof_shapes[inp.name]
        profile.set_shape(inp.name, mn, op, mx)
    config.add_optimization_profile(profile)

    log.info("building %s %s engine for %s (%s, sparse_weights=%s, opt level %s%s)", be.name, precision, onnx_path.name, options.sparsity, sparse,
             options.opt_level, f", targets {','.join(targets)}" if targets else "")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errs = [m for s, m in lg.lines if s in ("ERROR", "INTERNAL_ERROR")]
        first = (errs[-1] if errs else "see the log above").splitlines()[0]
        message = f"{be.name} failed to build {onnx_path.name}: {first}"
        hit = _REFUSED.search(first) if be.is_rtx else None
        if hit:
            bad = ["SM" + t.strip()[2:] for t in hit.group(1).split(",") if t.strip().lower().startswith("sm")]
            if precision == "fp8":
                message += "; FP8 engines need compute capability 8.9 or later: use --target-cc 8.9,12.0"
            raise _RefusedTargets(message, first, [t for t in targets if t in bad], list(targets))
        raise UserError(message)
    data = memoryview(serialized)
    build_s = time.perf_counter() - t0

    if options.timing_cache and not be.is_rtx:
        with atomic_path(options.timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))

    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / f"{engine_stem(be.name, be.version, precision)}.plan"
    with atomic_path(plan) as tmp:
        tmp.write_bytes(data)
    nm = re.fullmatch(r"\s*(\d+):(\d+)\s*", options.sparsity)
    nm_weights = onnx_nm_weights(onnx_path, int(nm.group(1)), int(nm.group(2))) if nm else None
    quantization = None
    if precision in ("int8", "fp8", "w4a16"):
        qw = nm_weights if nm_weights is not None else onnx_nm_weights(onnx_path)
        quantization = {
            "precision": precision,
            "quantized_layers": qw["quantized"],
            # both quantized and N:M: TensorRT can pick sparse INT8/FP8 kernels for these (SPARSE_WEIGHTS on)
            "quantized_nm_layers": qw["quantized_eligible"] if nm_weights is not None and precision != "w4a16" else [],
            "nm_pattern": nm_weights["pattern"] if nm_weights is not None else None,
        }
        if precision == "w4a16":
            quantization.update(_int4_in_engine(onnx_path, lg.text()))
    manifest = {
        "format": MANIFEST_VERSION,
        "component": component or onnx_path.stem,
        "precision": precision,
        "backend": be.name,
        "backend_version": be.version,
        "plan": plan.name,
        "plan_sha256": sha256_file(plan),
        "plan_bytes": plan.stat().st_size,
        "onnx": str(onnx_path.resolve()),
        "onnx_sha256": onnx_sha,
        "gpu": gpu.to_dict() if (gpu is not None and not be.is_rtx) else None,
        "build_gpu": gpu.to_dict() if gpu is not None else None,
        "target_compute_capabilities": targets,
        "refused_targets": refused,
        "io": io_signature(onnx_path),
        "profiles": [prof_shapes],
        "served": options.served,
        "sparsity": options.sparsity,
        "model": options.model,
        "model_weights": options.model_weights,
        "builder": {
            "strongly_typed": strongly_typed,
            "sparse_weights": sparse,
            "opt_level": options.opt_level,
            "workspace_mib": options.workspace_mib,
            "timing_cache": cache_note,
            "batch": list(options.batch),
        },
        "sparsity_log": parse_sparsity_log(lg.text()),
        "onnx_nm_weights": nm_weights,
        "quantization": quantization,
        "build_seconds": round(build_s, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if be.is_rtx and gpu is None:
        manifest["notes"] = (
            "built ahead of time without a GPU: TensorRT-RTX compiles kernels (sparse ones included) just in time "
            "on the target GPU, so the builder log has no sparse-tactic lines"
        )
    write_json(manifest_path_for(plan), manifest)
    log.info("wrote %s (%.1f MiB, %.1f s)", plan, plan.stat().st_size / 2**20, build_s)
    return plan


def _int4_in_engine(onnx_path: Path, log_lines: list[str]) -> dict[str, Any]:
    """Which INT4 weights of a W4A16 ONNX the engine holds as INT4 constants (from the builder's DETAILED layer
    table): dequantized inside their GEMM, or on their own into a float16 copy the GEMM reads (TensorRT-RTX 1.7 does
    that for an odd N); the engine's weight bytes and its constants by dtype. No runtime here has a kernel for 2:4
    and 4-bit at once: a 2:4 + 4-bit engine runs dense 4-bit (``quantized_nm_layers`` stays empty)."""
    engine = parse_engine_layers(log_lines)
    dq = int4_dequantize_nodes(onnx_path)
    if not engine["layers"]:  # a TensorRT whose log has no layer table in this form: say so rather than "none"
        return {"int4_weights": len(dq), "int4_weights_in_engine": None, "int4_weights_not_int4_in_engine": None,
                "engine_weights_bytes": engine["weights_memory_bytes"], "note": "the builder logged no layer table to read"}
    fused = sorted(w for node, w in dq.items() if node in engine["int4_onnx_nodes"])
    unfused = sorted(w for node, w in dq.items() if node in engine["int4_unfused_onnx_nodes"] and w not in fused)
    return {
        "int4_weights": len(dq),
        "int4_weights_in_engine": fused,
        "int4_weights_dequantized_apart": unfused,
        "int4_weights_not_int4_in_engine": sorted(set(dq.values()) - set(fused) - set(unfused)),
        "engine_weights_bytes": engine["weights_memory_bytes"],
        "engine_constant_dtypes": engine["constant_dtypes"],
        "note": "INT4 weight-only, float16 activations: int4_weights_in_engine are dequantized inside their GEMMs; int4_weights_dequantized_apart "
                "are stored INT4 but dequantized by a kernel of their own (no activation input) into a float16 copy the GEMM reads",
    }


def engine_is_current(plan: str | os.PathLike, onnx_path: str | os.PathLike, options: BuildOptions, backend: Backend) -> bool:
    """Whether ``plan`` exists with a manifest matching this ONNX (hash), backend version and options."""
    plan = Path(plan)
    mpath = manifest_path_for(plan)
    if not (plan.is_file() and mpath.is_file()):
        return False
    try:
        m = read_json(mpath)
    except UserError:
        return False
    b = m.get("builder", {})
    want_targets = [sm_name(c) for c in options.target_cc] if options.target_cc else None
    return (
        m.get("backend") == backend.name
        and m.get("backend_version") == backend.version
        and m.get("onnx_sha256") == sha256_onnx(onnx_path)
        and m.get("plan_sha256") == sha256_file(plan)
        and m.get("sparsity") == options.sparsity
        and b.get("sparse_weights") == options.use_sparse_weights
        and b.get("opt_level") == options.opt_level
        and b.get("batch") == list(options.batch)
        and m.get("profiles") == [expected_profile(onnx_path, options)]
        and (want_targets is None or m.get("target_compute_capabilities") == want_targets)
    )


def exported_components(onnx_dir: Path, components: Iterable[str] | None = None) -> list[str]:
    """The components to build from ``onnx_dir``: ``components`` (each a name of :data:`COMPONENTS` with its
    ``<name>.onnx`` there), or every one whose ONNX is there; one line for an unknown or missing one, or none at all."""
    names = list(components) if components is not None else [c for c in COMPONENTS if (onnx_dir / f"{c}.onnx").is_file()]
    unknown = [c for c in names if c not in COMPONENTS]
    if unknown:
        raise UserError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")
    missing = [c for c in names if not (onnx_dir / f"{c}.onnx").is_file()]
    if missing or not names:
        raise UserError(f"no ONNX for {', '.join(missing) or 'any component'} in {onnx_dir}; run `python -m pipeline export` first")
    return names


def build_engines(
    onnx_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: BuildOptions | None = None,
    *,
    backend: Backend | str = "auto",
    components: Iterable[str] | None = None,
    force: bool = False,
    profiles: dict[str, dict[str, list[list[int]]]] | None = None,
) -> dict[str, Path]:
    """Build one engine per component ONNX found in ``onnx_dir`` into ``out_dir/<component>/``.

    components: names from :data:`COMPONENTS` (default: every one whose ``<name>.onnx`` exists; a named
    one that is missing is an error). An engine whose manifest matches the ONNX and options is reused
    unless ``force``. profiles: per component, its optimisation profile (see :attr:`BuildOptions.profile`;
    components not listed get one from the batch range). Returns ``{component: plan path}``.
    """
    from tqdm import tqdm

    options = options or BuildOptions()
    be = backend if isinstance(backend, Backend) else get_backend(backend)
    onnx_dir = Path(onnx_dir)
    names = exported_components(onnx_dir, components)
    plans: dict[str, Path] = {}
    for comp in tqdm(names, desc=f"{be.name} engines", unit="engine"):
        src = onnx_dir / f"{comp}.onnx"
        plan = Path(out_dir) / comp / f"{engine_stem(be.name, be.version, onnx_precision(src))}.plan"
        opts = options if comp in SPARSE_COMPONENTS else _dense_options(options)
        if profiles and comp in profiles:
            from dataclasses import replace

            opts = replace(opts, profile=profiles[comp])
        if not force and engine_is_current(plan, src, opts, be):
            log.info("reusing %s (ONNX and options unchanged)", plan)
        else:
            plan = build_engine(src, plan.parent, opts, backend=be, component=comp)
        plans[comp] = plan
    return plans


def _dense_options(options: BuildOptions) -> BuildOptions:
    """Options for components the pruning stage does not touch (text encoders, VAE): no sparse weights."""
    from dataclasses import replace

    return replace(options, sparsity="dense", sparse_weights=False)
