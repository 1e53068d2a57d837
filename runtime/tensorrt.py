"""Build, check, load and run TensorRT / TensorRT-RTX engines from the stage-2 ONNX.

One code path serves both libraries (:class:`Backend`): ``tensorrt`` (TensorRT 10/11, GPU hosts; the engine
is tuned for the GPU it is built on) and ``tensorrt_rtx`` (TensorRT-RTX, builds ahead of time on a machine
without a GPU for a list of target compute capabilities and compiles kernels just in time on the GPU that
runs it). Networks are strongly typed: the precision is the ONNX's (export with ``--precision fp16`` for
GPUs; ``int8``/``fp8`` give Q/DQ graphs, calibrated in stage 2, so no INT8 calibrator is needed). N:M plans
are built with ``BuilderFlag.SPARSE_WEIGHTS`` so sparse tensor-core kernels can be picked (also for INT8/FP8
weights behind a DequantizeLinear: the manifest lists the layers that are both quantized and N:M).

Build: :func:`build_engine` (one ONNX) and :func:`build_engines` (every component of an export directory)
write ``engine_<backend><version>.plan`` (``..._int8.plan``/``..._fp8.plan`` for a quantized ONNX) plus a
manifest (see :mod:`runtime.manifest`). FP8 needs compute capability 8.9+: TensorRT-RTX refuses SM80/SM86 for
it; a build for the default portable targets drops those and records the builder's message. Load:
:class:`TrtEngine` checks the manifest against the running library and GPU, verifies the plan's sha256 on
the very bytes it then deserialises, and runs on CUDA torch tensors.

What each library supports (from NVIDIA's docs): TensorRT-RTX has no INT8 calibrator and its timing cache
calls are no-ops (kernels are chosen at run time; its runtime cache plays that role), and without target
compute capabilities it builds for the ones it supports by default; it prints no sparse-tactic lines when it
builds without a GPU (checked with 1.7.1: the plan is byte-identical with and without ``SPARSE_WEIGHTS``;
sparse kernels are a run-time JIT decision). The manifest then records an empty builder log and, separately,
which ONNX weights satisfy the N:M pattern (:func:`onnx_nm_weights`), i.e. the layers TensorRT could run sparse.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

from common.errors import UserError
from common.io import atomic_path, read_json, sha256_file, write_json
from families import ADAPTERS
from runtime.manifest import (
    MANIFEST_VERSION,
    QUANTIZED_PRECISIONS,
    GpuInfo,
    check_engine,
    check_in_profile,
    current_gpu,
    engine_stem,
    manifest_path_for,
    sha256_onnx,
)

log = logging.getLogger(__name__)

# Every component name some family exports (families/*.py list theirs).
COMPONENTS = tuple(dict.fromkeys(c.name for a in ADAPTERS.values() for c in a.components))

# TensorRT-RTX's default portable targets (docs: "8.0, 8.6, 8.9, 12.0, and later"; Turing needs SM75 explicitly).
RTX_DEFAULT_TARGETS = ("SM80", "SM86", "SM89", "SM120")


# --------------------------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Backend:
    """A TensorRT flavour: ``name`` is ``"trt"`` (module ``tensorrt``) or ``"trtrtx"`` (``tensorrt_rtx``)."""

    name: str
    module: ModuleType
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.name == "trtrtx"

    @property
    def stem(self) -> str:
        return engine_stem(self.name, self.version)


_MODULES = {"trt": "tensorrt", "trtrtx": "tensorrt_rtx"}


def get_backend(prefer: str = "auto") -> Backend:
    """Pick the TensorRT library: ``"trt"``, ``"trtrtx"`` or ``"auto"``.

    auto: ``tensorrt`` when a CUDA GPU is visible and it is installed, otherwise ``tensorrt_rtx`` (builds
    without a GPU), otherwise ``tensorrt``. Raises :class:`UserError` when the requested one is missing.
    """
    if prefer not in ("auto", *_MODULES):
        raise UserError(f"unknown TensorRT backend {prefer!r}; use auto, trt or trtrtx")
    order = [prefer] if prefer != "auto" else (["trt", "trtrtx"] if current_gpu() is not None else ["trtrtx", "trt"])
    for name in order:
        try:
            mod = importlib.import_module(_MODULES[name])
        except ImportError:
            continue
        return Backend(name, mod, str(mod.__version__))
    want = " or ".join(_MODULES[n] for n in order)
    raise UserError(
        f"{want} is not installed; `pip install tensorrt-rtx` (builds without a GPU) or install TensorRT from "
        f"NVIDIA's index on a GPU host (`pip install tensorrt --extra-index-url https://pypi.nvidia.com`)"
    )


def backend_for_manifest(manifest: dict[str, Any]) -> Backend:
    return get_backend(manifest["backend"])


def capturing_logger(backend: Backend, *, forward: bool = True):
    """An ``ILogger`` of ``backend``'s library that keeps every line (``.lines``: (severity, message)).

    Warnings and errors are forwarded to :mod:`logging` (``forward=False``: only kept, for a build whose failure
    is expected and reported otherwise); the full log goes to the engine manifest's sparsity extraction
    (:func:`parse_sparsity_log`).
    """
    trt = backend.module

    class _CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[tuple[str, str]] = []

        def log(self, severity, msg):  # called from TensorRT's threads: keep it cheap
            self.lines.append((getattr(severity, "name", str(severity)), msg))
            if not forward:
                return
            if severity <= trt.ILogger.Severity.ERROR:
                log.error("%s: %s", backend.name, msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("%s: %s", backend.name, msg)

        def text(self) -> list[str]:
            return [m for _, m in self.lines]

    return _CapturingLogger()


# ---------------------------------------------------------------------------------- sparsity log lines

_SPARSE_HEAD = re.compile(
    r"(Layers eligible for sparse math|picked sparse implementation|layer\(s\) eligible to use sparse tactics|"
    r"layer\(s\) using sparse tactics|\(Sparsity\))",
    re.IGNORECASE,
)


def parse_sparsity_log(lines: Iterable[str]) -> dict[str, Any]:
    """Extract TensorRT's sparsity report from builder log lines.

    TensorRT 8-10 logs ``(Sparsity) Layers eligible for sparse math: a, b`` and
    ``(Sparsity) TRT inference plan picked sparse implementation for layers: b``; TensorRT-RTX logs
    ``N layer(s) eligible to use sparse tactics:`` / ``N layer(s) using sparse tactics:`` followed by names.
    Returns ``{"lines": [...], "eligible": [names], "sparse": [names]}`` (names in log order, deduplicated).
    """
    lines = [ln.rstrip() for text in lines for ln in str(text).splitlines()]
    out: dict[str, Any] = {"lines": [], "eligible": [], "sparse": []}
    i = 0
    while i < len(lines):
        ln = lines[i]
        if not _SPARSE_HEAD.search(ln):
            i += 1
            continue
        out["lines"].append(ln)
        low = ln.lower()
        key = "eligible" if "eligible" in low else ("sparse" if ("picked sparse" in low or "using sparse" in low) else None)
        names: list[str] = []
        if ":" in ln:
            tail = ln.split(":", 1)[1] if "(Sparsity)" not in ln else ln.rsplit(":", 1)[1]
            names += [n.strip() for n in tail.split(",") if n.strip()]
        # RTX style lists one name per following (indented) line.
        j = i + 1
        while j < len(lines) and lines[j][:1] in (" ", "\t", "-") and lines[j].strip():
            out["lines"].append(lines[j])
            names.append(lines[j].strip().lstrip("-").strip())
            j += 1
        if key:
            for n in names:
                if n not in out[key]:
                    out[key].append(n)
        i = j
    return out


def onnx_precision(onnx_path: str | os.PathLike) -> str:
    """The precision of an ONNX as TensorRT builds it strongly typed: ``"fp8"`` (TensorRT's FP8 Q/DQ),
    ``"int8"`` (``DequantizeLinear`` of INT8/UINT8 constants), else ``"fp16"`` when its floating-point
    weights are float16 (the majority of their elements), else ``"fp32"``. Reads no weight data."""
    import numpy as np
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if ops & {"TRT_FP8DequantizeLinear", "TRT_FP8QuantizeLinear"}:
        return "fp8"
    if "DequantizeLinear" in ops:
        return "int8"
    sizes: dict[int, int] = {}
    for t in model.graph.initializer:
        sizes[t.data_type] = sizes.get(t.data_type, 0) + int(np.prod(t.dims))
    half = sizes.get(onnx.TensorProto.FLOAT16, 0) + sizes.get(onnx.TensorProto.BFLOAT16, 0)
    return "fp16" if half > sizes.get(onnx.TensorProto.FLOAT, 0) else "fp32"


def onnx_nm_weights(onnx_path: str | os.PathLike, n: int = 2, m: int = 4) -> dict[str, Any]:
    """Which constant MatMul/Gemm/Conv weights of an ONNX satisfy N:M along the reduction (K) dimension.

    This is TensorRT's eligibility condition for sparse kernels. A quantized weight (``DequantizeLinear`` /
    ``TRT_FP8DequantizeLinear`` of a constant, possibly through Transposes; :mod:`export.quantize`) is checked
    on its quantized values, the ones TensorRT gets. Returns ``{"pattern": "n:m", "eligible": [weight names],
    "checked": int, "not_eligible": [names], "quantized": [names of the weights behind a dequantize node],
    "quantized_eligible": [those that are also N:M]}``.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from export.sparsity_check import quantized_nonzeros, trace_quantized_weight

    model = onnx.load(str(onnx_path), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: node for node in model.graph.node for o in node.output}
    eligible, not_eligible, quantized = [], [], []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[1] not in inits:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
            qw = trace_quantized_weight(node.input[1], 1 if trans_b else 0, inits, producers)
            if qw is None or len(inits[qw.source].dims) != 2:
                continue
            nonzero = np.moveaxis(quantized_nonzeros(qw, inits, producers), qw.k_axis, -1)  # (N, K)
            quantized.append(qw.source)
            if nonzero.shape[1] % m:
                not_eligible.append(qw.source)
                continue
            groups = nonzero.reshape(nonzero.shape[0], -1, m).sum(-1)  # (N, K/m) non-zeros per group
            (eligible if bool((groups <= n).all()) else not_eligible).append(qw.source)
            continue
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            wk = w.T  # (N, K): MatMul B is (K, N)
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            wk = w if trans_b else w.T  # (N, K)
        else:
            wk = np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)  # (C_out, kh*kw*C_in): channels innermost
        if wk.shape[1] % m:
            not_eligible.append(node.input[1])
            continue
        groups = (wk.reshape(wk.shape[0], -1, m) != 0).sum(-1)  # (N, K/m) non-zeros per group
        (eligible if bool((groups <= n).all()) else not_eligible).append(node.input[1])
    return {"pattern": f"{n}:{m}", "eligible": eligible, "not_eligible": not_eligible, "checked": len(eligible) + len(not_eligible),
            "quantized": quantized, "quantized_eligible": [w for w in quantized if w in set(eligible)]}


