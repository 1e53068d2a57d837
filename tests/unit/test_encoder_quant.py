"""Weight-only INT8/INT4 text encoders (export.encoder_quant) and SD3 without T5: the embedded tiny-sd3's CLIP and T5
(the real transformers classes, trained weights) exported to ONNX, quantized by ONNX Runtime's tool into MatMulNBits,
run in ONNX Runtime and compared with the float ONNX; the stage and the runner around them."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest

from common.errors import CheckFailed, UserError
from tests.tolerances import EPS32

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny-sd3"
# CLIP: q, k, v, out_proj, fc1, fc2 per layer; T5: q, k, v, o, wi_0, wi_1, wo per block (both 2 layers)
LINEARS = {"text_encoder": 12, "text_encoder_3": 14}
# Quantized vs float ONNX, relative RMS error of each output over the weights' relative RMS error. A sublayer's output
# carries the errors of about two quantized matmuls in sequence (q/k/v then o; fc1 then fc2; wi then wo), each ~eps_w
# relative, of random sign: ~sqrt(2) eps_w; the residual stream adds the sublayers, and softmax and GELU add some gain.
# Measured 1.5-2.4 on tiny-sd3's three encoders and tiny-flux's two, INT8 and INT4 (stage 2's check on their prompts);
# 4 leaves 1.7x. A kernel returning zeros is ~1 / eps_w: >= 10 at INT4's eps_w ~0.1, ~170 at INT8's ~0.006.
GAIN = 4.0


def _spec():
    from families.registry import resolve_model

    return resolve_model("tiny-sd3")


@functools.lru_cache(maxsize=None)
def float_encoder(name: str) -> Path:
    """tiny-sd3's ``name`` encoder exported to float32 ONNX (once per session; parity is stage 2's own test)."""
    from families.components import find_component
    from families.registry import load_component
    from tests.export_helpers import export_and_check

    spec = _spec()
    comp = find_component(spec.adapter, name)
    path = Path(tempfile.mkdtemp(prefix="encoder-quant-")) / f"{name}.onnx"
    export_and_check(comp, load_component(spec, comp.attr), path, seq_len=comp.sequence_length(spec), parity_batches=())
    return path


def _initializers(path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (4, True)])
def test_dequantize_reads_what_matmulnbits_multiplies(bits, symmetric):
    """ONNX Runtime's MatMulNBits kernel on the identity returns its weight; dequantize() reads the same from the packed
    bytes, with K padded to whole blocks (80 = 2.5 blocks of 32) and with and without zero points."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from export.encoder_quant import dequantize

    k, n = 80, 24
    w = np.random.default_rng(bits).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, n])], [numpy_helper.from_array(w, "W")])
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bits=bits, block_size=32, is_symmetric=symmetric)
    q.process()
    model = q.model.model
    node = next(x for x in model.graph.node if x.op_type == "MatMulNBits")
    assert (len(node.input) == 4) is not symmetric  # a zero-point input only for the asymmetric grid
    ours = dequantize(node, {t.name: t for t in model.graph.initializer})  # (K, N)
    kernel = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": np.eye(k, dtype=np.float32)})[0]
    # each output is one product (q - z) * s times 1, the rest exact zeros: at most one rounding apart (measured: equal)
    np.testing.assert_allclose(kernel, ours, rtol=0, atol=2 * EPS32 * float(np.abs(w).max()))
    step = (w.max() - w.min()) / (2**bits - 1)  # a coarser grid than any block's
    assert float(np.abs(ours - w).max()) <= step  # the weights themselves, to within a step of their grid


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_3"])
def test_weight_only_encoder_runs_and_matches_the_float_one(name, precision, tmp_path):
    from export.encoder_quant import WEIGHT_ONLY, check_prompts, check_quantized_encoder, encoder_feeds, quantize_encoder
    from families.components import find_component
    from families.registry import load_component

    spec = _spec()
    comp = find_component(spec.adapter, name)
    src, dst = float_encoder(name), tmp_path / f"{name}.onnx"
    done = quantize_encoder(src, dst, WEIGHT_ONLY[precision])
    import onnx

    model = onnx.load(str(dst))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == len(done.layers) == LINEARS[name]
    quant = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert all(int(onnx.helper.get_attribute_value(a)) == WEIGHT_ONLY[precision].bits
               for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits")
    consts = _initializers(dst)
    left = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in consts and n.input[1] not in quant]
    assert [n.op_type for n in left] == (["Gemm"] if name == "text_encoder" else [])  # only CLIP's text projection stays a float GEMM

    # what stays float is the model's own values: the token table rounded to float16 once, the projection and norms as they were
    torch_model = load_component(spec, comp.attr)
    table = torch_model.get_input_embeddings().weight.detach().numpy()
    half = consts[next(iter(done.embeddings.values()))]
    assert half.dtype == np.float16 and np.array_equal(half, table.astype(np.float16))
    floats = {k: v for k, v in consts.items() if v.dtype == np.float32 and v.ndim >= 1 and v.size > 1}
    if name == "text_encoder":
        proj = floats[next(iter(done.float_layers))]
        assert np.array_equal(proj, torch_model.text_projection.weight.detach().numpy())
    norms = [p.detach().numpy() for n, p in torch_model.named_parameters() if "norm" in n and n.endswith("weight")]
    assert norms and all(any(v.shape == w.shape and np.array_equal(v, w) for v in floats.values()) for w in norms)

    feeds = encoder_feeds(comp, spec, check_prompts(spec))
    result = check_quantized_encoder(src, dst, feeds, done, name=name)  # the kernel check: raises past KERNEL_TOLERANCE
    assert result["ok"] and result["inputs"]["input_ids"] == [4, comp.sequence_length(spec)]
    for out, e in result["outputs"].items():
        assert 0 < e["rel_rms_vs_float"] <= GAIN * done.weight_rel_rms, (out, e)
    assert done.weight_rel_rms < (0.01 if precision == "int8" else 0.15)  # a step of 1/255 (1/15) of a block's range


