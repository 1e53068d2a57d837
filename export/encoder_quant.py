"""Weight-only INT8 / INT4 text encoders for ONNX Runtime: the recipe (:class:`WeightOnly`), the quantization of an
exported float32 encoder ONNX (:func:`quantize_encoder`: every linear layer's weight to ONNX Runtime's
``MatMulNBits``, the token embedding to float16, the rest left float32) and its check against the float ONNX on
the encoder's real inputs (:func:`check_quantized_encoder`).

The weights are quantized by ONNX Runtime's own tool (``onnxruntime.quantization.matmul_nbits_quantizer``, its
round-to-nearest block quantizer), one layer at a time so that memory stays near the quantized model plus one float
layer. Which layers stay float, and what was measured to decide it: ``docs/low-precision.md``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.errors import CheckFailed, UserError

log = logging.getLogger(__name__)

# Block sizes (weights along K sharing one scale and zero point) ONNX Runtime 1.32's MLAS quantizer accepts; it
# refuses 512 ("Only block sizes 16, 32, 64, 128, 256 are supported for quantization").
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 128

# The quantized ONNX in ONNX Runtime against the float ONNX run with the quantized weights dequantized in its
# initializers (max |diff| / max |ref|): the same weights and the same float32 graph, other GEMM kernels
# (MatMulNBits dequantizes a block and multiplies in float32; the float graph's MatMul sums in another order).
# That is export.parity.FP32_TOLERANCE's situation (float32 sums of K <= 10240 terms in another order, a few
# blocks deep). Measured on tiny-sd3's three encoders and tiny-flux's two, INT8 and INT4: at most 5e-7. A kernel
# that returns zeros (ONNX Runtime's MatMulNBits with block size 512 did on CPUs of some versions), a weight
# packed in another nibble order or a zero point off by one step all give errors >= 1e-2.
KERNEL_TOLERANCE = 1e-4
# A model whose weights are external data (over 2 GB) is quantized with every tensor above this many bytes moved to a
# scratch data file as soon as it is written, so that memory holds one float layer and the small tensors only.
STREAM_BYTES = 1 << 20
# Prompts of the real-input check: the empty prompt (the negative prompt of classifier-free guidance) and the
# first ones of the model's prompt file, tokenized as the pipeline does.
CHECK_PROMPTS = 4


@dataclass(frozen=True)
class WeightOnly:
    """Weight-only quantization of a text encoder's linear layers for ONNX Runtime (``MatMulNBits``).

    bits: 8 or 4. block_size: weights along the input dimension K sharing one float32 scale and one zero point
    (:data:`BLOCK_SIZES`; default 128). symmetric: no zero point (the grid centred on 0); default asymmetric
    (min-max of each block), ONNX Runtime's default. Activations stay float32: the nodes carry no
    ``accuracy_level``, so ONNX Runtime's CPU kernel dequantizes each block and multiplies in float32
    (``accuracy_level=4`` would quantize the activations to INT8 too: 1.5x the INT8 encoders' error, measured).
    """

    bits: int
    block_size: int = DEFAULT_BLOCK_SIZE
    symmetric: bool = False

    def check(self) -> None:
        if self.bits not in (4, 8):
            raise UserError(f"weight-only text encoders are INT8 or INT4, got {self.bits} bits")
        if self.block_size not in BLOCK_SIZES:
            raise UserError(f"weight-only block size must be one of {', '.join(map(str, BLOCK_SIZES))} (ONNX Runtime's quantizer), got {self.block_size}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric, "format": "MatMulNBits"}


# The other components' precisions that quantize the text encoders (weight-only; the VAE decoder stays float32).
WEIGHT_ONLY = {"int8": WeightOnly(8), "int4": WeightOnly(4)}


def weight_only_for(precision: str) -> WeightOnly | None:
    """The recipe of an other-components precision (``int8``/``int4``), None for a float one."""
    return WEIGHT_ONLY.get(precision)


@dataclass
class QuantizedEncoder:
    """What :func:`quantize_encoder` did: ``layers`` maps each quantized float weight's name to its ``MatMulNBits``
    weight initializer, ``embeddings`` each token table's name to its float16 copy; the realised weight error."""

    recipe: WeightOnly
    layers: dict[str, str]
    embeddings: dict[str, str]
    float_layers: dict[str, str]  # kept float: name -> why
    weight_sq_error: float = 0.0
    weight_sq_norm: float = 0.0
    embedding_max_rounding: float = 0.0

    @property
    def weight_rel_rms(self) -> float:
        """||W_q - W|| / ||W|| over every quantized weight (Frobenius norms summed over the layers)."""
        return float(np.sqrt(self.weight_sq_error / max(self.weight_sq_norm, 1e-30)))

    def to_json(self) -> dict[str, Any]:
        return {**self.recipe.to_json(), "quantized_layers": len(self.layers), "float16_embeddings": sorted(self.embeddings),
                "float_layers": self.float_layers, "weight_rel_rms_error": self.weight_rel_rms,
                "embedding_max_rel_rounding": self.embedding_max_rounding}


# --------------------------------------------------------------------------------------------------------
# Quantization


def quantize_encoder(src: str | os.PathLike, dst: str | os.PathLike, recipe: WeightOnly) -> QuantizedEncoder:
    """Write ``dst``: the float32 encoder ONNX ``src`` with every linear weight in ``MatMulNBits`` (``recipe``) and
    every token-embedding table in float16 (a ``Gather`` then a ``Cast`` to float32).

    Quantized: each ``MatMul`` whose second input is a 2-D constant used by it alone (the attention and MLP
    projections; attention's own two matmuls have no constant). Left float32: the CLIP text projection (a ``Gemm``
    on the pooled vector), layer norms, biases, the position embedding and T5's relative-position bias (1-D or
    folded constants). Memory: the quantized model plus one float layer; weights stored as external data stay on
    disk until their layer is quantized (written to ``dst``'s data file through a scratch file beside it).
    """
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    from export.onnx_files import append_external, save_onnx

    recipe.check()
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    streaming = any(uses_external_data(t) for t in graph.initializer)
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(i for n in graph.node for i in n.input)
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=recipe.symmetric, bits=recipe.bits))
    done = QuantizedEncoder(recipe, {}, {}, {})
    nodes = []
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as scratch:
        scratch = Path(scratch)

        moved: set[str] = set()  # tensors already in the scratch data file

        def owned(t):  # its bytes in memory, or copied into the scratch data file when the model streams
            if streaming and len(t.raw_data) > STREAM_BYTES:
                append_external(t, numpy_helper.to_array(t), scratch, "weights.data")
                moved.add(t.name)
            return t

        for node in graph.node:
            # a MatMul's weight is its second input, a Gather's table its first
            weight = inits.get(node.input[1 if node.op_type == "MatMul" else 0]) if node.op_type in ("MatMul", "Gather") and len(node.input) == 2 else None
            if weight is None or len(weight.dims) != 2 or uses[weight.name] != 1:
                if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits:
                    done.float_layers[node.input[1]] = "the text projection (Gemm on the pooled vector)"
                nodes.append(node)
                continue
            _load(weight, src.parent)
            w = numpy_helper.to_array(weight)  # (K, N) float32, or the (vocab, D) table of a Gather
            if node.op_type == "Gather":
                graph.initializer.remove(weight)
                nodes += _float16_gather(node, weight, w, graph, done, owned)
                continue
            new = quantizer.quantize(node, [graph])  # appends its packed weight, scales and zero points to graph.initializer
            graph.initializer.remove(weight)
            packed = next(n for n in new if n.op_type == "MatMulNBits")
            q_inits = {t.name: t for t in graph.initializer[-(len(packed.input) - 1):]}
            w_q = dequantize(packed, q_inits)
            done.weight_sq_error += float(np.square(w_q.astype(np.float64) - w).sum())
            done.weight_sq_norm += float(np.square(w.astype(np.float64)).sum())
            done.layers[weight.name] = packed.input[1]
            for t in q_inits.values():
                owned(t)
            nodes += new
            del w, w_q
        graph.ClearField("node")
        graph.node.extend(nodes)
        if streaming:  # the float tensors left (norms, biases, position tables) follow into the scratch file
            for t in graph.initializer:
                if uses_external_data(t) and t.name not in moved:
                    _load(t, src.parent)
                    owned(t)
        for domain in ("com.microsoft",):
            if not any(o.domain == domain for o in model.opset_import):
                model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
        save_onnx(model, dst, base_dir=scratch if streaming else None)
    log.info("%s: %d linear layers INT%d weight-only (block %d, %s), %d token table(s) float16, weights %.2e relative RMS error",
             dst.name, len(done.layers), recipe.bits, recipe.block_size, "symmetric" if recipe.symmetric else "asymmetric",
             len(done.embeddings), done.weight_rel_rms)
    return done


