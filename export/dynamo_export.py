"""Float export of one torch module to ONNX with torch.onnx's dynamo exporter (:func:`export_module`), and of
one pipeline component with the torch side of its parity check (:func:`export_component`).

Every component goes through :func:`export_module`: the dynamo exporter at opset 18 with a batch-2 example
and a dynamic ``batch`` dimension, weights named after the torch parameters, graph clean-up, float32 layer
norms in float16 graphs, the IR version capped, and an atomic save with external data past 2 GB. Why each
step is there: ``docs/export.md``.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from common.dtypes import PRECISION_DTYPES, precision_dtype
from common.memory import log_memory, release_to_os
from export.graph_passes import cleanup, fold_weight_transposes, layernorm_to_fp32, name_weights_after_torch
from export.onnx_files import EXTERNAL_DATA_THRESHOLD, MAX_IR_VERSION, human_bytes, initializer_bytes, io_spec, load_small_external, onnx_size, save_onnx
from export.parity import ParityReference, fp32_compute, parity_tolerance

log = logging.getLogger(__name__)

OPSET = 18
PRECISIONS = tuple(PRECISION_DTYPES)  # ("fp32", "fp16")


def export_module(
    wrapper: nn.Module,
    example: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    opset: int = OPSET,
    fp32_layernorm: bool = False,
    max_batch: int = 64,
    dynamic_shapes: Callable[[Any], dict[str, dict[int, Any]]] | None = None,
) -> Path:
    """Export ``wrapper`` (one of the ``*ForOnnx`` classes) to ``path`` with a dynamic ``batch`` dimension.

    example: inputs by name, batch 2 (a batch-1 example would be specialised by ``torch.export``).
    fp32_layernorm: run every float16 ``LayerNormalization`` in float32 (fp16 exports for TensorRT).
    max_batch: upper bound of the symbolic batch dimension (a guard for ``torch.export``, not a profile).
    dynamic_shapes: given the batch ``Dim``, the dynamic axes of every input (default: the batch on axis 0
        of every input); e.g. the family adapter's spatial axes for a multi-resolution export.
    """
    import onnx

    if opset < 18:
        raise ValueError("opset must be >= 18 (dynamo exporter)")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):  # per-pass INFO chatter
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
    names = list(wrapper.input_names)
    assert list(example) == names, (list(example), names)
    batch = next(iter(example.values())).shape[0]
    if batch < 2:
        raise ValueError("export with a batch >= 2 example: torch.export specialises a size-1 batch")
    path = Path(path)
    dim = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic_shapes = dynamic_shapes(dim) if dynamic_shapes is not None else {n: {0: dim} for n in names}
    wrapper = wrapper.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            tuple(example.values()),
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=list(wrapper.output_names),
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=path.parent if path.parent.exists() else None) as tmp:
        raw = Path(tmp) / "raw.onnx"
        program.save(str(raw), external_data=True)
        del program
        _forget_onnxscript_matches()
        log_memory(f"{path.name}: torch.onnx export saved")
        # The graph is processed with its weights left in the external data file (memory stays at the size of
        # the graph, not of the weights); small models are loaded whole so graphsurgeon can fold constants.
        model = onnx.load(str(raw), load_external_data=False)
        base_dir = Path(tmp)
        if initializer_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.load_external_data_for_model(model, tmp)
            base_dir = None
        else:
            load_small_external(model, tmp)
        fold_weight_transposes(model, base_dir=base_dir)
        name_weights_after_torch(model)
        model = cleanup(model)
        if fp32_layernorm:
            model = layernorm_to_fp32(model)
            model = cleanup(model)
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        save_onnx(model, path, base_dir=base_dir)
        del model
    log.info("exported %s in %.1f s (%s)", path.name, time.perf_counter() - t0, human_bytes(onnx_size(path)))
    log_memory(f"{path.name}: saved")
    return path


def _forget_onnxscript_matches() -> int:
    """Drop the graph that onnxscript's rewrite-rule matchers keep from their last match (onnxscript 0.7).

    The matchers are module-level singletons that store the graph, node and bindings of the last match
    (``SimplePatternMatcher._graph``, ``_match``...): after torch.onnx's optimizer ran, that keeps the whole
    exported graph alive, with its initializers (the module's weights and the transposed copies the optimizer
    folded). For an SD3-medium transformer that is ~2.4 GiB held until the next export. Returns the count.
    """
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing to do
        return 0
    n = 0
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_match", "_current_node", "_tracer"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)
            n += 1
    gc.collect()
    return n


def release_weights(module: nn.Module) -> None:
    """Free the memory of ``module``'s parameters and buffers now (they become empty tensors).

    Deleting an exported module is not enough: onnxscript's rewrite rules keep the last graph they matched,
    whose initializers still reference the module's tensors, so a 2B-parameter transformer would stay in
    memory through the ONNX Runtime parity check. Only for modules the caller has given up.
    """
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def export_component(
    name: str,
    wrapper: nn.Module,
    make_inputs: Callable[[int, torch.dtype], dict[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    precision: str = "fp32",
    parity_batches: Sequence[int] = (1, 3),
    keep_fp32: bool = False,
    in_place: bool = False,
    dynamic_shapes: Callable[[Any], dict[str, dict[int, Any]]] | None = None,
    parity_shapes: Sequence[tuple[int, int]] = (),
    parity_cases: dict[str, tuple[int, tuple[int, int] | None]] | None = None,
) -> tuple[dict[str, Any], ParityReference | None]:
    """Export one component; returns its summary and the torch side of the parity check (run it with
    :meth:`ParityReference.check` once the torch module is no longer needed, to bound memory).

    make_inputs(batch, dtype): inputs by ONNX input name; float tensors in ``dtype`` except the transformer's
        ``timestep`` (always float32).
    precision: ``fp32`` | ``fp16``; keep_fp32 exports this component in float32 even for ``fp16``.
    in_place: convert ``wrapper`` to the export dtype in place instead of exporting a converted copy (the
        caller gives the module up; at scale a copy would double the memory).
    parity_batches: batch sizes to compare at (empty: no parity check); tolerance :func:`parity_tolerance`.
        The reference is the torch module in float32 arithmetic (:func:`fp32_compute` for half weights).
    dynamic_shapes: the dynamic axes (see :func:`export_module`); default the batch only.
    parity_shapes: further latent shapes ``(h, w)`` to compare at, at batch 1 (a multi-resolution export);
        ``make_inputs`` then takes them as a third argument.
    parity_cases: the cases to compare at, ``label -> (batch, latent (h, w) or None for the example's)``,
        instead of ``parity_batches`` and ``parity_shapes`` (see :func:`export.parity.plan_parity_shapes`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    eff = "fp32" if keep_fp32 else precision
    dtype = precision_dtype(eff)
    current = next(wrapper.parameters()).dtype
    exported = wrapper if current == dtype or in_place else copy.deepcopy(wrapper)
    exported.to(dtype)
    ref = None
    if parity_cases is None:
        parity_cases = {str(b): (b, None) for b in parity_batches} | {f"1@{h}x{w}": (1, (h, w)) for h, w in parity_shapes}
    if parity_cases:
        feeds: dict[str, dict[str, np.ndarray]] = {}
        outputs: dict[str, list[np.ndarray]] = {}
        cases = [(label, (b,) if hw is None else (b, tuple(hw))) for label, (b, hw) in parity_cases.items()]
        # ``wrapper`` is the reference: the float32 original when a converted copy is exported, or, converted
        # in place, its own half weights in float32 arithmetic (the same weights the ONNX holds).
        with torch.no_grad(), fp32_compute(wrapper) as m:
            for case, args in cases:
                inputs = make_inputs(args[0], dtype, *args[1:])
                out = m(*[v.float() if v.is_floating_point() else v for v in inputs.values()])
                outputs[case] = [o.detach().float().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
                feeds[case] = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        ref_name = "torch fp32" if (eff == "fp32" or exported is not wrapper) else f"torch {eff} weights, fp32 arithmetic"
        ref = ParityReference(Path(path), list(wrapper.output_names), feeds, outputs, parity_tolerance(eff), ref_name)
        release_to_os()  # its activations' pages go back before the export
        log_memory(f"{Path(path).name}: torch parity reference computed")  # this peak is the reference's, not the export's
    t0 = time.perf_counter()
    export_module(exported, make_inputs(2, dtype), path, fp32_layernorm=(eff == "fp16"), dynamic_shapes=dynamic_shapes)
    seconds = time.perf_counter() - t0
    if in_place or exported is not wrapper:
        release_weights(exported)
    del exported
    summary: dict[str, Any] = {"file": Path(path).name, "bytes": onnx_size(path), "precision": eff, "export_s": round(seconds, 1)}
    summary["inputs"], summary["outputs"] = io_spec(path)
    return summary, ref
