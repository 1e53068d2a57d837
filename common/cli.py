"""What every command line of the project shares: one-line errors, range-checked option types, one runner.

- :class:`ArgumentParser` reports a bad option as a single ``error: ...`` line (argparse's default prints
  the usage block first) and exits with status 2, like :class:`~common.errors.UserError`.
- The option types (:func:`int_at_least`, :func:`float_range`, :func:`cc_list`, ...) check ranges while
  the command line is parsed, before any stage starts.
- :func:`run_command` runs a command body and turns a :class:`UserError`, an interrupt, or an OS error the
  user can act on (permission denied, read-only or full disk) into one line and an exit status.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Callable

from common.errors import CheckFailed, UserError

EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 3  # a stage's own check of its output failed (common.errors.CheckFailed)
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and the same exit status as a UserError.

    An option given an empty value (``--out ""``) is an error, never a silent fall-back to the default,
    unless the option says an empty value means something: ``parser.add_argument(...).allow_empty = True``.
    """

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")

    def _get_value(self, action, arg_string):
        if (action.option_strings and isinstance(arg_string, str) and not arg_string.strip() and arg_string != action.default
                and not getattr(action, "allow_empty", False)):
            raise argparse.ArgumentError(action, "must not be empty")
        return super()._get_value(action, arg_string)


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def int_at_least(lo: int) -> Callable[[str], int]:
    """An ``int`` option type that must be ``>= lo``."""

    def parse(text: str) -> int:
        v = _number(text, int)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """An ``int`` option type in ``[lo, hi]``."""

    def parse(text: str) -> int:
        v = _number(text, int)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {v}")
        return v

    parse.__name__ = f"integer {lo}-{hi}"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A finite ``float`` option type within the given bounds (closed unless ``*_open``)."""

    def parse(text: str) -> float:
        v = _number(text, float)
        bad = v != v or v in (float("inf"), float("-inf"))
        if lo is not None:
            bad |= v <= lo if lo_open else v < lo
        if hi is not None:
            bad |= v >= hi if hi_open else v > hi
        if bad:
            lo_s = "" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
            hi_s = "" if hi is None else f"{hi:g}{')' if hi_open else ']'}"
            rng = f"{lo_s or '(-inf'}, {hi_s or 'inf)'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {rng}, got {text}")
        return v

    parse.__name__ = "number"
    return parse


_CC = re.compile(r"^\d{1,2}\.\d$")


def cc_list(text: str) -> tuple[str, ...]:
    """Compute capabilities ``"8.6,8.9"`` -> ``("8.6", "8.9")``; each must look like ``major.minor``."""
    items = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in items if not _CC.match(c)]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"expected compute capabilities like 8.6,8.9, got {text!r}")
    return items


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def run_command(body: Callable[[], int | None]) -> int:
    """Run a command body; a user-actionable failure becomes one ``error:`` line on stderr and a status.

    UserError and user-caused OS errors (permissions, read-only or full disk, also a full disk reported by a
    library as its own exception): status 2. A stage's failed check of its own output (CheckFailed): status 3.
    Ctrl-C: 130.
    Anything else is a bug and keeps its traceback.
    """
    from common.io import disk_full_error, is_disk_full, os_error_line

    try:
        return int(body() or 0)
    except CheckFailed as e:
        print(f"error: check failed: {e}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a full disk, whichever library was writing (safetensors, torch, onnx)
        if not is_disk_full(e):
            raise
        print(f"error: {disk_full_error(getattr(e, 'filename', None))}", file=sys.stderr)
        return EXIT_USER_ERROR


def setup_logging(verbose: bool = False) -> None:
    """Our log lines as ``LEVEL logger: message`` (DEBUG with ``verbose``), and the library output a user cannot
    act on silenced (:mod:`common.quiet`) unless ``verbose`` or ``SDD_DEBUG=1`` asks to see everything."""
    from common.quiet import debug_requested, silence_libraries

    logging.basicConfig(level=logging.DEBUG if verbose or debug_requested() else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    silence_libraries(debug=verbose)
