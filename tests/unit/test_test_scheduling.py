"""`make test`'s two pytest workers keep a file's tests together (its module fixtures, such as the Triton
module's server and exports, are built once) and spread only the independent bad-input rows."""

from __future__ import annotations


def test_a_file_is_one_work_unit_and_bad_input_rows_are_spread():
    from tests.conftest import work_unit

    assert work_unit("tests/unit/test_triton_serve.py::test_served_image_equals_in_process_runner[sd3_]") == "tests/unit/test_triton_serve.py"
    assert work_unit("tests/unit/test_triton_serve.py::TestX::test_y[a::b]") == "tests/unit/test_triton_serve.py"
    row = "tests/unit/test_bad_input.py::test_bad_input[prune-percdamp]"
    assert work_unit(row) == row
