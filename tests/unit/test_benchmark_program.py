"""The benchmarks' shared frame: parser, one-line errors, JSON + Markdown with device and versions."""

import json

import pytest
import torch

from benchmarks import program
from common.errors import UserError


def test_parser_names_the_program_and_rejects_bad_input_in_one_line(capsys):
    p = program.parser("demo", "Demo benchmark: times nothing.\n\nMore text.")
    assert p.prog == "python -m benchmarks.demo" and p.description == "Demo benchmark: times nothing."
    p.add_argument("--runs", type=int, default=1)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--runs", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_run_returns_the_body_status_and_turns_user_errors_into_one_line(capsys):
    p = program.parser("demo", "Demo.")
    p.add_argument("--fail", action="store_true")

    def body(args):
        if args.fail:
            raise UserError("--fail: asked to fail")
        print("ok")

    assert program.run(p, [], body) == 0
    assert program.run(p, ["--fail"], body) == 2
    out = capsys.readouterr()
    assert out.out == "ok\n" and out.err == "error: --fail: asked to fail\n"
    assert program.run(p, [], lambda args: 1) == 1


def test_write_records_result_and_table_with_the_environment(tmp_path, capsys):
    result = {"benchmark": "demo", **program.environment("cpu"), "rows": [1, 2]}
    md = program.write(tmp_path / "demo.json", result, "| x |\n|---|\n", echo=True)
    assert capsys.readouterr().out == "| x |\n|---|\n"
    assert md == tmp_path / "demo.md" and md.read_text() == "| x |\n|---|\n"
    got = json.loads((tmp_path / "demo.json").read_text())
    assert got["device"].startswith("CPU ") and got["versions"]["torch"] == torch.__version__ and got["rows"] == [1, 2]


def test_option_helpers():
    assert program.split_list(" 2:4, structured:0.3,,") == ["2:4", "structured:0.3"]
    assert program.split_list("") == [] and program.split_list(None) == []
    assert program.resolve_device("cpu") == torch.device("cpu")
    assert program.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = torch.get_num_threads()
    try:
        program.set_threads(1)
        assert torch.get_num_threads() == 1
        program.set_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_every_benchmark_main_runs_in_the_frame():
    """Each benchmark program's ``main`` builds its parser with program.parser and runs with program.run."""
    import ast

    from common.paths import REPO_ROOT

    mains = {}
    for path in sorted((REPO_ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
        if main is not None:
            calls = {ast.unparse(n.func) for n in ast.walk(main) if isinstance(n, ast.Call)}
            mains[path.stem] = {"program.parser", "program.run"} <= calls
    assert len(mains) >= 9 and all(mains.values()), mains
