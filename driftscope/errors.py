"""The user-facing failure type. Anything a user can fix (a file, a line, a field, an option, a value, a damaged or
mismatched state, a full disk) raises `InputError` with one line that names it and says what was expected; the CLI's
error boundary prints it as `driftscope CMD: error: ...` and exits 2. Any other exception is an internal bug: it
keeps its traceback and exits 1."""
from __future__ import annotations

__all__ = ["InputError", "Terminated"]


class InputError(ValueError):
    """Bad input, option, state or output place, with a one-line message naming it (a ValueError, so callers that
    catch ValueError keep working)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop) during a drift run: handled like Ctrl-C (the progress is saved), and the
    CLI exits 143 (128 + SIGTERM) instead of Ctrl-C's 130."""
