"""Low precision on top of sparsity: INT8 / FP8 quantization of the transformer with NVIDIA ModelOpt.

The flow, after stage 1 (the transformer is masked-dense or compact, its pruned weights exactly zero):

1. :func:`record_calibration_inputs` runs the real pipeline (the registry's sampler, guidance and size) and keeps
   the transformer's inputs of an even spread of its calls, keyed by the ONNX input names of the family's
   wrapper (:meth:`families.base.FamilyAdapter.transformer_for_onnx`).
2. :func:`quantize_transformer` inserts ModelOpt fake quantizers (``mtq.quantize``) and calibrates them (max
   calibration) on those inputs. Quantized: the weights and inputs of ``nn.Linear`` and ``nn.Conv2d`` layers
   only, with the numerics of ModelOpt's stock configs: ``INT8_DEFAULT_CFG`` (symmetric INT8, weights per
   output channel, activations per tensor) and ``FP8_DEFAULT_CFG`` (E4M3, per tensor). Attention's two batched
   matmuls and its softmax are not quantized (ModelOpt's ``q/k/v_bmm``/``softmax`` quantizers stay off, as in
   the stock configs; FP8 attention is an opt-in of ModelOpt's diffusers example), and neither are the modules
   the family adapter lists in ``quant_exclude`` (embedders, AdaLN modulations, the output layer). ModelOpt's
   stock configs are not used as they are: their name rules are written for LLMs (``*proj_out.*`` would keep
   Flux's pruned single-block ``proj_out`` in high precision) and ModelOpt >= 0.47 also puts an input
   quantizer on every ``nn.LayerNorm``; here the quantizers are enabled for Linear/Conv parents only.
3. Pruned weights must stay exactly zero: symmetric INT8 maps 0 to 0 (``round(0 / s) + 0``) and E4M3 has an
   exact zero, and rounding can only add zeros (tiny weights), so an N:M pattern survives.
   :func:`assert_quantized_zeros` checks it on every quantized layer rather than assuming it.
4. :func:`export_quantized_onnx` exports with the TorchScript exporter (``dynamo=False``: ModelOpt's Q/DQ are
   TorchScript symbolic functions): INT8 gives standard ``QuantizeLinear``/``DequantizeLinear``, FP8 gives
   ``trt::TRT_FP8QuantizeLinear``/``TRT_FP8DequantizeLinear`` (TensorRT's; ONNX Runtime cannot run them). Then
   every weight quantizer is folded into its constant: a GEMM reads ``DequantizeLinear(int8 [K, N] constant,
   per-channel scale)`` (FP8: ``TRT_FP8DequantizeLinear(float8e4m3fn constant)``) directly, the constant named
   after the torch layer (``transformer_blocks.0.attn.to_q.weight``), so
   :func:`export.sparsity_check.check_onnx_sparsity` checks the very values TensorRT gets (and the file holds 1
   byte per weight). :func:`int8_parity` compares the INT8 ONNX in ONNX Runtime with the fake-quantized model.

Limits: the TorchScript exporter and the graph passes here hold the whole graph with its weights in memory
(stage 2's dynamo path streams them); only the tiny fixtures have been exported so far. Only the batch axis is
dynamic. ONNX Runtime cannot run the FP8 graph; TensorRT-RTX 1.7 builds it (without a GPU) for SM89/SM120 only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import io
import logging
import os
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from export.sparsity_check import quantize_fp8, quantize_int  # the ONNX / TensorRT quantize of a constant

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp8")
# TorchScript exporter opset: per-channel Q/DQ needs >= 13; 18 is the rest of stage 2's opset (what TensorRT 10,
# TensorRT-RTX and onnxruntime >= 1.20 are tested with here).
QUANT_OPSET = 18
# INT8 ONNX (ONNX Runtime, CPU) vs the fake-quantized torch model, max |diff| / max |ref| of the output. Both run
# the same quantized GEMMs; they differ by float rounding, and by the odd activation that sits on a rounding
# boundary of its INT8 grid and lands one step (1/127 of the tensor's range) apart, which the next layers carry to
# the output. Measured on the tiny 2:4 SD3/Flux fixtures (3 seeds x 6 inputs x batches 1 and 3 each): median 4e-6,
# max 1.9e-4 (SD3) and 4.4e-4 (Flux); 2e-3 is 4.5x the worst case. What it can see there: doubling the weight
# scales of one late layer gives 2e-2..4e-2 (caught), of an early one 4e-4..7e-3 (mostly not); the whole INT8
# model is only 4e-4 (SD3) / 4e-3 (Flux) from the float model on these random weights. The tests therefore also
# check that the ONNX output is far closer to the fake-quantized model than to the float one.
INT8_TOLERANCE = 2e-3

_Q_OPS = ("QuantizeLinear", "TRT_FP8QuantizeLinear")
_DQ_OPS = ("DequantizeLinear", "TRT_FP8DequantizeLinear")


def parse_precision(precision: str) -> str:
    """``"int8"`` or ``"fp8"`` (case-insensitive); :class:`UserError` for anything else."""
    p = str(precision).strip().lower()
    if p not in PRECISIONS:
        raise UserError(f"unknown quantization precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
    return p


def _mtq():
    """``modelopt.torch.quantization``, imported on first use (it warns about untested transformers versions)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
        import modelopt.torch.quantization as mtq
    return mtq


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


