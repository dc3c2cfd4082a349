"""The one exception type for mistakes a user can cause (bad file, bad flag, bad checkpoint)."""


class ZaizaiError(Exception):
    """A problem the user can fix. The message says what was wrong and what to do.

    The CLI prints it on one line without a traceback and exits non-zero.
    """
