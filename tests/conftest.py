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


# Files whose tests are independent one-process runs, spread over the workers test by test (`make test` runs
# pytest-xdist with --dist loadgroup); every other file stays on one worker, so its module fixtures (a Triton
# server, cached exports) are built once.
SPREAD_FILES = {"test_bad_input.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name not in SPREAD_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
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
