"""Stage 1's integer weights as ONNX Runtime's ``com.microsoft.MatMulNBits``: the packing of given codes
(:func:`pack_codes`, :func:`unpack_codes`; nothing is quantized here) and the graph pass that puts every quantized
layer's ``MatMul`` (or ``Gemm``), with the bias ``Add`` after it, into one ``MatMulNBits`` (:func:`to_matmul_nbits`).

``MatMulNBits`` (ONNX Runtime's contrib op; what ``onnxruntime.quantization.matmul_nbits_quantizer`` writes): ``B``
``(N, k_blocks, block_size * bits / 8)`` uint8, the codes of each output row along K, two 4-bit values a byte, low
nibble first, K padded to whole blocks; ``scales`` ``(N, k_blocks)`` float32 (the graph's type); no zero-point input,
which means the zero point ``2^(bits-1)``: the stored value is ``code + 8``, and ``(value - 8) * scale`` is our
symmetric ``code * scale`` exactly (:mod:`obsdiff.weight_quant`). ``block_size`` is the group size (a power of two,
32..256 here); ``accuracy_level`` 4 makes the CPU kernel quantize the activations to INT8 per block (W4A8), 0 computes
in float32. The optional ``bias`` input takes the linear's bias.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import CheckFailed

log = logging.getLogger(__name__)

DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class PackedLinear:
    """One quantized linear in ``MatMulNBits``' layout: ``packed`` ``(N, k_blocks, block_size * bits / 8)`` uint8,
    ``scales`` ``(N, k_blocks)`` float32, ``k`` input features (before the padding to whole blocks)."""

    packed: np.ndarray
    scales: np.ndarray
    k: int
    bits: int
    block_size: int

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])

    def weight(self) -> np.ndarray:
        """The float32 ``(N, K)`` weight it stands for: ``code * scale`` (exact in float32)."""
        codes = unpack_codes(self.packed, self.k, self.bits).astype(np.float32)
        return codes * np.repeat(self.scales, self.block_size, axis=1)[:, : self.k]


def pack_codes(codes, scales, block_size: int, bits: int = 4) -> PackedLinear:
    """Pack symmetric integer ``codes`` ``(N, K)`` (in ``[-2^(bits-1), 2^(bits-1) - 1]``, torch or numpy) with their
    ``scales`` ``(N, ceil(K / block_size))`` into :class:`PackedLinear`, with ONNX Runtime's own packing routine
    (``HQQWeightOnlyQuantizer.pack_on_row_fast_248bit``, which takes given integers). The padding past K holds the
    zero point (code 0)."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantizer

    codes = torch.as_tensor(codes)
    scales = np.ascontiguousarray(np.asarray(torch.as_tensor(scales, dtype=torch.float32)))
    n, k = codes.shape
    blocks = -(-k // block_size)
    zero = 1 << (bits - 1)
    if scales.shape != (n, blocks):
        raise ValueError(f"scales {scales.shape} do not match codes {(n, k)} at block size {block_size}")
    if int(codes.min()) < -zero or int(codes.max()) >= zero:
        raise ValueError(f"codes outside the {bits}-bit range [{-zero}, {zero - 1}]")
    values = torch.full((n, blocks * block_size), zero, dtype=torch.uint8)  # (N, K padded)
    values[:, :k] = (codes.to(torch.int16) + zero).to(torch.uint8)
    packed = torch.zeros((n, blocks * block_size * bits // 8), dtype=torch.uint8)
    HQQWeightOnlyQuantizer.pack_on_row_fast_248bit(packed, values, bits)  # value 2i -> low nibble of byte i
    return PackedLinear(packed.numpy().reshape(n, blocks, -1), scales, k, bits, block_size)


def unpack_codes(packed: np.ndarray, k: int, bits: int = 4) -> np.ndarray:
    """The int8 codes ``(N, K)`` of a ``MatMulNBits`` weight ``packed`` ``(N, k_blocks, blob)`` (default zero point)."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(packed.shape[0], -1)  # (N, bytes)
    if bits == 4:
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)  # low nibble first
    else:
        values = packed
    return (values[:, :k].astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


# --------------------------------------------------------------------------------------------------------
# The graph pass


def _bias_add(node, consumers: dict[str, list], inits: dict, outputs: set[str], n: int):
    """The ``Add`` that adds a constant bias of ``n`` values to ``node``'s output and is its only reader, with the bias's
    name; ``(None, None)`` when there is none."""
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or node.output[0] in outputs:
        return None, None
    add = users[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    t = inits.get(other)
    if t is None or list(t.dims) != [n] or t.data_type != 1:  # float32 (N,)
        return None, None
    return add, other


def _gemm_weight_layout(node) -> bool | None:
    """Whether a ``Gemm``'s weight is stored ``(N, K)`` (``transB=1``); None for a Gemm this pass cannot replace."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    return bool(attrs.get("transB", 0))


def to_matmul_nbits(path: str | os.PathLike, layers: dict[str, PackedLinear], *, accuracy_level: int = 4) -> dict[str, dict[str, Any]]:
    """Rewrite the float32 ONNX at ``path`` in place: the ``MatMul``/``Gemm`` whose constant weight is named
    ``<layer>.weight`` (:func:`export.graph_passes.name_weights_after_torch`) becomes ``MatMulNBits`` with ``layers[layer]``,
    the ``Add`` of its bias folded in as the op's ``bias`` input. Every ONNX weight is first checked to be exactly the
    packed codes x scales (the mapping from initializers to torch layers and the packing both show there).

    Returns, per layer, what was replaced (ONNX weight, op, K, N, bias, bytes before and after). Raises
    :class:`CheckFailed` when a layer has no such GEMM, or its ONNX weight is not its integer weight. Memory: the graph
    and one weight at a time; weights stored as external data stay on disk (the file is rewritten through a scratch
    data file beside it).
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import uses_external_data

    from export.onnx_files import append_external, save_onnx, tensor_bytes

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    streaming = any(uses_external_data(t) for t in graph.initializer)
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(i for node in graph.node for i in node.input)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    outputs = {o.name for o in graph.output}
    done: dict[str, dict[str, Any]] = {}
    replaced: dict[str, Any] = {}  # an old node's first output -> its new node (None: removed)
    new_inits = []
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.nbits.", dir=path.parent)) if streaming else None
    try:
        for node in graph.node:
            weight = node.input[1] if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else ""
            layer = weight[: -len(".weight")] if weight.endswith(".weight") else None
            if layer not in layers or weight not in inits or uses[weight] != 1 or layer in done:
                continue
            q = layers[layer]
            t = inits[weight]
            transposed = _gemm_weight_layout(node) if node.op_type == "Gemm" else False
            if transposed is None:
                raise CheckFailed(f"{layer}: its Gemm scales or transposes its input (alpha/beta/transA); MatMulNBits cannot replace it")
            w = numpy_helper.to_array(t, base_dir=str(path.parent))  # (K, N), or (N, K) for transB
            w = w if transposed else w.T  # (N, K)
            if w.shape != (q.n, q.k) or not np.array_equal(w, q.weight()):
                raise CheckFailed(f"{layer}: the ONNX weight {weight} {tuple(w.shape)} is not the layer's integer weights (codes x scales, "
                                  f"{(q.n, q.k)}); the export and the compact checkpoint disagree")
            del w
            if node.op_type == "Gemm":
                add, bias = None, (node.input[2] if len(node.input) > 2 and node.input[2] else None)
            else:
                add, bias = _bias_add(node, consumers, inits, outputs, q.n)
            packed = numpy_helper.from_array(q.packed, f"{layer}.weight_Q{q.bits}")
            scales = numpy_helper.from_array(q.scales, f"{layer}.weight_scales")
            for tensor, data in ((packed, q.packed), (scales, q.scales)):
                if scratch is not None:
                    append_external(tensor, data, scratch, "nbits.data")
                new_inits.append(tensor)
            new = helper.make_node("MatMulNBits", [node.input[0], packed.name, scales.name] + (["", "", bias] if bias else []),
                                   [add.output[0] if add is not None else node.output[0]], name=f"{node.name or layer}_Q{q.bits}",
                                   domain=DOMAIN, K=q.k, N=q.n, bits=q.bits, block_size=q.block_size, accuracy_level=accuracy_level)
            replaced[node.output[0]] = new
            if add is not None:
                replaced[add.output[0]] = None
            graph.initializer.remove(t)
            done[layer] = {"onnx_weight": weight, "replaced": node.op_type + ("+Add" if add is not None else ""), "k": q.k, "n": q.n,
                           "bias": bias is not None, "float_bytes": tensor_bytes(t), "packed_bytes": int(q.packed.nbytes + q.scales.nbytes)}
        missing = sorted(set(layers) - set(done))
        if missing:
            raise CheckFailed(f"{len(missing)} quantized layer(s) have no MatMul/Gemm with a constant weight named after them in {path.name} "
                              f"(e.g. {missing[0]}); MatMulNBits cannot replace them")
        nodes = [replaced.get(n.output[0], n) if n.output else n for n in graph.node]
        graph.ClearField("node")
        graph.node.extend(n for n in nodes if n is not None)
        graph.initializer.extend(new_inits)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        if scratch is not None:  # every external tensor, the new ones included, read from one directory
            _point_into(graph, path.parent, scratch)
        save_onnx(model, path, base_dir=scratch)
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    log.info("%s: %d linear layers as MatMulNBits (%d-bit, block %d, accuracy_level %d)", path.name, len(done), next(iter(layers.values())).bits if layers else 0,
             next(iter(layers.values())).block_size if layers else 0, accuracy_level)
    return done


def _point_into(graph, base: Path, scratch: Path) -> None:
    """Make every external tensor of ``graph`` stored under ``base`` readable from ``scratch`` too (a hard link, or a
    symbolic one across file systems), so that :func:`export.onnx_files.save_onnx` streams them all from there."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for location in {ExternalDataInfo(t).location for t in graph.initializer if uses_external_data(t)}:
        if (scratch / location).exists():
            continue
        try:
            os.link(base / location, scratch / location)
        except OSError:
            os.symlink((base / location).resolve(), scratch / location)