def _load(t, base_dir: Path) -> None:
    """Read an externally stored initializer's bytes into it (a no-op for an embedded one)."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(t):
        load_external_data_for_tensor(t, str(base_dir))
        t.data_location = 0  # DEFAULT: the bytes now live in raw_data
        del t.external_data[:]


def _float16_gather(node, weight, table: np.ndarray, graph, done: QuantizedEncoder, owned) -> list:
    """A token-embedding ``Gather`` over a float16 copy of its table, then a ``Cast`` of the gathered rows to float32."""
    import onnx
    from onnx import numpy_helper

    half = table.astype(np.float16)
    scale = max(float(np.abs(table).max()), 1e-30)
    done.embedding_max_rounding = max(done.embedding_max_rounding, float(np.abs(half.astype(np.float32) - table).max()) / scale)
    t = owned(numpy_helper.from_array(half, weight.name + "_fp16"))
    graph.initializer.append(t)
    done.embeddings[weight.name] = t.name
    rows = node.output[0] + "_fp16"
    gather = onnx.helper.make_node("Gather", [t.name, node.input[1]], [rows], name=node.name + "_fp16", axis=_axis(node))
    cast = onnx.helper.make_node("Cast", [rows], [node.output[0]], name=node.name + "_to_fp32", to=onnx.TensorProto.FLOAT)
    return [gather, cast]


def _axis(node) -> int:
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)


def dequantize(node, inits: dict) -> np.ndarray:
    """The float32 ``(K, N)`` weight a ``MatMulNBits`` node multiplies by: ``(q - zero_point) * scale`` per block of its
    packed ``B`` (``(N, k_blocks, block_size * bits / 8)`` uint8, 4-bit values low nibble first), ``scales``
    (``N x k_blocks``) and zero points (4-bit: two per byte, low nibble first; absent: ``2^(bits-1)``).
    ``inits``: initializers by name."""
    import onnx
    from onnx import numpy_helper

    attr = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits = int(attr["K"]), int(attr["N"]), int(attr["bits"])
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, -1)  # (N, k_blocks)
    blocks = scales.shape[1]
    q = numpy_helper.to_array(inits[node.input[1]]).reshape(n, blocks, -1)  # (N, k_blocks, blob)
    q = _unpack(q, bits)  # (N, k_blocks, block_size)
    if len(node.input) > 3 and node.input[3]:
        zero = _unpack(numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1), bits)[:, :blocks]  # (N, k_blocks)
    else:
        zero = np.full((n, blocks), 2 ** (bits - 1), dtype=np.uint8)
    w = (q.astype(np.float32) - zero[..., None].astype(np.float32)) * scales[..., None]  # (N, k_blocks, block_size)
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)  # (K, N)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes to one value per element along the last axis (4-bit: low nibble first)."""
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


