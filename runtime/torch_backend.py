"""PyTorch on a CUDA GPU as a stage-3 backend: the pruned transformer with real 2:4 kernels and torchao precisions.

The transformer stage 1 pruned (the compact checkpoint for structured plans) runs in the diffusers pipeline
itself, in bfloat16 or float16, with

- the linears that stage 1 made 2:4 converted to semi-structured sparse weights
  (``torch.sparse.to_sparse_semi_structured`` through torchao's ``sparsify_(SemiSparseWeightConfig())``):
  cuSPARSELt when PyTorch ships it, else CUTLASS (``SparseSemiStructuredTensor._FORCE_CUTLASS``);
- ``int8``: torchao's ``Int8DynamicActivationInt8WeightConfig`` (dynamic per-token activations, per-channel
  weights); torchao offers no sparse INT8 weight, so 2:4 layers run as dense INT8 (recorded per layer);
- ``fp8``: ``Float8DynamicActivationFloat8WeightConfig`` per row; its 2:4 layers with the
  ``SPARSE_2D_DATA_2D_METADATA`` packing, one CUTLASS kernel (``rowwise_scaled_linear_sparse_cutlass_f8f8``,
  built for SM90a) for FP8 + 2:4;
- ``torch.compile`` on by default.

Which layers convert is decided before anything is converted (:func:`choose_layers`), from the plan's pruned
layers checked against their weights (exactly 2:4 along the input dimension) and PyTorch's shape and dtype
rules for the chosen kernel; every layer left dense is recorded with the reason. The hardware rules
(:func:`check_hardware`: 2:4 needs sparse tensor cores, SM80+; FP8 needs SM89+; FP8 + 2:4 the SM90 kernel)
take the GPU as an argument, so they are tested without one. Packaging the result as a file is
:mod:`runtime.torch_package`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from common.errors import UserError

log = logging.getLogger(__name__)

SPARSE_MIN_CC = (8, 0)  # sparse tensor cores: Ampere and newer
FP8_MIN_CC = (8, 9)  # FP8 tensor cores: Ada, Hopper, Blackwell
FP8_SPARSE_CC = ((9, 0),)  # torchao's FP8 + 2:4 CUTLASS kernel is built for sm90a only
SPARSE_BACKENDS = ("auto", "cusparselt", "cutlass")
COMPILE_SCOPES = ("blocks", "model")
FP8_SPARSE_KERNEL = "torchao-cutlass-sm90a-f8f8"


@dataclass(frozen=True)
class TorchPrecision:
    """A precision recipe of the torch backend.

    name: ``bf16`` | ``fp16`` | ``int8`` | ``fp8``. dtype: activations and every weight left unquantized.
    quant: torchao weight quantization (None, ``int8``, ``fp8``). min_cc: the lowest compute capability
    that runs it.
    """

    name: str
    dtype: torch.dtype
    quant: str | None = None
    min_cc: tuple[int, int] = (7, 0)


PRECISIONS: dict[str, TorchPrecision] = {
    p.name: p
    for p in (
        TorchPrecision("bf16", torch.bfloat16, None, (8, 0)),
        TorchPrecision("fp16", torch.float16, None, (7, 0)),
        TorchPrecision("int8", torch.bfloat16, "int8", (8, 0)),
        TorchPrecision("fp8", torch.bfloat16, "fp8", FP8_MIN_CC),  # per-row FP8 scales need bfloat16 weights
    )
}


def parse_precision(text: str) -> TorchPrecision:
    """The precision named ``text``; one-line :class:`UserError` listing the accepted names otherwise."""
    p = PRECISIONS.get(str(text).strip().lower())
    if p is None:
        raise UserError(f"unknown torch backend precision {text!r}; use one of: {', '.join(PRECISIONS)}")
    return p


@dataclass(frozen=True)
class TorchSettings:
    """How the torch backend runs the transformer.

    precision: see :data:`PRECISIONS`. sparse_kernels: convert the 2:4 layers (False: run them as dense
    GEMMs, to measure what the kernels bring). sparse_backend: ``auto`` (cuSPARSELt when available, else
    CUTLASS), ``cusparselt`` or ``cutlass`` (bf16/fp16 2:4 only). compile: ``torch.compile`` the transformer.
    compile_mode: its ``mode`` (None: PyTorch's default; ``max-autotune`` compiles for minutes). compile_scope:
    ``blocks`` compiles each transformer block (regional compilation: blocks of one kind share the compiled
    code, so a 57-block Flux compiles about as fast as a 2-block one, at nearly the speed of a whole-model
    compile) or ``model`` (one graph of the whole transformer).
    """

    precision: TorchPrecision = PRECISIONS["bf16"]
    sparse_kernels: bool = True
    sparse_backend: str = "auto"
    compile: bool = True
    compile_mode: str | None = None
    compile_scope: str = "blocks"

    def __post_init__(self):
        if self.sparse_backend not in SPARSE_BACKENDS:
            raise UserError(f"unknown sparse backend {self.sparse_backend!r}; use one of: {', '.join(SPARSE_BACKENDS)}")
        if self.compile_scope not in COMPILE_SCOPES:
            raise UserError(f"unknown compile scope {self.compile_scope!r}; use one of: {', '.join(COMPILE_SCOPES)}")

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision.name, "dtype": str(self.precision.dtype).removeprefix("torch."),
                "sparse_kernels": self.sparse_kernels, "sparse_backend": self.sparse_backend,
                "compile": self.compile, "compile_mode": self.compile_mode, "compile_scope": self.compile_scope}


# --------------------------------------------------------------------------------------------------------
# Hardware rules
# --------------------------------------------------------------------------------------------------------


def parse_capability(cc: str | tuple[int, int]) -> tuple[int, int]:
    """``"8.9"`` or ``(8, 9)`` -> ``(8, 9)``."""
    if isinstance(cc, tuple):
        return (int(cc[0]), int(cc[1]))
    major, _, minor = str(cc).partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        raise UserError(f"compute capability {cc!r} is not of the form 8.9") from None


def check_hardware(settings: TorchSettings, sparse: bool, gpu) -> None:
    """One-line :class:`UserError` when ``gpu`` (a :class:`runtime.manifest.GpuInfo`, None: no CUDA) cannot
    run ``settings`` for a model whose plan is 2:4 (``sparse``)."""
    p = settings.precision
    if gpu is None:
        raise UserError("--backend torch runs on an NVIDIA GPU and CUDA is not available here "
                        "(torch.cuda.is_available() is False); run it on a GPU host, or use the ONNX Runtime or TensorRT-RTX backends")
    cc = parse_capability(gpu.compute_capability)
    where = f"this GPU ({gpu.name}) is compute {cc[0]}.{cc[1]}"
    if cc < p.min_cc:
        hint = "use --precision fp16" if p.name == "bf16" else "use --precision bf16 or fp16"
        raise UserError(f"--precision {p.name} needs compute capability {p.min_cc[0]}.{p.min_cc[1]} or newer but {where}; {hint}")
    if sparse and settings.sparse_kernels:
        if cc < SPARSE_MIN_CC:
            raise UserError(f"a 2:4 plan runs on sparse tensor cores (compute capability 8.0+, Ampere or newer) but {where}; "
                            "add --no-sparse-kernels to run its weights as dense GEMMs, or use a structured plan")
        if p.quant == "fp8" and cc not in FP8_SPARSE_CC:
            raise UserError(f"FP8 + 2:4 runs on torchao's CUTLASS kernel for compute capability 9.0 (Hopper) only but {where}; "
                            "add --no-sparse-kernels for dense FP8, or use --precision bf16 for 2:4")


def cusparselt_available() -> bool:
    return bool(torch.backends.cusparselt.is_available())


def resolve_sparse_backend(requested: str, has_cusparselt: bool) -> str:
    """The semi-structured kernel library for bf16/fp16 2:4: ``cusparselt`` or ``cutlass``."""
    if requested == "auto":
        return "cusparselt" if has_cusparselt else "cutlass"
    if requested == "cusparselt" and not has_cusparselt:
        raise UserError("--sparse-backend cusparselt: this PyTorch build has no cuSPARSELt "
                        "(torch.backends.cusparselt.is_available() is False); use --sparse-backend cutlass or auto")
    return requested


def _semi_structured_class(backend: str):
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS


@contextlib.contextmanager
def _semi_structured_backend(backend: str) -> Iterator[None]:
    """``to_sparse_semi_structured`` (what torchao's ``SemiSparseWeightConfig`` calls) picks its class from
    this class flag: set it for the conversion only."""
    from torch.sparse import SparseSemiStructuredTensor

    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old


# --------------------------------------------------------------------------------------------------------
# Which layers convert
# --------------------------------------------------------------------------------------------------------


def two_four_violation(weight: torch.Tensor) -> str | None:
    """Why ``weight`` (out, in) is not 2:4 along its input dimension, or None when it is."""
    rows, cols = weight.shape
    if cols % 4:
        return f"in_features {cols} is not a multiple of 4"
    nonzero = (weight.detach().reshape(rows, cols // 4, 4) != 0).sum(dim=-1)  # (out, in/4) non-zeros per group
    bad = int((nonzero > 2).sum())
    if bad:
        return f"not 2:4 along the input dimension ({bad} of {nonzero.numel()} groups of 4 hold more than 2 non-zeros)"
    return None


def semi_structured_shape_violation(shape: tuple[int, int], dtype: torch.dtype, backend: str) -> str | None:
    """Why PyTorch's ``backend`` kernels refuse a ``dtype`` weight of ``shape`` (out, in), or None. The rule
    is the installed PyTorch's own (``_DTYPE_SHAPE_CONSTRAINTS`` of the semi-structured tensor class)."""
    cls = _semi_structured_class(backend)
    rule = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    name = "cuSPARSELt" if backend == "cusparselt" else "CUTLASS"
    if rule is None:
        return f"{name} semi-structured kernels take no {str(dtype).removeprefix('torch.')} weights"
    rows, cols = shape
    mr, mc = rule.sparse_min_rows, rule.sparse_min_cols
    if rows < mr or rows % mr or cols < mc or cols % mc:
        return f"shape {rows}x{cols} (out x in): {name} {str(dtype).removeprefix('torch.')} needs both at least and multiples of {mr}x{mc}"
    return None


def fp8_shape_violation(shape: tuple[int, int]) -> str | None:
    """torchao quantizes a linear to FP8 only when both dims are multiples of 16 (``torch._scaled_mm``)."""
    rows, cols = shape
    if rows % 16 or cols % 16:
        return f"shape {rows}x{cols} (out x in): FP8 GEMMs need multiples of 16"
    return None


def sparse_candidates(model: nn.Module, plan=None) -> list[str]:
    """The linears stage 1 pruned: the plan's layers (qualified names), or, without a plan, every prunable
    linear of the family adapter (their weights then decide)."""
    if plan is not None and plan.pruned_layers:
        return plan.pruned_layers
    from obsdiff.packages import build_units

    return [n for u in build_units(model) for n in u.layers]


def quant_candidates(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Every ``nn.Linear`` torchao may quantize, and those the family adapter keeps high precision (name ->
    reason): embedders, AdaLN modulations, the output layer (``quant_exclude``)."""
    from export.quantize import excluded_modules
    from families import adapter_for

    excluded = set(excluded_modules(model, adapter_for(model).quant_exclude))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kept = {n: "kept high precision by the family adapter (quant_exclude)" for n in linears if n in excluded}
    return [n for n in linears if n not in excluded], kept


@dataclass
class LayerChoice:
    """What :func:`convert` will do to each linear.

    sparse: layers converted to 2:4 kernels. quantized: layers quantized dense (INT8 or FP8). refused:
    2:4 candidates left dense, with the reason. high_precision: linears left unquantized, with the reason.
    kernel: the 2:4 kernel (``cusparselt``, ``cutlass``, :data:`FP8_SPARSE_KERNEL`, or None).
    notes: one line each, for the report (INT8 + 2:4 unavailable...).
    """

    sparse: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    high_precision: dict[str, str] = field(default_factory=dict)
    kernel: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "sparse_layers": len(self.sparse), "quantized_dense_layers": len(self.quantized),
                "refused": dict(self.refused), "high_precision": dict(self.high_precision), "notes": list(self.notes),
                "sparse": list(self.sparse)}


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    from families.base import get_module

    m = get_module(model, name) if name else model
    return m if isinstance(m, nn.Linear) else None


def choose_layers(model: nn.Module, plan, settings: TorchSettings, *, sparse: bool, sparse_backend: str = "cusparselt") -> LayerChoice:
    """Decide, without converting anything, which linears of ``model`` run on which kernel.

    sparse: the plan is 2:4 (its candidate layers are checked against their weights). sparse_backend: the
    resolved bf16/fp16 library (:func:`resolve_sparse_backend`). The shape rules are those of the kernels the
    layer would reach, at ``settings.precision.dtype``.
    """
    p = settings.precision
    choice = LayerChoice()
    candidates: list[str] = []
    if sparse:
        if not settings.sparse_kernels:
            choice.notes.append("--no-sparse-kernels: the 2:4 weights run as dense GEMMs")
        else:
            candidates = sparse_candidates(model, plan)
    if p.quant == "int8" and candidates:
        why = int8_sparse_unavailable()
        if why:
            note = f"{why}; the 2:4 layers run as dense INT8"
            choice.notes.append(note)
            for name in candidates:
                choice.refused[name] = note
            candidates = []
    if candidates:
        choice.kernel = FP8_SPARSE_KERNEL if p.quant == "fp8" else sparse_backend
    for name in candidates:
        lin = _linear(model, name)
        if lin is None:
            choice.refused[name] = "not an nn.Linear of this model"
            continue
        shape = tuple(lin.weight.shape)
        why = two_four_violation(lin.weight)
        if why is None:
            why = fp8_shape_violation(shape) if p.quant == "fp8" else semi_structured_shape_violation(shape, p.dtype, sparse_backend)
        if why is None:
            choice.sparse.append(name)
        else:
            choice.refused[name] = why
    if p.quant:
        names, kept = quant_candidates(model)
        choice.high_precision.update(kept)
        taken = set(choice.sparse)
        for name in names:
            if name in taken:
                continue
            why = fp8_shape_violation(tuple(_linear(model, name).weight.shape)) if p.quant == "fp8" else None
            if why is None:
                choice.quantized.append(name)
            else:
                choice.high_precision[name] = why
    return choice


# --------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------


def require_torchao():
    """torchao, or a one-line :class:`UserError` saying how to install it."""
    try:
        import torchao
    except ImportError:
        raise UserError("the torch backend needs torchao: `pip install -e '.[torch-gpu]'` (an offline GPU host: "
                        "`make gpu-wheels` on a connected machine, then `make gpu-check WHEELS=DIR`)") from None
    return torchao


def int8_sparse_unavailable() -> str | None:
    """Why INT8 + 2:4 does not run here (one line). torchao 0.18's ``Int8DynamicActivationInt8WeightConfig`` has no
    packing or layout option, so there is no sparse INT8 weight to convert to; a later torchao that adds one is
    named as such (this backend would need its config wired in)."""
    require_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    fields = [f for f in getattr(Int8DynamicActivationInt8WeightConfig, "__dataclass_fields__", {}) if "packing" in f or "layout" in f]
    if fields:
        return (f"INT8 + 2:4: torchao {_torchao_version()}'s Int8DynamicActivationInt8WeightConfig has {', '.join(fields)}, "
                "which this backend does not wire yet")
    return f"INT8 + 2:4: torchao {_torchao_version()} has no sparse INT8 weight format (Int8DynamicActivationInt8WeightConfig has no packing option)"


def fp8_sparse_kernel_loaded() -> bool:
    """Whether torchao's FP8 + 2:4 CUTLASS kernel has a CUDA implementation in this process (its ``.so`` loads
    only with a CUDA build of torch >= 2.11; the op's schema is registered either way)."""
    try:
        require_torchao()
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("torchao::rowwise_scaled_linear_sparse_cutlass_f8f8", "CUDA"))
    except (UserError, RuntimeError):
        return False


def _torchao_version() -> str:
    from common.versions import library_versions

    return library_versions(["torchao"])["torchao"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def torchao_configs(settings: TorchSettings) -> tuple[Any | None, Any | None]:
    """``(config for the 2:4 layers, config for the dense quantized layers)`` from torchao (None: nothing)."""
    p = settings.precision
    require_torchao()
    if p.quant is None:
        from torchao.sparsity.sparse_api import SemiSparseWeightConfig

        return SemiSparseWeightConfig(), None
    if p.quant == "int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return None, Int8DynamicActivationInt8WeightConfig()
    import importlib

    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    packing = importlib.import_module("torchao.quantization.quantize_.workflows").Float8PackingFormat
    return (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), packing_format=packing.SPARSE_2D_DATA_2D_METADATA),
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def convert(model: nn.Module, choice: LayerChoice, settings: TorchSettings) -> LayerChoice:
    """Apply ``choice`` to ``model`` (on its GPU, in place), one layer at a time through torchao's
    ``sparsify_``/``quantize_``; a layer the library refuses stays as it was and is recorded with the
    library's message. Returns the choice as done."""
    if not choice.sparse and not choice.quantized:  # dense bf16/fp16: nothing for torchao to do
        return choice
    require_torchao()
    from torchao.quantization import quantize_
    from torchao.sparsity.sparse_api import sparsify_

    sparse_cfg, dense_cfg = torchao_configs(settings)
    done = LayerChoice(refused=dict(choice.refused), high_precision=dict(choice.high_precision), kernel=choice.kernel, notes=list(choice.notes))
    apply = sparsify_ if settings.precision.quant is None else quantize_
    with _semi_structured_backend(choice.kernel or "cusparselt"):
        for name in choice.sparse:
            try:
                apply(_linear(model, name), sparse_cfg)
                done.sparse.append(name)
            except Exception as e:  # the library's own shape/hardware checks: record, keep the layer dense
                done.refused[name] = f"refused at conversion: {_first_line(e)}"
    for name in choice.quantized:
        try:
            quantize_(_linear(model, name), dense_cfg)
            done.quantized.append(name)
        except Exception as e:
            done.high_precision[name] = f"refused at quantization: {_first_line(e)}"
    if choice.sparse and not done.sparse:
        done.kernel = None
    log.info("torch backend: %d layers on 2:4 kernels (%s), %d quantized dense (%s), %d 2:4 candidates left dense",
             len(done.sparse), done.kernel, len(done.quantized), settings.precision.quant, len(done.refused))
    return done


def prepare_transformer(model: nn.Module, plan, settings: TorchSettings, *, sparse: bool, device: str | torch.device = "cuda",
                        gpu=None, apply: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The transformer ready to run: moved to ``device`` in the precision's dtype, its linears converted
    (``apply=False``: decide only, as on a CPU dry run) and compiled when asked. Returns ``(model, report)``.

    sparse: the plan is 2:4. gpu: the :class:`runtime.manifest.GpuInfo` it runs on, checked with
    :func:`check_hardware` when ``apply``.
    """
    if apply:
        check_hardware(settings, sparse, gpu)
    backend = resolve_sparse_backend(settings.sparse_backend, cusparselt_available()) if apply else (
        "cutlass" if settings.sparse_backend == "cutlass" else "cusparselt")
    model = model.to(device=device, dtype=settings.precision.dtype).eval()
    model.requires_grad_(False)
    choice = choose_layers(model, plan, settings, sparse=sparse, sparse_backend=backend)
    if apply:
        choice = convert(model, choice, settings)
    else:
        choice.notes.append("dry run: layers chosen, not converted (the kernels need CUDA)")
    if settings.compile and apply:
        compile_transformer(model, settings)
    report = {"settings": settings.to_json(), "layers": choice.to_json(), "gpu": gpu.to_dict() if gpu is not None else None,
              "compiled": bool(settings.compile and apply), "converted": apply}
    return model, report


def compile_transformer(model: nn.Module, settings: TorchSettings) -> nn.Module:
    """``torch.compile`` ``model`` in place (it keeps its attributes, so the pipeline still reads ``config``):
    each block of the family adapter (``compile_scope="blocks"``) or the whole module."""
    if settings.compile_scope == "model":
        model.compile(mode=settings.compile_mode)
        return model
    from families import adapter_for

    for _, block in adapter_for(model).blocks(model):
        block.compile(mode=settings.compile_mode)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the parameters and buffers hold, the packed data of sparse and quantized weights included."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def size(t: torch.Tensor) -> int:
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names if isinstance(getattr(t, n, None), torch.Tensor))
        return t.numel() * t.element_size()

    return sum(size(t) for t in list(model.parameters()) + list(model.buffers()))


def layers_by_kind(names: Iterable[str]) -> dict[str, int]:
    """Layer counts by name without the block indices (``transformer_blocks.attn.to_q``: 24), for short reports."""
    out: dict[str, int] = {}
    for n in names:
        key = ".".join(p for p in n.split(".") if not p.isdigit())
        out[key] = out.get(key, 0) + 1
    return out


def add_torch_arguments(p) -> None:
    """The torch backend's options on an argparse parser (``build``, ``benchmarks.e2e``, ``make engine``)."""
    p.add_argument("--torch-precision", default="bf16", choices=list(PRECISIONS),
                   help="--backend torch: bf16/fp16 (2:4 on cuSPARSELt or CUTLASS), int8 or fp8 through torchao (default bf16)")
    p.add_argument("--sparse-backend", default="auto", choices=list(SPARSE_BACKENDS),
                   help="--backend torch: 2:4 kernels for bf16/fp16 (default auto: cuSPARSELt when PyTorch has it)")
    p.add_argument("--no-compile", action="store_true", help="--backend torch: run eager (default: torch.compile, per block)")


def torch_settings_from_args(args, *, sparse_kernels: bool = True) -> TorchSettings:
    """:class:`TorchSettings` from :func:`add_torch_arguments`'s options."""
    return TorchSettings(precision=parse_precision(args.torch_precision), sparse_kernels=sparse_kernels,
                         sparse_backend=args.sparse_backend, compile=not args.no_compile)
