"""Job-controlled text (ids, topics, payload excerpts) made safe for one log line.

A stand-in until `aicsd.logs` has the shared helper: anything that is not short printable
ASCII is shown `repr()`-escaped and cut, so a payload cannot forge log lines or flood the log.
"""

from __future__ import annotations

__all__ = ["one_line", "shown", "shown_id"]


def shown(value: object, limit: int = 200) -> str:
    """`repr()` of `value`, cut to `limit` characters with an ellipsis."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_id(value: str, limit: int = 80) -> str:
    """An id as it is when it is short printable ASCII without spaces, else `shown()`."""
    if len(value) <= limit and value.isascii() and value.isprintable() and " " not in value and value:
        return value
    return shown(value, limit)


def one_line(value: str, limit: int = 500) -> str:
    """`value` with control characters (newlines among them) escaped, cut to `limit` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value[: limit * 2])
    return text if len(text) <= limit else text[: limit - 3] + "..."