def test_check_fails_when_the_graph_does_not_compute_its_weights(tmp_path):
    """accuracy_level 4 makes ONNX Runtime quantize the activations to INT8 too: no longer the weights in float32."""
    import onnx

    from export.encoder_quant import WEIGHT_ONLY, check_prompts, check_quantized_encoder, encoder_feeds, quantize_encoder
    from families.components import find_component

    spec = _spec()
    comp = find_component(spec.adapter, "text_encoder_3")
    src, dst = float_encoder("text_encoder_3"), tmp_path / "text_encoder_3.onnx"
    done = quantize_encoder(src, dst, WEIGHT_ONLY["int8"])
    model = onnx.load(str(dst))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", 4))
    onnx.save(model, str(dst))
    with pytest.raises(CheckFailed, match=r"does not compute its own weights: .* \(tolerance 1e-04\)"):
        check_quantized_encoder(src, dst, encoder_feeds(comp, spec, check_prompts(spec)), done, name="text_encoder_3")


def test_weights_in_external_data_stream_through(tmp_path, monkeypatch):
    """A float ONNX whose weights are external data (as past 2 GB) quantizes to the same initializers, layer by layer (every
    tensor over 1 KiB through the scratch file, not only those over STREAM_BYTES), and the quantized one keeps its weights
    in its own external data file when it is over the threshold."""
    import onnx

    import export.encoder_quant as encoder_quant
    import export.onnx_files as onnx_files
    from export.encoder_quant import WEIGHT_ONLY, quantize_encoder

    monkeypatch.setattr(encoder_quant, "STREAM_BYTES", 1024)
    src = tmp_path / "float" / "t5.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(float_encoder("text_encoder_3"))), str(src), save_as_external_data=True, location="t5.onnx.data", size_threshold=1024)
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 64 * 1024)
    quantize_encoder(src, tmp_path / "s" / "t5.onnx", WEIGHT_ONLY["int4"])
    quantize_encoder(float_encoder("text_encoder_3"), tmp_path / "m" / "t5.onnx", WEIGHT_ONLY["int4"])
    assert (tmp_path / "s" / "t5.onnx.data").is_file() and (tmp_path / "m" / "t5.onnx.data").is_file()
    streamed, in_memory = _initializers(tmp_path / "s" / "t5.onnx"), _initializers(tmp_path / "m" / "t5.onnx")
    assert streamed.keys() == in_memory.keys() and all(np.array_equal(streamed[k], in_memory[k]) for k in streamed)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["t5.onnx", "t5.onnx.data"]  # no scratch file left


