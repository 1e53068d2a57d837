"""The project's ONNX Runtime sessions compute INT8 GEMMs exactly on every x86-64 CPU (common.ort_options)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_a_project_session_computes_the_saturating_probe_exactly_on_this_cpu():
    """On a VNNI CPU by itself; on one without VNNI because the session asks for the exact U8U8 kernel."""
    from common.ort_options import int8_gemm_mode, int8_gemm_saturates, probe_is_exact, session_options

    so = session_options()
    assert probe_is_exact(so), int8_gemm_mode()
    assert (_entry(so, "session.x64quantprecision") == "1") == int8_gemm_saturates()
    assert _entry(so, "session.intra_op.allow_spinning") == "0"


def _entry(so, key: str) -> str | None:
    try:
        return so.get_session_config_entry(key)
    except RuntimeError:  # ONNX Runtime raises for a key that was not set
        return None


@pytest.mark.slow  # about 30 s of one core under emulation
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or os.uname().machine != "x86_64",
                    reason="needs qemu-x86_64 (Debian's qemu-user) to emulate an AVX2 CPU without VNNI")
def test_on_an_emulated_avx2_cpu_the_default_kernel_saturates_and_the_project_session_does_not():
    """Under ``qemu-x86_64 -cpu Haswell`` (AVX2, no VNNI; qemu's TCG has no AVX-512) ONNX Runtime's default u8s8
    kernel saturates the probe, and the project's session options make it exact."""
    code = ("from common.ort_options import int8_gemm_saturates, probe_is_exact, session_options\n"
            "print(int8_gemm_saturates(), probe_is_exact(session_options()))\n")
    r = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True"], r.stdout + r.stderr[-2000:]
