"""The ONNX Runtime session options every CPU session of this project uses (the export's checks, the benchmarks,
the pipeline runner and the served components), in one place.

- No idle spinning (``session.intra_op.allow_spinning=0``, also inter-op): spinning threads burn the cores the
  rest of the pipeline needs and make interleaved timings on shared cores meaningless.
- Exact INT8 GEMMs on every x86-64 CPU. Without VNNI (AVX2, and AVX-512 without VNNI) ONNX Runtime's U8S8
  integer GEMM sums pairs of u8 x s8 products into int16 with saturation (``vpmaddubsw``), so an INT8 Q/DQ graph
  whose activations and weights use their whole range computes another model there. ``session.x64quantprecision
  =1`` makes ONNX Runtime convert the int8 weights to uint8 and run the exact U8U8 kernel instead; on a VNNI CPU
  it costs time and changes nothing (measured on a 2-block SD3-medium-width INT8 transformer, Xeon with
  AVX512-VNNI: 1.8x the latency, bit-identical outputs). So it is set only where this CPU's kernel saturates,
  which :func:`int8_gemm_saturates` finds by running a one-GEMM probe whose pairs overflow int16 (it follows the
  CPU ONNX Runtime really dispatches on, also under an emulator). Measured: the tiny-sd3 INT8 transformer under
  ``qemu-x86_64 -cpu Haswell`` (AVX2) is 1.9x the quantization's own RMS error away from the fake-quantized
  model with the default kernel, and bit-identical to the VNNI host's output with the option.
"""

from __future__ import annotations

import functools

# session config entries every CPU session gets (ONNX Runtime's onnxruntime_session_options_config_keys.h)
SESSION_CONFIG = {
    "session.intra_op.allow_spinning": "0",
    "session.inter_op.allow_spinning": "0",
}
PRECISE_INT8 = ("session.x64quantprecision", "1")


def saturation_probe():
    """A one-GEMM INT8 Q/DQ model whose u8 x s8 pair sums overflow int16 once ONNX Runtime shifts the activations
    to uint8 (2 x 255 x 127 = 64,770 > 32,767): ``(serialized model, feeds, exact output value)``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    k, n = 64, 16
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"]), helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0.01, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.full((k, n), 127, np.int8), "w")]
    graph = helper.make_graph(nodes, "int8_saturation_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime this project supports
    return model.SerializeToString(), {"x": np.full((4, k), 1.27, np.float32)}, k * 127 * 127 * 1e-4  # x quantizes to 127


def probe_is_exact(so) -> bool:
    """Whether a session with options ``so`` computes :func:`saturation_probe` exactly (to float32 rounding)."""
    import numpy as np
    import onnxruntime as ort

    model, feeds, exact = saturation_probe()
    y = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]  # (4, 16)
    return bool(np.allclose(y, exact, rtol=1e-5))


@functools.lru_cache(maxsize=1)
def int8_gemm_saturates() -> bool:
    """Whether ONNX Runtime's default INT8 GEMM saturates on this CPU (:func:`saturation_probe`; once per process,
    a few milliseconds)."""
    return not probe_is_exact(_base_options())


def _base_options():
    """``onnxruntime.SessionOptions`` with :data:`SESSION_CONFIG` and ONNX Runtime's warnings off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    return so


def int8_gemm_mode() -> str:
    """What the sessions' INT8 GEMMs run on this CPU, for reports."""
    if int8_gemm_saturates():
        return "u8u8 (session.x64quantprecision=1: this CPU's u8s8 kernel saturates, no VNNI)"
    return "u8s8 (exact on this CPU)"


def session_options(*, threads: int | None = None, optimize: bool = True, lean: bool = False):
    """``onnxruntime.SessionOptions`` with :data:`SESSION_CONFIG`, and exact INT8 GEMMs where the CPU needs it.

    threads: intra-op threads (None or 0: one per physical core, ONNX Runtime's default).
    optimize: all graph optimisations (default); False runs the graph exactly as exported.
    lean: no memory arena and no memory-pattern preallocation (for a few calls of different shapes).
    """
    import onnxruntime as ort

    so = _base_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if lean:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    if int8_gemm_saturates():
        so.add_session_config_entry(*PRECISE_INT8)
    if threads:
        so.intra_op_num_threads = int(threads)
    return so
