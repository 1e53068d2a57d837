"""A stage's failed check of its own output is one ``error: check failed: ...`` line (what was compared, the figure,
the bound) and exit status 3, never a traceback."""

from __future__ import annotations

import math

from common.cli import EXIT_CHECK_FAILED, run_command
from common.errors import CheckFailed


def test_run_command_prints_a_failed_check_as_one_line_with_status_3(capsys):
    def body():
        raise CheckFailed("transformer: the ONNX in ONNX Runtime differs from torch: max ... is 3.1e-02 (tolerance 1e-04)")

    assert run_command(body) == EXIT_CHECK_FAILED == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: check failed: transformer: the ONNX in ONNX Runtime differs from torch: max ... is 3.1e-02 (tolerance 1e-04)"]


def test_a_failed_parity_summary_names_the_worst_case_its_figure_and_the_bound():
    from export.parity import Parity

    p = Parity(batch_errors={1: {"sample": 2e-6}, 3: {"sample": 4.2e-3}}, tolerance=1e-4, reference="torch fp32")
    assert not p.ok
    line = p.summary()
    assert "\n" not in line and "4.20e-03 at batch 3" in line and "tolerance 1e-04" in line and "1 of 2 outputs over it" in line
    nan = Parity(batch_errors={1: {"sample": math.nan}}, tolerance=1e-4)
    assert not nan.ok and "inf at batch 1" in nan.summary()
