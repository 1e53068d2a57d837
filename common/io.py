"""Atomic writes and output checks: nothing half-written ever looks finished, nothing of the user's is lost.

Rules every command follows (the README's "What you can rely on"):

- A file or directory is written under a temporary sibling name and renamed into place when complete.
  The temporary name carries the writer's process id, so a later run removes what a killed run left
  (:func:`remove_stale_temporaries`), and never what a live one is still writing.
- An existing directory is replaced only if this project wrote it: every directory that
  :func:`atomic_path` puts in place carries a marker file (:data:`MARKER`). A file never replaces a
  directory, nor a directory a file. Anything else is a :class:`UserError`, raised before the old
  output is touched.
- :func:`check_output` runs the same checks (and a write probe) at the start of a command, before any
  expensive step; :func:`created_dirs` removes the directories a failing command created.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from common.errors import UserError

MARKER = ".sparse-dit-deploy"
_MARKER_TEXT = "written by sparse-dit-deploy; this directory may be replaced by a rerun\n"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)\.(?P<pid>\d+)(\.[^.]*)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``final`` that a killed :func:`atomic_path` left (their writer is dead).

    Returns the removed paths. Temporaries of a live process (another run writing the same output) are kept.
    """
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        m = _TMP_RE.match(p.name)
        if not m or m["name"] != final.name or _pid_alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def is_project_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory this project wrote with :func:`atomic_path` (it holds :data:`MARKER`)."""
    return (Path(path) / MARKER).is_file()


def mark_project_output(directory: str | os.PathLike) -> None:
    """Put the marker in a directory this project wrote, so that a rerun may replace it."""
    (Path(directory) / MARKER).write_text(_MARKER_TEXT)


def _replace_problem(final: Path, kind: str) -> str | None:
    """Why writing a ``kind`` ("file" or "dir") at ``final`` would destroy something, or None."""
    if final.is_symlink() and kind == "dir":
        return f"{final} is a symbolic link; give a new directory path"
    if not final.exists():
        return None
    if kind == "file" and final.is_dir():
        return f"{final} is a directory; give a file path (nothing was written)"
    if kind == "dir" and not final.is_dir():
        return f"{final} exists and is not a directory; give a directory path (nothing was written)"
    if kind == "dir" and not is_project_output(final) and any(final.iterdir()):
        return (f"{final} is a directory this project did not write (no {MARKER} marker); "
                f"it is left alone: delete or move it, or choose another output path")
    return None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``final`` (file or directory).

    On an exception the temporary path is removed and ``final`` is left as it was. A directory gets the
    :data:`MARKER` file. Replacing a directory that this project did not write, or a file by a directory
    (or the reverse), raises :class:`UserError` and leaves ``final`` untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp.{os.getpid()}.", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"nothing was written for {final}")
        kind = "dir" if target.is_dir() else "file"
        problem = _replace_problem(final, kind)
        if problem:
            raise UserError(problem)
        if kind == "dir":
            mark_project_output(target)
        if kind == "dir" and final.exists():
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            final.rename(old)
            target.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(path: str | os.PathLike, kind: str, *, option: str = "--out") -> Path:
    """Check, before any work, that a ``kind`` ("file" or "dir") can be written at ``path``.

    Fails with one line if ``path`` (or a parent) is the wrong kind of thing, if a directory there was not
    written by this project (``kind="dir"`` outputs that are replaced whole; pass ``kind="parent"`` for a
    directory that only receives new files), or if the location is not writable (probed by creating and
    removing a file, which also catches read-only file systems). Creates nothing; removes the temporaries
    that killed runs left for this output (:func:`remove_stale_temporaries`). Returns ``path``.
    """
    path = Path(path)
    if kind not in ("file", "dir", "parent"):
        raise ValueError(kind)
    if kind != "parent":
        problem = _replace_problem(path, kind)
        if problem:
            raise UserError(f"{option}: {problem}")
    elif path.exists() and not path.is_dir():
        raise UserError(f"{option}: {path} exists and is not a directory; give a directory path")
    anchor = _nearest_existing(path.parent if kind != "parent" else path)
    if not anchor.is_dir():
        raise UserError(f"{option}: cannot create {path}: {anchor} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{option}: cannot write to {anchor} ({e.strerror or e}); choose a writable location") from None
    if kind != "parent":
        remove_stale_temporaries(path)
    return path


@contextlib.contextmanager
def created_dirs(path: str | os.PathLike, *, remove_on: tuple[type[BaseException], ...] = (Exception,)) -> Iterator[Path]:
    """Create directory ``path`` (and missing parents); if the block raises one of ``remove_on``, remove
    the directories this created (a failing command leaves nothing it created).

    remove_on: default every error but an interrupt; a stage that resumes from its partial output passes
    ``(UserError,)`` so that a crash or Ctrl-C keeps what a rerun can resume from.
    """
    path = Path(path)
    top = None
    p = path
    while not p.exists() and p != p.parent:
        top = p
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except remove_on:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, *, expect: type | None = dict, what: str = "file") -> Any:
    """Read JSON; one-line :class:`UserError` on a missing, unreadable or malformed file.

    expect: the top-level type the file must have (default ``dict``: every JSON file of this project is an
    object); ``None`` accepts anything. what: how to name the file in messages.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing {what} {path}")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; delete it and rerun the stage that writes it") from None
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt JSON in {path} ({e.msg} at line {e.lineno}); delete it and rerun the stage that writes it") from None
    if expect is not None and not isinstance(obj, expect):
        raise UserError(f"{path} holds a JSON {type(obj).__name__}, not the {expect.__name__} expected of a {what}; delete it and rerun the stage that writes it")
    return obj


def read_text_lines(path: str | os.PathLike, *, what: str = "file") -> list[str]:
    """The non-empty stripped lines of a UTF-8 text file; one-line :class:`UserError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """Hash of every file under a directory (relative names and contents), order-independent.

    The :data:`MARKER` file is left out: it says who wrote the directory, not what it holds.
    """
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name != MARKER):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def os_error_line(e: OSError) -> str | None:
    """A one-line message for an OSError that the user or the machine causes (permissions, a read-only or
    full disk, a file where a directory should be), or None for one that is a bug (keeps its traceback)."""
    user_errnos = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR}
    if e.errno not in user_errnos:
        return None
    where = f" {e.filename}" if e.filename else ""
    return f"cannot write or read{where}: {e.strerror}"


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
