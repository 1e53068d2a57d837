import subprocess
import sys

import numpy as np
from PIL import Image


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd)


def test_generate_is_deterministic(tmp_path):
    outs = []
    for name in ("a.png", "b.png"):
        r = _cli("generate", "--model", "tiny-sd3", "--prompt", "a handwritten digit 7", "--seed", "3", "--steps", "4", "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        outs.append(np.asarray(Image.open(tmp_path / name)))
    assert outs[0].shape == (32, 32, 3)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_unknown_model_is_one_line_and_nonzero(tmp_path):
    r = _cli("generate", "--model", "nope", "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: unknown model 'nope'")
    assert not (tmp_path / "x.png").exists()
