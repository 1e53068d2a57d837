"""Shared fixtures, the run order of ``make test`` and the GPU / slow markers.

Comparing numbers: tests/tolerances.py holds the rule (exact only for what is discrete, copied, or one computation
run twice; a tolerance derived from the computation for every float compared with a stored reference or another code
path) and the tolerances with their derivations. Read it before writing an assertion on floats.
"""

import os

import pytest

# Model hubs are unreachable here: fail fast instead of waiting on connection retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see pipeline/__init__.py


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# `make test` runs two pytest-xdist workers with --dist loadfile: a file's tests stay on one worker, so its module
# fixtures (a Triton server and its exports, cached exports) are built once. The longest file starts first, while
# the other worker goes through the rest; started last, it ran alone at the end. --no-loadscope-reorder keeps this
# order (by default xdist queues the files with the most tests first). (xdist_group marks cannot do this with
# pytest 9.2: pytest-xdist's loadgroup rewrites a nodeid field pytest no longer reads, #1386.)
LONGEST_FIRST = ("test_triton_serve.py",)


def run_order(items: list) -> list:
    """``items`` with the files of :data:`LONGEST_FIRST` first (a stable sort: the order is otherwise kept)."""
    return sorted(items, key=lambda item: item.path.name not in LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items[:] = run_order(items)
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (and TensorRT for engine tests)")
    skip_slow = pytest.mark.skip(reason="slow end-to-end run: set RUN_SLOW=1 to run it")
    cuda = _has_cuda()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not os.environ.get("RUN_SLOW"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tiny_spec():
    from families.registry import resolve_model

    return resolve_model("tiny-sd3")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_spec):
    """The embedded tiny-sd3 pipeline, loaded once per test session (float32, offline)."""
    from families.registry import load_pipeline

    return load_pipeline(tiny_spec)
