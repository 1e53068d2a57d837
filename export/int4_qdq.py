"""Stage 1's 4-bit weights for TensorRT: blocked INT4 ``DequantizeLinear`` in a float16 transformer graph (W4A16).

TensorRT 10/11 and TensorRT-RTX build strongly typed networks, so the precision is what the ONNX says. INT4 is
weight-only there: a constant INT4 tensor, its float16 scales and a ``DequantizeLinear`` in front of the GEMM,
whose activations stay float16. :func:`int4_dq_onnx` rewrites the float16 transformer ONNX of a ``--weight-bits
4`` prune in place (the export's ``--precision w4a16``): every quantized linear whose ``MatMul`` reads the constant
``<layer>.weight`` ``(K, N)`` reads instead

    DequantizeLinear(<layer>.weight  INT4 (K, N), <layer>.weight_scale  float16 (K / g, N), axis=0, block_size=g)

with the codes and scales of ``compact/weights_int.safetensors`` (:mod:`export.int_weights`): what stage 1 solved,
never re-quantized, checked against the float16 weight they replace (which must be exactly ``float16(codes x
scales)``). Symmetric, so there is no zero point (TensorRT's parser refuses a non-zero one). The graph's opset
becomes 21 (INT4 and ``block_size`` are opset 21), IR version 10. TensorRT's parser takes the block size from the
shapes (K / scale rows) and refuses a K that is not whole blocks, so a group with a shorter last block (a
structured cut's K) cannot be written as it is: where ``gcd(K, g)`` is at least :data:`MIN_BLOCK` the layer gets
blocks of that size with each group's scale repeated (the same weights), else it keeps its float16 weight
(:func:`tensorrt_block`; the report lists it with the reason).

No runtime here has a kernel for 2:4 and 4-bit at once: a 2:4 + 4-bit prune stores both and runs dense 4-bit.
The layout, the accepted block sizes and what TensorRT-RTX's builder makes of it: ``docs/tensorrt.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import CheckFailed, UserError
from export.int_weights import INT_FILE

log = logging.getLogger(__name__)

W4A16_OPSET = 21  # INT4 tensors and DequantizeLinear's block_size
MIN_BLOCK = 32  # smaller blocks of repeated scales would cost more than half a bit a weight in float16 scales


@dataclass(frozen=True)
class IntWeights:
    """The integer weights a compact checkpoint holds (``weights_int.safetensors``), read one layer at a time."""

    path: Path
    bits: int
    group_size: int
    layers: tuple[str, ...]

    def get(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(codes int8 (N, K), scales float16 (N, groups))`` of layer ``name``."""
        from safetensors import safe_open

        with safe_open(str(self.path), "np") as f:
            return f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scales").astype(np.float16)


def read_int_weights(directory: str | os.PathLike) -> IntWeights:
    """The integer weights of the compact checkpoint in ``directory`` (``compact/``); one line if it has none."""
    from safetensors import SafetensorError, safe_open

    from obsdiff.weight_quant import WeightQuant

    file = Path(directory) / INT_FILE
    if not file.is_file():
        raise UserError(f"missing {file}: a w4a16 export needs a `prune --weight-bits 4` (e.g. `python -m pipeline prune --sparsity dense "
                        "--weight-bits 4`) passed as --pruned")
    try:
        with safe_open(str(file), "np") as f:
            grid = WeightQuant.from_json(json.loads((f.metadata() or {}).get("weight_quant", "null")))
            layers = tuple(sorted({k.rsplit(".", 1)[0] for k in f.keys()}))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file} is not a readable integer-weights file ({str(e).splitlines()[0]}); re-run `python -m pipeline export`") from None
    if grid is None:
        raise UserError(f"{file} does not say its integer grid; re-run `python -m pipeline export`")
    return IntWeights(file, grid.bits, grid.group_size, layers)


