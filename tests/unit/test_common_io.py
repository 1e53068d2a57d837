import json
import os
import subprocess
import sys

import pytest

from common.errors import UserError
from common.io import atomic_path, check_output, created_dirs, is_project_output, read_json, read_text_lines, write_json


def test_failed_write_leaves_previous_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


def test_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "dir"
    for content in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(content)
    assert (target / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]
    assert is_project_output(target)


def test_corrupt_json_is_a_user_error(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt JSON"):
        read_json(tmp_path / "x.json")
    with pytest.raises(UserError, match="missing file"):
        read_json(tmp_path / "absent.json")


# -- outputs never destroy what the user has ------------------------------------------------------------
def test_file_never_replaces_a_directory(tmp_path):
    """The data-loss defect: writing a file onto an existing directory used to delete the directory."""
    victim = tmp_path / "photos"
    victim.mkdir()
    (victim / "holiday.jpg").write_text("irreplaceable")
    with pytest.raises(UserError, match="is a directory"):
        with atomic_path(victim) as tmp:
            tmp.write_text("an image")
    assert (victim / "holiday.jpg").read_text() == "irreplaceable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temporary left


def test_user_directory_is_never_replaced_but_project_output_is(tmp_path):
    mine = tmp_path / "onnx"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        with atomic_path(mine) as tmp:
            tmp.mkdir()
    assert (mine / "notes.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    for content in ("old", "new"):  # our own output (with its marker) is replaced whole
        with atomic_path(ours) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(content)
        assert is_project_output(ours)
    assert (ours / "f").read_text() == "new"


def test_directory_never_replaces_a_file(tmp_path):
    f = tmp_path / "x"
    f.write_text("keep")
    with pytest.raises(UserError, match="not a directory"):
        with atomic_path(f) as tmp:
            tmp.mkdir()
    assert f.read_text() == "keep"


def test_check_output(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a directory"):
        check_output(tmp_path / "d", "file")
    with pytest.raises(UserError, match="did not write"):
        check_output(tmp_path / "d", "dir")
    with pytest.raises(UserError, match="not a directory"):
        check_output(tmp_path / "f", "parent")
    with pytest.raises(UserError, match="not a directory"):
        check_output(tmp_path / "f" / "sub" / "out.json", "file")
    assert check_output(tmp_path / "new" / "deeper" / "out.json", "file")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporaries_of_killed_runs_are_removed(tmp_path):
    final = tmp_path / "onnx"
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".onnx.tmp.{dead}.abc123"
    (stale / "onnx").mkdir(parents=True)
    (stale / "onnx" / "big.bin").write_bytes(b"0" * 1024)
    old = tmp_path / f".onnx.old.{dead}"
    old.mkdir()
    live = tmp_path / f".onnx.tmp.{alive}.zzz"  # a run still writing: left alone
    live.mkdir()
    other = tmp_path / f".compact.tmp.{dead}.q"  # another output's temporary: not this stage's to remove
    other.mkdir()
    check_output(final, "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_created_dirs_removes_only_what_it_created(tmp_path):
    (tmp_path / "existing").mkdir()
    with pytest.raises(UserError):
        with created_dirs(tmp_path / "existing" / "a" / "b"):
            raise UserError("bad input found late")
    assert list((tmp_path / "existing").iterdir()) == []
    with pytest.raises(KeyboardInterrupt):  # an interrupt keeps what a rerun resumes from
        with created_dirs(tmp_path / "resume", remove_on=(UserError,)):
            raise KeyboardInterrupt
    assert (tmp_path / "resume").is_dir()


@pytest.mark.parametrize("content, what", [("[1, 2, 3]", "list"), ('"text"', "str"), ("3", "int")])
def test_json_of_the_wrong_shape_is_a_user_error(tmp_path, content, what):
    (tmp_path / "plan.json").write_text(content)
    with pytest.raises(UserError, match=f"JSON {what}, not the dict"):
        read_json(tmp_path / "plan.json")


def test_text_that_is_not_utf8(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_text_lines(tmp_path / "p.txt", what="prompt file")
