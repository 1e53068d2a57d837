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


# -- issue 19: foreign directories, the repository's models, locks, a full disk, bounded reads ------------
def test_parent_outputs_are_empty_or_the_projects(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        check_output(mine, "parent")
    with pytest.raises(UserError, match="empty path"):
        check_output("", "parent")
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "parent")  # an empty directory is fine: it becomes the stage's
    with created_dirs(tmp_path / "new" / "out") as out:
        (out / "plan.json").write_text("{}")
    assert is_project_output(tmp_path / "new") and is_project_output(tmp_path / "new" / "out")
    check_output(tmp_path / "new" / "out", "parent")  # a rerun writes into its own output again


def test_repository_models_are_read_only(tmp_path):
    from common.io import REPOSITORY_MODELS, writing_repository_models

    before = sorted(p.name for p in REPOSITORY_MODELS.iterdir())
    for kind, path in (("parent", REPOSITORY_MODELS / "tiny-sd3"), ("file", REPOSITORY_MODELS / "tiny-sd3" / "x.png"),
                       ("dir", REPOSITORY_MODELS / "tiny-sd3" / "transformer")):
        with pytest.raises(UserError, match="embedded models"):
            check_output(path, kind)
    with pytest.raises(UserError, match="embedded models"):
        with atomic_path(REPOSITORY_MODELS / "new-model") as tmp:
            tmp.mkdir()
    with writing_repository_models():  # the scripts that build them
        check_output(REPOSITORY_MODELS / "tiny-sd3", "dir")
    assert sorted(p.name for p in REPOSITORY_MODELS.iterdir()) == before


