"""The SD3-medium-sized fixture through stage 2 and a TensorRT-RTX build (opt-in: RUN_SLOW=1; ~10 minutes
and ~8 GiB on 2 cores): the float16 transformer export stays within its memory bound at real size, and the
2.0B-parameter engine builds. ``make scale-check`` runs every stage; this is the part CI can afford."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(argv, cwd=REPO):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=3600)
    return p.returncode, out


def test_sd3_medium_fixture_exports_within_bound_and_builds(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    fixture = tmp_path / "sd3-medium"
    rc, out = _run(["scripts/make_scale_fixture.py", "--family", "sd3-medium", "--out", str(fixture), "--t5-layers", "0"])
    assert rc == 0, out[-3000:]
    info = json.loads((fixture / "fixture.json").read_text())
    assert info["transformer_parameters"] == 2_028_328_000  # SD3-medium's transformer
    export = tmp_path / "export"
    script = (
        "import json, sys; from pipeline.__main__ import main; from common.memory import peak_rss_bytes;"
        f"s = main(['export', '--model', {str(fixture)!r}, '--out', {str(export)!r}, '--precision', 'fp16', "
        "'--components', 'transformer', '--parity-batches', '1']); print(json.dumps({'status': s, 'peak': peak_rss_bytes()}))"
    )
    rc, out = _run(["-c", script])
    assert rc == 0, out[-3000:]
    m = json.loads(out.strip().splitlines()[-1])
    assert m["status"] == 0, out[-3000:]
    report = json.loads((export / "export_report.json").read_text())
    weights = report["components"]["transformer"]["bytes"]
    assert m["status"] == 0 and report["components"]["transformer"]["parity"]["ok"]
    assert m["peak"] <= 1.5 * weights + 2 * 2**30, (m["peak"] / 2**30, weights / 2**30)
    rc, out = _run(["-m", "pipeline", "build", "--model", str(fixture), "--onnx-dir", str(export / "onnx"), "--backend", "trtrtx"])
    assert rc == 0, out[-3000:]
    plans = list((export / "engines" / "transformer").glob("engine_trtrtx*.plan"))
    assert plans and plans[0].stat().st_size > 3 * 2**30
