"""Why an input is skipped: ``BadImage``, whose message is the reason recorded, and ``one_line``,
which makes any exception's message fit a skip reason or a log line."""

from __future__ import annotations


class BadImage(Exception):
    """The input cannot become a training image; the message is the reason recorded."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