# --------------------------------------------------------------------------------------------------------
# The check against the float ONNX


def check_prompts(spec, count: int = CHECK_PROMPTS) -> list[str]:
    """The check's prompts: the empty one (classifier-free guidance's negative) and the model's first ``count - 1``."""
    from common.paths import REPO_ROOT
    from obsdiff.packages import read_prompts

    return [""] + read_prompts(REPO_ROOT / spec.prompts)[: count - 1]


def check_quantized_encoder(float_path: str | os.PathLike, quant_path: str | os.PathLike, feeds: dict[str, np.ndarray],
                            done: QuantizedEncoder, *, name: str = "") -> dict[str, Any]:
    """Run the float ONNX, the float ONNX with the quantized weights (each ``MatMulNBits`` weight dequantized, each
    float16 table widened, given to ONNX Runtime as initializer overrides) and the quantized ONNX on ``feeds`` (the
    encoder's real inputs), one session at a time. Fails (:class:`CheckFailed`) unless the quantized ONNX computes what
    its weights say: max |quantized - dequantized float| / max |ref| <= :data:`KERNEL_TOLERANCE`. Records what the
    quantization itself does to each output (relative RMS and max error against the float ONNX, and the RMS error's
    ratio to the weights')."""
    import onnx

    from export.parity import rel_error

    float_out = _run(float_path, feeds)
    quant_out = _run(quant_path, feeds)
    model = onnx.load(str(quant_path))
    inits = {t.name: t for t in model.graph.initializer}
    overrides = {}
    by_packed = {packed: name for name, packed in done.layers.items()}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.input[1] in by_packed:
            overrides[by_packed[node.input[1]]] = dequantize(node, inits)
    from onnx import numpy_helper

    for table, half in done.embeddings.items():
        overrides[table] = numpy_helper.to_array(inits[half]).astype(np.float32)
    del model, inits
    same_out = _run(float_path, feeds, overrides)
    del overrides
    outputs = {}
    for out, q in quant_out.items():
        ref, same = float_out[out], same_out[out]
        rms = float(np.linalg.norm((q - ref).astype(np.float64)) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))
        outputs[out] = {"kernel_rel_error": rel_error(q, same), "rel_rms_vs_float": rms, "rel_max_vs_float": rel_error(q, ref),
                        "rms_error_over_weight_error": rms / max(done.weight_rel_rms, 1e-30)}
    worst = max(outputs, key=lambda o: outputs[o]["kernel_rel_error"])
    result = {"reference": "the float ONNX (kernel check: the same ONNX with the quantized weights dequantized)",
              "inputs": {k: list(v.shape) for k, v in feeds.items()}, "tolerance": KERNEL_TOLERANCE,
              "max_kernel_rel_error": outputs[worst]["kernel_rel_error"], "outputs": outputs}
    result["ok"] = bool(np.isfinite(result["max_kernel_rel_error"]) and result["max_kernel_rel_error"] <= KERNEL_TOLERANCE)
    log.info("%s: INT%d weight-only vs float ONNX on %d real prompts: relative RMS error %s; kernel vs dequantized weights %.2e (tolerance %.0e)",
             name, done.recipe.bits, next(iter(feeds.values())).shape[0],
             ", ".join(f"{o} {v['rel_rms_vs_float']:.2e}" for o, v in outputs.items()), result["max_kernel_rel_error"], KERNEL_TOLERANCE)
    if not result["ok"]:
        raise CheckFailed(f"{name}: the INT{done.recipe.bits} weight-only ONNX in ONNX Runtime does not compute its own weights: max |MatMulNBits "
                          f"graph - float graph with the dequantized weights| / max |ref| of {worst} is {result['max_kernel_rel_error']:.2e} "
                          f"(tolerance {KERNEL_TOLERANCE:.0e})")
    return result


