"""The one exception type a user can act on.

Any stage raises :class:`UserError` for bad input (unknown model, malformed sparsity string, missing or
corrupt file, mismatched plan or engine). The CLI prints its message as a single line and exits non-zero;
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message is one line saying what was wrong and what to do."""


class CheckFailed(UserError):
    """A stage's own check of what it produced failed (ONNX Runtime vs torch parity, the surgery's equivalence,
    a graph check): one line saying what was compared, the figure and the bound. The CLI prints it like a
    :class:`UserError` and exits with status 3; nothing half-written is left (the stage's output directory is
    removed as for any failure)."""
