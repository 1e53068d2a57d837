import json

import pytest

from common.errors import UserError
from common.io import atomic_path, read_json, write_json


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


def test_corrupt_json_is_a_user_error(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt JSON"):
        read_json(tmp_path / "x.json")
    with pytest.raises(UserError, match="missing file"):
        read_json(tmp_path / "absent.json")