def test_settings_without_t5_and_weight_only_values(tmp_path):
    from export.stage import ExportSettings, check_export
    from families.registry import resolve_model

    sd3, flux = _spec(), resolve_model("tiny-flux")
    s = ExportSettings(spec=sd3, out=tmp_path / "e", drop_t5=True, others_precision="int4")
    assert s.dropped == ("text_encoder_3",) and "text_encoder_3" not in check_export(s) and s.to_json()["drop_t5"]
    with pytest.raises(UserError, match=r"^tiny-flux cannot run without its T5 encoder .*: remove --drop-t5$"):
        check_export(ExportSettings(spec=flux, out=tmp_path / "e", drop_t5=True))
    with pytest.raises(UserError, match="--drop-t5 leaves text_encoder_3 out of the pipeline; remove it from --components"):
        check_export(ExportSettings(spec=sd3, out=tmp_path / "e", drop_t5=True, components=("transformer", "text_encoder_3")))
    for bad in ("int2", "bf16", "INT8"):
        with pytest.raises(UserError, match=f"unknown precision '{bad}' for the other components; choose from fp32, fp16, int8, int4"):
            check_export(ExportSettings(spec=sd3, out=tmp_path / "e", others_precision=bad))
    assert not (tmp_path / "e").exists()


def test_make_engine_refuses_weight_only_encoders_where_engines_run_them():
    from pipeline.engine import check_precision, parse_args

    for backend in ("trt", "torch"):
        with pytest.raises(UserError, match="--others-precision sets the ONNX Runtime exports' text encoders"):
            check_precision(parse_args(["--others-precision", "int8"]), False, backend)
    check_precision(parse_args(["--others-precision", "int4", "--precision", "int8"]), False, "ort")


def test_export_without_t5_runs_in_the_pipeline(tmp_path):
    """Stage 2 with weight-only INT4 CLIP and T5 dropped; the runner reads the report and runs SD3 with text_encoder_3=None."""
    import onnx
    import torch

    from export.stage import ExportSettings, run_export
    from runtime.pipeline_runner import export_dropped, runner_pipeline

    spec = _spec()
    report = run_export(ExportSettings(spec=spec, out=tmp_path / "e", components=("text_encoder",), others_precision="int4", drop_t5=True,
                                       parity_batches=(1,)))
    entry = report["components"]["text_encoder"]
    assert report["dropped"] == ["text_encoder_3"] and report["inputs"]["dropped"] == ["text_encoder_3"]
    assert entry["precision"] == "int4" and entry["weight_only"]["quantized_layers"] == LINEARS["text_encoder"]
    assert entry["weight_only_check"]["ok"] and entry["bytes"] < entry["float_bytes"] / 2
    ops = [n.op_type for n in onnx.load(str(tmp_path / "e" / "onnx" / "text_encoder.onnx")).graph.node]
    assert ops.count("MatMulNBits") == LINEARS["text_encoder"]
    assert export_dropped(tmp_path / "e" / "onnx") == ("text_encoder_3",)
    pipe = runner_pipeline(spec, onnx_dir=tmp_path / "e" / "onnx", components=["text_encoder"])
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None and type(pipe.text_encoder).__name__ == "ClipAdapter"
    image = pipe("a handwritten digit 3", num_inference_steps=2, height=32, width=32, max_sequence_length=spec.max_sequence_length,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_make_engine_defaults_and_engines_without_weight_only_encoders(tmp_path):
    """INT8 and INT4 transformers get weight-only INT8 encoders by default (INT4 encoders err 17x more: opt-in); on a GPU host benchmarking ONNX
    Runtime, the INT8 export's engines are built for the components TensorRT can take (not the MatMulNBits encoders)."""
    from export.stage import OTHERS_PRECISION
    from tests.unit.test_engine_cli import _plan

    assert (OTHERS_PRECISION["int8"], OTHERS_PRECISION["int4"], OTHERS_PRECISION["fp32"]) == ("int8", "int8", "fp32")
    _, _, _, stages = _plan(tmp_path, "--samples", "2", "--precision", "int8", "--drop-t5", cuda=True, backend="ort")
    by = {s.name: s.settings for s in stages}
    assert by["export_pruned_int8"].other_precision == "int8" and by["export_pruned_int8"].dropped == ("text_encoder_3",)
    assert by["engines_pruned_int8"].components == ("transformer", "vae_decoder")