# ------------------------------------------------------------------------------------------ build


@dataclass
class BuildOptions:
    """Builder settings.

    batch: (min, opt, max) batch of the optimisation profile (the ONNX's ``batch`` dim); every other dim
        must be static in the ONNX or given in ``dims`` as name -> (min, opt, max).
    sparsity: the pattern string recorded in the manifest (``"2:4"``); ``sparse_weights`` defaults to True
        for N:M patterns. opt_level: builder optimisation level 0-5 (TensorRT default 3).
    timing_cache: file read before and written after each build (TensorRT; a no-op in TensorRT-RTX).
    target_cc: TensorRT-RTX target compute capabilities (``("8.6", "8.9")`` or ``("SM86",)``); default:
        the current GPU if any, else :data:`RTX_DEFAULT_TARGETS`. workspace_mib: workspace pool limit.
    profile: the optimisation profile itself, ``{input: [min, opt, max]}`` (stage 2's export report has one
        per component covering the served resolutions); replaces ``batch``/``dims``.
    served: the served shapes (:meth:`families.shapes.ServedShapes.to_json`), recorded in the manifest so
        that a request outside the profile is told the range.
    """

    batch: tuple[int, int, int] = (1, 2, 4)
    dims: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    profile: dict[str, list[list[int]]] | None = None
    served: dict[str, Any] | None = None
    sparsity: str = "dense"
    sparse_weights: bool | None = None
    opt_level: int = 3
    timing_cache: str | None = None
    target_cc: tuple[str, ...] | None = None
    workspace_mib: int | None = None

    @property
    def use_sparse_weights(self) -> bool:
        if self.sparse_weights is not None:
            return self.sparse_weights
        return bool(re.fullmatch(r"\d+:\d+", self.sparsity.strip()))


