"""The one exception type a user can act on.

Any stage raises :class:`UserError` for bad input (unknown model, malformed sparsity string, missing or
corrupt file, mismatched plan or engine). The CLI prints its message as a single line and exits non-zero;
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message is one line saying what was wrong and what to do."""
