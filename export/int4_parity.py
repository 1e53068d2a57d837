"""INT4 parity: the ``MatMulNBits`` transformer ONNX in ONNX Runtime against the compact torch model, whose quantized
weights are exactly ``codes x scales`` (the same numbers the ONNX packs).

Two checks on the export's parity inputs (random inputs at each ``--parity-batches`` batch, as for a float export):

- ``accuracy_level`` 0 (float32 compute, a copy of the graph with the attribute changed, :func:`accuracy_level_copy`)
  against the float32 torch model: the same weights in float32 arithmetic, summed in another order, so the float
  export's bound holds (:data:`LEVEL0_TOLERANCE`). It checks how the kernel reads the packed weights: one layer of a
  tiny test model packed in the other nibble order moves the output by 2e-2. (One code one step off in one weight
  moves it by less than float rounding, 7e-6 there: the graph pass compares every ONNX weight with its codes x scales
  exactly before packing, :func:`export.matmul_nbits.to_matmul_nbits`.)
- ``accuracy_level`` 4 (what the export ships: W4A8) against the torch model with the same INT8 activations
  (:func:`int8_activations`: ONNX Runtime's CPU kernel rounds each activation row to INT8 per block of ``block_size``
  along K, scale ``amax / 127``, ``round(x * (127 / amax))`` half to even; one such GEMM matches it to 1e-6). Whole
  models do not agree element by element: an activation within an ulp of a rounding boundary lands one INT8 step
  apart, and the blocks after it amplify that (two torch W4A8 runs whose inputs differ by 1e-7 are 0.3..0.8 of the
  INT8 activations' own effect apart on tiny-sd3). What the two share is the size of that effect: the bound is on
  ``RMS(ORT - torch W4A32) / RMS(torch W4A8 - torch W4A32)``, median over the cases, within
  :data:`A8_EFFECT_RANGE` (1 when ONNX Runtime rounds as torch does; 0 for a graph that leaves its activations in
  float32; well above 1 for a saturating or mis-scaled integer kernel). The distance to the torch W4A8 model is
  reported beside. Why the bounds, and what they measured: ``docs/low-precision.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from export.parity import FP32_TOLERANCE, ort_session, rel_error

log = logging.getLogger(__name__)

# accuracy_level 0 vs the float32 torch model with the same weights (max |diff| / max |ref|): float32 sums of the same
# products in another order, as the float32 export's check (export.parity.FP32_TOLERANCE); MatMulNBits dequantizes a
# block and multiplies in float32. Measured: see docs/low-precision.md.
LEVEL0_TOLERANCE = FP32_TOLERANCE
# accuracy_level 4: the range of the median over cases of RMS(ORT - torch W4A32) / RMS(torch W4A8 - torch W4A32), the
# size of W4A8's error in ONNX Runtime relative to torch's W4A8 model (both round the same activations the same way,
# up to ties). Measured 0.97..1.10 on tiny-sd3 (12 cases); a graph without INT8 activations gives 0.
A8_EFFECT_RANGE = (0.5, 1.5)
A8_QMAX = 127.0


def quantize_activations(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` (..., K) rounded as ONNX Runtime's CPU ``MatMulNBits`` rounds its input at ``accuracy_level`` 4: per row and
    block of ``block_size`` values along K, ``q = round_half_even(x * (127 / amax))`` clamped to [-127, 127], back as
    ``q * (amax / 127)`` (float32)."""
    k = x.shape[-1]
    blocks = -(-k // block_size)
    xf = x.to(torch.float32)
    padded = torch.nn.functional.pad(xf, (0, blocks * block_size - k)).reshape(*x.shape[:-1], blocks, block_size)  # (..., blocks, block)
    amax = padded.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, A8_QMAX / amax, torch.zeros_like(amax))
    q = torch.clamp(torch.round(padded * inverse), -A8_QMAX, A8_QMAX)
    return (q * (amax / A8_QMAX)).reshape(*x.shape[:-1], -1)[..., :k].to(x.dtype)


