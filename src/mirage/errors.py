"""Errors a user can act on. The CLI prints their message as one line and exits 1 (2 for usage)."""


class MirageError(Exception):
    """Something is wrong with the input or the environment; the message says what and what to do."""


class UsageError(MirageError, ValueError):
    """A bad argument: exit code 2."""


def quoted(text: str, limit: int = 60) -> str:
    """`text` quoted for a one-line message, cut where it is long (a pasted paragraph must not flood it)."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"