def tensorrt_block(k: int, group_size: int) -> tuple[int | None, str | None]:
    """``(block, None)``: the block size a ``K``-column weight quantized in groups of ``group_size`` gets in TensorRT
    (the group, or ``gcd(K, group)`` with the scales repeated), or ``(None, why not)``.

    TensorRT's ONNX parser takes the block size from the shapes (``K / scale rows``) and refuses a K that is not
    whole blocks (TensorRT-RTX 1.7: "The quantization axis must divide into whole blocks"), so a shorter last group
    is written as blocks of ``gcd(K, group)``: exactly the same weights."""
    block = math.gcd(k, group_size)
    if block == group_size or block >= MIN_BLOCK:
        return block, None
    return None, (f"K={k} is not a multiple of the group size {group_size} and gcd {block} < {MIN_BLOCK}: TensorRT takes the block size "
                  "from the shapes (K / scale rows) and needs whole blocks")


def int4_dq_tensors(name: str, codes: np.ndarray, scales: np.ndarray, group_size: int):
    """The two initializers of one layer's ``DequantizeLinear``: ``name`` INT4 ``(K, N)`` (the transposed codes,
    the MatMul's layout, two codes a byte, low nibble first) and ``name + "_scale"`` float16 ``(K / g, N)``.

    codes: int8 ``(N, K)`` in ``[-8, 7]``; scales: ``(N, K / g)``, exactly representable in float16."""
    import ml_dtypes
    from onnx import numpy_helper

    if codes.min(initial=0) < -8 or codes.max(initial=0) > 7:
        raise ValueError(f"{name}: codes outside [-8, 7] are not 4-bit")
    s16 = np.asarray(scales).astype(np.float16)
    if not np.array_equal(s16.astype(np.float32), np.asarray(scales, dtype=np.float32)) or not (s16 > 0).all():
        raise ValueError(f"{name}: the scales must be positive float16 values")
    w = numpy_helper.from_array(np.ascontiguousarray(codes.T).astype(ml_dtypes.int4), name)  # (K, N)
    s = numpy_helper.from_array(np.ascontiguousarray(s16.T), f"{name}_scale")  # (K / g, N)
    return w, s


def int4_codes(model, layer: str, base_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read back ``(codes int8 (N, K), scales float16 (N, groups))`` of ``layer`` from a W4A16 graph."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    d = str(base_dir) if base_dir is not None else ""
    w = numpy_helper.to_array(inits[f"{layer}.weight"], base_dir=d)
    s = numpy_helper.to_array(inits[f"{layer}.weight_scale"], base_dir=d)
    return np.ascontiguousarray(w.astype(np.int8).T), np.ascontiguousarray(s.T)


@dataclass
class W4A16Report:
    """What :func:`int4_dq_onnx` replaced: the INT4 layers, the ones kept float16 (and why), the weight bytes."""

    group_size: int
    int4_layers: list[str] = field(default_factory=list)
    fp16_layers: dict[str, str] = field(default_factory=dict)
    smaller_blocks: dict[str, int] = field(default_factory=dict)  # layers written in blocks of gcd(K, g) (repeated scales)
    int4_bytes: int = 0  # packed codes + float16 scales of the INT4 layers
    replaced_fp16_bytes: int = 0  # the float16 weights they replace

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "INT4 weight-only for TensorRT: DequantizeLinear(INT4 (K, N), float16 scales (K/g, N), axis 0, block_size g) -> MatMul, "
                      "float16 activations",
            "opset": W4A16_OPSET,
            "group_size": self.group_size,
            "int4_layers": len(self.int4_layers),
            "fp16_quantized_layers": self.fp16_layers,
            "smaller_blocks": self.smaller_blocks,
            "int4_weight_bytes": self.int4_bytes,
            "replaced_fp16_bytes": self.replaced_fp16_bytes,
        }


def _gemm_of(weight: str, consumers, inits) -> tuple[Any | None, str | None]:
    """The MatMul reading constant ``weight`` ``(K, N)`` as its B, or ``(None, why not)``."""
    if weight not in inits:
        return None, f"the ONNX has no constant {weight}"
    users = consumers.get(weight, [])
    if len(users) != 1 or users[0].op_type != "MatMul" or list(users[0].input).index(weight) != 1 or len(inits[weight].dims) != 2:
        ops = ", ".join(f"{u.op_type} input {list(u.input).index(weight)}" for u in users) or "nothing"
        return None, f"{weight} is read by {ops}, not as the B of one MatMul"
    return users[0], None


