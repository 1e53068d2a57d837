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


# Files whose tests are independent one-process runs, spread over the workers test by test; every other file
# stays on one worker, so its module fixtures (a Triton server, cached exports) are built once. `make test` runs
# pytest-xdist with --dist loadfile, which this scheduler refines. (pytest-xdist's loadgroup cannot do it with
# pytest 9.2: its group marks rewrite a nodeid field pytest no longer reads, pytest-dev/pytest-xdist#1386.)
SPREAD_FILES = {"test_bad_input.py"}


def work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: its file, or the test itself in :data:`SPREAD_FILES`."""
    path = nodeid.split("::", 1)[0]
    return nodeid if os.path.basename(path) in SPREAD_FILES else path


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        """One work unit per test file, or per test in :data:`SPREAD_FILES`."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return FileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
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
