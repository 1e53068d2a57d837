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
- A directory a stage writes files into must be empty, or hold the marker (or lie inside a directory that
  does, or inside the default artifact store): an existing directory of the user's is never mixed with
  outputs. The repository's embedded models (``models/``) are read-only to every command
  (:func:`writing_repository_models` opens them to the scripts that build them).
- A symbolic link that leads nowhere (its target is missing, or links loop), as the output or any directory
  above it, is refused in one line (:func:`link_problem`): it is never followed to create its target (that
  may be a disk not mounted now) nor replaced. A link to an existing directory is followed.
- A stage's output directory is locked while the stage writes it (:func:`output_lock`, taken by
  :func:`created_dirs`): a second run on it stops with one line naming the holder's process, or waits
  ``SPARSE_DIT_LOCK_WAIT`` seconds with a message.
- A write that fails for lack of space, in any library, becomes one line naming the location, what is free
  there and what the stage needs (:func:`expect_space`, :func:`disk_full_error`); the temporary is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from common.errors import UserError
from common.paths import REPO_ROOT

log = logging.getLogger(__name__)

MARKER = ".sparse-dit-deploy"
LOCK = MARKER + ".lock"  # a stage's lock file inside its output directory (see output_lock)
LOCK_WAIT_ENV = "SPARSE_DIT_LOCK_WAIT"
REPOSITORY_MODELS = REPO_ROOT / "models"
# The default artifact store is the project's even where an older version left it without markers.
_OWNED_ROOTS = (REPO_ROOT / "artifacts",)
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


def _bookkeeping(name: str) -> bool:
    """Names this project keeps in an output directory besides the outputs: marker, lock, temporaries."""
    return name in (MARKER, LOCK) or bool(_TMP_RE.match(name))


def _owned(path: Path) -> bool:
    """Whether files may be written into directory ``path``: it is empty, holds only this project's outputs
    (an artifact root given as an empty directory, after a first run), holds the marker, or lies inside a
    directory that does (or inside the default artifact store)."""
    entries = [p for p in path.iterdir() if not _bookkeeping(p.name)]
    if all(p.is_dir() and is_project_output(p) for p in entries):
        return True
    real = path.resolve()
    if any(real == r.resolve() or r.resolve() in real.parents for r in _OWNED_ROOTS):
        return True
    return any((d / MARKER).is_file() for d in (real, *real.parents))


_models_writable = False


@contextlib.contextmanager
def writing_repository_models() -> Iterator[None]:
    """Open the repository's embedded models (``models/``) to writes for the block: only the scripts that
    build them (``scripts/train_tiny.py``, ``scripts/train_digit_classifier.py``) use it."""
    global _models_writable
    before, _models_writable = _models_writable, True
    try:
        yield
    finally:
        _models_writable = before


def _repository_model_problem(path: Path) -> str | None:
    if _models_writable:
        return None
    real, models = path.resolve(), REPOSITORY_MODELS.resolve()
    if real == models or models in real.parents:
        return (f"{path} is inside the repository's embedded models ({REPOSITORY_MODELS}), which every command only reads; "
                f"choose an output outside models/ (nothing was written)")
    return None


def link_problem(path: str | os.PathLike) -> str | None:
    """Why nothing can be written at ``path``: it, or a directory above it, is a symbolic link that leads nowhere
    (its target does not exist, or the links loop); None otherwise.

    Such a link is refused rather than followed: creating its target would create directories the user never
    named (and their missing parents: a link to a disk that is not mounted now would fill the mount point), a
    loop has no target at all, and replacing the link would destroy something of the user's. A link to an
    existing directory is followed like any directory.
    """
    p = Path(path).absolute()
    for q in (*reversed(p.parents), p):
        try:
            if not q.is_symlink():
                continue
            target = os.readlink(q)
        except OSError:
            continue
        try:
            os.stat(q)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{q} is a symbolic link that loops ({q} -> {target} -> ...); fix or remove the link, or give another path (nothing was written)"
            where = Path(os.path.normpath(q.parent / target))
            why = "does not exist" if e.errno == errno.ENOENT else f"cannot be reached ({e.strerror})"
            return (f"{q} is a symbolic link to {target}, which {why}; create {where} if outputs belong there, "
                    f"or give another path (nothing was written)")
    return None