def _sm_name(cc: str) -> str:
    cc = cc.strip().upper()
    if cc.startswith("SM"):
        return cc
    major, _, minor = cc.partition(".")
    return f"SM{int(major)}{int(minor or 0)}"


def profile_shapes(onnx_path: str | os.PathLike, batch: tuple[int, int, int], dims: dict[str, tuple[int, int, int]] | None = None) -> dict[str, list[list[int]]]:
    """Optimisation profile from the ONNX inputs: ``{input: [min_shape, opt_shape, max_shape]}``.

    The dimension named ``batch`` takes ``batch``; other named dims take ``dims[name]``; static dims stay.
    """
    import onnx

    lo, mid, hi = batch
    if not (1 <= lo <= mid <= hi):
        raise UserError(f"batch range {batch} must satisfy 1 <= min <= opt <= max")
    dims = dict(dims or {})
    model = onnx.load(str(onnx_path), load_external_data=False)
    init_names = {t.name for t in model.graph.initializer}
    prof: dict[str, list[list[int]]] = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        shapes: list[list[int]] = [[], [], []]
        for k, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                rng = (d.dim_value,) * 3
            elif d.dim_param == "batch" or (k == 0 and d.dim_param and d.dim_param not in dims):
                rng = (lo, mid, hi)
            elif d.dim_param in dims:
                rng = tuple(dims[d.dim_param])
            else:
                raise UserError(f"{onnx_path}: input {inp.name} dim {k} ({d.dim_param or '?'}) is dynamic; give its range in BuildOptions.dims")
            for s, v in zip(shapes, rng):
                s.append(int(v))
        prof[inp.name] = shapes
    return prof