_HOLD = """
import sys, time
from common.io import created_dirs
with created_dirs(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(directory, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory), str(seconds)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "locked"
    return p


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_second_writer_stops_naming_the_first(tmp_path, monkeypatch):
    from common.io import LOCK, output_lock

    monkeypatch.delenv("SPARSE_DIT_LOCK_WAIT", raising=False)
    holder = _holder(tmp_path / "out", 60)
    try:
        with pytest.raises(UserError, match=f"being written by process {holder.pid} "):
            check_output(tmp_path / "out", "parent")  # before any work
        with pytest.raises(UserError, match=f"being written by process {holder.pid} "):
            with output_lock(tmp_path / "out"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with created_dirs(tmp_path / "out"):  # the kernel dropped the dead holder's lock
        assert (tmp_path / "out" / LOCK).is_file()
    assert not (tmp_path / "out" / LOCK).exists()  # released and removed


def test_second_writer_waits_when_asked(tmp_path, monkeypatch, caplog):
    import time

    monkeypatch.setenv("SPARSE_DIT_LOCK_WAIT", "60")
    holder = _holder(tmp_path / "out", 1.5)
    t0 = time.monotonic()
    with caplog.at_level("WARNING"):
        with created_dirs(tmp_path / "out"):
            waited = time.monotonic() - t0
    holder.wait()
    assert waited > 0.5 and holder.returncode == 0
    assert any(f"process {holder.pid}" in r.getMessage() and "waiting" in r.getMessage() for r in caplog.records)


def test_disk_full_from_a_library_is_one_line(tmp_path):
    """safetensors' own error (not an OSError) inside atomic_path: the location, what is free and what the
    stage said it needs; the temporary is gone."""
    import torch
    from safetensors.torch import save_file

    from common.io import expect_space

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {r.stderr.strip()[:200]}")
    try:
        expect_space(mnt / "out", 200 << 10, "the test stage")  # fits the free space: registered for the message
        with pytest.raises(UserError, match=r"no space left on the device writing .*small/out/w.safetensors \(.* free there\); "
                                            r"the test stage needs about 200.0 KiB"):
            with atomic_path(mnt / "out" / "w.safetensors") as tmp:
                save_file({"w": torch.zeros(1 << 18)}, str(tmp))  # 1 MiB
        assert [p.name for p in (mnt / "out").iterdir()] == [".sparse-dit-deploy"]  # nothing half-written
        code = ("import torch\nfrom safetensors.torch import save_file\nfrom common.cli import run_command\n"
                f"raise SystemExit(run_command(lambda: save_file({{'w': torch.zeros(1 << 18)}}, {str(mnt / 'direct.safetensors')!r})))\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith("error: no space left on the device"), r.stderr[-2000:]
        with pytest.raises(UserError, match="needs about 1.0 GiB .* are free there"):
            expect_space(mnt / "out", 1 << 30, "a big stage")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_prompt_files_are_bounded(tmp_path, caplog):
    (tmp_path / "p.txt").write_text("short\n" + "x" * 5000 + "\n")
    with caplog.at_level("WARNING"):
        lines = read_text_lines(tmp_path / "p.txt", what="prompt file", max_line_chars=4096)
    assert [len(x) for x in lines] == [5, 4096]
    assert any("1 of 2 lines are longer than 4096" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="larger than 1.0 KiB"):
        read_text_lines(tmp_path / "p.txt", what="prompt file", max_bytes=1024)


def test_corrupt_safetensors_and_onnx(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import torch
    from safetensors.torch import save_file

    from common.input_files import check_onnx, check_safetensors, safetensors_numel

    save_file({"a": torch.zeros(10, 3), "b": torch.zeros(4)}, str(tmp_path / "w.safetensors"))
    assert safetensors_numel(tmp_path / "w.safetensors") == 34
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(UserError, match="cut.safetensors is truncated"):
        check_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "txt.safetensors").write_text("hello")
    with pytest.raises(UserError, match="not a safetensors file"):
        check_safetensors(tmp_path / "txt.safetensors")
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    check_onnx(tmp_path / "m.onnx")
    (tmp_path / "m.data").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="m.data of .* is truncated: tensor w ends at byte 16384"):
        check_onnx(tmp_path / "m.onnx")
    (tmp_path / "m.data").unlink()
    with pytest.raises(UserError, match="missing or unreadable"):
        check_onnx(tmp_path / "m.onnx")


def test_other_ranks_of_a_distributed_run_write_under_rank_0s_lock(tmp_path, monkeypatch):
    """torchrun starts every rank with the same --out: rank 0 holds the lock, the others neither wait nor stop."""
    monkeypatch.delenv("SPARSE_DIT_LOCK_WAIT", raising=False)
    holder = _holder(tmp_path / "out", 60)  # stands for rank 0
    try:
        monkeypatch.setenv("RANK", "1")
        check_output(tmp_path / "out", "parent")
        with created_dirs(tmp_path / "out"):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError, match=f"process {holder.pid} "):
            check_output(tmp_path / "out", "parent")
    finally:
        holder.kill()
        holder.wait()


# -- symbolic links and inputs of the wrong kind (issue 23) --------------------------------------------------
def test_a_link_that_leads_nowhere_is_refused_never_followed_nor_replaced(tmp_path):
    """A dangling link (its target may be a disk not mounted now) and a link loop, as the output or above it:
    one line naming the link and its target; nothing is created. A link to an existing directory is followed."""
    (tmp_path / "link").symlink_to(tmp_path / "gone" / "deeper")
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    before = sorted(p.name for p in tmp_path.iterdir())
    for path, kind in ((tmp_path / "link", "parent"), (tmp_path / "link", "dir"), (tmp_path / "link", "file"), (tmp_path / "link" / "sub", "parent")):
        with pytest.raises(UserError, match=f"{tmp_path / 'link'} is a symbolic link to {tmp_path / 'gone' / 'deeper'}, which does not exist"):
            check_output(path, kind)
    for path in (tmp_path / "loop1", tmp_path / "loop2" / "x"):
        with pytest.raises(UserError, match="is a symbolic link that loops"):
            check_output(path, "parent")
    with pytest.raises(UserError, match="is a symbolic link to"):
        with created_dirs(tmp_path / "link"):
            pass
    with pytest.raises(UserError, match="is a symbolic link to"):
        write_json(tmp_path / "link", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not (tmp_path / "gone").exists()
    (tmp_path / "real").mkdir()
    (tmp_path / "good").symlink_to(tmp_path / "real")
    check_output(tmp_path / "good", "parent")
    with created_dirs(tmp_path / "good" / "out"):
        pass
    assert (tmp_path / "real" / "out").is_dir()


def test_an_input_file_that_is_a_directory_or_a_dangling_link_says_so(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match=f"prompt file {tmp_path / 'd'} is a directory, not a file"):
        read_text_lines(tmp_path / "d", what="prompt file")
    with pytest.raises(UserError, match=f"prompt file {tmp_path / 'link'} is a symbolic link that leads to {tmp_path / 'nowhere'}, which does not exist"):
        read_text_lines(tmp_path / "link", what="prompt file")
    with pytest.raises(UserError, match="prompt file .* not found"):
        read_text_lines(tmp_path / "absent", what="prompt file")
    with pytest.raises(UserError, match=f"report {tmp_path / 'd'} is a directory, not a file"):
        read_json(tmp_path / "d", what="report")
    r, w = os.pipe()  # a pipe (--prompts <(...)) is read as it is
    os.write(w, b"a photo\n")
    os.close(w)
    assert read_text_lines(f"/proc/self/fd/{r}", what="prompt file") == ["a photo"]
    os.close(r)
