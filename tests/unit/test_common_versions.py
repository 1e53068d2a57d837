"""Versions and device descriptions come from the running interpreter and libraries."""

import os
import platform
from importlib import metadata

import onnxruntime
import torch

from common.versions import cpu_description, device_description, device_info, library_versions, module_versions


def test_library_versions_read_the_installed_distributions():
    v = library_versions(["torch", "no-such-distribution-xyz"])
    assert v == {"python": platform.python_version(), "torch": metadata.version("torch"), "no-such-distribution-xyz": "absent"}
    assert "no-such-distribution-xyz" not in library_versions(["no-such-distribution-xyz"], absent=None)


def test_module_versions_read_the_running_modules():
    v = module_versions(["torch", "onnxruntime"], optional=["no_such_module_xyz"])
    assert v == {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def test_module_without_a_version_attribute_reports_its_distribution():
    import pytest

    tc = pytest.importorskip("tritonclient", reason="needs tritonclient (the project's serving dependency)")
    assert not hasattr(tc, "__version__")
    assert module_versions(["tritonclient"])["tritonclient"] == metadata.version("tritonclient")


def test_cpu_device_description_and_info():
    line = cpu_description()
    assert line.startswith("CPU ") and f"{os.cpu_count()} cores" in line and f"torch threads {torch.get_num_threads()}" in line
    assert device_description() == device_description("cpu") == device_description(torch.device("cpu")) == line
    info = device_info(False)
    assert info["cpu_count"] == os.cpu_count() and info["torch"] == torch.__version__ and info["summary"] == line
    assert "gpu" not in info
