"""Fake quantization of the transformer with NVIDIA ModelOpt (INT8 / FP8 on top of sparsity): the
``mtq.quantize`` config (ModelOpt's stock numerics on the weights and inputs of Linear/Conv layers, the
family's ``quant_exclude`` kept in high precision), max calibration on recorded transformer inputs, and the
check that every pruned zero (and an N:M pattern) survives quantization. Why these choices:
``docs/quantization.md``."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import time
import warnings
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from common.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp8")


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


def quantize_transformer(model: nn.Module, precision: str, calib_inputs: Sequence[dict[str, torch.Tensor]], *, adapter=None) -> nn.Module:
    """Fake-quantize ``model`` in place with ModelOpt (``"int8"`` or ``"fp8"``) and calibrate it on ``calib_inputs``.

    calib_inputs: transformer inputs by ONNX input name (:func:`export.calibration.record_calibration_inputs`, or the adapter's
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
