"""`make test`'s order: the longest file first, the rest as collected."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace


def test_the_longest_file_runs_first_and_the_rest_keep_their_order():
    from tests.conftest import run_order

    items = [SimpleNamespace(path=Path(f"tests/unit/{name}"), name=i) for i, name in
             enumerate(["test_a.py", "test_a.py", "test_triton_serve.py", "test_b.py", "test_triton_serve.py"])]
    assert [i.name for i in run_order(items)] == [2, 4, 0, 1, 3]
