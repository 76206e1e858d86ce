"""The error types the library raises for user mistakes and for Ctrl-C."""
from __future__ import annotations


class KdprobeError(ValueError):
    """A user-facing error: the message names the problem and the fix, in one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what the interrupted work had saved by then (None: nothing was saved)."""

    def __init__(self, saved: str | None = None):
        super().__init__(saved or "interrupted")
        self.saved = saved