def make_dirs(path: str | os.PathLike) -> Path | None:
    """Create directory ``path`` and its missing parents, each with the :data:`MARKER` (this project wrote
    it). Returns the topmost directory created, or None when ``path`` existed. A symbolic link that leads
    nowhere on the way is a :class:`UserError` (:func:`link_problem`), raised before anything is created."""
    path = Path(path)
    problem = link_problem(path)
    if problem:
        raise UserError(problem)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    problem = _repository_model_problem(path)
    if missing and problem:
        raise UserError(problem)
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # another run made it a moment ago
            continue
        mark_project_output(d)
    return missing[-1] if missing else None


def _replace_problem(final: Path, kind: str) -> str | None:
    """Why writing a ``kind`` ("file" or "dir") at ``final`` would destroy something, or None."""
    problem = link_problem(final) or _repository_model_problem(final)
    if problem:
        return problem
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
    problem = link_problem(final) or _repository_model_problem(final)
    if problem:
        raise UserError(problem)
    make_dirs(final.parent)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp.{os.getpid()}.", dir=final.parent))
    target = tmp / final.name
    try:
        try:
            yield target
        except Exception as e:
            if is_disk_full(e):
                raise disk_full_error(final) from None
            raise
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
    if not str(path).strip():
        raise UserError(f"{option}: empty path; give a {'file' if kind == 'file' else 'directory'} path")
    path = Path(path)
    if kind not in ("file", "dir", "parent"):
        raise ValueError(kind)
    if kind != "parent":
        problem = _replace_problem(path, kind)
        if problem:
            raise UserError(f"{option}: {problem}")
    else:
        problem = link_problem(path) or _repository_model_problem(path)
        if problem:
            raise UserError(f"{option}: {problem}")
        if path.exists() and not path.is_dir():
            raise UserError(f"{option}: {path} exists and is not a directory; give a directory path")
        if path.is_dir() and not _owned(path):
            raise UserError(f"{option}: {path} is a non-empty directory this project did not write (no {MARKER} marker); "
                            f"outputs are not mixed with what is there: give a new or empty directory (if an earlier version "
                            f"of this project wrote it: touch {path / MARKER})")
        if path.is_dir():
            probe_lock(path)
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
    """Create directory ``path`` (and missing parents, each marked as this project's) and hold its
    :func:`output_lock` for the block; if the block raises one of ``remove_on``, remove the directories
    this created (a failing command leaves nothing it created).

    remove_on: default every error but an interrupt; a stage that resumes from its partial output passes
    ``(UserError,)`` so that a crash or Ctrl-C keeps what a rerun can resume from.
    """
    path = Path(path)
    top = make_dirs(path)
    marked = top is None and not is_project_output(path)
    if marked:  # an empty directory (or one inside the project's) becomes this stage's output
        mark_project_output(path)
    try:
        with output_lock(path):
            yield path
    except remove_on:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        elif marked:
            (path / MARKER).unlink(missing_ok=True)
        raise


# -- one run per output directory ------------------------------------------------------------------------
_held_locks: dict[str, list] = {}  # realpath -> [fd, depth]


def _holder_text(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    return f"process {info['pid']} ({info.get('command', '?')}, since {info.get('since', '?')})"


def _lock_wait_seconds() -> float:
    text = os.environ.get(LOCK_WAIT_ENV, "0").strip() or "0"
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"{LOCK_WAIT_ENV}={text!r}: expected a number of seconds (0: stop at once)") from None
    return max(v, 0.0)


