"""Export memory is bounded by the weights: peak RSS growth at most 1.5x the exported weight bytes plus a
fixed allowance, on a model whose weights dominate the process (memory ratios are stable; times are not).

The model is an SD3 transformer of SD3-medium's head layout at a smaller width, with random weights; the
export runs through the external-data path that >2 GB models take (forced by ``SDD_EXTERNAL_DATA_BYTES``),
in its own process so that its peak RSS is its own. Two causes of growth found at SD3-medium size are checked on
their own, in a second each: the float32 parity reference never reallocates the half weights, and the ONNX
Runtime parity session casts each float16 weight to float32 just before its use, not all of them early.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, torch
from common.memory import peak_rss_bytes, rss_bytes
from diffusers import SD3Transformer2DModel
from pipeline.__main__ import main
import export.dynamo_export, onnx, onnxruntime  # imports are the baseline, not the export
out, model_dir, precision = sys.argv[1], sys.argv[2], sys.argv[3]
base = rss_bytes()
status = main(["export", "--model", model_dir, "--out", out, "--precision", precision, "--components", "transformer", "--parity-batches", "1"])
print(json.dumps({"status": status, "baseline": base, "peak": peak_rss_bytes()}))
"""


def _model_dir(tmp: Path, dtype: str = "fp32") -> Path:
    import torch
    from diffusers import SD3Transformer2DModel

    d = tmp / "model"
    (d / "transformer").mkdir(parents=True)
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
                              num_attention_heads=16, joint_attention_dim=512, caption_projection_dim=1024, pooled_projection_dim=256,
                              pos_embed_max_size=32)
    # stored in the precision it is exported in, as hub checkpoints are float16 (like stage 1's 1 GB shards of a 2B model)
    m.to(torch.float16 if dtype == "fp16" else torch.float32).save_pretrained(d / "transformer", max_shard_size="100MB")
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    return d


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.slow), "fp16"])  # fp16 in make test; both with RUN_SLOW=1
def test_export_peak_memory_is_bounded_by_the_weights(tmp_path, precision):
    model_dir = _model_dir(tmp_path, precision)
    # Allocator slack is not the export's memory, and it depends on what else the host runs. MALLOC_ARENA_MAX: glibc
    # gives each busy thread its own arena; on a loaded host that alone added ~0.5 GiB to the peak. A fixed
    # MALLOC_MMAP_THRESHOLD_: glibc otherwise raises the threshold as large blocks are freed and keeps later ones
    # in its heap (alone 0.68 GiB of growth with it moving, 0.56 GiB with it fixed; once 1.15 GiB in a loaded
    # `make test`).
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO), "SDD_EXTERNAL_DATA_BYTES": "0", "MALLOC_ARENA_MAX": "2",
           "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "out"), str(model_dir), precision], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["status"] == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    onnx_dir = tmp_path / "out" / "onnx"
    assert (onnx_dir / "transformer.onnx.data").is_file(), "the external-data path was not taken"
    weights = report["components"]["transformer"]["bytes"]
    growth = m["peak"] - m["baseline"]
    # Fixed costs that do not grow with the weights: torch.export's tracing, ONNX Runtime's arenas and thread
    # pools, allocator slack. Measured growth on this model: fp32 0.76 GiB (1.38 x), fp16 0.55-0.57 GiB stored in fp16 (the
    # spread is allocator timing); the real-size bound (1.5 x + 2 GiB) is asserted by test_scale_fixture.py.
    allowance = 768 * 2**20
    print(f"{precision}: weights {weights / 2**20:.0f} MiB, peak growth {growth / 2**20:.0f} MiB = {growth / weights:.2f} x weights")
    phases = [line for line in r.stderr.splitlines() if "RSS" in line]  # what the export logged of its memory, phase by phase
    assert growth <= 1.5 * weights + allowance, (growth / 2**20, weights / 2**20, phases)
    assert report["components"]["transformer"]["parity"]["ok"]


def test_fp32_reference_keeps_the_half_weights_in_place():
    """The float32 reference of a half model runs on transient float32 copies: the float16 tensors are never
    reallocated (the ``.to`` round trip it replaced left ~1 GiB of freed heap at SD3-medium size), and it computes
    what the float32 model computes (its weights are the half ones upcast exactly: equal, not close)."""
    import torch
    from torch import nn

    from export.parity import fp32_compute

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 8))).half()
    reference = copy.deepcopy(model).float()
    where = {n: (t.data_ptr(), t.dtype) for n, t in model.state_dict().items()}
    x = torch.randn(4, 16)
    with torch.no_grad(), fp32_compute(model) as m:
        got = m(x.half())
        assert {n: (t.data_ptr(), t.dtype) for n, t in model.state_dict().items()} == where
        with pytest.raises(RuntimeError):
            m(torch.randn(4, 15))  # a forward that raises halfway...
    assert {n: (t.data_ptr(), t.dtype) for n, t in model.state_dict().items()} == where  # ...still leaves the half weights
    assert got.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(got, reference(x.half().float()))


def _live_weight_casts(path: Path, so, tmp: Path) -> int:
    """Most float32 weight copies ONNX Runtime's inserted Casts hold at once while running ``path`` (from its
    profile of the executed order and the graph as it ran)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / "profile")
    so.optimized_model_filepath = str(tmp / "as_run.onnx")
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.ones((2, 64), np.float16)})
    events = sorted((e for e in json.loads(Path(sess.end_profiling()).read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                    key=lambda e: e["ts"])
    step = {e["name"][: -len("_kernel_time")]: k for k, e in enumerate(events)}
    graph = onnx.load(so.optimized_model_filepath).graph
    weights = {i.name for i in graph.initializer}
    users: dict[str, list[int]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(step[n.name])
    spans = [(step[n.name], max(users[n.output[0]])) for n in graph.node if n.op_type == "Cast" and n.input[0] in weights]
    return max((sum(a <= k <= b for a, b in spans) for k in range(len(events))), default=0)


def test_parity_session_casts_each_weight_just_before_its_use(tmp_path):
    """ONNX Runtime's CPU kernels run a float16 graph through a float32 Cast of every weight. Those Casts depend
    on nothing, and its default execution order runs them early: in the SD3-medium-sized transformer the float32
    copies of later blocks' weights held 2.16 GiB at once during the parity check. The check's session (lean)
    runs each one just before its consumer: one copy at a time on a chain of 8 float16 MatMuls, where the default
    order holds all 8."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.parity import ort_session

    nodes, inits, x = [], [], "x"
    for k in range(8):
        inits.append(numpy_helper.from_array(np.full((64, 64), 0.01, np.float16), f"w{k}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"h{k}"], name=f"matmul{k}"))
        x = f"h{k}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, 64])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT16, [None, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)
    (tmp_path / "lean").mkdir()
    (tmp_path / "default").mkdir()
    lean = _live_weight_casts(path, ort_session(path, optimize=False, lean=True).get_session_options(), tmp_path / "lean")
    default = _live_weight_casts(path, ort_session(path, optimize=False).get_session_options(), tmp_path / "default")
    assert lean <= 1, lean
    assert default in (0, 8), default  # what it fixes (0: this ONNX Runtime has float16 MatMul kernels, nothing to order)