@contextlib.contextmanager
def int8_activations(layers: dict[str, nn.Linear], block_size: int) -> Iterator[None]:
    """While the block runs, each of ``layers`` sees its input rounded by :func:`quantize_activations` (the W4A8 model
    ONNX Runtime computes at ``accuracy_level`` 4)."""
    handles = [layer.register_forward_pre_hook(lambda _m, args: (quantize_activations(args[0], block_size), *args[1:]))
               for layer in layers.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def accuracy_level_copy(path: str | os.PathLike, level: int) -> Iterator[Path]:
    """A copy of the ONNX at ``path`` beside it whose ``MatMulNBits`` nodes have ``accuracy_level`` ``level`` (its
    external data, if any, is the original's file: only the graph is copied); removed when the block ends."""
    import onnx
    from onnx import helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            keep = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(keep + [helper.make_attribute("accuracy_level", int(level))])
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.level{level}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(model, name)
        del model
        yield Path(name)
    finally:
        os.unlink(name)


def _rms(a: np.ndarray, ref: np.ndarray) -> float:
    """RMS(a - ref) / RMS(ref)."""
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    return float(np.sqrt(((a - ref) ** 2).mean() / max((ref**2).mean(), 1e-30)))


def _run(path: Path, feeds: dict[str, dict[str, np.ndarray]], output: str) -> dict[str, np.ndarray]:
    sess = ort_session(path, lean=True)
    try:
        return {label: sess.run([output], f)[0] for label, f in feeds.items()}
    finally:
        del sess


def int4_parity(path: Path, feeds: dict[str, dict[str, np.ndarray]], output: str, ref_fp32: dict[str, np.ndarray],
                ref_a8: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run the ``MatMulNBits`` ONNX at ``path`` at ``accuracy_level`` 4 (as exported) and 0 (a copy) on ``feeds``
    (case label -> ONNX inputs) and compare ``output`` with the torch model's (``ref_fp32``: float32 activations;
    ``ref_a8``: :func:`int8_activations`). Returns the report entry; ``ok`` False with ``why`` when a bound is broken."""
    level4 = _run(path, feeds, output)
    with accuracy_level_copy(path, 0) as copy:
        level0 = _run(copy, feeds, output)
    per_case: dict[str, dict[str, float]] = {}
    for label in feeds:
        a8_own = _rms(ref_a8[label], ref_fp32[label])  # what INT8 activations do to the torch model's output
        per_case[label] = {"level0_max_rel_error": rel_error(level0[label], ref_fp32[label]),
                           "level4_rms_vs_torch_w4a32": _rms(level4[label], ref_fp32[label]), "torch_a8_rms": a8_own,
                           "level4_effect_ratio": _rms(level4[label], ref_fp32[label]) / max(a8_own, 1e-30),
                           "level4_distance_to_torch_w4a8": _rms(level4[label], ref_a8[label]) / max(a8_own, 1e-30)}
    level0_worst = max(c["level0_max_rel_error"] for c in per_case.values())
    effect = float(np.median([c["level4_effect_ratio"] for c in per_case.values()]))
    low, high = A8_EFFECT_RANGE
    why = []
    if not level0_worst <= LEVEL0_TOLERANCE:
        why.append(f"accuracy_level 0 (float32 compute) differs from the torch model with the same weights by {level0_worst:.2e} "
                   f"(max |diff| / max |ref|; tolerance {LEVEL0_TOLERANCE:.0e})")
    if not low <= effect <= high:
        why.append(f"at accuracy_level 4 (INT8 activations) the output moves {effect:.2f}x as far from the float-activation model as the torch "
                   f"W4A8 model does (median over {len(per_case)} cases; expected {low}..{high})")
    return {"reference": "torch compact model (weights exactly codes x scales): float32 activations (W4A32), and INT8 activations per "
                         "block as ONNX Runtime rounds them (W4A8)",
            "inputs": f"random transformer inputs ({len(per_case)} cases: {', '.join(per_case)})",
            "level0_tolerance": LEVEL0_TOLERANCE, "level0_max_rel_error": level0_worst,
            "level4_effect_range": list(A8_EFFECT_RANGE), "level4_median_effect_ratio": effect,
            "level4_median_distance_to_torch_w4a8": float(np.median([c["level4_distance_to_torch_w4a8"] for c in per_case.values()])),
            "w4a8_vs_w4a32_rms": float(np.median([c["level4_rms_vs_torch_w4a32"] for c in per_case.values()])),
            "ok": not why, "why": "; ".join(why), "per_case": per_case}