def _follower_rank() -> bool:
    """Whether this process is a rank other than 0 of a distributed run (torchrun sets ``RANK``)."""
    try:
        return int(os.environ.get("RANK", "0") or 0) != 0
    except ValueError:
        return False


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of an existing output ``directory`` for the block (re-entrant within a process).

    The lock is an ``flock`` on ``directory/`` :data:`LOCK`, which records the holder (process id, command
    line, start time); the kernel drops it when the holder dies, so a killed run never leaves it stuck.
    When another process holds it, stop with one line naming that process, or, with the environment
    variable ``SPARSE_DIT_LOCK_WAIT=<seconds>``, wait that long (logging once what is waited for). In a
    distributed run (torchrun) rank 0 takes the lock and the other ranks write under it.
    """
    directory = Path(directory)
    key = os.path.realpath(directory)
    if _follower_rank():  # one distributed run: its rank 0 holds the lock, the other ranks write under it
        yield directory
        return
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield directory
        finally:
            _held_locks[key][1] -= 1
        return
    lock = directory / LOCK
    wait = _lock_wait_seconds()
    deadline = time.monotonic() + wait
    announced = False
    while True:
        make_dirs(directory)  # a failing holder may have removed the directory it created
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder_text(lock)
            if time.monotonic() >= deadline:
                waited = f" (waited {wait:g} s)" if wait else ""
                raise UserError(f"{directory} is being written by {holder}{waited}; let that run finish (or stop it) and rerun, "
                                f"or set {LOCK_WAIT_ENV}=<seconds> to wait for it") from None
            if not announced:
                log.warning("waiting up to %g s for %s: it is being written by %s", wait, directory, holder)
                announced = True
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))
            continue
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    command = " ".join(["python", *sys.argv])[:200] if sys.argv and sys.argv[0] else "python"
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "command": command,
                             "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}).encode())
    _held_locks[key] = [fd, 1]
    if announced:
        log.info("%s is free: continuing", directory)
    try:
        yield directory
    finally:
        del _held_locks[key]
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                os.unlink(lock)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def probe_lock(directory: str | os.PathLike) -> None:
    """One line now, before any work, if another process holds ``directory``'s :func:`output_lock` (unless
    ``SPARSE_DIT_LOCK_WAIT`` asks to wait: then :func:`output_lock` waits when the stage starts writing)."""
    directory = Path(directory)
    lock = directory / LOCK
    if os.path.realpath(directory) in _held_locks or not lock.is_file() or _lock_wait_seconds() > 0 or _follower_rank():
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{directory} is being written by {_holder_text(lock)}; let that run finish (or stop it) and rerun, "
                        f"or set {LOCK_WAIT_ENV}=<seconds> to wait for it") from None
    finally:
        os.close(fd)


# -- disk space --------------------------------------------------------------------------------------------
_space_needs: list[tuple[Path, int, str]] = []


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the file system that holds ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(_nearest_existing(Path(path).absolute())).free


def expect_space(path: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Say, before a stage writes, that ``what`` needs about ``need_bytes`` at ``path``: one line now if the
    file system has less free, and the figure a later disk-full error quotes (:func:`disk_full_error`)."""
    path = Path(path).absolute()
    free = free_bytes(path)
    if need_bytes > free:
        raise UserError(f"{what} needs about {_fmt_bytes(need_bytes)} at {path} but {_fmt_bytes(free)} are free there; "
                        f"free some space or choose another output location")
    _space_needs[:] = [e for e in _space_needs if e[0] != path]
    _space_needs.append((path, int(need_bytes), what))