def expected_profile(onnx_path: str | os.PathLike, options: BuildOptions) -> dict[str, list[list[int]]]:
    """The profile an engine of ``onnx_path`` is built with: ``options.profile`` (checked against the ONNX's
    inputs, ranks and static dims) or the one :func:`profile_shapes` derives from the batch range."""
    if options.profile is None:
        return profile_shapes(onnx_path, options.batch, options.dims)
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init_names = {t.name for t in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        if inp.name not in options.profile:
            raise UserError(f"{onnx_path}: the profile has no shapes for input {inp.name}; re-export with `python -m pipeline export`")
        shapes = [list(map(int, s)) for s in options.profile[inp.name]]
        dims = inp.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            if any(len(s) != len(dims) for s in shapes) or (d.HasField("dim_value") and d.dim_value > 0 and any(s[k] != d.dim_value for s in shapes)):
                raise UserError(f"{onnx_path}: input {inp.name} profile {shapes} does not fit the ONNX shape; re-export with `python -m pipeline export`")
        out[inp.name] = shapes
    return out


def _io_signature(onnx_path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init_names = {t.name for t in model.graph.initializer}

    def sig(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims}

    return {
        "inputs": [sig(v) for v in model.graph.input if v.name not in init_names],
        "outputs": [sig(v) for v in model.graph.output],
    }


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
        raise UserError(f"{be.name} cannot parse {onnx_path}: {errs or 'unknown error'}; check the export (opset 18) or the TensorRT version")

    config = builder.create_builder_config()
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
            targets = [_sm_name(c) for c in options.target_cc]
        elif gpu is not None:
            targets = [_sm_name(gpu.compute_capability)]
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
    if precision in ("int8", "fp8"):
        qw = nm_weights if nm_weights is not None else onnx_nm_weights(onnx_path)
        quantization = {
            "precision": precision,
            "quantized_layers": qw["quantized"],
            # both quantized and N:M: TensorRT can pick sparse INT8/FP8 kernels for these (SPARSE_WEIGHTS on)
            "quantized_nm_layers": qw["quantized_eligible"] if nm_weights is not None else [],
            "nm_pattern": nm_weights["pattern"] if nm_weights is not None else None,
        }
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
        "io": _io_signature(onnx_path),
        "profiles": [prof_shapes],
        "served": options.served,
        "sparsity": options.sparsity,
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
    want_targets = [_sm_name(c) for c in options.target_cc] if options.target_cc else None
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
    names = list(components) if components is not None else [c for c in COMPONENTS if (onnx_dir / f"{c}.onnx").is_file()]
    unknown = [c for c in names if c not in COMPONENTS]
    if unknown:
        raise UserError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")
    missing = [c for c in names if not (onnx_dir / f"{c}.onnx").is_file()]
    if missing or not names:
        raise UserError(f"no ONNX for {', '.join(missing) or 'any component'} in {onnx_dir}; run `python -m pipeline export` first")
    plans: dict[str, Path] = {}
    for comp in tqdm(names, desc=f"{be.name} engines", unit="engine"):
        src = onnx_dir / f"{comp}.onnx"
        plan = Path(out_dir) / comp / f"{engine_stem(be.name, be.version, onnx_precision(src))}.plan"
        opts = options if comp == "transformer" else _dense_options(options)
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


# -------------------------------------------------------------------------------------------- run

_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT32": "int32",
    "INT64": "int64",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}


class TrtEngine:
    """A checked, deserialised engine that runs on CUDA torch tensors.

    ``TrtEngine(plan, onnx_path=None)`` runs :func:`runtime.manifest.check_engine` (backend and version,
    GPU, plan sha256, source ONNX) first; it then hashes the bytes it read and deserialises them only if
    they still match. Call with ``{input name: tensor}``; returns ``{output name: tensor}`` on the GPU.

    runtime_cache (TensorRT-RTX only): file of JIT-compiled kernels, loaded if present and compatible
    (TensorRT-RTX validates GPU, versions and driver itself) and written by :meth:`save_runtime_cache`;
    ``"auto"`` = ``runtime.cache`` next to the plan, ``None`` = no cache.
    """

    def __init__(
        self,
        plan: str | os.PathLike,
        *,
        onnx_path: str | os.PathLike | None = None,
        gpu: GpuInfo | None = None,
        runtime_cache: str | os.PathLike | None = "auto",
    ):
        import hashlib

        import torch

        plan = Path(plan)
        manifest_file = manifest_path_for(plan)
        if not (plan.is_file() and manifest_file.is_file()):
            check_engine(plan, backend="", backend_version="", gpu=None)  # raises the missing-file line
        built_with = read_json(manifest_file).get("backend")
        try:  # the library the engine was built with; if absent, whatever is installed (the check then says rebuild)
            be = get_backend(built_with if built_with in _MODULES else "auto")
        except UserError:
            be = get_backend("auto")
        gpu = gpu or current_gpu()
        self.manifest = check_engine(plan, backend=be.name, backend_version=be.version, gpu=gpu, onnx_path=onnx_path)
        data = plan.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["plan_sha256"]:
            raise UserError(f"engine {plan} changed while loading (sha256 mismatch); rebuild it with `python -m pipeline build`")
        trt = be.module
        self.backend = be
        self._logger = capturing_logger(be)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise UserError(f"{be.name} could not deserialise {plan}; rebuild it with `python -m pipeline build`")
        self._cache, self.runtime_cache_path = None, None
        if be.is_rtx and runtime_cache is not None:
            self.runtime_cache_path = plan.parent / "runtime.cache" if runtime_cache == "auto" else Path(runtime_cache)
            rc = self.engine.create_runtime_config()
            self._cache = rc.create_runtime_cache()
            if self.runtime_cache_path.is_file() and not self._cache.deserialize(self.runtime_cache_path.read_bytes()):
                log.info("runtime cache %s is from another GPU/driver/version; kernels will be recompiled", self.runtime_cache_path)
            rc.set_runtime_cache(self._cache)
            self.context = self.engine.create_execution_context(runtime_config=rc)
        else:
            self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
        self.dtypes = {n: getattr(torch, _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name]) for n in self.inputs + self.outputs}
        self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def max_batch(self) -> int:
        """Largest batch of the optimisation profile (every input's dim 0 max)."""
        prof = (self.manifest.get("profiles") or [{}])[0]
        return min((shapes[2][0] for shapes in prof.values() if shapes and shapes[2]), default=1 << 30)

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run the engine; a batch above the profile's max runs in chunks (outputs concatenated on dim 0)."""
        import torch

        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise UserError(f"engine inputs missing: {', '.join(missing)}")
        batch = int(torch.as_tensor(feeds[self.inputs[0]]).shape[0])
        step = self.max_batch
        if batch <= step:
            return self._run(feeds)
        parts = [self._run({n: feeds[n][i : i + step] for n in self.inputs}) for i in range(0, batch, step)]
        return {n: torch.cat([p[n] for p in parts]) for n in self.outputs}

    def _run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        keep = []  # keep converted inputs alive until the enqueue has completed
        check_in_profile(self.manifest, {n: tuple(torch.as_tensor(feeds[n]).shape) for n in self.inputs})
        for name in self.inputs:
            t = torch.as_tensor(feeds[name]).to(self.device, self.dtypes[name]).contiguous()
            keep.append(t)
            if self.context.set_input_shape(name, tuple(t.shape)) is False:
                raise UserError(f"input {name} shape {tuple(t.shape)} is outside the engine's profile {self.manifest['profiles'][0].get(name)}; rebuild with a wider range")
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            buf = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, buf.data_ptr())
            outs[name] = buf
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.backend.name} enqueue failed: {self._logger.text()[-1:]}")
        return outs

    def save_runtime_cache(self) -> Path | None:
        """Write TensorRT-RTX's JIT kernel cache (atomically) so the next load skips compilation."""
        if self._cache is None or self.runtime_cache_path is None:
            return None
        with atomic_path(self.runtime_cache_path) as tmp:
            tmp.write_bytes(memoryview(self._cache.serialize()))
        return self.runtime_cache_path

    @property
    def size_bytes(self) -> int:
        return int(self.manifest.get("plan_bytes", 0))