def to_int4_dq(model, weights: IntWeights, base_dir: str | os.PathLike | None = None, extra_data: Path | None = None) -> W4A16Report:
    """Rewrite ``model`` (an opset-21 float16 graph) in place: see the module docstring.

    base_dir: where the model's external data lives (its float16 weights are read from there one at a time);
    extra_data: the file the new INT4 tensors are appended to (external), or None to embed them.
    """
    import onnx
    from onnx import helper, numpy_helper

    from export.onnx_files import append_external, tensor_bytes

    if weights.bits != 4:
        raise UserError(f"the prune's weights are {weights.bits}-bit; a w4a16 export needs `prune --weight-bits 4`")
    g = weights.group_size
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    report = W4A16Report(group_size=g)
    d = str(base_dir) if base_dir is not None else ""
    new_nodes, replaced = [], set()
    for layer in weights.layers:
        name = f"{layer}.weight"
        mm, why = _gemm_of(name, consumers, inits)
        codes, scales = weights.get(layer)  # (N, K), (N, G)
        n, k = codes.shape
        if mm is not None and list(inits[name].dims) != [k, n]:
            why = f"{name} is {list(inits[name].dims)} in the ONNX, the codes are (N={n}, K={k})"
        block, problem = tensorrt_block(k, g)
        why = why or problem
        if why is not None:
            if mm is None and name not in inits:
                raise CheckFailed(f"{layer}: {why}; the ONNX does not hold the quantized layers of compact/ (export again with --force)")
            report.fp16_layers[layer] = why
            continue
        w16 = numpy_helper.to_array(inits[name], base_dir=d)  # (K, N)
        if w16.dtype != np.float16:
            raise UserError(f"{name} is {w16.dtype} in the ONNX: the INT4 DequantizeLinear pass runs on a float16 export")
        expected = (codes.astype(np.float32) * np.repeat(scales.astype(np.float32), g, axis=1)[:, :k]).T.astype(np.float16)
        if not np.array_equal(w16, expected):
            bad = int((w16 != expected).sum())
            raise CheckFailed(f"{name}: {bad} of {w16.size} float16 weights in the ONNX are not float16(codes x scales) of {weights.path}; "
                              "export again with --force")
        del w16, expected
        if block != g:  # each group's scale over its g / block blocks (the short last group: fewer)
            scales = np.repeat(scales, g // block, axis=1)[:, : k // block]
            report.smaller_blocks[layer] = block
        w, s = int4_dq_tensors(name, codes, scales, block)
        report.replaced_fp16_bytes += tensor_bytes(inits[name])
        report.int4_bytes += len(w.raw_data) + len(s.raw_data)
        if extra_data is not None:  # the big models: the packed codes go to a data file, not into the protobuf
            packed = np.frombuffer(w.raw_data, dtype=np.uint8)
            append_external(w, packed, extra_data.parent, extra_data.name)
        inits[name].CopyFrom(w)
        model.graph.initializer.append(s)
        dq_out = f"{name}_dequantized"
        new_nodes.append((mm, helper.make_node("DequantizeLinear", [name, s.name], [dq_out], name=f"{layer}/weight_dq", axis=0, block_size=block)))
        mm.input[1] = dq_out
        replaced.add(name)
        report.int4_layers.append(layer)
    # each DequantizeLinear right before its MatMul (the graph stays topologically sorted); copies, as the old list goes
    before = {mm.output[0]: dq for mm, dq in new_nodes}
    nodes = []
    for node in model.graph.node:
        if node.output and node.output[0] in before:
            nodes.append(before[node.output[0]])
        nodes.append(onnx.NodeProto())
        nodes[-1].CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    stale = [v for v in model.graph.value_info if v.name in replaced]  # the float16 weights' old type
    for v in stale:
        model.graph.value_info.remove(v)
    return report


def int4_dq_onnx(path: str | os.PathLike, int_dir: str | os.PathLike) -> dict[str, Any]:
    """Turn the float16 transformer ONNX at ``path`` into its W4A16 graph in place (atomically, with its data file),
    from the integer weights in ``int_dir`` (``compact/``). Returns the report's ``w4a16`` section (with the
    ONNX's new ``bytes``)."""
    import onnx

    from export.onnx_files import EXTERNAL_DATA_THRESHOLD, MAX_IR_VERSION, initializer_bytes, load_small_external, onnx_size, save_onnx

    path = Path(path)
    weights = read_int_weights(int_dir)
    model = onnx.load(str(path), load_external_data=False)
    external = initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    if external:
        load_small_external(model, path.parent)
    else:
        onnx.load_external_data_for_model(model, str(path.parent))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < W4A16_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, W4A16_OPSET)
        except Exception as e:  # the converter raises RuntimeError/ValueError subclasses of its own
            raise CheckFailed(f"{path.name}: ONNX's version converter cannot take the graph from opset {opset} to {W4A16_OPSET} "
                              f"({str(e).splitlines()[0]})") from None
    model.ir_version = MAX_IR_VERSION
    extra = path.parent / f".{path.name}.int4.data" if external else None
    try:
        report = to_int4_dq(model, weights, base_dir=path.parent, extra_data=extra)
        save_onnx(model, path, base_dir=path.parent if external else None)
    finally:
        if extra is not None:
            extra.unlink(missing_ok=True)
    out = report.to_json()
    out["bytes"] = onnx_size(path)
    log.info("%s: %d quantized layers as INT4 DequantizeLinear (block %d), %d kept float16; %.1f MiB of INT4 weights for %.1f MiB of float16",
             path.name, len(report.int4_layers), weights.group_size, len(report.fp16_layers), report.int4_bytes / 2**20, report.replaced_fp16_bytes / 2**20)
    for layer, why in report.fp16_layers.items():
        log.info("%s stays float16: %s", layer, why)
    return out


