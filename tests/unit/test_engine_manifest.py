"""Engine loading checks: every mismatch ends with its own one-line 'rebuild' error, before deserialisation.

The engine is a real TensorRT-RTX plan of the 2:4-pruned tiny-sd3 transformer; the checks run on the CPU
because they happen before anything is deserialised (running the engine needs a GPU).
"""

from __future__ import annotations

import json

import pytest

from common.errors import UserError
from runtime.manifest import GpuInfo, check_engine, manifest_path_for
from tests import runtime_fixtures as fx

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx)")

RTX4090 = GpuInfo("NVIDIA GeForce RTX 4090", "8.9")
H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


def _check(plan, **kw):
    args = dict(backend="trtrtx", backend_version=trt_rtx.__version__, gpu=RTX4090)
    args.update(kw)
    return check_engine(plan, **args)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and ("rebuild" in msg or "GPU host" in msg)
    return msg


def test_matching_engine_passes(tmp_path):
    plan = fx.copy_engine(tmp_path)
    m = _check(plan)
    assert m["component"] == "transformer" and m["sparsity"] == "2:4"


def test_missing_manifest(tmp_path):
    plan = fx.copy_engine(tmp_path)
    manifest_path_for(plan).unlink()
    with pytest.raises(UserError, match="has no manifest") as e:
        _check(plan)
    _one_line(e)


def test_plan_hash_mismatch_is_never_deserialised(tmp_path):
    from runtime.trt.engine import TrtEngine

    plan = fx.copy_engine(tmp_path)
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the sha256") as e:
        _check(plan)
    _one_line(e)
    # The loader runs the same check first, whatever GPU it is given: no deserialisation is attempted.
    with pytest.raises(UserError, match="does not match the sha256"):
        TrtEngine(plan, gpu=RTX4090)


def test_backend_version_mismatch(tmp_path):
    plan = fx.copy_engine(tmp_path)
    with pytest.raises(UserError, match=rf"built with TensorRT-RTX {trt_rtx.__version__} but this is TensorRT-RTX 1\.0\.0\.0; rebuild") as e:
        _check(plan, backend_version="1.0.0.0")
    _one_line(e)
    with pytest.raises(UserError, match=r"but this is TensorRT 10\.13\.0; rebuild"):
        _check(plan, backend="trt", backend_version="10.13.0")


def test_gpu_outside_rtx_targets(tmp_path):
    plan = fx.copy_engine(tmp_path)
    with pytest.raises(UserError, match=r"targets compute capabilities SM80, SM86, SM89, SM120 but this GPU \(NVIDIA H100 80GB HBM3\) is 9\.0") as e:
        _check(plan, gpu=H100)
    _one_line(e)


def test_gpu_mismatch_for_tensorrt_engine(tmp_path):
    # A TensorRT (not -RTX) manifest records the one GPU it was tuned on.
    plan = fx.copy_engine(tmp_path)
    mpath = manifest_path_for(plan)
    m = json.loads(mpath.read_text())
    m.update(backend="trt", backend_version="10.13.0", target_compute_capabilities=[], gpu={"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"})
    mpath.write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"built for NVIDIA A100-SXM4-80GB \(compute 8\.0\) but this GPU is NVIDIA H100 80GB HBM3 \(compute 9\.0\)") as e:
        check_engine(plan, backend="trt", backend_version="10.13.0", gpu=H100)
    _one_line(e)
    assert check_engine(plan, backend="trt", backend_version="10.13.0", gpu=GpuInfo("NVIDIA A100-SXM4-80GB", "8.0"))["backend"] == "trt"


def test_changed_or_missing_onnx(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    plan = fx.copy_engine(tmp_path)
    src = tmp_path / "transformer.onnx"
    model = onnx.load(str(fx.pruned_export()[0] / "transformer.onnx"))
    onnx.save(model, str(src))
    # Point the manifest at this copy (re-serialised, so hash it afresh), then change one weight.
    mpath = manifest_path_for(plan)
    m = json.loads(mpath.read_text())
    from runtime.manifest import sha256_onnx

    m["onnx"] = str(src)
    m["onnx_sha256"] = sha256_onnx(src)
    mpath.write_text(json.dumps(m))
    _check(plan)  # the recorded ONNX is unchanged
    init = model.graph.initializer[0]
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += np.asarray(1, arr.dtype)
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(src))
    with pytest.raises(UserError, match=r"source ONNX .*transformer\.onnx changed since the engine was built; rebuild") as e:
        _check(plan)
    _one_line(e)
    with pytest.raises(UserError, match="is missing"):
        _check(plan, onnx_path=tmp_path / "gone.onnx")


def test_no_gpu_and_bad_manifest(tmp_path):
    plan = fx.copy_engine(tmp_path)
    with pytest.raises(UserError, match="needs an NVIDIA GPU to run and none is visible"):
        _check(plan, gpu=None)
    mpath = manifest_path_for(plan)
    mpath.write_text(json.dumps({"format": 99}))
    with pytest.raises(UserError, match="is not a version-1 engine manifest"):
        _check(plan)
    mpath.write_text("{not json")
    with pytest.raises(UserError, match="corrupt JSON"):
        _check(plan)
    mpath.write_text("[1, 2, 3]")  # parses, wrong shape
    with pytest.raises(UserError, match="JSON list"):
        _check(plan)