def quant_config(precision: str, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The ``mtq.quantize`` config: ModelOpt's stock numerics for ``precision`` on the weights and inputs of
    ``nn.Linear``/``nn.Conv2d`` layers, nothing else, and no quantizer under a module matching ``exclude``
    (fnmatch globs on qualified module names; a match covers the module's submodules too)."""
    precision = parse_precision(precision)
    mtq = _mtq()
    stock = mtq.INT8_DEFAULT_CFG if precision == "int8" else mtq.FP8_DEFAULT_CFG
    cfg = {e["quantizer_name"]: e["cfg"] for e in stock["quant_cfg"] if "cfg" in e and not e.get("parent_class")}
    weight, inputs = dict(cfg["*weight_quantizer"]), dict(cfg["*input_quantizer"])
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for parent in ("nn.Linear", "nn.Conv2d"):
        entries.append({"quantizer_name": "*weight_quantizer", "parent_class": parent, "cfg": weight})
        entries.append({"quantizer_name": "*input_quantizer", "parent_class": parent, "cfg": inputs})
    # a quantizer is named <module>.<weight|input>_quantizer: "<glob>.*" matches the module's and its children's
    entries += [{"quantizer_name": f"{pattern}.*", "enable": False} for pattern in exclude]
    return {"quant_cfg": entries, "algorithm": stock.get("algorithm", "max")}


def excluded_modules(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Qualified names of the modules of ``model`` that ``patterns`` keep in high precision (matched, or under a
    matched module)."""
    patterns = tuple(patterns)
    names = [n for n, _ in model.named_modules() if n]
    hit = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    return [n for n in names if n in hit or any(n.startswith(h + ".") for h in hit)]


# --------------------------------------------------------------------------------------------------------
# Calibration inputs
# --------------------------------------------------------------------------------------------------------


def _reference_inputs(adapter, model: nn.Module) -> dict[str, torch.Tensor]:
    """Meta tensors with the rank and dtype of each ONNX input (the adapter's example inputs)."""
    p = adapter.latent_patch(dict(model.config))
    dtype = next(model.parameters()).dtype
    return adapter.transformer_inputs(model, 1, (2 * p, 2 * p), 1, dtype=dtype, device="meta")


def onnx_feeds(arguments: dict[str, Any], names: Sequence[str], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformer call's arguments (by parameter name) as the ONNX wrapper's inputs: CPU tensors in the ONNX
    dtypes, every input batch-major (a per-call constant without a batch dim, such as Flux's position ids, is
    repeated along a new batch dim, as the runtime module does the other way round)."""
    batch = arguments[names[0]].shape[0]
    feeds = {}
    for name in names:
        value = arguments.get(name)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"the transformer call passed no tensor {name!r} (an ONNX input)")
        ref = reference[name]
        if value.dim() == ref.dim() - 1:
            value = value.unsqueeze(0).expand(batch, *value.shape)
        if value.dim() != ref.dim():
            raise ValueError(f"{name}: the transformer call passed shape {list(value.shape)}, the ONNX input has rank {ref.dim()}")
        feeds[name] = value.detach().to("cpu", ref.dtype).contiguous()
    return feeds


def _spread(items: list, k: int) -> list:
    """At most ``k`` of ``items``, evenly spread (first and last kept), in order."""
    if len(items) <= k:
        return list(items)
    idx = sorted(set(np.linspace(0, len(items) - 1, k).round().astype(int).tolist()))
    return [items[i] for i in idx]


def record_calibration_inputs(
    pipe,
    spec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int | None = None,
    guidance: float | None = None,
    max_calls: int = 64,
) -> list[dict[str, torch.Tensor]]:
    """Run the real sampler and keep the transformer's inputs of at most ``max_calls`` of its calls.

    One pipeline run per (prompt, seed), with ``spec``'s size, sequence length and the adapter's guidance
    arguments (classifier-free guidance's doubled batch or second call included); each run keeps an even spread
    of its calls over the trajectory, the runs sharing ``max_calls``. steps / guidance default to ``spec``'s.
    Returns one dict per kept call, by ONNX input name (CPU tensors, ONNX dtypes) — what
    :func:`quantize_transformer` takes. Memory: one run's transformer inputs at a time, plus what is kept.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if max_calls < 1:
        raise ValueError("max_calls must be at least 1")
    steps = spec.steps if steps is None else steps
    guidance = spec.guidance if guidance is None else guidance
    adapter = spec.adapter
    model = pipe.transformer
    names = list(adapter.transformer_for_onnx(model).input_names)
    reference = _reference_inputs(adapter, model)
    signature = inspect.signature(model.forward)
    n = len(prompts)
    quotas = [max_calls // n + (1 if i < max_calls % n else 0) for i in range(n)]
    kept: list[dict[str, torch.Tensor]] = []
    for prompt, seed, quota in zip(prompts, seeds, quotas):
        if quota == 0:
            continue
        calls: list[dict[str, torch.Tensor]] = []

        def capture(module, args, kwargs):
            calls.append(onnx_feeds(signature.bind_partial(*args, **kwargs).arguments, names, reference))

        handle = model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                pipe(
                    prompt=[prompt],
                    num_inference_steps=steps,
                    height=spec.height,
                    width=spec.width,
                    max_sequence_length=spec.max_sequence_length,
                    generator=[torch.Generator("cpu").manual_seed(int(seed))],
                    output_type="latent",
                    **adapter.guidance_kwargs(pipe, guidance, 1),
                )
        finally:
            handle.remove()
        kept += _spread(calls, quota)
    log.info("recorded %d transformer calls for calibration (%d prompts x %d steps)", len(kept), n, steps)
    return kept


# --------------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------------


def quantize_transformer(model: nn.Module, precision: str, calib_inputs: Sequence[dict[str, torch.Tensor]], *, adapter=None) -> nn.Module:
    """Fake-quantize ``model`` in place with ModelOpt (``"int8"`` or ``"fp8"``) and calibrate it on ``calib_inputs``.

    calib_inputs: transformer inputs by ONNX input name (:func:`record_calibration_inputs`, or the adapter's
        ``transformer_inputs``); each is run once through the adapter's ONNX wrapper (max calibration).
    adapter: the family adapter (default: the one of ``model``); its ``quant_exclude`` stays high precision.
    Returns the quantized model (the same object). Raises if a zero weight became non-zero (it cannot with these
    formats; :func:`assert_quantized_zeros`).
    """
    from families import adapter_for

    precision = parse_precision(precision)
    adapter = adapter or adapter_for(model)
    if not calib_inputs:
        raise ValueError("no calibration inputs; record some with record_calibration_inputs")
    if is_quantized(model):
        raise ValueError("the model is already quantized; quantize a fresh copy")
    names = list(adapter.transformer_for_onnx(model).input_names)
    for i, inputs in enumerate(calib_inputs):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"calibration input {i} lacks {missing} (the ONNX inputs are {names})")
    exclude = tuple(adapter.quant_exclude)
    if not exclude:
        log.warning("the %s adapter lists no quant_exclude: every Linear/Conv of %s is quantized", adapter.name, type(model).__name__)
    module_names = [n for n, _ in model.named_modules()]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in module_names):
            log.warning("quant_exclude pattern %r matches no module of %s", pattern, type(model).__name__)
    device = next(model.parameters()).device

    def forward_loop(m: nn.Module) -> None:
        wrapper = adapter.transformer_for_onnx(m)
        with torch.no_grad():
            for inputs in calib_inputs:
                wrapper(*(inputs[n].to(device) for n in names))

    t0 = time.perf_counter()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # ModelOpt prints ("Inserted 125 quantizers")
        model = _mtq().quantize(model, quant_config(precision, exclude), forward_loop)
    log.debug("modelopt: %s", printed.getvalue().strip())
    assert_quantized_zeros(model)
    n_quant = sum(1 for _, m in model.named_modules() if _enabled(getattr(m, "weight_quantizer", None)))
    log.info("quantized %d layers to %s on %d calibration calls in %.1f s (%d modules excluded)",
             n_quant, precision, len(calib_inputs), time.perf_counter() - t0, len(excluded_modules(model, exclude)))
    return model


def _enabled(quantizer) -> bool:
    return quantizer is not None and bool(getattr(quantizer, "is_enabled", False))


def is_quantized(model: nn.Module) -> bool:
    """Whether any weight or input quantizer of ``model`` is enabled."""
    return any(_enabled(getattr(m, a, None)) for _, m in model.named_modules() for a in ("weight_quantizer", "input_quantizer"))


def enabled_quantizers(model: nn.Module) -> list[str]:
    """Qualified names of every enabled ModelOpt quantizer of ``model`` (``...to_q.weight_quantizer``)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled]


def quantized_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight ``module`` computes with (fake-quantized, float), or None when its weight is not quantized."""
    quantizer = getattr(module, "weight_quantizer", None)
    if not _enabled(quantizer):
        return None
    with torch.no_grad():
        return quantizer(module.weight.detach())


def check_quantized_zeros(model: nn.Module, pattern: tuple[int, int] | None = None) -> dict[str, str]:
    """Layers whose quantized weight lost a zero, is not finite, or (with ``pattern``) no longer has the N:M
    pattern its float weight has along K; ``{layer: what is wrong}`` (empty: all fine)."""
    from export.sparsity_check import check_nm

    bad: dict[str, str] = {}
    for name, module in model.named_modules():
        q = quantized_weight(module)
        if q is None:
            continue
        w = module.weight.detach()
        if not torch.isfinite(q).all():
            bad[name] = "the quantized weight is not finite"
            continue
        lost = int(((w == 0) & (q != 0)).sum())
        if lost:
            bad[name] = f"{lost} zero weights are non-zero after quantization"
            continue
        if pattern is not None and w.dim() == 2:
            n, m = pattern
            if check_nm(w.float().numpy(), 1, n, m).ok:  # (out, K): a pruned layer
                res = check_nm(q.float().numpy(), 1, n, m)
                if not res.ok:
                    bad[name] = f"{n}:{m} lost after quantization: {res.reason}"
    return bad


def assert_quantized_zeros(model: nn.Module, pattern: tuple[int, int] | None = None) -> None:
    """Raise ``AssertionError`` naming the layers :func:`check_quantized_zeros` reports."""
    bad = check_quantized_zeros(model, pattern)
    if bad:
        raise AssertionError("quantization broke pruned weights: " + "; ".join(f"{k}: {v}" for k, v in sorted(bad.items())))


# --------------------------------------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------------------------------------


def export_quantized_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: dict[str, torch.Tensor],
    *,
    adapter=None,
    opset: int = QUANT_OPSET,
    fold_weights: bool = True,
) -> Path:
    """Export a :func:`quantize_transformer`-ed model's ONNX wrapper to ``path`` (Q/DQ graph), batch dynamic.

    example_inputs: by ONNX input name, batch >= 2 (``adapter.transformer_inputs``); every input and the output
        get a dynamic ``batch`` axis 0. fold_weights: fold each weight quantizer into an INT8/FP8 constant read by
        one DequantizeLinear right before its GEMM (see the module docstring); False keeps ModelOpt's graph
        (QuantizeLinear on the float weight, then a Transpose). Initializers are named after the torch
        parameters. The IR version is capped at ``export.onnx_export.MAX_IR_VERSION``; written atomically.
    """
    import onnx

    from export.onnx_export import MAX_IR_VERSION, save_onnx
    from families import adapter_for

    adapter = adapter or adapter_for(model)
    if not is_quantized(model):
        raise ValueError("the model has no enabled quantizer; run quantize_transformer first")
    wrapper = adapter.transformer_for_onnx(model)
    names = list(wrapper.input_names)
    if sorted(example_inputs) != sorted(names):
        raise ValueError(f"example inputs {list(example_inputs)} are not the ONNX inputs {names}")
    args = tuple(example_inputs[n] for n in names)
    if args[0].shape[0] < 2:
        raise ValueError("export with a batch >= 2 example (a batch of 1 can be traced into the graph)")
    prefix = next(n for n, m in wrapper.named_children() if m is model)
    outputs = list(wrapper.output_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".onnx-quant-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings(), _quiet_tracer(), _rms_norm_symbolic(opset), _traceable_unflatten():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in names + outputs},
                do_constant_folding=True,
            )
        proto = onnx.load(str(raw))
    folded = fold_weight_quantizers(proto) if fold_weights else 0
    transposes = fold_dq_transposes(proto) if fold_weights else 0
    name_initializers_after_torch(proto, prefix)
    remove_unused(proto)
    proto = fold_shape_computations(proto)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    save_onnx(proto, path)
    log.info("exported quantized %s in %.1f s: %d weight quantizers folded, %d transposes folded",
             path.name, time.perf_counter() - t0, folded, transposes)
    return path


@contextlib.contextmanager
def _quiet_tracer():
    """Silence the TorchScript tracer's per-branch warnings (logged through ``warnings`` and ``torch.jit``)."""
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger("torch.onnx").setLevel(level)


@contextlib.contextmanager
def _rms_norm_symbolic(opset: int):
    """Teach the TorchScript exporter ``aten::rms_norm`` for the export (it has no symbolic for it up to opset
    20; ``torch.nn.RMSNorm``, e.g. Flux's per-head q/k norms, calls it). ATen's own decomposition: in float32,
    ``x * 1/sqrt(mean(x^2 over the normalized dims) + eps)``, back to the input type, times the weight."""

    def symbolic(g, x, normalized_shape, weight, eps):
        from torch.onnx import symbolic_helper as sh

        dims = sh._get_const(normalized_shape, "is", "normalized_shape")
        axes = list(range(-len(dims), 0))
        scalar = x.type().scalarType() or "Float"
        dtypes = {"Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16, "Double": torch.float64}
        eps_value = torch.finfo(dtypes.get(scalar, torch.float32)).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
        x32 = x if scalar == "Float" else g.op("Cast", x, to_i=1)  # 1 = FLOAT
        square = g.op("Mul", x32, x32)
        if g.opset >= 18:
            mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.long)), keepdims_i=1)
        else:
            mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
        denom = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
        y = g.op("Div", x32, denom)
        if scalar != "Float":
            y = g.op("Cast", y, to_i=_ONNX_TYPE[scalar])
        return y if sh._is_none(weight) else g.op("Mul", y, weight)

    torch.onnx.register_custom_op_symbolic("aten::rms_norm", symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rms_norm", opset)


_ONNX_TYPE = {"Half": 10, "BFloat16": 16, "Double": 11}  # ONNX TensorProto data types


@contextlib.contextmanager
def _traceable_unflatten():
    """``Tensor.unflatten`` as a reshape through ``x.shape`` for the export.

    The TorchScript tracer records the sizes of ``unflatten``'s output as constants, so a later
    ``y.reshape(*y.shape[:-1], -1, 2)`` (diffusers' rotary embedding after Flux's ``query.unflatten(-1, (-1,
    head_dim))``) bakes the example's batch and token count into the graph; a reshape through the traced
    ``x.shape`` keeps them symbolic. Same values, same strides (both are views of a contiguous split).
    """
    original = torch.Tensor.unflatten

    def unflatten(self, dim, sizes):
        dim = dim % self.dim()
        shape = self.shape
        return self.reshape(*shape[:dim], *sizes, *shape[dim + 1 :])

    torch.Tensor.unflatten = unflatten
    try:
        yield
    finally:
        torch.Tensor.unflatten = original


def _attr(node, name: str, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _set_attr_int(node, name: str, value: int) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, int(value)))


def constant_values(model) -> dict[str, np.ndarray]:
    """Values of the small constants of ``model``: embedded initializers and ``Constant`` nodes (scales, zero
    points), by tensor name. Externally stored initializers are skipped."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    out = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            a = next((a for a in node.attribute if a.name == "value"), None)
            if a is not None:
                out[node.output[0]] = numpy_helper.to_array(a.t)
    for t in model.graph.initializer:
        if not uses_external_data(t) and int(np.prod(t.dims)) <= 1 << 16:
            out[t.name] = numpy_helper.to_array(t)
    return out


def fold_weight_quantizers(model) -> int:
    """Replace every ``Q(float constant W) -> DQ`` by ``DQ(quantized constant)`` (in place); returns the count.

    INT8 (``QuantizeLinear``): the constant becomes ``int8`` (or the zero point's type); FP8
    (``TRT_FP8QuantizeLinear``): ``FLOAT8E4M3FN``. The constant keeps W's name; a W used by anything else, or a Q
    not followed by exactly one DQ, is left alone.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consts = constant_values(model)
    consumers: dict[str, list] = defaultdict(list)
    for node in model.graph.node:
        for i in node.input:
            consumers[i].append(node)
    drop = []
    for q in model.graph.node:
        if q.op_type not in _Q_OPS or q.input[0] not in inits or len(consumers[q.input[0]]) != 1:
            continue
        users = consumers[q.output[0]]
        if len(users) != 1 or users[0].op_type not in _DQ_OPS or q.input[1] not in consts:
            continue
        w = numpy_helper.to_array(inits[q.input[0]])
        scale = consts[q.input[1]]
        if q.op_type == "QuantizeLinear":
            zp_name = q.input[2] if len(q.input) > 2 and q.input[2] else None
            if zp_name is not None and zp_name not in consts:
                continue
            data = quantize_int(w, scale, consts[zp_name] if zp_name else None, _attr(q, "axis", 1))
        else:
            data = quantize_fp8(w, scale, _attr(q, "axis", 1))
        inits[q.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(data), q.input[0]))
        users[0].input[0] = q.input[0]
        drop.append(q)
    for q in drop:
        model.graph.node.remove(q)
    return len(drop)


def fold_dq_transposes(model) -> int:
    """``MatMul(X, Transpose(DQ(C)))`` -> ``MatMul(X, DQ(C^T))`` for a 2-D quantized constant ``C`` (in place).

    The weight then reaches its GEMM straight from its DequantizeLinear, K along axis 0, as TensorRT's sparse
    and quantized GEMM tactics expect; a per-channel DQ's axis follows the transpose. Returns the count.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for node in model.graph.node:
        for i in node.input:
            consumers[i].append(node)
    drop = []
    for mm in model.graph.node:
        if mm.op_type != "MatMul" or mm.input[1] not in producers:
            continue
        tr = producers[mm.input[1]]
        if tr.op_type != "Transpose" or tr.input[0] not in producers:
            continue
        dq = producers[tr.input[0]]
        if dq.op_type not in _DQ_OPS or dq.input[0] not in inits:
            continue
        const = inits[dq.input[0]]
        perm = _attr(tr, "perm")
        if len(const.dims) != 2 or (perm is not None and list(perm) != [1, 0]):
            continue
        if len(consumers[tr.output[0]]) != 1 or len(consumers[dq.output[0]]) != 1 or len(consumers[dq.input[0]]) != 1:
            continue
        scale_shape = _shape_of(model, dq.input[1])
        if scale_shape is None:
            continue
        if int(np.prod(scale_shape)) > 1:  # per channel: the axis moves with the transpose
            _set_attr_int(dq, "axis", 1 - (_attr(dq, "axis", 1) % 2))
        c = numpy_helper.to_array(const)
        const.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(c.T), const.name))
        mm.input[1] = dq.output[0]
        drop.append(tr)
    stale = {o for n in drop for o in n.output} | {producers[n.input[0]].output[0] for n in drop}
    keep = [v for v in model.graph.value_info if v.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    for tr in drop:
        model.graph.node.remove(tr)
    return len(drop)


def _shape_of(model, name: str) -> list[int] | None:
    for t in model.graph.initializer:
        if t.name == name:
            return list(t.dims)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            a = next((a for a in node.attribute if a.name == "value"), None)
            return list(a.t.dims) if a is not None else None
    return None


def name_initializers_after_torch(model, prefix: str) -> dict[str, str]:
    """Name the initializers after the torch parameters (in place); returns ``{new: old}``.

    The TorchScript exporter names a parameter after the wrapper's attribute path (``model.proj_out.bias``): the
    wrapper's ``prefix`` is dropped. A GEMM weight it folded into an anonymous constant (``onnx::MatMul_1374``,
    a transposed float weight) is named after its node's scope (``/model/proj_out/MatMul`` -> ``proj_out.weight``).
    """
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    uses: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for i in node.input:
            uses[i] += 1
    renames: dict[str, str] = {}
    for t in model.graph.initializer:
        if t.name.startswith(prefix + ".") and t.name[len(prefix) + 1 :] not in taken:
            renames[t.name] = t.name[len(prefix) + 1 :]
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        old = node.input[1]
        if old in renames or not old.startswith("onnx::") or uses[old] != 1:
            continue
        parts = [p for p in node.name.split("/") if p]
        if len(parts) < 3 or parts[0] != prefix:
            continue
        new = ".".join(parts[1:-1]) + ".weight"
        if new not in taken and new not in renames.values():
            renames[old] = new
    for t in model.graph.initializer:
        if t.name in renames:
            t.name = renames[t.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for v in list(model.graph.input) + list(model.graph.value_info):
        if v.name in renames:
            v.name = renames[v.name]
    return {new: old for old, new in renames.items()}


def fold_shape_computations(model):
    """Constant folding with onnx-graphsurgeon (ONNX Runtime evaluates the foldable subgraphs), Q/DQ excluded,
    then dead-node removal and a topological sort; returns a new model.

    The TorchScript exporter leaves ``Shape -> Gather -> Div -> Slice`` chains (``chunk`` of a static dim) that
    ONNX shape inference cannot follow; folded, every GEMM's shape is inferable (FLOPs in the sparsity report) and
    TensorRT gets a simpler graph. Weights are untouched: a (de)quantize node is never folded, nor what reads it.
    """
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants(fold_shapes=True, partitioning="basic", error_ok=True, should_exclude_node=lambda n: n.op in _Q_OPS + _DQ_OPS)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    return out


def remove_unused(model) -> int:
    """Drop nodes whose outputs nothing reads (not graph outputs) and unused initializers; returns the count."""
    outputs = {o.name for o in model.graph.output}
    removed = 0
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
        removed += len(dead)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    removed += len(model.graph.initializer) - len(keep)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return removed


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------


def int8_parity(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    latent_hw: tuple[int, int],
    text_seq_len: int,
    adapter=None,
    batches: Sequence[int] = (1, 3),
    tolerance: float = INT8_TOLERANCE,
    seed: int = 0,
):
    """The INT8 ONNX at ``path`` in ONNX Runtime vs the fake-quantized ``model`` on random inputs at each batch
    (``export.onnx_export.Parity``; error = max |diff| / max |ref|). FP8 ONNX cannot be run by ONNX Runtime."""
    from export.onnx_export import check_parity
    from families import adapter_for

    adapter = adapter or adapter_for(model)
    wrapper = adapter.transformer_for_onnx(model)

    def make_inputs(b: int) -> dict[str, torch.Tensor]:
        return adapter.transformer_inputs(model, b, latent_hw, text_seq_len, seed=seed + b)

    def reference(inputs: dict[str, torch.Tensor]):
        return [wrapper(*(inputs[n] for n in wrapper.input_names))]

    return check_parity(path, reference, make_inputs, list(wrapper.output_names), batches=batches, tolerance=tolerance,
                        reference_name="torch fake-quantized (ModelOpt)")


def quantized_op_counts(path_or_model) -> dict[str, int]:
    """How many Q/DQ nodes of each kind the ONNX holds (``{"DequantizeLinear": 42, ...}``)."""
    import onnx

    model = onnx.load(str(path_or_model), load_external_data=False) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        if node.op_type in _Q_OPS + _DQ_OPS:
            counts[node.op_type] += 1
    return dict(counts)
