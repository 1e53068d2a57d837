"""Two runs of one stage on one output directory at once (issue 19): the second stops before any work with
one line naming the first's process; the first finishes undisturbed; a rerun reuses its output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRUNE = [sys.executable, "-m", "pipeline", "prune", "--samples", "4", "--steps", "4", "--groups", "4"]


def test_two_prunes_on_one_directory(tmp_path: Path):
    from common.io import LOCK

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    env.pop("SPARSE_DIT_LOCK_WAIT", None)
    out = tmp_path / "p"
    first = subprocess.Popen([*PRUNE, "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK).exists():  # the first run has checked its options and started writing
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        second = subprocess.run([*PRUNE, "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second checked: the test proves nothing"
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith(f"error: {out} is being written by process {first.pid} "), lines
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert (out / "plan.json").is_file() and not (out / LOCK).exists()
    rerun = subprocess.run([*PRUNE, "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "already holds this pruning" in rerun.stderr, rerun.stderr[-3000:]