def _run(path, feeds: dict[str, np.ndarray], overrides: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Outputs of the ONNX at ``path`` on ``feeds`` in a CPU session (the project's options), with ``overrides``
    replacing initializers by name; the session is freed on return."""
    import onnxruntime as ort

    from common.ort_options import session_options

    so = session_options(lean=True)
    keep = []
    for name, value in (overrides or {}).items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
        so.add_initializer(name, keep[-1])
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def encoder_feeds(component, spec, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """``{"input_ids": (B, L) int64}``: ``prompts`` tokenized by the encoder's tokenizer as the pipeline does (padded to
    the encoder's sequence length, cut there)."""
    from families.registry import load_component

    tokenizer = load_component(spec, component.tokenizer_attr)
    ids = tokenizer(list(prompts), padding="max_length", max_length=component.sequence_length(spec), truncation=True, return_tensors="np").input_ids
    return {"input_ids": ids.astype(np.int64)}


# --------------------------------------------------------------------------------------------------------
# Stage 2's step


def weight_only_encoder(spec, component, path: str | os.PathLike, recipe: WeightOnly, entry: dict[str, Any], *, check: bool = True) -> dict[str, Any]:
    """Replace the float32 encoder ONNX at ``path`` (stage 2's export of ``component``, already checked against torch)
    by its weight-only version (:func:`quantize_encoder`), checked against it on the model's prompts
    (:func:`check_quantized_encoder`; ``check=False``: skipped, as ``--parity-batches ''`` asks). Returns the report
    entry: ``entry`` (the float export's) with the new file's size, ``precision`` the recipe's, ``weight_only``
    (what was quantized, what stayed float, the weights' error) and ``weight_only_check``."""
    import shutil

    from export.onnx_files import onnx_size

    path = Path(path)
    float_bytes = onnx_size(path)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.{recipe.name}.", dir=path.parent) as tmp:
        quant = Path(tmp) / path.name  # the final name: its external data file is named after it
        done = quantize_encoder(path, quant, recipe)
        if check:
            result = check_quantized_encoder(path, quant, encoder_feeds(component, spec, check_prompts(spec)), done, name=component.name)
        else:
            result = {"skipped": "--parity-batches '': no check asked for"}
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        if quant.with_name(quant.name + ".data").is_file():
            shutil.move(str(quant.with_name(quant.name + ".data")), str(data))
        os.replace(quant, path)
    from export.onnx_files import io_spec

    entry = {**entry, "bytes": onnx_size(path), "float_bytes": float_bytes, "precision": recipe.name, "weight_only": done.to_json(),
             "weight_only_check": result}
    entry["inputs"], entry["outputs"] = io_spec(path)
    return entry