class EngineSet:
    """Static engines of one component, one per served resolution (``build --static-shapes``): each call
    runs the engine whose profile fits the inputs; none fitting is one line naming the resolutions."""

    def __init__(self, engines: dict[str, "TrtEngine"]):
        if not engines:
            raise ValueError("an engine set needs at least one engine")
        self.engines = engines
        first = next(iter(engines.values()))
        self.inputs, self.outputs, self.manifest = first.inputs, first.outputs, first.manifest

    def select(self, shapes: dict[str, Any]) -> "TrtEngine":
        from runtime.manifest import profile_violation

        for engine in self.engines.values():
            if profile_violation((engine.manifest.get("profiles") or [{}])[0], shapes) is None:
                return engine
        comp = self.manifest.get("component", "engine")
        shown = {n: list(s) for n, s in shapes.items()}
        raise UserError(f"the static {comp} engines serve {', '.join(self.engines)} px; no engine takes the inputs {shown}; "
                        f"rebuild with `--resolution` including this size (or without --static-shapes)")

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        return self.select({n: tuple(torch.as_tensor(feeds[n]).shape) for n in self.inputs})(feeds)

    @property
    def size_bytes(self) -> int:
        return sum(e.size_bytes for e in self.engines.values())


def find_plan(component_dir: str | os.PathLike, backend: Backend | None = None, precision: str | None = None) -> Path:
    """The plan of ``component_dir`` for ``backend`` (default: the running one), or a one-line error.

    precision: ``"int8"``/``"fp8"`` picks that quantized engine; None takes the float engine, else the one
    quantized engine of the directory (several: an error naming them)."""
    component_dir = Path(component_dir)
    be = backend or get_backend("auto")
    plan = component_dir / f"{engine_stem(be.name, be.version, precision)}.plan"
    if plan.is_file():
        return plan
    if precision is None:
        quantized = [component_dir / f"{engine_stem(be.name, be.version, p)}.plan" for p in QUANTIZED_PRECISIONS]
        quantized = [p for p in quantized if p.is_file()]
        if len(quantized) == 1:
            return quantized[0]
        if quantized:
            raise UserError(f"{component_dir} holds {' and '.join(p.name for p in quantized)}; keep one engine per directory "
                            f"(`make engine` builds each precision into its own engines-<precision>/)")
    others = sorted(p.name for p in component_dir.glob("engine_*.plan"))
    hint = f" (found {', '.join(others)}, built with another version)" if others else ""
    raise UserError(f"no {be.name} {be.version} engine in {component_dir}{hint}; rebuild it with `python -m pipeline build`")


