"""``python -m pipeline engine`` (make engine): bad input, and (opt-in) a full run that is reused on rerun."""

import json
import subprocess
import sys

import pytest


def _engine(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", "engine", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, start",
    [
        (["--sparsity", "3:4"], "error: unknown sparsity pattern '3:4'"),
        (["--sparsity", "dense"], "error: SPARSITY=dense has nothing to prune"),
        (["--model", "sd9"], "error: unknown model 'sd9'"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, start):
    r = _engine("--artifacts", str(tmp_path), *args)
    assert r.returncode == 2
    assert r.stderr.startswith(start) and r.stderr.strip().count("\n") == 0
    assert not any(tmp_path.iterdir())  # nothing written


def test_only_bench_needs_finished_stages(tmp_path):
    r = _engine("--artifacts", str(tmp_path), "--only-bench")
    assert r.returncode == 2 and "is not complete; run `make engine" in r.stderr


@pytest.mark.slow
def test_engine_runs_end_to_end_and_reuses_stages(tmp_path):
    args = ["--artifacts", str(tmp_path), "--sparsity", "structured:0.3", "--samples", "2", "--calib-steps", "4",
            "--runs", "1", "--warmup", "0", "--threads", "1"]
    first = _engine(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    root = tmp_path / "tiny-sd3" / "structured-0.3-obs-diff"
    assert first.stdout.strip().splitlines()[-1] == str(root)
    bench = json.loads((root / "bench.json").read_text())
    for variant in ("dense", "pruned"):
        assert {"median", "p90"} <= set(bench[variant]["latency_ms"]) and bench[variant]["backend"]
    assert bench["speedup"] > 0
    second = _engine(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    assert all(stages[s]["reused"] for s in stages if s != "bench"), stages