_DISK_FULL = re.compile(r"no space left on device|os error 28|disk quota exceeded|errno 28|ENOSPC", re.IGNORECASE)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a failed write for lack of space, whatever
    library raised it (``OSError`` ENOSPC/EDQUOT, safetensors' ``SafetensorError``, torch's and protobuf's
    ``RuntimeError``...)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _DISK_FULL.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(where: str | os.PathLike | None) -> UserError:
    """The one line for a write at ``where`` that failed for lack of space: the location, what is free
    there, and what the stage needs when it said so (:func:`expect_space`)."""
    where = Path(where).absolute() if where else None
    need = None
    if where is not None:
        for path, n, what in reversed(_space_needs):
            if where == path or path in where.parents:
                need = (n, what)
                break
    elif _space_needs:
        need = _space_needs[-1][1:]
    loc = f" writing {where}" if where else ""
    free = f" ({_fmt_bytes(free_bytes(where))} free there)" if where else ""
    needs = f"; {need[1]} needs about {_fmt_bytes(need[0])}" if need else ""
    return UserError(f"no space left on the device{loc}{free}{needs}; nothing half-written was kept: "
                     f"free some space or choose another output location, and rerun")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def input_file_problem(path: str | os.PathLike, what: str = "file", *, missing: str | None = None) -> str | None:
    """Why ``path`` cannot be read as a file, in one line naming ``what`` it should be: it does not exist
    (``missing``: the wording, default ``"<what> <path> not found"``), is a directory, or is a symbolic link that
    leads nowhere; None for a file, or for something else that can be read like one (a pipe, a device)."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return f"{what} {path} is a directory, not a file; give the file itself"
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            why = "loops" if e.errno == errno.ELOOP else f"leads to {os.readlink(path)}, which does not exist"
            return f"{what} {path} is a symbolic link that {why}; give the file itself"
    if path.exists():  # a pipe (``--prompts <(...)``), a device: read as it is
        return None
    return missing or f"{what} {path} not found"


def read_json(path: str | os.PathLike, *, expect: type | None = dict, what: str = "file") -> Any:
    """Read JSON; one-line :class:`UserError` on a missing, unreadable or malformed file.

    expect: the top-level type the file must have (default ``dict``: every JSON file of this project is an
    object); ``None`` accepts anything. what: how to name the file in messages.
    """
    path = Path(path)
    problem = input_file_problem(path, what, missing=f"missing {what} {path}")
    if problem:
        raise UserError(problem)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; delete it and rerun the stage that writes it") from None
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt JSON in {path} ({e.msg} at line {e.lineno}); delete it and rerun the stage that writes it") from None
    if expect is not None and not isinstance(obj, expect):
        raise UserError(f"{path} holds a JSON {type(obj).__name__}, not the {expect.__name__} expected of a {what}; delete it and rerun the stage that writes it")
    return obj


def read_text_lines(path: str | os.PathLike, *, what: str = "file", max_bytes: int = 16 << 20,
                    max_line_chars: int | None = None) -> list[str]:
    """The non-empty stripped lines of a UTF-8 text file; one-line :class:`UserError` otherwise.

    max_bytes: a larger file is refused with one line (at most ``max_bytes + 1`` bytes are read).
    max_line_chars: longer lines are cut to this many characters, said once with the count.
    """
    path = Path(path)
    problem = input_file_problem(path, what)
    if problem:
        raise UserError(problem)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise UserError(f"{what} {path} is larger than {_fmt_bytes(max_bytes)} ({_fmt_bytes(path.stat().st_size)}); "
                            f"a {what} holds one short line per entry: check that this is the right file")
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if max_line_chars is not None:
        long = sum(len(line) > max_line_chars for line in lines)
        if long:
            log.warning("%s %s: %d of %d lines are longer than %d characters and were cut to that length",
                        what, path, long, len(lines), max_line_chars)
            lines = [line[:max_line_chars] for line in lines]
    return lines


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link ``src`` to ``dst`` (no second copy of a large file), or copy it where a link cannot be made
    (another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """Hash of every file under a directory (relative names and contents), order-independent.

    The :data:`MARKER` and :data:`LOCK` files are left out: they say who wrote the directory, not what it holds.
    """
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name not in (MARKER, LOCK)):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def os_error_line(e: OSError) -> str | None:
    """A one-line message for an OSError that the user or the machine causes (permissions, a read-only or
    full disk, a file where a directory should be), or None for one that is a bug (keeps its traceback)."""
    user_errnos = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR}
    if e.errno not in user_errnos:
        return None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return str(disk_full_error(e.filename))
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