def manifest_summary(plan: str | os.PathLike) -> dict[str, Any]:
    """A short view of a plan's manifest for reports: backend, size, sparsity, sparse-layer counts."""
    m = read_json(manifest_path_for(plan))
    nm = m.get("onnx_nm_weights") or {}
    quant = m.get("quantization") or {}
    return {
        "backend": f"{m['backend']} {m['backend_version']}",
        "precision": m.get("precision"),
        "quantized_layers": len(quant.get("quantized_layers", [])),
        "quantized_nm_layers": len(quant.get("quantized_nm_layers", [])),
        "refused_targets": (m.get("refused_targets") or {}).get("targets"),
        "plan_mib": round(m["plan_bytes"] / 2**20, 2),
        "sparsity": m.get("sparsity"),
        "sparse_weights": m.get("builder", {}).get("sparse_weights"),
        "log_eligible": len(m.get("sparsity_log", {}).get("eligible", [])),
        "log_sparse": len(m.get("sparsity_log", {}).get("sparse", [])),
        "onnx_nm_eligible": len(nm.get("eligible", [])),
        "targets": m.get("target_compute_capabilities"),
        "build_seconds": m.get("build_seconds"),
    }


__all__ = [
    "COMPONENTS",
    "Backend",
    "BuildOptions",
    "EngineSet",
    "TrtEngine",
    "build_engine",
    "build_engines",
    "engine_is_current",
    "find_plan",
    "get_backend",
    "manifest_summary",
    "onnx_nm_weights",
    "onnx_precision",
    "parse_sparsity_log",
    "profile_shapes",
]
