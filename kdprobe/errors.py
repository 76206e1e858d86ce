"""The one error type the library raises for user mistakes."""


class KdprobeError(ValueError):
    """A user-facing error: the message names the problem and the fix, in one line."""
