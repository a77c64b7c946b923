"""One exception type for bad input, so the CLI can print one line and exit 2."""


class WorkbenchError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""
