import json

import pytest

from common.report import write_markdown, write_report


def test_report_writes_json_and_markdown_beside_it(tmp_path):
    md = write_report(tmp_path / "sub" / "bench.json", {"a": 1}, "| a |\n|---|\n| 1 |\n")
    assert md == tmp_path / "sub" / "bench.md"
    assert json.loads((tmp_path / "sub" / "bench.json").read_text()) == {"a": 1}
    assert md.read_text() == "| a |\n|---|\n| 1 |\n"
    assert write_report(tmp_path / "r.json", [], "x\n", md_path=tmp_path / "table.md") == tmp_path / "table.md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "sub", "table.md"]


def test_markdown_is_replaced_whole_or_not_at_all(tmp_path):
    path = write_markdown(tmp_path / "r.md", "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_markdown(path, "half" * 10000 + "\ud800")  # fails while writing: nothing replaces the old file
    assert path.read_text() == "old\n"
    write_markdown(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["r.md"]


def test_markdown_never_replaces_a_directory(tmp_path):
    from common.errors import UserError

    (tmp_path / "r.md").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        write_markdown(tmp_path / "r.md", "x")
