"""User-facing errors.

A :class:`FastmimError` is an error the user caused and can fix (a bad config key, a missing data directory, an
unreadable image, a foreign checkpoint). The CLI prints its message as one line, without a traceback, and exits
with status 2. Messages are one sentence that says what is wrong and names the fix.
"""


class FastmimError(Exception):
    """An error caused by user input; its message names the fix."""
