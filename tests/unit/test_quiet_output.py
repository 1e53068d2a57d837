"""Quiet output (common/quiet.py): a real export prints the project's progress lines and none of the library
lines a user cannot act on; ``-v`` brings them back, and so does ``SDD_DEBUG=1``; each filter drops only its own
message."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from common.paths import REPO_ROOT
from common.quiet import DEBUG_ENV, silence_libraries

# What the libraries print during `python -m pipeline export` (torch 2.13, torchao 0.18, onnx 1.x), written here
# independently of common/quiet.py's patterns.
NOISE = {
    "torch.onnx: torchvision Skipping": "torchvision is not installed. Skipping torchvision::",
    "torch pytree: Enum register_constant": "is an Enum subclass and is now natively supported",
    "torch.export: reduce_op FutureWarning": "`torch.distributed.reduce_op` is deprecated",
    "torch.export: LeafSpec FutureWarning": "`isinstance(treespec, LeafSpec)` is deprecated",
    "torch.onnx dynamo: axis name UserWarning": "# The axis name: batch will not be used",
    "torchao: .so not loaded": "WARNING torchao: Failed to load",
    "torchao: no triton": "Detected no triton",
    "diffusers: torchao Tensor objects": "Unable to import `torchao` Tensor objects",
}
CPU_ONLY = {"torchao: .so not loaded", "torchao: no triton"}  # kept under a CUDA build of torch
PROJECT = re.compile(r"^(DEBUG|INFO|WARNING|ERROR) (common|families|evaluation|obsdiff|export|runtime|measure|pipeline|benchmarks)[.:]")
PROGRESS = ("INFO export.dynamo_export: exported transformer.onnx", "INFO export.stage: export complete")


def _export(out, *, env_extra: dict[str, str], verbose: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    env.update(env_extra)
    cmd = [sys.executable, "-m", "pipeline", *(["-v"] if verbose else []), "export", "--components", "transformer",
           "--parity-batches", "", "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _cpu_torch() -> bool:
    import torch

    return torch.version.cuda is None


def test_export_prints_only_the_projects_lines_and_v_brings_the_libraries_back(tmp_path):
    quiet = _export(tmp_path / "quiet", env_extra={})
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    text = quiet.stdout + quiet.stderr
    kept = () if _cpu_torch() else [NOISE[name] for name in CPU_ONLY]
    shown = [name for name, needle in NOISE.items() if needle in text and needle not in kept]
    assert not shown, f"library noise in a quiet export: {shown}\n{text}"
    for line in PROGRESS:
        assert line in quiet.stderr, f"missing the project's progress line {line!r}:\n{quiet.stderr}"
    foreign = [ln for ln in text.splitlines() if ln.strip() and not PROJECT.match(ln) and not any(k in ln for k in kept)]
    assert not foreign, ("lines that are not the project's (silence them at their source in common/quiet.py, "
                         "narrowly): \n" + "\n".join(foreign))

    loud = _export(tmp_path / "loud", env_extra={}, verbose=True)
    assert loud.returncode == 0, loud.stderr[-3000:]
    text = loud.stdout + loud.stderr
    back = [name for name, needle in NOISE.items() if needle in text]
    # Every source this torch still has comes back (a library that stops printing one is no failure).
    assert back, f"-v shows none of the library lines:\n{text[-5000:]}"
    assert {"torch.onnx: torchvision Skipping", "torch.onnx dynamo: axis name UserWarning"} <= set(back), back
    if _cpu_torch():
        assert "torchao: .so not loaded" in back or "torchao: no triton" in back, back
    for line in PROGRESS:
        assert line in loud.stderr


def test_sdd_debug_turns_the_filters_off(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert silence_libraries() is False
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert silence_libraries(debug=True) is False


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("logger,dropped", [
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed. Skipping torchvision::nms"),
    ("torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an opaque value type."),
])
def test_a_log_filter_drops_its_message_only(monkeypatch, logger, dropped):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert silence_libraries() and silence_libraries()  # idempotent
    log = logging.getLogger(logger)
    assert sum(type(f).__name__ == "_DropMessage" for f in log.filters) == 1
    handler = _Records()
    log.addHandler(handler)
    try:
        log.warning(dropped)
        log.warning("something else went wrong")
        logging.getLogger("export.stage").warning(dropped)  # our own logger: never filtered
    finally:
        log.removeHandler(handler)
    assert handler.messages == ["something else went wrong"]


def test_a_warning_filter_needs_category_module_and_message(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    text = "`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_libraries()
        warnings.warn_explicit(text, FutureWarning, "<frozen abc>", 119, module="abc")  # torch.export's path
        warnings.warn_explicit(text, FutureWarning, __file__, 1, module=__name__)  # our own code: shown
        warnings.warn_explicit(text, DeprecationWarning, "<frozen abc>", 119, module="abc")  # another category: shown
        warnings.warn_explicit("another deprecation", FutureWarning, "<frozen abc>", 119, module="abc")
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, text), (DeprecationWarning, text), (FutureWarning, "another deprecation")]