def export_w4a16_transformer(spec, plan, holder: list, batches, settings, out: Path, path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """``export --precision w4a16``: the float16 export of the compact transformer (:func:`export.float_export.
    export_float_transformer`: surgery, ``compact/`` with its integer weights, the ONNX and its checks), with
    :func:`int4_dq_onnx` run on the written graph before the checks, then the ONNX Runtime parity check against the
    torch model's float16 weights, which are exactly what each ``DequantizeLinear`` returns (``float16(codes x
    scales)``): the float16 export's tolerance holds. ``holder[0]`` is the pruned transformer in float32 with its
    integer weights attached (:func:`export.int_weights.attach`; :func:`export.int4_export.check_int4_export` has
    checked the plan). Adds the report's ``quantization`` entry."""
    from dataclasses import replace

    from export.float_export import export_float_transformer
    from export.int4_export import NM_NOTE
    from obsdiff.patterns import parse_sparsity

    wq = plan.weight_quant
    section: dict[str, Any] = {}

    def graph_pass(p: Path) -> dict[str, Any]:
        section.update(int4_dq_onnx(p, out / "compact"))
        return {"bytes": section["bytes"], "precision": "w4a16", "w4a16": section}

    res = export_float_transformer(spec, plan, holder, batches, replace(settings, precision="fp16"), out, path, report, graph_pass=graph_pass)
    pattern = parse_sparsity(plan.sparsity)
    report["quantization"] = {
        "precision": "w4a16",
        "format": section["format"],
        "bits": 4,
        "block_size": section["group_size"],
        "activations": "float16",
        "weights": f"stage 1's codes and scales ({wq.get('method', 'obs')}), stored as they are: never re-quantized",
        "int4_layers": section["int4_layers"],
        "fp16_quantized_layers": section["fp16_quantized_layers"],
        "smaller_blocks": section["smaller_blocks"],
        "float_gemm_weights": "the layers stage 1 did not quantize stay float16 MatMul/Gemm (embeddings, AdaLN modulations, the output projection)",
        "transformer_onnx_bytes": res["bytes"],
        "nm_note": NM_NOTE.format(pattern=str(pattern)) if pattern.is_semi_structured else None,
        "parity": res.get("parity"),
    }
    return res
